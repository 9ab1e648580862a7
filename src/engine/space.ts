/**
 * Space a file or a tree really occupies on disk (st_blocks), as the strategies and the
 * comparison report count it: holes are free, shared extents count once per file.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fromNodeError } from './errors';
import { native } from './native';
import { BlockFile } from './file';

/** Bytes a file occupies on disk (st_blocks * 512). */
export function allocatedBytes(file: string): number {
  try {
    return fs.lstatSync(file).blocks * 512;
  } catch (e) {
    throw fromNodeError(e, file);
  }
}

/** Bytes everything under a directory occupies (hard links counted once). */
export function treeAllocatedBytes(dir: string, skip: Set<string> = new Set()): number {
  const seen = new Set<string>();
  let total = 0;
  const walk = (p: string): void => {
    if (skip.has(path.resolve(p))) return;
    let st: fs.Stats;
    try {
      st = fs.lstatSync(p);
    } catch {
      return; // removed while we walked
    }
    const id = `${st.dev}:${st.ino}`;
    if (seen.has(id)) return;
    seen.add(id);
    total += st.blocks * 512;
    if (st.isDirectory()) for (const name of fs.readdirSync(p)) walk(path.join(p, name));
  };
  walk(dir);
  return total;
}

/** FIEMAP extent flags that matter here (linux/fiemap.h). */
const FIEMAP_EXTENT_UNKNOWN = 0x2;
const FIEMAP_EXTENT_DELALLOC = 0x4;
const FIEMAP_EXTENT_DATA_INLINE = 0x200;

/**
 * Bytes of disk the files occupy together, each physical extent counted once however many of
 * them share it (reflink clones): the union of their FIEMAP extents. st_blocks counts a
 * shared extent in every file that maps it, so N clones of an image would look N times its
 * size. An extent without a known place (delayed allocation, inline data) counts in full.
 */
export function physicalBytes(files: string[]): number {
  const ranges: Array<[number, number]> = [];
  let unplaced = 0;
  for (const file of files) {
    const f = BlockFile.open(file, { lock: 'none' });
    try {
      const q = native().fiemap(f.fd, 0, f.size());
      for (let i = 0; i < q.length; i += 4) {
        const [physical, length, flags] = [q[i + 1], q[i + 2], q[i + 3]];
        if (flags & (FIEMAP_EXTENT_UNKNOWN | FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_DATA_INLINE)) unplaced += length;
        else ranges.push([physical, physical + length]);
      }
    } finally {
      f.close();
    }
  }
  ranges.sort((a, b) => a[0] - b[0]);
  let total = unplaced;
  let end = -1;
  for (const [a, b] of ranges) {
    if (b <= end) continue;
    total += b - Math.max(a, end);
    end = b;
  }
  return total;
}
