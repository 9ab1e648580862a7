/**
 * Differencing disks: the public API behind `disksnap diff`.
 *
 *   parent (raw or qcow2, read-only while it has children)
 *     └── child.qcow2   backing file = parent, stored relative to the child's directory
 *          └── grandchild.qcow2 ...
 *
 * - createChild: a qcow2 v3 child recording the parent's identity (the parent guard), the
 *   parent registered and made read-only (src/differencing/registry.ts).
 * - rollback: the child is deleted; the parent becomes writable when its last child goes.
 * - reset: the child is replaced by a fresh empty one (same parent, cluster size, name).
 * - commit: the child's clusters are written into the parent, then the child is deleted (or
 *   emptied). Resumable: a marker CHILD.disksnap-commit.json is written before the parent is
 *   touched; while it exists the child opens only for the commit (and rollback/reset refuse),
 *   and re-running the commit copies again and finishes. The copy is idempotent except for
 *   one thing: once a prefix of the data is durable in the parent (an fdatasync that started
 *   after it returned), the marker records it (`durableBelow`) and only then are the child's
 *   clusters for it punched, so their space comes back while the rest is still being written.
 *   A re-run skips that prefix. Raw parents: FICLONERANGE where the filesystem shares extents
 *   (XFS, btrfs: nothing is copied), else 4 copy_file_range pieces in flight on the thread
 *   pool with writeback started every 64 MiB. qcow2 parents: written through Qcow2Image.
 *   Left simple: the list of the child's extents is held in memory (one entry per run of
 *   contiguous clusters: small for children written mostly sequentially, one per cluster in
 *   the worst case).
 * - flatten: a standalone sparse raw image of what the child shows.
 * - check: refcount/L1/L2 consistency, with leak repair (src/image/qcow2/check.ts).
 * - acceptParent: records the parent as it is now (after a deliberate change, or for a child
 *   made by qemu-img), like `qemu-img rebase -u`.
 *
 * Backing names are stored relative to the child's directory (`path.relative`), which is
 * how QEMU resolves relative names: parent and child moved together keep working, and
 * `qemu-img info`/QEMU find the parent as disksnap does.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockFile } from '../engine/file';
import { DisksnapError, fromNodeError, invalid, busy } from '../engine/errors';
import { detectFormat, ImageFormat } from '../image';
import { writeAtomically, syncDir, checkOutput } from '../engine/atomic';
import { native } from '../engine/native';
import { Qcow2Image } from '../image/qcow2/image';
import { readHeaderCluster, resolveBacking } from '../image/qcow2/header';
import { clusterBitsOf, createQcow2 } from '../image/qcow2/create';
import { EXT_PARENT_GUARD, GUARD_LAYOUT, HEADER_V2_LENGTH, parseHeader, Qcow2Header, MAX_BACKING_NAME, encodeExtensions, extensionsSize } from '../image/qcow2/format';
import { identify, toRecord } from '../image/qcow2/guard';
import { addChild, childrenOf, makeReadOnly, readRegistry, removeChild } from './registry';
import { commitMarkerPath, readJson, writeJsonAtomic } from '../image/sidecars';
import { checkImage, CheckResult } from '../image/qcow2/check';
import { assertNotAttached, assertNotAttachedWritable } from './attached';
import { BackingLayer } from '../image/qcow2/layer';

/** `diff check`: refcount and L1/L2 consistency; `repair` refuses an attached image. */
export function check(path: string, opts: { repair?: boolean } = {}): CheckResult {
  if (opts.repair) assertNotAttached(path, 'repair');
  return checkImage(path, opts);
}
export type { CheckResult };
export { Qcow2Image } from '../image/qcow2/image';
export { childrenOf } from './registry';

export interface CreateChildOptions {
  /** bytes (default 64 KiB) */
  clusterSize?: number;
  /** replace an existing CHILD */
  force?: boolean;
}

export interface ChildInfo {
  child: string;
  parent: string;
  parentFormat: ImageFormat;
  /** the backing name stored in the child */
  backingName: string;
  virtualSize: number;
  clusterSize: number;
}

export type Progress = (done: number, total: number) => void;

