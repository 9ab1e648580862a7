/**
 * Changed-block tracking for one consumer of a qcow2 image (a storage volume's snapshot
 * series in one store: each store its own prefix, so that two stores of one volume never
 * remove each other's bitmaps) with QEMU persistent dirty bitmaps, crash-safe by rotation
 * rather than clearing:
 *
 *   snapshot N starts   (one exclusive open of the image, so no writer runs in between)
 *       - read bitmap <prefix><N-1> (the changes since snapshot N-1 started), if trusted
 *       - add bitmap <prefix><N>, empty and enabled: from here on it sees every write
 *   snapshot N reads the dirty areas, completes
 *   finishTracking(N)   removes every <prefix>* bitmap but <prefix><N>
 *
 * A crash anywhere leaves <prefix><N-1> in place (it still covers everything since the last
 * completed snapshot started), and perhaps <prefix><N> too (harmless: the next snapshot
 * uses the bitmap of its parent and removes the others). A write made between the read and
 * the end of the snapshot is in <prefix><N>, so it cannot be lost. Nothing is ever
 * cleared, so there is no moment at which a change is recorded nowhere.
 *
 * Trust: a bitmap is used only when it exists, is enabled, is not in use (no process holds
 * the image while we do, so in_use means a writer died), the extension is not stale
 * (autoclear bit), and granularity and virtual size are those recorded when it was made.
 * Otherwise the verdict says why, and the caller scans as it would without a bitmap.
 */
import { BlockFile } from '../../engine/file';
import { isDisksnapError } from '../../engine/errors';
import { DirtyRange } from './bitmaps';
import { DEFAULT_GRANULARITY, PersistentBitmaps } from './bitmap-writer';
import { FileBitmapHost } from './bitmap-file';

export interface TrackingBase {
  /** id of the generation whose bitmap holds the changes since it started */
  id: string;
  /** the name its bitmap was made under, when not <prefix><id> (an earlier naming) */
  name?: string;
  /** virtual size and granularity when that bitmap was added */
  virtualSize: number;
  granularity: number;
}

export type TrackingVerdict =
  | { usable: true; bitmap: string; ranges: DirtyRange[] }
  | { usable: false; reason: string };

export interface TrackingStart {
  verdict: TrackingVerdict;
  /** the bitmap added for this generation (undefined when it could not be added) */
  added: { name: string; granularity: number; virtualSize: number } | undefined;
  /** why no bitmap could be added (the image is locked, version 2, ...) */
  addError: string | undefined;
}

/** Granularity of a new tracking bitmap: 64 KiB, or the cluster size when larger. */
export function trackingGranularity(clusterSize: number): number {
  return Math.max(DEFAULT_GRANULARITY, clusterSize);
}

/**
 * Reads the bitmap of `base` (when given) and adds the bitmap of generation `id`, in one
 * exclusive open. Never throws for an untrusted or missing bitmap: the verdict says why.
 * Throws only what the caller cannot go on without (ENOENT of the image, ...) — and ELOCKED
 * or a refused write become a verdict too, since scanning without a bitmap still works.
 */
export function beginTracking(path: string, prefix: string, id: string, base: TrackingBase | undefined): TrackingStart {
  let file: BlockFile;
  try {
    file = BlockFile.open(path, { write: true });
  } catch (e) {
    if (isDisksnapError(e) && (e.code === 'ELOCKED' || e.code === 'EACCES' || e.code === 'EROFS')) {
      const why = `the image cannot be opened for writing (${e.code}: ${e.message})`;
      return { verdict: { usable: false, reason: why }, added: undefined, addError: why };
    }
    throw e;
  }
  try {
    let host: FileBitmapHost;
    let bitmaps: PersistentBitmaps;
    try {
      host = new FileBitmapHost(file);
      bitmaps = PersistentBitmaps.open(host, host.header);
    } catch (e) {
      // Malformed bitmap metadata, a dirty or version 2 image: no tracking, a scan still works.
      if (!isDisksnapError(e)) throw e;
      const why = `the image's bitmaps cannot be used (${e.code}: ${e.message})`;
      return { verdict: { usable: false, reason: why }, added: undefined, addError: why };
    }
    const verdict = judge(bitmaps, host, prefix, base);
    let added: TrackingStart['added'];
    let addError: string | undefined;
    try {
      const g = trackingGranularity(host.clusterSize);
      if (bitmaps.find(prefix + id)) bitmaps.remove(prefix + id); // left by an earlier attempt of the same id
      bitmaps.add(prefix + id, { granularity: g });
      added = { name: prefix + id, granularity: g, virtualSize: host.virtualSize };
    } catch (e) {
      if (!isDisksnapError(e)) throw e;
      addError = e.message;
    }
    host.sync();
    return { verdict, added, addError };
  } finally {
    file.close();
  }
}

function judge(bitmaps: PersistentBitmaps, host: FileBitmapHost, prefix: string, base: TrackingBase | undefined): TrackingVerdict {
  if (!base) return { usable: false, reason: 'no earlier snapshot to compare with' };
  const name = base.name ?? prefix + base.id;
  if (bitmaps.state === 'stale') return { usable: false, reason: 'the bitmaps are inconsistent: a program lacking bitmap support wrote the image (autoclear bit cleared)' };
  const e = bitmaps.find(name);
  if (!e) return { usable: false, reason: `bitmap '${name}' is missing` };
  if (e.inUse) return { usable: false, reason: `bitmap '${name}' is in use although no process holds the image: its last writer did not save it` };
  if (!e.auto) return { usable: false, reason: `bitmap '${name}' was disabled` };
  if (e.granularity !== base.granularity) return { usable: false, reason: `bitmap '${name}' has granularity ${e.granularity}, not the ${base.granularity} it was made with` };
  if (host.virtualSize !== base.virtualSize) return { usable: false, reason: `the virtual size changed from ${base.virtualSize} to ${host.virtualSize}` };
  try {
    return { usable: true, bitmap: name, ranges: bitmaps.dirtyRanges(name) };
  } catch (err) {
    if (!isDisksnapError(err)) throw err;
    return { usable: false, reason: `bitmap '${name}' cannot be read: ${err.message}` };
  }
}

/**
 * Removes every bitmap of this consumer but `keepId`'s, and those named in `also` (a base's
 * bitmap under an earlier naming). Returns the names removed; a lock held by another process
 * (QEMU running) leaves them for next time (they cost only space).
 */
export function finishTracking(path: string, prefix: string, keepId: string, also: readonly string[] = []): string[] {
  let file: BlockFile;
  try {
    file = BlockFile.open(path, { write: true });
  } catch (e) {
    if (isDisksnapError(e, 'ELOCKED')) return [];
    throw e;
  }
  try {
    const host = new FileBitmapHost(file);
    const bitmaps = PersistentBitmaps.open(host, host.header);
    if (bitmaps.state !== 'consistent') return [];
    const gone = bitmaps
      .list()
      .map((e) => e.name)
      .filter((n) => (n.startsWith(prefix) || also.includes(n)) && n !== prefix + keepId);
    for (const n of gone) bitmaps.remove(n);
    host.sync();
    return gone;
  } finally {
    file.close();
  }
}
