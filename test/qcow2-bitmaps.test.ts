/**
 * QEMU's persistent dirty bitmaps, read and written by disksnap, with QEMU as the oracle:
 * qemu-img bitmap / qemu-io make and dirty the bitmaps, qemu-nbd + qemu-img map show which
 * granules QEMU holds dirty, qemu-img info shows the flags, qemu-img check the refcounts.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { addBitmap, clearBitmap, FileBitmapHost, listBitmaps, markBitmaps, readBitmap, removeBitmap } from '../src/image/qcow2/bitmap-file';
import { checkBitmaps } from '../src/image/qcow2/bitmaps';
import { checkImage } from '../src/image/qcow2/check';
import { BlockFile } from '../src/engine/file';
import { assertClean, assertShows, makeParent, qemuCheck, qemuImgOk, qemuInfo, qemuIo, run } from './helpers/qemu';
import { granules, needQemuNbd, qemuBitmaps, qemuDirtyRanges, Range } from './helpers/qemu-bitmaps';

const KiB = 1024;
const MiB = 2 ** 20;
const skip = needQemuNbd();

/** qemu-io writes of [offset, length] pairs (pattern byte varies per write). */
function qemuWrites(image: string, writes: [number, number][]): void {
  qemuIo(
    image,
    writes.map(([o, l], i) => `write -P ${0x11 + i} ${o} ${l}`),
  );
}

function ranges(writes: [number, number][]): Range[] {
  return writes.map(([offset, length]) => ({ offset, length }));
}

/** Byte offset of the bitmap directory (from the extension in cluster 0). */
function directoryOffset(image: string): number {
  const head = fs.readFileSync(image).subarray(0, 65536);
  let pos = head.readUInt32BE(100);
  for (;;) {
    const type = head.readUInt32BE(pos);
    const len = head.readUInt32BE(pos + 4);
    if (type === 0) throw new Error('no bitmaps extension');
    if (type === 0x23852875) return Number(head.readBigUInt64BE(pos + 8 + 16));
    pos += 8 + Math.ceil(len / 8) * 8;
  }
}

function poke(file: string, offset: number, bytes: number[]): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, Buffer.from(bytes), 0, bytes.length, offset);
  } finally {
    fs.closeSync(fd);
  }
}

t.test('the reader returns exactly the granules QEMU marked, for every granularity and across data clusters', { skip }, async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.qcow2');
  const size = 64 * MiB + 1024; // qcow2 sizes are whole sectors; this is no multiple of 4 KiB
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, String(size));
  qemuImgOk('bitmap', '--add', img, 'g4k'); // qemu-img's default granularity: the cluster size
  qemuImgOk('bitmap', '--add', '-g', '512', img, 'g512'); // 131074 bits: 5 data clusters of 4 KiB
  qemuImgOk('bitmap', '--add', '-g', '1M', img, 'g1m');
  qemuImgOk('bitmap', '--add', '--disable', img, 'off');
  const writes: [number, number][] = [
    [0, 512],
    [63 * KiB, 2 * KiB], // crosses a 64 KiB granule
    [5 * MiB + 3, 1],
    [16 * MiB - 4 * KiB, 12 * KiB], // crosses a bitmap data cluster of the 512 B bitmap (16 MiB)
    [40 * MiB, 3 * MiB],
    [64 * MiB, 1000], // the tail granule, shorter than the granularity
  ];
  qemuWrites(img, writes);
  const listed = listBitmaps(img);
  t.equal(listed.state, 'consistent');
  t.same(
    listed.bitmaps.map((b) => [b.name, b.granularity, b.auto, b.inUse]),
    qemuBitmaps(img).map((b) => [b.name, b.granularity, b.flags.includes('auto'), b.flags.includes('in-use')]),
    'names, granularities and flags as qemu-img info shows them',
  );
  for (const [name, g] of [['g4k', 4 * KiB], ['g512', 512], ['g1m', MiB]] as const) {
    const ours = readBitmap(img, name);
    t.same(ours, await qemuDirtyRanges(img, name), `${name}: the same dirty ranges as QEMU`);
    t.same(ours, granules(ranges(writes), g, size), `${name}: exactly the granules the writes touched`);
  }
  t.same(readBitmap(img, 'off'), [], 'a disabled bitmap stays empty');
  t.same(await qemuDirtyRanges(img, 'off'), [], 'QEMU agrees the disabled bitmap is empty');
});

