/**
 * The JSON records of a snapshot store: `store.json`, `volumes/<vol-id>.json` and
 * `snapshots/<snap-id>.json`. Each has one parser that checks every field and throws a
 * `corrupt` error naming the file, the field and the value — never an assert, never a
 * generic "invalid record".
 *
 * Records are small metadata; the authority for what a snapshot contains is its manifest
 * (src/storage/store/manifest.ts), which is checksummed and repeats the ids and sizes that restore
 * relies on, so a damaged record cannot make restore produce a wrong image.
 */
import { randomBytes } from 'node:crypto';
import { corrupt, invalid } from '../../engine/errors';
import type { Consistency } from '../../host/point-in-time';
import type { NativeStat } from '../../engine/native';

export const STORE_FORMAT = 'disksnap-store';
export const STORE_VERSION = 1;
export const DEFAULT_BLOCK_SIZE = 512 * 1024;
/** Smallest and largest block size a store accepts: 4 KiB keeps manifests of big volumes
 * sane (40 bytes per 4 KiB ≈ 1%); 64 MiB keeps one block in memory several times over cheap. */
export const MIN_BLOCK_SIZE = 4 * 1024;
export const MAX_BLOCK_SIZE = 64 * 1024 * 1024;

export type SnapshotState = 'pending' | 'completed' | 'error';
/** The values a record's `consistency` may hold (the host's Consistency, src/host/freeze.ts). */
export const CONSISTENCIES: readonly Consistency[] = ['frozen-clone', 'frozen-cbw', 'frozen', 'crash-consistent', 'not-mounted', 'guest-frozen'];
export type DigestAlgorithm = 'sha256' | 'hmac-sha256';

export interface StoreConfig {
  format: typeof STORE_FORMAT;
  version: number;
  /** random id of this store (`store-` + hex) */
  id: string;
  blockSize: number;
  /** the digest of plain snapshots, 'sha256' (encrypted ones use keyed digests: store/crypto.ts) */
  digest: DigestAlgorithm;
  created: string;
}

export interface VolumeRecord {
  id: string;
  /** absolute path the volume was registered from; a hint, the identity is the id */
  path: string;
  /** bytes the guest sees: a raw file's or device's size, a qcow2 volume's virtual size */
  size: number;
  /** st_dev / st_ino at registration or last snapshot: finds a volume that moved */
  dev: number;
  ino: string;
  encrypted: boolean;
  keyId: string | null;
  created: string;
  /**
   * Set while an in-place restore rewrites the volume, cleared when it finished and was
   * fsynced. While set, snapshots of the volume are refused (it holds a mix of two moments)
   * and the message says which restore to re-run.
   */
  inPlaceRestore: { snapshotId: string; startTime: string } | null;
  /**
   * `volume policy`: the retention rules `snapshot prune` applies to this volume after each
   * of its snapshots completes (src/storage/prune.ts). Null: none (older records too).
   */
  retention: RetentionPolicy | null;
}

/** restic's forget rules (src/storage/prune.ts): counts per rule, and tags that keep a snapshot. */
export interface RetentionPolicy {
  last?: number;
  hourly?: number;
  daily?: number;
  weekly?: number;
  monthly?: number;
  yearly?: number;
  /** `KEY` or `KEY=VALUE` */
  tags?: string[];
}

export const RETENTION_RULES = ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const;

function retentionOf(file: string, o: Obj): RetentionPolicy | null {
  if (o.retention === null || o.retention === undefined) return null;
  const r = obj(file, o, 'retention');
  const out: RetentionPolicy = {};
  for (const k of RETENTION_RULES) if (r[k] !== undefined) out[k] = int(file, r, k, 1);
  if (r.tags !== undefined) {
    if (!Array.isArray(r.tags) || r.tags.some((x) => typeof x !== 'string' || x === '' || x.startsWith('='))) {
      throw corrupt(file, `field 'retention.tags' is ${JSON.stringify(r.tags)}, expected a list of KEY or KEY=VALUE`);
    }
    out.tags = r.tags as string[];
  }
  const unknown = Object.keys(r).filter((k) => k !== 'tags' && !(RETENTION_RULES as readonly string[]).includes(k));
  if (unknown.length) throw corrupt(file, `field 'retention' has unknown rules: ${unknown.join(', ')}`);
  if (!RETENTION_RULES.some((k) => out[k] !== undefined) && !out.tags?.length) throw corrupt(file, "field 'retention' has no rule (it would remove every snapshot)");
  return out;
}

