/**
 * Writing qcow2 header clusters: a new image's cluster 0 (create.ts), and the extension list
 * that accept-parent, checkpoints and bitmaps rewrite. Layouts and constants are in format.ts.
 */
import { DisksnapError } from '../../engine/errors';
import {
  COMPRESSION_TYPE_OFFSET,
  CRYPT_NONE,
  EXTENSION_HEADER,
  EXT_BACKING_FORMAT,
  EXT_END,
  EXT_FEATURE_TABLE,
  EXT_PARENT_GUARD,
  GUARD_LAYOUT,
  HEADER_V3,
  HEADER_V3_LENGTH,
  HeaderExtension,
  MAX_BACKING_NAME,
  QCOW2_MAGIC,
  RawGuard,
  RawHeader,
} from './format';

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

/**
 * Encodes cluster 0 of a version 3 image: header, extensions (backing format, feature
 * table, parent guard, then any others), end marker, backing file name. Throws EINVALID if
 * it does not fit in one cluster (very long backing names with 512-byte clusters).
 */
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

/**
 * Writes the extension list and then the backing file name at `start` of a header cluster
 * `out`, and points the header's backing_file_offset/size at the name (zero for none).
 */
export function encodeTail(out: Buffer, start: number, exts: { type: number; data: Buffer }[], name: Buffer): void {
  const pos = encodeExtensions(exts, out, start);
  name.copy(out, pos);
  // backing_file_offset (u64 at 8) and backing_file_size (u32 at 16)
  out.writeUInt32BE(0, 8);
  out.writeUInt32BE(name.length ? pos : 0, 12);
  out.writeUInt32BE(name.length, 16);
}
