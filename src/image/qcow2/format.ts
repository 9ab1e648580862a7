/**
 * The qcow2 on-disk format: every layout, feature bit and limit disksnap reads or writes,
 * in one module. Specification: QEMU `docs/interop/qcow2.txt`. All integers are big-endian.
 *
 *   cluster 0   header (72 bytes in v2, >= 104 in v3) | extensions ... type 0 | backing name
 *   L1 table    l1_size 64-bit entries -> L2 tables (one cluster each)
 *   L2 table    cluster_size/8 entries -> data clusters (or zero / compressed descriptors)
 *   refcount table (refcount_table_clusters clusters) -> refcount blocks (one cluster each)
 *   refcount block: cluster_size*8 / 2^refcount_order counts, one per host cluster
 *
 * Structures are described with buffer-layout (field, byte offset in the comment); the hot
 * tables (L1/L2/refcount) are plain Buffers read with readUInt32BE in pairs, because a
 * JavaScript object per entry would cost more than the I/O (STYLE.md anti-patterns).
 * A bad field is a `corrupt()` error that names the field, the value and the file.
 */
import * as BL from 'buffer-layout';
import { corrupt, DisksnapError } from '../../engine/errors';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"

/** cluster_bits: 512 B is the spec's minimum; 2 MiB is QEMU's maximum (larger clusters make L2 tables useless). */
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const DEFAULT_CLUSTER_BITS = 16;

/** QEMU refuses backing names longer than 1023 bytes; so do we, either way. */
export const MAX_BACKING_NAME = 1023;
/** QEMU's cap on the L1 table (32 MiB of entries): bounds what an untrusted header can make us allocate. */
export const MAX_L1_BYTES = 32 * 2 ** 20;
/** QEMU's cap on the refcount table (8 MiB). */
export const MAX_REFTABLE_BYTES = 8 * 2 ** 20;
/** Guest sizes up to 2^55 (bits 9..55 of an L2 entry address host clusters; QEMU: QCOW_MAX_... ) */
export const MAX_VIRTUAL_SIZE = 2 ** 55;
/** A backing chain longer than this is treated as a loop (QEMU's limit is 1000 with recursion). */
export const MAX_CHAIN_DEPTH = 64;

/** header_length we write for version 3: 104 bytes of fields + compression_type + 7 bytes padding. */
export const HEADER_V3_LENGTH = 112;
export const HEADER_V2_LENGTH = 72;

export interface RawHeader {
  magic: number; //                  0
  version: number; //                4
  backingFileOffset: number; //      8   u64
  backingFileSize: number; //       16
  clusterBits: number; //           20
  size: number; //                  24   u64, virtual size in bytes
  cryptMethod: number; //           32   0 none, 1 AES (legacy), 2 LUKS
  l1Size: number; //                36   entries
  l1TableOffset: number; //         40   u64
  refcountTableOffset: number; //   48   u64
  refcountTableClusters: number; // 56
  nbSnapshots: number; //           60
  snapshotsOffset: number; //       64   u64
  // version 3 only
  incompatHi: number; //            72   incompatible_features, high word
  incompatLo: number; //            76
  compatHi: number; //              80   compatible_features
  compatLo: number; //              84
  autoclearHi: number; //           88   autoclear_features
  autoclearLo: number; //           92
  refcountOrder: number; //         96   refcount bits = 1 << order
  headerLength: number; //         100
}

const V2_FIELDS = [
  BL.u32be('magic'),
  BL.u32be('version'),
  BL.nu64be('backingFileOffset'),
  BL.u32be('backingFileSize'),
  BL.u32be('clusterBits'),
  BL.nu64be('size'),
  BL.u32be('cryptMethod'),
  BL.u32be('l1Size'),
  BL.nu64be('l1TableOffset'),
  BL.nu64be('refcountTableOffset'),
  BL.u32be('refcountTableClusters'),
  BL.u32be('nbSnapshots'),
  BL.nu64be('snapshotsOffset'),
];

