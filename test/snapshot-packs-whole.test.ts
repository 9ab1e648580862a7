/**
 * Whole blocks in packs (src/storage/store/packs.ts, index version 2; src/storage/dirty.ts): an
 * unsealed incremental that reads its dirty blocks in place stores the whole blocks it reads
 * in its packs, beside its pieces, and its pack index lists them; so does the index of every
 * later snapshot that keeps their entries, or a chain would lose them once its parents are
 * deleted and gc ran. Checked with real qcow2 volumes written by qemu-io, on both backends,
 * and on the format's own: versions, lookups, and what a reader of version 1 is told.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import * as snap from '../src/storage';
import { PackTable, PackWriter, decodePackIndex, encodePackIndex, openPackIndex, packsOf } from '../src/storage/store/packs';
import { Throttle } from '../src/storage/pool';
import { qemuImgOk, qemuIo, guestBytes, assertClean } from './helpers/qemu';
import { needQemuNbd } from './helpers/qemu-bitmaps';
import { forEachBackend } from './helpers/backends';

const KiB = 1024;
const MiB = 2 ** 20;
const BS = 512 * KiB;
const PS = 64 * KiB;
const skip = needQemuNbd();
const sha = (b: Buffer) => createHash('sha256').update(b).digest();

async function restoredBytes(store: string, id: string, dir: string): Promise<Buffer> {
  const out = path.join(dir, `r-${id}-${randomBytes(4).toString('hex')}.raw`);
  await snap.restoreSnapshot(id, { store, to: out });
  const b = fs.readFileSync(out);
  fs.rmSync(out);
  return b;
}

/** An 8 MiB qcow2 volume with 4 MiB of data, and its full snapshot in a directory store. */
async function volumeWithFull(dir: string): Promise<{ store: string; vol: string; full: snap.SnapshotJson }> {
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', vol, '8M');
  qemuIo(vol, ['write -P 0x11 0 4M']);
  return { store, vol, full: await snap.createSnapshot(vol, { store, blockSize: BS }) };
}

/** The index's entries as digest (hex) -> stored length. */
function listed(entries: Buffer): Map<string, number> {
  const m = new Map<string, number>();
  for (let o = 0; o < entries.length; o += 72) m.set(entries.toString('hex', o, o + 32), entries.readUInt32LE(o + 68));
  return m;
}

t.test('a pack index lists whole blocks only as version 2; a reader of an unknown version is told which', async (t) => {
  const pack = randomBytes(32);
  const e = (length: number) => ({ digest: randomBytes(32), pack, offset: 0, length });
  const v1 = encodePackIndex([e(PS), e(PS)]);
  const v2 = encodePackIndex([e(PS), e(BS)], true);
  t.equal(v1.readUInt16LE(8), 1, 'pieces only: version 1');
  t.equal(v2.readUInt16LE(8), 2, 'with whole blocks: version 2');
  t.same([openPackIndex('a', v1).whole, openPackIndex('b', v2).whole], [false, true], 'read back as such');
  t.equal(decodePackIndex('b', v2).length, 2 * 72, 'both versions read the same entries');
  const v3 = Buffer.from(v2);
  v3.writeUInt16LE(3, 8);
  t.throws(() => decodePackIndex('idx', v3), { code: 'ECORRUPT', message: /pack index version 3 .* expected version 1 or 2/ }, 'a version this reader does not know');
  const table = new PackTable();
  table.add(decodePackIndex('a', v1));
  t.notOk(table.listsWhole, 'a table of version 1 indexes lists no whole blocks');
  table.add(openPackIndex('b', v2).entries, true);
  t.ok(table.listsWhole, 'one of version 2 does');
});

t.test('a pack writer indexes the whole blocks it was told of where a pack holds them: version 2 then, else version 1', async (t) => {
  const put = new Map<string, Buffer>();
  const backend = { putIfAbsent: async (k: string, b: Buffer) => (put.set(k, Buffer.from(b)), true) };
  const w = new PackWriter(backend, new PackTable(), new Throttle(64 * MiB), (d) => `blocks/${d.toString('hex')}`);
  const piece = randomBytes(PS);
  const whole = randomBytes(BS);
  await w.add(sha(piece), piece);
  await w.add(sha(whole), whole);
  await w.flush();
  const elsewhere = sha(randomBytes(BS)); // a whole block that is an object of its own
  const i1 = openPackIndex('idx', await w.index(sha(piece)));
  t.same([i1.whole, [...listed(i1.entries).values()]], [false, [PS]], 'told of no whole block: version 1, the piece only');
  const i2 = openPackIndex('idx', await w.index(sha(piece), Buffer.concat([sha(whole), elsewhere, sha(whole)])));
  t.equal(i2.whole, true, 'a whole block in a pack: version 2');
  t.same(listed(i2.entries), new Map([[sha(piece).toString('hex'), PS], [sha(whole).toString('hex'), BS]]), 'the piece and the packed block, once; the object not listed');
  const i3 = openPackIndex('idx', await w.index(sha(piece), elsewhere));
  t.equal(i3.whole, false, 'told only of whole blocks that are objects: version 1');
  // the child's writer: the parent's version 2 index in its table
  const table = new PackTable();
  table.add(i2.entries, true);
  const child = new PackWriter(backend, table, new Throttle(64 * MiB), (d) => `blocks/${d.toString('hex')}`);
  t.notOk(await child.add(sha(whole), whole), 'a whole block the parent packed is not stored again');
  await child.flush();
  const ic = openPackIndex('idx', await child.index(Buffer.alloc(0), sha(whole)));
  t.same([ic.whole, [...listed(ic.entries).keys()]], [true, [sha(whole).toString('hex')]], 'and the child lists it where the parent put it');
});