export interface SnapshotStats {
  /** blocks holding data (manifest entries) */
  dataBlocks: number;
  /** blocks that are holes or all zeros (not stored) */
  zeroBlocks: number;
  /** blocks whose digest differs from the parent snapshot's (all data blocks for a full one) */
  changedBlocks: number;
  /** block objects this snapshot wrote to the store (the rest were already there) */
  blocksAdded: number;
  bytesAdded: number;
  /** bytes read from the volume and hashed */
  bytesScanned: number;
}

export interface SnapshotRecord {
  /** @pattern ^snap-[0-9a-f]{16}$ */
  id: string;
  /** @pattern ^vol-[0-9a-f]{16}$ */
  volumeId: string;
  state: SnapshotState;
  /**
   * percent, 0..100
   * @minimum 0
   * @maximum 100
   */
  progress: number;
  name: string;
  description: string;
  tags: Record<string, string>;
  encrypted: boolean;
  /** @format date-time */
  startTime: string;
  /** @format date-time */
  completionTime: string | null;
  /** @minimum 4096 */
  blockSize: number;
  /** @minimum 0 */
  volumeSize: number;
  /** the completed snapshot of the same volume this one was compared with */
  parentId: string | null;
  /** path of the volume when the snapshot was taken (a hint) */
  volumePath: string;
  stats: SnapshotStats;
  /** why the snapshot is in state `error` */
  error: string | null;
  /** the process that writes a pending snapshot; a pending snapshot whose writer is gone is stale */
  creator: { pid: number; host: string };
  /** how the volume was captured; null in records written before this field existed */
  consistency: Consistency | null;
  /** how long the volume's filesystem was frozen (ms), when it was */
  frozenMs: number | null;
  /** frozen-cbw: the bytes the VM overwrote while the snapshot read, preserved for it; else null */
  preservedBytes: number | null;
  /** the key an encrypted snapshot is sealed under (src/storage/store/crypto.ts); null when plain */
  /** @pattern ^key-[0-9a-f]{32}$ */
  keyId: string | null;
  /**
   * On disk, for an encrypted snapshot: name, description and tags sealed under the key
   * (base64); the clear fields are then empty. Null for a plain snapshot.
   */
  sealedMetadata: string | null;
  /** in memory only: name, description and tags are sealed and were not opened (no key) */
  metadataHidden: boolean;
  /** for a copy: the snapshot it was copied from */
  copiedFrom: { storeId: string; snapshotId: string; startTime: string } | null;
  /**
   * How the changed blocks were found: 'bitmap' (a QEMU persistent dirty bitmap of a qcow2
   * volume: only its dirty blocks were read), 'reflink' (the physical extents of a reflink
   * clone of the volume compared with the parent's clone: only the blocks that differ were read), 'tags' (every data block's change tag compared
   * with the parent's), 'hash' (every data block hashed and compared with the parent's
   * digest), 'unchanged' (the volume's identity and times were the parent's, which a write
   * moves: nothing was read, every block kept the parent's entry; see `volumeStat`), 'full'
   * (no parent). Null in records written before this field existed.
   */
  changeSource: ChangeSource | null;
  /** why a bitmap or reflink clone was not used, when the volume could have had one */
  changeSourceReason: string | null;
  /** the persistent bitmap this snapshot added to a qcow2 volume for its successor */
  changeTracking: { bitmap: string; granularity: number; virtualSize: number } | null;
  /** the format the volume was read as ('qcow2': its guest view), and the files of its chain */
  volumeFormat: 'raw' | 'qcow2' | null;
  volumeChain: string[] | null;
  /**
   * The reflink clone of a raw volume this snapshot was read from and kept beside the volume
   * for its successor (src/storage/reflink.ts): where it is and the identity it had, which
   * the successor checks before trusting it. Null when none was kept.
   */
  reflinkClone: ReflinkClone | null;
  /**
   * The raw volume's identity and times at the moment this snapshot holds, recorded only when
   * it was read live from a filesystem whose every write, through write(2) or a shared
   * mapping, moves them (ext4, xfs, btrfs; src/storage/capture.ts). A successor that finds the
   * volume with exactly these, in the same boot, reads nothing (changeSource 'unchanged').
   * Null otherwise.
   */
  volumeStat: VolumeStat | null;
  /**
   * `snapshot lock --until`: delete and prune refuse the snapshot until this time (ISO);
   * `snapshot unlock` clears it. Null when unlocked (and in records written before locks).
   */
  lockedUntil: string | null;
}