/** The 72-byte version 2 header. */
export const HEADER_V2 = BL.struct<RawHeader>(V2_FIELDS);
/** The 104-byte version 3 header (compression_type at 104 is read separately when header_length > 104). */
export const HEADER_V3 = BL.struct<RawHeader>([
  ...V2_FIELDS,
  BL.u32be('incompatHi'),
  BL.u32be('incompatLo'),
  BL.u32be('compatHi'),
  BL.u32be('compatLo'),
  BL.u32be('autoclearHi'),
  BL.u32be('autoclearLo'),
  BL.u32be('refcountOrder'),
  BL.u32be('headerLength'),
]);
/** Byte offset of compression_type (v3, present when header_length > 104). */
export const COMPRESSION_TYPE_OFFSET = 104;

/** Incompatible feature bits: an implementation that does not know a set bit must refuse the image. */
export const INCOMPAT_DIRTY = 1 << 0; //          refcounts may be stale (lazy refcounts); needs a check before writing
export const INCOMPAT_CORRUPT = 1 << 1; //        QEMU found corruption; data structures may be inconsistent
export const INCOMPAT_DATA_FILE = 1 << 2; //      guest data lives in an external data file
export const INCOMPAT_COMPRESSION = 1 << 3; //    compression_type field is valid (non-zlib compression)
export const INCOMPAT_EXTL2 = 1 << 4; //          extended L2 entries (subclusters)
export const INCOMPAT_NAMES: Record<number, string> = {
  0: 'dirty bit (lazy refcounts)',
  1: 'corrupt bit',
  2: 'external data file',
  3: 'compression type',
  4: 'extended L2 entries',
};
/** Compatible feature bits: safe to ignore. */
export const COMPAT_LAZY_REFCOUNTS = 1 << 0; //   refcounts updated lazily (dirty bit used)
/** Autoclear feature bits: a writer that does not maintain the feature clears the bit. */
export const AUTOCLEAR_BITMAPS = 1 << 0; //       persistent dirty bitmaps extension is consistent
export const AUTOCLEAR_DATA_FILE_RAW = 1 << 1; // external data file is a valid raw image

/** crypt_method values. */
export const CRYPT_NONE = 0;
export const CRYPT_NAMES: Record<number, string> = { 1: 'AES encryption', 2: 'LUKS encryption' };

/** Header extension types (a u32 type, a u32 length, data padded to 8 bytes). */
export const EXT_END = 0x00000000;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;
/**
 * disksnap's own extension: the parent guard (identity of the backing file when the child
 * was made). 0xd15c5a9e ("disc snap") is not a QEMU type and not ASCII, so unlikely to be
 * taken by a future QEMU one (QEMU's newer types are ASCII, e.g. "DATA"). QEMU preserves
 * unknown extensions when it rewrites the header.
 */
export const EXT_PARENT_GUARD = 0xd15c5a9e;

export interface RawExtensionHeader {
  type: number; //   0
  length: number; // 4
}
export const EXTENSION_HEADER = BL.struct<RawExtensionHeader>([BL.u32be('type'), BL.u32be('length')]);

/** Parent guard payload (our extension), 128 bytes. */
export interface RawGuard {
  version: number; //        0   1
  flags: number; //          4   reserved, 0
  parentSize: number; //     8   u64, bytes of the parent file (its virtual size for qcow2 parents: file size)
  mtimeHi: number; //       16   parent mtime in ns since the epoch, high word
  mtimeLo: number; //       20
  sampleSize: number; //    24   bytes per sampled block
  sampleCount: number; //   28   sampled blocks in the middle of the file
  fingerprint: Buffer; //   32   SHA-256 (32 bytes), see guard.ts
  reserved: Buffer; //      64   64 bytes of zeros
}
export const GUARD_LAYOUT = BL.struct<RawGuard>([
  BL.u32be('version'),
  BL.u32be('flags'),
  BL.nu64be('parentSize'),
  BL.u32be('mtimeHi'),
  BL.u32be('mtimeLo'),
  BL.u32be('sampleSize'),
  BL.u32be('sampleCount'),
  BL.blob(32, 'fingerprint'),
  BL.blob(64, 'reserved'),
]);
export const GUARD_VERSION = 1;

