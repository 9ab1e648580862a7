/**
 * Files disksnap keeps beside images, and hooks other areas fill in:
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
import { fromNodeError } from '../errors';
import { syncDir, tempNameFor } from '../atomic';

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

/**
 * Hook for attached images (issue 6: loop devices, FUSE): refuses to modify, roll back or
 * commit an image that is attached. Until attaching exists, nothing is ever attached.
 */
export function assertNotAttached(_path: string, _what: string): void {
  // Filled in by the attach/detach work: look up the attachment registry and throw EBUSY.
}