/** A file's identity and times as a snapshot records them (inode numbers and times as decimal strings). */
export interface FileIdentity {
  dev: number;
  ino: string;
  size: number;
  mtimeNs: string;
  ctimeNs: string;
}

/** A stat as a record keeps it. */
export function fileIdentityOf(st: NativeStat): FileIdentity {
  return { dev: st.dev, ino: String(st.ino), size: st.size, mtimeNs: String(st.mtimeNs), ctimeNs: String(st.ctimeNs) };
}

/** Whether `st` is the file `id` recorded, not written since (same device, inode, size, mtime, ctime). */
export function sameFileIdentity(id: FileIdentity, st: NativeStat): boolean {
  const now = fileIdentityOf(st);
  return id.dev === now.dev && id.ino === now.ino && id.size === now.size && id.mtimeNs === now.mtimeNs && id.ctimeNs === now.ctimeNs;
}

/**
 * A live-read raw volume's identity and times, and the boot they were seen in: after a crash
 * a write's data can be on disk while its new times were not yet (the journal commits them
 * later), so they prove nothing across a restart.
 */
export interface VolumeStat extends FileIdentity {
  bootId: string;
}

/** A reflink clone as a snapshot recorded it: where it is, and its identity and times. */
export interface ReflinkClone extends FileIdentity {
  path: string;
  /**
   * Shown only (`snapshot show`, computed then, never stored): bytes of the clone whose
   * physical extents the volume no longer shares, i.e. the space the clone pins; null when
   * the clone is missing or not the one recorded.
   */
  pinnedBytes?: number | null;
}

export type ChangeSource = 'bitmap' | 'reflink' | 'unchanged' | 'tags' | 'hash' | 'full';
export const CHANGE_SOURCES: readonly ChangeSource[] = ['bitmap', 'reflink', 'unchanged', 'tags', 'hash', 'full'];

/** `keys/<key-id>.json`: what a store knows of a key — never the key itself. */
export interface KeyRecord {
  id: string;
  /** 'none': a key file's 32 bytes are the key; 'scrypt': a passphrase stretched with these */
  kdf: 'none' | 'scrypt';
  scrypt: { salt: string; N: number; r: number; p: number } | null;
  created: string;
}

const HEX_ID = /^[0-9a-f]{16}$/;

export function newId(prefix: 'snap' | 'vol' | 'store'): string {
  return `${prefix}-${randomBytes(8).toString('hex')}`;
}

export function isSnapshotId(s: string): boolean {
  return s.startsWith('snap-') && HEX_ID.test(s.slice(5));
}

export function isVolumeId(s: string): boolean {
  return s.startsWith('vol-') && HEX_ID.test(s.slice(4));
}

export function checkBlockSize(n: number): number {
  if (!Number.isSafeInteger(n) || n < MIN_BLOCK_SIZE || n > MAX_BLOCK_SIZE || (n & (n - 1)) !== 0) {
    throw invalid(`block size ${n} must be a power of two between ${MIN_BLOCK_SIZE} (4K) and ${MAX_BLOCK_SIZE} (64M)`);
  }
  return n;
}

export function emptyStats(): SnapshotStats {
  return { dataBlocks: 0, zeroBlocks: 0, changedBlocks: 0, blocksAdded: 0, bytesAdded: 0, bytesScanned: 0 };
}

// ---- field checkers: each names the file and the field ----

type Obj = Record<string, unknown>;

