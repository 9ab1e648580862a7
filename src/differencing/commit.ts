/**
 * `diff commit`: the child's clusters are written into its parent, then the child is deleted
 * (or, with keepChild, replaced by an empty one).
 *
 * Crash safety is by re-running, in this order:
 *   1. every refusal (attached, other children, grandchildren, the parent guard, a child or
 *      qcow2 parent that cannot be written, a qcow2 parent that cannot grow to the child's
 *      size) — nothing has been touched yet;
 *   2. the marker CHILD.disksnap-commit.json is written (temporary name + rename): from here on
 *      the child opens only for the commit, and rollback/reset refuse, since the parent may be
 *      half-committed;
 *   3. the parent is made writable, grown to the child's size if it is smaller (a raw parent
 *      is extended, a qcow2 parent grown as `qemu-img commit` grows it), and every data/zero
 *      extent of the child is written into it, then the parent is synced. The copy is idempotent (the child stays whole until step 4),
 *      so an interrupted run is finished by running the commit again, which copies everything
 *      again;
 *   4. the child is deleted (directory synced), unless it is kept;
 *   5. registry and mode: the parent stays read-only while other children remain, else gets
 *      its mode back; a kept child is then replaced by an empty one (its guard records the
 *      parent with its final mode and ctime); the marker is removed last.
 *
 * Raw parents: FICLONERANGE where the filesystem shares extents, else copy_file_range pieces in
 * flight on the thread pool (copy.ts). qcow2 parents: written through Qcow2Image. Left simple:
 * the list of the child's extents is held in memory (one entry per run of contiguous clusters).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockFile } from '../engine/file';
import { DisksnapError, busy } from '../engine/errors';
import { syncDir } from '../engine/atomic';
import { detectFormat } from '../image';
import { Qcow2Image } from '../image/qcow2/image';
import { INCOMPAT_DIRTY, Qcow2Header } from '../image/qcow2/format';
import { growQcow2, growRefusal } from '../image/qcow2/resize';
import { same } from '../image/children';
import { commitMarkerPath, readJson, writeJsonAtomic } from '../image/sidecars';
import { childrenOf, makeReadOnly, readRegistry, removeChild } from './registry';
import { assertNotAttached } from './attached';
import { readChild, readHeader, replaceWithEmpty, Progress } from './child';
import { CopyJob, parallelCopy, PIECE } from './copy';

export interface CommitOptions {
  /** keep the child, emptied, instead of deleting it */
  keepChild?: boolean;
  /** commit even though the parent has other children (their view changes) */
  allowSiblingChange?: boolean;
  /** @deprecated the old name of allowSiblingChange */
  force?: boolean;
  onProgress?: Progress;
}

export interface CommitResult {
  child: string;
  parent: string;
  bytesCopied: number;
  bytesZeroed: number;
  resumed: boolean;
  keptChild: boolean;
  /** other children of the parent (only with allowSiblingChange): their parent guard now reports the change */
  siblings: string[];
}

interface CommitMarker {
  version: 1;
  parent: string;
  keepChild: boolean;
  startedAt: string;
  /** the parent's mode before the commit made it writable */
  parentMode: number;
  /**
   * Written by earlier versions, which punched the child's clusters out as they became durable
   * in the parent: every data extent below this guest offset is in the parent already and must
   * not be copied again. Now the child stays whole until it is deleted, so a re-run simply
   * copies everything again.
   */
  durableBelow?: number;
}

/**
 * What makes Qcow2Image refuse to open an image for writing, read from its header: asked of the
 * child and of a qcow2 parent before the marker, since after it a refusal would leave the
 * child behind the marker and the parent writable.
 */
function writeRefusal(h: Qcow2Header): string | undefined {
  if (h.nbSnapshots > 0) return `internal snapshots (${h.nbSnapshots}); disksnap writes only images without them`;
  if (h.incompatible & INCOMPAT_DIRTY) return 'the dirty bit (lazy refcounts left stale by an unclean shutdown); repair it with qemu-img check -r all first';
  return undefined;
}

