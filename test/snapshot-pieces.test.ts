/**
 * Pieces (src/storage/store/manifest.ts, version 2; src/storage/dirty.ts): an incremental that
 * knows which 64 KiB granules changed (a QEMU dirty bitmap) stores only those, as objects of
 * their own beside the parent's whole-block object. The format on its own (order, slots,
 * damage named), then real qcow2 volumes written by qemu-io: what is read and stored, exact
 * restores (to a file, in place, after the parent snapshot is deleted and gc ran), verify,
 * diff, copies (which store whole blocks), encryption, compaction, granules that became zero,
 * a damaged piece, and the fallback scans after pieces.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import * as snap from '../src/storage';
import { DirectoryBackend } from '../src/storage/store/dir';
import { BlockEntries, EntryRun, ManifestCursor, ManifestReader, ManifestWriter, HEADER_LENGTH, ENTRY_LENGTH, sameEntries } from '../src/storage/store/manifest';
import { Held, ParentEntries, unitsOf } from '../src/storage/dirty';
import { qemuImgOk, qemuIo, guestBytes, assertClean } from './helpers/qemu';
import { needQemuNbd, qemuBitmaps } from './helpers/qemu-bitmaps';
import { isDisksnapError } from '../src/engine/errors';
import { forEachBackend } from './helpers/backends';
import { logicalSizesSync } from './helpers/packs';

const KiB = 1024;
const MiB = 2 ** 20;
const BS = 512 * KiB;
const PS = 64 * KiB;
const skip = needQemuNbd();
const digestOf = (s: string) => createHash('sha256').update(s).digest();

const header = (volumeSize: number, pieceSize?: number) => ({
  blockSize: BS,
  volumeSize,
  snapshotId: 'snap-0123456789abcdef',
  volumeId: 'vol-0123456789abcdef',
  digest: 'sha256' as const,
  sealed: false,
  pieceSize,
});

async function writeEntries(dir: string, entries: Array<[number, number]>, volumeSize = 10 * BS): Promise<DirectoryBackend> {
  const be = new DirectoryBackend(dir);
  const w = new ManifestWriter(await be.create('m.map'), header(volumeSize, PS));
  for (const [i, slot] of entries) w.append(i, digestOf(`${i}/${slot}`), 0, slot);
  await w.commit();
  return be;
}

async function openM(be: DirectoryBackend): Promise<ManifestReader> {
  return ManifestReader.open(be.describe('m.map'), await be.open('m.map'));
}

t.test('a version 2 manifest round-trips whole blocks and pieces, block by block', async (t) => {
  const dir = t.testdir();
  const entries: Array<[number, number]> = [[0, 0], [1, 0], [1, 2], [1, 8], [3, 1], [3, 4], [9, 0], [9, 1]];
  const be = await writeEntries(dir, entries, 9 * BS + 100 * KiB); // block 9 is 100 KiB: slots 1 and 2 only
  const raw = fs.readFileSync(path.join(dir, 'm.map'));
  t.equal(raw.readUInt16LE(8), 2, 'version 2');
  t.equal(raw.readUInt32LE(20), PS, 'the piece size in the header');
  let r = await openM(be);
  t.equal(r.header.pieceSize, PS);
  const blocks = [];
  for (let e = await r.nextBlock(); e; e = await r.nextBlock()) blocks.push(e);
  await r.close();
  t.same(blocks.map((b) => [b.index, !!b.digest, (b.pieces ?? []).map((p) => p.slot)]), [[0, true, []], [1, true, [2, 8]], [3, false, [1, 4]], [9, true, [1]]]);
  t.ok(blocks[1].pieces![1].digest.equals(digestOf('1/8')), 'each piece keeps its digest');
  t.ok(sameEntries(blocks[1], { ...blocks[1] }) && !sameEntries(blocks[1], blocks[0]), 'sameEntries compares slots and digests');
  // a cursor: lookup gives only a whole-block digest; lookupBlock every entry
  r = await openM(be);
  const c = new ManifestCursor(r);
  t.ok((await c.lookup(1))!.equals(digestOf('1/0')));
  t.equal(await c.lookup(3), undefined, 'pieces over zeros have no whole digest');
  t.same((await c.lookupBlock(9))!.pieces!.map((p) => p.slot), [1]);
  await c.finish();
  await r.close();
  // a plain writer stays version 1 and takes no slots
  const w = new ManifestWriter(await be.create('v1.map'), header(10 * BS));
  t.throws(() => w.append(0, digestOf('x'), 0, 1), /slot 1 is not a piece/);
  w.append(0, digestOf('x'));
  await w.commit();
  t.equal(fs.readFileSync(path.join(dir, 'v1.map')).readUInt16LE(8), 1, 'version 1 without pieces');
});

t.test('the writer refuses entries out of (block, slot) order or outside their block', async (t) => {
  const be = new DirectoryBackend(t.testdir());
  const w = new ManifestWriter(await be.create('m.map'), header(2 * BS + 64 * KiB, PS));
  w.append(0, digestOf('a'), 0, 3);
  t.throws(() => w.append(0, digestOf('a'), 0, 3), /out of order/, 'the same slot twice');
  t.throws(() => w.append(0, digestOf('a'), 0, 0), /out of order/, 'slot 0 after a piece');
  t.throws(() => w.append(1, digestOf('a'), 0, 9), /not a piece/, 'past the eighth slot');
  t.throws(() => w.append(2, digestOf('a'), 0, 2), /not a piece/, 'past the end of a short last block');
  w.append(2, digestOf('a'), 0, 1);
  await w.commit();
});

/**
 * A manifest of 70000 entries over 50000 blocks, some with pieces: three read chunks of 26214
 * entries, so runs end where a chunk ends (spent) as well as at their limit. Its reader, and a
 * writer of `copy.map` beside it.
 */