function parseObject(file: string, text: string | Buffer): Obj {
  let v: unknown;
  try {
    v = JSON.parse(text.toString());
  } catch (e) {
    throw corrupt(file, `not valid JSON (${(e as Error).message})`);
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw corrupt(file, 'not a JSON object');
  return v as Obj;
}

function str(file: string, o: Obj, field: string, re?: RegExp): string {
  const v = o[field];
  if (typeof v !== 'string') throw corrupt(file, `field '${field}' is ${JSON.stringify(v)}, expected a string`);
  if (re && !re.test(v)) throw corrupt(file, `field '${field}' is ${JSON.stringify(v)}, expected ${re}`);
  return v;
}

function strOrNull(file: string, o: Obj, field: string): string | null {
  return o[field] === null || o[field] === undefined ? null : str(file, o, field);
}

function int(file: string, o: Obj, field: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  const v = o[field];
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) {
    throw corrupt(file, `field '${field}' is ${JSON.stringify(v)}, expected an integer in [${min}, ${max}]`);
  }
  return v;
}

function bool(file: string, o: Obj, field: string): boolean {
  const v = o[field];
  if (typeof v !== 'boolean') throw corrupt(file, `field '${field}' is ${JSON.stringify(v)}, expected true or false`);
  return v;
}

function time(file: string, o: Obj, field: string): string {
  const v = str(file, o, field);
  if (Number.isNaN(Date.parse(v))) throw corrupt(file, `field '${field}' is ${JSON.stringify(v)}, expected an ISO time`);
  return v;
}

function obj(file: string, o: Obj, field: string): Obj {
  const v = o[field];
  if (v === null || typeof v !== 'object' || Array.isArray(v)) {
    throw corrupt(file, `field '${field}' is ${JSON.stringify(v)}, expected an object`);
  }
  return v as Obj;
}

const ID_RE = { snap: /^snap-[0-9a-f]{16}$/, vol: /^vol-[0-9a-f]{16}$/, store: /^store-[0-9a-f]{16}$/ };

export function parseStoreConfig(file: string, text: string | Buffer): StoreConfig {
  const o = parseObject(file, text);
  if (o.format !== STORE_FORMAT) throw corrupt(file, `field 'format' is ${JSON.stringify(o.format)}, expected "${STORE_FORMAT}"`);
  const version = int(file, o, 'version', 1);
  if (version > STORE_VERSION) {
    throw corrupt(file, `field 'version' is ${version}: this disksnap reads store format ${STORE_VERSION}; upgrade disksnap`);
  }
  const blockSize = int(file, o, 'blockSize', MIN_BLOCK_SIZE, MAX_BLOCK_SIZE);
  if ((blockSize & (blockSize - 1)) !== 0) throw corrupt(file, `field 'blockSize' is ${blockSize}, expected a power of two`);
  const digest = str(file, o, 'digest');
  if (digest !== 'sha256' && digest !== 'hmac-sha256') {
    throw corrupt(file, `field 'digest' is ${JSON.stringify(digest)}, expected "sha256" or "hmac-sha256"`);
  }
  return { format: STORE_FORMAT, version, id: str(file, o, 'id', ID_RE.store), blockSize, digest, created: time(file, o, 'created') };
}

export function parseVolumeRecord(file: string, text: string | Buffer): VolumeRecord {
  const o = parseObject(file, text);
  let inPlaceRestore: VolumeRecord['inPlaceRestore'] = null;
  if (o.inPlaceRestore !== null && o.inPlaceRestore !== undefined) {
    const r = obj(file, o, 'inPlaceRestore');
    inPlaceRestore = { snapshotId: str(file, r, 'snapshotId', ID_RE.snap), startTime: time(file, r, 'startTime') };
  }
  return {
    id: str(file, o, 'id', ID_RE.vol),
    path: str(file, o, 'path'),
    size: int(file, o, 'size'),
    dev: int(file, o, 'dev'),
    ino: str(file, o, 'ino', /^\d+$/),
    encrypted: bool(file, o, 'encrypted'),
    keyId: strOrNull(file, o, 'keyId'),
    created: time(file, o, 'created'),
    inPlaceRestore,
    retention: retentionOf(file, o),
  };
}

