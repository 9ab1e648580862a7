/**
 * Storage snapshots of qcow2 volumes: the snapshot holds what the guest sees (standalone:
 * losing the parent afterwards does not matter), and incrementals read only what QEMU's
 * persistent dirty bitmap marked, falling back to a full hash (with the reason recorded)
 * whenever the bitmap cannot be trusted. `qemu-img convert -O raw` is the oracle for the
 * guest view, qemu-img check and info for the image after disksnap's bitmap changes.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as snap from '../src/storage';
import { openImage } from '../src/image';
import { assertClean, makeParent, qemuImgOk, qemuInfo, qemuIo, run, guestBytes } from './helpers/qemu';
import { needQemuNbd, qemuBitmaps, qemuDirtyRanges, trackedVolume } from './helpers/qemu-bitmaps';
import { cli } from './helpers/cli';
import { withFaults } from '../src/storage/faults';

const KiB = 1024;
const MiB = 2 ** 20;
const BS = 512 * KiB;
const skip = needQemuNbd();

async function restored(store: string, id: string, dir: string): Promise<Buffer> {
  const out = path.join(dir, `restored-${id}.raw`);
  await snap.restoreSnapshot(id, { store, to: out });
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

t.test('a snapshot of a qcow2 child is the guest view: 64 MiB, standalone after its parent is gone', { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const parent = makeParent(dir, 48 * MiB); // smaller than the child: the tail reads zeros
  const child = path.join(dir, 'child.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-b', parent.file, '-F', 'raw', child, '64M');
  qemuIo(child, ['write -P 0x61 1M 100k', 'write -P 0x62 50M 2M', 'write -z 8M 1M']);
  const want = guestBytes(child);
  const s = await snap.createSnapshot(child, { store, blockSize: BS });
  t.equal(s.volumeSize, 64 * MiB, 'volumeSize is the virtual size');
  t.equal(s.volumeFormat, 'qcow2');
  t.same(s.volumeChain, [child, parent.file], 'the chain it saw');
  t.equal(s.changeSource, 'full');
  fs.rmSync(parent.file);
  t.ok((await restored(store, s.id, dir)).equals(want), 'with the parent deleted, restore gives exactly qemu-img convert of the child');

  // --format qcow2: a standalone qcow2 v3, check clean, zero clusters unallocated
  const q = path.join(dir, 'restored.qcow2');
  const r = cli(['snapshot', 'restore', s.id, '--to', q, '--format', 'qcow2', '--store', store]);
  t.equal(r.status, 0, `restore --format qcow2: ${r.stderr}`);
  assertClean(t, q, 'the restored qcow2');
  const info = qemuInfo(q);
  t.equal(info['backing-filename'], undefined, 'no backing file');
  t.equal((info['format-specific'] as { data: { compat: string } }).data.compat, '1.1', 'qcow2 v3');
  t.equal(info['virtual-size'], 64 * MiB);
  t.ok(guestBytes(q).equals(want), 'it shows exactly the child as it was (qemu-img convert)');
  const raw = path.join(dir, 'want.raw');
  fs.writeFileSync(raw, want);
  t.equal(run('qemu-img', ['compare', '-F', 'raw', q, raw]).status, 0, 'qemu-img compare agrees');
  const mapped = JSON.parse(qemuImgOk('map', '--output=json', q)) as { length: number; data: boolean }[];
  const dataBytes = mapped.filter((e) => e.data).reduce((n, e) => n + e.length, 0);
  let nonZero = 0;
  for (let c = 0; c < want.length; c += 64 * KiB) if (want.subarray(c, c + 64 * KiB).some((b) => b !== 0)) nonZero += 64 * KiB;
  t.equal(dataBytes, nonZero, 'only non-zero clusters are allocated');
  t.equal(cli(['snapshot', 'restore', s.id, '--to', q, '--format', 'qcow2', '--store', store]).status, 1, 'an existing target is not overwritten');
  t.equal(cli(['snapshot', 'restore', s.id, '--to', path.join(dir, 'x'), '--format', 'vmdk', '--store', store]).status, 2, 'an unknown format is bad usage');
  t.match(r.out, /as a standalone qcow2 image/, 'the report names the format written');

  // Without --format, the name decides: *.qcow2 (any case) is qcow2, anything else raw, and an
  // explicit --format wins over the name.
  const named = path.join(dir, 'named.QCOW2');
  const n = cli(['snapshot', 'restore', s.id, '--to', named, '--store', store]);
  t.equal(n.status, 0, `restore --to *.QCOW2: ${n.stderr}`);
  t.equal(qemuInfo(named).format, 'qcow2', 'a FILE named *.qcow2 gets a qcow2 image');
  assertClean(t, named, 'the qcow2 chosen by its name');
  t.ok(guestBytes(named).equals(want), 'and it shows exactly the child');
  const plain = path.join(dir, 'plain.img');
  const pr = cli(['snapshot', 'restore', s.id, '--to', plain, '--store', store]);
  t.equal(pr.status, 0, pr.stderr);
  t.ok(fs.readFileSync(plain).equals(want), 'any other name gets the raw guest view');
  t.match(pr.out, /as a raw image, the rest left sparse/, 'and the report says raw');
  const forced = path.join(dir, 'forced.qcow2');
  t.equal(cli(['snapshot', 'restore', s.id, '--to', forced, '--format', 'raw', '--store', store]).status, 0);
  t.ok(fs.readFileSync(forced).equals(want), '--format raw wins over a .qcow2 name');
});

t.test('a three-deep chain restores as its top image showed it', { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const base = makeParent(dir, 16 * MiB);
  const mid = path.join(dir, 'mid.qcow2');
  const top = path.join(dir, 'top.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-b', base.file, '-F', 'raw', mid);
  qemuIo(mid, ['write -P 0x71 0 3M']);
  qemuImgOk('create', '-q', '-f', 'qcow2', '-b', mid, '-F', 'qcow2', top);
  qemuIo(top, ['write -P 0x72 2M 2M', 'write -P 0x73 15M 1M']);
  const want = guestBytes(top);
  const s = await snap.createSnapshot(top, { store, blockSize: BS });
  t.same(s.volumeChain, [top, mid, base.file]);
  fs.rmSync(mid);
  fs.rmSync(base.file);
  t.ok((await restored(store, s.id, dir)).equals(want), 'restore equals the top image as it was');
});

t.test('the incremental of a qcow2 volume reads only the blocks its bitmap marked', { skip }, async (t) => {
  const dir = t.testdir();
  const { store, vol, s1 } = await trackedVolume(dir, '20M');
  t.equal(s1.changeSource, 'full');
  t.ok(s1.changeTracking, 'the first snapshot added a bitmap');
  t.same(
    qemuBitmaps(vol).map((b) => [b.name, b.flags]),
    [[s1.changeTracking!.bitmap, ['auto']]],
    'QEMU shows it, enabled and consistent',
  );
  const storeId = (JSON.parse(fs.readFileSync(path.join(store, 'store.json'), 'utf8')) as { id: string }).id;
  t.match(s1.changeTracking!.bitmap, new RegExp(`^disksnap-${storeId}-${s1.volumeId}-${s1.id}$`), 'its name says whose it is: store, volume, snapshot');
  // QEMU writes with the bitmap loaded: two blocks' worth in three places
  qemuIo(vol, ['write -P 0x22 3M 4k', 'write -P 0x23 3M+600k 1k', 'write -P 0x24 40M 1'].map((c) => c.replace('3M+600k', String(3 * MiB + 600 * KiB))));
  const want2 = guestBytes(vol);
  const s2 = await snap.createSnapshot(vol, { store });
  t.equal(s2.changeSource, 'bitmap', `the bitmap was used (${s2.changeSourceReason})`);
  const shown = cli(['snapshot', 'show', s2.id, '--store', store]);
  t.match(shown.out, /change source\s+bitmap/, 'snapshot show prints the change source');
  t.equal(s2.stats.bytesScanned, 3 * 64 * KiB, 'only the three dirty 64 KiB granules were read (stored as pieces)');
  t.equal(s2.stats.changedBlocks, 3);
  t.ok((await restored(store, s2.id, dir)).equals(want2), 'restore equals qemu-img convert of that moment');
  t.ok((await restored(store, s1.id, dir)).length === 64 * MiB, 'the first still restores');
  t.same(qemuBitmaps(vol).map((b) => [b.name, b.flags]), [[s2.changeTracking!.bitmap, ['auto']]], 'the older bitmap is gone, the new one consistent');
  assertClean(t, vol, 'after two snapshots');
  // QEMU goes on updating the new bitmap; a third snapshot sees it
  qemuIo(vol, ['write -P 0x33 60M 8k']);
  const s3 = await snap.createSnapshot(vol, { store });
  t.equal(s3.changeSource, 'bitmap');
  t.equal(s3.stats.bytesScanned, 64 * KiB, 'one granule read');
  t.ok((await restored(store, s3.id, dir)).equals(guestBytes(vol)), 'the third restores exactly');
});

t.test('a qcow2 volume\'s record holds the size its guest sees, and later snapshots leave the record alone', { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', vol, '3G');
  qemuIo(vol, ['write -P 0x11 0 3M']);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  const size0 = fs.statSync(vol).size;
  t.ok(size0 < 64 * MiB, `the file (${size0} bytes) is smaller than the guest's disk`);
  const { volumes } = await snap.listVolumes({ store });
  t.same(volumes.map((v) => [v.id, v.size]), [[s1.volumeId, 3 * 1024 * MiB]], 'the record says 3 GiB');
  const recordFile = path.join(store, 'volumes', `${s1.volumeId}.json`);
  const before = fs.statSync(recordFile);
  qemuIo(vol, ['write -P 0x22 40M 1M']); // the file grows; the guest's size does not
  const s2 = await snap.createSnapshot(vol, { store });
  t.equal(s2.changeSource, 'bitmap');
  t.ok(fs.statSync(vol).size > size0, 'the file grew');
  const after = fs.statSync(recordFile);
  t.same([after.ino, after.mtimeMs], [before.ino, before.mtimeMs], 'the record was not rewritten');
  const listed = cli(['volume', 'list', '--store', store, '--output', 'json']);
  t.equal(listed.status, 0, listed.stderr);
  t.equal(JSON.parse(listed.out).Volumes[0].Size, 3, 'EC2 form: 3 GiB, not the file\'s size');
  qemuImgOk('resize', '-q', '-f', 'qcow2', vol, '4G');
  await snap.createSnapshot(vol, { store });
  t.same((await snap.listVolumes({ store })).volumes.map((v) => v.size), [4 * 1024 * MiB], 'a resize is recorded');
});

t.test('an untrusted bitmap falls back to hashing every block, and says why', { skip }, async (t) => {
  const cases: [string, (vol: string, bitmap: string) => void, RegExp][] = [
    ['QEMU killed while writing', (vol) => void run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x55 5M 4k', '-c', 'abort', vol]), /in use/],
    ['bitmap removed', (vol, b) => qemuIo(vol, ['write -P 0x55 5M 4k']) && void qemuImgOk('bitmap', '--remove', vol, b), /missing/],
    ['image resized', (vol) => void qemuImgOk('resize', '-q', vol, '40M') || qemuIo(vol, ['write -P 0x55 5M 4k']), /virtual size changed/],
    [
      'a writer lacking bitmap support',
      (vol) => {
        qemuIo(vol, ['write -P 0x55 5M 4k']);
        const fd = fs.openSync(vol, 'r+');
        fs.writeSync(fd, Buffer.from([0]), 0, 1, 95);
        fs.closeSync(fd);
      },
      /autoclear/,
    ],
  ];
  for (const [what, damage, re] of cases) {
    const dir = fs.mkdtempSync(path.join(t.testdir(), 'c-'));
    const store = path.join(dir, 'store');
    const vol = path.join(dir, 'vm.qcow2');
    qemuImgOk('create', '-q', '-f', 'qcow2', vol, '32M');
    qemuIo(vol, ['write -P 0x11 0 8M']);
    const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
    damage(vol, s1.changeTracking!.bitmap);
    const want = guestBytes(vol);
    const s2 = await snap.createSnapshot(vol, { store });
    t.equal(s2.changeSource, 'hash', `${what}: every block hashed`);
    t.match(s2.changeSourceReason, re, `${what}: the reason is recorded`);
    if (what === 'bitmap removed') t.match(cli(['snapshot', 'show', s2.id, '--store', store]).out, /change source\s+hash \(.*missing/, `${what}: snapshot show prints why`);
    t.ok((await restored(store, s2.id, dir)).equals(want), `${what}: restore is exact`);
    qemuIo(vol, ['write -P 0x66 7M 1']);
    const s3 = await snap.createSnapshot(vol, { store });
    t.equal(s3.changeSource, 'bitmap', `${what}: the next snapshot has a bitmap again`);
    t.ok((await restored(store, s3.id, dir)).equals(guestBytes(vol)), `${what}: and restores exactly`);
  }
  // the parent snapshot deleted: the one before it has no bitmap left
  const dir = fs.mkdtempSync(path.join(t.testdir(), 'd-'));
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', vol, '32M');
  qemuIo(vol, ['write -P 0x11 0 8M']);
  await snap.createSnapshot(vol, { store, blockSize: BS });
  qemuIo(vol, ['write -P 0x12 1M 1']);
  const s2 = await snap.createSnapshot(vol, { store });
  await snap.deleteSnapshot(s2.id, { store });
  qemuIo(vol, ['write -P 0x13 2M 1']);
  const s3 = await snap.createSnapshot(vol, { store });
  t.equal(s3.changeSource, 'hash', 'parent deleted: every block hashed');
  t.match(s3.changeSourceReason, /missing/);
  t.ok((await restored(store, s3.id, dir)).equals(guestBytes(vol)), 'and restore is exact');
});

t.test('in-place restore into a qcow2 child writes its guest view through the qcow2 writer; the parent is never written', { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const parent = makeParent(dir, 16 * MiB);
  const child = path.join(dir, 'child.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-b', parent.file, '-F', 'raw', child, '16M');
  qemuIo(child, ['write -P 0x11 0 1M', 'write -z 4M 512k']);
  const s = await snap.createSnapshot(child, { store, blockSize: BS });
  const want = guestBytes(child);
  const parentBefore = fs.readFileSync(parent.file);
  // After the snapshot: data where it had data, data over a zero block, data where only the
  // parent showed through, and a block of the child zeroed.
  qemuIo(child, ['write -P 0x22 512k 4k', 'write -P 0x33 4M 8k', 'write -P 0x44 10M 64k', 'write -z 0 512k']);
  t.notOk(guestBytes(child).equals(want), 'the child shows something else now');
  const r = await snap.restoreSnapshot(s.id, { store, inPlace: child });
  t.equal(r.mode, 'in-place');
  t.equal(r.blocksWritten + r.blocksPunched, 4, `only the four blocks that differ (written ${r.blocksWritten}, zeroed ${r.blocksPunched})`);
  t.ok(guestBytes(child).equals(want), 'the child shows exactly what it showed at the snapshot (qemu-img convert)');
  assertClean(t, child, 'the child after the restore');
  t.ok(fs.readFileSync(parent.file).equals(parentBefore), 'the parent is byte for byte unchanged');
  const again = await snap.restoreSnapshot(s.id, { store, inPlace: child });
  t.equal(again.blocksWritten + again.blocksPunched, 0, 'a second run finds nothing to do');

  // A chain other than the recorded one: refused, unless told otherwise.
  const other = path.join(dir, 'other.raw');
  fs.copyFileSync(parent.file, other);
  qemuImgOk('rebase', '-u', '-f', 'qcow2', '-b', other, '-F', 'raw', child);
  qemuIo(child, ['write -P 0x55 2M 4k']);
  const before = fs.readFileSync(child);
  await t.rejects(snap.restoreSnapshot(s.id, { store, inPlace: child }), { code: 'EINVALID', message: /backing chain .*other\.raw.* is not the one .*--allow-chain-change/ });
  t.ok(fs.readFileSync(child).equals(before), 'refused: the child is byte for byte unchanged');
  const cliBad = cli(['snapshot', 'restore', s.id, '--to', path.join(dir, 'x.raw'), '--allow-chain-change', '--store', store]);
  t.equal(cliBad.status, 2, '--allow-chain-change without --in-place is bad usage');
  const forced = cli(['snapshot', 'restore', s.id, '--in-place', child, '--allow-chain-change', '--store', store]);
  t.equal(forced.status, 0, `--allow-chain-change: ${forced.stderr}`);
  t.ok(guestBytes(child).equals(want), 'the snapshot\'s guest view over the other parent');
  assertClean(t, child, 'after the forced restore');
});

t.test('in-place restore into a qcow2 volume with a QEMU bitmap keeps the bitmap consistent and marks what it wrote', { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', vol, '16M');
  qemuIo(vol, ['write -P 0x11 0 1M']);
  const s = await snap.createSnapshot(vol, { store, blockSize: BS });
  const want = guestBytes(vol);
  qemuImgOk('bitmap', '--add', vol, 'backup');
  qemuIo(vol, ['write -P 0x66 8M 4k']);
  qemuImgOk('bitmap', '--clear', vol, 'backup');
  const r = await snap.restoreSnapshot(s.id, { store, inPlace: vol });
  t.equal(r.blocksWritten + r.blocksPunched, 1, 'one block differed');
  t.ok(guestBytes(vol).equals(want), 'the volume shows the snapshot');
  assertClean(t, vol, 'after the restore');
  const b = qemuBitmaps(vol).find((x) => x.name === 'backup');
  t.ok(b && !b.flags.includes('in-use') && !b.flags.includes('inconsistent'), `QEMU's bitmap is consistent (${JSON.stringify(b?.flags)})`);
  const dirty = await qemuDirtyRanges(vol, 'backup');
  t.ok(dirty.some((d) => d.offset <= 8 * MiB && 8 * MiB < d.offset + d.length), `the bitmap covers the restored range (${JSON.stringify(dirty)})`);

  // A writer holding the image (QEMU's locks, as a running VM holds them): refused, unchanged.
  qemuIo(vol, ['write -P 0x77 12M 4k']);
  const held = openImage(vol, { write: true });
  const before = fs.readFileSync(vol);
  try {
    await t.rejects(snap.restoreSnapshot(s.id, { store, inPlace: vol }), { code: 'ELOCKED' }, 'a volume in use is refused');
  } finally {
    held.close();
  }
  t.ok(fs.readFileSync(vol).equals(before), 'and left byte for byte as it was');
});

// A writer that ignores the image's locks and bitmaps (here: bytes written straight into a
// data cluster of the file) is seen by the volume's mtime. Our own bitmap update moved it a
// moment before the read: where the filesystem has multigrain timestamps (Linux 6.13+, ext4
// here) a write after the stat moves it anyway and the read starts at once; with coarse times
// (DISKSNAP_COARSE_TIMES=1 takes that path here) the read waits for the clock to move on.
for (const coarse of [false, true]) t.test(`a qcow2 volume written behind QEMU's back during the read is read again, all of it (${coarse ? 'coarse times: the read waits' : 'times as the filesystem keeps them'})`, { skip }, async (t) => {
  const had = process.env.DISKSNAP_COARSE_TIMES;
  if (coarse) process.env.DISKSNAP_COARSE_TIMES = '1';
  t.teardown(() => {
    if (had === undefined) delete process.env.DISKSNAP_COARSE_TIMES;
    else process.env.DISKSNAP_COARSE_TIMES = had;
  });
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', vol, '16M');
  qemuIo(vol, ['write -P 0x11 0 2M', 'write -P 0x12 9M 1M']);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  qemuIo(vol, ['write -P 0x13 9M 4k']);
  const map = JSON.parse(qemuImgOk('map', '--output=json', vol)) as { start: number; length: number; data: boolean; offset?: number }[];
  const first = map.find((e) => e.data && e.start === 0 && e.offset !== undefined)!;
  t.ok(first, 'guest offset 0 has a host cluster');
  const logs: string[] = [];
  let writes = 0;
  const s2 = await snap.createSnapshot(
    vol,
    withFaults({ store, blockSize: BS, onLog: (m: string) => logs.push(m) }, {
      afterChunk: (attempt) => {
        if (attempt !== 1 || writes++) return;
        const fd = fs.openSync(vol, 'r+');
        fs.writeSync(fd, Buffer.alloc(4096, 0xee), 0, 4096, first.offset!);
        fs.closeSync(fd);
      },
    }),
  );
  t.equal(writes, 1, 'the writer ran during the first read');
  t.equal(s2.parentId, s1.id);
  t.match(logs.join('\n'), /changed while it was being read.*starting over/, 'the change was seen');
  t.match(s2.changeSourceReason ?? '', /written while it was read; every block was hashed on the retry/);
  t.ok((await restored(store, s2.id, dir)).equals(guestBytes(vol)), 'the snapshot is the volume after the write');
});

t.test('a bitmap-driven snapshot that fails between its groups (the next one read ahead) fails cleanly; the next snapshot is exact', { skip }, async (t) => {
  // Dirty blocks more than 8 buffers apart are read in separate groups, the next one read and
  // hashed while this one is stored: a failure then leaves a read in flight, to be let go.
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', vol, '512M');
  qemuIo(vol, ['write -P 0x21 0 1M', 'write -P 0x22 200M 1M', 'write -P 0x23 400M 1M']);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  qemuIo(vol, ['write -P 0x31 0 4k', 'write -P 0x32 200M 4k', 'write -P 0x33 400M 4k']);
  let chunks = 0;
  await t.rejects(
    snap.createSnapshot(vol, withFaults({ store, blockSize: BS }, { afterChunk: () => { if (chunks++ === 0) throw new Error('injected after the first group'); } })),
    { message: /injected after the first group/ },
  );
  t.equal(chunks, 1, 'it failed after the first of three groups');
  const failed = (await snap.listSnapshots({ store })).snapshots.find((s) => s.state === 'error');
  t.equal(failed?.changeSource, 'bitmap', 'the failed snapshot was reading the bitmap\'s dirty blocks');
  const s3 = await snap.createSnapshot(vol, { store, blockSize: BS });
  t.equal(s3.parentId, s1.id, 'the failed snapshot is nobody\'s parent');
  t.ok((await restored(store, s3.id, dir)).equals(guestBytes(vol)), 'the next snapshot restores to the volume');
  assertClean(t, vol, 'the image after the failed snapshot and the next');
});
