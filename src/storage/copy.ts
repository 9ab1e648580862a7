/**
 * `snapshot copy`: a completed snapshot into another store (or the same one), as a new
 * snapshot of the same volume: pending with progress, then completed, like createSnapshot.
 *
 * Encryption: the copy of an encrypted snapshot is encrypted — under the same key, or under
 * `key` when `sourceKey` names the old one (re-keying); there is no way to decrypt. A plain
 * snapshot's copy is encrypted with `encrypt` (and `key`), or when the destination records
 * its volume as encrypted. Keys are checked before anything is written.
 *
 * Incremental: every source object is read and verified (so a damaged source is never
 * propagated), except where the destination's previous copy of this volume already has the
 * block — the source's previous snapshot (the one that copy came from) has the same digest
 * at that index, so the destination's digest there is the one to use, with no I/O at all.
 * Under one key (or none) on both sides, digests are the same and only objects the
 * destination lacks are written; under another key each block read is hashed again with
 * the destination's digest key, sealed, and written unless present.
 */
import { DisksnapError, invalid, isDisksnapError } from '../engine/errors';
import { KeyRing, KeySpec, isExplicit, needKeyError } from './keys';
import { PLAIN_CODEC, Store, sealedCodec } from './store/store';
import { DerivedKeys } from './store/crypto';
import { KeyRecord, SnapshotJson, SnapshotRecord, VolumeRecord } from './store/records';
import { ProgressFn, StoreOptions, assertCompleted, holding, withStoreLock } from './common';
import { openMetadata, resolve } from './lookup';
import { pendingRecord } from './lifecycle';
import { runCopy } from './copy-blocks';

export interface CopySnapshotOptions extends StoreOptions {
  /** the destination store (created when it does not exist, with the snapshot's block size) */
  toStore: string;
  /** encrypt the copy of a plain snapshot with `key` (a copy of an encrypted one always is) */
  encrypt?: boolean;
  /**
   * The source snapshot's key, when it is not `key` (re-keying: the copy is sealed under
   * `key`). Without it, `key` is the source's key too and the copy keeps that key.
   */
  sourceKey?: KeySpec;
  /** override the source's name, description; tags are merged over the source's */
  name?: string;
  description?: string;
  tags?: Record<string, string>;
  onProgress?: ProgressFn;
  onLog?: (message: string) => void;
}

/** The source's key and key record (encrypted snapshots), checked before anything is written. */
async function sourceKeys(src: Store, rec: SnapshotRecord, srcRing: KeyRing, opts: CopySnapshotOptions): Promise<{ keys?: DerivedKeys; record?: KeyRecord }> {
  if (!rec.encrypted) return {};
  let keys = await srcRing.tryId(src, rec.keyId!);
  if (!keys && srcRing.present && !opts.sourceKey) {
    throw new DisksnapError(
      `snapshot ${rec.id} is encrypted with key ${rec.keyId}, and the key given is another one; to re-key the copy, ` +
        "pass the snapshot's key with --source-key-file (or --source-passphrase-file) and the new one with --key-file",
      'EKEYREJECTED',
      129,
    );
  }
  keys ??= await srcRing.forId(src, rec.keyId!, `snapshot ${rec.id}`);
  openMetadata(src, rec, keys);
  return { keys, record: await src.readKeyRecord(rec.keyId!) };
}

/**
 * The copy's key: a new one (re-key, or encrypting a plain snapshot), the source's, or the
 * one the destination records for the volume. Never a plaintext fallback.
 */
async function destKeys(dst: Store, rec: SnapshotRecord, destRing: KeyRing, source: { keys?: DerivedKeys; record?: KeyRecord }, dstVol: VolumeRecord | undefined, wantEncrypt: boolean, opts: CopySnapshotOptions): Promise<DerivedKeys | undefined> {
  if (!wantEncrypt && !dstVol?.encrypted) return undefined;
  if (destRing.present && (opts.sourceKey || !rec.encrypted)) return destRing.forNew(dst, `the encrypted copy of ${rec.id}`, source.record ? [source.record] : []);
  if (source.keys) {
    if (source.record) await dst.writeKeyRecord(source.record);
    return source.keys;
  }
  if (wantEncrypt) throw needKeyError(`the encrypted copy of ${rec.id} (--encrypt)`);
  throw new DisksnapError(
    `volume ${rec.volumeId} is encrypted in ${dst.dir} (key ${dstVol!.keyId}): the copy of ${rec.id} must be encrypted too; pass --encrypt and a key`,
    'ENOKEY',
    126,
  );
}