export function parseSnapshotRecord(file: string, text: string | Buffer): SnapshotRecord {
  const o = parseObject(file, text);
  const state = str(file, o, 'state');
  if (state !== 'pending' && state !== 'completed' && state !== 'error') {
    throw corrupt(file, `field 'state' is ${JSON.stringify(state)}, expected "pending", "completed" or "error"`);
  }
  const tagsObj = obj(file, o, 'tags');
  const tags: Record<string, string> = {};
  for (const [k, v] of Object.entries(tagsObj)) {
    if (typeof v !== 'string') throw corrupt(file, `tag '${k}' is ${JSON.stringify(v)}, expected a string`);
    tags[k] = v;
  }
  const s = obj(file, o, 'stats');
  const stats: SnapshotStats = {
    dataBlocks: int(file, s, 'dataBlocks'),
    zeroBlocks: int(file, s, 'zeroBlocks'),
    changedBlocks: int(file, s, 'changedBlocks'),
    blocksAdded: int(file, s, 'blocksAdded'),
    bytesAdded: int(file, s, 'bytesAdded'),
    bytesScanned: int(file, s, 'bytesScanned'),
  };
  const c = obj(file, o, 'creator');
  const blockSize = int(file, o, 'blockSize', MIN_BLOCK_SIZE, MAX_BLOCK_SIZE);
  return {
    id: str(file, o, 'id', ID_RE.snap),
    volumeId: str(file, o, 'volumeId', ID_RE.vol),
    state,
    progress: int(file, o, 'progress', 0, 100),
    name: str(file, o, 'name'),
    description: str(file, o, 'description'),
    tags,
    encrypted: bool(file, o, 'encrypted'),
    startTime: time(file, o, 'startTime'),
    completionTime: o.completionTime === null ? null : time(file, o, 'completionTime'),
    blockSize,
    volumeSize: int(file, o, 'volumeSize'),
    parentId: o.parentId === null ? null : str(file, o, 'parentId', ID_RE.snap),
    volumePath: str(file, o, 'volumePath'),
    stats,
    error: strOrNull(file, o, 'error'),
    creator: { pid: int(file, c, 'pid'), host: str(file, c, 'host') },
    consistency: consistencyOf(file, o),
    frozenMs: o.frozenMs === null || o.frozenMs === undefined ? null : num(file, o, 'frozenMs'),
    preservedBytes: o.preservedBytes === null || o.preservedBytes === undefined ? null : int(file, o, 'preservedBytes'),
    ...encryptionOf(file, o),
    ...changeFieldsOf(file, o),
    lockedUntil: o.lockedUntil === null || o.lockedUntil === undefined ? null : time(file, o, 'lockedUntil'),
  };
}

/** The change-source and volume-format fields; each null when absent (older records). */
function changeFieldsOf(file: string, o: Obj): Pick<SnapshotRecord, 'changeSource' | 'changeSourceReason' | 'changeTracking' | 'volumeFormat' | 'volumeChain' | 'reflinkClone' | 'volumeStat'> {
  const absent = (f: string): boolean => o[f] === null || o[f] === undefined;
  let changeSource: ChangeSource | null = null;
  if (!absent('changeSource')) {
    const v = str(file, o, 'changeSource');
    if (!(CHANGE_SOURCES as readonly string[]).includes(v)) {
      throw corrupt(file, `field 'changeSource' is ${JSON.stringify(v)}, expected one of ${CHANGE_SOURCES.map((c) => `"${c}"`).join(', ')}`);
    }
    changeSource = v as ChangeSource;
  }
  let changeTracking: SnapshotRecord['changeTracking'] = null;
  if (!absent('changeTracking')) {
    const c = obj(file, o, 'changeTracking');
    changeTracking = { bitmap: str(file, c, 'bitmap'), granularity: int(file, c, 'granularity'), virtualSize: int(file, c, 'virtualSize') };
  }
  let volumeFormat: SnapshotRecord['volumeFormat'] = null;
  if (!absent('volumeFormat')) {
    const v = str(file, o, 'volumeFormat');
    if (v !== 'raw' && v !== 'qcow2') throw corrupt(file, `field 'volumeFormat' is ${JSON.stringify(v)}, expected "raw" or "qcow2"`);
    volumeFormat = v;
  }
  let volumeChain: string[] | null = null;
  if (!absent('volumeChain')) {
    const v = o.volumeChain;
    if (!Array.isArray(v) || v.some((x) => typeof x !== 'string')) throw corrupt(file, `field 'volumeChain' is ${JSON.stringify(v)}, expected a list of paths`);
    volumeChain = v as string[];
  }
  const dec = /^\d+$/;
  const statOf = (c: Obj): FileIdentity => ({ dev: int(file, c, 'dev'), ino: str(file, c, 'ino', dec), size: int(file, c, 'size'), mtimeNs: str(file, c, 'mtimeNs', dec), ctimeNs: str(file, c, 'ctimeNs', dec) });
  let reflinkClone: ReflinkClone | null = null;
  if (!absent('reflinkClone')) {
    const c = obj(file, o, 'reflinkClone');
    reflinkClone = { path: str(file, c, 'path'), ...statOf(c) };
  }
  let volumeStat: VolumeStat | null = null;
  if (!absent('volumeStat')) {
    const c = obj(file, o, 'volumeStat');
    volumeStat = { ...statOf(c), bootId: str(file, c, 'bootId', /^[0-9a-f-]{36}$/) };
  }
  return { changeSource, changeSourceReason: absent('changeSourceReason') ? null : str(file, o, 'changeSourceReason'), changeTracking, volumeFormat, volumeChain, reflinkClone, volumeStat };
}

