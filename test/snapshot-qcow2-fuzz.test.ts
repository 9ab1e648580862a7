/**
 * Fuzz: `snapshot create` of a damaged qcow2 volume that a store already tracks with a
 * bitmap (metadata bytes changed at random: header, L1 and L2 tables, refcounts, the internal
 * snapshot table, the bitmap directory and tables; seeded, DISKSNAP_FUZZ_SEED and
 * DISKSNAP_FUZZ_COUNT choose another run). For each image, a default incremental and then a
 * `--read-all` one:
 *   - each exits 0, or 1 with one line that is not an internal error (never a signal or a hang);
 *   - neither changes what the guest sees (`qemu-img convert` before and after), though both
 *     may write the image's bitmaps, where `qemu-img check` finds no corruption in the image
 *     (leaks allowed). Where it does, an L2 entry can map guest data onto a refcount block,
 *     and then any metadata write changes the guest view, QEMU's as much as disksnap's (a
 *     snapshot that meets such an entry fails with ECORRUPT 'overlapping metadata');
 *   - a completed read-all snapshot of an image QEMU still reads as qcow2 restores exactly
 *     what `qemu-img convert` shows. (The default one may not: damaged L2 entries can remap
 *     a cluster the bitmap never marked, which is what --read-all is for.)
 * ./qcow2-fuzz.test.ts does the same for the image layer's own operations.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { CLI } from '../fixtures/store/helpers';
import { qemuImgOk, qemuIo, run } from './helpers/qemu';
import { needQemuNbd } from './helpers/qemu-bitmaps';
import { xorshift32 } from './helpers/rng';

const SEED = Number(process.env.DISKSNAP_FUZZ_SEED ?? 20261207);
const COUNT = Number(process.env.DISKSNAP_FUZZ_COUNT ?? 30);
const skip = needQemuNbd();

/** The guest view as QEMU reads it, or undefined where it does not read the image as qcow2. */
function guestView(img: string, out: string): Buffer | undefined {
  const info = run('qemu-img', ['info', '--output=json', '-U', img]);
  if (info.status !== 0 || (JSON.parse(info.stdout) as { format: string }).format !== 'qcow2') return undefined;
  if (run('qemu-img', ['convert', '-U', '-f', 'qcow2', '-O', 'raw', img, out]).status !== 0) return undefined;
  try {
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(out, { force: true });
  }
}

function disksnap(args: string[]): { status: number | null; signal: NodeJS.Signals | null; out: string; err: string } {
  const env = { ...process.env };
  delete env.NODE_EXTRA_CA_CERTS;
  const r = spawnSync(process.execPath, [CLI, ...args], { env, encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, signal: r.signal, out: r.stdout, err: r.stderr.trim() };
}

t.test(`snapshot create of damaged bitmap-tracked qcow2 volumes (seed ${SEED}, ${COUNT} images)`, { skip }, async (t) => {
  const dir = t.testdir();
  const vol = path.join(dir, 'vm.qcow2');
  const store0 = path.join(dir, 'store0');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', vol, '8M');
  qemuIo(vol, ['write -P 0x11 0 300k', 'write -P 0x22 2M 64k', 'write -z 5M 100k']);
  qemuImgOk('snapshot', '-c', 'internal', vol);
  qemuIo(vol, ['write -P 0x33 1M 200k']);
  qemuImgOk('bitmap', '--add', vol, 'users-own');
  const first = disksnap(['snapshot', 'create', vol, '--store', store0]);
  t.equal(first.status, 0, `the first snapshot: ${first.err}`);
  qemuIo(vol, ['write -P 0x44 3M 8k', 'write -P 0x55 6M 70k']);
  const base = fs.readFileSync(vol);
  // the clusters that hold no guest data of the active layer: metadata (and the internal snapshot's data)
  const data = new Set<number>();
  for (const e of JSON.parse(qemuImgOk('map', '--output=json', vol)) as { data: boolean; offset?: number; length: number }[]) {
    if (e.data && e.offset !== undefined) for (let o = e.offset; o < e.offset + e.length; o += 4096) data.add(o);
  }
  const meta: number[] = [];
  for (let o = 0; o < base.length; o += 4096) if (!data.has(o)) meta.push(o);

  const next = xorshift32(SEED);
  const store = path.join(dir, 'store');
  let internal = 0;
  let viewChanged = 0;
  let wrong = 0;
  let compared = 0;
  let viewsCompared = 0;
  for (let i = 0; i < COUNT; i++) {
    const b = Buffer.from(base);
    const what: string[] = [];
    for (let m = 1 + (next() % 4); m > 0; m--) {
      const c = meta[next() % meta.length];
      const at = c === 0 && next() % 2 ? next() % 104 : c + (next() % 4096);
      if (at >= b.length) continue;
      const v = [b[at] ^ (1 << next() % 8), 0xff, 0, next() & 0xff][next() % 4];
      what.push(`byte ${at} 0x${b[at].toString(16)} -> 0x${v.toString(16)}`);
      b[at] = v;
    }
    fs.writeFileSync(vol, b); // (the same file: the store knows the volume by it)
    fs.rmSync(store, { recursive: true, force: true });
    fs.cpSync(store0, store, { recursive: true });
    const tag = `image ${i} (${what.join(', ')})`;
    for (const extra of [[], ['--read-all']]) {
      const sound = [0, 3].includes(run('qemu-img', ['check', '-U', vol]).status ?? -1);
      const before = sound ? guestView(vol, path.join(dir, 'before.raw')) : undefined;
      const r = disksnap(['snapshot', 'create', vol, '--store', store, '--json', ...extra]);
      const clean = r.signal === null && (r.status === 0 || (r.status === 1 && r.err.split('\n').length === 1 && !/internal error/.test(r.err)));
      if (!clean) {
        internal++;
        t.fail(`${tag} ${extra.join(' ')}: exit ${r.status} signal ${r.signal}: ${r.err.slice(0, 800)}`);
      }
      const after = guestView(vol, path.join(dir, 'after.raw'));
      if (before) viewsCompared++;
      if (before && !(after && after.equals(before))) {
        viewChanged++;
        t.fail(`${tag} ${extra.join(' ')}: the guest view changed (exit ${r.status}: ${r.err.slice(0, 300)})`);
      }
      if (extra.length && r.status === 0 && after) {
        const s = JSON.parse(r.out) as { id: string };
        const out = path.join(dir, 'restored.raw');
        const rr = disksnap(['snapshot', 'restore', s.id, '--store', store, '--to', out, '--force']);
        compared++;
        if (rr.status !== 0 || !fs.readFileSync(out).equals(after)) {
          wrong++;
          t.fail(`${tag}: the read-all snapshot does not restore what QEMU shows (${rr.err})`);
        }
        fs.rmSync(out, { force: true });
      }
    }
  }
  t.equal(internal, 0, 'no signal, hang or internal error');
  t.equal(viewChanged, 0, `no snapshot changed what the guest sees of an image without corruption (${viewsCompared} compared)`);
  t.ok(viewsCompared >= COUNT / 4, `enough guest views were compared (${viewsCompared} of ${2 * COUNT} commands)`);
  t.equal(wrong, 0, `every completed read-all snapshot QEMU could check restores exactly (${compared} compared)`);
  t.ok(compared >= COUNT / 5, `enough of them were compared (${compared} of ${COUNT})`);
});
