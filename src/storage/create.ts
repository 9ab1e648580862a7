/**
 * `snapshot create`: the volume's record (registered on first use), the parent (the last
 * completed snapshot of the volume under the same key), a pending record with a lease, then
 * attempts of ./capture.ts until one reads the volume without it moving (a retry by default),
 * and the record completed or marked `error` (./lifecycle.ts).
 *
 * A volume whose filesystem is mounted is read at a point in time (src/host/point-in-time.ts):
 * frozen while a reflink clone is made and the clone read ('frozen-clone'), frozen while its
 * FUSE server starts copy-before-write and its frozen moment read through that server
 * ('frozen-cbw', bounded by cbwLimit; preservedBytes recorded), or frozen for the whole read
 * ('frozen'); with noFreeze it is 'crash-consistent'. Each attempt gets its own
 * view, released (thawed, clone removed) when the attempt ends, however it ends. The image of
 * a running VM is made unchanging by ./live.ts instead (QEMU switched to a temporary overlay),
 * which passes `heldBy`: the volume is read as it is, with the consistency live.ts reached
 * ('guest-frozen' or 'crash-consistent'), and no persistent bitmap is read or added.
 *
 * A raw regular file on xfs or btrfs gets a reflink clone of that view, which the snapshot
 * keeps beside the volume for its successor (./reflink.ts: where it lives, why it is trusted,
 * the crash ordering, and which of clone and volume is read); the successor reads only the
 * blocks whose extents differ between its clone and this one. The clone is claimed by the
 * record turning `completed`; after that the older clones of the volume are removed
 * (pruneClones). noReflink opts out.
 */
import { BlockFile } from '../engine/file';
import { busy, invalid } from '../engine/errors';
import { openCapture, type CaptureSource, type Consistency } from '../host/point-in-time';
import { KeyRing, isExplicit } from './keys';
import { PLAIN_CODEC, Store, sealedCodec } from './store/store';
import { TagKey, tagKeyFrom } from './store/tags';
import { RetentionPolicy, SnapshotJson, SnapshotRecord, VolumeRecord } from './store/records';
import { ProgressFn, StoreOptions, findVolumeByPath, holding, openVolume, realVolumePath, threadsOf, volumeSizeOf, withStoreLock } from './common';
import { Faults, faultsOf } from './faults';
import { Captured, completeSnapshot, failSnapshot, pendingRecord, progressSaver } from './lifecycle';
import { ensureVolume } from './volumes';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ChangeDetector, GuestVolume, ParentView, ReflinkView, VolumeChanged, capture } from './capture';
import { NewClone, changedRanges, cloneDir, cloneOwner, openParentClone, removeClonesExcept, takeClone } from './reflink';
import { changeSourceOf, pickDetector } from './detect';
import { pruneSnapshots, type PruneReport } from './prune';
import { detectFormat, openImage } from '../image';
import { beginTracking, finishTracking, type TrackingStart } from '../image/qcow2/bitmap-tracker';
import { readBitmap } from '../image/qcow2/bitmap-file';

export interface CreateSnapshotOptions extends StoreOptions {
  /** false: no change tags (src/storage/store/tags.ts): every block is hashed, none recorded */
  changeTags?: boolean;
  name?: string;
  description?: string;
  tags?: Record<string, string>;
  /** block size for a store this call creates */
  blockSize?: number;
  onProgress?: ProgressFn;
  /** attempts after the first when the volume changes while being read (default 1) */
  retries?: number;
  /**
   * A mounted volume is frozen for the read (or for a reflink clone) unless this is set; the
   * snapshot is then recorded as crash-consistent (src/host/point-in-time.ts has the cases).
   */
  noFreeze?: boolean;
  /** do not read a reflink clone of a mounted volume: stay frozen while reading it */
  noClone?: boolean;
  /** the bound of a copy-before-write preserve file (a raw volume attached via FUSE; src/host/cbw.ts) */
  cbwLimit?: number;
  /**
   * Do not keep a reflink clone of a raw volume for the next snapshot (./reflink.ts); any the
   * volume has is removed once this snapshot completes (CLI: --no-reflink).
   */
  noReflink?: boolean;
  /**
   * Read and compare every data block, trusting no record of what changed since the parent (a
   * qcow2 volume's bitmap, reflink clones, unchanged times): for a volume changed behind those
   * records' backs (its file edited by a tool that bypasses QEMU, metadata damaged). Only the
   * blocks the store lacks are still written, and the records for the next snapshot (bitmap,
   * clone) are still kept. CLI: --read-all.
   */
  readAll?: boolean;
  /** called with a line of information for the user (a retry) */
  onLog?: (message: string) => void;
  /** called with what the volume's retention policy (volume policy) removed after the snapshot */
  onPrune?: (report: PruneReport) => void;
  /**
   * The caller made the volume unchanging itself (a live snapshot: ./live.ts switched QEMU to
   * a temporary overlay): the volume is read as it is, with this consistency and freeze time
   * recorded; no bitmap is trusted or added (QEMU's writes go to the overlay, and a header
   * write under QEMU is not ours to make): every block is compared with the parent's.
   */
  heldBy?: { consistency: Consistency; frozenMs: number | null; reason: string };
}