const KEY_ID_RE = /^key-[0-9a-f]{32}$/;

function encryptionOf(file: string, o: Obj): Pick<SnapshotRecord, 'keyId' | 'sealedMetadata' | 'metadataHidden' | 'copiedFrom'> {
  const encrypted = o.encrypted === true;
  const keyId = o.keyId === null || o.keyId === undefined ? null : str(file, o, 'keyId', KEY_ID_RE);
  if (encrypted && keyId === null) throw corrupt(file, "field 'keyId' is missing: an encrypted snapshot names its key");
  if (!encrypted && keyId !== null) throw corrupt(file, `field 'keyId' is ${JSON.stringify(keyId)} in a snapshot that is not encrypted`);
  const sealedMetadata = o.sealedMetadata === null || o.sealedMetadata === undefined ? null : str(file, o, 'sealedMetadata', /^[A-Za-z0-9+/]+=*$/);
  if (encrypted && sealedMetadata === null) throw corrupt(file, "field 'sealedMetadata' is missing: an encrypted snapshot's name, description and tags are sealed");
  if (!encrypted && sealedMetadata !== null) throw corrupt(file, "field 'sealedMetadata' is set in a snapshot that is not encrypted");
  let copiedFrom: SnapshotRecord['copiedFrom'] = null;
  if (o.copiedFrom !== null && o.copiedFrom !== undefined) {
    const c = obj(file, o, 'copiedFrom');
    copiedFrom = { storeId: str(file, c, 'storeId', ID_RE.store), snapshotId: str(file, c, 'snapshotId', ID_RE.snap), startTime: time(file, c, 'startTime') };
  }
  return { keyId, sealedMetadata, metadataHidden: sealedMetadata !== null, copiedFrom };
}

export function parseKeyRecord(file: string, text: string | Buffer): KeyRecord {
  const o = parseObject(file, text);
  const kdf = str(file, o, 'kdf');
  if (kdf !== 'none' && kdf !== 'scrypt') throw corrupt(file, `field 'kdf' is ${JSON.stringify(kdf)}, expected "none" or "scrypt"`);
  let scrypt: KeyRecord['scrypt'] = null;
  if (kdf === 'scrypt') {
    const p = obj(file, o, 'scrypt');
    scrypt = {
      salt: str(file, p, 'salt', /^[A-Za-z0-9+/]{22,}={0,2}$/),
      N: int(file, p, 'N', 2, 2 ** 24),
      r: int(file, p, 'r', 1, 64),
      p: int(file, p, 'p', 1, 64),
    };
    if ((scrypt.N & (scrypt.N - 1)) !== 0) throw corrupt(file, `field 'scrypt.N' is ${scrypt.N}, expected a power of two`);
  }
  return { id: str(file, o, 'id', KEY_ID_RE), kdf, scrypt, created: time(file, o, 'created') };
}

