/**
 * Files disksnap keeps beside images:
 *
 *   PARENT.disksnap-children.json  registry of a parent's children (registry.ts)
 *   CHILD.disksnap-commit.json     a commit of CHILD into its parent is in progress (diff.ts);
 *                                  while it exists the child opens only for the commit
 *
 * Both are JSON written to a temporary name and renamed, so a reader sees the old or the
 * new content, never a mix.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DisksnapError, fromNodeError, busy } from '../engine/errors';
import { syncDir, tempNameFor } from '../engine/atomic';

export function childrenRegistryPath(parent: string): string {
  return `${parent}.disksnap-children.json`;
}

export function commitMarkerPath(child: string): string {
  return `${child}.disksnap-commit.json`;
}

/** Writes JSON to `file` atomically (temporary name, fsync, rename, fsync of the directory). */
export function writeJsonAtomic(file: string, value: unknown): void {
  const tmp = tempNameFor(file);
  try {
    const fd = fs.openSync(tmp, 'wx', 0o644);
    try {
      fs.writeSync(fd, JSON.stringify(value, null, 2) + '\n');
      fs.fsyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    fs.renameSync(tmp, file);
    syncDir(path.dirname(file));
  } catch (e) {
    fs.rmSync(tmp, { force: true });
    throw fromNodeError(e, file);
  }
}

export function readJson<T>(file: string): T | undefined {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw fromNodeError(e, file);
  }
  return JSON.parse(text) as T;
}
