/**
 * Granule change tags (src/storage/store/tags.ts, version 2) and the pieces a tag scan stores
 * with them (src/storage/detect.ts): a raw volume rewritten in scattered 64 KiB writes is
 * stored as those granules, not the 512 KiB blocks around them, and every snapshot of the
 * chain restores byte-exact — after the parent is deleted, in an encrypted store, with the
 * one-moment proof by a second read, and on both backends. The limits that send a block
 * back to a whole object (too many pieces, a granule that became zero, a block without the
 * parent's granule tags) are each checked, as is the tag file's format.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import * as snap from '../src/storage';
import { withFaults } from '../src/storage/faults';
import { forEachBackend } from './helpers/backends';
import { logicalSizesSync } from './helpers/packs';
import { BS, KiB, MiB, PS, makeVolume, restored, sha } from './helpers/granules';

/** Writes `len` bytes of fresh random data (or zeros) at each offset. */
function writeAt(file: string, offsets: number[], len = PS, zero = false): void {
  const fd = fs.openSync(file, 'r+');
  try {
    for (const off of offsets) fs.writeSync(fd, zero ? Buffer.alloc(len) : randomBytes(len), 0, len, off);
  } finally {
    fs.closeSync(fd);
  }
}


/** Sizes of a directory store's block objects, packs counted as their pieces. */
const objectSizes = logicalSizesSync;

const newObjects = (before: number[], after: number[]) => {
  const count = (xs: number[], n: number) => xs.filter((x) => x === n).length;
  return { pieces: count(after, PS) - count(before, PS), whole: count(after, BS) - count(before, BS), all: after.length - before.length };
};

t.test('a tag file of version 2 holds a block tag and eight granule tags per data block', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeVolume(vol);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  const tags = fs.readFileSync(path.join(store, 'snapshots', `${s1.id}.tags`));
  t.equal(tags.toString('latin1', 0, 8), 'DSNAPTG\n');
  t.equal(tags.readUInt16LE(8), 2, 'version 2');
  t.equal(tags.readUInt16LE(12), 32 + 8 * 16, 'entry length: index, salt, tag and eight granule tags');
  t.equal(tags.readUInt32LE(20), PS, 'granule size');
  t.equal(tags.length, 128 + 40 * 160 + 40, 'one entry per data block (40 of them)');
  // every entry of a full snapshot has its granule tags
  let withGranules = 0;
  for (let e = 0; e < 40; e++) if (tags.subarray(128 + e * 160 + 32, 128 + e * 160 + 160).some((x) => x !== 0)) withGranules++;
  t.equal(withGranules, 40, 'a full snapshot tags every granule');
});

t.test('scattered 64 KiB writes into a raw volume: the tag scan stores the granules, and every snapshot restores exactly', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeVolume(vol);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  const want1 = sha(fs.readFileSync(vol));
  let before = objectSizes(store);
  // five granules in five blocks, and one in the hole (a new block: stored whole)
  writeAt(vol, [64 * KiB, MiB, 3 * MiB + 128 * KiB, 7 * MiB + 448 * KiB, 19 * MiB, 21 * MiB + 64 * KiB]);
  const s2 = await snap.createSnapshot(vol, { store });
  const want2 = sha(fs.readFileSync(vol));
  t.equal(s2.changeSource, 'tags');
  t.equal(s2.stats.changedBlocks, 6);
  t.equal(s2.stats.dataBlocks, 41, 'data blocks count blocks, not entries');
  let made = newObjects(before, objectSizes(store));
  t.same(made, { pieces: 5, whole: 1, all: 6 }, 'five 64 KiB pieces and the new block whole');
  t.equal(s2.stats.bytesAdded, 5 * PS + BS, 'bytes stored: the granules, not their blocks');
  t.equal(await restored(store, s2.id, dir), want2, 'the incremental restores exactly');
  t.equal(await restored(store, s1.id, dir), want1, 'its parent still does');
  t.ok((await snap.verifySnapshot(s2.id, { store })).ok, 'verify checks every piece');
  t.same((await snap.diffSnapshots(s1.id, s2.id, { store })).changedBlocks, [0, 2, 6, 14, 38, 42], 'diff names the blocks with pieces');

  // Nothing changed: the pieced blocks keep every entry; nothing stored.
  before = objectSizes(store);
  const same = await snap.createSnapshot(vol, { store });
  t.equal(same.stats.changedBlocks, 0, 'an unchanged volume: no change');
  t.equal(objectSizes(store).length, before.length, 'and no object stored');
  t.equal(await restored(store, same.id, dir), want2, 'it restores as its parent');

  // Another granule of a pieced block, and a granule of a block still whole.
  before = objectSizes(store);
  writeAt(vol, [MiB + 192 * KiB, 10 * MiB]);
  const s3 = await snap.createSnapshot(vol, { store });
  made = newObjects(before, objectSizes(store));
  t.same(made, { pieces: 2, whole: 0, all: 2 }, 'two more pieces');
  t.same((await snap.diffSnapshots(same.id, s3.id, { store })).changedBlocks, [2, 20]);
  t.equal(await restored(store, s3.id, dir), sha(fs.readFileSync(vol)), 'the third restores exactly');

  // The parents deleted and their objects collected: the pieces' base objects stay live.
  for (const s of [s1, s2, same]) await snap.deleteSnapshot(s.id, { store, permanently: true });
  await snap.gc({ store });
  t.equal(await restored(store, s3.id, dir), sha(fs.readFileSync(vol)), 'after the parents are deleted and gc ran');
});

