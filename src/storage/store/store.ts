/**
 * A snapshot store: records, manifests and block objects over a StoreBackend. The layout is
 * drawn in the folder note (src/storage/index.ts); an S3 store has the same keys under its
 * prefix (s3.ts). The block size is fixed when the store is created: 512 KiB by default, as
 * EBS, so changed-block indexes line up with EBS's.
 *
 * Encryption is a property of a volume and of each snapshot, not of the store: one store holds
 * plain and encrypted snapshots side by side (as an EBS region does), and store.json's `digest`
 * stays "sha256", the digest of plain snapshots. A Store value carries the BlockCodec of the
 * snapshot at hand (`withCodec`); encryption plugs in there and nowhere else: the digest
 * (SHA-256, or HMAC-SHA-256 under the key's digest subkey), seal/unseal of each block, the
 * keyed manifest trailer, sealed record metadata (crypto.ts: formats, what is revealed).
 */
import * as fs from 'node:fs';
import { randomBytes } from 'node:crypto';
import * as os from 'node:os';
import * as path from 'node:path';
import { DisksnapError, corrupt, isDisksnapError } from '../../engine/errors';
import { ordinal } from '../../engine/order';
import { FullBackend, ObjectData, StoreBackend, fullBackend, isS3Url, readListed } from './backend';
import { DirectoryBackend } from './dir';
import { Lease, StoreLock, LockOptions } from './lock';
import type { S3Backend } from './s3';
import { S3Lease, lockBucket, snapshotWriterGone, takeSnapshotLease } from './s3-lease';
import { TagKey, plainStoreTagKey, tagKeyFrom, tagsKey } from './tags';
import { ManifestHeader, ManifestReader, ManifestWriter } from './manifest';
import { PackTable, PackedAt, packsKey, readPackIndex } from './packs';
import { assertTrustedStore } from './secure';
import { DerivedKeys, sealBlock, sealMetadata, unsealBlock } from './crypto';
import {
  KeyRecord,
  parseKeyRecord,
  snapshotDisk,
  DEFAULT_BLOCK_SIZE,
  STORE_FORMAT,
  STORE_VERSION,
  SnapshotRecord,
  StoreConfig,
  VolumeRecord,
  checkBlockSize,
  isSnapshotId,
  newId,
  parseSnapshotRecord,
  parseStoreConfig,
  parseVolumeRecord,
  DigestAlgorithm,
} from './records';

/** Between the plaintext of a block and the object stored for it. */
export interface BlockCodec {
  readonly digest: DigestAlgorithm;
  /** HMAC key of keyed digests; undefined for plain SHA-256 */
  readonly digestKey: Uint8Array | undefined;
  /** whether objects are sealed (then they cannot be copied from the volume as they are) */
  readonly sealed: boolean;
  /** the key of a sealed codec (id and subkeys); undefined for plain */
  readonly keys: DerivedKeys | undefined;
  /** The object's bytes. May overwrite `plain` (sealing encrypts in place, keeping the
   * caller's aligned buffer); callers pass a buffer they are done with. */
  seal(digest: Uint8Array, plain: Buffer): ObjectData;
  /** Throws ECORRUPT (tampered, swapped, other key); never returns wrong bytes silently. */
  unseal(digest: Uint8Array, stored: Buffer, where: string, into?: Buffer): Buffer;
}

export const PLAIN_CODEC: BlockCodec = {
  digest: 'sha256',
  digestKey: undefined,
  sealed: false,
  keys: undefined,
  seal: (_d, plain) => plain,
  unseal: (_d, stored) => stored,
};

/** AES-256-GCM objects and HMAC-SHA-256 digests under one key (src/storage/store/crypto.ts). */
export function sealedCodec(keys: DerivedKeys): BlockCodec {
  return {
    digest: 'hmac-sha256',
    digestKey: keys.digest,
    sealed: true,
    keys,
    seal: (digest, plain) => sealBlock(keys, digest, plain),
    unseal: (digest, stored, where, into) => unsealBlock(keys, digest, stored, where, into),
  };
}

let backendFactory: ((root: string) => StoreBackend) | undefined;

