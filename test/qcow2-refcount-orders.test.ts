/**
 * The allocator converges for every refcount width QEMU writes (refcount_bits 1..64, i.e.
 * refcount order 0..6) and every cluster size from 512 B to 2 MiB. With order 6 a refcount
 * block covers exactly one L2 table's worth of clusters, which made a run of new clusters
 * collide with the refcount block placed inside it on every try.
 *
 * qemu-img creates each image (and qemu-io writes into it first, so existing refcount
 * blocks are updated as well as new ones made); disksnap then writes 3 MiB across clusters,
 * L2 tables and refcount blocks (growing the refcount table where it is small), a small
 * unaligned write and a zeroed range. qemu-img check must be clean and qemu-img compare
 * must show exactly the expected bytes.
 */
import t from 'tap';
import * as path from 'node:path';
import { Qcow2Image } from '../src/image/qcow2/image';
import { assertClean, assertShows, needQemu, pattern, qemuImgOk, qemuIo } from './helpers/qemu';

const skip = needQemu();
const KiB = 1024;
const MiB = 2 ** 20;
const SIZE = 6 * MiB;

for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
  t.test(`refcount_bits=${bits}: writes converge and QEMU agrees, for clusters of 512 B to 2 MiB`, { skip }, async (t) => {
    const dir = t.testdir();
    for (const cs of [512, 1024, 4096, 65536, 2 * MiB]) {
      const file = path.join(dir, `r${bits}-c${cs}.qcow2`);
      qemuImgOk('create', '-q', '-f', 'qcow2', '-o', `refcount_bits=${bits},cluster_size=${cs}`, file, String(SIZE));
      qemuIo(file, ['write -P 0x41 0 64k']);
      const expected = Buffer.alloc(SIZE);
      expected.fill(0x41, 0, 64 * KiB);

      const img = Qcow2Image.open(file, { write: true });
      const big = pattern(3 * MiB, bits * 7 + cs);
      img.writeSync(big, MiB + 3 * KiB);
      big.copy(expected, MiB + 3 * KiB);
      const small = pattern(10 * KiB, bits);
      img.writeSync(small, 5 * MiB - 5 * KiB);
      small.copy(expected, 5 * MiB - 5 * KiB);
      img.writeZeroesSync(2 * MiB, 64 * KiB);
      expected.fill(0, 2 * MiB, 2 * MiB + 64 * KiB);
      img.close();

      const back = Qcow2Image.open(file);
      const buf = Buffer.alloc(SIZE);
      back.readSync(buf, 0);
      back.close();
      t.ok(buf.equals(expected), `cluster_size=${cs}: disksnap reads back what it wrote`);
      assertClean(t, file, `cluster_size=${cs}`);
      assertShows(t, file, expected, `cluster_size=${cs}`);
    }
  });
}
