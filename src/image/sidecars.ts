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
import { DisksnapError, fromNodeError } from '../engine/errors';
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

/**
 * Refuses to roll back, reset, commit, repair or re-header an image that is attached to a
 * loop device (issue 6, src/host): the kernel would keep using the old bytes. Loaded lazily
 * so that the qcow2 layer does not depend on the loop layer at load time.
 * (Not called from Qcow2Image.open: the FUSE view of an attached child opens it itself.)
 */
export function assertNotAttached(path: string, what: string): void {
  let loop: { assertNotAttached?: (p: string, action: string) => void } | undefined;
  try {
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    loop = require('../host') as typeof loop;
  } catch {
    return; // a build without the loop layer: nothing can be attached
  }
  loop?.assertNotAttached?.(path, what);
}

/** Refuses only a writable attachment (a parent attached read-only may get children). */
export function assertNotAttachedWritable(path: string, what: string): void {
  let loop: { attachmentsOf?: (p: string) => { device: string; readOnly: boolean }[] } | undefined;
  try {
    // eslint-disable-next-line @typescript-eslint/no-var-requires
    loop = require('../host') as typeof loop;
  } catch {
    return;
  }
  const writable = loop?.attachmentsOf?.(path).find((a) => !a.readOnly);
  if (writable) {
    throw new DisksnapError(
      `${path} is attached read-write to ${writable.device}; the kernel could change it under its children. Detach it (\`disksnap detach ${writable.device}\`) first, then ${what} it`,
      'EBUSY',
      16,
      path,
    );
  }
}
