/**
 * Where encryption keys come from, and how a store recognises them (formats and subkeys:
 * src/storage/store/crypto.ts).
 *
 * A key is given as one of:
 *   --key-file K         exactly 32 bytes, used as they are (make one: `disksnap key generate K`)
 *   --passphrase-file F  the file's first line (a trailing newline is not part of it)
 *   DISKSNAP_PASSPHRASE  the same, from the environment, when neither option is given; it is
 *                        ignored where no key is needed (a plain volume), so it can stay set
 * A passphrase is stretched with scrypt (N=2^15, r=8, p=1: about 32 MiB and 0.1 s) with a
 * random 16-byte salt. The salt and cost are kept in the store, in `keys/<key-id>.json`, with
 * the key id; the key never is. A key file's record says `kdf: "none"`.
 *
 * Recognising a key before any data is touched: a snapshot (or volume) names its key id. A
 * key file gives its id at once; a passphrase is stretched with the salt of that id's record
 * and must then give the same id. Otherwise: EKEYREJECTED, naming both ids. No key where one
 * is needed: ENOKEY, saying which options give one.
 *
 * New encryption with a passphrase (volume register --encrypted, copy --encrypt) reuses the
 * salt of an existing key record when the passphrase matches it — so one passphrase is one
 * key per store, and snapshots under it share blocks — and otherwise creates a new salt.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes, scrypt as scryptCb } from 'node:crypto';
import { DisksnapError, fromNodeError, invalid } from '../engine/errors';
import { DerivedKeys, KEY_BYTES, deriveKeys, keyIdOf } from './store/crypto';
import { writeAtomically } from '../engine/atomic';
import type { KeyRecord } from './store/records';
import { readSecretFile } from './store/secure';
import type { Store } from './store/store';

export const SCRYPT_COST = { N: 2 ** 15, r: 8, p: 1 };

export type KeySpec =
  | { keyFile: string }
  | { passphraseFile: string }
  /** `implicit`: taken from the environment, not asked for — ignored where no key is needed */
  | { passphrase: string; from?: string; implicit?: boolean }
  | { key: Uint8Array; from?: string };

const HOW = 'pass --key-file K (32 random bytes), --passphrase-file F, or set DISKSNAP_PASSPHRASE';

export function noKeyError(what: string, keyId: string | null): DisksnapError {
  return new DisksnapError(`${what} is encrypted${keyId ? ` (key ${keyId})` : ''}: ${HOW}`, 'ENOKEY', 126);
}

export function needKeyError(what: string): DisksnapError {
  return new DisksnapError(`${what} needs a key: ${HOW}`, 'ENOKEY', 126);
}

/** Whether the spec was given on purpose (an option), not just found in the environment. */
export function isExplicit(spec: KeySpec | undefined): boolean {
  return spec !== undefined && !('implicit' in spec && spec.implicit);
}

function describeSpec(spec: KeySpec): string {
  if ('keyFile' in spec) return `the key file ${spec.keyFile}`;
  if ('passphraseFile' in spec) return `the passphrase in ${spec.passphraseFile}`;
  if ('passphrase' in spec) return `the passphrase${spec.from ? ` from ${spec.from}` : ''}`;
  return `the key${spec.from ? ` from ${spec.from}` : ''}`;
}

/** A key file's 32 bytes; refused when group or others can read it (src/storage/store/secure.ts). */
export function readKeyFile(file: string): Buffer {
  return readSecretFile(file, 'key file', (data) => {
    if (data.length !== KEY_BYTES) {
      throw invalid(`key file ${file} holds ${data.length} bytes; a key file is exactly ${KEY_BYTES} random bytes (make one: disksnap key generate KEYFILE)`, file);
    }
  });
}

/**
 * Writes a new key file: 32 random bytes, mode 0600, under a temporary name, fsynced, then
 * renamed (never over an existing file unless `force`). Returns the key id a store will
 * record for it.
 */
export async function generateKeyFile(file: string, opts: { force?: boolean } = {}): Promise<{ file: string; keyId: string }> {
  const key = randomBytes(KEY_BYTES);
  const dir = path.dirname(path.resolve(file));
  if (!fs.existsSync(dir)) throw new DisksnapError(`directory ${dir} does not exist`, 'ENOENT', 2, dir);
  try {
    await writeAtomically(file, { force: opts.force, sync: true }, (tmp) => fs.writeFileSync(tmp, key, { mode: 0o600, flag: 'wx' }));
  } catch (e) {
    throw fromNodeError(e, file);
  }
  return { file, keyId: keyIdOf(key) };
}

export function readPassphraseFile(file: string): string {
  let text: string;
  try {
    text = fs.readFileSync(file, 'utf8');
  } catch (e) {
    throw fromNodeError(e, file);
  }
  const line = text.replace(/\r?\n$/, '');
  if (line.includes('\n')) throw invalid(`passphrase file ${file} has more than one line`, file);
  if (line.length === 0) throw invalid(`passphrase file ${file} is empty`, file);
  return line;
}

function scrypt(passphrase: string, salt: Buffer, cost: { N: number; r: number; p: number }): Promise<Buffer> {
  return new Promise((resolve, reject) =>
    scryptCb(passphrase, salt, KEY_BYTES, { ...cost, maxmem: 256 * cost.N * cost.r + 32 * 1024 * 1024 }, (err, key) => (err ? reject(err) : resolve(key))),
  );
}

type Material = { kind: 'key'; master: Buffer } | { kind: 'passphrase'; passphrase: string };