/**
 * Table entries (64 bits, handled as a high and a low u32):
 *   L1:  bit 63 COPIED (refcount of the L2 table is 1) | bits 9..55 L2 table offset
 *   L2:  bit 63 COPIED | bit 62 COMPRESSED | bits 9..55 host cluster offset | bit 0 reads as zero (v3)
 *        compressed: bits 0..x-1 host byte offset, bits x..61 extra 512-byte sectors,
 *        x = 62 - (cluster_bits - 8)
 *   refcount table: bits 9..63 refcount block offset
 */
export const HI_COPIED = 0x80000000;
export const HI_COMPRESSED = 0x40000000;
/** bits 32..55 of an offset, in the high word */
export const HI_OFFSET_MASK = 0x00ffffff;
/** bits 9..31 of an offset, in the low word */
export const LO_OFFSET_MASK = 0xfffffe00;
export const LO_ZERO = 1;
/** Reserved bits of a standard L2 entry: 56..61 (high word) and 1..8 (low word). */
export const HI_RESERVED_L2 = 0x3f000000;
export const LO_RESERVED_L2 = 0x000001fe;
/** Reserved bits of an L1 entry: 56..62 (high word) and 0..8 (low word). */
export const HI_RESERVED_L1 = 0x7f000000;
export const LO_RESERVED_L1 = 0x000001ff;
/** Reserved bits of a refcount table entry: 0..8 (the offset takes bits 9..63). */
export const LO_RESERVED_REFTABLE = 0x000001ff;

/** The host offset in a standard L1/L2 entry. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & HI_OFFSET_MASK) * 0x100000000 + ((lo & LO_OFFSET_MASK) >>> 0);
}

/** The refcount block offset in refcount table entry `i` (bits 9..63). */
export function reftableEntryOffset(table: Buffer, i: number): number {
  const hi = table.readUInt32BE(i * 8);
  const lo = table.readUInt32BE(i * 8 + 4);
  return hi * 0x100000000 + ((lo & LO_OFFSET_MASK) >>> 0);
}

/** Writes a 64-bit entry `flagsHi | offset` (flagsLo in the low word) at buf[pos]. */
export function writeEntry(buf: Buffer, pos: number, offset: number, flagsHi: number, flagsLo = 0): void {
  const hi = Math.floor(offset / 0x100000000);
  const lo = offset - hi * 0x100000000;
  buf.writeUInt32BE((hi | flagsHi) >>> 0, pos);
  buf.writeUInt32BE((lo | flagsLo) >>> 0, pos + 4);
}

export interface CompressedDescriptor {
  /** byte offset of the compressed data in the file */
  offset: number;
  /** bytes to read (may include a few bytes past the compressed stream) */
  length: number;
}

/** Decodes a compressed-cluster L2 entry (bit 62 set). */
export function compressedDescriptor(hi: number, lo: number, clusterBits: number): CompressedDescriptor {
  const v = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
  const x = BigInt(62 - (clusterBits - 8));
  const offset = Number(v & ((1n << x) - 1n));
  const sectors = Number((v >> x) & ((1n << (62n - x)) - 1n));
  return { offset, length: (sectors + 1) * 512 - (offset % 512) };
}

