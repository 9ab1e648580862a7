/**
 * Reflink change tracking of raw volumes on filesystems that share extents (xfs, btrfs).
 *
 *   VOL/.IMG.disksnap-reflink/                     one folder per volume file, beside it
 *       <store-id>.<vol-id>.<snap-id>.clone        the clone snapshot <snap-id> was read from
 *       <store-id>.<vol-id>.<snap-id>.clone.tmp-<pid>   being made (never trusted)
 *
 * A snapshot of such a volume first takes a FICLONE of it (of the point-in-time clone when
 * the volume is mounted: the same moment) into a temporary name, fsyncs it, renames it to its
 * final name and fsyncs the folder. An incremental whose blocks were chosen by comparing
 * clones (below) is read from that clone: a clone never changes, so the read and the parent
 * entries it keeps are of one moment without the proof of ./capture.ts. A snapshot that reads
 * every block (the first, or a fallback to tags) reads the live volume instead, with that
 * proof: a fresh clone is a new inode, and reading it forgoes the volume's page cache (1 GiB
 * on xfs: 9.2 s through the clone, 3.3-3.8 s live). If a writer moves the volume during that
 * read, the retry reads the clone, so a busy volume still gets its snapshot. The clone kept
 * is older than the live read by the moments between them; a write in between shows up in
 * the next comparison as a moved extent (copy-on-write never writes a shared extent in
 * place), so it is read again then, never missed.
 *
 * The next snapshot takes its own clone the same way and compares the physical extents of the
 * two clones (FIEMAP, both flushed): a block whose every byte maps to the same physical
 * offsets in both, with no flag that makes the mapping uncertain (unknown, delalloc,
 * encoded/compressed, inline, tail, not aligned, encrypted) and the same written/unwritten
 * state, is unchanged: both files reference the same disk blocks at once, and xfs and btrfs
 * never write a shared extent in place (a write to either file goes elsewhere). Holes in both
 * are unchanged; a hole against data is changed. Every other block is read and hashed.
 * Comparing two clones, not the live volume, means a concurrent writer (whose copy-on-write
 * is remapped only at writeback) cannot make a mapping look unchanged.
 *
 * Trust: the parent's clone is used only when the parent snapshot is completed and recorded
 * it (`reflinkClone` in its record: path, dev, inode, size, mtime, ctime), the file at that
 * path has that identity exactly (a write moves mtime/ctime; a replaced file has another
 * inode), it is on the new clone's filesystem, and the volume has the parent's size. Anything
 * else — missing, foreign, written, unreadable, resized, parent gone — falls back to the
 * change tags and says why in `changeSourceReason`.
 *
 * Crash ordering: the clone is complete and durable under its final name before the read, and
 * it is claimed only by the record turning `completed` (one atomic write). A crash before that
 * leaves a clone no completed record claims (never trusted; removed by the next snapshot of
 * the volume, `snapshot delete` of its snapshot, or `store gc`); a crash after it leaves the
 * new clone trusted and the parent's one stale (removed the same way). Only the clone of the
 * volume's latest completed snapshot is kept; the others are removed after each snapshot.
 *
 * Where the store remembers clones: each snapshot record names its clone, and the volume
 * record's path names the folder; gc looks in the folders of both.
 *
 * Encrypted volumes: the store is encrypted, the volume and its clone are plaintext on the
 * same filesystem under the same owner (the clone is mode 0600 in a folder of mode 0700), so
 * the clone exposes nothing the volume does not; but deleting or shredding the volume leaves
 * the clone's copy of its older blocks: remove the folder too (or snapshot with --no-reflink).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockFile } from '../engine/file';
import { native, NativeStat } from '../engine/native';
import { fileIdentityOf, sameFileIdentity, type ReflinkClone, type SnapshotRecord } from './store/records';

/** FIEMAP_EXTENT_* flags (linux/fiemap.h). */
export const FIEMAP = {
  LAST: 0x1,
  UNKNOWN: 0x2,
  DELALLOC: 0x4,
  ENCODED: 0x8,
  DATA_ENCRYPTED: 0x80,
  NOT_ALIGNED: 0x100,
  DATA_INLINE: 0x200,
  DATA_TAIL: 0x400,
  UNWRITTEN: 0x800,
  MERGED: 0x1000,
  SHARED: 0x2000,
} as const;

/** Flags whose extents say nothing reliable about where their bytes are on disk. */
const UNCERTAIN = FIEMAP.UNKNOWN | FIEMAP.DELALLOC | FIEMAP.ENCODED | FIEMAP.DATA_ENCRYPTED | FIEMAP.NOT_ALIGNED | FIEMAP.DATA_INLINE | FIEMAP.DATA_TAIL;

/** The folder of `volume`'s clones: `.<name>.disksnap-reflink` beside it. */
export function cloneDir(volume: string): string {
  return path.join(path.dirname(volume), `.${path.basename(volume)}.disksnap-reflink`);
}

/** The clone of snapshot `snapId` of volume record `volId` in store `storeId`. */
export function clonePath(volume: string, storeId: string, volId: string, snapId: string): string {
  return path.join(cloneDir(volume), `${storeId}.${volId}.${snapId}.clone`);
}