/**
 * Tests: the backend every Store.open uses from now on (undefined: the directory backend) —
 * e.g. one with only the core methods, to prove snapshot logic needs no more.
 */
export function setBackendFactory(f: ((root: string) => StoreBackend) | undefined): void {
  backendFactory = f;
}

/**
 * `--store` default: $DISKSNAP_STORE (a directory or `s3://BUCKET[/PREFIX]`), else
 * $XDG_DATA_HOME/disksnap/store, else ~/.local/share/disksnap/store.
 */
export function defaultStoreDir(): string {
  const env = process.env.DISKSNAP_STORE;
  if (env) return isS3Url(env) ? env : path.resolve(env);
  const data = process.env.XDG_DATA_HOME && path.isAbsolute(process.env.XDG_DATA_HOME)
    ? process.env.XDG_DATA_HOME
    : path.join(os.homedir(), '.local', 'share');
  return path.join(data, 'disksnap', 'store');
}

export interface OpenStoreOptions {
  /** create the store when it does not exist */
  create?: boolean;
  /** block size for a store this call creates; EINVALID if the store exists with another */
  blockSize?: number;
}

/** A held store lock or lease of a pending snapshot (directory: OFD locks; S3: lease objects). */
export interface HeldStoreLock {
  release(): void | Promise<void>;
}

/** One S3Backend per store URL in a process: its keep-alive connections are shared. */
const s3Backends = new Map<string, S3Backend>();
// (./s3, its HTTP clients and node:net are loaded for an S3 store only: ~5 ms of every command on a directory store)
const s3Backend = (url: string): S3Backend => s3Backends.get(url) ?? s3Backends.set(url, new (require('./s3') as typeof import('./s3')).S3Backend(url)).get(url)!;

/** What a Store value shares with its `withCodec` copies: the S3 locks it holds. */
interface Shared {
  remote: S3Backend | undefined;
  leases: Set<S3Lease>;
  /** where pieces in packs are, from the pack indexes of the manifests opened (./packs.ts) */
  packs: PackTable;
}

export interface SnapshotListing {
  snapshots: SnapshotRecord[];
  /** records that could not be read, with why */
  damaged: { id: string; error: DisksnapError }[];
}

/**
 * Of the snapshots that share a name, those a name means: the completed ones, else the
 * pending ones, else the failed ones. A failed run leaves its name on an `error` snapshot;
 * the completed re-run takes the name over (the failed one stays reachable by its id).
 */
function bestByName(recs: SnapshotRecord[]): SnapshotRecord[] {
  for (const state of ['completed', 'pending', 'error'] as const) {
    const these = recs.filter((r) => r.state === state);
    if (these.length) return these;
  }
  return recs;
}

export class Store {
  private constructor(
    readonly dir: string,
    readonly backend: FullBackend,
    readonly config: StoreConfig,
    readonly codec: BlockCodec = PLAIN_CODEC,
    private readonly shared: Shared = { remote: undefined, leases: new Set(), packs: new PackTable() },
  ) {}

  /** The same store, reading and writing blocks, manifests and records with `codec`. */
  withCodec(codec: BlockCodec): Store {
    return new Store(this.dir, this.backend, this.config, codec, this.shared);
  }

  /** The S3 backend of a store in a bucket; undefined for a directory store. */
  get remote(): S3Backend | undefined {
    return this.shared.remote;
  }

  get blockSize(): number {
    return this.config.blockSize;
  }

  /** Where the pieces of the manifests opened so far are, where they are in packs. */
  get packs(): PackTable {
    return this.shared.packs;
  }