/** Refcount entry of `index` in a refcount block, for refcount_order 0..6. */
export function getRefcount(block: Buffer, index: number, order: number): number {
  switch (order) {
    case 4:
      return block.readUInt16BE(index * 2);
    case 3:
      return block[index];
    case 5:
      return block.readUInt32BE(index * 4);
    case 6: {
      const hi = block.readUInt32BE(index * 8);
      const lo = block.readUInt32BE(index * 8 + 4);
      return hi * 0x100000000 + lo;
    }
    default: {
      // orders 0..2: 1, 2 or 4 bits, packed from the least significant bit of each byte
      // (QEMU get_refcount_ro0..2).
      const bits = 1 << order;
      const perByte = 8 / bits;
      const byte = block[Math.floor(index / perByte)];
      return (byte >> ((index % perByte) * bits)) & ((1 << bits) - 1);
    }
  }
}

export function setRefcount(block: Buffer, index: number, order: number, value: number): void {
  switch (order) {
    case 4:
      block.writeUInt16BE(value, index * 2);
      return;
    case 3:
      block[index] = value;
      return;
    case 5:
      block.writeUInt32BE(value, index * 4);
      return;
    case 6:
      block.writeUInt32BE(Math.floor(value / 0x100000000), index * 8);
      block.writeUInt32BE(value % 0x100000000, index * 8 + 4);
      return;
    default: {
      const bits = 1 << order;
      const perByte = 8 / bits;
      const at = Math.floor(index / perByte);
      const shift = (index % perByte) * bits;
      const mask = ((1 << bits) - 1) << shift;
      block[at] = (block[at] & ~mask) | ((value << shift) & mask);
    }
  }
}

export function maxRefcount(order: number): number {
  return order >= 6 ? Number.MAX_SAFE_INTEGER : 2 ** (1 << order) - 1;
}

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

/** A parsed, validated header with its extensions. */
export interface Qcow2Header {
  version: 2 | 3;
  clusterBits: number;
  clusterSize: number;
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  refcountOrder: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: number;
  compatible: number;
  autoclear: number;
  headerLength: number;
  backingFile: string | undefined;
  backingFormat: string | undefined;
  /** disksnap's parent guard, when present */
  guard: RawGuard | undefined;
  /** every extension in order, known or not (rewritten as they were, except ours) */
  extensions: HeaderExtension[];
}

/** Entries an L2 table has: one per 8 bytes of a cluster. */
export function l2Entries(clusterBits: number): number {
  return 1 << (clusterBits - 3);
}

/** L1 entries needed for a virtual size. */
export function l1EntriesFor(size: number, clusterBits: number): number {
  const perL1 = 2 ** (clusterBits * 2 - 3);
  return Math.ceil(size / perL1);
}

/**
 * Parses and validates cluster 0. `head` holds the start of the file (at least one cluster,
 * or the whole file when it is shorter); `fileSize` bounds every table.
 *
 * `forCheck` parses as qemu-img check opens an image: tables past the end of the file are
 * left for the check to report (as corruption), and the corrupt bit and extended L2 entries
 * are accepted (the check reads them; nothing writes them).
 */