export async function copySnapshot(ref: string, opts: CopySnapshotOptions): Promise<SnapshotJson> {
  if (!opts.toStore) throw invalid('copy needs a destination store (--to-store DIR)');
  const src = await Store.open(opts.store);
  const destRing = new KeyRing(opts.key).check();
  const srcRing = opts.sourceKey ? new KeyRing(opts.sourceKey).check() : destRing;
  return withStoreLock(src, 'shared', opts, async () => {
    const rec = await resolve(src, ref, srcRing);
    assertCompleted(rec, 'copied');
    const source = await sourceKeys(src, rec, srcRing, opts);
    const wantEncrypt = rec.encrypted || !!opts.encrypt;
    if (!wantEncrypt && isExplicit(opts.key)) throw invalid(`snapshot ${rec.id} is not encrypted: add --encrypt to encrypt its copy with that key`);
    if (opts.sourceKey && !rec.encrypted) throw invalid(`snapshot ${rec.id} is not encrypted: it has no source key`);
    if (opts.encrypt && !rec.encrypted && !destRing.present) throw needKeyError(`the encrypted copy of ${rec.id} (--encrypt)`);
    const srcC = src.withCodec(source.keys ? sealedCodec(source.keys) : PLAIN_CODEC);
    // The destination, created with the snapshot's block size.
    const dst = await openOrCreate(opts.toStore, rec.blockSize);
    if (dst.blockSize !== rec.blockSize) {
      throw invalid(`destination store ${dst.dir} has block size ${dst.blockSize}, snapshot ${rec.id} has ${rec.blockSize}: a copy keeps its blocks as they are; copy into a store with block size ${rec.blockSize}`);
    }
    return withStoreLock(dst, 'shared', opts, async () => {
      const dstVolumes = (await dst.listVolumes()).volumes;
      const dstVol = dstVolumes.find((v) => v.id === rec.volumeId);
      const dstKeys = await destKeys(dst, rec, destRing, source, dstVol, wantEncrypt, opts);
      const dstC = dst.withCodec(dstKeys ? sealedCodec(dstKeys) : PLAIN_CODEC);
      if (!dstVol && !dstVolumes.some((v) => v.path === rec.volumePath)) await copyVolumeRecord(src, dst, rec, dstKeys);
      const { dstParent, srcParent } = await previousCopy(src, dst, rec, dstKeys);
      const out = pendingRecord({
        volumeId: rec.volumeId,
        name: opts.name ?? rec.name,
        description: opts.description ?? rec.description,
        tags: { ...rec.tags, ...(opts.tags ?? {}) },
        encrypted: !!dstKeys,
        blockSize: rec.blockSize,
        volumeSize: rec.volumeSize,
        parentId: dstParent?.id ?? null,
        volumePath: rec.volumePath,
        consistency: rec.consistency,
        frozenMs: rec.frozenMs,
        preservedBytes: rec.preservedBytes,
        keyId: dstKeys?.id ?? null,
        copiedFrom: { storeId: src.config.id, snapshotId: rec.id, startTime: rec.startTime },
      });
      const lease = await dst.takeLease(out.id);
      return holding(lease, `the lease of ${out.id}`, opts.onLog, async () => {
        await dstC.writeSnapshot(out);
        return runCopy(srcC, rec, dstC, out, dstParent, srcParent, opts);
      });
    });
  });
}

/** The destination's record of the volume, made from the source's. */
async function copyVolumeRecord(src: Store, dst: Store, rec: SnapshotRecord, dstKeys: DerivedKeys | undefined): Promise<void> {
  // Its device and inode are hints for finding a volume that moved; without them it is found by path.
  const srcVol = await src.readVolume(rec.volumeId).catch(() => undefined);
  await dst.writeVolume({
    id: rec.volumeId,
    path: rec.volumePath,
    size: rec.volumeSize,
    dev: srcVol?.dev ?? 0,
    retention: null, // a policy belongs to its store (as EBS lifecycle policies to a region)
    ino: srcVol?.ino ?? '0',
    encrypted: !!dstKeys,
    keyId: dstKeys?.id ?? null,
    created: new Date().toISOString(),
    inPlaceRestore: null,
  });
}

/**
 * The previous copy of this volume in the destination, under the same key (the parent), and
 * the source snapshot it came from when that is in this store (the shortcut for unchanged blocks).
 */
async function previousCopy(src: Store, dst: Store, rec: SnapshotRecord, dstKeys: DerivedKeys | undefined): Promise<{ dstParent?: SnapshotRecord; srcParent?: SnapshotRecord }> {
  const listing = await dst.listSnapshots();
  await dst.reapStale(listing);
  const dstParent = listing.snapshots
    .filter((s) => s.volumeId === rec.volumeId && s.state === 'completed' && s.blockSize === rec.blockSize && s.keyId === (dstKeys?.id ?? null))
    .pop();
  if (!dstParent?.copiedFrom || dstParent.copiedFrom.storeId !== src.config.id) return { dstParent };
  // A source snapshot since deleted or damaged only loses the shortcut: every block is read.
  const p = await src.readSnapshot(dstParent.copiedFrom.snapshotId).catch(() => undefined);
  const usable = p && p.state === 'completed' && p.volumeId === rec.volumeId && p.keyId === rec.keyId && p.blockSize === rec.blockSize;
  return { dstParent, srcParent: usable ? p : undefined };
}

async function openOrCreate(dir: string, blockSize: number): Promise<Store> {
  try {
    return await Store.open(dir);
  } catch (e) {
    if (!isDisksnapError(e, 'ENOENT')) throw e;
    return Store.open(dir, { create: true, blockSize });
  }
}