t.test('a bitmap disksnap adds is accepted by qemu-img, kept up to date by qemu-io, and read back as QEMU reads it', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, 8 * MiB);
  const img = path.join(dir, 'child.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-b', parent.file, '-F', 'raw', img);
  qemuImgOk('bitmap', '--add', img, 'theirs');
  const added = addBitmap(img, 'disksnap-vol-1');
  t.same(added, { name: 'disksnap-vol-1', granularity: 64 * KiB, auto: true, inUse: false });
  addBitmap(img, 'disabled-one', { granularity: 128 * KiB, disabled: true });
  assertClean(t, img, 'after adding two bitmaps');
  t.same(
    qemuBitmaps(img).map((b) => [b.name, b.granularity, b.flags]),
    [
      ['theirs', 64 * KiB, ['auto']],
      ['disksnap-vol-1', 64 * KiB, ['auto']],
      ['disabled-one', 128 * KiB, []],
    ],
    'qemu-img info lists them, consistent (no in-use flag)',
  );
  const info = qemuInfo(img);
  t.equal(info['backing-filename'], parent.file, 'the backing file name survived the header rewrite');
  assertShows(t, img, parent.bytes, 'guest view unchanged');

  const writes: [number, number][] = [
    [100 * KiB, 4 * KiB],
    [3 * MiB - 1, 2],
  ];
  qemuWrites(img, writes);
  const expected = granules(ranges(writes), 64 * KiB, 8 * MiB);
  t.same(readBitmap(img, 'disksnap-vol-1'), expected, 'our bitmap records what qemu-io wrote');
  t.same(await qemuDirtyRanges(img, 'disksnap-vol-1'), expected, 'QEMU reads the same');
  t.same(readBitmap(img, 'disabled-one'), [], 'the disabled one stays empty');
  assertClean(t, img, 'after qemu-io');
});

t.test('adding to an image that has none creates the extension; removing the last takes it away', { skip }, async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', img, '16M');
  qemuWrites(img, [[0, 64 * KiB]]);
  t.equal(listBitmaps(img).state, 'none');
  addBitmap(img, 'one', { granularity: 512 * KiB });
  t.same(qemuBitmaps(img).map((b) => b.name), ['one']);
  assertClean(t, img, 'after the first bitmap');
  qemuWrites(img, [[9 * MiB, 1]]);
  t.same(readBitmap(img, 'one'), [{ offset: 9 * MiB - (9 * MiB) % (512 * KiB), length: 512 * KiB }]);
  removeBitmap(img, 'one');
  t.same(qemuBitmaps(img), [], 'qemu-img info shows no bitmap');
  t.equal(listBitmaps(img).state, 'none');
  assertClean(t, img, 'after removing the last bitmap (its clusters freed, not leaked)');
  const r = run('qemu-img', ['bitmap', '--add', img, 'again']);
  t.equal(r.status, 0, `QEMU can add a bitmap afterwards: ${r.stderr}`);
  assertClean(t, img, 'QEMU added one after ours went');
});