export function parseHeader(path: string, head: Buffer, fileSize: number, opts: { forCheck?: boolean } = {}): Qcow2Header {
  if (head.length < HEADER_V2_LENGTH) {
    throw corrupt(path, `qcow2 header truncated: the file has ${head.length} bytes, a header needs at least ${HEADER_V2_LENGTH}`);
  }
  const magic = head.readUInt32BE(0);
  if (magic !== QCOW2_MAGIC) throw corrupt(path, `header field magic is 0x${magic.toString(16)}, not QFI\\xfb`);
  const version = head.readUInt32BE(4);
  if (version !== 2 && version !== 3) {
    throw new DisksnapError(`${path}: qcow2 version ${version} is not supported (versions 2 and 3 are)`, 'EUNSUPPORTED', undefined, path);
  }
  if (version === 3 && head.length < 104) {
    throw corrupt(path, `qcow2 v3 header truncated: the file has ${head.length} bytes, a v3 header needs 104`);
  }
  const raw = version === 2 ? HEADER_V2.decode(head, 0) : HEADER_V3.decode(head, 0);
  if (version === 2) {
    raw.incompatHi = raw.incompatLo = raw.compatHi = raw.compatLo = raw.autoclearHi = raw.autoclearLo = 0;
    raw.refcountOrder = 4;
    raw.headerLength = HEADER_V2_LENGTH;
  }
  const bad = (field: string, value: number | string, why: string): DisksnapError =>
    corrupt(path, `header field ${field} is ${value}: ${why}`);
  const unsupported = (feature: string): DisksnapError =>
    new DisksnapError(`${path}: uses ${feature}, which disksnap does not support`, 'EUNSUPPORTED', undefined, path);

  if (raw.clusterBits < MIN_CLUSTER_BITS || raw.clusterBits > MAX_CLUSTER_BITS) {
    throw bad('cluster_bits', raw.clusterBits, `must be ${MIN_CLUSTER_BITS}..${MAX_CLUSTER_BITS}`);
  }
  const clusterSize = 2 ** raw.clusterBits;
  if (head.length < Math.min(clusterSize, fileSize)) {
    throw corrupt(path, `qcow2 header cluster truncated: ${head.length} of ${clusterSize} bytes`);
  }
  if (version === 3) {
    if (raw.headerLength < 104 || raw.headerLength > clusterSize || raw.headerLength % 8 !== 0) {
      throw bad('header_length', raw.headerLength, `must be a multiple of 8 from 104 to the cluster size ${clusterSize}`);
    }
    if (raw.headerLength > head.length) throw corrupt(path, `qcow2 header truncated: header_length ${raw.headerLength}, file has ${head.length} bytes`);
  }
  if (raw.incompatHi !== 0) throw unsupported(`unknown incompatible feature bits 0x${raw.incompatHi.toString(16)}00000000`);
  const incompatible = raw.incompatLo >>> 0;
  if (incompatible & INCOMPAT_CORRUPT && !opts.forCheck) throw unsupported('the corrupt bit (incompatible feature bit 1: QEMU marked the image corrupt; repair it with qemu-img check -r all)');
  if (incompatible & INCOMPAT_DATA_FILE) throw unsupported('an external data file (incompatible feature bit 2)');
  if (incompatible & INCOMPAT_EXTL2 && !opts.forCheck) throw unsupported('extended L2 entries / subclusters (incompatible feature bit 4)');
  const known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
  if (incompatible & ~known) throw unsupported(`unknown incompatible feature bits 0x${(incompatible & ~known).toString(16)}`);
  const compressionType = raw.headerLength > COMPRESSION_TYPE_OFFSET ? head[COMPRESSION_TYPE_OFFSET] : 0;
  if (compressionType > 1) throw bad('compression_type', compressionType, 'unknown (0 zlib, 1 zstd)');
  if (compressionType !== 0 && !(incompatible & INCOMPAT_COMPRESSION)) {
    throw bad('compression_type', compressionType, 'not zlib, but the compression-type feature bit (3) is clear');
  }
  if (compressionType === 1) throw unsupported('compression type zstd (incompatible feature bit 3; only zlib is read)');
  if (raw.cryptMethod !== CRYPT_NONE) throw unsupported(CRYPT_NAMES[raw.cryptMethod] ?? `encryption method ${raw.cryptMethod}`);
  if (raw.refcountOrder > 6) throw bad('refcount_order', raw.refcountOrder, 'must be 0..6');
  if (!Number.isSafeInteger(raw.size) || raw.size > MAX_VIRTUAL_SIZE) throw bad('size', raw.size, `must be at most 2^55`);

  const needL1 = l1EntriesFor(raw.size, raw.clusterBits);
  if (raw.l1Size < needL1) throw bad('l1_size', raw.l1Size, `the virtual size ${raw.size} needs ${needL1} L1 entries`);
  if (raw.l1Size * 8 > MAX_L1_BYTES) throw bad('l1_size', raw.l1Size, `the L1 table would exceed ${MAX_L1_BYTES} bytes`);
  if (raw.l1Size > 0) {
    if (raw.l1TableOffset % clusterSize !== 0) throw bad('l1_table_offset', raw.l1TableOffset, 'not cluster aligned');
    if (raw.l1TableOffset === 0) throw bad('l1_table_offset', 0, 'overlaps the header');
    if (raw.l1TableOffset + raw.l1Size * 8 > fileSize && !opts.forCheck) {
      throw bad('l1_table_offset', raw.l1TableOffset, `the L1 table (${raw.l1Size} entries) extends past the end of the file (${fileSize} bytes)`);
    }
  }
  if (raw.refcountTableClusters === 0) throw bad('refcount_table_clusters', 0, 'an image needs a refcount table');
  if (raw.refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    throw bad('refcount_table_clusters', raw.refcountTableClusters, `the refcount table would exceed ${MAX_REFTABLE_BYTES} bytes`);
  }
  if (raw.refcountTableOffset % clusterSize !== 0 || raw.refcountTableOffset === 0) {
    throw bad('refcount_table_offset', raw.refcountTableOffset, 'not a cluster-aligned offset past the header');
  }
  if (raw.refcountTableOffset + 8 > fileSize && !opts.forCheck) {
    throw bad('refcount_table_offset', raw.refcountTableOffset, `the refcount table lies outside the file (${fileSize} bytes)`);
  }
  const rtEnd = raw.refcountTableOffset + raw.refcountTableClusters * clusterSize;
  if (raw.l1Size > 0 && raw.l1TableOffset < rtEnd && raw.refcountTableOffset < raw.l1TableOffset + raw.l1Size * 8) {
    throw corrupt(path, `metadata overlap: the L1 table at ${raw.l1TableOffset} and the refcount table at ${raw.refcountTableOffset} share clusters`);
  }
  // QEMU checks the alignment even when there are no snapshots (and then refuses to open)
  if (raw.snapshotsOffset % clusterSize !== 0) throw bad('snapshots_offset', raw.snapshotsOffset, 'not cluster aligned');
  if (raw.nbSnapshots > 0 && (raw.snapshotsOffset === 0 || (raw.snapshotsOffset >= fileSize && !opts.forCheck))) {
    throw bad('snapshots_offset', raw.snapshotsOffset, 'not a cluster-aligned offset inside the file');
  }

  const { extensions, backingFormat, guard } = parseExtensions(path, head, raw.headerLength, clusterSize);
  const limit = Math.min(clusterSize, head.length);

  let backingFile: string | undefined;
  if (raw.backingFileOffset !== 0) {
    if (raw.backingFileSize === 0 || raw.backingFileSize > MAX_BACKING_NAME) {
      throw bad('backing_file_size', raw.backingFileSize, `must be 1..${MAX_BACKING_NAME}`);
    }
    if (raw.backingFileOffset + raw.backingFileSize > limit) {
      throw bad('backing_file_offset', raw.backingFileOffset, `the backing file name (${raw.backingFileSize} bytes) runs past the header cluster`);
    }
    backingFile = head.subarray(raw.backingFileOffset, raw.backingFileOffset + raw.backingFileSize).toString('utf8');
    if (backingFile.includes('\0')) throw bad('backing file name', JSON.stringify(backingFile), 'contains a NUL byte');
  }

  return {
    version: version as 2 | 3,
    clusterBits: raw.clusterBits,
    clusterSize,
    size: raw.size,
    l1Size: raw.l1Size,
    l1TableOffset: raw.l1TableOffset,
    refcountTableOffset: raw.refcountTableOffset,
    refcountTableClusters: raw.refcountTableClusters,
    refcountOrder: raw.refcountOrder,
    nbSnapshots: raw.nbSnapshots,
    snapshotsOffset: raw.snapshotsOffset,
    incompatible,
    compatible: raw.compatLo >>> 0,
    autoclear: raw.autoclearLo >>> 0,
    headerLength: raw.headerLength,
    backingFile,
    backingFormat,
    guard,
    extensions,
  };
}

