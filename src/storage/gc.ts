/**
 * Garbage collection: mark and sweep of block objects, under the exclusive store lock.
 *
 * Why it never races a snapshot in progress: every process that writes or reads block
 * objects (snapshot create, restore, verify, delete) holds the store lock shared for its
 * whole run; gc takes it exclusive, so while gc runs no snapshot is pending with a live
 * writer, and any `pending` record it finds belongs to a dead process (it is marked `error`
 * first). Blocks written by a dead writer are not referenced by a completed manifest and are
 * swept — they were never promised to anyone.
 *
 * Mark: every manifest of a `completed` snapshot is streamed and checked to its checksum;
 * its digests go into a DigestSet. A completed snapshot whose manifest cannot be read, or a
 * record that cannot be parsed but has a manifest that cannot be read, aborts gc before it
 * deletes anything (an incomplete mark set would delete live blocks). A damaged record with
 * a readable manifest keeps that manifest's blocks alive (conservative).
 *
 * Encrypted snapshots need no key here: their manifests' entries (keyed digests) are the
 * names of their objects; only the keyed trailer goes unchecked, which can only keep more.
 * Key records (`keys/`) are never removed: they are tiny, and a passphrase needs its salt.
 *
 * Packs (./store/packs.ts) are block objects too: a packed manifest's pack index marks the
 * packs its pieces are in, and a pack stays whole while any index names it.
 *
 * Sweep: block objects not in the set, temporary files of dead writers, manifests, change
 * tag files and pack indexes with no completed snapshot, and leases of dead writers are deleted; so are this
 * store's reflink clones (in the folders beside the volumes its volume and snapshot records
 * name) other than the one of each volume's latest completed snapshot. Each deletion
 * is independent, so a gc killed half-way leaves a store with less garbage and nothing else changed.
 */
import * as path from 'node:path';
import { DisksnapError } from '../engine/errors';
import { DigestSet } from './store/digestset';
import { ManifestReader } from './store/manifest';
import { packsOf, readPackIndex } from './store/packs';
import { SnapshotListing, Store } from './store/store';
import { DEFAULT_LOCK_WAIT_MS, StoreOptions, holding } from './common';
import { faultsOf } from './faults';
import { cloneDir, cloneOwner, removeClonesExcept } from './reflink';
import { binForGc, purgeEntry } from './bin';

export interface GcReport {
  /** snapshots that were pending with a dead writer and are now `error` */
  staleSnapshots: string[];
  /** completed snapshots whose blocks were kept */
  liveSnapshots: number;
  blocksKept: number;
  bytesKept: number;
  blocksFreed: number;
  bytesFreed: number;
  /** temporary files, stray manifests and leases removed */
  otherFilesRemoved: number;
  otherBytesFreed: number;
  /** reflink clones beside volumes (./reflink.ts) that no volume's next snapshot would use */
  reflinkClonesRemoved: string[];
  /** nothing was deleted or changed: the figures are what gc would free */
  dryRun: boolean;
  /** recycle-bin entries (./bin.ts) purged: expired, or superseded by a live snapshot */
  binPurged: string[];
  /** recycle-bin entries whose blocks were kept */
  binKept: number;
}

export interface GcOptions extends StoreOptions {
  /** called when gc has to wait for running snapshot commands */
  onWait?: () => void;
  /** what gc says beside its report (an exclusive lock it could not give back) */
  onLog?: (message: string) => void;
  /** mark and count, delete nothing (stale pending records stay as they are; clones are not swept) */
  dryRun?: boolean;
}