function unsupported(image: string, what: string): DisksnapError {
  return new DisksnapError(`${image}: uses ${what}, which disksnap does not support`, 'EUNSUPPORTED', undefined, image);
}

/**
 * Step 1: every refusal, before anything is written: the child's parent guard, attachments,
 * other children, grandchildren, and whether the child and the parent can be written (and a
 * qcow2 parent grown to the child's size). Returns the parent and its other children.
 */
function preflight(child: string, marker: CommitMarker | undefined, opts: CommitOptions): { parent: string; siblings: string[] } {
  let parent: string;
  if (marker) {
    parent = marker.parent;
  } else {
    parent = readChild(child).parent;
    // The parent must be the one the child was made on: open the child normally.
    Qcow2Image.open(child, { l2CacheEntries: 1, refcountCacheEntries: 1 }).close();
  }
  assertNotAttached(parent, 'commit into');
  const siblings = childrenOf(parent).filter((c) => !same(c, child));
  if (!marker && siblings.length > 0 && !(opts.allowSiblingChange ?? opts.force)) {
    throw busy(`${parent} has other children (${siblings.join(', ')}); committing would silently change what they show. Roll them back first, or pass --allow-sibling-change`, parent);
  }
  if (childrenOf(child).length > 0) {
    throw busy(`${child} has children of its own; committing would change their parent; roll them back first`, child);
  }
  if (fs.existsSync(child)) {
    const h = readHeader(child);
    const childRefusal = writeRefusal(h);
    if (childRefusal) throw unsupported(child, childRefusal);
    if (detectFormat(parent) === 'qcow2') {
      const ph = readHeader(parent);
      const parentRefusal = writeRefusal(ph);
      if (parentRefusal) throw unsupported(parent, parentRefusal);
      const growth = growRefusal(ph, h.size);
      if (growth) {
        throw new DisksnapError(`${parent}: cannot grow it to the size of ${child} (${h.size} bytes, the parent has ${ph.size}): ${growth}`, 'EUNSUPPORTED', undefined, parent);
      }
    }
  }
  return { parent, siblings };
}

export async function commit(child: string, opts: CommitOptions = {}): Promise<CommitResult> {
  assertNotAttached(child, 'commit');
  const markerPath = commitMarkerPath(child);
  let marker = readJson<CommitMarker>(markerPath);
  const resumed = marker !== undefined;
  const { parent, siblings } = preflight(child, marker, opts);
  if (!marker) {
    marker = {
      version: 1,
      parent: path.resolve(parent),
      keepChild: !!opts.keepChild,
      startedAt: new Date().toISOString(),
      parentMode: fs.statSync(parent).mode & 0o7777,
    };
    writeJsonAtomic(markerPath, marker);
  }

  let bytesCopied = 0;
  let bytesZeroed = 0;
  if (fs.existsSync(child)) {
    const mode = fs.statSync(parent).mode & 0o7777;
    if (!(mode & 0o200)) fs.chmodSync(parent, mode | 0o200);
    const img = Qcow2Image.open(child, { write: true, noBacking: true, allowCommitInProgress: true });
    try {
      const r = await copyIntoParent(img, parent, marker.durableBelow ?? 0, opts.onProgress);
      bytesCopied = r.copied;
      bytesZeroed = r.zeroed;
      if (!marker.keepChild) {
        fs.unlinkSync(child);
        syncDir(path.dirname(path.resolve(child)));
      }
    } finally {
      img.close();
    }
  }
  // registry and mode: read-only while children remain; otherwise the mode from before the
  // first child (registry) or from before the commit (a child disksnap did not make)
  const hadRegistry = readRegistry(parent) !== undefined;
  const remaining = marker.keepChild ? childrenOf(parent) : removeChild(parent, child);
  if (remaining.length > 0) makeReadOnly(parent);
  else if (!hadRegistry) fs.chmodSync(parent, marker.parentMode);
  // the kept child is emptied once the parent's mode is final: the chmod changes the parent's
  // ctime, which the new child's guard records
  if (marker.keepChild && fs.existsSync(child)) await replaceWithEmpty(child, parent, readChild(child).header);
  fs.rmSync(markerPath, { force: true });
  syncDir(path.dirname(path.resolve(child)));
  return { child, parent, bytesCopied, bytesZeroed, resumed, keptChild: marker.keepChild, siblings };
}