/**
 * Header extensions: from header_length (v3) or 72 (v2) up to the end type, inside cluster
 * 0; the backing format and disksnap's parent guard are decoded, every one kept.
 */
function parseExtensions(
  path: string,
  head: Buffer,
  headerLength: number,
  clusterSize: number,
): { extensions: HeaderExtension[]; backingFormat: string | undefined; guard: RawGuard | undefined } {
  const unsupported = (feature: string): DisksnapError =>
    new DisksnapError(`${path}: uses ${feature}, which disksnap does not support`, 'EUNSUPPORTED', undefined, path);
  const extensions: HeaderExtension[] = [];
  let backingFormat: string | undefined;
  let guard: RawGuard | undefined;
  const limit = Math.min(clusterSize, head.length);
  let pos = headerLength;
  for (;;) {
    if (pos + 8 > limit) throw corrupt(path, `header extensions run past the header cluster at byte ${pos}`);
    const ext = EXTENSION_HEADER.decode(head, pos);
    if (ext.type === EXT_END) break;
    if (ext.length > limit - pos - 8) {
      throw corrupt(path, `header extension 0x${ext.type.toString(16)} at byte ${pos} has length ${ext.length}, past the header cluster`);
    }
    const data = Buffer.from(head.subarray(pos + 8, pos + 8 + ext.length));
    extensions.push({ type: ext.type, data });
    if (ext.type === EXT_BACKING_FORMAT) backingFormat = data.toString('utf8').replace(/\0+$/, '');
    else if (ext.type === EXT_PARENT_GUARD && ext.length >= GUARD_LAYOUT.span) guard = GUARD_LAYOUT.decode(data, 0);
    else if (ext.type === EXT_DATA_FILE) throw unsupported('an external data file (header extension)');
    else if (ext.type === EXT_CRYPTO) throw unsupported('encryption (full disk encryption header extension)');
    pos += 8 + Math.ceil(ext.length / 8) * 8;
  }
  return { extensions, backingFormat, guard };
}

