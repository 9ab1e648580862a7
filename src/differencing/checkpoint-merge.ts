/**
 * The two primitives checkpoint trees are made of, besides creating children:
 *
 * 1. rewriteBacking(image, parent | none): point a qcow2 image at another backing file (name
 *    relative to the image's directory, backing-format extension, and a parent guard of the
 *    new parent), like `qemu-img rebase -u` plus disksnap's guard. Only the used prefix of the
 *    header cluster is written, rounded up to 512 bytes: for ordinary names that is a single
 *    sector, which a crash leaves old or new, not torn.
 *
 * 2. mergeDown(node, child): make `child` independent of `node` without changing what it
 *    shows, so that child can be rebased onto node's parent:
 *
 *      child:  [c]   [ ]   [c]   [ ]         c = cluster the child stores
 *      node:   [n]   [n]   [ ]   [z]         n = data, z = zero cluster, blank = falls through
 *      copy:          n           z          (only where the child stores nothing)
 *
 *    Every write puts into the child the bytes it already showed through the node, so the
 *    child's view never changes, whenever a crash stops the copy: a re-run copies again (the
 *    clusters already copied are the child's own now and are skipped). Only after the copy is
 *    durable is the child rebased (rewriteBacking). Clusters the node does not store fall
 *    through to the node's parent both before and after.
 *
 * A write into a child changes its mtime and first bytes, which its own children's guards
 * record: reguardChildren() records the new identity (their view did not change).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockFile } from '../engine/file';
import { DisksnapError } from '../engine/errors';
import { detectFormat } from '../image';
import { Qcow2Image } from '../image/qcow2/image';
import { EXT_BACKING_FORMAT, EXT_PARENT_GUARD, GUARD_LAYOUT, MAX_BACKING_NAME, parseHeader, Qcow2Header, RawGuard } from '../image/qcow2/format';
import { encodeTail, extensionsSize } from '../image/qcow2/encode';
import { compare as compareGuard, identify, onlyStatusChanged, toRecord } from '../image/qcow2/guard';
import { readHeaderCluster, resolveBacking } from '../image/qcow2/header';
import { childrenOf } from './registry';

/** The header of a qcow2 file, read without opening its chain. */
export function readHeader(file: string): Qcow2Header {
  const f = BlockFile.open(file, { lock: 'none' });
  try {
    const size = f.size();
    return parseHeader(file, readHeaderCluster(f, size), size);
  } finally {
    f.close();
  }
}

/** The identity record of a parent file as it is now (for a child's guard). */
export function guardOf(parent: string): RawGuard {
  const f = BlockFile.open(parent, { lock: 'none' });
  try {
    return toRecord(identify(f));
  } finally {
    f.close();
  }
}

/**
 * Points `image` (qcow2 v3) at `parent` (or at nothing), with a guard of the parent as it is
 * now. The image must not be in use (the caller holds its lock or QEMU does not run it).
 */
export function rewriteBacking(image: string, parent: string | undefined, opts: { guard?: boolean; file?: BlockFile } = {}): void {
  // `file`: the caller's open handle on this very inode (an OFD lock of ours would conflict).
  // A read-only node is made writable for the write and read-only again (its ctime moves:
  // the caller refreshes its children's guards after it, refreshTreeGuards in checkpoint.ts).
  const mode = fs.statSync(image).mode & 0o7777;
  const unlock = !opts.file && !(mode & 0o200);
  if (unlock) fs.chmodSync(image, mode | 0o200);
  let f: BlockFile;
  try {
    f = opts.file ?? BlockFile.open(image, { write: true, lock: 'exclusive' });
  } catch (e) {
    if (unlock) fs.chmodSync(image, mode);
    throw e;
  }
  try {
    const size = f.size();
    const cluster0 = readHeaderCluster(f, size);
    const h = parseHeader(image, cluster0, size);
    if (h.version !== 3) throw new DisksnapError(`${image}: a qcow2 version ${h.version} header; checkpoint trees rewrite version 3 headers only`, 'EUNSUPPORTED', undefined, image);
    const exts = h.extensions.filter((e) => e.type !== EXT_PARENT_GUARD && e.type !== EXT_BACKING_FORMAT);
    let name = Buffer.alloc(0);
    if (parent !== undefined) {
      name = Buffer.from(path.relative(path.dirname(path.resolve(image)), path.resolve(parent)), 'utf8');
      if (name.length > MAX_BACKING_NAME) throw new DisksnapError(`${image}: backing name for ${parent} is longer than ${MAX_BACKING_NAME} bytes`, 'EINVALID', undefined, image);
      exts.unshift({ type: EXT_BACKING_FORMAT, data: Buffer.from(detectFormat(parent)) });
      if (opts.guard !== false) {
        const g = Buffer.alloc(GUARD_LAYOUT.span);
        GUARD_LAYOUT.encode(guardOf(parent), g, 0);
        exts.push({ type: EXT_PARENT_GUARD, data: g });
      }
    }
    const start = h.headerLength;
    const end = start + extensionsSize(exts) + name.length;
    if (end > h.clusterSize) throw new DisksnapError(`${image}: no room in the header cluster for the backing name and extensions`, 'EUNSUPPORTED', undefined, image);
    const oldEnd = h.backingFile !== undefined ? cluster0.readUInt32BE(12) + cluster0.readUInt32BE(16) : start + extensionsSize(h.extensions);
    const len = Math.min(h.clusterSize, Math.ceil(Math.max(end, oldEnd) / 512) * 512);
    const out = Buffer.alloc(len);
    cluster0.copy(out, 0, 0, start);
    encodeTail(out, start, exts, name);
    f.writeSync(out, 0);
    f.syncSync(true);
  } finally {
    if (!opts.file) f.close();
    if (unlock) fs.chmodSync(image, mode);
  }
}