  static async open(dir: string | undefined, opts: OpenStoreOptions = {}): Promise<Store> {
    const where = dir ?? defaultStoreDir();
    const remote = isS3Url(where) && !backendFactory ? s3Backend(where) : undefined;
    const root = remote ? remote.location : isS3Url(where) ? where : path.resolve(where);
    // a directory store is checked before anything in it is read or written (secure.ts)
    if (!remote && !isS3Url(where)) assertTrustedStore(root);
    const backend = fullBackend(backendFactory ? backendFactory(root) : remote ?? new DirectoryBackend(root));
    let text: Buffer | undefined;
    try {
      text = await backend.get('store.json');
    } catch (e) {
      if (!isDisksnapError(e, 'ENOENT')) throw e;
    }
    if (!text && remote) {
      // One line for each way a bucket is not a store: missing, refused, or someone else's.
      await remote.checkBucket();
      // Objects but no store.json: someone else's, unless another process just created the store.
      if ((await remote.hasAnyObject()) && !(text = await backend.get('store.json').catch(() => undefined))) {
        throw new DisksnapError(
          `${root} is not a disksnap store: it holds objects but no store.json (use an empty bucket or another prefix)`,
          'EINVALID',
          undefined,
          root,
        );
      }
    }
    if (!text) {
      if (!opts.create) {
        throw new DisksnapError(`no snapshot store at ${root} (create one with \`disksnap store init\`, or let \`disksnap snapshot create\` create it)`, 'ENOENT', 2, root);
      }
      text = await Store.init(root, backend, opts.blockSize ?? DEFAULT_BLOCK_SIZE, !remote);
    }
    const config = parseStoreConfig(backend.describe('store.json'), text);
    if (opts.blockSize !== undefined && opts.blockSize !== config.blockSize) {
      throw new DisksnapError(`store ${root} exists with block size ${config.blockSize}; a block size applies only when a store is created`, 'EINVALID', undefined, root);
    }
    if (config.digest !== 'sha256') {
      throw new DisksnapError(`store ${root} uses keyed digests (${config.digest}), which this version cannot open`, 'EUNSUPPORTED', undefined, root);
    }
    return new Store(root, backend, config, PLAIN_CODEC, { remote, leases: new Set(), packs: new PackTable() });
  }

  /** Creates the directories, then store.json last (its presence means "a store"; blocks/<xx>: DirectoryBackend.putIfAbsent). */
  private static async init(root: string, backend: FullBackend, blockSize: number, local: boolean): Promise<Buffer> {
    checkBlockSize(blockSize);
    if (local) try {
      fs.mkdirSync(root, { recursive: true });
      for (const d of ['volumes', 'snapshots', 'leases', 'blocks', 'keys']) fs.mkdirSync(path.join(root, d), { recursive: true });
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      throw new DisksnapError(`cannot create store ${root}: ${err.message}`, err.code ?? 'EIO', undefined, root);
    }
    const config: StoreConfig = {
      format: STORE_FORMAT,
      version: STORE_VERSION,
      id: newId('store'),
      blockSize,
      digest: 'sha256',
      created: new Date().toISOString(),
    };
    const text = Buffer.from(JSON.stringify(config, null, 2) + '\n');
    // putIfAbsent: two processes creating one store at once agree on the first store.json.
    await backend.putIfAbsent('store.json', text);
    await backend.flush();
    return backend.get('store.json');
  }

  /**
   * The store lock: shared for writers and readers, exclusive for gc. A directory store locks
   * STORE/lock; a bucket holds leases (src/storage/store/s3-lease.ts), which this Store renews
   * once more before it writes a record `completed` (`writeSnapshot`), so a holder whose lease
   * ran out and was taken by a gc never completes a snapshot.
   */
  async lock(mode: 'shared' | 'exclusive', opts?: LockOptions): Promise<HeldStoreLock> {
    const remote = this.shared.remote;
    return remote ? lockBucket(remote, mode, opts ?? {}, this.shared.leases) : StoreLock.acquire(this.dir, mode, opts);
  }

  /** Throws ELOCKED when a lease this store holds was lost (a bucket's gc checks before deleting). */
  assertLocked(): void {
    for (const l of this.shared.leases) l.assertHeld();
  }

  /**
   * Renews every lease held now: proof, at that moment, that none was lost. `writeSnapshot`
   * does it before a `completed` record unless the caller did (`leasesProven`).
   */
  async renewLeases(): Promise<void> {
    await Promise.all([...this.shared.leases].map((l) => l.renew()));
  }

  // ---- leases of pending snapshots ----

  /** Held by the process writing pending snapshot `id` until it ends (src/storage/store/lock.ts). */
  async takeLease(id: string): Promise<HeldStoreLock> {
    const remote = this.shared.remote;
    return remote ? takeSnapshotLease(remote, id, this.shared.leases) : Lease.take(this.dir, id);
  }