const CLONE_RE = /^(store-[0-9a-f]{16})\.(vol-[0-9a-f]{16})\.(snap-[0-9a-f]{16})\.clone(?:\.tmp-\d+)?$/;

function identityOf(p: string, st: NativeStat): ReflinkClone {
  return { path: p, ...fileIdentityOf(st) };
}

function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * Filesystems that cannot share extents at all (statfs f_type): ext2/3/4 (one magic number)
 * and tmpfs. A snapshot of a raw volume there makes no FICLONE attempt, which cost a folder,
 * two opens, the failing ioctl and the clean-up (~1.2 ms of a ~125 ms raw incremental,
 * session 42). Any other type, or a statfs that fails, is tried as before.
 */
const NO_SHARED_EXTENTS = new Set([0xef53, 0x01021994]);

function cannotShareExtents(p: string): boolean {
  try {
    return NO_SHARED_EXTENTS.has(Number(fs.statfsSync(p).type));
  } catch {
    return false;
  }
}

/** A new clone, open for reading; `discard` removes it (an attempt that failed). */
export interface NewClone {
  file: BlockFile;
  identity: ReflinkClone;
  discard(): void;
}

/**
 * FICLONE of `source` (the volume, or its point-in-time clone) as snapshot `snapId`'s clone of
 * `volume`, durable under its final name. Returns why not where the filesystem cannot share
 * extents (nothing is left behind then).
 */
export function takeClone(volume: string, source: string, storeId: string, volId: string, snapId: string): NewClone | { reason: string } {
  if (cannotShareExtents(source)) return { reason: `the filesystem of ${volume} cannot share extents` };
  const dir = cloneDir(volume);
  const final = clonePath(volume, storeId, volId, snapId);
  const tmp = `${final}.tmp-${process.pid}`;
  const made = !fs.existsSync(dir);
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  let cloned = false;
  try {
    const src = BlockFile.open(source, { lock: 'none' });
    try {
      const dst = BlockFile.open(tmp, { create: true, truncate: true, lock: 'none', mode: 0o600 });
      try {
        cloned = native().clone(src.fd, dst.fd);
        if (cloned) dst.syncSync(); // its extent map durable before any record can name it
      } finally {
        dst.close();
      }
    } finally {
      src.close();
    }
    if (!cloned) return { reason: `the filesystem of ${volume} cannot share extents (FICLONE is not supported there)` };
    fs.renameSync(tmp, final);
    fsyncDir(dir);
  } finally {
    if (!cloned) {
      fs.rmSync(tmp, { force: true });
      if (made) rmdirIfEmpty(dir);
    }
  }
  const file = BlockFile.open(final, { lock: 'shared' });
  const identity = identityOf(final, file.stat());
  return {
    file,
    identity,
    discard: () => {
      if (!file.closed) file.close();
      removeClone(identity);
    },
  };
}

/** Removes a recorded clone if the file at its path is still that clone (never a foreign file). */
export function removeClone(c: ReflinkClone): boolean {
  try {
    const st = fs.statSync(c.path, { bigint: true });
    if (String(st.ino) !== c.ino || Number(st.dev) !== c.dev) return false;
    fs.rmSync(c.path, { force: true });
    rmdirIfEmpty(path.dirname(c.path));
    return true;
  } catch {
    return false; // already gone (or unreachable): nothing of ours to remove
  }
}

function rmdirIfEmpty(dir: string): void {
  try {
    fs.rmdirSync(dir);
  } catch {
    // not empty (another store's or volume record's clone), or gone: leave it
  }
}

/**
 * The parent's clone, open, when it can be trusted for a volume of `size` bytes whose new
 * clone is `fresh`; otherwise why not.
 */
export function openParentClone(parent: SnapshotRecord, size: number, fresh: ReflinkClone): { file: BlockFile } | { reason: string } {
  const c = parent.reflinkClone;
  if (!c) return { reason: `the parent snapshot ${parent.id} kept no reflink clone` };
  if (parent.volumeSize !== size) return { reason: `the volume was resized since the parent snapshot ${parent.id} (${parent.volumeSize} -> ${size} bytes)` };
  let file: BlockFile;
  try {
    file = BlockFile.open(c.path, { lock: 'none' });
  } catch (e) {
    const code = (e as { code?: string }).code;
    return { reason: code === 'ENOENT' ? `the reflink clone of the parent snapshot ${parent.id} is missing (${c.path})` : `the reflink clone of the parent snapshot ${parent.id} cannot be read (${(e as Error).message})` };
  }
  const st = file.stat();
  const why =
    !st.isRegular
      ? 'is not a regular file'
      : String(st.ino) !== c.ino || st.dev !== c.dev
        ? 'is another file than the one the parent recorded'
        : st.size !== c.size
          ? `has ${st.size} bytes, the parent recorded ${c.size}`
          : String(st.mtimeNs) !== c.mtimeNs || String(st.ctimeNs) !== c.ctimeNs
            ? 'was modified after the parent recorded it'
            : st.dev !== fresh.dev
              ? "is not on the new clone's filesystem"
              : undefined;
  if (why) {
    file.close();
    return { reason: `the reflink clone of the parent snapshot ${parent.id} ${why} (${c.path})` };
  }
  return { file };
}

