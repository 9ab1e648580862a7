/**
 * The walk over a qcow2 file's refcount and L1 tables skips the stretches of zero entries
 * natively (metadata.ts, nonzeroEntries): it must still see every entry that is not zero,
 * wherever it lies, so that open refuses a bad one deep in an otherwise empty table.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { nonzeroEntries } from '../src/image/qcow2/metadata';
import { Qcow2Image } from '../src/image/qcow2/image';
import { needQemu, qemuImgOk, qemuIo } from './helpers/qemu';

/** The entries that are not all zeros, one at a time. */
function model(table: Buffer): number[] {
  const out: number[] = [];
  for (let i = 0; i + 8 <= table.length; i += 8) if (!table.subarray(i, i + 8).equals(Buffer.alloc(8))) out.push(i / 8);
  return out;
}

t.test('nonzeroEntries finds every non-zero entry, in order, at any position and table size', async (t) => {
  let x = 12345;
  const next = (n: number): number => {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0;
    return x % n;
  };
  for (const entries of [0, 1, 2, 31, 32, 33, 64, 100, 8191, 8192, 8193, 65536]) {
    for (const density of [0, 1, 5, 300]) {
      const table = Buffer.alloc(entries * 8);
      for (let k = 0; k < density && entries > 0; k++) {
        // a single bit anywhere in the entry: flag bits alone count as "not zero"
        const at = next(entries) * 8 + next(8);
        table[at] |= 1 << next(8);
      }
      t.same(nonzeroEntries(table), model(table), `${entries} entries, ${density} set`);
    }
  }
  const edges = Buffer.alloc(8192 * 8);
  edges[7] = 1; // the last byte of the first entry
  edges[8191 * 8] = 0x80; // the first byte of the last entry
  edges[4096 * 8 + 3] = 2; // the middle, where the halving splits
  t.same(nonzeroEntries(edges), [0, 4096, 8191]);
});

const skip = needQemu();

t.test('open refuses a bad refcount table entry or L1 entry far inside a zero stretch', { skip }, async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'a.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', file, '64G');
  qemuIo(file, ['write -P 0x11 0 64k']);
  const head = fs.readFileSync(file).subarray(0, 72);
  const l1 = Number(head.readBigUInt64BE(40));
  const l1Size = head.readUInt32BE(36);
  const reftable = Number(head.readBigUInt64BE(48));
  t.ok(l1Size > 100, `an L1 table of ${l1Size} entries`);
  const patched = (at: number, value: bigint): string => {
    const copy = path.join(dir, `p-${at}.qcow2`);
    fs.copyFileSync(file, copy);
    const fd = fs.openSync(copy, 'r+');
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(value);
    fs.writeSync(fd, b, 0, 8, at);
    fs.closeSync(fd);
    return copy;
  };
  const refBad = patched(reftable + 8000 * 8, 0x12345n);
  t.throws(() => Qcow2Image.open(refBad), { code: 'ECORRUPT', message: /refcount table entry 8000 is 74240: not cluster aligned/ });
  const l1Bad = patched(l1 + (l1Size - 3) * 8, 0x10000n * 100000n);
  t.throws(() => Qcow2Image.open(l1Bad), { code: 'ECORRUPT', message: new RegExp(`L1 entry ${l1Size - 3} points to an L2 table at ${0x10000 * 100000}, past the end of the file`) });
  const img = Qcow2Image.open(file);
  t.equal(img.virtualSize, 64 * 2 ** 30, 'the image as QEMU wrote it opens');
  img.close();
});
