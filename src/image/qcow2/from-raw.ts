/**
 * A standalone qcow2 v3 image (no backing file) of a sparse raw file's bytes, for the
 * commands that write qcow2 output: `snapshot restore --to FILE --format qcow2` (the snapshot
 * restored to a raw file first, ../../storage/restore.ts, which verifies every block) and
 * `diff flatten CHILD OUT --format qcow2` (the chain flattened to raw first,
 * ../../differencing/flatten.ts). The raw file's data extents are copied cluster by cluster
 * through the qcow2 writer, skipping all-zero clusters so that zero blocks stay unallocated.
 *
 * Deliberately simple: the data is written twice (raw, then qcow2); the callers keep both
 * files under temporary names beside the target until the image is complete and flushed.
 */
import * as fs from 'node:fs';
import { BlockFile } from '../../engine/file';
import { createQcow2 } from './create';
import { Qcow2Image } from './image';

/** Bytes copied per read. */
const COPY_BYTES = 4 * 1024 * 1024;

/** Writes a new qcow2 image `out` (which must not exist) showing the bytes of raw file `raw`. */
export function rawToQcow2(raw: string, out: string, size: number): void {
  createQcow2(out, { size });
  const src = BlockFile.open(raw, { lock: 'shared' });
  let img: Qcow2Image | undefined;
  try {
    img = Qcow2Image.open(out, { write: true });
    const cs = img.clusterSize;
    const buf = Buffer.alloc(COPY_BYTES);
    for (const e of src.extents(0, size)) {
      // whole clusters, so that each one is either written whole or left unallocated
      let pos = Math.floor(e.offset / cs) * cs;
      const end = Math.min(size, Math.ceil((e.offset + e.length) / cs) * cs);
      while (pos < end) {
        const n = Math.min(buf.length, end - pos);
        src.readFullSync(buf.subarray(0, n), pos);
        for (let c = 0; c < n; c += cs) {
          const piece = buf.subarray(c, Math.min(n, c + cs));
          if (!isZero(piece)) img.writeSync(piece, pos + c);
        }
        pos += n;
      }
    }
    img.close();
    img = undefined;
  } catch (e) {
    img?.close();
    fs.rmSync(out, { force: true });
    throw e;
  } finally {
    src.close();
  }
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i += 8) {
    if (i + 8 <= b.length ? b.readBigUInt64LE(i) !== 0n : b.subarray(i).some((x) => x !== 0)) return false;
  }
  return true;
}