/** Mark and sweep of unreferenced blocks, under the exclusive store lock. */
export async function gc(opts: GcOptions = {}): Promise<GcReport> {
  const store = await Store.open(opts.store);
  const lock = await store.lock('exclusive', { waitMs: opts.lockWaitMs ?? DEFAULT_LOCK_WAIT_MS, onWait: opts.onWait });
  // (a lock not given back after a gc that finished runs out on its own; until then the store's
  // other commands wait, so gc says so, as the other commands do of theirs)
  return holding(lock, `the exclusive lock of store ${store.dir}`, opts.onLog, async () => {
    const listing = await store.listSnapshots();
    const staleSnapshots = opts.dryRun ? [] : await store.reapStale(listing);
    const { live, completed } = await mark(store, listing);
    const bin = await binForGc(store, new Set(listing.snapshots.map((s) => s.id)));
    for (const key of bin.keep) await markManifest(store, key, live);
    const beforeDelete = faultsOf(opts).beforeDelete;
    const del = async (key: string): Promise<boolean> => {
      if (opts.dryRun) return true; // counted as gc would free it
      await beforeDelete?.(key);
      store.assertLocked(); // a bucket's gc whose lease was lost stops before the next deletion
      return store.backend.delete(key);
    };
    // expired bin entries go before the sweep: their blocks, unmarked, are swept with the rest
    if (!opts.dryRun) for (const id of bin.purge) await purgeEntry(store, id);
    const report = await sweep(store, listing, live, completed, del);
    report.staleSnapshots = staleSnapshots;
    report.dryRun = !!opts.dryRun;
    report.binKept = bin.keep.length;
    report.binPurged = bin.purge;
    if (!opts.dryRun) report.reflinkClonesRemoved = await sweepClones(store, listing);
    if ((await store.backend.stat('store.json')) === undefined) {
      throw new DisksnapError(`store ${store.dir} lost its store.json during gc`, 'ECORRUPT');
    }
    return report;
  });
}

function stopped(store: Store, key: string, why: string): DisksnapError {
  return new DisksnapError(`gc stopped before deleting anything: ${why}`, 'ECORRUPT', undefined, store.backend.describe(key));
}

/** Every digest a completed snapshot (or a damaged record's readable manifest) references. */
async function mark(store: Store, listing: SnapshotListing): Promise<{ live: DigestSet; completed: Set<string> }> {
  const live = new DigestSet(4096);
  const completed = new Set<string>();
  for (const s of listing.snapshots) {
    if (s.state !== 'completed') continue;
    completed.add(s.id);
    const key = store.manifestKey(s.id);
    let reader: ManifestReader;
    try {
      // Sealed manifests too: gc holds no keys, and reading the entries is all it needs.
      reader = await store.openManifest(s, { unauthenticated: true });
    } catch (e) {
      throw stopped(store, key, `completed snapshot ${s.id} has an unreadable manifest (${(e as Error).message}); delete that snapshot or restore the file first`);
    }
    try {
      while ((await reader.next()) >= 0) live.add(reader.digest);
    } catch (e) {
      throw stopped(store, key, `manifest of completed snapshot ${s.id} is damaged (${(e as Error).message}); delete that snapshot first`);
    } finally {
      await reader.close();
    }
  }
  // Their packs: openManifest read each packed manifest's pack index into the store's table
  // (and refused a missing or damaged one, which stopped gc above), so none is read twice.
  for (const p of store.packs.packs()) live.add(p);
  // Damaged records: keep whatever their manifest references, if it is readable.
  for (const d of listing.damaged) {
    const key = store.manifestKey(d.id);
    if ((await store.backend.stat(key)) === undefined) continue;
    completed.add(d.id);
    let reader: ManifestReader | undefined;
    try {
      reader = await ManifestReader.open(store.backend.describe(key), await store.backend.open(key), {}, { unauthenticated: true });
      while ((await reader.next()) >= 0) live.add(reader.digest);
    } catch (e) {
      throw stopped(store, key, `snapshot ${d.id} has a damaged record (${d.error.message}) and a damaged manifest (${(e as Error).message})`);
    } finally {
      await reader?.close();
    }
    if (reader.header.packed) await markPacks(store, key, live);
  }
  return { live, completed };
}

/** Marks every digest of the manifest at `key` (a recycle-bin entry's: no record to open it by). */
async function markManifest(store: Store, key: string, live: DigestSet): Promise<void> {
  if ((await store.backend.stat(key)) === undefined) return;
  let reader: ManifestReader | undefined;
  try {
    reader = await ManifestReader.open(store.backend.describe(key), await store.backend.open(key), {}, { unauthenticated: true });
    while ((await reader.next()) >= 0) live.add(reader.digest);
  } catch (e) {
    throw stopped(store, key, `the recycle-bin manifest ${key} is damaged (${(e as Error).message})`);
  } finally {
    await reader?.close();
  }
  if (reader.header.packed) await markPacks(store, key, live);
}