/** Virtual size and format of a would-be parent, and an open handle for its identity. */
function openParent(parent: string): { format: ImageFormat; size: number; file: BlockFile; close(): void } {
  const format = detectFormat(parent);
  if (format === 'qcow2') {
    // opening checks the parent's own chain and guard
    const img = Qcow2Image.open(parent);
    return { format, size: img.virtualSize, file: img.file, close: () => img.close() };
  }
  const file = BlockFile.open(parent, { lock: 'shared' });
  return { format, size: file.size(), file, close: () => file.close() };
}

function sameFile(a: string, b: string): boolean {
  try {
    return fs.realpathSync(a) === fs.realpathSync(b);
  } catch {
    return path.resolve(a) === path.resolve(b);
  }
}

export async function createChild(parent: string, child: string, opts: CreateChildOptions = {}): Promise<ChildInfo> {
  if (!fs.existsSync(parent)) throw new DisksnapError(`parent ${parent} does not exist`, 'ENOENT', 2, parent);
  if (fs.existsSync(child) && sameFile(parent, child)) throw invalid(`the child ${child} cannot be its own parent`, child);
  const clusterSize = opts.clusterSize ?? 65536;
  clusterBitsOf(clusterSize);
  assertNotAttachedWritable(parent, 'make a child of');
  checkOutput(child, !!opts.force);
  if (fs.existsSync(child) && childrenOf(child).length > 0) {
    throw busy(`${child} has children of its own; roll them back before replacing it`, child);
  }
  const backingName = path.relative(path.dirname(path.resolve(child)), path.resolve(parent));
  const p = openParent(parent);
  let info: ChildInfo;
  try {
    const guard = toRecord(identify(p.file));
    info = { child, parent, parentFormat: p.format, backingName, virtualSize: p.size, clusterSize };
    await writeAtomically(child, { force: opts.force, sync: true }, (tmp) => {
      createQcow2(tmp, { size: p.size, clusterSize, backingFile: backingName, backingFormat: p.format, guard });
      // registered (and the parent read-only) before the child appears under its name
      addChild(parent, child);
    });
  } finally {
    p.close();
  }
  return info;
}

/** Reads the header of a child (without opening its chain) and resolves its parent. */
function readChild(child: string): { header: Qcow2Header; parent: string } {
  const f = BlockFile.open(child, { lock: 'none' });
  let header: Qcow2Header;
  try {
    const size = f.size();
    header = parseHeader(child, readHeaderCluster(f, size), size);
  } finally {
    f.close();
  }
  if (header.backingFile === undefined) {
    throw invalid(`${child} has no backing file: it is not a differencing child`, child);
  }
  return { header, parent: resolveBacking(child, header.backingFile) };
}

/** Holds an exclusive lock on an image (QEMU-compatible): nobody else uses it meanwhile. */
function lockExclusive(p: string): BlockFile {
  return BlockFile.open(p, { write: true, lock: 'exclusive' });
}

export interface RollbackOptions {
  /** also discard the child's own children (recursively) */
  recursive?: boolean;
}

export interface RollbackResult {
  removed: string[];
  parent: string;
  /** children the parent still has; when empty, the parent's mode was restored */
  remaining: string[];
}

export function rollback(child: string, opts: RollbackOptions = {}): RollbackResult {
  assertNotAttached(child, 'roll back');
  if (fs.existsSync(commitMarkerPath(child))) {
    throw busy(`${child}: a commit into its parent was interrupted; finish it with 'disksnap diff commit ${child}' (rolling back now would leave the parent half-committed)`, child);
  }
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
  return { removed, parent, remaining };
}

export interface ResetOptions {
  /** accept a parent that changed since the child was made */
  acceptParent?: boolean;
}

