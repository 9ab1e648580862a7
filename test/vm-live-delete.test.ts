/**
 * A live checkpoint delete on a running guest (src/differencing/live-delete.ts): the guest
 * writes files without pause while two live checkpoints are taken and the inner one of them
 * is deleted, QEMU streaming it into the node above it. The oracle is the guest itself: every
 * file it wrote carries an md5 in /data/sums, and a fresh boot checks them all from the disk.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as cp from '../src/differencing/checkpoint';
import { createLive } from '../src/differencing/live';
import { removeLive } from '../src/differencing/live-delete';
import { createHash, randomBytes } from 'node:crypto';
import { qemuCheck, qemuImgOk } from './helpers/qemu';
import { bootGuest, Guest, jobOk, makeRootfs, needGuest, socketPath } from './helpers/guest';

const skip = needGuest();

/** Writes 256 KiB files, each followed by its md5 in /data/sums and a sync, until told to stop. */
const writerJob = `i=0
( while [ ! -e /data/stop ]; do
  dd if=/dev/urandom of=/data/f$i bs=64k count=4 2>/dev/null
  md5sum /data/f$i >> /data/sums
  sync
  echo "W $i"
  i=$((i+1))
done ) &
read stop
touch /data/stop
wait
echo "WROTE $(wc -l < /data/sums)"
`;

const checkJob = `cd /data && echo "SUMS $(wc -l < sums) OK $(md5sum -c sums 2>/dev/null | grep -c ': OK$')"; md5sum -c sums 2>&1 | grep -v ': OK$' || true\n`;

function written(output: string): number {
  return (output.match(/^W \d+$/gm) ?? []).length;
}

const PRE = 8;

t.test('a live checkpoint delete of an inner node while the guest writes: QEMU streams it away, no write is lost, the disk boots', { skip }, async (t) => {
  const dir = t.testdir();
  // the inner node c1 holds real data: a root filesystem with PRE files (and their md5s) over
  // a bare one, made offline (qemu-img convert -B writes only the clusters that differ)
  const files: Record<string, Buffer | string> = {};
  let sums = '';
  for (let i = 0; i < PRE; i++) {
    const b = randomBytes(256 * 1024);
    files[`data/pre${i}`] = b;
    sums += `${createHash('md5').update(b).digest('hex')}  /data/pre${i}\n`;
  }
  files['data/sums'] = sums;
  const base = path.join(dir, 'base.raw');
  makeRootfs(base);
  const alt = path.join(dir, 'alt.raw');
  makeRootfs(alt, { files });
  const image = path.join(dir, 'vm.qcow2');
  qemuImgOk('convert', '-q', '-O', 'qcow2', '-B', base, '-F', 'raw', alt, image);
  fs.rmSync(alt);
  await cp.create(image, 'c1');
  const sock = socketPath(t);
  const g = new Guest({ disk: image, job: writerJob, qmp: sock, timeoutMs: 400_000 });
  let wrote = 0;
  try {
    await g.waitFor(/^W 1$/m);
    // one live checkpoint: IMAGE -> c2 -> c1 -> base.raw, c1 inner
    await createLive(image, 'c2', { qmp: sock });
    const n = written(g.output);
    await g.waitFor(new RegExp(`^W ${n + 1}$`, 'm'));
    const before = written(g.output);
    t.comment(`c2 after ${n} files, delete from ${before}`);
    let progress = 0;
    const r = await removeLive(image, 'c1', { qmp: sock, onProgress: () => progress++ });
    const during = written(g.output) - before;
    t.ok(r.inQemuChain, 'c1 was in the running chain');
    t.same(r.streamed, [cp.nodePath(image, 'c2')], 'QEMU streamed c1 into c2');
    t.ok(progress > 0, `progress was reported (${progress} updates)`);
    t.notOk(fs.existsSync(cp.nodePath(image, 'c1')), 'c1 is deleted');
    t.equal(cp.backingOf(cp.nodePath(image, 'c2')), base, 'c2 is backed by base.raw on disk');
    const k = written(g.output);
    await g.waitFor(new RegExp(`^W ${k + 1}$`, 'm'));
    t.ok(written(g.output) > before, `the guest kept writing through the delete (${during} files during it, ${written(g.output) - before} since it began)`);
    g.send('stop');
    const res = await g.result;
    jobOk(t, res, 'the guest ran to the end');
    wrote = Number(/^WROTE (\d+)$/m.exec(res.output)?.[1] ?? 0) - PRE;
    t.ok(wrote >= 4, `the guest wrote ${wrote} files`);
  } finally {
    g.kill();
  }
  t.equal(qemuCheck(image).status, 0, 'qemu-img check IMAGE clean');
  t.equal(qemuCheck(cp.nodePath(image, 'c2')).status, 0, 'qemu-img check c2 clean');
  const tree = await cp.list(image);
  t.same(tree.nodes.map((n) => n.name), ['c2'], 'the tree: c2 only');
  t.equal(tree.current, 'c2', 'IMAGE sits on c2');
  const after = await bootGuest({ disk: image, job: checkJob });
  jobOk(t, after, 'boot after the live delete');
  const s = /^SUMS (\d+) OK (\d+)$/m.exec(after.output);
  t.same(s ? [Number(s[1]), Number(s[2])] : undefined, [PRE + wrote, PRE + wrote], "every file, c1's and the guest's, reads back with its md5");
  if (!s || s[1] !== s[2]) t.comment(after.output.slice(-1500));
});