  /** Whether the writer of pending snapshot `id` is gone (its lease is free or ran out). */
  async writerGone(id: string): Promise<boolean> {
    const remote = this.shared.remote;
    return remote ? snapshotWriterGone(remote, id) : Lease.writerGone(this.dir, id);
  }

  async removeLease(id: string): Promise<void> {
    const remote = this.shared.remote;
    if (!remote) return Lease.remove(this.dir, id);
    await remote.delete(`leases/${id}`);
  }

  /**
   * The tag key of a plain store (change tags, src/storage/store/tags.ts): `tag.key` in a
   * directory store; in a bucket the object `tag.key`, written once (readable by whoever holds
   * the bucket's credentials, as the file is by whoever can read the directory), read before
   * it is written: it exists after a store's first snapshot (one request, not two).
   */
  async plainTagKey(): Promise<TagKey | undefined> {
    const remote = this.shared.remote;
    if (!remote) return plainStoreTagKey(this.dir);
    const k: Buffer = (await remote.get('tag.key').catch((e: unknown) => (isDisksnapError(e, 'ENOENT') ? undefined : Promise.reject(e)))) ??
      (await remote.putIfAbsent('tag.key', randomBytes(32)).then(() => remote.get('tag.key')));
    return k.length === 32 ? tagKeyFrom(k) : undefined;
  }

  // ---- blocks ----

  blockKey(digest: Uint8Array, offset = 0): string {
    const hex = Buffer.from(digest.buffer, digest.byteOffset + offset, 32).toString('hex');
    return `blocks/${hex.slice(0, 2)}/${hex}`;
  }

  async hasBlock(digest: Uint8Array, offset = 0): Promise<boolean> {
    return (await this.backend.stat(this.blockKey(digest, offset))) !== undefined;
  }

  /** Stores a block unless present; true when it wrote one. The digest must be that of `plain` (plain: its SHA-256, given to the backend). Sealing encrypts `plain` in place: pass a buffer you are done with. */
  async putBlock(digest: Uint8Array, plain: Buffer): Promise<boolean> {
    const d = Buffer.from(digest);
    const key = this.blockKey(d);
    // Sealing costs CPU: not for an object the store already has.
    if (this.codec.sealed && (await this.backend.stat(key)) !== undefined) return false;
    return this.backend.putIfAbsent(key, this.codec.seal(d, plain), this.codec.sealed || this.codec.digestKey ? undefined : d);
  }

  /** Stores an object already sealed with this store's codec (src/storage/store/crypto-pool.ts). */
  async putSealed(digest: Uint8Array, parts: ObjectData): Promise<boolean> {
    return this.backend.putIfAbsent(this.blockKey(digest), parts);
  }

  /** Where a block object is, for messages: its file or key, or its bytes in a pack. */
  describeBlock(digest: Uint8Array): string {
    return this.describeAt(digest, this.shared.packs.lookup(digest));
  }
  /** describeBlock with the pack lookup done (`at`: undefined when the block is no piece in a pack). */
  private describeAt(digest: Uint8Array, at: PackedAt | undefined): string {
    const where = this.backend.describe(this.blockKey(at?.pack ?? digest));
    return at ? `${where} (a pack, bytes ${at.offset}+${at.length})` : where;
  }

  /** The plaintext of a block object (or of a piece in a pack). A sealed object is authenticated here (ECORRUPT if it fails); its digest is checked by the callers, which hash in batches. */
  async getBlock(digest: Uint8Array, into?: Buffer): Promise<Buffer> {
    const d = Buffer.from(digest);
    const at = this.shared.packs.lookup(d);
    const key = this.blockKey(at?.pack ?? d);
    const where = this.describeAt(d, at); // (one lookup per block: a default argument would look an unpacked block up again)
    let stored: Buffer;
    try {
      // A sealed object is larger than its block: read it whole, then decrypt into `into`.
      stored = at ? await this.backend.getRange(key, at.offset, at.length) : await this.backend.get(key, this.codec.sealed ? undefined : into);
    } catch (e) {
      if (isDisksnapError(e, 'ENOENT')) throw new DisksnapError(`block object ${where} is missing`, 'ECORRUPT', undefined, this.backend.describe(key));
      throw e;
    }
    if (at && stored.length !== at.length) throw new DisksnapError(`block object ${where} ends after ${stored.length} bytes`, 'ECORRUPT', undefined, this.backend.describe(key));
    return this.codec.unseal(d, stored, where, into);
  }

