/**
 * Table entries used for I/O are validated before a byte is returned or written: an L2
 * entry that is not cluster aligned, points into the header cluster, at other metadata, or
 * past the end of the file makes read and write fail with ECORRUPT, and a refused write
 * leaves the file byte for byte as it was. QEMU is the oracle: its check reports each of
 * these images as corrupt, and qemu-io refuses to read the unaligned ones.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Qcow2Image } from '../src/image/qcow2/image';
import { needQemu, qemuCheck, qemuImgOk, qemuIo, run, sha256 } from './helpers/qemu';

const skip = needQemu();
const KiB = 1024;

/** A 1 MiB image, 64 KiB clusters, guest clusters 0 and 1 written; returns the file offset of L2 entry 0. */
function makeImage(dir: string): { file: string; l2Entry0: number } {
  const file = path.join(dir, 'a.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', file, '1M');
  qemuIo(file, ['write -P 0x11 0 64k', 'write -P 0x22 64k 64k']);
  const b = fs.readFileSync(file);
  const l1 = Number(b.readBigUInt64BE(40));
  const l2 = Number(b.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
  return { file, l2Entry0: l2 };
}

function patchEntry(file: string, at: number, value: bigint): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(value);
    fs.writeSync(fd, b, 0, 8, at);
  } finally {
    fs.closeSync(fd);
  }
}

const COPIED = 1n << 63n;
const cases: { name: string; value: (l2: number) => bigint; message: RegExp; qemuReadFails: boolean }[] = [
  { name: 'not cluster aligned (0x81000)', value: () => COPIED | 0x81000n, message: /not cluster aligned/, qemuReadFails: true },
  { name: 'inside the header cluster (0x200)', value: () => COPIED | 0x200n, message: /not cluster aligned/, qemuReadFails: true },
  { name: 'on the L2 table itself', value: (l2) => COPIED | BigInt(l2), message: /holds metadata/, qemuReadFails: false },
  { name: 'past the end of the file', value: () => COPIED | 0x4000000n, message: /past the end of the file/, qemuReadFails: false },
];

for (const c of cases) {
  t.test(`an L2 entry ${c.name}: read and write fail with ECORRUPT, nothing written`, { skip }, async (t) => {
    const dir = t.testdir();
    const { file, l2Entry0 } = makeImage(dir);
    const l2 = l2Entry0;
    patchEntry(file, l2Entry0, c.value(l2));

    const qc = qemuCheck(file);
    t.equal(qc.status, 2, `qemu-img check reports corruption: ${qc.text.split('\n')[0]}`);
    if (c.qemuReadFails) {
      // on a copy: QEMU sets the corrupt bit in the image it refuses
      const copy = path.join(dir, 'copy.qcow2');
      fs.copyFileSync(file, copy);
      const r = run('qemu-io', ['-f', 'qcow2', '-c', 'read 0 64k', copy]);
      t.match(r.stdout + r.stderr, /unaligned|corrupt|failed/i, 'qemu-io refuses to read it');
    }
    const before = sha256(file);

    const ro = Qcow2Image.open(file);
    t.throws(() => ro.readSync(Buffer.alloc(64 * KiB), 0), { code: 'ECORRUPT', message: c.message }, 'read of the cluster');
    t.throws(() => ro.readSync(Buffer.alloc(4 * KiB), 64 * KiB), { code: 'ECORRUPT' }, 'read of a neighbour in the same L2 table');
    ro.close();

    const rw = Qcow2Image.open(file, { write: true });
    t.throws(() => rw.writeSync(Buffer.alloc(4 * KiB, 0x77), 4 * KiB), { code: 'ECORRUPT', message: c.message }, 'partial write into the cluster');
    t.throws(() => rw.writeSync(Buffer.alloc(64 * KiB, 0x77), 0), { code: 'ECORRUPT' }, 'whole-cluster write');
    t.throws(() => rw.writeSync(Buffer.alloc(4 * KiB, 0x77), 128 * KiB), { code: 'ECORRUPT' }, 'write of an unallocated cluster mapped by the same table');
    t.throws(() => rw.writeZeroesSync(0, 64 * KiB), { code: 'ECORRUPT' }, 'write zeroes');
    rw.close();
    t.equal(sha256(file), before, 'the file is byte for byte unchanged');
  });
}

t.test('the metadata cluster set answers hasFast as a Set would, through adds, deletes and clears after its bit array was built', async (t) => {
  const { ClusterSet } = await import('../src/image/qcow2/refcounts');
  const s = new ClusterSet();
  const ref = new Set<number>();
  let x = 7;
  const rnd = (n: number) => ((x = (x * 1103515245 + 12345) % 2 ** 31) % n);
  let wrong = 0;
  for (let step = 0; step < 20_000; step++) {
    const r = rnd(100);
    // mostly small indices, some past the bit array's current end, a few past its limit
    const c = r < 2 ? 2 ** 27 + rnd(1000) : rnd(r < 20 ? 1 << 20 : 4096);
    if (r < 50) (s.add(c), ref.add(c));
    else if (r < 70) (s.delete(c), ref.delete(c));
    else if (r === 99 && rnd(50) === 0) (s.clear(), ref.clear());
    else if (s.hasFast(c) !== ref.has(c)) wrong++;
    if (step % 997 === 0) for (const v of [0, 1, 4095, 2 ** 27, ...ref]) if (s.hasFast(v) !== ref.has(v)) wrong++;
  }
  t.equal(wrong, 0, 'no lookup differs from the Set');
  t.equal(s.size, ref.size);
});