/** One run of the child's own clusters: data (at hostOffset unless compressed) or zeroes. */
interface Extent {
  kind: 'data' | 'zero';
  offset: number;
  length: number;
  hostOffset?: number;
}

interface Tally {
  copied: number;
  zeroed: number;
  progress: (n: number) => void;
}

/** Writes every cluster the child stores into its parent, then makes the parent durable. */
async function copyIntoParent(img: Qcow2Image, parent: string, durableBelow: number, onProgress: Progress | undefined): Promise<{ copied: number; zeroed: number }> {
  // extents below durableBelow are in the parent already (an interrupted run said so)
  const extents: Extent[] = [];
  for (const e of img.ownExtents()) {
    if (e.offset + e.length <= durableBelow) continue;
    const skip = Math.max(0, durableBelow - e.offset);
    extents.push({ ...e, offset: e.offset + skip, length: e.length - skip, hostOffset: e.hostOffset === undefined ? undefined : e.hostOffset + skip });
  }
  const total = extents.reduce((s, e) => s + e.length, 0);
  let done = 0;
  const tally: Tally = {
    copied: 0,
    zeroed: 0,
    progress: (n) => {
      done += n;
      onProgress?.(done, total);
    },
  };
  if (detectFormat(parent) === 'raw') await copyIntoRaw(img, parent, extents, tally);
  else copyIntoQcow2(img, parent, extents, tally);
  return { copied: tally.copied, zeroed: tally.zeroed };
}

async function copyIntoRaw(img: Qcow2Image, parent: string, extents: Extent[], t: Tally): Promise<void> {
  const out = BlockFile.open(parent, { write: true });
  try {
    if (out.size() < img.virtualSize) out.truncateSync(img.virtualSize);
    const jobs: CopyJob[] = [];
    for (const e of extents) {
      if (e.kind === 'zero') {
        out.zeroRangeSync(e.offset, e.length);
        t.zeroed += e.length;
        t.progress(e.length);
      } else if (e.hostOffset !== undefined) {
        jobs.push({ src: img.file, srcOffset: e.hostOffset, dstOffset: e.offset, length: e.length });
        t.copied += e.length;
      } else {
        // compressed clusters: inflate here
        const b = Buffer.alloc(e.length);
        img.readAt(b, 0, e.length, e.offset);
        out.writeSync(b, e.offset);
        t.copied += e.length;
        t.progress(e.length);
      }
    }
    // The child stays whole until it is deleted, so an interrupted commit is re-run by copying
    // everything again. Earlier versions recorded each durable prefix in the marker (two
    // fsyncs on the event loop every 64 MiB) and punched it out of the child; on ext4 both
    // made a 512 MiB commit slower (0.52-0.54 s against 0.50-0.52 s for the punching: each
    // punch waited ~50 ms on the journal behind the parent's writeback).
    await parallelCopy(jobs, out, t.progress);
    out.syncSync(true);
  } finally {
    out.close();
  }
}

function copyIntoQcow2(img: Qcow2Image, parent: string, extents: Extent[], t: Tally): void {
  // as qemu-img commit does, a smaller parent grows to the child's size (idempotent on a re-run)
  growQcow2(parent, img.virtualSize);
  const out = Qcow2Image.open(parent, { write: true, allowChildren: true });
  try {
    const chunk = Buffer.alloc(PIECE);
    for (const e of extents) {
      if (e.kind === 'zero') {
        out.writeZeroesSync(e.offset, e.length);
        t.zeroed += e.length;
        t.progress(e.length);
        continue;
      }
      for (let pos = 0; pos < e.length; pos += chunk.length) {
        const len = Math.min(chunk.length, e.length - pos);
        img.readAt(chunk, 0, len, e.offset + pos);
        out.writeSync(chunk.subarray(0, len), e.offset + pos);
        t.progress(len);
      }
      t.copied += e.length;
    }
    out.flushSync();
  } finally {
    out.close();
  }
}
