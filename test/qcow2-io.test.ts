/**
 * Reading and writing qcow2 children through Qcow2Image, with qemu-img and qemu-io as the
 * oracle: after every phase `qemu-img check` is clean, `qemu-img compare` shows the
 * expected bytes, and the parent's bytes and mtime have not changed.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Qcow2Image } from '../src/image/qcow2/image';
import { createChild } from '../src/differencing';
import { openImage } from '../src/image';
import { native } from '../src/engine/native';
import {
  assertClean,
  assertShows,
  assertUnchanged,
  makeParent,
  needQemu,
  pattern,
  qemuImgOk,
  qemuIo,
  snapshotOf,
} from './helpers/qemu';

const KiB = 1024;
const MiB = 2 ** 20;
const skip = needQemu();

function write(img: Qcow2Image, expected: Buffer, offset: number, data: Buffer): void {
  img.writeSync(data, offset);
  data.copy(expected, offset);
}

t.test('a 2 KiB write at 63 KiB crosses a 64 KiB cluster boundary and keeps both neighbours', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, 4 * MiB);
  const child = path.join(dir, 'child.qcow2');
  await createChild(parent.file, child);
  const before = snapshotOf(parent.file);
  assertClean(t, child, 'fresh child');
  assertShows(t, child, parent.bytes, 'fresh child');

  const expected = Buffer.from(parent.bytes);
  const img = Qcow2Image.open(child, { write: true });
  write(img, expected, 63 * KiB, pattern(2 * KiB, 2));
  const back = Buffer.alloc(8 * KiB);
  img.readSync(back, 60 * KiB);
  t.same(back, expected.subarray(60 * KiB, 68 * KiB), 'disksnap reads its own write back across the boundary');
  img.close();
  assertClean(t, child, 'after the write');
  assertShows(t, child, expected, 'after the write');
  assertUnchanged(t, parent.file, before, 'after the write');
  const map = qemuImgOk('map', '--output=json', child);
  t.match(map, /"start": 0, "length": 131072, "depth": 0/, 'qemu-img map: exactly the two touched clusters are in the child');
});

t.test('writes crossing clusters and L2 tables (512-byte clusters), reopened between phases', { skip }, async (t) => {
  const dir = t.testdir();
  const size = 3 * MiB;
  const parent = makeParent(dir, size);
  const child = path.join(dir, 'child.qcow2');
  await createChild(parent.file, child, { clusterSize: 512 });
  const before = snapshotOf(parent.file);
  const expected = Buffer.from(parent.bytes);
  // one L2 table maps 64 * 512 = 32 KiB: these cross many tables and clusters
  const phases: [number, number][][] = [
    [[32 * KiB - 100, 300], [1, 1], [511, 2]],
    [[100 * KiB + 7, 200 * KiB], [size - 1000, 1000]],
    [[5000, 70 * KiB], [2 * MiB - 3, 65 * KiB + 5]],
  ];
  let seed = 10;
  for (const [i, writes] of phases.entries()) {
    const img = Qcow2Image.open(child, { write: true, l2CacheEntries: 3, refcountCacheEntries: 2 });
    for (const [off, len] of writes) write(img, expected, off, pattern(len, seed++));
    const got = Buffer.alloc(size);
    img.readSync(got, 0);
    t.ok(got.equals(expected), `phase ${i}: disksnap reads every byte as expected before closing`);
    img.close();
    assertClean(t, child, `phase ${i}`);
    assertShows(t, child, expected, `phase ${i}`);
    assertUnchanged(t, parent.file, before, `phase ${i}`);
  }
});

t.test('an image size that is not a multiple of the cluster size: writes up to the last byte', { skip }, async (t) => {
  const dir = t.testdir();
  // not a multiple of the 4 KiB cluster; a multiple of 512 because QEMU sizes qcow2 images
  // in sectors (qemu-img compare would see 1234 extra bytes as a size mismatch)
  const size = MiB + 1536;
  const parent = makeParent(dir, size);
  const child = path.join(dir, 'child.qcow2');
  await createChild(parent.file, child, { clusterSize: 4096 });
  const before = snapshotOf(parent.file);
  const expected = Buffer.from(parent.bytes);
  const img = Qcow2Image.open(child, { write: true });
  t.equal(img.virtualSize, size);
  write(img, expected, size - 5000, pattern(5000, 3));
  write(img, expected, size - 1, Buffer.from([0x5a]));
  img.writeZeroesSync(size - 100, 100);
  expected.fill(0, size - 100);
  t.throws(() => img.writeSync(Buffer.alloc(2), size - 1), { code: 'EINVALID' }, 'a write past the end is refused before any I/O');
  img.close();
  assertClean(t, child, 'after writes at the end');
  assertShows(t, child, expected, 'after writes at the end');
  assertUnchanged(t, parent.file, before, 'after writes at the end');
});

t.test('zero writes read as zero over the parent and give allocated clusters back', { skip }, async (t) => {
  const dir = t.testdir();
  const size = 2 * MiB;
  const parent = makeParent(dir, size);
  const child = path.join(dir, 'child.qcow2');
  await createChild(parent.file, child, { clusterSize: 4096 });
  const before = snapshotOf(parent.file);
  const expected = Buffer.from(parent.bytes);
  let img = Qcow2Image.open(child, { write: true });
  write(img, expected, 0, pattern(256 * KiB, 4));
  img.close();
  assertClean(t, child, 'data written');
  const allocatedBefore = fs.statSync(child).blocks;

  img = Qcow2Image.open(child, { write: true });
  img.writeZeroesSync(1000, 200 * KiB); // partial head, whole clusters, partial tail
  expected.fill(0, 1000, 1000 + 200 * KiB);
  img.writeZeroesSync(MiB, 512 * KiB); // never written: zero clusters over the parent
  expected.fill(0, MiB, MiB + 512 * KiB);
  img.discardSync(1.75 * MiB, 4096);
  expected.fill(0, 1.75 * MiB, 1.75 * MiB + 4096);
  img.close();
  assertClean(t, child, 'after zero writes');
  assertShows(t, child, expected, 'after zero writes');
  assertUnchanged(t, parent.file, before, 'after zero writes');
  t.ok(fs.statSync(child).blocks < allocatedBefore, 'freed clusters were punched out of the file');
  const map = JSON.parse(qemuImgOk('map', '--output=json', child)) as { start: number; length: number; zero: boolean; depth: number }[];
  t.ok(map.some((e) => e.zero && e.depth === 0 && e.start <= MiB && e.start + e.length >= 1.5 * MiB), 'qemu sees zero clusters in the child');

  // freed clusters are reused by later writes: the file does not grow
  const sizeBefore = fs.statSync(child).size;
  img = Qcow2Image.open(child, { write: true });
  write(img, expected, 8192, pattern(100 * KiB, 5));
  img.close();
  t.equal(fs.statSync(child).size, sizeBefore, 'writes reuse the freed clusters');
  assertClean(t, child, 'after reuse');
  assertShows(t, child, expected, 'after reuse');
});

t.test('qemu-io writes read back by disksnap, and disksnap writes read back by qemu-io', { skip }, async (t) => {
  const dir = t.testdir();
  const size = 4 * MiB;
  const parent = makeParent(dir, size);
  const child = path.join(dir, 'child.qcow2');
  await createChild(parent.file, child);
  const before = snapshotOf(parent.file);
  qemuIo(child, ['write -P 0xa5 100k 70k', 'write -z 1M 128k', 'write -P 0x3c 3M 4k']);
  assertClean(t, child, 'after qemu-io writes');
  const expected = Buffer.from(parent.bytes);
  expected.fill(0xa5, 100 * KiB, 170 * KiB);
  expected.fill(0, MiB, MiB + 128 * KiB);
  expected.fill(0x3c, 3 * MiB, 3 * MiB + 4 * KiB);
  const img = Qcow2Image.open(child, { write: true });
  const got = Buffer.alloc(size);
  img.readSync(got, 0);
  t.ok(got.equals(expected), 'disksnap reads what qemu-io wrote (data, zero clusters, parent elsewhere)');
  img.writeSync(Buffer.alloc(10 * KiB, 0x77), 165 * KiB); // over qemu's cluster and beyond
  expected.fill(0x77, 165 * KiB, 175 * KiB);
  img.writeSync(Buffer.alloc(3, 0x11), MiB + 5);
  expected.fill(0x11, MiB + 5, MiB + 8);
  img.close();
  qemuIo(child, ['read -P 0x77 165k 10k', 'read -P 0xa5 100k 65k', 'read -P 0x11 1048581 3', 'read -P 0 1048584 100']);
  t.pass('qemu-io reads disksnap writes with the expected patterns');
  assertClean(t, child, 'after disksnap writes');
  assertShows(t, child, expected, 'after disksnap writes');
  assertUnchanged(t, parent.file, before, 'after both');
});

t.test('images made by qemu-img create -b P -F raw open in disksnap (v3 and v2)', { skip }, async (t) => {
  const dir = t.testdir();
  const size = 2 * MiB;
  const parent = makeParent(dir, size);
  for (const compat of ['1.1', '0.10']) {
    const child = path.join(dir, `q-${compat}.qcow2`);
    qemuImgOk('create', '-q', '-f', 'qcow2', '-o', `compat=${compat},cluster_size=4096`, '-b', 'parent.raw', '-F', 'raw', child);
    qemuIo(child, ['write -P 0x42 10000 5000']);
    const expected = Buffer.from(parent.bytes);
    expected.fill(0x42, 10000, 15000);
    const img = openImage(child, { write: true });
    t.equal(img.format, 'qcow2');
    t.equal(img.info().parentGuard, 'unrecorded', `compat ${compat}: no guard (not made by disksnap)`);
    const got = Buffer.alloc(size);
    img.readSync(got, 0);
    t.ok(got.equals(expected), `compat ${compat}: disksnap reads qemu's child`);
    img.writeSync(Buffer.alloc(4097, 0x99), 14000);
    expected.fill(0x99, 14000, 18097);
    img.writeZeroesSync(64 * KiB, 64 * KiB);
    expected.fill(0, 64 * KiB, 128 * KiB);
    img.close();
    assertClean(t, child, `compat ${compat}`);
    assertShows(t, child, expected, `compat ${compat}`);
  }
});

t.test('compressed clusters (qemu-img convert -c) read back', { skip }, async (t) => {
  const dir = t.testdir();
  const raw = path.join(dir, 'src.raw');
  const bytes = Buffer.alloc(MiB);
  bytes.write('hello compressed world '.repeat(2000), 0);
  pattern(100 * KiB, 9).copy(bytes, 300 * KiB);
  fs.writeFileSync(raw, bytes);
  const comp = path.join(dir, 'comp.qcow2');
  qemuImgOk('convert', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, comp);
  const img = Qcow2Image.open(comp, { write: true });
  const got = Buffer.alloc(MiB);
  img.readSync(got, 0);
  t.ok(got.equals(bytes), 'every compressed cluster inflates to the original bytes');
  // overwriting part of a compressed cluster copies the rest from the compressed data
  const expected = Buffer.from(bytes);
  write(img, expected, 100, Buffer.from('XYZ'));
  img.close();
  assertClean(t, comp, 'after a write into a compressed cluster');
  assertShows(t, comp, expected, 'after a write into a compressed cluster');
});

t.test('a child over a shorter parent reads zeros past the parent end', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, 100 * KiB + 3);
  const child = path.join(dir, 'child.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', '-b', 'parent.raw', '-F', 'raw', child, '1M');
  const img = Qcow2Image.open(child, { write: true });
  const got = Buffer.alloc(MiB);
  img.readSync(got, 0);
  const expected = Buffer.alloc(MiB);
  parent.bytes.copy(expected);
  t.ok(got.equals(expected), 'parent bytes, then zeros');
  write(img, expected, 100 * KiB - 10, pattern(40, 3)); // COW across the parent's end
  img.close();
  assertClean(t, child, 'after a write across the parent end');
  assertShows(t, child, expected, 'after a write across the parent end');
});

t.test('the refcount table grows when a qemu-img image outgrows it (512-byte clusters)', { skip }, async (t) => {
  const dir = t.testdir();
  const img0 = path.join(dir, 'g.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', img0, '24M');
  const expected = Buffer.alloc(24 * MiB);
  const img = Qcow2Image.open(img0, { write: true, l2CacheEntries: 2, refcountCacheEntries: 2 });
  // 8 MiB is what one 512-byte refcount-table cluster covers: write well past it
  for (let i = 0; i < 12; i++) write(img, expected, i * 2 * MiB + 777, pattern(MiB + 1000, 20 + i));
  img.close();
  const info = JSON.parse(qemuImgOk('check', '--output=json', img0)) as { 'image-end-offset': number };
  t.ok(info['image-end-offset'] > 8 * MiB, 'the file grew past the first refcount table');
  assertClean(t, img0, 'after growth');
  assertShows(t, img0, expected, 'after growth');
});

t.test('async reads and batched writes/reads agree with the synchronous path', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, 2 * MiB);
  const child = path.join(dir, 'child.qcow2');
  await createChild(parent.file, child, { clusterSize: 4096 });
  const expected = Buffer.from(parent.bytes);
  const img = Qcow2Image.open(child, { write: true });
  const buf = pattern(64 * KiB, 5);
  const reqs = new Float64Array([0, 0, 4096, 4096, 4096, 4096, 100, 8192, 5000, 1.5 * MiB, 20000, 30000]);
  img.writeBatchSync(buf, reqs);
  for (let i = 0; i < reqs.length; i += 3) buf.copy(expected, reqs[i], reqs[i + 1], reqs[i + 1] + reqs[i + 2]);
  img.writeBatchSync(buf, reqs); // now all in place: one native batch
  const got = Buffer.alloc(2 * MiB);
  await img.read(got, 0);
  t.ok(got.equals(expected), 'async read of the whole image');
  const small = Buffer.alloc(3 * 5000);
  img.readBatchSync(small, new Float64Array([0, 0, 5000, 1.5 * MiB, 5000, 5000, 4000, 10000, 5000]));
  t.same(small.subarray(0, 5000), expected.subarray(0, 5000));
  t.same(small.subarray(5000, 10000), expected.subarray(1.5 * MiB, 1.5 * MiB + 5000));
  t.same(small.subarray(10000), expected.subarray(4000, 9000));
  // readBatchWith: the child's own clusters through `io` (the file's descriptor and host
  // offsets), the parent's filled before it
  const viaIo = Buffer.alloc(4 * 5000, 0xee);
  const hosts: number[] = [];
  const back = await img.readBatchWith(viaIo, new Float64Array([0, 0, 5000, 1.5 * MiB, 5000, 5000, 4000, 10000, 5000, MiB, 15000, 5000]), async (fd, host) => {
    hosts.push(host.length / 3);
    await native().preadBatchAsync(fd, viaIo, host);
    return 'done';
  });
  t.equal(back, 'done', 'readBatchWith returns what io returns');
  t.ok(viaIo.subarray(0, 15000).equals(small), 'readBatchWith reads what readBatchSync reads');
  t.ok(viaIo.subarray(15000).equals(expected.subarray(MiB, MiB + 5000)), "and the parent's bytes where the child has none");
  t.equal(hosts.length, 1, 'io is called once');
  t.ok(hosts[0] > 0 && hosts[0] < 9, `io reads the child's clusters only (${hosts[0]} host requests)`);
  await img.flush();
  img.close();
  assertClean(t, child, 'after batches');
  assertShows(t, child, expected, 'after batches');
});
