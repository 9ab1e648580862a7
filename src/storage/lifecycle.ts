/**
 * The life of a snapshot record, shared by create and copy: `pending` (with progress saved
 * at most ~2/s, from half a second in), then `completed` once its blocks and manifest are
 * durable, or `error` with the reason. Steps 2-4 of the durability order in ./index.ts happen
 * here.
 */
import * as os from 'node:os';
import type { Store } from './store/store';
import { DisksnapError } from '../engine/errors';
import type { ManifestWriter } from './store/manifest';
import { type TagWriter, tagsKey } from './store/tags';
import { PackWriter, packsKey } from './store/packs';
import { SnapshotJson, SnapshotRecord, emptyStats, newId, snapshotJson } from './store/records';

const PROGRESS_INTERVAL_MS = 500;

/** What a capture or copy produced: the manifest, and the change tags where there are any. */
export interface Captured {
  manifest: ManifestWriter;
  tags?: TagWriter;
  /** the packs of a packed manifest (./store/packs.ts): its pack index is written beside it */
  packs?: PackWriter;
  /** settles once every object write of the capture is done (rejects with the first that failed) */
  written?: Promise<void>;
}

/** A new pending record; `fields` fills what the operation knows (volume, sizes, names...). */
export function pendingRecord(
  fields: Omit<
    SnapshotRecord,
    'id' | 'state' | 'progress' | 'startTime' | 'completionTime' | 'stats' | 'error' | 'creator' | 'sealedMetadata' | 'metadataHidden' | 'changeSource' | 'changeSourceReason' | 'changeTracking' | 'volumeFormat' | 'volumeChain' | 'reflinkClone' | 'volumeStat' | 'lockedUntil'
  >,
): SnapshotRecord {
  return {
    id: newId('snap'),
    state: 'pending',
    progress: 0,
    startTime: new Date().toISOString(),
    completionTime: null,
    stats: emptyStats(),
    error: null,
    creator: { pid: process.pid, host: os.hostname() },
    sealedMetadata: null,
    metadataHidden: false,
    changeSource: null,
    changeSourceReason: null,
    changeTracking: null,
    volumeFormat: null,
    volumeChain: null,
    reflinkClone: null,
    volumeStat: null,
    lockedUntil: null, // a copy is not locked: locks belong to a snapshot in its store
    ...fields,
  };
}

export interface ProgressSaver {
  save: (percent: number) => void;
  /** waits for every queued write, so a late one cannot overwrite the final record */
  settle: () => Promise<void>;
}

/**
 * Progress of a pending snapshot, rewritten atomically at most ~2/s, the first time once the
 * work has run PROGRESS_INTERVAL_MS: the pending record already says 0%, and a snapshot done
 * sooner never rewrites it. Before session 37 the first chunk rewrote it at once: a bitmap
 * incremental of ~0.15 s paid a record write (a temporary file, fsync, rename, directory
 * fsync) in the middle of its dirty-range scan. Writes are chained; a failed one is dropped on
 * purpose (progress is a hint; the final state is written apart and reports its own failure).
 * `first`: a write of the record already under way (`snapshot create`'s pending record, which
 * the capture does not wait for), chained first: no later write of the record can land
 * before it, and `settle` waits for it too.
 */
export function progressSaver(store: Store, rec: SnapshotRecord, now: () => number = Date.now, first?: Promise<void>): ProgressSaver {
  let chain: Promise<void> = first ? first.catch(() => undefined) : Promise.resolve();
  let lastWrite = now();
  return {
    save: (percent) => {
      const t = now();
      if (t - lastWrite < PROGRESS_INTERVAL_MS || percent === rec.progress) return;
      lastWrite = t;
      rec.progress = percent;
      const snap = { ...rec, stats: { ...rec.stats } };
      chain = chain.then(() => store.writeSnapshot(snap)).catch(() => undefined);
    },
    settle: () => chain,
  };
}

/** Percent of a pending operation, kept below 100 until it completes. */
export function percentOf(done: number, total: number): number {
  return total ? Math.min(99, Math.floor((done / total) * 100)) : 99;
}

/**
 * Steps 2-4 of the durability order: the new blocks' names and the manifest (at once; beside
 * them the change tags, a cache: a failure there only costs the next snapshot speed), then
 * the record.
 * `committed` is called once the manifest is durable (the caller must not abort it then).
 */
