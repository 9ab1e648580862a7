/**
 * Changed-block tracking by rotating persistent bitmaps (bitmap-tracker.ts), with QEMU
 * writing between generations: the verdict returns exactly the granules QEMU marked, no
 * write is lost between two generations, every untrusted state falls back with a reason,
 * and qemu-img check stays clean.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { beginTracking, finishTracking, TrackingBase, TrackingStart } from '../src/image/qcow2/bitmap-tracker';
import { BlockFile } from '../src/engine/file';
import { assertClean, qemuImgOk, qemuIo, run } from './helpers/qemu';
import { granules, needQemuNbd, qemuBitmaps, qemuDirtyRanges, Range } from './helpers/qemu-bitmaps';

const KiB = 1024;
const MiB = 2 ** 20;
const skip = needQemuNbd();
const PREFIX = 'disksnap-vol-0123456789abcdef-';

function write(img: string, offset: number, length: number): Range {
  qemuIo(img, [`write -P 0x5a ${offset} ${length}`]);
  return { offset, length };
}

function baseOf(id: string, s: TrackingStart): TrackingBase {
  if (!s.added) throw new Error(`no bitmap was added: ${s.addError}`);
  return { id, virtualSize: s.added.virtualSize, granularity: s.added.granularity };
}

function image(dir: string, size = 32 * MiB): string {
  const img = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', img, String(size));
  qemuIo(img, ['write -P 0x11 0 4M']);
  return img;
}

t.test('each generation reads exactly what QEMU wrote since the previous one started, and removes the older bitmap', { skip }, async (t) => {
  const dir = t.testdir();
  const img = image(dir);
  const s1 = beginTracking(img, PREFIX, 'snap-1', undefined);
  t.equal(s1.verdict.usable, false, 'the first generation has nothing to compare with');
  t.same(qemuBitmaps(img).map((b) => [b.name, b.granularity, b.flags]), [[`${PREFIX}snap-1`, 64 * KiB, ['auto']]], 'an enabled bitmap QEMU shows');
  const w1 = [write(img, 1 * MiB + 100, 10), write(img, 20 * MiB, 200 * KiB)];
  const s2 = beginTracking(img, PREFIX, 'snap-2', baseOf('snap-1', s1));
  t.ok(s2.verdict.usable, 'the second generation can use the bitmap');
  if (s2.verdict.usable) {
    t.same(s2.verdict.ranges, granules(w1, 64 * KiB, 32 * MiB), 'exactly the written granules');
    t.equal(s2.verdict.bitmap, `${PREFIX}snap-1`);
  }
  // A write while snapshot 2 runs (after its bitmap read): it must not be lost.
  const during = write(img, 30 * MiB, 4 * KiB);
  t.same(finishTracking(img, PREFIX, 'snap-2'), [`${PREFIX}snap-1`], 'the older bitmap goes once snapshot 2 completed');
  t.same(await qemuDirtyRanges(img, `${PREFIX}snap-2`), granules([during], 64 * KiB, 32 * MiB), 'QEMU holds the write made during snapshot 2');
  const s3 = beginTracking(img, PREFIX, 'snap-3', baseOf('snap-2', s2));
  t.same(s3.verdict.usable ? s3.verdict.ranges : s3.verdict.reason, granules([during], 64 * KiB, 32 * MiB), 'snapshot 3 sees it');
  assertClean(t, img, 'after three generations');
});

t.test('a crash before finishTracking leaves the older bitmap, which still covers every change', { skip }, async (t) => {
  const dir = t.testdir();
  const img = image(dir);
  const s1 = beginTracking(img, PREFIX, 'snap-1', undefined);
  finishTracking(img, PREFIX, 'snap-1');
  const a = write(img, 2 * MiB, 1);
  // snapshot 2 starts and dies: no finishTracking, and it never completed
  beginTracking(img, PREFIX, 'snap-2', baseOf('snap-1', s1));
  const b = write(img, 5 * MiB, 1);
  // snapshot 3 compares with snapshot 1, the last completed one
  const s3 = beginTracking(img, PREFIX, 'snap-3', baseOf('snap-1', s1));
  t.same(s3.verdict.usable ? s3.verdict.ranges : s3.verdict.reason, granules([a, b], 64 * KiB, 32 * MiB), 'both writes since snapshot 1');
  t.same(finishTracking(img, PREFIX, 'snap-3').sort(), [`${PREFIX}snap-1`, `${PREFIX}snap-2`]);
  t.same(qemuBitmaps(img).map((x) => x.name), [`${PREFIX}snap-3`]);
  assertClean(t, img, 'after the abandoned generation');
});

t.test('every untrusted bitmap falls back with a reason', { skip }, async (t) => {
  const cases: [string, (img: string) => void, RegExp][] = [
    ['QEMU killed while writing', (img) => void run('qemu-io', ['-f', 'qcow2', '-c', 'write 0 64k', '-c', 'abort', img]), /in use/],
    ['bitmap removed', (img) => void qemuImgOk('bitmap', '--remove', img, `${PREFIX}snap-1`), /missing/],
    ['bitmap disabled', (img) => void qemuImgOk('bitmap', '--disable', img, `${PREFIX}snap-1`), /disabled/],
    ['image resized', (img) => void qemuImgOk('resize', '-q', img, '64M'), /virtual size changed/],
    [
      'a writer lacking bitmap support',
      (img) => {
        const fd = fs.openSync(img, 'r+');
        fs.writeSync(fd, Buffer.from([0]), 0, 1, 95); // autoclear bit 0 cleared
        fs.closeSync(fd);
      },
      /autoclear/,
    ],
  ];
  for (const [what, damage, re] of cases) {
    const dir = fs.mkdtempSync(path.join(t.testdir(), 'c-'));
    const img = image(dir);
    const s1 = beginTracking(img, PREFIX, 'snap-1', undefined);
    damage(img);
    const s2 = beginTracking(img, PREFIX, 'snap-2', baseOf('snap-1', s1));
    t.equal(s2.verdict.usable, false, `${what}: not used`);
    t.match(s2.verdict.usable ? '' : s2.verdict.reason, re, `${what}: the reason says why`);
    t.ok(s2.added, `${what}: a fresh bitmap is still added for next time`);
    t.ok(qemuBitmaps(img).some((b) => b.name === `${PREFIX}snap-2` && b.flags.join() === 'auto'), `${what}: QEMU shows it enabled and consistent`);
  }
  const dir = t.testdir();
  const img = image(dir);
  const s1 = beginTracking(img, PREFIX, 'snap-1', undefined);
  t.same(beginTracking(img, PREFIX, 'snap-2', { ...baseOf('snap-1', s1), granularity: 128 * KiB }).verdict, {
    usable: false,
    reason: `bitmap '${PREFIX}snap-1' has granularity 65536, not the 131072 it was made with`,
  });
  const holder = BlockFile.open(img, { write: true });
  try {
    const locked = beginTracking(img, PREFIX, 'snap-3', baseOf('snap-1', s1));
    t.equal(locked.verdict.usable, false, 'a locked image (a running writer): no bitmap');
    t.match(locked.addError, /ELOCKED/);
  } finally {
    holder.close();
  }
});