/**
 * Takes a snapshot of `volume` (a raw image file or block device). Registers the volume when
 * the store does not know it, and creates the store when it does not exist. When the volume
 * has a retention policy (`volume policy`), it is applied to the volume's snapshots once this
 * one has completed (which it always keeps); a failure to prune is reported (onLog) and does
 * not fail the snapshot.
 */
export async function createSnapshot(volume: string, opts: CreateSnapshotOptions = {}): Promise<SnapshotJson> {
  // the policy comes with the volume record the snapshot read anyway: no second store open
  const { out, policy } = await takeSnapshot(volume, opts);
  if (out.state !== 'completed' || !policy) return out;
  try {
    // (not `onPrune?.(await pruneSnapshots(...))`: an optional call skips its arguments, and
    // the policy then went unapplied for every caller without onPrune)
    const report = await pruneSnapshots(policy, { ...opts, volume: out.volumeId, protect: { ids: [out.id], reason: 'just taken' } });
    opts.onPrune?.(report);
  } catch (e) {
    opts.onLog?.(`the retention policy of volume ${out.volumeId} could not be applied: ${(e as Error).message}`);
  }
  return out;
}

async function takeSnapshot(volume: string, opts: CreateSnapshotOptions): Promise<{ out: SnapshotJson; policy: RetentionPolicy | null }> {
  if (opts.name !== undefined && typeof opts.name !== 'string') throw invalid('name must be a string');
  // The volume first: a typo in its path must not create a store as a side effect.
  const real = realVolumePath(volume);
  const file = openVolume(real, false);
  // A qcow2 volume is read as what its guest sees (src/image), not as the bytes of its file.
  const format = detectFormat(real);
  try {
    const store = await Store.open(opts.store, { create: true, blockSize: opts.blockSize });
    return await withStoreLock(store, 'shared', opts, async () => {
      // independent reads, at once (on S3 each is a few round trips); a plain volume's tag key
      // with them (only read here: volumeAndKeys makes it where it is missing)
      if (opts.changeTags !== false) store.backend.prefetch(['tag.key']);
      const [{ vol, cstore, tk }, listing] = await Promise.all([volumeAndKeys(store, real, file, opts), store.listSnapshots()]);
      await store.reapStale(listing);
      // The parent is compared digest by digest: it must be under the same key (or none).
      const parent = listing.snapshots
        .filter((s) => s.volumeId === vol.id && s.state === 'completed' && s.blockSize === store.blockSize && s.keyId === vol.keyId)
        .pop();
      const rec = pendingRecord({
        volumeId: vol.id,
        name: opts.name ?? '',
        description: opts.description ?? '',
        tags: { ...(opts.tags ?? {}) },
        encrypted: vol.encrypted,
        blockSize: store.blockSize,
        volumeSize: volumeSizeOf(file, file.stat()),
        parentId: parent?.id ?? null,
        volumePath: real,
        consistency: null,
        frozenMs: null,
        preservedBytes: null,
        keyId: vol.keyId,
        copiedFrom: null,
      });
      if (parent) cstore.prefetchParent(parent); // read while the lease and the record are written
      const lease = await store.takeLease(rec.id);
      return holding(lease, `the lease of ${rec.id}`, opts.onLog, async () => {
        const guest = format !== 'qcow2' ? undefined : opts.heldBy ? heldGuest(rec, opts.heldBy) : startGuest(file, real, store.config.id, vol.id, rec, parent);
        // A raw regular file may be tracked by reflink clones kept beside it (./reflink.ts).
        const raw = !guest && file.stat().isRegular;
        const plan: ReflinkPlan | undefined = raw && !opts.noReflink ? { storeId: store.config.id, noClone: !!opts.noClone } : undefined;
        if (raw && opts.noReflink) rec.changeSourceReason = 'reflink tracking turned off (--no-reflink)';
        // The pending record is written while the capture starts, not before it: it heads the
        // record's chain of writes (progressSaver), which the final record waits for, and a
        // write that fails costs nothing but the record's visibility meanwhile (a command killed
        // before it lands leaves objects no record names, which gc removes). A directory store's
        // record write (a temporary file, fsync, rename, directory fsync) took ~2 ms on the
        // critical path of a ~0.16 s bitmap incremental; an S3 store's is a PUT.
        const pendingWritten = cstore.writeSnapshot(rec);
        pendingWritten.catch(() => undefined); // awaited through the capture's progress chain
        const out = await runCapture(cstore, file, rec, parent, opts, guest ? undefined : tk, guest, plan, pendingWritten);
        if (guest && rec.changeTracking) endGuest(file, real, store.config.id, vol.id, rec, guest, opts.onLog);
        if (raw) await pruneClones(store, rec, listing.snapshots, opts.onLog);
        return { out, policy: vol.retention };
      });
    });
  } finally {
    file.close();
  }
}