export interface NewHeader {
  clusterBits: number;
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  backingFile?: string;
  backingFormat?: string;
  guard?: RawGuard;
  /** extensions to keep besides backing format and guard (e.g. QEMU's feature table) */
  otherExtensions?: HeaderExtension[];
}

/** Feature-name table as QEMU writes it (48 bytes per entry: type, bit, name). */
function featureTable(): Buffer {
  const entries: [number, number, string][] = [
    [0, 0, 'dirty bit'],
    [0, 1, 'corrupt bit'],
    [0, 2, 'external data file'],
    [0, 3, 'compression type'],
    [0, 4, 'extended L2 entries'],
    [1, 0, 'lazy refcounts'],
    [2, 0, 'bitmaps'],
    [2, 1, 'raw external data'],
  ];
  const buf = Buffer.alloc(entries.length * 48);
  entries.forEach(([type, bit, name], i) => {
    buf[i * 48] = type;
    buf[i * 48 + 1] = bit;
    buf.write(name, i * 48 + 2, 46, 'utf8');
  });
  return buf;
}

/**
 * Encodes cluster 0 of a version 3 image: header, extensions (backing format, feature
 * table, parent guard, then any others), end marker, backing file name. Throws EINVALID if
 * it does not fit in one cluster (very long backing names with 512-byte clusters).
 */
/** Bytes the extensions take, end marker included (each payload padded to 8 bytes). */
export function extensionsSize(exts: { data: Buffer }[]): number {
  return exts.reduce((n, e) => n + 8 + Math.ceil(e.data.length / 8) * 8, 8);
}