/**
 * Re-records the guard of `image` when the only thing that moved in its parent is the ctime:
 * what disksnap's own steps do to a parent (a chmod making it read-only, a hard link or a
 * rename of a checkpoint node). A parent whose size, mtime, inode or sampled bytes changed is
 * left for the guard to report. Returns whether the guard was rewritten. `image` must not be
 * in use: its lock is taken, or `file` is the caller's handle on it.
 */
export function refreshGuard(image: string, opts: { file?: BlockFile } = {}): boolean {
  const h = readHeader(image);
  if (h.guard === undefined || h.backingFile === undefined) return false;
  const parent = resolveBacking(image, h.backingFile);
  if (!fs.existsSync(parent)) return false;
  const f = BlockFile.open(parent, { lock: 'none' });
  let stale: boolean;
  try {
    stale = onlyStatusChanged(compareGuard(h.guard, f));
  } finally {
    f.close();
  }
  if (stale) rewriteBacking(image, parent, { file: opts.file });
  return stale;
}

/**
 * Runs fn with a writable handle on a file a running QEMU holds (its locks forbid ours), made
 * writable for the moment if it is read-only. Only for header fields QEMU does not change
 * while it runs (the backing name and disksnap's extensions; see live.ts).
 */
export function withHeldFile<T>(file: string, fn: (f: BlockFile) => T): T {
  const mode = fs.statSync(file).mode & 0o7777;
  if (!(mode & 0o200)) fs.chmodSync(file, mode | 0o200);
  try {
    const f = BlockFile.open(file, { write: true, lock: 'none' });
    try {
      return fn(f);
    } finally {
      f.close();
    }
  } finally {
    if (!(mode & 0o200)) fs.chmodSync(file, mode);
  }
}

/**
 * Records, in each child of `image`, the identity `image` has now (its view is unchanged).
 * `held(file)`: the child is in a running QEMU's chain; its header is written without a lock,
 * and a guard only where it had one.
 */
export function reguardChildren(image: string, held?: (file: string) => boolean): string[] {
  const kids = childrenOf(image);
  for (const k of kids) {
    const h = readHeader(k);
    if (h.backingFile === undefined) continue;
    if (held?.(k)) withHeldFile(k, (f) => rewriteBacking(k, image, { guard: h.guard !== undefined, file: f }));
    else rewriteBacking(k, image);
  }
  return kids;
}

/** Byte ranges [start, end) of `a` not covered by any range of `covered` (both sorted). */
function subtract(a: { offset: number; length: number }, covered: { offset: number; length: number }[]): [number, number][] {
  const out: [number, number][] = [];
  let pos = a.offset;
  const end = a.offset + a.length;
  for (const c of covered) {
    if (c.offset + c.length <= pos) continue;
    if (c.offset >= end) break;
    if (c.offset > pos) out.push([pos, c.offset]);
    pos = Math.max(pos, c.offset + c.length);
    if (pos >= end) break;
  }
  if (pos < end) out.push([pos, end]);
  return out;
}

const CHUNK = 4 * 2 ** 20;

/**
 * Copies into `child` every range that `node` stores and the child does not, reading it
 * through the child's own chain (which still passes through node). Returns bytes written.
 */
export function mergeDown(node: string, child: string): { copied: number; zeroed: number } {
  const n = Qcow2Image.open(node, { noBacking: true });
  let own: { offset: number; length: number; kind: 'data' | 'zero' }[];
  try {
    own = [...n.ownExtents()];
  } finally {
    n.close();
  }
  const mode = fs.statSync(child).mode & 0o7777;
  if (!(mode & 0o200)) fs.chmodSync(child, mode | 0o200);
  let copied = 0;
  let zeroed = 0;
  try {
    const c = Qcow2Image.open(child, { write: true, allowChildren: true });
    try {
      const has = [...c.ownExtents()].map((e) => ({ offset: e.offset, length: e.length }));
      const buf = Buffer.alloc(CHUNK);
      for (const e of own) {
        for (const [s, end] of subtract(e, has)) {
          if (e.kind === 'zero') {
            c.writeZeroesSync(s, end - s);
            zeroed += end - s;
            continue;
          }
          for (let p = s; p < end; p += CHUNK) {
            const len = Math.min(CHUNK, end - p);
            c.readAt(buf, 0, len, p);
            c.writeSync(buf.subarray(0, len), p);
            copied += len;
          }
        }
      }
      c.flushSync();
    } finally {
      c.close();
    }
  } finally {
    if (!(mode & 0o200)) fs.chmodSync(child, mode);
  }
  return { copied, zeroed };
}