t.test('the limits: every granule of one block, five at once, a granule that became zero, a fully rewritten block', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeVolume(vol);
  await snap.createSnapshot(vol, { store, blockSize: BS });
  const at = (k: number) => 2 * MiB + k * PS;
  // one granule at a time: a piece each, up to all eight of the block's granules (a block has
  // room for a piece of every granule: never compacted by their count), then a granule written
  // again: its new piece replaces the old one
  for (let k = 0; k < 10; k++) {
    const before = objectSizes(store);
    writeAt(vol, [at(k % 8)]);
    const s = await snap.createSnapshot(vol, { store });
    t.equal(s.changeSource, 'tags');
    t.same(newObjects(before, objectSizes(store)), { pieces: 1, whole: 0, all: 1 }, `round ${k}: one piece`);
    t.equal(await restored(store, s.id, dir), sha(fs.readFileSync(vol)), `round ${k} restores exactly`);
  }
  // five granules at once: whole
  let before = objectSizes(store);
  writeAt(vol, [5 * MiB, 5 * MiB + PS, 5 * MiB + 2 * PS, 5 * MiB + 3 * PS, 5 * MiB + 4 * PS]);
  let s = await snap.createSnapshot(vol, { store });
  t.same(newObjects(before, objectSizes(store)), { pieces: 0, whole: 1, all: 1 }, 'five granules moved at once: the block whole');
  t.equal(await restored(store, s.id, dir), sha(fs.readFileSync(vol)));
  // a granule that became zero: whole (a zero piece is not an object)
  before = objectSizes(store);
  writeAt(vol, [9 * MiB + PS], PS, true);
  s = await snap.createSnapshot(vol, { store });
  t.same(newObjects(before, objectSizes(store)), { pieces: 0, whole: 1, all: 1 }, 'a zeroed granule: the block whole');
  t.equal(await restored(store, s.id, dir), sha(fs.readFileSync(vol)));
  // a block fully zeroed, which had pieces: no entry at all
  writeAt(vol, [2 * MiB], BS, true);
  const z = await snap.createSnapshot(vol, { store });
  t.equal(z.stats.dataBlocks, s.stats.dataBlocks - 1, 'the zeroed block is a hole');
  t.equal(await restored(store, z.id, dir), sha(fs.readFileSync(vol)));
});

