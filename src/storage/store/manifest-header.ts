/**
 * The fixed-size header of a manifest (./manifest.ts has the whole format): its fields, the
 * versions (1 plain; 2 with pieces; 3 with pieces that may live in packs, ./packs.ts), and
 * their encoding and checks.
 */
import { corrupt, invalid } from '../../engine/errors';
import type { DigestAlgorithm } from './records';

export const MANIFEST_MAGIC = Buffer.from('DSNAPMF\n', 'latin1');
export const MANIFEST_VERSION = 1;
/** The version of a manifest with pieces (see above). */
export const MANIFEST_VERSION_PIECES = 2;
/** The version of a manifest whose pieces may be in packs (./packs.ts). */
export const MANIFEST_VERSION_PACKS = 3;
export const HEADER_LENGTH = 128;
export const ENTRY_LENGTH = 40;
export const TRAILER_LENGTH = 40;
export const DIGEST_LENGTH = 32;

const ALGO_CODE: Record<DigestAlgorithm, number> = { sha256: 1, 'hmac-sha256': 2 };
const FLAG_SEALED = 1;

export interface ManifestHeader {
  blockSize: number;
  volumeSize: number;
  snapshotId: string;
  volumeId: string;
  digest: DigestAlgorithm;
  sealed: boolean;
  /** 0 or absent: version 1, no pieces; else the piece size of a version 2 manifest */
  pieceSize?: number;
  /** version 3: pieces may be in packs, listed in the snapshot's pack index (needs pieceSize) */
  packed?: boolean;
}

/** The piece size a store of block size `bs` uses for pieces (0: none, blocks too small). */
export function pieceSizeFor(bs: number): number {
  return bs >= 32768 ? bs / 8 : 0;
}

function writeAscii(buf: Buffer, offset: number, text: string, field: string): void {
  if (text.length > 32 || !/^[\x21-\x7e]*$/.test(text)) throw invalid(`manifest ${field} '${text}' is not up to 32 printable ASCII characters`);
  buf.write(text, offset, 'latin1');
}

function readAscii(file: string, buf: Buffer, offset: number, field: string): string {
  const raw = buf.subarray(offset, offset + 32);
  const end = raw.indexOf(0);
  const text = raw.subarray(0, end < 0 ? 32 : end).toString('latin1');
  if (end >= 0 && raw.subarray(end).some((b) => b !== 0)) throw corrupt(file, `manifest ${field} has bytes after its NUL padding`);
  if (!/^[\x21-\x7e]+$/.test(text)) throw corrupt(file, `manifest ${field} ${JSON.stringify(text)} is not printable ASCII`);
  return text;
}

export function encodeHeader(h: ManifestHeader): Buffer {
  const b = Buffer.alloc(HEADER_LENGTH);
  MANIFEST_MAGIC.copy(b, 0);
  b.writeUInt16LE(h.pieceSize ? (h.packed ? MANIFEST_VERSION_PACKS : MANIFEST_VERSION_PIECES) : MANIFEST_VERSION, 8);
  b.writeUInt16LE(HEADER_LENGTH, 10);
  b.writeUInt16LE(ENTRY_LENGTH, 12);
  b.writeUInt8(ALGO_CODE[h.digest], 14);
  b.writeUInt8(h.sealed ? FLAG_SEALED : 0, 15);
  b.writeUInt32LE(h.blockSize, 16);
  b.writeUInt32LE(h.pieceSize ?? 0, 20);
  b.writeBigUInt64LE(BigInt(h.volumeSize), 24);
  writeAscii(b, 32, h.snapshotId, 'snapshot id');
  writeAscii(b, 64, h.volumeId, 'volume id');
  return b;
}

export function decodeHeader(file: string, b: Buffer): ManifestHeader {
  if (b.length < HEADER_LENGTH) throw corrupt(file, `manifest is ${b.length} bytes, shorter than its ${HEADER_LENGTH}-byte header`);
  if (!b.subarray(0, 8).equals(MANIFEST_MAGIC)) throw corrupt(file, `manifest magic is ${JSON.stringify(b.subarray(0, 8).toString('latin1'))}, expected "DSNAPMF\\n"`);
  const version = b.readUInt16LE(8);
  if (version !== MANIFEST_VERSION && version !== MANIFEST_VERSION_PIECES && version !== MANIFEST_VERSION_PACKS) {
    throw corrupt(file, `manifest version is ${version}, expected ${MANIFEST_VERSION}, ${MANIFEST_VERSION_PIECES} or ${MANIFEST_VERSION_PACKS}`);
  }
  const hlen = b.readUInt16LE(10);
  if (hlen !== HEADER_LENGTH) throw corrupt(file, `manifest header length is ${hlen}, expected ${HEADER_LENGTH}`);
  const elen = b.readUInt16LE(12);
  if (elen !== ENTRY_LENGTH) throw corrupt(file, `manifest entry length is ${elen}, expected ${ENTRY_LENGTH}`);
  const algo = b.readUInt8(14);
  const digest = (Object.keys(ALGO_CODE) as DigestAlgorithm[]).find((k) => ALGO_CODE[k] === algo);
  if (!digest) throw corrupt(file, `manifest digest algorithm is ${algo}, expected 1 (SHA-256) or 2 (HMAC-SHA-256)`);
  const flags = b.readUInt8(15);
  if (flags & ~FLAG_SEALED) throw corrupt(file, `manifest flags are 0x${flags.toString(16)}, unknown bits set`);
  const blockSize = b.readUInt32LE(16);
  if (blockSize === 0 || (blockSize & (blockSize - 1)) !== 0) throw corrupt(file, `manifest block size is ${blockSize}, expected a power of two`);
  const pieceSize = b.readUInt32LE(20);
  if (version === MANIFEST_VERSION && pieceSize !== 0) throw corrupt(file, 'manifest reserved field at offset 20 is not zero');
  if (version !== MANIFEST_VERSION && (pieceSize !== pieceSizeFor(blockSize) || pieceSize === 0)) {
    throw corrupt(file, `manifest piece size is ${pieceSize}, expected an eighth of the block size (${blockSize}), at least 4096`);
  }
  const volumeSize = b.readBigUInt64LE(24);
  if (volumeSize > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(file, `manifest volume size ${volumeSize} is too large`);
  if (b.subarray(96, 128).some((x) => x !== 0)) throw corrupt(file, 'manifest reserved bytes 96..127 are not zero');
  return {
    blockSize,
    volumeSize: Number(volumeSize),
    snapshotId: readAscii(file, b, 32, 'snapshot id'),
    volumeId: readAscii(file, b, 64, 'volume id'),
    digest,
    sealed: (flags & FLAG_SEALED) !== 0,
    pieceSize,
    packed: version === MANIFEST_VERSION_PACKS,
  };
}