/**
 * Marks the packs named by the pack index beside the packed manifest at `key` (`.map` ->
 * `.packs`, ./store/packs.ts): without it gc would free the pieces of a completed snapshot.
 */
async function markPacks(store: Store, key: string, live: DigestSet): Promise<void> {
  const at = key.replace(/\.map$/, '.packs');
  let entries: Buffer | undefined;
  try {
    entries = (await readPackIndex(store.backend, at))?.entries;
  } catch (e) {
    throw stopped(store, at, `the pack index ${at} is damaged (${(e as Error).message})`);
  }
  if (!entries) throw stopped(store, at, `the pack index ${at} of the manifest ${key} is missing`);
  for (const p of packsOf(entries)) live.add(p);
}

/** Deletes what nothing live references; each deletion independent of the others. */
async function sweep(store: Store, listing: SnapshotListing, live: DigestSet, completed: Set<string>, del: (key: string) => Promise<boolean>): Promise<GcReport> {
  const report: GcReport = {
    staleSnapshots: [],
    liveSnapshots: listing.snapshots.filter((s) => s.state === 'completed').length,
    blocksKept: 0,
    bytesKept: 0,
    blocksFreed: 0,
    bytesFreed: 0,
    otherFilesRemoved: 0,
    otherBytesFreed: 0,
    reflinkClonesRemoved: [],
    dryRun: false,
    binPurged: [],
    binKept: 0,
  };
  const other = async (o: { key: string; size: number }) => {
    if (!(await del(o.key))) return;
    report.otherFilesRemoved++;
    report.otherBytesFreed += o.size;
  };
  for await (const o of store.backend.list('blocks/')) {
    if (o.temporary) {
      await other(o);
      continue;
    }
    const name = path.posix.basename(o.key);
    if (!/^[0-9a-f]{64}$/.test(name)) continue; // not ours: leave foreign files alone
    if (live.has(Buffer.from(name, 'hex'))) {
      report.blocksKept++;
      report.bytesKept += o.size;
    } else if (await del(o.key)) {
      report.blocksFreed++;
      report.bytesFreed += o.size;
    }
  }
  for await (const o of store.backend.list('snapshots/')) {
    const base = path.posix.basename(o.key);
    const stray = o.temporary || [/\.map$/, /\.tags$/, /\.packs$/].some((x) => x.test(base) && !completed.has(base.replace(x, '')));
    if (stray) await other(o);
  }
  // bin manifests and tags whose entry record is gone (a purge a crash interrupted)
  const binRecords = new Set<string>();
  const binFiles: Array<{ key: string; size: number }> = [];
  for await (const o of store.backend.list('bin/')) {
    if (o.temporary) await other(o);
    else if (o.key.endsWith('.json')) binRecords.add(o.key.slice(0, -'.json'.length));
    else binFiles.push(o);
  }
  for (const o of binFiles) if (!binRecords.has(o.key.replace(/\.(map|tags|packs)$/, ''))) await other(o);
  for await (const o of store.backend.list('volumes/')) {
    if (o.temporary && (await del(o.key))) report.otherFilesRemoved++;
  }
  for await (const o of store.backend.list('leases/')) {
    const id = path.posix.basename(o.key);
    // Every writer is gone (we hold the store exclusively), so every lease is stale.
    if (!listing.snapshots.some((s) => s.id === id && s.state === 'pending') && (await del(o.key))) report.otherFilesRemoved++;
  }
  return report;
}

/**
 * Reflink clones no snapshot would be compared with: every writer is gone (the lock is
 * exclusive), so only the clone of each volume's latest completed snapshot is kept.
 */
async function sweepClones(store: Store, listing: SnapshotListing): Promise<string[]> {
  const dirs: string[] = [];
  const keep = new Set<string>();
  const volumes = new Set(listing.snapshots.map((s) => s.volumeId));
  for (const v of (await store.listVolumes()).volumes) {
    dirs.push(cloneDir(v.path));
    volumes.add(v.id);
  }
  for (const s of listing.snapshots) if (s.reflinkClone) dirs.push(path.dirname(s.reflinkClone.path));
  for (const v of volumes) {
    const owner = cloneOwner(listing.snapshots, v);
    if (owner) keep.add(owner.id);
  }
  store.assertLocked();
  return removeClonesExcept(dirs, store.config.id, undefined, keep);
}