async function manyEntries(dir: string) {
  const entries: Array<[number, number]> = [];
  for (let i = 0; entries.length < 70000; i++) {
    if (i % 7 !== 3) entries.push([i, 0]);
    if (i % 5 === 1) entries.push([i, 2], [i, 8]);
  }
  const last = entries[entries.length - 1][0];
  const volumeSize = (last + 1) * BS;
  const be = await writeEntries(dir, entries, volumeSize);
  const r = await openM(be);
  const w = new ManifestWriter(await be.create('copy.map'), header(volumeSize, PS));
  return { entries, last, r, w };
}

t.test('runs of entries copied as they are (runNow, appendRun) make the same manifest as entry by entry', async (t) => {
  const dir = t.testdir();
  const { r, w } = await manyEntries(dir);
  const c = new ManifestCursor(r);
  let next = 0;
  let runs = 0;
  let spent = 0;
  let perEntry = 0;
  let blocks = 0;
  let wholes = 0;
  for (let limit = 1; ; limit += 1 + ((limit * 7919) % 3001)) {
    // alternately: a run up to `limit`, and the next entry on its own (as held entries go)
    for (;;) {
      const j = c.peekNow(next) ?? (await c.peek(next));
      if (j < 0 || j >= limit) break;
      const run = c.runNow(limit, true)!;
      t.equal(run.first, j, 'a run starts at the entry the cursor stands on');
      w.appendRun(run);
      runs++;
      blocks += run.blocks;
      wholes += run.wholes.length;
      next = run.last;
      if (run.spent) {
        spent++;
        await c.step();
      }
    }
    const j = c.peekNow(next) ?? (await c.peek(next));
    if (j < 0) break;
    w.append(j, r.digest, 0, r.slot);
    perEntry++;
    if (!c.stepNow()) await c.step();
    next = j;
  }
  await w.commit();
  await r.close();
  t.ok(fs.readFileSync(path.join(dir, 'copy.map')).equals(fs.readFileSync(path.join(dir, 'm.map'))), `byte for byte the same (${runs} runs, ${perEntry} entries on their own)`);
  t.ok(spent >= 2, `runs ended with their chunk (${spent})`);
  t.ok(perEntry > 10, 'entries appended on their own between the runs');
  t.ok(blocks > 40000 && blocks < 50000 && wholes > 30000, `the runs counted their blocks (${blocks}) and whole objects (${wholes})`);
});