/** Replaces the child by a fresh empty child of the same parent (same name, cluster size). */
export async function reset(child: string, opts: ResetOptions = {}): Promise<ChildInfo> {
  assertNotAttached(child, 'reset');
  if (fs.existsSync(commitMarkerPath(child))) {
    throw busy(`${child}: a commit into its parent was interrupted; finish it with 'disksnap diff commit ${child}'`, child);
  }
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

async function replaceWithEmpty(child: string, parent: string, header: Qcow2Header): Promise<ChildInfo> {
  const p = openParent(parent);
  try {
    const guard = toRecord(identify(p.file));
    const backingName = header.backingFile!;
    await writeAtomically(child, { force: true, sync: true }, (tmp) => {
      createQcow2(tmp, { size: header.size, clusterSize: header.clusterSize, backingFile: backingName, backingFormat: p.format, guard });
    });
    return { child, parent, parentFormat: p.format, backingName, virtualSize: header.size, clusterSize: header.clusterSize };
  } finally {
    p.close();
  }
}

export interface CommitOptions {
  /** keep the child, emptied, instead of deleting it */
  keepChild?: boolean;
  /** commit even though the parent has other children (their view changes) */
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
  /** other children of the parent (only with force): their parent guard now reports the change */
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


export async function commit(child: string, opts: CommitOptions = {}): Promise<CommitResult> {
  assertNotAttached(child, 'commit');
  const markerPath = commitMarkerPath(child);
  let marker = readJson<CommitMarker>(markerPath);
  const resumed = marker !== undefined;
  let parent: string;
  if (marker) {
    parent = marker.parent;
  } else {
    parent = readChild(child).parent;
    // The parent must be the one the child was made on: open the child normally.
    Qcow2Image.open(child, { l2CacheEntries: 1, refcountCacheEntries: 1 }).close();
  }
  assertNotAttached(parent, 'commit into');
  const siblings = childrenOf(parent).filter((c) => !sameFile(c, child));
  if (!resumed && siblings.length > 0 && !opts.force) {
    throw busy(`${parent} has other children (${siblings.join(', ')}); committing would silently change what they show. Roll them back first, or pass --force`, parent);
  }
  if (childrenOf(child).length > 0) {
    throw busy(`${child} has children of its own; committing would change their parent; roll them back first`, child);
  }
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
      // finish: a fresh empty child, or none
      if (marker.keepChild) {
        const { header } = readChild(child);
        await replaceWithEmpty(child, parent, header);
      } else {
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
  fs.rmSync(markerPath, { force: true });
  syncDir(path.dirname(path.resolve(child)));
  return { child, parent, bytesCopied, bytesZeroed, resumed, keptChild: marker.keepChild, siblings };
}

/** A piece of file-to-file copying: `length` bytes from src@srcOffset to dst@dstOffset. */
interface CopyJob {
  src: BlockFile;
  srcOffset: number;
  dstOffset: number;
  length: number;
}

const PIECE = 16 * 2 ** 20;
const IN_FLIGHT = 4;
const SYNC_EVERY = 64 * 2 ** 20;

/**
 * Copies with FICLONERANGE where the filesystem shares extents (nothing is copied), else
 * with copy_file_range on the thread pool, IN_FLIGHT pieces at a time, and starts an
 * fdatasync of `dst` every SYNC_EVERY bytes so that writeback overlaps the copying instead
 * of all happening at the end (the caller still ends with an fdatasync). A source that ends
 * early (the last cluster of a qcow2 file) reads as zeros.
 */
async function parallelCopy(jobs: CopyJob[], dst: BlockFile, onBytes: (n: number) => void): Promise<void> {
  const n = native();
  const pieces: CopyJob[] = [];
  for (const j of jobs) {
    for (let pos = 0; pos < j.length; pos += PIECE) {
      pieces.push({ src: j.src, srcOffset: j.srcOffset + pos, dstOffset: j.dstOffset + pos, length: Math.min(PIECE, j.length - pos) });
    }
  }
  let canClone = true;
  let next = 0;
  let sinceSync = 0;
  const syncs: Promise<void>[] = [];
  const worker = async (): Promise<void> => {
    while (next < pieces.length) {
      const i = next++;
      const p = pieces[i];
      // Where the filesystem shares extents (XFS, btrfs), a piece is cloned: no data moves.
      let cloned = false;
      if (canClone) {
        try {
          cloned = n.cloneRange(p.src.fd, p.srcOffset, dst.fd, p.dstOffset, p.length);
        } catch {
          cloned = false;
        }
        if (!cloned && i === 0) canClone = false; // the filesystem cannot: stop trying
      }
      if (!cloned) {
        const got = await n.copyRangeAsync(p.src.fd, p.srcOffset, dst.fd, p.dstOffset, p.length);
        if (got < p.length) await dst.write(Buffer.alloc(p.length - got), p.dstOffset + got);
      }
      onBytes(p.length);
      sinceSync += p.length;
      if (sinceSync >= SYNC_EVERY) {
        sinceSync = 0;
        syncs.push(dst.sync(true));
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(IN_FLIGHT, pieces.length) }, worker));
  await Promise.all(syncs);
}

/** Writes every cluster the child stores into its parent, then makes the parent durable. */
async function copyIntoParent(
  img: Qcow2Image,
  parent: string,
  durableBelow: number,
  onProgress: Progress | undefined,
): Promise<{ copied: number; zeroed: number }> {
  // extents below durableBelow are in the parent already (an interrupted run said so)
  const extents = [];
  for (const e of img.ownExtents()) {
    if (e.offset + e.length <= durableBelow) continue;
    const skip = Math.max(0, durableBelow - e.offset);
    extents.push({ ...e, offset: e.offset + skip, length: e.length - skip, hostOffset: e.hostOffset === undefined ? undefined : e.hostOffset + skip });
  }
  const total = extents.reduce((s, e) => s + e.length, 0);
  let done = 0;
  let copied = 0;
  let zeroed = 0;
  const progress = (n: number): void => {
    done += n;
    onProgress?.(done, total);
  };
  const format = detectFormat(parent);
  if (format === 'raw') {
    const out = BlockFile.open(parent, { write: true });
    try {
      if (out.size() < img.virtualSize) out.truncateSync(img.virtualSize);
      const jobs: CopyJob[] = [];
      for (const e of extents) {
        if (e.kind === 'zero') {
          out.zeroRangeSync(e.offset, e.length);
          zeroed += e.length;
          progress(e.length);
        } else if (e.hostOffset !== undefined) {
          jobs.push({ src: img.file, srcOffset: e.hostOffset, dstOffset: e.offset, length: e.length });
          copied += e.length;
        } else {
          // compressed clusters: inflate here
          const b = Buffer.alloc(e.length);
          img.readAt(b, 0, e.length, e.offset);
          out.writeSync(b, e.offset);
          copied += e.length;
          progress(e.length);
        }
      }
      // The child stays whole until it is deleted, so an interrupted commit is re-run by copying
      // everything again. Earlier versions recorded each durable prefix in the marker (two
      // fsyncs on the event loop every 64 MiB) and punched it out of the child; on ext4 both
      // made a 512 MiB commit slower (0.52-0.54 s against 0.50-0.52 s for the punching: each
      // punch waited ~50 ms on the journal behind the parent's writeback).
      await parallelCopy(jobs, out, progress);
      out.syncSync(true);
    } finally {
      out.close();
    }
  } else {
    const out = Qcow2Image.open(parent, { write: true, allowChildren: true });
    try {
      const chunk = Buffer.alloc(PIECE);
      for (const e of extents) {
        if (e.kind === 'zero') {
          out.writeZeroesSync(e.offset, e.length);
          zeroed += e.length;
          progress(e.length);
        } else {
          for (let pos = 0; pos < e.length; pos += chunk.length) {
            const len = Math.min(chunk.length, e.length - pos);
            img.readAt(chunk, 0, len, e.offset + pos);
            out.writeSync(chunk.subarray(0, len), e.offset + pos);
            progress(len);
          }
          copied += e.length;
        }
      }
      out.flushSync();
    } finally {
      out.close();
    }
  }
  return { copied, zeroed };
}

export interface FlattenOptions {
  force?: boolean;
  onProgress?: Progress;
}

export interface FlattenResult {
  out: string;
  virtualSize: number;
  dataBytes: number;
}

/** Writes a standalone sparse raw image of what `child` shows (temporary name, then rename). */
export async function flatten(child: string, outPath: string, opts: FlattenOptions = {}): Promise<FlattenResult> {
  if (fs.existsSync(outPath) && sameFile(child, outPath)) throw invalid(`the output ${outPath} is the child itself`, outPath);
  const img = Qcow2Image.open(child);
  try {
    const files = new Map<string, BlockFile>();
    for (let layer: BackingLayer | undefined = img; layer; layer = layer instanceof Qcow2Image ? layer.backing : undefined) {
      files.set(layer.path, layer.file);
    }
    const extents = img.map();
    const total = extents.reduce((s, e) => s + (e.kind === 'data' ? e.length : 0), 0);
    let done = 0;
    await writeAtomically(outPath, { force: opts.force, sync: true }, async (tmp) => {
      const out = BlockFile.open(tmp, { create: true, exclusive: true });
      try {
        out.truncateSync(img.virtualSize);
        const n = native();
        const jobs: CopyJob[] = [];
        for (const e of extents) {
          if (e.kind !== 'data') continue;
          const src = e.file !== undefined ? files.get(e.file) : undefined;
          if (src && e.hostOffset !== undefined) {
            jobs.push({ src, srcOffset: e.hostOffset, dstOffset: e.offset, length: e.length });
            continue;
          }
          // compressed clusters: inflate through the image; all-zero pieces stay holes
          for (let pos = 0; pos < e.length; pos += PIECE) {
            const len = Math.min(PIECE, e.length - pos);
            const b = Buffer.alloc(len);
            img.readAt(b, 0, len, e.offset + pos);
            if (!n.isZero(b)) out.writeSync(b, e.offset + pos);
            done += len;
            opts.onProgress?.(done, total);
          }
        }
        await parallelCopy(jobs, out, (len) => {
          done += len;
          opts.onProgress?.(done, total);
        });
      } finally {
        out.close();
      }
    });
    return { out: outPath, virtualSize: img.virtualSize, dataBytes: total };
  } finally {
    img.close();
  }
}

export interface AcceptParentResult {
  child: string;
  parent: string;
  /** what the guard said before: 'ok', 'unrecorded' or 'changed: ...' */
  before: string;
}

/**
 * Records the parent as it is now in the child's guard (like `qemu-img rebase -u`), and
 * registers the child with its parent (adopting a child made by qemu-img).
 */
export function acceptParent(child: string): AcceptParentResult {
  assertNotAttached(child, 'rewrite the header of');
  // what the guard says now (this also proves the chain below opens)
  const probe = Qcow2Image.open(child, { ignoreParentGuard: true, l2CacheEntries: 1, refcountCacheEntries: 1 });
  const before = probe.guardState ?? 'unrecorded';
  const parent = probe.backingPath;
  probe.close();
  if (parent === undefined) throw invalid(`${child} has no backing file: it is not a differencing child`, child);
  const f = BlockFile.open(child, { write: true });
  try {
    const size = f.size();
    const cluster0 = readHeaderCluster(f, size);
    const h = parseHeader(child, cluster0, size);
    const p = openParent(parent);
    let guard;
    try {
      guard = toRecord(identify(p.file));
    } finally {
      p.close();
    }
    rewriteGuard(child, f, cluster0, h, guard);
  } finally {
    f.close();
  }
  addChild(parent, child);
  return { child, parent, before };
}

/** Rewrites the extension area of cluster 0 with a new guard, keeping every other extension. */
function rewriteGuard(child: string, f: BlockFile, cluster0: Buffer, h: Qcow2Header, guard: ReturnType<typeof toRecord>): void {
  const cs = h.clusterSize;
  const existing = h.extensions.findIndex((e) => e.type === EXT_PARENT_GUARD);
  const g = Buffer.alloc(GUARD_LAYOUT.span);
  GUARD_LAYOUT.encode(guard, g, 0);
  if (h.version === 3 && h.headerLength >= 104 && existing >= 0 && h.extensions[existing].data.length === g.length) {
    // same size: overwrite the payload in place (one small write)
    let pos = h.headerLength;
    for (let i = 0; i < existing; i++) pos += 8 + Math.ceil(h.extensions[i].data.length / 8) * 8;
    f.writeSync(g, pos + 8);
    f.syncSync(true);
    return;
  }
  // rebuild: header fields as they are, extensions + ours, end, backing name
  const start = h.version === 2 ? HEADER_V2_LENGTH : h.headerLength;
  const exts = h.extensions.filter((e) => e.type !== EXT_PARENT_GUARD);
  exts.push({ type: EXT_PARENT_GUARD, data: g });
  const name = Buffer.from(h.backingFile ?? '', 'utf8');
  if (start + extensionsSize(exts) + name.length > cs || name.length > MAX_BACKING_NAME) {
    throw new DisksnapError(`${child}: no room in the header cluster for the parent guard (cluster size ${cs})`, 'EUNSUPPORTED', undefined, child);
  }
  const out = Buffer.from(cluster0.subarray(0, cs));
  out.fill(0, start);
  const pos = encodeExtensions(exts, out, start);
  name.copy(out, pos);
  // backing_file_offset (u64 at 8) and backing_file_size (u32 at 16)
  out.writeUInt32BE(0, 8);
  out.writeUInt32BE(name.length ? pos : 0, 12);
  out.writeUInt32BE(name.length, 16);
  f.writeSync(out, 0);
  f.syncSync(true);
}