  // ---- keys ----

  private keyRecordKey(id: string): string {
    return `keys/${id}.json`;
  }

  /** The store's record of a key, or undefined when it has none. */
  async readKeyRecord(id: string): Promise<KeyRecord | undefined> {
    const key = this.keyRecordKey(id);
    let text: Buffer;
    try {
      text = await this.backend.getSmall(key);
    } catch (e) {
      if (isDisksnapError(e, 'ENOENT')) return undefined;
      throw e;
    }
    const rec = parseKeyRecord(this.backend.describe(key), text);
    if (rec.id !== id) throw corrupt(this.backend.describe(key), `field 'id' is ${JSON.stringify(rec.id)}, but the file is named for ${id}`);
    return rec;
  }

  async listKeyRecords(): Promise<KeyRecord[]> {
    const out: KeyRecord[] = [];
    for await (const o of this.backend.list('keys/')) {
      if (o.temporary || !o.key.endsWith('.json')) continue;
      const rec = await this.readKeyRecord(path.posix.basename(o.key, '.json')).catch(() => undefined);
      if (rec) out.push(rec);
    }
    return out;
  }

  /** Records a key (written once; durable on return). */
  async writeKeyRecord(rec: KeyRecord): Promise<void> {
    await this.backend.putIfAbsent(this.keyRecordKey(rec.id), Buffer.from(JSON.stringify(rec, null, 2) + '\n'));
    await this.backend.flush();
  }

  // ---- volumes ----

  private volumeKey(id: string): string {
    return `volumes/${id}.json`;
  }

  async readVolume(id: string, bytes?: Buffer): Promise<VolumeRecord> {
    const key = this.volumeKey(id);
    let text: Buffer;
    try {
      text = bytes ?? (await this.backend.getSmall(key));
    } catch (e) {
      if (isDisksnapError(e, 'ENOENT')) throw new DisksnapError(`no volume ${id} in store ${this.dir}`, 'ENOENT', 2, this.backend.describe(key));
      throw e;
    }
    const rec = parseVolumeRecord(this.backend.describe(key), text);
    if (rec.id !== id) throw corrupt(this.backend.describe(key), `field 'id' is ${JSON.stringify(rec.id)}, but the file is named for ${id}`);
    return rec;
  }

  async writeVolume(rec: VolumeRecord): Promise<void> {
    await this.backend.put(this.volumeKey(rec.id), Buffer.from(JSON.stringify(rec, null, 2) + '\n'));
  }

  /**
   * Writes a new volume record unless one with its id exists (then false): the atomic step
   * that makes two registrations of one volume at once end with one record.
   */
  async createVolume(rec: VolumeRecord): Promise<boolean> {
    if (!(await this.backend.putIfAbsent(this.volumeKey(rec.id), Buffer.from(JSON.stringify(rec, null, 2) + '\n')))) return false;
    await this.backend.flush(); // the new name durable before anything refers to it
    return true;
  }

  async listVolumes(): Promise<{ volumes: VolumeRecord[]; damaged: { id: string; error: DisksnapError }[] }> {
    const { records: volumes, damaged } = await readListed(this.backend, 'volumes/', (id, bytes) => this.readVolume(id, bytes));
    volumes.sort((a, b) => ordinal(a.created, b.created) || ordinal(a.id, b.id));
    return { volumes, damaged };
  }

  // ---- snapshots ----

  snapshotKey(id: string): string {
    return `snapshots/${id}.json`;
  }

  manifestKey(id: string): string {
    return `snapshots/${id}.map`;
  }