export async function completeSnapshot(
  store: Store,
  rec: SnapshotRecord,
  writer: Captured,
  progress: ProgressSaver,
  committed: () => void,
  onLog?: (msg: string) => void,
): Promise<SnapshotJson> {
  // The capture's last object writes, then their names (a directory store's fsyncs of their
  // directories), become durable beside the manifest, its pack index and the tags, not before
  // them: only the record, which waits for all of them, must come after.
  const written = writer.written ?? Promise.resolve();
  const names = written.then(() => store.backend.flush());
  names.catch(() => undefined); // awaited below, before the manifest counts as committed
  try {
    return await commitAndRecord(store, rec, writer, names, progress, committed, onLog);
  } catch (e) {
    await written.catch(() => undefined); // no write of this snapshot outlives its failure
    throw e;
  }
}

async function commitAndRecord(
  store: Store,
  rec: SnapshotRecord,
  writer: Captured,
  names: Promise<void>,
  progress: ProgressSaver,
  committed: () => void,
  onLog?: (msg: string) => void,
): Promise<SnapshotJson> {
  // Manifest and tags are written at once (one round trip or fsync, not two). Tags that landed
  // beside a manifest that failed belong to no completed snapshot: gc and the reaper remove them.
  const t = writer.tags;
  let tagsLost: string | undefined; // said once the snapshot is completed: a failed one says only why
  const tags = t?.commit().catch(async (e: unknown) => {
    await abortQuietly(t);
    tagsLost = (e as Error).message;
  });
  // The leases' renewal (proof that no gc took the store meanwhile: store.ts writeSnapshot)
  // goes at once with them: a bucket's round trip less before the record.
  const proof = store.renewLeases();
  proof.catch(() => undefined); // awaited below, after the manifest's own outcome
  // A packed manifest's pack index goes at once with it; the record names neither until both are durable.
  const packs = writer.packs;
  const index = packs?.index(writer.manifest.pieceDigests, writer.manifest.wholeDigests).then((b) => store.backend.put(packsKey(rec.id), b));
  index?.catch(() => undefined); // awaited below
  try {
    try {
      await writer.manifest.commit();
    } finally {
      await tags;
    }
    await index;
    await names;
  } catch (e) {
    // Nothing names what this attempt committed (the record's completing write has not begun):
    // it goes now, as an aborted manifest's temporary file does. Best effort: gc removes the
    // manifest, pack index and tags of a snapshot that is not completed all the same.
    await index?.catch(() => undefined);
    await Promise.all([store.manifestKey(rec.id), packsKey(rec.id), tagsKey(rec.id)].map((k) => store.backend.delete(k).catch(() => false)));
    throw e;
  }
  if (packs?.pending) throw new Error(`internal: a pack of ${rec.id} was not written before its record`);
  committed();
  await proof;
  await progress.settle();
  rec.state = 'completed';
  rec.progress = 100;
  rec.completionTime = new Date().toISOString();
  await store.writeSnapshot(rec, { leasesProven: true });
  if (tagsLost !== undefined) onLog?.(`change tags of ${rec.id} not written (${tagsLost}); its next snapshot hashes every block`);
  return snapshotJson(rec);
}

/**
 * After a failure: the manifest abandoned, the record `error` with the reason. Best effort:
 * a record left `pending` is reaped as `error` by the next command (its lease shows the writer
 * gone). Returns the error for the caller to throw: the first one, except when the record's
 * completing write failed and so did this `error` one. A store may have written a record whose
 * answer was lost (a gateway killed after it took the request), so the snapshot may stand
 * completed, whole (its manifest was durable first), while the command fails: the error says
 * so, and how to see which it is.
 */
export async function failSnapshot(store: Store, rec: SnapshotRecord, writer: Captured | undefined, progress: ProgressSaver, e: unknown): Promise<unknown> {
  const completing = rec.state === 'completed'; // set just before the record's completing write
  await progress.settle();
  if (writer) await abortQuietly(writer.manifest);
  if (writer?.tags) await abortQuietly(writer.tags);
  rec.state = 'error';
  rec.error = e instanceof Error ? e.message : String(e);
  const marked = await store.writeSnapshot(rec).then(
    () => true,
    () => false,
  );
  if (!completing || marked || !(e instanceof DisksnapError)) return e;
  return new DisksnapError(
    `${e.message}; whether ${rec.id} completed is unknown (the store may have taken the write whose answer failed): \`disksnap snapshot show ${rec.id} --store ${store.dir}\` says`,
    e.code,
    e.errno,
    e.path,
  );
}

/**
 * Abandons a manifest or tag file being written. Its temporary file is garbage gc removes,
 * so a failure to remove it now is dropped: the error being handled is the one to report.
 */
export async function abortQuietly(w: { abort(): Promise<void> }): Promise<void> {
  await w.abort().catch(() => undefined);
}