if (skip) t.test('whole blocks in packs, qcow2 volumes', { skip }, async () => undefined);
else
  forEachBackend(t, 'a qcow2 incremental packs its whole blocks; every later index lists those it keeps; exact restores after the parents are deleted and gc ran', async (t, b) => {
    const dir = t.testdir();
    const store = await b.store('whole');
    const vol = path.join(dir, 'vm.qcow2');
    qemuImgOk('create', '-q', '-f', 'qcow2', vol, '16M');
    qemuIo(vol, ['write -P 0x11 0 6M']);
    const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
    const want1 = guestBytes(vol);
    const before = new Set(await b.keys(store, 'blocks/'));
    // two whole blocks (1M-2M), one in a hole of the parent (8M), one granule (block 0)
    qemuIo(vol, [`write -P 0x51 ${MiB} 512k`, `write -P 0x50 ${MiB + BS} 512k`, `write -P 0x52 ${8 * MiB} 512k`, 'write -P 0x53 64k 64k']);
    const want2 = guestBytes(vol);
    const s2 = await snap.createSnapshot(vol, { store });
    t.equal(s2.changeSource, 'bitmap', `the bitmap was used (${s2.changeSourceReason})`);
    t.equal(s2.stats.bytesScanned, 3 * BS + PS, 'three blocks and a granule read');
    t.equal(s2.stats.blocksAdded, 4, 'three whole blocks and a piece stored');
    const added = (await b.keys(store, 'blocks/')).filter((k) => !before.has(k));
    t.equal(added.length, 1, `in one pack, not four objects (${added.length})`);
    const idx2 = openPackIndex('idx', await b.read(store, `snapshots/${s2.id}.packs`));
    t.equal(idx2.whole, true, 'its index is version 2');
    const wholes = [2, 3, 16].map((i) => sha(want2.subarray(i * BS, (i + 1) * BS)).toString('hex'));
    const in2 = listed(idx2.entries);
    t.same(wholes.map((d) => in2.get(d)), [BS, BS, BS], 'it lists the three whole blocks, 512 KiB each');
    t.equal(in2.get(sha(want2.subarray(PS, 2 * PS)).toString('hex')), PS, 'and the piece');
    t.same(packsOf(idx2.entries).map((p) => `blocks/${p.toString('hex').slice(0, 2)}/${p.toString('hex')}`), added, 'all in the new pack');
    t.ok((await restoredBytes(store, s2.id, dir)).equals(want2), 'the incremental restores exactly');
    t.ok((await restoredBytes(store, s1.id, dir)).equals(want1), 'its parent still does');
    t.ok((await snap.verifySnapshot(s2.id, { store })).ok, 'verify reads each whole block from its pack');

    // the next snapshot writes elsewhere and keeps the packed blocks' entries: its index must list them
    qemuIo(vol, [`write -P 0x54 ${5 * MiB} 64k`]);
    const want3 = guestBytes(vol);
    const s3 = await snap.createSnapshot(vol, { store });
    t.equal(s3.stats.bytesScanned, PS, 'one granule read');
    const idx3 = openPackIndex('idx', await b.read(store, `snapshots/${s3.id}.packs`));
    const in3 = listed(idx3.entries);
    t.equal(idx3.whole, true, 'a child that keeps them has a version 2 index too');
    t.same(wholes.map((d) => in3.get(d)), [BS, BS, BS], 'listing the whole blocks it kept');

    // a copy reads them from the pack and holds objects of its own
    const other = await b.store('whole-copy');
    const c = await snap.copySnapshot(s3.id, { store, toStore: other });
    t.ok((await restoredBytes(other, c.id, dir)).equals(want3), 'a copy to another store restores exactly');

    for (const s of [s1, s2]) await snap.deleteSnapshot(s.id, { store, permanently: true });
    await snap.gc({ store });
    t.ok((await restoredBytes(store, s3.id, dir)).equals(want3), 'the last restores exactly after its parents are gone and gc ran');
    t.ok((await snap.verifySnapshot(s3.id, { store })).ok, 'and verifies');
    assertClean(t, vol, 'the volume after three snapshots');
  });