t.test('clearing empties a bitmap, frees its data clusters, and QEMU goes on recording into it', { skip }, async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, '32M');
  qemuImgOk('bitmap', '--add', '-g', '512', img, 'b');
  qemuImgOk('bitmap', '--add', img, 'other');
  qemuWrites(img, [
    [0, 4 * KiB],
    [20 * MiB, 8 * KiB],
  ]);
  const otherBefore = readBitmap(img, 'other');
  const dataClusters = (): { host: FileBitmapHost; offsets: number[]; close(): void } => {
    const f = BlockFile.open(img, { lock: 'shared' });
    const host = new FileBitmapHost(f);
    const d = directoryOffset(img);
    const e = Buffer.alloc(12);
    f.readFullSync(e, d);
    const table = Buffer.alloc(e.readUInt32BE(8) * 8);
    f.readFullSync(table, Number(e.readBigUInt64BE(0)));
    const offsets: number[] = [];
    for (let i = 0; i < table.length / 8; i++) if (table.readBigUInt64BE(i * 8) !== 0n) offsets.push(Number(table.readBigUInt64BE(i * 8)));
    return { host, offsets, close: () => f.close() };
  };
  const before = dataClusters();
  const used = before.offsets;
  before.close();
  t.equal(used.length, 2, 'bitmap b had two data clusters (0 and 20 MiB)');
  clearBitmap(img, 'b');
  t.same(readBitmap(img, 'b'), [], 'our reader: empty');
  t.same(await qemuDirtyRanges(img, 'b'), [], 'QEMU: empty');
  t.same(readBitmap(img, 'other'), otherBefore, 'the other bitmap is untouched');
  const after = dataClusters();
  t.same(after.offsets, [], 'its table is empty');
  t.same(used.map((o) => after.host.refcountOf(o / after.host.clusterSize)), [0, 0], 'its former data clusters are free');
  after.close();
  assertClean(t, img, 'after clear');
  t.same(qemuBitmaps(img).find((b) => b.name === 'b')?.flags, ['auto'], 'still enabled and consistent');
  qemuWrites(img, [[7 * MiB + 100, 1000]]);
  const expected = granules([{ offset: 7 * MiB + 100, length: 1000 }], 512, 32 * MiB);
  t.same(readBitmap(img, 'b'), expected, 'only the write after the clear');
  t.same(await qemuDirtyRanges(img, 'b'), expected, 'QEMU agrees');
});

t.test('clearing a bitmap left in use by a killed QEMU makes it consistent again', { skip }, async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', img, '16M');
  qemuImgOk('bitmap', '--add', img, 'b');
  run('qemu-io', ['-f', 'qcow2', '-c', 'write 1M 64k', '-c', 'abort', img]);
  t.same(qemuBitmaps(img)[0].flags, ['in-use', 'auto'], 'QEMU left it in use');
  t.equal(listBitmaps(img).bitmaps[0].inUse, true);
  t.throws(() => readBitmap(img, 'b'), { code: 'EINCONSISTENT' }, 'an in-use bitmap is not read');
  clearBitmap(img, 'b');
  t.same(qemuBitmaps(img)[0].flags, ['auto'], 'consistent after the clear');
  assertClean(t, img, 'after clearing the in-use bitmap');
  qemuWrites(img, [[2 * MiB, 1]]);
  t.same(await qemuDirtyRanges(img, 'b'), [{ offset: 2 * MiB, length: 64 * KiB }], 'QEMU loads and updates it again');
});

t.test('the writer sets the bits of a guest range in every enabled bitmap, allocating data clusters', { skip }, async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.qcow2');
  const size = 48 * MiB;
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, String(size));
  qemuImgOk('bitmap', '--add', '-g', '512', img, 'fine');
  qemuImgOk('bitmap', '--add', '-g', '2M', img, 'coarse');
  qemuImgOk('bitmap', '--add', '--disable', img, 'off');
  qemuWrites(img, [[30 * MiB, 4 * KiB]]);
  const marks: Range[] = [
    { offset: 1000, length: 100 },
    { offset: 15 * MiB + 512 * 7, length: 2 * MiB }, // spans two data clusters of 'fine'
    { offset: size - 1, length: 1 },
  ];
  markBitmaps(img, marks);
  const all = [...marks, { offset: 30 * MiB, length: 4 * KiB }];
  for (const [name, g] of [['fine', 512], ['coarse', 2 * MiB]] as const) {
    const want = granules(all, g, size);
    t.same(await qemuDirtyRanges(img, name), want, `${name}: QEMU sees the marked granules and its own`);
    t.same(readBitmap(img, name), want, `${name}: our reader agrees`);
  }
  t.same(await qemuDirtyRanges(img, 'off'), [], 'the disabled bitmap is not touched');
  t.same(
    qemuBitmaps(img).map((b) => b.flags),
    [['auto'], ['auto'], []],
    'no bitmap left in use',
  );
  assertClean(t, img, 'after marking');
});