t.test('a dirty scan takes the parent entries in runs, held ones cut at dirty blocks, across read chunks (ParentEntries, Held)', async (t) => {
  const dir = t.testdir();
  const { entries, last, r, w } = await manyEntries(dir);
  let blocks = 0;
  let lastRecorded = -1;
  let spent = 0;
  const rec = {
    recordRun(run: EntryRun): void {
      w.appendRun(run);
      blocks += run.blocks - (run.first === lastRecorded ? 1 : 0);
      lastRecorded = run.last;
    },
  };
  const parent = new ParentEntries(new ManifestCursor(r), rec);
  // groups of dirty blocks as the scan makes them (ascending, spanning up to ~1500 blocks),
  // some of them around the chunk ends (entry 26214 is near block 18700, 52428 near 37450)
  let held = 0;
  for (let g0 = 5; g0 < last; g0 += 1733) {
    const group = [g0, g0 + 1, g0 + 401, g0 + 777, g0 + 1490].filter((i) => i <= last);
    await parent.until(group[0], group);
    const hold = new Held(r.header);
    const prev = new Map<number, BlockEntries>();
    await parent.until(group[group.length - 1] + 1, group, hold, prev);
    // the dirty blocks' own entries (as the parent had them), merged with the held ones in block order
    for (const i of group) {
      hold.recordUntil(i, rec, undefined, undefined);
      const e = prev.get(i);
      if (!e) continue;
      if (e.digest) w.append(i, e.digest, 0, 0);
      for (const p of e.pieces ?? []) w.append(i, p.digest, 0, p.slot);
      if (i !== lastRecorded) blocks++;
      lastRecorded = i;
      held++;
    }
    hold.recordUntil(Number.MAX_SAFE_INTEGER, rec, undefined, undefined);
  }
  await parent.until(Number.MAX_SAFE_INTEGER, []);
  await w.commit();
  await r.close();
  t.ok(fs.readFileSync(path.join(dir, 'copy.map')).equals(fs.readFileSync(path.join(dir, 'm.map'))), `byte for byte the same (${held} dirty blocks taken over on their own)`);
  t.equal(blocks, new Set(entries.map((e) => e[0])).size, 'every block counted once, also where a run went on in the next chunk');
  t.ok(held > 100, 'dirty blocks with entries were handed over');
});

t.test('appendRun refuses a run out of order, past the volume, or pieces where they do not fit', async (t) => {
  const dir = t.testdir();
  const be = await writeEntries(dir, [[0, 0], [1, 0], [1, 2], [4, 0]], 5 * BS);
  const runOf = async () => {
    const c = new ManifestCursor(await openM(be));
    await c.peek(0);
    return c.runNow(10, true)!;
  };
  const run = await runOf();
  t.same([run.first, run.last, run.blocks, run.wholes, run.pieces, run.spent], [0, 4, 3, [0, 1, 4], true, true]);
  let w = new ManifestWriter(await be.create('a.map'), header(5 * BS, PS));
  w.append(2, digestOf('x'));
  t.throws(() => w.appendRun(run), { code: 'EINVALID', message: /out of order/ }, 'after a later block');
  w = new ManifestWriter(await be.create('b.map'), header(4 * BS, PS));
  t.throws(() => w.appendRun(run), { code: 'EINVALID', message: /past block 3/ }, 'past the end of a smaller volume');
  w = new ManifestWriter(await be.create('c.map'), header(5 * BS));
  t.throws(() => w.appendRun(run), { code: 'EINVALID', message: /pieces of another/ }, 'pieces into a manifest without them');
  w = new ManifestWriter(await be.create('d.map'), header(5 * BS + 4096, PS));
  t.throws(() => w.appendRun(run), { code: 'EINVALID', message: /pieces of another/ }, 'pieces into a volume of another size');
  w = new ManifestWriter(await be.create('e.map'), header(5 * BS, PS));
  w.appendRun(run);
  t.equal(w.entries, 4);
  await w.commit();
  t.ok(fs.readFileSync(path.join(dir, 'e.map')).equals(fs.readFileSync(path.join(dir, 'm.map'))), 'taken whole where it fits');
});

