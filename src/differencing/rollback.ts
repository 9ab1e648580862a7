/**
 * `diff rollback` (the child is deleted; the parent becomes writable again when its last child
 * goes) and `diff reset` (the child is replaced by a fresh empty one: same parent, cluster
 * size and name). Both refuse while a commit of the child is unfinished: its parent is then
 * half-committed, and only re-running the commit makes it whole.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fromNodeError, busy } from '../engine/errors';
import { syncDir } from '../engine/atomic';
import { Qcow2Image } from '../image/qcow2/image';
import { commitMarkerPath } from '../image/sidecars';
import { childrenOf, removeChild } from './registry';
import { assertNotAttached } from './attached';
import { ChildInfo, lockExclusive, readChild, replaceWithEmpty } from './child';

export interface RollbackOptions {
  /** also discard the child's own children (recursively) */
  recursive?: boolean;
  /** every check a rollback makes (attached, commit unfinished, children, the lock), nothing removed */
  dryRun?: boolean;
}

export interface RollbackResult {
  removed: string[];
  parent: string;
  /** children the parent still has; when empty, the parent's mode was restored */
  remaining: string[];
  /** nothing was removed: `removed` is what would have been */
  dryRun: boolean;
}

function assertNoCommitInProgress(child: string, consequence: string): void {
  if (fs.existsSync(commitMarkerPath(child))) {
    throw busy(`${child}: a commit into its parent was interrupted; finish it with 'disksnap diff commit ${child}'${consequence}`, child);
  }
}

export function rollback(child: string, opts: RollbackOptions = {}): RollbackResult {
  assertNotAttached(child, 'roll back');
  assertNoCommitInProgress(child, ' (rolling back now would leave the parent half-committed)');
  const { parent } = readChild(child);
  const removed: string[] = [];
  const grandchildren = childrenOf(child);
  if (grandchildren.length > 0) {
    if (!opts.recursive) {
      throw busy(`${child} has children of its own (${grandchildren.join(', ')}); roll them back first, or pass --recursive to discard them too`, child);
    }
    for (const g of grandchildren) removed.push(...rollback(g, opts).removed);
  }
  const lock = lockExclusive(child);
  if (opts.dryRun) {
    lock.close();
    removed.push(child);
    const gone = new Set(removed.map((f) => path.resolve(f)));
    return { removed, parent, remaining: childrenOf(parent).filter((c) => !gone.has(path.resolve(c))), dryRun: true };
  }
  try {
    fs.unlinkSync(child);
  } catch (e) {
    throw fromNodeError(e, child);
  } finally {
    lock.close();
  }
  syncDir(path.dirname(path.resolve(child)));
  removed.push(child);
  const remaining = removeChild(parent, child);
  return { removed, parent, remaining, dryRun: false };
}

export interface ResetOptions {
  /** accept a parent that changed since the child was made */
  acceptParent?: boolean;
}

/** Replaces the child by a fresh empty child of the same parent (same name, cluster size). */
export async function reset(child: string, opts: ResetOptions = {}): Promise<ChildInfo> {
  assertNotAttached(child, 'reset');
  assertNoCommitInProgress(child, '');
  const grandchildren = childrenOf(child);
  if (grandchildren.length > 0) {
    throw busy(`${child} has children of its own (${grandchildren.join(', ')}); resetting it would corrupt them; roll them back first`, child);
  }
  const { header, parent } = readChild(child);
  // Opening for writing takes the child's exclusive lock (nobody else is using it) and
  // verifies that the parent is the one the child was made on (unless told to accept it).
  const img = Qcow2Image.open(child, { write: true, ignoreParentGuard: opts.acceptParent, l2CacheEntries: 1, refcountCacheEntries: 1 });
  try {
    return await replaceWithEmpty(child, parent, header);
  } finally {
    img.close();
  }
}