t.test('a bitmap in use is left as it is by the writer; a stale extension is reported, its clusters are what QEMU calls leaks', { skip }, async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', img, '16M');
  qemuImgOk('bitmap', '--add', img, 'a');
  qemuImgOk('bitmap', '--add', '-g', '512', img, 'b');
  qemuWrites(img, [[0, 1 * MiB]]);
  const file = BlockFile.open(img, { lock: 'shared' });
  let refs: number;
  try {
    const host = new FileBitmapHost(file);
    const c = checkBitmaps(img, (b, o) => file.readFullSync(b, o), host.header, file.size());
    t.same(c.errors, [], 'no errors on a QEMU-made image');
    for (const r of c.references) t.equal(host.refcountOf(r.offset / host.clusterSize), 1, `${r.what} has refcount 1`);
    refs = c.references.reduce((n, r) => n + Math.ceil(r.length / host.clusterSize), 0);
    t.equal(refs, 1 + 2 + 2, 'directory, two tables, one data cluster each');
  } finally {
    file.close();
  }
  // A writer lacking bitmap support clears autoclear bit 0 (byte 95 of the header).
  poke(img, 95, [0]);
  t.equal(listBitmaps(img).state, 'stale');
  t.throws(() => readBitmap(img, 'a'), { code: 'EINCONSISTENT' });
  const q = qemuCheck(img);
  t.equal(q.result?.leaks, refs, 'qemu-img check counts exactly the bitmap clusters as leaks');
  const f2 = BlockFile.open(img, { lock: 'shared' });
  try {
    const host = new FileBitmapHost(f2);
    const c = checkBitmaps(img, (b, o) => f2.readFullSync(b, o), host.header, f2.size());
    t.same(c.references, [], 'no references from a stale extension');
    t.match(c.notes.join('\n'), /stale/);
  } finally {
    f2.close();
  }
  addBitmap(img, 'fresh');
  t.same(qemuBitmaps(img).map((b) => b.name), ['fresh'], 'adding replaces the stale extension, as QEMU would');
});

t.test('malformed bitmap metadata is an ECORRUPT error naming the field, and qemu-img check agrees it is corrupt', { skip }, async (t) => {
  const base = (dir: string): string => {
    const img = path.join(dir, `a-${Math.random().toString(16).slice(2)}.qcow2`);
    qemuImgOk('create', '-q', '-f', 'qcow2', img, '16M');
    qemuImgOk('bitmap', '--add', img, 'bm');
    qemuWrites(img, [[0, 4 * KiB]]);
    return img;
  };
  const dir = t.testdir();
  const cases: [string, (img: string) => void, RegExp][] = [
    ['granularity_bits 40', (img) => poke(img, directoryOffset(img) + 17, [40]), /granularity_bits is 40/],
    ['type 2', (img) => poke(img, directoryOffset(img) + 16, [2]), /field type is 2/],
    ['reserved flag bit', (img) => poke(img, directoryOffset(img) + 12, [0x80, 0, 0, 2]), /field flags/],
    ['name_size 0', (img) => poke(img, directoryOffset(img) + 18, [0, 0]), /name_size is 0/],
    ['table offset misaligned', (img) => poke(img, directoryOffset(img) + 6, [0x10, 0]), /bitmap_table_offset/],
  ];
  for (const [what, damage, re] of cases) {
    const img = base(dir);
    damage(img);
    t.throws(() => listBitmaps(img), { code: 'ECORRUPT', message: re }, `${what}: ECORRUPT naming the field`);
    const f = BlockFile.open(img, { lock: 'shared' });
    try {
      const host = new FileBitmapHost(f);
      const c = checkBitmaps(img, (b, o) => f.readFullSync(b, o), host.header, f.size());
      t.ok(c.errors.length > 0, `${what}: our check reports a corruption`);
    } finally {
      f.close();
    }
    t.not(qemuCheck(img).status, 0, `${what}: qemu-img check refuses the image or reports corruption too`);
  }
  // A bitmap table entry with reserved bits: the directory parses, reading the bitmap fails.
  const img = base(dir);
  const f = BlockFile.open(img, { lock: 'shared' });
  const head = Buffer.alloc(8);
  f.readFullSync(head, directoryOffset(img));
  f.close();
  const table = Number(head.readBigUInt64BE(0));
  poke(img, table + 6, [0x01, 0x02]); // bit 1 and more in the low word: reserved
  t.throws(() => readBitmap(img, 'bm'), { code: 'ECORRUPT', message: /table entry 0/ });
  t.not(qemuCheck(img).status, 0, 'qemu-img check: not clean either');
});

