/**
 * A raw volume that nothing has written since its parent snapshot is not read again: the
 * parent recorded the volume's identity and times (`volumeStat`) where every write moves them
 * (a live read on ext4, xfs or btrfs), and a successor that finds them unchanged keeps every
 * block's entry (changeSource 'unchanged'). Each way of writing a file must move it off that
 * path — write(2), a store through a shared mapping, a write whose mtime is set back, a file
 * replaced by an identical copy — as must a restart (times on disk can lag data after a
 * crash), and a filesystem where writes need not move the times (tmpfs) never records them.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import * as snap from '../src/storage';
import { native } from '../src/engine/native';
import { withFaults } from '../src/storage/faults';
import { KiB, MiB, Write, applyWrites, makeImage, sha } from '../fixtures/store/helpers';
import { missing } from './helpers/tools';
import { closeInspector, forEachBackend } from './helpers/backends';

t.teardown(closeInspector);

const BS = 64 * KiB;
const n = native();

const base: Write[] = [
  { offset: 0, length: 2 * MiB, seed: 1 },
  { offset: 5 * MiB + 77, length: 1 * MiB, seed: 2 },
  { offset: 16 * MiB - 4096, length: 4096, seed: 3 },
];

/** Counts the native calls that read or hash volume data while `fn` runs. */
async function countReads<T>(fn: () => Promise<T>): Promise<{ value: T; reads: number }> {
  const names = ['tagFile', 'hashFile', 'hashBlocksAsync', 'preadBatchAsync'] as const;
  const orig = names.map((k) => n[k]);
  let reads = 0;
  names.forEach((k, i) => {
    (n as unknown as Record<string, unknown>)[k] = (...a: unknown[]) => {
      reads++;
      return (orig[i] as (...x: unknown[]) => unknown).apply(n, a);
    };
  });
  try {
    return { value: await fn(), reads };
  } finally {
    names.forEach((k, i) => ((n as unknown as Record<string, unknown>)[k] = orig[i]));
  }
}

async function restoresTo(t: Test, store: string, id: string, want: string, what: string): Promise<void> {
  const out = path.join(path.dirname(store), `${id}.restored`);
  await snap.restoreSnapshot(id, { store, to: out });
  t.equal(sha(out), want, `${what}: restores byte-exact`);
  fs.rmSync(out);
}
type Test = Parameters<Parameters<typeof t.test>[1]>[0];

t.test('an unchanged volume is not read: every block keeps its parent entry, and the snapshot restores exact', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 16 * MiB, base);
  const want = sha(vol);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  t.equal(s1.changeSource, 'full');
  const st = fs.statSync(vol, { bigint: true });
  const bootId = fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
  t.same(s1.volumeStat, { dev: Number(st.dev), ino: String(st.ino), size: Number(st.size), mtimeNs: String(st.mtimeNs), ctimeNs: String(st.ctimeNs), bootId }, 'the full snapshot recorded the volume as it read it, in this boot');

  let prev = s1;
  for (const round of [1, 2]) {
    const { value: s, reads } = await countReads(() => snap.createSnapshot(vol, { store }));
    t.equal(s.changeSource, 'unchanged', `round ${round}: changeSource (${s.changeSourceReason})`);
    t.equal(reads, 0, `round ${round}: no volume data read or hashed`);
    t.equal(s.stats.bytesScanned, 0);
    t.equal(s.stats.changedBlocks, 0);
    t.equal(s.stats.blocksAdded, 0);
    t.equal(s.stats.dataBlocks, s1.stats.dataBlocks, 'every data block is in it');
    t.equal(s.parentId, prev.id);
    t.same(s.volumeStat, s1.volumeStat, 'and it records the same moment for its successor');
    t.same((await snap.diffSnapshots(prev.id, s.id, { store })).changedBlocks, []);
    await restoresTo(t, store, s.id, want, `round ${round}`);
    prev = s;
  }

  // A restart since the parent (its record names another boot): the times prove nothing, the volume is read.
  const recFile = path.join(store, 'snapshots', `${prev.id}.json`);
  const rec = JSON.parse(fs.readFileSync(recFile, 'utf8'));
  rec.volumeStat.bootId = '00000000-0000-4000-8000-000000000000';
  fs.writeFileSync(recFile, JSON.stringify(rec));
  const restarted = await snap.createSnapshot(vol, { store });
  t.equal(restarted.changeSource, 'tags', 'a parent from another boot: the volume is scanned');
  t.equal(restarted.stats.bytesScanned, s1.stats.bytesScanned);
  await restoresTo(t, store, restarted.id, want, 'after a restart');
  prev = restarted;

  // The parent deleted: the next one still only trusts a parent it can read.
  await snap.deleteSnapshot(prev.id, { store });
  const after = await snap.createSnapshot(vol, { store });
  t.equal(after.parentId, (await snap.listSnapshots({ store })).snapshots.at(-2)?.id, 'its parent is the newest snapshot left');
  await restoresTo(t, store, after.id, want, 'after the parent was deleted');
});