function consistencyOf(file: string, o: Obj): Consistency | null {
  if (o.consistency === null || o.consistency === undefined) return null;
  const v = str(file, o, 'consistency');
  if (!(CONSISTENCIES as readonly string[]).includes(v)) {
    throw corrupt(file, `field 'consistency' is ${JSON.stringify(v)}, expected one of ${CONSISTENCIES.map((c) => `"${c}"`).join(', ')}`);
  }
  return v as Consistency;
}

function num(file: string, o: Obj, field: string): number {
  const v = o[field];
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 0) throw corrupt(file, `field '${field}' is ${JSON.stringify(v)}, expected a non-negative number`);
  return v;
}

/** What a user sees: the record without the sealed blob; `metadataHidden` says whether
 * an encrypted snapshot's name, description and tags could not be opened (no key given). */
export type SnapshotJson = Omit<SnapshotRecord, 'sealedMetadata'>;

/** Stable key order: the fields users read first come first. */
function ordered(r: SnapshotRecord): SnapshotRecord {
  return {
    id: r.id,
    volumeId: r.volumeId,
    state: r.state,
    progress: r.progress,
    name: r.name,
    description: r.description,
    tags: r.tags,
    encrypted: r.encrypted,
    startTime: r.startTime,
    completionTime: r.completionTime,
    blockSize: r.blockSize,
    volumeSize: r.volumeSize,
    parentId: r.parentId,
    volumePath: r.volumePath,
    stats: r.stats,
    error: r.error,
    creator: r.creator,
    consistency: r.consistency,
    frozenMs: r.frozenMs,
    preservedBytes: r.preservedBytes,
    keyId: r.keyId,
    sealedMetadata: r.sealedMetadata,
    metadataHidden: r.metadataHidden,
    copiedFrom: r.copiedFrom,
    changeSource: r.changeSource,
    changeSourceReason: r.changeSourceReason,
    changeTracking: r.changeTracking,
    volumeFormat: r.volumeFormat,
    volumeChain: r.volumeChain,
    reflinkClone: r.reflinkClone,
    volumeStat: r.volumeStat,
    lockedUntil: r.lockedUntil,
  };
}

/** The time a snapshot's lock runs out, when it is locked at `now`; undefined otherwise. */
export function lockedAt(r: Pick<SnapshotRecord, 'lockedUntil'>, now = Date.now()): string | undefined {
  return r.lockedUntil !== null && Date.parse(r.lockedUntil) > now ? r.lockedUntil : undefined;
}

export function snapshotJson(r: SnapshotRecord): SnapshotJson {
  const { sealedMetadata: _sealed, ...shown } = ordered(r);
  return shown;
}

/**
 * The record as stored. For an encrypted snapshot `sealed` is its sealed metadata, and the
 * clear name, description and tags are written empty.
 */
export function snapshotDisk(r: SnapshotRecord, sealed: string | null): Omit<SnapshotRecord, 'metadataHidden'> {
  const { metadataHidden: _hidden, ...disk } = ordered(r);
  if (r.encrypted) return { ...disk, name: '', description: '', tags: {}, sealedMetadata: sealed };
  return { ...disk, sealedMetadata: null };
}

/** `K=V` strings to a tags object; EINVALID on a malformed one. */
/** A tag filter (`KEY=VALUE`, or `KEY` for any value): list --tag and prune --keep-tag. */
export function checkTagFilter(filter: string, what: string): void {
  if (filter === '' || filter.startsWith('=')) throw invalid(`${what} '${filter}' must be KEY=VALUE or KEY`);
}

/** Whether `tags` match a filter checked by checkTagFilter. */
export function matchesTag(tags: Record<string, string>, filter: string): boolean {
  const eq = filter.indexOf('=');
  return eq < 0 ? Object.hasOwn(tags, filter) : tags[filter.slice(0, eq)] === filter.slice(eq + 1);
}

export function parseTags(items: string[] | undefined): Record<string, string> {
  const tags: Record<string, string> = {};
  for (const item of items ?? []) {
    const eq = item.indexOf('=');
    if (eq <= 0) throw invalid(`tag '${item}' must be KEY=VALUE with a non-empty KEY`);
    tags[item.slice(0, eq)] = item.slice(eq + 1);
  }
  return tags;
}