/** An extent of FIEMAP, clipped to the file's size. */
interface Ext {
  start: number;
  end: number;
  physical: number;
  flags: number;
}

async function extentsOf(file: BlockFile, size: number): Promise<Ext[]> {
  const q = await native().fiemapAsync(file.fd, 0, size);
  const out: Ext[] = [];
  for (let i = 0; i + 3 < q.length; i += 4) {
    const start = q[i];
    const end = Math.min(size, q[i] + q[i + 2]);
    if (end > start) out.push({ start, end, physical: q[i + 1], flags: q[i + 3] });
  }
  return out.sort((a, b) => a.start - b.start);
}

/**
 * Walks [0, size) in pieces over which neither file's mapping changes; `piece(a, b, same,
 * dataInA)` gets each: `same` when both are holes, or both map it to the same physical
 * offsets with certain, equally written extents.
 */
function walk(a: Ext[], b: Ext[], size: number, piece: (from: number, to: number, same: boolean, dataInA: boolean) => void): void {
  let i = 0;
  let j = 0;
  let pos = 0;
  while (pos < size) {
    while (i < a.length && a[i].end <= pos) i++;
    while (j < b.length && b[j].end <= pos) j++;
    const ea = i < a.length && a[i].start <= pos ? a[i] : undefined;
    const eb = j < b.length && b[j].start <= pos ? b[j] : undefined;
    const next = Math.min(size, ea ? ea.end : i < a.length ? a[i].start : size, eb ? eb.end : j < b.length ? b[j].start : size);
    let same: boolean;
    if (!ea || !eb) same = !ea && !eb;
    else {
      same =
        !(ea.flags & UNCERTAIN) &&
        !(eb.flags & UNCERTAIN) &&
        (ea.flags & FIEMAP.UNWRITTEN) === (eb.flags & FIEMAP.UNWRITTEN) &&
        ea.physical + (pos - ea.start) === eb.physical + (pos - eb.start);
    }
    piece(pos, next, same, ea !== undefined);
    if (next <= pos) break; // cannot happen with sorted, clipped extents; never loop forever
    pos = next;
  }
}

/** Byte ranges of [0, size) where the two files may differ (see the note above). */
export async function changedRanges(fresh: BlockFile, parent: BlockFile, size: number): Promise<Array<{ offset: number; length: number }>> {
  const [a, b] = await Promise.all([extentsOf(fresh, size), extentsOf(parent, size)]);
  const out: Array<{ offset: number; length: number }> = [];
  walk(a, b, size, (from, to, same) => {
    if (same) return;
    const last = out[out.length - 1];
    if (last && last.offset + last.length === from) last.length += to - from;
    else out.push({ offset: from, length: to - from });
  });
  return out;
}

/**
 * The space a clone pins: bytes of its data extents that `volume` no longer maps to the same
 * physical offsets (computed when asked: it grows as the volume is written). Null when the
 * clone is not the one recorded, or either file cannot be read.
 */
export async function pinnedBytes(c: ReflinkClone, volume: string): Promise<number | null> {
  let cf: BlockFile | undefined;
  let vf: BlockFile | undefined;
  try {
    cf = BlockFile.open(c.path, { lock: 'none' });
    const st = cf.stat();
    if (!sameFileIdentity(c, st)) return null;
    vf = BlockFile.open(volume, { lock: 'none' });
    const [a, b] = await Promise.all([extentsOf(cf, c.size), extentsOf(vf, Math.max(c.size, vf.stat().size))]);
    let n = 0;
    walk(a, b, c.size, (from, to, same, dataInA) => {
      if (dataInA && !same) n += to - from;
    });
    return n;
  } catch {
    return null;
  } finally {
    cf?.close();
    vf?.close();
  }
}

/**
 * Removes the clones of volume record `volId` of store `storeId` in the folders `dirs`,
 * except those of snapshots in `keep`. Returns the paths removed. Best effort per file.
 */
export function removeClonesExcept(dirs: Iterable<string>, storeId: string, volId: string | undefined, keep: Set<string>): string[] {
  const removed: string[] = [];
  for (const dir of new Set(dirs)) {
    let names: string[];
    try {
      names = fs.readdirSync(dir);
    } catch {
      continue; // no folder: no clones there
    }
    for (const n of names) {
      const m = CLONE_RE.exec(n);
      if (!m || m[1] !== storeId || (volId !== undefined && m[2] !== volId) || keep.has(m[3])) continue;
      try {
        fs.rmSync(path.join(dir, n), { force: true });
        removed.push(path.join(dir, n));
      } catch {
        // a clone we may not remove costs space, never correctness (it is never trusted)
      }
    }
    rmdirIfEmpty(dir);
  }
  return removed;
}

/** The snapshot whose clone the volume's next snapshot would use: its latest completed one. */
export function cloneOwner(snapshots: SnapshotRecord[], volId: string): SnapshotRecord | undefined {
  return snapshots.filter((s) => s.volumeId === volId && s.state === 'completed').pop();
}