t.test('without granule tags in the parent (tags off, then on): changed blocks are stored whole, the next time as pieces', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeVolume(vol);
  await snap.createSnapshot(vol, { store, blockSize: BS, changeTags: false });
  writeAt(vol, [3 * MiB]);
  let before = objectSizes(store);
  const hashed = await snap.createSnapshot(vol, { store });
  t.equal(hashed.changeSource, 'hash', 'a parent without tags: every block hashed');
  t.same(newObjects(before, objectSizes(store)), { pieces: 0, whole: 1, all: 1 }, 'the changed block whole');
  // the hash scan writes block tags only: a changed block is whole once more
  writeAt(vol, [3 * MiB + PS]);
  before = objectSizes(store);
  const first = await snap.createSnapshot(vol, { store });
  t.equal(first.changeSource, 'tags');
  t.same(newObjects(before, objectSizes(store)), { pieces: 0, whole: 1, all: 1 }, 'no granule tags in the parent: whole');
  // and then, with the granule tags that block now has, a piece
  writeAt(vol, [3 * MiB + 2 * PS]);
  before = objectSizes(store);
  const second = await snap.createSnapshot(vol, { store });
  t.same(newObjects(before, objectSizes(store)), { pieces: 1, whole: 0, all: 1 }, 'granule tags now: one piece');
  t.equal(await restored(store, second.id, dir), sha(fs.readFileSync(vol)));
});

t.test('proven by a second read, and in an encrypted store: pieces restore exactly', async (t) => {
  const dir = t.testdir();
  const vol = path.join(dir, 'vol.img');
  makeVolume(vol);
  // the one-moment proof by reading (block devices, tmpfs): a pieced block's first entry carries its tag
  const store = path.join(dir, 'store');
  const proving = withFaults({ store, blockSize: BS }, { proveByReading: true });
  await snap.createSnapshot(vol, proving);
  for (let round = 0; round < 3; round++) {
    const before = objectSizes(store);
    writeAt(vol, [round * MiB + PS, 8 * MiB + round * BS + 3 * PS]);
    const s = await snap.createSnapshot(vol, withFaults({ store }, { proveByReading: true }));
    t.equal(s.state, 'completed');
    t.same(newObjects(before, objectSizes(store)), { pieces: 2, whole: 0, all: 2 }, `round ${round}: two pieces, proven by reading`);
    t.equal(await restored(store, s.id, dir), sha(fs.readFileSync(vol)), `round ${round} restores exactly`);
  }
  // encrypted: the pieces' names are HMACs under the volume's key, their bytes sealed
  const sealed = path.join(dir, 'sealed');
  const keyFile = path.join(dir, 'k');
  fs.writeFileSync(keyFile, randomBytes(32), { mode: 0o600 });
  const key = { keyFile };
  await snap.registerVolume(vol, { store: sealed, blockSize: BS, encrypted: true, key });
  await snap.createSnapshot(vol, { store: sealed, key });
  writeAt(vol, [4 * MiB + 5 * PS, 17 * MiB]);
  const s = await snap.createSnapshot(vol, { store: sealed, key });
  t.equal(s.stats.blocksAdded, 2, 'two sealed pieces');
  t.ok(s.stats.bytesAdded < 2 * PS + 4 * KiB, `of a granule each (${s.stats.bytesAdded} bytes)`);
  t.equal(await restored(sealed, s.id, dir, key), sha(fs.readFileSync(vol)), 'restores exactly');
  t.ok((await snap.verifySnapshot(s.id, { store: sealed, key })).ok, 'verifies');
});

forEachBackend(t, 'granule pieces in any store: a raw incremental of scattered writes restores exactly', async (t, b) => {
  const dir = t.testdir();
  const store = await b.store('granules');
  const vol = path.join(dir, 'vol.img');
  makeVolume(vol);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  const want1 = sha(fs.readFileSync(vol));
  writeAt(vol, [PS, MiB + 448 * KiB, 10 * MiB]);
  const s2 = await snap.createSnapshot(vol, { store });
  t.equal(s2.changeSource, 'tags');
  t.equal(s2.stats.blocksAdded, 3, 'three piece objects stored');
  t.equal(s2.stats.bytesAdded, 3 * PS, 'of a granule each');
  t.equal(await restored(store, s2.id, dir), sha(fs.readFileSync(vol)), 'restores exactly');
  t.equal(await restored(store, s1.id, dir), want1, 'the parent still does');
  t.ok((await snap.verifySnapshot(s2.id, { store })).ok, 'verifies');
});
