/**
 * Every disksnap write into a qcow2 image keeps QEMU's persistent dirty bitmaps: the
 * enabled ones record the written range, the autoclear bit stays set, `qemu-img check` is
 * clean, QEMU prints no "inconsistent" warning and goes on updating them. An image whose
 * enabled bitmap disksnap cannot maintain is refused for writing, naming the bitmap.
 */
import t, { Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { Qcow2Image } from '../src/image/qcow2/image';
import { encodeBitmapDirectory, FLAG_EXTRA_DATA_COMPATIBLE } from '../src/image/qcow2/bitmaps';
import { listBitmaps } from '../src/image/qcow2/bitmap-file';
import { assertClean, pattern, qemuImgOk, qemuIo, run } from './helpers/qemu';
import { granules, needQemuNbd, qemuBitmaps, qemuDirtyRanges, Range } from './helpers/qemu-bitmaps';
import { cli, ROOT } from './helpers/cli';

const KiB = 1024;
const MiB = 2 ** 20;
const skip = needQemuNbd();

/** An image with two enabled bitmaps (64 KiB and 512 B granules) and a disabled one, and some QEMU writes. */
function qemuImage(dir: string, size = 32 * MiB, extra: string[] = []): { img: string; qemuWrites: Range[] } {
  const img = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', ...extra, img, String(size));
  qemuImgOk('bitmap', '--add', '-g', '64K', img, 'coarse');
  qemuImgOk('bitmap', '--add', '-g', '512', img, 'fine');
  qemuImgOk('bitmap', '--add', '--disable', img, 'off');
  qemuIo(img, ['write -P 0x33 3M 4k']);
  return { img, qemuWrites: [{ offset: 3 * MiB, length: 4 * KiB }] };
}

/** qemu-img info as QEMU opens the image: no warning about inconsistent bitmaps, no in-use flag. */
function assertConsistent(t: Test, img: string, phase: string): void {
  const r = run('qemu-img', ['info', img]);
  t.equal(r.status, 0, `${phase}: qemu-img info opens it`);
  t.notMatch(r.stderr + r.stdout, /inconsistent|lacking bitmap support|in-use/, `${phase}: QEMU says nothing about inconsistent bitmaps`);
  t.same(
    qemuBitmaps(img).map((b) => b.flags),
    [['auto'], ['auto'], []],
    `${phase}: the enabled bitmaps are consistent, the disabled one untouched`,
  );
}

async function assertCovers(t: Test, img: string, writes: Range[], size: number, phase: string): Promise<void> {
  for (const [name, g] of [['coarse', 64 * KiB], ['fine', 512]] as const) {
    t.same(await qemuDirtyRanges(img, name), granules(writes, g, size), `${phase}: QEMU's ${name} bitmap holds exactly the written granules`);
  }
  t.same(await qemuDirtyRanges(img, 'off'), [], `${phase}: the disabled bitmap stays empty`);
}

t.test('disksnap write into an image with QEMU bitmaps: check clean, no warning, the bitmaps cover the range', { skip }, async (t) => {
  const dir = t.testdir();
  const size = 32 * MiB;
  const { img, qemuWrites } = qemuImage(dir, size);
  const data = pattern(70 * KiB, 3);
  const input = path.join(dir, 'in.bin');
  fs.writeFileSync(input, data);
  const r = cli(['write', img, String(63 * KiB), '-i', input]);
  t.equal(r.status, 0, `disksnap write: ${r.stderr}`);
  assertClean(t, img, 'after disksnap write');
  assertConsistent(t, img, 'after disksnap write');
  const writes = [...qemuWrites, { offset: 63 * KiB, length: data.length }];
  await assertCovers(t, img, writes, size, 'after disksnap write');
  const back = Buffer.alloc(data.length);
  const im = Qcow2Image.open(img);
  im.readSync(back, 63 * KiB);
  im.close();
  t.ok(back.equals(data), 'the data is there');
  qemuIo(img, ['write -P 0x44 20M 1k']);
  writes.push({ offset: 20 * MiB, length: KiB });
  await assertCovers(t, img, writes, size, 'QEMU goes on updating them');
  assertClean(t, img, 'after QEMU wrote again');
});

t.test('every Qcow2Image write path marks the bitmaps: in-place, allocating, batched, zeroes', { skip }, async (t) => {
  const dir = t.testdir();
  const size = 24 * MiB + 512; // not a multiple of the cluster size
  const { img, qemuWrites } = qemuImage(dir, size, ['-o', 'cluster_size=4096']);
  const writes = [...qemuWrites];
  const im = Qcow2Image.open(img, { write: true });
  im.writeSync(pattern(100, 1), 3 * MiB + 100); // in place (QEMU's cluster)
  writes.push({ offset: 3 * MiB + 100, length: 100 });
  im.writeSync(pattern(9 * KiB, 2), 16 * MiB - 5 * KiB); // allocating, crossing a bitmap data cluster of 'fine'
  writes.push({ offset: 16 * MiB - 5 * KiB, length: 9 * KiB });
  const buf = pattern(3 * KiB, 4);
  im.writeBatchSync(buf, Float64Array.from([7 * MiB, 0, KiB, 9 * MiB + 1, KiB, 2 * KiB]));
  writes.push({ offset: 7 * MiB, length: KiB }, { offset: 9 * MiB + 1, length: 2 * KiB });
  im.writeZeroesSync(12 * MiB, 1 * MiB);
  writes.push({ offset: 12 * MiB, length: MiB });
  im.writeSync(pattern(512, 5), size - 512); // the last sector
  writes.push({ offset: size - 512, length: 512 });
  im.flushSync();
  t.same(qemuBitmaps(img).map((b) => b.flags), [['auto'], ['auto'], []], 'after a flush no bitmap is in use (qemu-img info -U, the image still open)');
  im.writeSync(pattern(10, 6), 5 * MiB); // after the flush: a new session
  writes.push({ offset: 5 * MiB, length: 10 });
  im.close();
  assertClean(t, img, 'after the writes');
  assertConsistent(t, img, 'after the writes');
  await assertCovers(t, img, writes, size, 'after the writes');
});

t.test('a writer killed before it saved the bitmaps leaves them in use, never silently wrong', { skip }, async (t) => {
  const dir = t.testdir();
  const { img } = qemuImage(dir);
  const script = `
    const { Qcow2Image } = require(${JSON.stringify(path.join(ROOT, 'dist', 'src', 'image', 'qcow2', 'image.js'))});
    const im = Qcow2Image.open(${JSON.stringify(img)}, { write: true });
    im.writeSync(Buffer.alloc(4096, 7), 8 * 1048576);
    process.kill(process.pid, 'SIGKILL');`;
  const r = spawnSync(process.execPath, ['-e', script]);
  t.equal(r.signal, 'SIGKILL', `the writer died: ${r.stderr}`);
  t.same(
    qemuBitmaps(img).map((b) => b.flags),
    [['in-use', 'auto'], ['in-use', 'auto'], []],
    'QEMU sees the enabled bitmaps in use (inconsistent), the disabled one untouched',
  );
  t.equal(run('qemu-img', ['check', img]).status === 2, false, 'no corruption (leaks at most)');
});

t.test('an enabled bitmap disksnap cannot maintain refuses the write open, naming it, and changes nothing', { skip }, async (t) => {
  const dir = t.testdir();
  const { img } = qemuImage(dir);
  // Give 'fine' 8 bytes of extra data (marked compatible), as a newer QEMU might.
  const head = fs.readFileSync(img).subarray(0, 65536);
  let pos = head.readUInt32BE(100);
  let extAt = -1;
  for (;;) {
    const type = head.readUInt32BE(pos);
    if (type === 0) break;
    if (type === 0x23852875) extAt = pos + 8;
    pos += 8 + Math.ceil(head.readUInt32BE(pos + 4) / 8) * 8;
  }
  const dirOffset = Number(head.readBigUInt64BE(extAt + 16));
  const entries = listBitmaps(img).bitmaps;
  t.equal(entries.length, 3);
  const fd = fs.openSync(img, 'r+');
  const old = Buffer.alloc(Number(head.readBigUInt64BE(extAt + 8)));
  fs.readSync(fd, old, 0, old.length, dirOffset);
  // re-encode: same entries, 'fine' with extra data
  const parsed: { tableOffset: number; tableSize: number; flags: number; granularityBits: number; name: string }[] = [];
  for (let p = 0; p < old.length; ) {
    const nameSize = old.readUInt16BE(p + 18);
    const extra = old.readUInt32BE(p + 20);
    parsed.push({
      tableOffset: Number(old.readBigUInt64BE(p)),
      tableSize: old.readUInt32BE(p + 8),
      flags: old.readUInt32BE(p + 12),
      granularityBits: old[p + 17],
      name: old.toString('utf8', p + 24 + extra, p + 24 + extra + nameSize),
    });
    p += Math.ceil((24 + nameSize + extra) / 8) * 8;
  }
  const dirBuf = encodeBitmapDirectory(
    parsed.map((e) => ({
      ...e,
      flags: e.name === 'fine' ? e.flags | FLAG_EXTRA_DATA_COMPATIBLE : e.flags,
      inUse: false,
      auto: true,
      type: 1,
      granularity: 2 ** e.granularityBits,
      extraData: e.name === 'fine' ? Buffer.alloc(8, 1) : Buffer.alloc(0),
    })),
  );
  fs.writeSync(fd, dirBuf, 0, dirBuf.length, dirOffset);
  const size = Buffer.alloc(8);
  size.writeBigUInt64BE(BigInt(dirBuf.length));
  fs.writeSync(fd, size, 0, 8, extAt + 8);
  fs.closeSync(fd);
  const before = fs.readFileSync(img);
  t.throws(() => Qcow2Image.open(img, { write: true }), { code: 'EUNSUPPORTED', message: /bitmap 'fine'/ });
  const r = cli(['write', img, '0', '-i', '/dev/null']);
  t.equal(r.status, 1, 'disksnap write fails');
  t.match(r.stderr, /bitmap 'fine'/, 'and names the bitmap');
  t.ok(fs.readFileSync(img).equals(before), 'the image is byte for byte unchanged');
  const ro = Qcow2Image.open(img);
  ro.close();
  t.pass('it still opens for reading');
});
