/** `snapshot list` (with its filters), `snapshot show`, and `snapshot tag`/`untag`. */
import * as fs from 'node:fs';
import { DisksnapError, invalid } from '../engine/errors';
import { listAttachments } from '../host/attach';
import { pinnedBytes } from './reflink';
import { KeyRing, isExplicit } from './keys';
import { Store } from './store/store';
import { SnapshotJson, SnapshotState, checkTagFilter, isVolumeId, lockedAt, matchesTag, snapshotJson } from './store/records';
import { StoreOptions, findVolumeByPath, realVolumePath, withStoreLock } from './common';
import { codecOf, reapQuietly, resolve, reveal } from './lookup';

export interface ListSnapshotsOptions extends StoreOptions {
  /**
   * a volume: its `vol-` id, its path, or the loop device an image is attached to (the
   * snapshots of the device itself and of the image attached there)
   */
  volume?: string;
  /** every one must match: `KEY=VALUE`, or `KEY` for "has the tag" */
  tags?: string[];
  /** the snapshot's name, exactly */
  name?: string;
  state?: SnapshotState;
}

const STATES: SnapshotState[] = ['pending', 'completed', 'error'];

/** The volume ids a --volume filter stands for (none registered: an empty set). */
export async function volumeIds(store: Store, volume: string): Promise<Set<string>> {
  if (isVolumeId(volume)) return new Set([volume]);
  const real = realVolumePath(volume);
  const ids = new Set<string>();
  const own = await findVolumeByPath(store, real);
  if (own) ids.add(own.id);
  if (fs.statSync(real).isBlockDevice()) {
    for (const a of listAttachments()) {
      const image = a.image ?? a.backing;
      if (a.device !== real || !image || !fs.existsSync(image)) continue;
      const attached = await findVolumeByPath(store, realVolumePath(image));
      if (attached) ids.add(attached.id);
    }
  }
  return ids;
}

/** Every snapshot, oldest first; encrypted ones' names, descriptions and tags only with their key. */
export async function listSnapshots(opts: ListSnapshotsOptions = {}): Promise<{ snapshots: SnapshotJson[]; damaged: { id: string; error: DisksnapError }[] }> {
  const store = await Store.open(opts.store);
  const listing = await store.listSnapshots();
  await reapQuietly(store, listing);
  await reveal(store, listing.snapshots, new KeyRing(opts.key));
  if (opts.state !== undefined && !STATES.includes(opts.state)) throw invalid(`state '${String(opts.state)}' must be one of ${STATES.join(', ')}`);
  for (const f of opts.tags ?? []) checkTagFilter(f, 'tag filter');
  let snapshots = listing.snapshots;
  if (opts.volume !== undefined) {
    const ids = await volumeIds(store, opts.volume);
    snapshots = snapshots.filter((s) => ids.has(s.volumeId));
  }
  // Sealed names and tags (an encrypted snapshot listed without its key) match no filter on them.
  if (opts.name !== undefined) snapshots = snapshots.filter((s) => !s.metadataHidden && s.name === opts.name);
  if (opts.tags?.length) snapshots = snapshots.filter((s) => !s.metadataHidden && opts.tags!.every((f) => matchesTag(s.tags, f)));
  if (opts.state !== undefined) snapshots = snapshots.filter((s) => s.state === opts.state);
  return { snapshots: snapshots.map(snapshotJson), damaged: listing.damaged };
}

/**
 * `snapshot tag` / `untag`: sets tags (over existing keys) and removes keys (absent ones are
 * no error, as EC2's DeleteTags); an encrypted snapshot's tags are sealed again with its key.
 * Returns the snapshot as it is now.
 */
export async function tagSnapshot(ref: string, change: { set?: Record<string, string>; remove?: string[] }, opts: StoreOptions = {}): Promise<SnapshotJson> {
  const store = await Store.open(opts.store);
  const ring = new KeyRing(opts.key);
  return withStoreLock(store, 'shared', opts, async () => {
    const rec = await resolve(store, ref, ring);
    if (rec.state === 'pending') throw invalid(`snapshot ${rec.id} is still being taken; change its tags once it has completed`);
    if (rec.encrypted && rec.metadataHidden) {
      throw new DisksnapError(`the tags of encrypted snapshot ${rec.id} are sealed with key ${rec.keyId}: give its key (--key-file) to change them`, 'ENOKEY');
    }
    const target = rec.encrypted ? store.withCodec(await codecOf(store, rec, ring)) : store;
    for (const k of change.remove ?? []) delete rec.tags[k];
    Object.assign(rec.tags, change.set ?? {});
    await target.writeSnapshot(rec);
    return snapshotJson(rec);
  });
}

/**
 * `snapshot lock --until` / `unlock`: `until` (an ISO time in the future) makes delete and
 * prune refuse the snapshot until then; a lock can be moved later, never earlier (that is
 * what unlock, a deliberate act of its own, is for); null removes it.
 */
export async function lockSnapshot(ref: string, until: string | null, opts: StoreOptions = {}): Promise<SnapshotJson> {
  const store = await Store.open(opts.store);
  return withStoreLock(store, 'shared', opts, async () => {
    const rec = await resolve(store, ref, new KeyRing(opts.key));
    if (rec.state !== 'completed') throw invalid(`snapshot ${rec.id} is ${rec.state}: only a completed snapshot can be locked`);
    if (until !== null) {
      if (Number.isNaN(Date.parse(until)) || Date.parse(until) <= Date.now()) throw invalid(`lock time '${until}' is not a time in the future`);
      const held = lockedAt(rec);
      if (held && Date.parse(held) > Date.parse(until)) throw invalid(`snapshot ${rec.id} is already locked until ${held}, later than ${until}; unlock it first to shorten the lock`);
    }
    rec.lockedUntil = until === null ? null : new Date(Date.parse(until)).toISOString();
    const target = rec.encrypted && !rec.metadataHidden ? store.withCodec(await codecOf(store, rec, new KeyRing(opts.key))) : store;
    await target.writeSnapshot(rec);
    return snapshotJson(rec);
  });
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
  const shown = snapshotJson(rec);
  // The space a kept reflink clone pins grows as the volume is written: computed now.
  if (shown.reflinkClone) shown.reflinkClone = { ...shown.reflinkClone, pinnedBytes: await pinnedBytes(shown.reflinkClone, rec.volumePath) };
  return shown;
}