  async readSnapshot(id: string, bytes?: Buffer): Promise<SnapshotRecord> {
    const key = this.snapshotKey(id);
    let text: Buffer;
    try {
      text = bytes ?? (await this.backend.getSmall(key));
    } catch (e) {
      if (isDisksnapError(e, 'ENOENT')) throw new DisksnapError(`no snapshot ${id} in store ${this.dir}`, 'ENOENT', 2, this.backend.describe(key));
      throw e;
    }
    const rec = parseSnapshotRecord(this.backend.describe(key), text);
    if (rec.id !== id) throw corrupt(this.backend.describe(key), `field 'id' is ${JSON.stringify(rec.id)}, but the file is named for ${id}`);
    return rec;
  }

  /**
   * Writes a record. An encrypted snapshot's name, description and tags are sealed with this
   * store's codec when it holds the snapshot's key; without the key (marking an abandoned
   * snapshot `error`) the sealed metadata that was read is written back as it was.
   */
  async writeSnapshot(rec: SnapshotRecord, opts: { leasesProven?: boolean } = {}): Promise<void> {
    let sealed: string | null = null;
    if (rec.encrypted) {
      const keys = this.codec.keys;
      if (keys && keys.id === rec.keyId && !rec.metadataHidden) sealed = sealMetadata(keys, rec.id, { name: rec.name, description: rec.description, tags: rec.tags });
      else if (rec.metadataHidden && rec.sealedMetadata) sealed = rec.sealedMetadata;
      else throw new DisksnapError(`cannot write the record of encrypted snapshot ${rec.id} without its key ${rec.keyId}`, 'ENOKEY');
    }
    if (rec.state === 'completed' && this.shared.leases.size && !opts.leasesProven) await this.renewLeases();
    await this.backend.put(this.snapshotKey(rec.id), Buffer.from(JSON.stringify(snapshotDisk(rec, sealed), null, 2) + '\n'));
  }

  /** Every snapshot record, oldest first; unreadable ones are reported, not thrown. */
  async listSnapshots(): Promise<SnapshotListing> {
    const { records: snapshots, damaged } = await readListed(this.backend, 'snapshots/', (id, bytes) => this.readSnapshot(id, bytes));
    snapshots.sort((a, b) => ordinal(a.startTime, b.startTime) || ordinal(a.id, b.id));
    return { snapshots, damaged };
  }

  /**
   * A snapshot by id, unique name or unique id prefix (4+ hex digits, `snap-` optional): ENOENT or EINVALID.
   */
  async resolveSnapshot(ref: string, reveal?: (recs: SnapshotRecord[]) => Promise<void>): Promise<SnapshotRecord> {
    if (isSnapshotId(ref)) return this.readSnapshot(ref);
    const { snapshots, damaged } = await this.listSnapshots();
    await reveal?.(snapshots); // names of encrypted snapshots, where the caller holds their key
    const byName = bestByName(snapshots.filter((s) => s.name !== '' && s.name === ref));
    if (byName.length === 1) return byName[0];
    if (byName.length > 1) throw new DisksnapError(`snapshot name '${ref}' is ambiguous: ${byName.map((s) => s.id).join(', ')}`, 'EINVALID');
    const prefix = /^[0-9a-f]{4,16}$/.test(ref) ? `snap-${ref}` : ref; // `snap-` optional (names first)
    if (isSnapshotId(prefix)) return this.readSnapshot(prefix);
    if (/^snap-[0-9a-f]{4,15}$/.test(prefix)) {
      const byPrefix = snapshots.filter((s) => s.id.startsWith(prefix));
      if (byPrefix.length === 1) return byPrefix[0];
      if (byPrefix.length > 1) throw new DisksnapError(`snapshot id prefix '${ref}' is ambiguous: ${byPrefix.map((s) => s.id).join(', ')}`, 'EINVALID');
      const bad = damaged.find((d) => d.id.startsWith(prefix));
      if (bad) throw bad.error;
    }
    const hidden = snapshots.filter((s) => s.metadataHidden).length;
    throw new DisksnapError(
      `no snapshot '${ref}' in store ${this.dir}` +
        (hidden ? ` (the names of ${hidden} encrypted snapshot(s) are sealed: give their key to refer to them by name, or use the id)` : ''),
      'ENOENT',
      2,
    );
  }

