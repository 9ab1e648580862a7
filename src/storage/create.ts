/**
 * `snapshot create`: the volume's record (registered on first use), the parent (the last
 * completed snapshot of the volume under the same key), a pending record with a lease, then
 * attempts of ./capture.ts until one reads the volume without it moving (a retry by default),
 * and the record completed or marked `error` (./lifecycle.ts).
 *
 * A volume whose filesystem is mounted is read at a point in time (src/host/point-in-time.ts):
 * frozen while a reflink clone is made and the clone read ('frozen-clone'), or frozen for the
 * whole read ('frozen'); with noFreeze it is 'crash-consistent'. Each attempt gets its own
 * view, released (thawed, clone removed) when the attempt ends, however it ends.
 */
import { BlockFile } from '../engine/file';
import { busy, invalid } from '../engine/errors';
import { openCapture, type CaptureSource } from '../host/point-in-time';
import { KeyRing, isExplicit } from './keys';
import { PLAIN_CODEC, Store, sealedCodec } from './store/store';
import { TagKey, tagKeyFrom } from './store/tags';
import { SnapshotJson, SnapshotRecord, VolumeRecord } from './store/records';
import { ProgressFn, StoreOptions, findVolumeByPath, openVolume, realVolumePath, threadsOf, volumeSizeOf, withStoreLock } from './common';
import { Faults, faultsOf } from './faults';
import { Captured, completeSnapshot, failSnapshot, pendingRecord, progressSaver } from './lifecycle';
import { ensureVolume } from './volumes';
import { VolumeChanged, capture } from './capture';
import { pickDetector } from './detect';

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
  /** called with a line of information for the user (a retry) */
  onLog?: (message: string) => void;
}

/**
 * Takes a snapshot of `volume` (a raw image file or block device). Registers the volume when
 * the store does not know it, and creates the store when it does not exist.
 */
export async function createSnapshot(volume: string, opts: CreateSnapshotOptions = {}): Promise<SnapshotJson> {
  if (opts.name !== undefined && typeof opts.name !== 'string') throw invalid('name must be a string');
  // The volume first: a typo in its path must not create a store as a side effect.
  const real = realVolumePath(volume);
  const file = openVolume(real, false);
  try {
    const store = await Store.open(opts.store, { create: true, blockSize: opts.blockSize });
    return await withStoreLock(store, 'shared', opts, async (): Promise<SnapshotJson> => {
      const { vol, cstore, tk } = await volumeAndKeys(store, real, file, opts);
      const listing = await store.listSnapshots();
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
        keyId: vol.keyId,
        copiedFrom: null,
      });
      const lease = await store.takeLease(rec.id);
      try {
        await cstore.writeSnapshot(rec);
        return await runCapture(cstore, file, rec, parent, opts, tk);
      } finally {
        await lease.release();
      }
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
  const vol = await ensureVolume(store, real, file, file.stat());
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

/** Attempts until one reads the volume without it moving, then the record completed (or `error`). */
async function runCapture(store: Store, file: BlockFile, rec: SnapshotRecord, parent: SnapshotRecord | undefined, opts: CreateSnapshotOptions, tk: TagKey | undefined): Promise<SnapshotJson> {
  const progress = progressSaver(store, rec);
  const attempts = 1 + Math.max(0, opts.retries ?? 1);
  const faults = faultsOf(opts);
  let writer: Captured | undefined;
  try {
    for (let attempt = 1; !writer; attempt++) {
      const src = await captureSource(store, rec.volumePath, opts, faults);
      rec.consistency = src.consistency;
      // The clone of a mounted volume is read in its place; the snapshot stays the volume's.
      let from: BlockFile | undefined;
      try {
        from = src.path === rec.volumePath ? file : BlockFile.open(src.path, { lock: 'shared' });
        const settings = { threads: threadsOf(opts), attempt, tk, onProgress: opts.onProgress, onLog: opts.onLog, saveProgress: progress.save, afterChunk: faults.afterChunk };
        writer = await capture(store, from, rec, parent, pickDetector, settings, () => src.release());
      } catch (e) {
        if (!(e instanceof VolumeChanged)) throw e;
        if (attempt >= attempts) {
          throw busy(`volume ${rec.volumePath} changed while it was being read (${e.message}), ${attempts} times; stop the writers of the volume (or unmount it) and try again`, rec.volumePath);
        }
        opts.onLog?.(`volume ${rec.volumePath} changed while it was being read (${e.message}); starting over`);
      } finally {
        if (from && from !== file) from.close();
        await src.release();
        rec.frozenMs = src.frozenMs === undefined ? null : Math.round(src.frozenMs * 10) / 10;
      }
    }
    return await completeSnapshot(store, rec, writer, progress, () => (writer = undefined), opts.onLog);
  } catch (e) {
    await failSnapshot(store, rec, writer, progress, e);
    throw e;
  }
}

/** Where one attempt reads from: the automatic point-in-time view, or the test hook's. */
async function captureSource(store: Store, volume: string, opts: CreateSnapshotOptions, faults: Faults): Promise<CaptureSource> {
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
  return openCapture(volume, { noFreeze: opts.noFreeze, noClone: opts.noClone, storeDir: store.dir });
}
