/**
 * Stores and volumes: creating a store, registering a volume (its record: id, real path,
 * size, device and inode, and whether its snapshots are encrypted), listing volumes.
 */
import { createHash } from 'node:crypto';
import { BlockFile } from '../engine/file';
import { DisksnapError, invalid } from '../engine/errors';
import { NativeStat } from '../engine/native';
import { guestSizeOf } from '../image';
import { KeyRing, isExplicit, needKeyError } from './keys';
import { Store } from './store/store';
import { RetentionPolicy, VolumeRecord, newId } from './store/records';
import { volumeIds } from './list';
import { checkPolicy } from './prune';
import { StoreOptions, findVolumeByPath, openVolume, realVolumePath, volumeSizeOf, withStoreLock } from './common';

export interface InitStoreOptions extends StoreOptions {
  blockSize?: number;
}

export interface StoreInfo {
  path: string;
  id: string;
  blockSize: number;
  digest: string;
  created: string;
}

/** Creates a store (or opens an existing one with the same block size). */
export async function initStore(opts: InitStoreOptions = {}): Promise<StoreInfo> {
  const store = await Store.open(opts.store, { create: true, blockSize: opts.blockSize });
  const c = store.config;
  return { path: store.dir, id: c.id, blockSize: c.blockSize, digest: c.digest, created: c.created };
}

export interface RegisterVolumeOptions extends StoreOptions {
  /** block size for a store this call creates */
  blockSize?: number;
  /** every snapshot of the volume is encrypted with `key` (which must then be given) */
  encrypted?: boolean;
}

/**
 * The store's record of a volume; registers it when unknown (idempotent). With `encrypted`,
 * the volume is recorded with the key's id (and the key's record, never the key, is written
 * to the store); from then on every snapshot of it is encrypted. A volume that already has
 * plain snapshots is not turned into an encrypted one: encrypt those by copying them.
 */
export async function registerVolume(volume: string, opts: RegisterVolumeOptions = {}): Promise<VolumeRecord> {
  const ring = new KeyRing(opts.key).check();
  if (!opts.encrypted && isExplicit(opts.key)) throw invalid('a key is for encrypted volumes: add --encrypted (or leave the key out)');
  if (opts.encrypted && !ring.present) throw needKeyError(`volume register --encrypted ${volume}`);
  const real = realVolumePath(volume);
  const file = openVolume(real, false);
  try {
    const store = await Store.open(opts.store, { create: true, blockSize: opts.blockSize });
    return await withStoreLock(store, 'shared', opts, async () => {
      const existing = await findVolumeByPath(store, real);
      if (!opts.encrypted) return ensureVolume(store, real, file, file.stat(), existing);
      if (existing?.encrypted) {
        await ring.forId(store, existing.keyId!, `volume ${real} (${existing.id})`);
        return ensureVolume(store, real, file, file.stat(), existing);
      }
      if (existing) await refusePlainSnapshots(store, existing);
      const keys = await ring.forNew(store, `volume register --encrypted ${real}`);
      const rec = await ensureVolume(store, real, file, file.stat(), existing);
      rec.encrypted = true;
      rec.keyId = keys.id;
      await store.writeVolume(rec);
      return rec;
    });
  } finally {
    file.close();
  }
}

async function refusePlainSnapshots(store: Store, vol: VolumeRecord): Promise<void> {
  const theirs = (await store.listSnapshots()).snapshots.filter((s) => s.volumeId === vol.id);
  if (!theirs.length) return;
  throw new DisksnapError(
    `volume ${vol.path} (${vol.id}) already has ${theirs.length} unencrypted snapshot(s); encryption follows a volume from its first snapshot. ` +
      'Encrypt those by copying them (`disksnap snapshot copy SNAP --to-store DIR --encrypt --key-file K`), or delete them first',
    'EINVALID',
    undefined,
    vol.path,
  );
}

/**
 * The id a new volume record of `real` gets: derived from the path, so that two processes
 * registering the same new volume at once pick the same id, and the store's create-if-absent
 * lets one of them write the record (the other uses it). Records made before keep theirs.
 */
export function volumeIdFor(real: string): string {
  return `vol-${createHash('sha256').update(`disksnap volume\0${real}`).digest('hex').slice(0, 16)}`;
}

/**
 * The record of the volume at `real`, created when the store has none; size (the guest's)
 * and identity kept current. `known`: the record the caller just found for `real` (saves a second listing).
 */
export async function ensureVolume(store: Store, real: string, file: BlockFile, st: NativeStat, known?: VolumeRecord): Promise<VolumeRecord> {
  // what the guest sees: the virtual size of a qcow2 volume, which its file's size is not (that
  // grows with every bitmap a snapshot adds, and rewrote this record at each snapshot)
  const size = guestSizeOf(file, volumeSizeOf(file, st));
  const existing = known ?? (await findVolumeByPath(store, real)) ?? (await createVolume(store, real, size, st));
  if (existing.size !== size || existing.dev !== st.dev || existing.ino !== String(st.ino)) {
    existing.size = size;
    existing.dev = st.dev;
    existing.ino = String(st.ino);
    await store.writeVolume(existing);
  }
  return existing;
}

/** A new record of the volume at `real`, or the one another process made at the same moment. */
async function createVolume(store: Store, real: string, size: number, st: NativeStat): Promise<VolumeRecord> {
  const rec: VolumeRecord = {
    id: volumeIdFor(real),
    path: real,
    size,
    dev: st.dev,
    ino: String(st.ino),
    encrypted: false,
    keyId: null,
    created: new Date().toISOString(),
    inPlaceRestore: null,
    retention: null,
  };
  if (await store.createVolume(rec)) return rec;
  const theirs = await store.readVolume(rec.id);
  if (theirs.path === real) return theirs;
  // The id is taken by a record of another path (one copied in from another store can be):
  // this volume gets a random id, as every volume had before.
  rec.id = newId('vol');
  await store.writeVolume(rec);
  return rec;
}

/**
 * `volume policy`: the retention rules applied to the volume's snapshots after each one
 * completes (null removes them). The volume is found as `snapshot list --volume` finds it:
 * path, `vol-` id or the loop device it is attached to; a policy without a rule is refused.
 */
export async function setVolumeRetention(volume: string, policy: RetentionPolicy | null, opts: StoreOptions = {}): Promise<VolumeRecord> {
  if (policy) checkPolicy(policy);
  const store = await Store.open(opts.store);
  return withStoreLock(store, 'shared', opts, async () => {
    const ids = [...(await volumeIds(store, volume))];
    if (ids.length !== 1) throw invalid(ids.length ? `${volume} names ${ids.length} volumes of this store: give a vol- id` : `volume ${volume} is not registered in this store`);
    const rec = await store.readVolume(ids[0]);
    rec.retention = policy;
    await store.writeVolume(rec);
    return rec;
  });
}

export async function listVolumes(opts: StoreOptions = {}): Promise<{ volumes: VolumeRecord[]; damaged: { id: string; error: DisksnapError }[] }> {
  const store = await Store.open(opts.store);
  return store.listVolumes();
}
