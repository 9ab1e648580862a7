/**
 * Finding snapshots and opening what their key hides: resolve a reference (id, prefix or
 * name) to a record, reveal the sealed name, description and tags of encrypted ones when the
 * key is at hand, and the codec a snapshot's blocks are read with.
 */
import { isDisksnapError } from '../engine/errors';
import { KeyRing } from './keys';
import { BlockCodec, PLAIN_CODEC, SnapshotListing, Store, sealedCodec } from './store/store';
import { DerivedKeys, unsealMetadata } from './store/crypto';
import type { SnapshotRecord } from './store/records';

/** The codec of a snapshot: plain, or sealed under its key (ENOKEY / EKEYREJECTED first). */
export async function codecOf(store: Store, rec: SnapshotRecord, ring: KeyRing): Promise<BlockCodec> {
  if (!rec.encrypted) return PLAIN_CODEC;
  return sealedCodec(await ring.forId(store, rec.keyId!, `snapshot ${rec.id}`));
}

/** Opens the sealed name, description and tags of the records whose key `ring` gives. */
export async function reveal(store: Store, recs: SnapshotRecord[], ring: KeyRing): Promise<void> {
  if (!ring.present) return;
  for (const r of recs) {
    if (!r.metadataHidden || !r.sealedMetadata || !r.keyId) continue;
    const keys = await ring.tryId(store, r.keyId);
    if (keys) openMetadata(store, r, keys);
  }
}

export function openMetadata(store: Store, r: SnapshotRecord, keys: DerivedKeys): void {
  if (!r.metadataHidden || !r.sealedMetadata) return;
  const m = unsealMetadata(keys, r.id, r.sealedMetadata, store.backend.describe(store.snapshotKey(r.id)));
  r.name = m.name;
  r.description = m.description;
  r.tags = m.tags;
  r.metadataHidden = false;
}

/** A snapshot by id, prefix or name (names of encrypted snapshots only with their key). */
export async function resolve(store: Store, ref: string, ring: KeyRing): Promise<SnapshotRecord> {
  const rec = await store.resolveSnapshot(ref, (recs) => reveal(store, recs, ring));
  await reveal(store, [rec], ring);
  return rec;
}

/**
 * Marks abandoned pending snapshots `error` on the way; a store we may not write (read-only
 * media, another user's) still lists: those errors only mean the records stay `pending`.
 */
export async function reapQuietly(store: Store, listing: SnapshotListing): Promise<void> {
  try {
    await store.reapStale(listing);
  } catch (e) {
    if (!isDisksnapError(e) || !['EROFS', 'EACCES', 'EPERM', 'ENOSPC'].includes(e.code)) throw e;
  }
}