/**
 * The volume's record and the store under its codec. Encryption follows the volume: its key
 * is checked before anything is read or written.
 */
async function volumeAndKeys(store: Store, real: string, file: BlockFile, opts: CreateSnapshotOptions): Promise<{ vol: VolumeRecord; cstore: Store; tk: TagKey | undefined }> {
  const known = await findVolumeByPath(store, real);
  if (isExplicit(opts.key) && !known?.encrypted) {
    throw invalid(
      `volume ${real}${known ? ` (${known.id})` : ''} is not an encrypted volume, so its snapshots are not encrypted; ` +
        `register it with \`disksnap volume register ${real} --encrypted --key-file K\` before its first snapshot, or encrypt a snapshot by copying it with --encrypt`,
      real,
    );
  }
  const codec = known?.encrypted ? sealedCodec(await new KeyRing(opts.key).forId(store, known.keyId!, `volume ${real} (${known.id})`)) : PLAIN_CODEC;
  const tk = opts.changeTags === false ? undefined : codec.keys ? tagKeyFrom(codec.keys.tag) : await store.plainTagKey();
  const vol = await ensureVolume(store, real, file, file.stat(), known);
  if (vol.inPlaceRestore) {
    const r = vol.inPlaceRestore;
    throw busy(
      `volume ${real} (${vol.id}) has an unfinished in-place restore of ${r.snapshotId} (started ${r.startTime}); ` +
        `it holds a mix of two moments — re-run \`disksnap snapshot restore ${r.snapshotId} --in-place ${real}\` first`,
      real,
    );
  }
  return { vol, cstore: store.withCodec(codec), tk };
}

/**
 * Name prefix of the persistent bitmaps that store `storeId` keeps in a qcow2 volume for volume
 * `volId`. A volume's id is the same in every store (derived from its path: ./volumes.ts), so
 * the store's id is part of the name: with the volume's alone (the naming before, which
 * `legacyBitmapPrefix` still reads), a snapshot into one store removed the bitmap of the
 * other, and every incremental of a volume kept in two stores hashed all of its data.
 */
export function bitmapPrefix(storeId: string, volId: string): string {
  return `disksnap-${storeId}-${volId}-`;
}

/** The earlier prefix, one per volume: a parent's bitmap recorded under it is still read, then removed. */
function legacyBitmapPrefix(volId: string): string {
  return `disksnap-${volId}-`;
}

/** What one snapshot of a qcow2 volume knows before its attempts: the bitmap's verdict. */
interface GuestStart {
  /** dirty ranges of the parent's bitmap, when it can be trusted */
  dirty: Array<{ offset: number; length: number }> | undefined;
  /** the parent's bitmap under the earlier naming, removed with the older ones once this snapshot completes */
  legacy: string | undefined;
}

/**
 * Before the read of a qcow2 volume: reads the parent's persistent bitmap (if it can be
 * trusted) and adds this snapshot's own, in one exclusive open (src/image/qcow2/bitmap-
 * tracker.ts has why this order loses no write). Our shared lock on the volume steps aside
 * for that open.
 */