/**
 * The keys one spec gives, store by store and id by id (a passphrase gives one key per salt).
 * Derivations are cached: a listing with many snapshots under one key stretches it once.
 */
export class KeyRing {
  private material: Material | undefined;
  private readonly cache = new Map<string, DerivedKeys | null>();

  constructor(readonly spec: KeySpec | undefined) {}

  get present(): boolean {
    return this.spec !== undefined;
  }

  /** Reads the key file or passphrase now (a bad one is an error before anything else). */
  check(): this {
    if (this.spec) this.load();
    return this;
  }

  private load(): Material {
    if (this.material) return this.material;
    const spec = this.spec!;
    if ('keyFile' in spec) this.material = { kind: 'key', master: readKeyFile(spec.keyFile) };
    else if ('key' in spec) {
      if (spec.key.length !== KEY_BYTES) throw invalid(`a key is exactly ${KEY_BYTES} bytes, not ${spec.key.length}`);
      this.material = { kind: 'key', master: Buffer.from(spec.key) };
    } else if ('passphraseFile' in spec) this.material = { kind: 'passphrase', passphrase: readPassphraseFile(spec.passphraseFile) };
    else {
      if (!spec.passphrase) throw invalid(`the passphrase${spec.from ? ` in ${spec.from}` : ''} is empty`);
      this.material = { kind: 'passphrase', passphrase: spec.passphrase };
    }
    return this.material;
  }

  private async derive(rec: KeyRecord | undefined): Promise<DerivedKeys | undefined> {
    const m = this.load();
    if (m.kind === 'key') return deriveKeys(m.master);
    if (!rec || rec.kdf !== 'scrypt' || !rec.scrypt) return undefined;
    const master = await scrypt(m.passphrase, Buffer.from(rec.scrypt.salt, 'base64'), rec.scrypt);
    return deriveKeys(master);
  }

  /** The key with id `keyId` if this spec gives it in `store`, else undefined. */
  async tryId(store: Store, keyId: string, extra: KeyRecord[] = []): Promise<DerivedKeys | undefined> {
    if (!this.spec) return undefined;
    const cacheKey = `${store.config.id}/${keyId}`;
    if (this.cache.has(cacheKey)) return this.cache.get(cacheKey) ?? undefined;
    const m = this.load();
    let keys: DerivedKeys | undefined;
    if (m.kind === 'key') keys = deriveKeys(m.master);
    else keys = await this.derive((await store.readKeyRecord(keyId)) ?? extra.find((r) => r.id === keyId));
    const ok = keys && keys.id === keyId ? keys : undefined;
    this.cache.set(cacheKey, ok ?? null);
    return ok;
  }

  /**
   * The key `keyId` of `what` (a snapshot, a volume), or ENOKEY (no key given) /
   * EKEYREJECTED (another key) — before anything is read.
   */
  async forId(store: Store, keyId: string, what: string, extra: KeyRecord[] = []): Promise<DerivedKeys> {
    if (!this.spec) throw noKeyError(what, keyId);
    const keys = await this.tryId(store, keyId, extra);
    if (keys) return keys;
    const m = this.load();
    if (m.kind === 'passphrase') {
      const rec = (await store.readKeyRecord(keyId)) ?? extra.find((r) => r.id === keyId);
      if (!rec) {
        throw new DisksnapError(`${what} is encrypted with key ${keyId}, of which store ${store.dir} has no record (keys/${keyId}.json): a passphrase cannot be checked without its salt`, 'ECORRUPT');
      }
      if (rec.kdf === 'none') {
        throw new DisksnapError(`${what} is encrypted with a key file's key (${keyId}), not a passphrase: pass that key with --key-file`, 'EKEYREJECTED', 129);
      }
      throw new DisksnapError(`${describeSpec(this.spec)} is not the passphrase of ${what} (key ${keyId}): wrong passphrase`, 'EKEYREJECTED', 129);
    }
    throw new DisksnapError(`${describeSpec(this.spec)} is key ${deriveKeys(m.master).id}, not the key of ${what} (${keyId}): wrong key`, 'EKEYREJECTED', 129);
  }

  /**
   * A key for new encryption in `store` (registering an encrypted volume, encrypting a copy),
   * with its record written there. A passphrase reuses a record it matches (in the store or
   * among `candidates`), else gets a new salt.
   */
  async forNew(store: Store, what: string, candidates: KeyRecord[] = []): Promise<DerivedKeys> {
    if (!this.spec) throw needKeyError(what);
    const m = this.load();
    let keys: DerivedKeys | undefined;
    let rec: KeyRecord | undefined;
    if (m.kind === 'key') {
      keys = deriveKeys(m.master);
      rec = (await store.readKeyRecord(keys.id)) ?? candidates.find((r) => r.id === keys!.id) ?? { id: keys.id, kdf: 'none', scrypt: null, created: new Date().toISOString() };
    } else {
      const known = [...(await store.listKeyRecords()), ...candidates].filter((r) => r.kdf === 'scrypt');
      for (const r of known) {
        const k = await this.derive(r);
        if (k && k.id === r.id) {
          keys = k;
          rec = r;
          break;
        }
      }
      if (!keys) {
        const salt = randomBytes(16);
        keys = deriveKeys(await scrypt(m.passphrase, salt, SCRYPT_COST));
        rec = { id: keys.id, kdf: 'scrypt', scrypt: { salt: salt.toString('base64'), ...SCRYPT_COST }, created: new Date().toISOString() };
      }
    }
    await store.writeKeyRecord(rec!);
    this.cache.set(`${store.config.id}/${keys.id}`, keys);
    return keys;
  }
}