t.test('a damaged version 2 manifest is named: slots out of order, out of range, a bad piece size', async (t) => {
  const dir = t.testdir();
  const be = await writeEntries(dir, [[1, 0], [1, 2], [2, 1]], 2 * BS + 64 * KiB);
  const file = path.join(dir, 'm.map');
  const good = fs.readFileSync(file);
  const damage = async (what: string, edit: (b: Buffer) => void, want: RegExp) => {
    const b = Buffer.from(good);
    edit(b);
    fs.writeFileSync(file, b);
    const r = await openM(be).catch((e: unknown) => e as Error);
    if (r instanceof Error) {
      t.match(r.message, want, what);
      return;
    }
    const err = await (async () => {
      while (await r.nextBlock());
    })().then(
      () => undefined,
      (e: unknown) => e as Error,
    );
    await r.close();
    t.ok(err && isDisksnapError(err, 'ECORRUPT'), `${what}: ECORRUPT`);
    t.match(err?.message ?? '', want, what);
  };
  const entry = (n: number) => HEADER_LENGTH + n * ENTRY_LENGTH;
  await damage('a slot above 8', (b) => (b[entry(1) + 7] = 9), /slot 9, which is not a piece/);
  await damage('a slot past a short last block', (b) => (b[entry(2) + 7] = 2), /slot 2, which is not a piece/);
  await damage('slots out of order', (b) => (b[entry(1) + 7] = 0), /previous 1/);
  await damage('a piece size that is not an eighth of the block', (b) => b.writeUInt32LE(PS + 1, 20), /piece size is 65537, expected an eighth/);
  await damage('a piece size of a quarter block', (b) => b.writeUInt32LE(2 * PS, 20), /piece size is 131072/);
  await damage('version 1 with a piece size', (b) => b.writeUInt16LE(1, 8), /reserved field at offset 20/);
});

t.test('unitsOf: few dirty granules make pieces, many a whole block', async (t) => {
  const size = 4 * BS + 100 * KiB;
  const units = unitsOf(
    [
      { offset: 4 * BS + 70 * KiB, length: 1 }, // the short last block, its second granule
      { offset: 10, length: 1 },
      { offset: BS + PS - 1, length: 2 }, // across two granules
      { offset: 2 * BS, length: 5 * PS }, // five granules: whole
      { offset: 0, length: 1 }, // again in block 0
    ],
    BS,
    PS,
    size,
  );
  t.same(units, [{ i: 0, slots: [1] }, { i: 1, slots: [1, 2] }, { i: 2 }, { i: 4, slots: [2] }]);
  t.same(unitsOf([{ offset: 10, length: 1 }], BS, 0, size), [{ i: 0 }], 'no piece size: whole blocks');
});

/** A 64 MiB qcow2 volume with 20 MiB of data and its first (full) snapshot. */
async function volumeWithSnapshot(dir: string, opts: { key?: string } = {}) {
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', vol, '64M');
  qemuIo(vol, ['write -P 0x11 0 20M']);
  const key = opts.key ? { keyFile: opts.key } : undefined;
  if (key) await snap.registerVolume(vol, { store, blockSize: BS, encrypted: true, key });
  const s1 = await snap.createSnapshot(vol, key ? { store, key } : { store, blockSize: BS });
  return { store, vol, s1, key };
}