function startGuest(file: BlockFile, real: string, storeId: string, volId: string, rec: SnapshotRecord, parent: SnapshotRecord | undefined): GuestStart {
  const t = parent?.changeTracking;
  const prefix = bitmapPrefix(storeId, volId);
  // The parent's bitmap by the name its record gives, when that is one of this store's names
  // (a record that names any other bitmap is not followed: that one may track something else).
  const legacy = parent && t?.bitmap === legacyBitmapPrefix(volId) + parent.id ? t.bitmap : undefined;
  const ours = parent && t && (t.bitmap === prefix + parent.id || legacy !== undefined);
  const base = parent && t && ours && parent.volumeFormat === 'qcow2' ? { id: parent.id, name: t.bitmap, granularity: t.granularity, virtualSize: t.virtualSize } : undefined;
  file.setLock('none');
  let start: TrackingStart;
  try {
    start = beginTracking(real, prefix, rec.id, base);
  } finally {
    file.setLock('shared');
  }
  rec.changeTracking = start.added ? { bitmap: start.added.name, granularity: start.added.granularity, virtualSize: start.added.virtualSize } : null;
  if (start.verdict.usable) return { dirty: start.verdict.ranges, legacy };
  if (parent) {
    rec.changeSourceReason = !t
      ? `the parent snapshot ${parent.id} left no bitmap to compare with`
      : !ours
        ? `the parent snapshot ${parent.id} records bitmap '${t.bitmap}', which is not a name this store gives (${prefix}${parent.id})`
        : start.verdict.reason;
  }
  if (!start.added && start.addError) rec.changeSourceReason = `${rec.changeSourceReason ? `${rec.changeSourceReason}; ` : ''}no bitmap for the next snapshot: ${start.addError}`;
  return { dirty: undefined, legacy };
}

/** A qcow2 volume held unchanging by the caller (heldBy): no bitmap read, none added. */
function heldGuest(rec: SnapshotRecord, held: NonNullable<CreateSnapshotOptions['heldBy']>): GuestStart {
  rec.changeTracking = null;
  rec.changeSourceReason = held.reason;
  return { dirty: undefined, legacy: undefined };
}

/** After a completed snapshot of a qcow2 volume: the older disksnap bitmaps go (best effort). */
function endGuest(file: BlockFile, real: string, storeId: string, volId: string, rec: SnapshotRecord, g: GuestStart, onLog?: (m: string) => void): void {
  file.setLock('none');
  try {
    finishTracking(real, bitmapPrefix(storeId, volId), rec.id, g.legacy === undefined ? [] : [g.legacy]);
  } catch (e) {
    // The snapshot is complete either way; an older bitmap left behind costs only space and
    // is removed by the next snapshot.
    onLog?.(`older bitmaps of ${real} were not removed: ${(e as Error).message}`);
  } finally {
    file.setLock('shared');
  }
}

/** The guest view of one attempt, with the bitmap's dirty ranges on the first attempt only. */
function openGuest(path: string, rec: SnapshotRecord, g: GuestStart, attempt: number): GuestVolume {
  const image = openImage(path, { readLock: 'shared' });
  rec.volumeFormat = 'qcow2';
  rec.volumeChain = (image.info(true).chain ?? []).map((l) => l.path);
  // A retry means the volume was written during the read: the bitmap read before the first
  // attempt no longer covers every change, so every data block is hashed instead.
  const dirty = attempt === 1 ? g.dirty : undefined;
  if (g.dirty && !dirty) rec.changeSourceReason = 'the volume was written while it was read; every block was hashed on the retry';
  const mine = rec.changeTracking?.bitmap;
  return {
    image,
    dirty,
    // Any write since our bitmap was added (before the read) moves the volume: exact, unlike mtime.
    moved: mine
      ? () => {
          try {
            const r = readBitmap(path, mine);
            return r.length ? `written while it was read (${r.length} dirty range${r.length > 1 ? 's' : ''} in bitmap '${mine}')` : undefined;
          } catch (e) {
            return `bitmap '${mine}' cannot be read back (${(e as Error).message})`;
          }
        }
      : undefined,
  };
}

/** changeSourceReason of a snapshot taken with readAll. */
const READ_ALL = 'every block read and compared, as asked (read-all)';