t.test('names and granularities are validated before anything is written', { skip }, async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', img, '16M');
  qemuImgOk('bitmap', '--add', img, 'x');
  const before = fs.readFileSync(img);
  t.throws(() => addBitmap(img, 'x'), { code: 'EEXIST' });
  t.throws(() => addBitmap(img, ''), { code: 'EINVALID' });
  t.throws(() => addBitmap(img, 'y', { granularity: 3000 }), { code: 'EINVALID' });
  t.throws(() => addBitmap(img, 'y', { granularity: 256 }), { code: 'EINVALID' });
  t.throws(() => clearBitmap(img, 'nope'), { code: 'ENOENT' });
  t.ok(fs.readFileSync(img).equals(before), 'the image is byte for byte unchanged');
});

t.test('diff check counts bitmap clusters as qemu-img check does, and its repair drops a stale extension', { skip }, async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, '16M');
  qemuImgOk('bitmap', '--add', img, 'a');
  qemuImgOk('bitmap', '--add', '-g', '512', img, 'b');
  qemuWrites(img, [
    [0, 1 * MiB],
    [12 * MiB, 4 * KiB],
  ]);
  const clean = checkImage(img);
  t.equal(clean.exitCode, 0, `a QEMU image with bitmaps is clean: ${clean.messages.join('; ')}`);
  t.equal(qemuCheck(img).status, 0, 'qemu-img check agrees');

  poke(img, 95, [0]); // autoclear bit 0 cleared: the extension is stale
  const stale = checkImage(img);
  const q = qemuCheck(img);
  t.equal(stale.exitCode, 3, 'stale bitmap clusters are leaks');
  t.equal(stale.leaks, q.result?.leaks, `as many leaks as qemu-img check counts (${q.result?.leaks})`);
  const repaired = checkImage(img, { repair: true });
  t.equal(repaired.leaksFixed, stale.leaks, 'repair frees them');
  t.equal(qemuCheck(img).status, 0, 'qemu-img check is clean after our repair');
  t.same(qemuBitmaps(img), [], 'and the stale extension is gone');
  t.equal(listBitmaps(img).state, 'none');

  const img2 = path.join(dir, 'b.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', img2, '16M');
  qemuImgOk('bitmap', '--add', img2, 'a');
  qemuWrites(img2, [[0, 4 * KiB]]);
  const f = BlockFile.open(img2, { lock: 'shared' });
  const head = Buffer.alloc(8);
  f.readFullSync(head, directoryOffset(img2));
  f.close();
  poke(img2, Number(head.readBigUInt64BE(0)) + 7, [0x03]); // all-ones bit with an offset
  const bad = checkImage(img2);
  t.equal(bad.exitCode, 2, 'a bad table entry is a corruption');
  t.match(bad.messages.join('\n'), /bitmap 'a' table entry 0/);
  t.not(qemuCheck(img2).status, 0, 'qemu-img check: not clean either');
});