forEachBackend(t, 'on either backend an unchanged snapshot keeps its parent blocks, restores exact and verifies', async (t, b) => {
  const dir = t.testdir();
  const store = await b.store('store');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 8 * MiB, base.slice(0, 2));
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  const { value: s2, reads } = await countReads(() => snap.createSnapshot(vol, { store }));
  t.equal(s2.changeSource, 'unchanged');
  t.equal(reads, 0, 'nothing read');
  t.equal(s2.stats.blocksAdded, 0);
  t.equal(s2.stats.dataBlocks, s1.stats.dataBlocks);
  await snap.deleteSnapshot(s1.id, { store });
  await snap.gc({ store });
  const out = path.join(dir, 'out.img');
  await snap.restoreSnapshot(s2.id, { store, to: out });
  t.equal(sha(out), sha(vol), 'restores byte-exact after its parent was deleted and gc ran');
  const v = await snap.verifySnapshot(s2.id, { store });
  t.ok(v.ok && v.blocksChecked === s1.stats.dataBlocks, `every block verifies (${v.blocksChecked})`);
});

t.test('every kind of write moves the volume off the unchanged path, and the change is found', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 16 * MiB, base);
  await snap.createSnapshot(vol, { store, blockSize: BS });

  const cases: Array<[string, () => void, boolean?]> = [
    ['a write(2) of one byte', () => applyWrites(vol, [{ offset: 3 * BS + 5, length: 1, seed: 40 }])],
    [
      'a write whose mtime is then set back to the nanosecond (touch -d)',
      () => {
        const ns = fs.statSync(vol, { bigint: true }).mtimeNs;
        applyWrites(vol, [{ offset: 7 * BS, length: 100, seed: 41 }]);
        const r = spawnSync('touch', ['-m', '-d', `@${ns / 1_000_000_000n}.${String(ns % 1_000_000_000n).padStart(9, '0')}`, vol]);
        if (r.status !== 0) throw new Error(`touch: ${r.stderr}`);
        if (fs.statSync(vol, { bigint: true }).mtimeNs !== ns) throw new Error('touch did not set the mtime back exactly');
      },
    ],
    [
      'a store through a shared mapping',
      () => {
        const py = 'import mmap,sys\nf=open(sys.argv[1],"r+b")\nm=mmap.mmap(f.fileno(),0)\nm[4096:4104]=b"mmapped!"\nm.close()\nf.close()';
        const r = spawnSync('python3', ['-c', py, vol]);
        if (r.status !== 0) throw new Error(`python3: ${r.stderr}`);
      },
      !!missing({ commands: ['python3'] }),
    ],
    [
      'the file replaced by a copy with the same bytes and times',
      () => {
        const copy = `${vol}.copy`;
        applyWrites(vol, [{ offset: 9 * BS, length: 10, seed: 42 }]);
        const r = spawnSync('cp', ['--preserve=timestamps', '--sparse=always', vol, copy]);
        if (r.status !== 0) throw new Error(`cp: ${r.stderr}`);
        fs.renameSync(copy, vol);
      },
    ],
  ];
  for (const [what, write, skip] of cases) {
    if (skip) {
      t.skip(`${what}: python3 is missing`);
      continue;
    }
    const before = await snap.createSnapshot(vol, { store });
    t.equal(before.changeSource, 'unchanged', `before ${what}: unchanged`);
    write();
    const s = await snap.createSnapshot(vol, { store });
    t.not(s.changeSource, 'unchanged', `${what}: the volume is read (${s.changeSource})`);
    t.ok(s.stats.bytesScanned > 0, `${what}: bytes scanned`);
    await restoresTo(t, store, s.id, sha(vol), what);
  }
});

t.test('only where every write moves the times: none recorded on tmpfs, or when one moment is proven by reading', async (t) => {
  const shm = fs.existsSync('/dev/shm') && fs.statfsSync('/dev/shm').type === 0x01021994 ? fs.mkdtempSync('/dev/shm/disksnap-unchanged-') : undefined;
  if (!shm) {
    t.skip('no tmpfs at /dev/shm');
  } else {
    t.teardown(() => fs.rmSync(shm, { recursive: true, force: true }));
    const store = path.join(t.testdir(), 'store');
    const vol = path.join(shm, 'vol.img');
    makeImage(vol, 4 * MiB, [{ offset: 0, length: MiB, seed: 5 }]);
    const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
    t.equal(s1.volumeStat, null, 'tmpfs: no stat recorded (a store into a dirty page moves no time)');
    const s2 = await snap.createSnapshot(vol, { store });
    t.equal(s2.changeSource, 'tags', 'tmpfs: the unchanged volume is scanned');
  }
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 4 * MiB, [{ offset: 0, length: MiB, seed: 6 }]);
  const s1 = await snap.createSnapshot(vol, withFaults({ store, blockSize: BS }, { proveByReading: true }));
  t.equal(s1.volumeStat, null, 'proven by reading again: no stat recorded');
  const s2 = await snap.createSnapshot(vol, { store });
  t.equal(s2.changeSource, 'tags', 'so its successor scans');
  const s3 = await snap.createSnapshot(vol, { store });
  t.equal(s3.changeSource, 'unchanged', 'and the one after that trusts its parent');
});

t.test('a damaged volumeStat in a record is refused by name', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 4 * MiB, [{ offset: 0, length: MiB, seed: 7 }]);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  const file = path.join(store, 'snapshots', `${s1.id}.json`);
  const rec = JSON.parse(fs.readFileSync(file, 'utf8'));
  rec.volumeStat.ino = 'not a number';
  fs.writeFileSync(file, JSON.stringify(rec));
  await t.rejects(snap.showSnapshot(s1.id, { store }), /volumeStat|ino/, 'the damaged field is named');
});