/** Attempts until one reads the volume without it moving, then the record completed (or `error`). */
async function runCapture(
  store: Store,
  file: BlockFile,
  rec: SnapshotRecord,
  parent: SnapshotRecord | undefined,
  opts: CreateSnapshotOptions,
  tk: TagKey | undefined,
  guestStart?: GuestStart,
  plan?: ReflinkPlan,
  pendingWritten?: Promise<void>,
): Promise<SnapshotJson> {
  const progress = progressSaver(store, rec, undefined, pendingWritten);
  const attempts = 1 + Math.max(0, opts.retries ?? 1);
  const faults = faultsOf(opts);
  let writer: Captured | undefined;
  let kept: NewClone | undefined;
  try {
    for (let attempt = 1; !writer; attempt++) {
      const src = await captureSource(store, rec.volumePath, opts, faults);
      rec.consistency = src.consistency;
      // The clone of a mounted volume is read in its place; the snapshot stays the volume's.
      let from: BlockFile | undefined;
      let guest: GuestVolume | undefined;
      let track: ReflinkAttempt = {};
      try {
        track = plan ? await reflinkAttempt(plan, rec, parent, src) : {};
        const reflink = opts.readAll ? undefined : track.view; // (read-all: the clone is kept for next time, not trusted now)
        // The clone is read when the blocks to read were chosen by comparing it with the
        // parent's (the rest comes from the parent: all of one moment only through the clone),
        // for a mounted volume, and on a retry after a writer moved the volume. A read of every
        // block goes to the live volume first, whose page cache the fresh clone (a new inode)
        // lacks (1 GiB on xfs: 9.2 s through the clone, 5.6 s live); the capture proves it one
        // moment. Writes between the clone and the read show next time as moved extents.
        const viaClone = track.clone && (reflink !== undefined || attempt > 1 || src.path !== rec.volumePath);
        from = viaClone ? track.clone!.file : src.path === rec.volumePath ? file : BlockFile.open(src.path, { lock: 'shared' });
        guest = guestStart ? openGuest(src.path, rec, opts.readAll ? { ...guestStart, dirty: undefined } : guestStart, attempt) : undefined;
        // Read live (not frozen, not a clone, not through an image's guest view): the capture
        // proves the read is of one moment.
        const prove = !guest && from === file && src.consistency !== 'frozen';
        // (the test hook runs once the record writes begun so far have landed: see Faults.afterChunk)
        const afterChunk = faults.afterChunk && (async (a: number, c: number) => (await progress.settle(), faults.afterChunk!(a, c)));
        const settings = { guest, reflink, threads: threadsOf(opts), attempt, tk, prove, proveByReading: faults.proveByReading, onProgress: opts.onProgress, onLog: opts.onLog, saveProgress: progress.save, afterChunk };
        const pick = (view: ParentView, g?: GuestVolume, r?: ReflinkView, unchanged?: boolean): ChangeDetector => {
          const d = pickDetector(view, g, r, unchanged && !opts.readAll);
          rec.changeSource = changeSourceOf(d);
          if (r && !view.cursor) rec.changeSourceReason = `the manifest of the parent snapshot ${parent?.id} cannot be read`;
          // (read-all comes first; a reason recorded before it, a bitmap not added, stays after it)
          if (opts.readAll && view.cursor && !rec.changeSourceReason?.startsWith(READ_ALL)) rec.changeSourceReason = rec.changeSourceReason ? `${READ_ALL}; ${rec.changeSourceReason}` : READ_ALL;
          return d;
        };
        writer = await capture(store, from, rec, parent, pick, settings, () => src.release());
        kept = track.clone;
      } catch (e) {
        // this attempt's clone is never claimed: it goes with the attempt
        track.clone?.discard();
        rec.reflinkClone = null;
        if (!(e instanceof VolumeChanged)) throw e;
        if (attempt >= attempts) {
          throw busy(`volume ${rec.volumePath} changed while it was being read (${e.message}), ${attempts} times; stop the writers of the volume (or unmount it) and try again`, rec.volumePath);
        }
        opts.onLog?.(`volume ${rec.volumePath} changed while it was being read (${e.message}); starting over`);
      } finally {
        guest?.image.close();
        if (from && from !== file) from.close();
        await src.release();
        rec.frozenMs = src.frozenMs === undefined ? null : Math.round(src.frozenMs * 10) / 10;
        rec.preservedBytes = src.preservedBytes ?? null;
      }
    }
    return await completeSnapshot(store, rec, writer, progress, () => (writer = undefined), opts.onLog);
  } catch (e) {
    if (kept && rec.state !== 'completed') {
      kept.discard();
      rec.reflinkClone = null;
    }
    throw await failSnapshot(store, rec, writer, progress, e);
  }
}

/** Reflink tracking of a raw volume in this store. */
interface ReflinkPlan {
  storeId: string;
  /** the caller asked for a mounted volume to be read frozen rather than through a clone */
  noClone: boolean;
}

/** One attempt's clone (read instead of the volume), and the changed ranges where the parent's clone is trusted. */
interface ReflinkAttempt {
  clone?: NewClone;
  view?: ReflinkView;
}