/** Writes the extensions and the end marker at `pos`; returns the offset just past them. */
export function encodeExtensions(exts: { type: number; data: Buffer }[], buf: Buffer, pos: number): number {
  for (const e of exts) {
    EXTENSION_HEADER.encode({ type: e.type, length: e.data.length }, buf, pos);
    e.data.copy(buf, pos + 8);
    pos += 8 + Math.ceil(e.data.length / 8) * 8;
  }
  EXTENSION_HEADER.encode({ type: EXT_END, length: 0 }, buf, pos);
  return pos + 8;
}

export function encodeHeaderCluster(h: NewHeader): Buffer {
  const clusterSize = 2 ** h.clusterBits;
  const exts: HeaderExtension[] = [];
  if (h.backingFormat) exts.push({ type: EXT_BACKING_FORMAT, data: Buffer.from(h.backingFormat, 'utf8') });
  const others = h.otherExtensions ?? [{ type: EXT_FEATURE_TABLE, data: featureTable() }];
  for (const e of others) if (e.type !== EXT_BACKING_FORMAT && e.type !== EXT_PARENT_GUARD) exts.push(e);
  if (h.guard) {
    const g = Buffer.alloc(GUARD_LAYOUT.span);
    GUARD_LAYOUT.encode(h.guard, g, 0);
    exts.push({ type: EXT_PARENT_GUARD, data: g });
  }
  const name = h.backingFile === undefined ? undefined : Buffer.from(h.backingFile, 'utf8');
  if (name && (name.length === 0 || name.length > MAX_BACKING_NAME)) {
    throw new DisksnapError(`backing file name must be 1..${MAX_BACKING_NAME} bytes (got ${name.length})`, 'EINVALID');
  }
  const need = (): number => HEADER_V3_LENGTH + extensionsSize(exts) + (name?.length ?? 0);
  if (need() > clusterSize) {
    // Drop the optional feature table before giving up (QEMU does the same).
    const i = exts.findIndex((e) => e.type === EXT_FEATURE_TABLE);
    if (i >= 0) exts.splice(i, 1);
  }
  const total = need();
  const extBytes = extensionsSize(exts);
  if (total > clusterSize) {
    throw new DisksnapError(
      `the qcow2 header, its extensions and the backing file name need ${total} bytes, more than one ${clusterSize}-byte cluster; use a larger cluster size or a shorter path`,
      'EINVALID',
    );
  }
  const buf = Buffer.alloc(clusterSize);
  const raw: RawHeader = {
    magic: QCOW2_MAGIC,
    version: 3,
    backingFileOffset: name ? HEADER_V3_LENGTH + extBytes : 0,
    backingFileSize: name ? name.length : 0,
    clusterBits: h.clusterBits,
    size: h.size,
    cryptMethod: CRYPT_NONE,
    l1Size: h.l1Size,
    l1TableOffset: h.l1TableOffset,
    refcountTableOffset: h.refcountTableOffset,
    refcountTableClusters: h.refcountTableClusters,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatHi: 0,
    incompatLo: 0,
    compatHi: 0,
    compatLo: 0,
    autoclearHi: 0,
    autoclearLo: 0,
    refcountOrder: 4,
    headerLength: HEADER_V3_LENGTH,
  };
  HEADER_V3.encode(raw, buf, 0);
  buf[COMPRESSION_TYPE_OFFSET] = 0; // zlib
  let pos = encodeExtensions(exts, buf, HEADER_V3_LENGTH);
  if (name) name.copy(buf, pos);
  return buf;
}

/** Byte offsets of header fields disksnap rewrites in place. */
export const OFF_REFCOUNT_TABLE_OFFSET = HEADER_V2.offsetOf('refcountTableOffset')!; // 48 (u64) + clusters at 56
export const OFF_AUTOCLEAR = HEADER_V3.offsetOf('autoclearHi')!; // 88
export const OFF_INCOMPAT = HEADER_V3.offsetOf('incompatHi')!; // 72