async function restoredBytes(store: string, id: string, dir: string, key?: { keyFile: string }): Promise<Buffer> {
  const out = path.join(dir, `r-${id}-${randomBytes(4).toString('hex')}.raw`);
  await snap.restoreSnapshot(id, { store, to: out, key });
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

/** Sizes of the store's block objects, packs counted as their pieces. */
const objectSizes = logicalSizesSync;

t.test('scattered 64 KiB writes: only the granules are read and stored, and every snapshot restores exactly', { skip }, async (t) => {
  const dir = t.testdir();
  const { store, vol, s1 } = await volumeWithSnapshot(dir);
  const want1 = guestBytes(vol);
  const piecesBefore = objectSizes(store).filter((n) => n === PS).length;
  const before = objectSizes(store).length;
  // six granules in six blocks, one of them in a hole of the parent (40 MiB)
  qemuIo(vol, ['write -P 0x21 64k 64k', 'write -P 0x22 1M 64k', 'write -P 0x23 3M+128k 64k', 'write -P 0x24 7M+448k 64k', 'write -P 0x25 19M 64k', 'write -P 0x26 40M+64k 64k'].map((c) => c.replace(/(\d+)M\+(\d+)k/, (_, m, k) => String(Number(m) * MiB + Number(k) * KiB))));
  const want2 = guestBytes(vol);
  const s2 = await snap.createSnapshot(vol, { store });
  t.equal(s2.changeSource, 'bitmap', `the bitmap was used (${s2.changeSourceReason})`);
  t.equal(s2.stats.bytesScanned, 6 * PS, 'six granules read, not six blocks');
  t.equal(s2.stats.changedBlocks, 6);
  t.equal(s2.stats.dataBlocks, 41, 'data blocks count blocks, not entries');
  t.equal(objectSizes(store).length - before, 6, 'six new objects');
  t.equal(objectSizes(store).filter((n) => n === PS).length - piecesBefore, 6, 'each a 64 KiB piece');
  t.ok((await restoredBytes(store, s2.id, dir)).equals(want2), 'the incremental restores exactly');
  t.ok((await restoredBytes(store, s1.id, dir)).equals(want1), 'its parent still does');
  const v = await snap.verifySnapshot(s2.id, { store });
  t.ok(v.ok, 'verify checks every piece');
  const events: snap.Progress[] = [];
  const out = path.join(dir, 'progress.raw');
  await snap.restoreSnapshot(s2.id, { store, to: out, onProgress: (e) => events.push(e) });
  fs.rmSync(out);
  const last = events.filter((e) => e.phase === 'write').pop();
  t.same(last && [last.done, last.total], [41, 41], 'restore progress counts blocks, not entries, and ends at its total');
  const d = await snap.diffSnapshots(s1.id, s2.id, { store });
  t.same(d.changedBlocks, [0, 2, 6, 14, 38, 80], 'diff names the blocks with pieces');
  // the parent deleted and its objects collected: the pieces' base objects are still live
  await snap.deleteSnapshot(s1.id, { store, permanently: true });
  await snap.gc({ store });
  t.ok((await restoredBytes(store, s2.id, dir)).equals(want2), 'after the parent is deleted and gc ran');
  // a third snapshot keeps the pieces it did not touch and adds one in a pieced block
  qemuIo(vol, ['write -P 0x31 1M+192k 64k'.replace('1M+192k', String(MiB + 192 * KiB))]);
  const s3 = await snap.createSnapshot(vol, { store });
  t.equal(s3.stats.bytesScanned, PS);
  t.ok((await restoredBytes(store, s3.id, dir)).equals(guestBytes(vol)), 'the third restores exactly');
  t.same((await snap.diffSnapshots(s2.id, s3.id, { store })).changedBlocks, [2]);
  assertClean(t, vol, 'the volume after three snapshots');
  t.equal(qemuBitmaps(vol).length, 1, 'one bitmap, as before pieces');
});

t.test('a block rewritten granule by granule keeps a piece for each, and a granule that became zero reads the block whole', { skip }, async (t) => {
  const dir = t.testdir();
  const { store, vol } = await volumeWithSnapshot(dir);
  const at = (k: number) => String(2 * MiB + k * PS);
  let last;
  // every granule of the block in turn, then the first two again: one granule read each time
  // (a block has room for a piece of each of its eight granules, so none is read whole again)
  for (let k = 0; k < 10; k++) {
    qemuIo(vol, [`write -P ${0x40 + k} ${at(k % 8)} 64k`]);
    last = await snap.createSnapshot(vol, { store });
    t.equal(last.changeSource, 'bitmap');
    t.equal(last.stats.bytesScanned, PS, `snapshot ${k + 2} read one granule`);
    t.ok((await restoredBytes(store, last.id, dir)).equals(guestBytes(vol)), `snapshot ${k + 2} restores exactly`);
  }
  t.ok((await snap.verifySnapshot(last!.id, { store })).ok, 'the block of nine entries verifies');
  qemuIo(vol, [`write -z ${at(7)} 64k`]);
  const z = await snap.createSnapshot(vol, { store });
  t.equal(z.stats.bytesScanned, PS + BS, 'a zeroed granule: the granule, then the block whole');
  t.ok((await restoredBytes(store, z.id, dir)).equals(guestBytes(vol)), 'and it restores exactly');
  // a whole block zeroed in pieces ends with no entry
  qemuIo(vol, ['write -z 6M 512k']);
  const e = await snap.createSnapshot(vol, { store });
  t.ok((await restoredBytes(store, e.id, dir)).equals(guestBytes(vol)));
  t.equal(e.stats.dataBlocks, z.stats.dataBlocks - 1, 'the zeroed block is a hole');
});

t.test('in-place restore and copies of a snapshot with pieces', { skip }, async (t) => {
  const dir = t.testdir();
  const { store, vol, s1 } = await volumeWithSnapshot(dir);
  qemuIo(vol, ['write -P 0x51 128k 64k', 'write -P 0x52 5M 64k']);
  const want = guestBytes(vol);
  const s2 = await snap.createSnapshot(vol, { store });
  // the volume moves on; restoring s2 in place writes the pieced blocks back
  qemuIo(vol, ['write -P 0x61 0 64k', 'write -P 0x62 5M 128k']);
  const r = await snap.restoreSnapshot(s2.id, { store, inPlace: vol });
  t.ok(r.blocksWritten >= 2, 'the pieced blocks were written');
  t.ok(guestBytes(vol).equals(want), 'in place: exactly the snapshot');
  assertClean(t, vol, 'after the in-place restore');
  // a block whose bytes equal its whole object but not its pieces is written too
  qemuIo(vol, ['write -P 0x11 128k 64k']);
  await snap.restoreSnapshot(s2.id, { store, inPlace: vol });
  t.ok(guestBytes(vol).equals(want), 'a block equal to the base object is not taken as unchanged');
  // copies: plain to plain, then an encrypted copy (digests change): whole blocks, exact
  const other = path.join(dir, 'other');
  await snap.copySnapshot(s1.id, { store, toStore: other });
  const c2 = await snap.copySnapshot(s2.id, { store, toStore: other });
  t.equal(c2.stats.changedBlocks, 2, 'the incremental copy sends the two pieced blocks');
  t.ok(objectSizes(other).every((n) => n === BS), 'a copy holds whole blocks only');
  t.ok((await restoredBytes(other, c2.id, dir)).equals(want), 'the copy restores exactly');
  t.ok((await snap.verifySnapshot(c2.id, { store: other })).ok);
  const key = path.join(dir, 'k');
  fs.writeFileSync(key, randomBytes(32), { mode: 0o600 });
  const sealed = path.join(dir, 'sealed');
  const e2 = await snap.copySnapshot(s2.id, { store, toStore: sealed, encrypt: true, key: { keyFile: key } });
  t.ok((await restoredBytes(sealed, e2.id, dir, { keyFile: key })).equals(want), 'the encrypted copy restores exactly');
});

t.test('an encrypted qcow2 volume stores sealed pieces; a damaged piece is found', { skip }, async (t) => {
  const dir = t.testdir();
  const keyPath = path.join(dir, 'k');
  fs.writeFileSync(keyPath, randomBytes(32), { mode: 0o600 });
  const { store, vol, key } = await volumeWithSnapshot(dir, { key: keyPath });
  const before = new Set(listObjects(store));
  qemuIo(vol, ['write -P 0x71 64k 64k']);
  const s2 = await snap.createSnapshot(vol, { store, key });
  t.equal(s2.changeSource, 'bitmap');
  t.equal(s2.stats.bytesScanned, PS);
  t.ok(s2.encrypted);
  t.ok((await restoredBytes(store, s2.id, dir, key)).equals(guestBytes(vol)), 'restores exactly with the key');
  t.ok((await snap.verifySnapshot(s2.id, { store, key })).ok);
  const added = listObjects(store).filter((f) => !before.has(f));
  t.equal(added.length, 1, 'one sealed piece');
  const f = added[0];
  const b = fs.readFileSync(f);
  b[100] ^= 1;
  fs.chmodSync(f, 0o600);
  fs.writeFileSync(f, b);
  const v = await snap.verifySnapshot(s2.id, { store, key });
  t.notOk(v.ok, 'verify finds the damaged piece');
  t.equal(v.badBlocks[0].index, 0);
  const out = path.join(dir, 'bad.raw');
  await t.rejects(snap.restoreSnapshot(s2.id, { store, to: out, key }), { code: 'ECORRUPT', message: /block 0/ }, 'restore refuses it');
  t.notOk(fs.existsSync(out), 'and leaves no file under the final name');
});

t.test('after pieces, the fallback scan (bitmap removed) restores exactly', { skip }, async (t) => {
  const dir = t.testdir();
  const { store, vol } = await volumeWithSnapshot(dir);
  qemuIo(vol, ['write -P 0x81 64k 64k']);
  const s2 = await snap.createSnapshot(vol, { store });
  t.equal(s2.stats.bytesScanned, PS);
  for (const b of qemuBitmaps(vol)) qemuImgOk('bitmap', '--remove', vol, b.name);
  qemuIo(vol, ['write -P 0x82 1M 64k']);
  const s3 = await snap.createSnapshot(vol, { store });
  t.not(s3.changeSource, 'bitmap');
  t.ok((await restoredBytes(store, s3.id, dir)).equals(guestBytes(vol)), 'the full scan stored the pieced block whole and exactly');
  t.same((await snap.diffSnapshots(s2.id, s3.id, { store })).changedBlocks, [0, 2]);
});

if (skip) t.test('pieces in any store', { skip }, async () => undefined);
else forEachBackend(t, 'pieces in any store: a qcow2 incremental of scattered writes restores exactly and verifies', async (t, b) => {
  const dir = t.testdir();
  const store = await b.store('pieces');
  const vol = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', vol, '16M');
  qemuIo(vol, ['write -P 0x11 0 6M']);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  const want1 = guestBytes(vol);
  qemuIo(vol, ['write -P 0x91 64k 64k', `write -P 0x92 ${MiB + 448 * KiB} 64k`, 'write -P 0x93 10M 64k']);
  const s2 = await snap.createSnapshot(vol, { store });
  t.equal(s2.changeSource, 'bitmap');
  t.equal(s2.stats.bytesScanned, 3 * PS, 'three granules read');
  t.equal(s2.stats.blocksAdded, 3, 'three piece objects stored');
  t.ok((await restoredBytes(store, s2.id, dir)).equals(guestBytes(vol)), 'restores exactly');
  t.ok((await restoredBytes(store, s1.id, dir)).equals(want1), 'the parent still does');
  t.ok((await snap.verifySnapshot(s2.id, { store })).ok, 'verifies');
});

function listObjects(store: string): string[] {
  const root = path.join(store, 'blocks');
  return fs.readdirSync(root).flatMap((d) => fs.readdirSync(path.join(root, d)).map((f) => path.join(root, d, f)));
}