/**
 * Takes this attempt's clone of the volume (of its point-in-time view when mounted: the same
 * moment) and compares it with the parent's, if that one can be trusted. Every failure here
 * only costs speed: the snapshot falls back to the change tags, with the reason recorded.
 */
async function reflinkAttempt(plan: ReflinkPlan, rec: SnapshotRecord, parent: SnapshotRecord | undefined, src: CaptureSource): Promise<ReflinkAttempt> {
  rec.changeSourceReason = null;
  // Read frozen (no reflinks there, or noClone), or its frozen moment through a FUSE server's
  // copy-before-write: no clone of that moment can be taken.
  if (src.consistency === 'frozen' || src.consistency === 'frozen-cbw') {
    if (plan.noClone) rec.changeSourceReason = 'the mounted volume was read frozen, not through a clone (noClone)';
    return {};
  }
  let made: ReturnType<typeof takeClone>;
  try {
    made = takeClone(rec.volumePath, src.path, plan.storeId, rec.volumeId, rec.id);
  } catch (e) {
    rec.changeSourceReason = `no reflink clone could be kept: ${(e as Error).message}`;
    return {};
  }
  // A filesystem that cannot share extents (ext4, tmpfs) is not a reason worth recording.
  if ('reason' in made) return {};
  rec.reflinkClone = made.identity;
  if (!parent) return { clone: made };
  const prev = openParentClone(parent, made.identity.size, made.identity);
  if ('reason' in prev) {
    rec.changeSourceReason = prev.reason;
    return { clone: made };
  }
  try {
    return { clone: made, view: { dirty: await changedRanges(made.file, prev.file, made.identity.size) } };
  } catch (e) {
    rec.changeSourceReason = `the extents of the reflink clones cannot be compared (${(e as Error).message})`;
    return { clone: made };
  } finally {
    prev.file.close();
  }
}

/**
 * After a snapshot of a raw volume: only the clone of the volume's latest completed snapshot
 * (and those of snapshots still being taken) is kept; stale ones go. Best effort: a clone left
 * behind costs space, never correctness (nothing completed claims it, or it is no parent's).
 * The store is listed again (snapshots may have started since `before` was listed) only when
 * a clone folder of the volume exists: where reflinks are not made (ext4) that second listing
 * was most of this step, and with a long history a good part of a snapshot.
 */
async function pruneClones(store: Store, rec: SnapshotRecord, before: SnapshotRecord[], onLog?: (m: string) => void): Promise<void> {
  try {
    const known = [cloneDir(rec.volumePath), ...before.filter((s) => s.volumeId === rec.volumeId && s.reflinkClone).map((s) => path.dirname(s.reflinkClone!.path))];
    if (!known.some((d) => fs.existsSync(d))) return;
    const { snapshots } = await store.listSnapshots();
    const keep = new Set<string>();
    const owner = cloneOwner(snapshots, rec.volumeId);
    if (owner) keep.add(owner.id);
    const dirs = [cloneDir(rec.volumePath)];
    for (const s of snapshots) {
      if (s.volumeId !== rec.volumeId) continue;
      if (s.reflinkClone) dirs.push(path.dirname(s.reflinkClone.path));
      if (s.state === 'pending' && !(await store.writerGone(s.id))) keep.add(s.id);
    }
    removeClonesExcept(dirs, store.config.id, rec.volumeId, keep);
  } catch (e) {
    onLog?.(`stale reflink clones of ${rec.volumePath} were not removed: ${(e as Error).message}`);
  }
}

/** Where one attempt reads from: the automatic point-in-time view, or the test hook's. */
async function captureSource(store: Store, volume: string, opts: CreateSnapshotOptions, faults: Faults): Promise<CaptureSource> {
  if (opts.heldBy) {
    const { consistency, frozenMs } = opts.heldBy;
    return { path: volume, consistency, frozenMs: frozenMs ?? undefined, release: async () => undefined };
  }
  if (faults.freeze) {
    let thaw = await faults.freeze(volume);
    return {
      path: volume,
      consistency: thaw ? 'frozen' : 'not-mounted',
      frozenMs: undefined,
      release: async () => {
        const t = thaw;
        thaw = undefined; // once: release comes early (reads done) and again in `finally`
        if (t) await t();
      },
    };
  }
  return openCapture(volume, { noFreeze: opts.noFreeze, noClone: opts.noClone, cbwLimit: opts.cbwLimit, onLog: opts.onLog, storeDir: store.dir });
}