if (skip) t.test('whole blocks in packs, rewritten', { skip }, async () => undefined);
else
  t.test('packed blocks rewritten whole, in a granule, zeroed, or with the same bytes: exact restores, and the index lists just what the manifest keeps', async (t) => {
    const dir = t.testdir();
    const { store, vol } = await volumeWithFull(dir);
    // blocks 0-3 each of its own byte, blocks 4 and 5 alike
    qemuIo(vol, [0x61, 0x62, 0x63, 0x64, 0x65, 0x65].map((p, i) => `write -P ${p} ${i * BS} 512k`));
    const s2 = await snap.createSnapshot(vol, { store });
    t.equal(s2.stats.blocksAdded, 5, 'six blocks, two of them alike: five stored');
    const D = (p: number) => sha(Buffer.alloc(BS, p)).toString('hex');
    const index = (id: string) => openPackIndex('idx', fs.readFileSync(path.join(store, 'snapshots', `${id}.packs`)));
    const first = index(s2.id);
    t.same([first.whole, [0x61, 0x62, 0x63, 0x64, 0x65].map((p) => listed(first.entries).get(D(p)))], [true, [BS, BS, BS, BS, BS]], 'each listed once');
    const steps: Array<[string, string]> = [
      ['block 0 rewritten whole', `write -P 0x71 0 512k`],
      ['a granule of block 1', `write -P 0x72 ${BS + PS} 64k`],
      ['block 2 zeroed', `write -z ${2 * BS} 512k`],
      ['block 3 written with the bytes it had', `write -P 0x64 ${3 * BS} 512k`],
    ];
    const snaps = [s2];
    for (const [what, cmd] of steps) {
      qemuIo(vol, [cmd]);
      const s = await snap.createSnapshot(vol, { store });
      t.equal(s.changeSource, 'bitmap', what);
      t.ok((await restoredBytes(store, s.id, dir)).equals(guestBytes(vol)), `${what}: restores exactly`);
      snaps.push(s);
    }
    const last = snaps[snaps.length - 1];
    const want = guestBytes(vol);
    const idx = listed(index(last.id).entries);
    t.same([0x71, 0x62, 0x64, 0x65].map((p) => idx.get(D(p))), [BS, BS, BS, BS], 'the last index lists every packed block its manifest keeps');
    t.equal(idx.get(sha(Buffer.alloc(PS, 0x72)).toString('hex')), PS, 'and the piece');
    t.same([idx.has(D(0x61)), idx.has(D(0x63))], [false, false], 'but not the blocks rewritten or zeroed');
    // only the last is kept: every block it reads from a pack must still be found there
    for (const s of snaps.slice(0, -1)) await snap.deleteSnapshot(s.id, { store, permanently: true });
    await snap.gc({ store });
    t.ok((await restoredBytes(store, last.id, dir)).equals(want), 'the last restores exactly alone, after gc');
    t.ok((await snap.verifySnapshot(last.id, { store })).ok, 'and verifies');
  });

if (skip) t.test('whole blocks in packs, compacted', { skip }, async () => undefined);
else
  t.test('a block compacted (a granule zeroed after four pieces) goes into the pack too, and restores alone', async (t) => {
    const dir = t.testdir();
    const { store, vol, full } = await volumeWithFull(dir);
    const snaps = [full];
    const files = () => fs.readdirSync(path.join(store, 'blocks')).reduce((n, d) => n + fs.readdirSync(path.join(store, 'blocks', d)).length, 0);
    for (let k = 0; k < 5; k++) {
      qemuIo(vol, [k < 4 ? `write -P ${0x40 + k} ${2 * MiB + k * PS} 64k` : `write -z ${2 * MiB + 6 * PS} 64k`]);
      const before = files();
      const s = await snap.createSnapshot(vol, { store });
      t.equal(files() - before, 1, `snapshot ${k + 2}: one new file, a pack`);
      snaps.push(s);
    }
    const last = snaps[snaps.length - 1];
    t.equal(last.stats.bytesScanned, PS + BS, 'the zeroed granule made the block be read whole again');
    const want = guestBytes(vol);
    const idx = openPackIndex('idx', fs.readFileSync(path.join(store, 'snapshots', `${last.id}.packs`)));
    t.equal(listed(idx.entries).get(sha(want.subarray(4 * BS, 5 * BS)).toString('hex')), BS, 'the compacted block is listed in its pack');
    for (const s of snaps.slice(0, -1)) await snap.deleteSnapshot(s.id, { store, permanently: true });
    await snap.gc({ store });
    t.ok((await restoredBytes(store, last.id, dir)).equals(want), 'and the snapshot restores exactly alone, after gc');
  });
