/**
 * File helpers of `compare`: content hashes of what an image shows (the byte-exact checks),
 * allocated space (st_blocks, what the disk really gives up), and copies that share extents
 * where the filesystem can (FICLONE) and otherwise copy only the data extents (holes stay
 * holes), so that working copies cost as little as possible.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { BlockFile } from '../engine/file';
import { native } from '../engine/native';
import { DiskImage } from '../image';
import { fromNodeError } from '../engine/errors';
import { yieldLoop } from './workload';

const CHUNK = 8 * 2 ** 20;

export interface ContentHash {
  sha256: string;
  bytes: number;
  /** time spent reading (hashing excluded) */
  seconds: number;
}

/**
 * SHA-256 of the whole guest view of an image, read front to back through the image's own
 * read path (so for a child, through its chain). The read time alone is a sequential-read
 * figure.
 */
export async function hashImage(image: DiskImage, onProgress?: (done: number, total: number) => void): Promise<ContentHash> {
  const h = createHash('sha256');
  const buf = Buffer.alloc(Math.min(CHUNK, image.virtualSize));
  let ns = 0n;
  for (let pos = 0; pos < image.virtualSize; pos += buf.length) {
    const n = Math.min(buf.length, image.virtualSize - pos);
    const view = buf.subarray(0, n);
    const t0 = process.hrtime.bigint();
    await image.read(view, pos);
    ns += process.hrtime.bigint() - t0;
    h.update(view);
    onProgress?.(pos + n, image.virtualSize);
  }
  return { sha256: h.digest('hex'), bytes: image.virtualSize, seconds: Number(ns) / 1e9 };
}

/** SHA-256 of a raw file's bytes (holes read as zeros), without the DiskImage layer. */
export async function hashFile(file: string): Promise<string> {
  const f = BlockFile.open(file, { lock: 'none' });
  try {
    const size = f.size();
    const h = createHash('sha256');
    const buf = Buffer.alloc(Math.min(CHUNK, Math.max(size, 1)));
    for (let pos = 0; pos < size; pos += buf.length) {
      const n = Math.min(buf.length, size - pos);
      const view = buf.subarray(0, n);
      const got = await f.read(view, pos);
      if (got < n) view.fill(0, got);
      h.update(view);
      if ((pos / buf.length) % 16 === 15) await yieldLoop();
    }
    return h.digest('hex');
  } finally {
    f.close();
  }
}

/**
 * Reads a file's data extents once so that the page cache holds them, when they fit
 * comfortably in free memory: every strategy then starts from the same warm state, as the
 * user's running volume would be. Larger images are measured as they come.
 */
export async function warm(file: string): Promise<boolean> {
  const f = BlockFile.open(file, { lock: 'none' });
  try {
    const st = f.stat();
    if (st.allocated > os.freemem() / 4) return false;
    const buf = Buffer.alloc(CHUNK);
    for (const e of f.extents()) {
      for (let pos = 0; pos < e.length; pos += CHUNK) {
        await f.read(buf.subarray(0, Math.min(CHUNK, e.length - pos)), e.offset + pos);
      }
    }
    return true;
  } finally {
    f.close();
  }
}

export { allocatedBytes, treeAllocatedBytes } from '../engine/space';

export interface CopyResult {
  /** true when the copy shares extents with the source (reflink) */
  cloned: boolean;
  bytes: number;
}

/**
 * Copies a raw file to a new file `dst` (which must not exist): a reflink where the
 * filesystem supports it, else copy_file_range of each data extent, leaving holes as holes.
 * The source is opened with a shared lock, so a writer holding it is refused (ELOCKED).
 */
export async function copySparse(src: string, dst: string): Promise<CopyResult> {
  const n = native();
  const input = BlockFile.open(src, { lock: 'shared' });
  try {
    const out = BlockFile.open(dst, { create: true, exclusive: true, lock: 'none' });
    try {
      if (n.clone(input.fd, out.fd)) return { cloned: true, bytes: input.size() };
      const size = input.size();
      out.truncateSync(size);
      let bytes = 0;
      for (const e of input.extents(0, size)) {
        let pos = 0;
        while (pos < e.length) {
          const len = Math.min(e.length - pos, 64 * 2 ** 20);
          const got = await n.copyRangeAsync(input.fd, e.offset + pos, out.fd, e.offset + pos, len);
          if (got <= 0) break;
          pos += got;
          bytes += got;
        }
      }
      await out.sync(true);
      return { cloned: false, bytes };
    } finally {
      out.close();
    }
  } catch (e) {
    fs.rmSync(dst, { force: true });
    throw e;
  } finally {
    input.close();
  }
}
