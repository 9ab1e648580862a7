/** `snapshot list` and `snapshot show`. */
import type { DisksnapError } from '../engine/errors';
import { KeyRing, isExplicit } from './keys';
import { Store } from './store/store';
import { SnapshotJson, isVolumeId, snapshotJson } from './store/records';
import { StoreOptions, findVolumeByPath, realVolumePath } from './common';
import { reapQuietly, resolve, reveal } from './lookup';

export interface ListSnapshotsOptions extends StoreOptions {
  /** a volume path or `vol-` id */
  volume?: string;
}

/** Every snapshot, oldest first; encrypted ones' names, descriptions and tags only with their key. */
export async function listSnapshots(opts: ListSnapshotsOptions = {}): Promise<{ snapshots: SnapshotJson[]; damaged: { id: string; error: DisksnapError }[] }> {
  const store = await Store.open(opts.store);
  const listing = await store.listSnapshots();
  await reapQuietly(store, listing);
  await reveal(store, listing.snapshots, new KeyRing(opts.key));
  let snapshots = listing.snapshots;
  if (opts.volume !== undefined) {
    const volumeId = isVolumeId(opts.volume) ? opts.volume : (await findVolumeByPath(store, realVolumePath(opts.volume)))?.id;
    snapshots = snapshots.filter((s) => s.volumeId === volumeId);
  }
  return { snapshots: snapshots.map(snapshotJson), damaged: listing.damaged };
}

/**
 * One snapshot. With a key, an encrypted snapshot's name, description and tags are opened
 * (and a key that is not the snapshot's is an error).
 */
export async function showSnapshot(ref: string, opts: StoreOptions = {}): Promise<SnapshotJson> {
  const store = await Store.open(opts.store);
  const ring = new KeyRing(opts.key);
  const rec = await resolve(store, ref, ring);
  if (rec.state === 'pending') await reapQuietly(store, { snapshots: [rec], damaged: [] });
  if (rec.encrypted && rec.metadataHidden && isExplicit(opts.key)) await ring.forId(store, rec.keyId!, `snapshot ${rec.id}`);
  return snapshotJson(rec);
}