  /** Starts reading a completed snapshot's manifest, tags and pack index, which a snapshot of its volume is about to open (S3: one round trip less to wait for). */
  prefetchParent(rec: SnapshotRecord): void {
    this.backend.prefetch([this.manifestKey(rec.id), tagsKey(rec.id), packsKey(rec.id)]);
  }

  /**
   * Opens a snapshot's manifest; its header must agree with the record. A sealed manifest is
   * authenticated with this store's codec, which must hold its key — or, with
   * `unauthenticated`, read for its entries only (gc, diff without a key). A packed one's
   * pack index is read too (./packs.ts), so that getBlock finds its pieces.
   */
  async openManifest(rec: SnapshotRecord, opts: { unauthenticated?: boolean } = {}): Promise<ManifestReader> {
    const keyed = rec.encrypted && this.codec.keys?.id === rec.keyId;
    if (rec.encrypted && !keyed && !opts.unauthenticated) {
      throw new DisksnapError(`snapshot ${rec.id} is encrypted with key ${rec.keyId}; its manifest is read with that key`, 'ENOKEY');
    }
    const key = this.manifestKey(rec.id);
    let src;
    try {
      src = await this.backend.open(key);
    } catch (e) {
      if (isDisksnapError(e, 'ENOENT')) {
        throw new DisksnapError(`manifest ${this.backend.describe(key)} of ${rec.state} snapshot ${rec.id} is missing`, rec.state === 'completed' ? 'ECORRUPT' : 'ENOENT', undefined, this.backend.describe(key));
      }
      throw e;
    }
    const reader = await ManifestReader.open(
      this.backend.describe(key),
      src,
      {
        snapshotId: rec.id,
        volumeId: rec.volumeId,
        blockSize: rec.blockSize,
        volumeSize: rec.volumeSize,
        digest: rec.encrypted ? 'hmac-sha256' : 'sha256',
        sealed: rec.encrypted,
      },
      { macKey: keyed ? this.codec.keys!.manifest : undefined, unauthenticated: opts.unauthenticated },
    );
    if (reader.header.packed) {
      try {
        const index = await readPackIndex(this.backend, packsKey(rec.id));
        if (!index) throw new DisksnapError(`pack index ${this.backend.describe(packsKey(rec.id))} of snapshot ${rec.id} is missing`, 'ECORRUPT', undefined, this.backend.describe(packsKey(rec.id)));
        this.shared.packs.add(index.entries, index.whole);
      } catch (e) {
        await reader.close();
        throw e;
      }
    }
    return reader;
  }

  async createManifest(header: ManifestHeader, expectEntries?: number): Promise<ManifestWriter> {
    if (header.sealed !== this.codec.sealed) throw new DisksnapError(`manifest of ${header.snapshotId}: sealed ${header.sealed} with a ${this.codec.digest} codec`, 'EINVALID');
    return new ManifestWriter(await this.backend.create(this.manifestKey(header.snapshotId)), header, this.codec.keys?.manifest, expectEntries);
  }

  /**
   * Marks pending snapshots whose writer is gone (crashed or killed) as `error`. Safe beside
   * live writers: a snapshot whose lease is held is left alone. Returns the ids it marked.
   */
  async reapStale(listing?: SnapshotListing): Promise<string[]> {
    const { snapshots } = listing ?? (await this.listSnapshots());
    const marked: string[] = [];
    for (const s of snapshots) {
      if (s.state !== 'pending') continue;
      if (!(await this.writerGone(s.id))) continue;
      let again: SnapshotRecord;
      try {
        again = await this.readSnapshot(s.id);
      } catch {
        continue; // deleted or damaged since it was listed: nothing to mark; the listing reports damage
      }
      if (again.state !== 'pending') continue;
      again.state = 'error';
      again.error = `the process that was writing it (pid ${again.creator.pid} on ${again.creator.host}) ended before it completed (crashed or killed)`;
      await this.writeSnapshot(again);
      await this.removeLease(s.id);
      await this.backend.delete(this.manifestKey(s.id)).catch(() => false);
      await this.backend.delete(tagsKey(s.id)).catch(() => false);
      await this.backend.delete(packsKey(s.id)).catch(() => false);
      s.state = again.state;
      s.error = again.error;
      marked.push(s.id);
    }
    return marked;
  }
}
