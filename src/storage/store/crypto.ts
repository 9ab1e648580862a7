/**
 * Encryption at rest of snapshot stores: what is sealed, under which key, and how.
 *
 * Keys. A volume (and every snapshot of it) is encrypted under one 32-byte master key: the
 * bytes of a key file, or a passphrase stretched with scrypt (src/storage/keys.ts). The master key
 * never reaches the store. Four subkeys come from it by HKDF-SHA-256 (RFC 5869, salt
 * "disksnap", info "disksnap v1 <use>"), so that no key serves two purposes:
 *
 *   block       AES-256-GCM of block objects
 *   digest      HMAC-SHA-256 of a block's plaintext: the object's name and its manifest entry
 *               (the native keyed hash computes it on worker threads)
 *   metadata    AES-256-GCM of a snapshot record's name, description and tags
 *   manifest    HMAC-SHA-256 trailer of manifests (instead of their plain SHA-256 checksum)
 *
 * and the key id, recorded in volume and snapshot records, is the first 16 bytes of
 * HMAC-SHA-256(master, "disksnap key id"): a wrong key is recognised from it before any data
 * is read or written, and it reveals nothing about the key.
 *
 * Block objects (sealed and opened in bulk by native/gcm.cc through crypto-pool.ts; the
 * functions here are the reference and the event-loop fallback). The object of a block with
 * digest D (HMAC of its plaintext P) is
 *
 *   offset  size  field
 *   0       n     AES-256-GCM ciphertext of P (n = |P|, the block size but for a volume's tail)
 *   n       12    nonce: 96 random bits, new for every object written (never derived from
 *                 content: two stores, or two writes of one block, never share a nonce)
 *   n+12    16    GCM tag
 *   n+28    4     "DSE1" (format of sealed objects, version 1)
 *
 * with AAD = "disksnap-block-v1:" || D. The ciphertext comes first so that it can be written
 * from an aligned buffer with O_DIRECT (src/storage/store/dir.ts); sealing encrypts in place, in the
 * caller's buffer. The AAD binds the object to its name: an object copied over another
 * block's name (a swapped object), a flipped byte anywhere, a truncated object, or an object
 * sealed under another key all fail authentication — ECORRUPT, never wrong bytes. The store
 * id is deliberately not in the AAD: an object's content is fully determined by its keyed
 * digest, so the same object is equally right in any store that uses the same key, and copies
 * between stores may move it as it is. Random 96-bit nonces keep GCM within its bounds for
 * 2^32 objects per key (2 PiB of 512 KiB blocks).
 *
 * What an encrypted snapshot reveals to someone who reads the store without the key: block
 * objects are ciphertext; manifest entries are keyed digests (equal blocks have equal
 * digests, so which blocks of the volume hold data and which changed between snapshots is
 * visible — as with any incremental backup, and as EBS's ListChangedBlocks); record fields:
 * ids, states, times, sizes, block counts, key id, consistency and the volume's path on the
 * host that took it. Not revealed: block contents, and the user's name, description and tags
 * (sealed in the record's `sealedMetadata`).
 */
import { createCipheriv, createDecipheriv, createHmac, hkdfSync, randomBytes } from 'node:crypto';
import { DisksnapError } from '../../engine/errors';

export const KEY_BYTES = 32;
export const NONCE_BYTES = 12;
export const TAG_BYTES = 16;
export const TRAILER_BYTES = 32;
const TRAILER_MAGIC = Buffer.from('DSE1', 'latin1');
const BLOCK_AAD = Buffer.from('disksnap-block-v1:', 'latin1');
const META_AAD = 'disksnap-metadata-v1:';

export interface DerivedKeys {
  /** `key-` + 32 hex digits */
  id: string;
  block: Buffer;
  digest: Buffer;
  metadata: Buffer;
  manifest: Buffer;
  /** GMAC key of change tags (src/storage/store/tags.ts) */
  tag: Buffer;
}

export function keyIdOf(master: Uint8Array): string {
  return 'key-' + createHmac('sha256', master).update('disksnap key id').digest().subarray(0, 16).toString('hex');
}

export function isKeyId(s: unknown): s is string {
  return typeof s === 'string' && /^key-[0-9a-f]{32}$/.test(s);
}

export function deriveKeys(master: Uint8Array): DerivedKeys {
  if (master.length !== KEY_BYTES) throw new DisksnapError(`a key is ${KEY_BYTES} bytes, not ${master.length}`, 'EINVALID');
  const sub = (use: string) => Buffer.from(hkdfSync('sha256', master, 'disksnap', `disksnap v1 ${use}`, KEY_BYTES));
  return { id: keyIdOf(master), block: sub('block'), digest: sub('digest'), metadata: sub('metadata'), manifest: sub('manifest'), tag: sub('tag') };
}

