/**
 * Space a file or a tree really occupies on disk (st_blocks), as the strategies and the
 * comparison report count it: holes are free, shared extents count once per file.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fromNodeError } from './errors';

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