function blockAad(digest: Uint8Array): Buffer {
  return Buffer.concat([BLOCK_AAD, digest]);
}

/**
 * Seals `plain` in place (it then holds the ciphertext) and returns the object's parts:
 * [ciphertext (a view of `plain`), trailer].
 */
export function sealBlock(keys: DerivedKeys, digest: Uint8Array, plain: Buffer): [Buffer, Buffer] {
  const nonce = randomBytes(NONCE_BYTES);
  const c = createCipheriv('aes-256-gcm', keys.block, nonce);
  c.setAAD(blockAad(digest));
  const ct = c.update(plain);
  const rest = c.final();
  plain.set(ct, 0);
  if (rest.length) plain.set(rest, ct.length); // GCM is a stream mode: always empty
  const trailer = Buffer.concat([nonce, c.getAuthTag(), TRAILER_MAGIC]);
  return [plain, trailer];
}

/**
 * The plaintext of a sealed object, into `into` when it fits. ECORRUPT (naming `where`) when
 * the object is not one this key sealed for this digest.
 */
export function unsealBlock(keys: DerivedKeys, digest: Uint8Array, stored: Buffer, where: string, into?: Buffer): Buffer {
  if (stored.length < TRAILER_BYTES) {
    throw new DisksnapError(`object ${where} is ${stored.length} bytes, shorter than a sealed object's ${TRAILER_BYTES}-byte trailer`, 'ECORRUPT', undefined, where);
  }
  const n = stored.length - TRAILER_BYTES;
  const trailer = stored.subarray(n);
  if (!trailer.subarray(28).equals(TRAILER_MAGIC)) {
    throw new DisksnapError(`object ${where} does not end in a sealed object's trailer ("DSE1"): damaged, or not encrypted`, 'ECORRUPT', undefined, where);
  }
  const d = createDecipheriv('aes-256-gcm', keys.block, trailer.subarray(0, NONCE_BYTES));
  d.setAAD(blockAad(digest));
  d.setAuthTag(trailer.subarray(NONCE_BYTES, NONCE_BYTES + TAG_BYTES));
  const plain = d.update(stored.subarray(0, n));
  try {
    d.final();
  } catch {
    throw new DisksnapError(
      `object ${where} failed authentication (AES-GCM): damaged, swapped with another block's object, or sealed under another key`,
      'ECORRUPT',
      undefined,
      where,
    );
  }
  if (into && into.length >= n) {
    into.set(plain, 0);
    return into.subarray(0, n);
  }
  return plain;
}

export interface SealedMetadata {
  name: string;
  description: string;
  tags: Record<string, string>;
}

/** base64(nonce | ciphertext | tag) of the metadata's JSON, bound to the snapshot id. */
export function sealMetadata(keys: DerivedKeys, snapshotId: string, meta: SealedMetadata): string {
  const nonce = randomBytes(NONCE_BYTES);
  const c = createCipheriv('aes-256-gcm', keys.metadata, nonce);
  c.setAAD(Buffer.from(META_AAD + snapshotId, 'latin1'));
  const ct = Buffer.concat([c.update(JSON.stringify(meta), 'utf8'), c.final()]);
  return Buffer.concat([nonce, ct, c.getAuthTag()]).toString('base64');
}

export function unsealMetadata(keys: DerivedKeys, snapshotId: string, sealed: string, where: string): SealedMetadata {
  const raw = Buffer.from(sealed, 'base64');
  const bad = (why: string) => new DisksnapError(`${where}: sealed metadata ${why}`, 'ECORRUPT', undefined, where);
  if (raw.length < NONCE_BYTES + TAG_BYTES) throw bad('is too short');
  const d = createDecipheriv('aes-256-gcm', keys.metadata, raw.subarray(0, NONCE_BYTES));
  d.setAAD(Buffer.from(META_AAD + snapshotId, 'latin1'));
  d.setAuthTag(raw.subarray(raw.length - TAG_BYTES));
  let text: string;
  try {
    text = Buffer.concat([d.update(raw.subarray(NONCE_BYTES, raw.length - TAG_BYTES)), d.final()]).toString('utf8');
  } catch {
    throw bad('failed authentication (damaged, or moved from another record)');
  }
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch {
    throw bad('is not JSON');
  }
  const o = v as Partial<SealedMetadata>;
  if (!o || typeof o.name !== 'string' || typeof o.description !== 'string' || !o.tags || typeof o.tags !== 'object' || Array.isArray(o.tags)) {
    throw bad('lacks name, description or tags');
  }
  const tags: Record<string, string> = {};
  for (const [k, val] of Object.entries(o.tags)) {
    if (typeof val !== 'string') throw bad(`tag '${k}' is not a string`);
    tags[k] = val;
  }
  return { name: o.name, description: o.description, tags };
}
