/**
 * QEMU's persistent dirty bitmaps in qcow2: the on-disk layout, parsing, reading a bitmap
 * as dirty guest ranges, and the metadata checks `qemu-img check` makes. Specification:
 * QEMU `docs/interop/qcow2.txt` ("Bitmaps extension", "Bitmaps") and
 * `docs/interop/bitmaps.rst`. Writing (marking, adding, clearing) is in bitmap-writer.ts.
 *
 *   header extension 0x23852875 (24 bytes, big-endian)
 *     0  nb_bitmaps (u32, 1..65535)   4  reserved (u32, 0)
 *     8  bitmap_directory_size (u64)  16 bitmap_directory_offset (u64, cluster aligned)
 *   autoclear bit 0 set  <=>  the extension's data is consistent; a writer that does not
 *   maintain the bitmaps clears it, and every bitmap is then stale.
 *
 *   bitmap directory: contiguous, one entry per bitmap, each padded to 8 bytes
 *     0  bitmap_table_offset (u64)    8  bitmap_table_size (u32, entries)
 *     12 flags (u32: bit 0 in_use, bit 1 auto, bit 2 extra_data_compatible)
 *     16 type (u8, 1 = dirty tracking) 17 granularity_bits (u8)
 *     18 name_size (u16)              20 extra_data_size (u32)
 *     24 extra data, then the name (UTF-8, not NUL terminated), then zero padding
 *
 *   bitmap table: contiguous u64 entries, one per cluster of bitmap data
 *     bits 9..55 host offset of a data cluster; when 0, bit 0 says the cluster reads as all
 *     ones (1) or all zeros (0); bits 1..8 and 56..63 reserved
 *   bitmap data: a little-endian bit array, bit n of the bitmap (byte n/8, bit n%8) covers
 *     guest bytes [n * granularity, (n+1) * granularity)
 *
 * `in_use` set means the bitmap was not saved after its last change (a writer holds it in
 * memory, or crashed): its content cannot be trusted. `auto` means enabled: every write
 * to the image must set its bits.
 */
import * as BL from 'buffer-layout';
import { corrupt, DisksnapError } from '../../engine/errors';
import { native } from '../../engine/native';
import { AUTOCLEAR_BITMAPS, EXT_BITMAPS, HeaderExtension } from './format';

/** Bytes of the extension's data. */
export const BITMAPS_EXT_LENGTH = 24;
/** QEMU's limit on bitmaps per image. */
export const MAX_BITMAPS = 65535;
/** QEMU's limit on the directory: 1 KiB per bitmap at most. */
export const MAX_DIRECTORY_BYTES = 1024 * MAX_BITMAPS;
/** Granularities QEMU supports: 512 B .. 2 GiB per bit (the spec allows 0..63). */
export const MIN_GRANULARITY_BITS = 9;
export const MAX_GRANULARITY_BITS = 31;
/** QEMU's limit on a name (the spec: non-zero). */
export const MAX_NAME_BYTES = 1023;
/** QEMU's limits: entries of one bitmap table, and bytes of one bitmap's data (512 MiB). */
export const MAX_TABLE_ENTRIES = 0x8000000;
export const MAX_BITMAP_BYTES = 0x20000000;

/** Directory entry flags. */
export const FLAG_IN_USE = 1 << 0; //                 not saved since the last change: inconsistent
export const FLAG_AUTO = 1 << 1; //                   enabled: every write must set its bits
export const FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2; //  unknown extra data may be kept as it is
export const FLAGS_RESERVED = ~(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE) >>> 0;
/** QEMU treats every flag but in_use and auto as reserved (it supports no extra data). */
export const FLAGS_RESERVED_QEMU = ~(FLAG_IN_USE | FLAG_AUTO) >>> 0;
/** The only bitmap type. */
export const TYPE_DIRTY_TRACKING = 1;

/** Byte offset of the flags in a directory entry (4-aligned: an in-place write cannot tear). */
export const DIR_FLAGS_OFFSET = 12;
export const DIR_ENTRY_FIXED = 24;

/** Bitmap table entry, as a high and a low u32. */
export const TE_HI_RESERVED = 0xff000000; // bits 56..63
export const TE_LO_RESERVED = 0x000001fe; // bits 1..8
export const TE_LO_ALL_ONES = 0x00000001; // bit 0, only without an offset
export const TE_HI_OFFSET = 0x00ffffff;
export const TE_LO_OFFSET = 0xfffffe00;

export interface RawBitmapsExt {
  nbBitmaps: number; //        0
  reserved: number; //         4
  directorySize: number; //    8   u64
  directoryOffset: number; // 16   u64
}
export const BITMAPS_EXT = BL.struct<RawBitmapsExt>([
  BL.u32be('nbBitmaps'),
  BL.u32be('reserved'),
  BL.nu64be('directorySize'),
  BL.nu64be('directoryOffset'),
]);

export interface RawDirEntry {
  tableOffset: number; //     0   u64
  tableSize: number; //       8
  flags: number; //          12
  type: number; //           16   u8
  granularityBits: number; // 17  u8
  nameSize: number; //       18   u16
  extraDataSize: number; //  20
}
export const DIR_ENTRY = BL.struct<RawDirEntry>([
  BL.nu64be('tableOffset'),
  BL.u32be('tableSize'),
  BL.u32be('flags'),
  BL.u8('type'),
  BL.u8('granularityBits'),
  BL.u16be('nameSize'),
  BL.u32be('extraDataSize'),
]);

export interface BitmapsExtension {
  nbBitmaps: number;
  directorySize: number;
  directoryOffset: number;
}

export interface BitmapEntry {
  /** position in the directory */
  index: number;
  /** byte offset of the entry inside the directory */
  dirOffset: number;
  name: string;
  tableOffset: number;
  /** entries of the bitmap table */
  tableSize: number;
  flags: number;
  inUse: boolean;
  auto: boolean;
  type: number;
  granularityBits: number;
  granularity: number;
  extraData: Buffer;
}

/** Where the image's bitmaps stand. */
export interface BitmapsState {
  /** 'none': no extension; 'stale': the extension is there but the autoclear bit is clear */
  status: 'none' | 'stale' | 'consistent';
  ext: BitmapsExtension | undefined;
}

/** Reads exactly buf.length bytes of the image file at a host offset. */
export type ReadAt = (buf: Buffer, hostOffset: number) => void;

/** A dirty guest range. */
export interface DirtyRange {
  offset: number;
  length: number;
}

export function isConsistent(autoclear: number): boolean {
  return (autoclear & AUTOCLEAR_BITMAPS) !== 0;
}

/** Size of a directory entry with its name and extra data, padded to 8. */
export function dirEntrySize(nameBytes: number, extraBytes: number): number {
  return Math.ceil((DIR_ENTRY_FIXED + nameBytes + extraBytes) / 8) * 8;
}

/** Bits, then bytes, of a bitmap of `size` guest bytes; table entries QEMU allocates for it. */
export function bitmapBytes(size: number, granularityBits: number): number {
  const bits = Math.ceil(size / 2 ** granularityBits);
  return Math.ceil(bits / 8);
}
export function tableEntriesFor(size: number, granularityBits: number, clusterSize: number): number {
  // QEMU serialises in 64-bit words, then rounds to clusters (a cluster is a multiple of 8).
  const bits = Math.ceil(size / 2 ** granularityBits);
  return Math.ceil((Math.ceil(bits / 64) * 8) / clusterSize);
}

/** Guest bytes one cluster of bitmap data covers. */
export function clusterCoverage(clusterSize: number, granularityBits: number): number {
  return clusterSize * 8 * 2 ** granularityBits;
}

/** The extension of a parsed header, with the autoclear bit's verdict. */
export function bitmapsState(path: string, h: { extensions: HeaderExtension[]; autoclear: number; clusterSize: number }, fileSize: number): BitmapsState {
  const exts = h.extensions.filter((e) => e.type === EXT_BITMAPS);
  if (exts.length === 0) {
    if (isConsistent(h.autoclear)) throw corrupt(path, 'autoclear feature bit 0 (bitmaps) is set without a bitmaps header extension');
    return { status: 'none', ext: undefined };
  }
  if (exts.length > 1) throw corrupt(path, `the bitmaps header extension appears ${exts.length} times`);
  if (!isConsistent(h.autoclear)) return { status: 'stale', ext: undefined };
  return { status: 'consistent', ext: parseBitmapsExtension(path, exts[0].data, h.clusterSize, fileSize) };
}

export function parseBitmapsExtension(path: string, data: Buffer, clusterSize: number, fileSize: number): BitmapsExtension {
  const bad = (field: string, value: number | string, why: string): DisksnapError => corrupt(path, `bitmaps extension field ${field} is ${value}: ${why}`);
  if (data.length !== BITMAPS_EXT_LENGTH) throw bad('length', data.length, `must be ${BITMAPS_EXT_LENGTH}`);
  const raw = BITMAPS_EXT.decode(data, 0);
  if (raw.reserved !== 0) throw bad('reserved', raw.reserved, 'must be zero');
  if (raw.nbBitmaps === 0 || raw.nbBitmaps > MAX_BITMAPS) throw bad('nb_bitmaps', raw.nbBitmaps, `must be 1..${MAX_BITMAPS}`);
  if (raw.directorySize === 0 || raw.directorySize > MAX_DIRECTORY_BYTES) {
    throw bad('bitmap_directory_size', raw.directorySize, `must be 1..${MAX_DIRECTORY_BYTES}`);
  }
  if (raw.directorySize < raw.nbBitmaps * dirEntrySize(1, 0)) {
    throw bad('bitmap_directory_size', raw.directorySize, `too small for ${raw.nbBitmaps} entries`);
  }
  if (raw.directoryOffset === 0 || raw.directoryOffset % clusterSize !== 0) {
    throw bad('bitmap_directory_offset', raw.directoryOffset, 'must be a cluster-aligned offset past the header');
  }
  if (!Number.isSafeInteger(raw.directoryOffset) || raw.directoryOffset + raw.directorySize > fileSize) {
    throw bad('bitmap_directory_offset', raw.directoryOffset, `the directory (${raw.directorySize} bytes) extends past the end of the file (${fileSize} bytes)`);
  }
  return { nbBitmaps: raw.nbBitmaps, directorySize: raw.directorySize, directoryOffset: raw.directoryOffset };
}

export function encodeBitmapsExtension(ext: BitmapsExtension): Buffer {
  const b = Buffer.alloc(BITMAPS_EXT_LENGTH);
  BITMAPS_EXT.encode({ nbBitmaps: ext.nbBitmaps, reserved: 0, directorySize: ext.directorySize, directoryOffset: ext.directoryOffset }, b, 0);
  return b;
}

/**
 * Parses and validates the directory with QEMU's constraints (those under which QEMU opens
 * the image at all). `virtualSize` checks that a bitmap not in use has a table large enough.
 */
export function parseBitmapDirectory(path: string, dir: Buffer, ext: BitmapsExtension, clusterSize: number, virtualSize: number, fileSize: number): BitmapEntry[] {
  const out: BitmapEntry[] = [];
  const names = new Set<string>();
  let pos = 0;
  while (pos < dir.length) {
    const index = out.length;
    if (index >= ext.nbBitmaps) throw corrupt(path, `the bitmap directory holds more entries than nb_bitmaps (${ext.nbBitmaps})`);
    if (pos + DIR_ENTRY_FIXED > dir.length) throw corrupt(path, `bitmap directory entry ${index} at byte ${pos} runs past bitmap_directory_size (${dir.length})`);
    const raw = DIR_ENTRY.decode(dir, pos);
    const size = dirEntrySize(raw.nameSize, raw.extraDataSize);
    if (raw.nameSize === 0) throw corrupt(path, `bitmap directory entry ${index} field name_size is 0: a bitmap needs a name`);
    if (pos + size > dir.length) throw corrupt(path, `bitmap directory entry ${index} (${size} bytes at byte ${pos}) runs past bitmap_directory_size (${dir.length})`);
    const nameAt = pos + DIR_ENTRY_FIXED + raw.extraDataSize;
    const name = dir.toString('utf8', nameAt, nameAt + raw.nameSize);
    const bad = (field: string, value: number | string, why: string): DisksnapError =>
      corrupt(path, `bitmap '${name}' (directory entry ${index}) field ${field} is ${value}: ${why}`);
    if (raw.nameSize > MAX_NAME_BYTES) throw bad('name_size', raw.nameSize, `must be 1..${MAX_NAME_BYTES}`);
    if (names.has(name)) throw bad('name', JSON.stringify(name), 'another bitmap has the same name');
    names.add(name);
    for (let i = nameAt + raw.nameSize; i < pos + size; i++) if (dir[i] !== 0) throw bad('padding', `byte ${i - pos}`, 'must be zero');
    if (raw.type !== TYPE_DIRTY_TRACKING) throw bad('type', raw.type, 'must be 1 (dirty tracking bitmap)');
    if (raw.granularityBits < MIN_GRANULARITY_BITS || raw.granularityBits > MAX_GRANULARITY_BITS) {
      throw bad('granularity_bits', raw.granularityBits, `must be ${MIN_GRANULARITY_BITS}..${MAX_GRANULARITY_BITS}`);
    }
    if (raw.flags & FLAGS_RESERVED) throw bad('flags', `0x${raw.flags.toString(16)}`, 'reserved bits 3..31 set');
    if (raw.tableOffset === 0 || raw.tableOffset % clusterSize !== 0) throw bad('bitmap_table_offset', raw.tableOffset, 'must be a cluster-aligned offset past the header');
    if (raw.tableSize === 0 || raw.tableSize > MAX_TABLE_ENTRIES) throw bad('bitmap_table_size', raw.tableSize, `must be 1..${MAX_TABLE_ENTRIES}`);
    if (!Number.isSafeInteger(raw.tableOffset) || raw.tableOffset + raw.tableSize * 8 > fileSize) {
      throw bad('bitmap_table_offset', raw.tableOffset, `the table (${raw.tableSize} entries) extends past the end of the file (${fileSize} bytes)`);
    }
    if (raw.tableSize * clusterSize > MAX_BITMAP_BYTES) throw bad('bitmap_table_size', raw.tableSize, `the data would exceed ${MAX_BITMAP_BYTES} bytes`);
    const inUse = (raw.flags & FLAG_IN_USE) !== 0;
    if (!inUse && raw.tableSize * clusterSize * 8 * 2 ** raw.granularityBits < virtualSize) {
      throw bad('bitmap_table_size', raw.tableSize, `too small for the virtual size ${virtualSize} at granularity ${2 ** raw.granularityBits}`);
    }
    out.push({
      index,
      dirOffset: pos,
      name,
      tableOffset: raw.tableOffset,
      tableSize: raw.tableSize,
      flags: raw.flags,
      inUse,
      auto: (raw.flags & FLAG_AUTO) !== 0,
      type: raw.type,
      granularityBits: raw.granularityBits,
      granularity: 2 ** raw.granularityBits,
      extraData: Buffer.from(dir.subarray(pos + DIR_ENTRY_FIXED, nameAt)),
    });
    pos += size;
  }
  if (out.length !== ext.nbBitmaps) throw corrupt(path, `the bitmap directory holds ${out.length} entries, nb_bitmaps says ${ext.nbBitmaps}`);
  return out;
}

/** Encodes a directory from its entries (each keeps its extra data). */
export function encodeBitmapDirectory(entries: Omit<BitmapEntry, 'index' | 'dirOffset'>[]): Buffer {
  const names = entries.map((e) => Buffer.from(e.name, 'utf8'));
  const size = entries.reduce((n, e, i) => n + dirEntrySize(names[i].length, e.extraData.length), 0);
  const buf = Buffer.alloc(size);
  let pos = 0;
  entries.forEach((e, i) => {
    DIR_ENTRY.encode(
      {
        tableOffset: e.tableOffset,
        tableSize: e.tableSize,
        flags: e.flags,
        type: e.type,
        granularityBits: e.granularityBits,
        nameSize: names[i].length,
        extraDataSize: e.extraData.length,
      },
      buf,
      pos,
    );
    e.extraData.copy(buf, pos + DIR_ENTRY_FIXED);
    names[i].copy(buf, pos + DIR_ENTRY_FIXED + e.extraData.length);
    pos += dirEntrySize(names[i].length, e.extraData.length);
  });
  return buf;
}

/** Reads and parses the directory an extension points to. */
export function readBitmapDirectory(path: string, read: ReadAt, ext: BitmapsExtension, clusterSize: number, virtualSize: number, fileSize: number): BitmapEntry[] {
  const dir = Buffer.alloc(ext.directorySize);
  read(dir, ext.directoryOffset);
  return parseBitmapDirectory(path, dir, ext, clusterSize, virtualSize, fileSize);
}

/** The host offset in a table entry (0: not allocated). */
export function tableEntryOffset(table: Buffer, i: number): number {
  const hi = table.readUInt32BE(i * 8);
  const lo = table.readUInt32BE(i * 8 + 4);
  return (hi & TE_HI_OFFSET) * 0x100000000 + ((lo & TE_LO_OFFSET) >>> 0);
}

export function tableEntryAllOnes(table: Buffer, i: number): boolean {
  return tableEntryOffset(table, i) === 0 && (table.readUInt32BE(i * 8 + 4) & TE_LO_ALL_ONES) !== 0;
}

/** Why a table entry is invalid (QEMU's rules plus the end of the file), or undefined. */
export function tableEntryProblem(table: Buffer, i: number, clusterSize: number, fileSize: number): string | undefined {
  const hi = table.readUInt32BE(i * 8);
  const lo = table.readUInt32BE(i * 8 + 4);
  const hex = `0x${(hi >>> 0).toString(16)}${(lo >>> 0).toString(16).padStart(8, '0')}`;
  if (hi & TE_HI_RESERVED || lo & TE_LO_RESERVED) return `${hex}: reserved bits set`;
  const off = tableEntryOffset(table, i);
  if (off === 0) return undefined;
  if (lo & TE_LO_ALL_ONES) return `${hex}: the all-ones bit is set together with an offset`;
  if (off % clusterSize !== 0) return `${hex}: the offset is not cluster aligned`;
  if (off + clusterSize > fileSize) return `${hex}: the data cluster at ${off} lies past the end of the file (${fileSize} bytes)`;
  return undefined;
}

/** Reads a bitmap's table; every entry validated. */
export function readBitmapTable(path: string, read: ReadAt, e: BitmapEntry, clusterSize: number, fileSize: number): Buffer {
  const table = Buffer.alloc(e.tableSize * 8);
  read(table, e.tableOffset);
  for (let i = 0; i < e.tableSize; i++) {
    const why = tableEntryProblem(table, i, clusterSize, fileSize);
    if (why) throw corrupt(path, `bitmap '${e.name}' table entry ${i} is ${why}`);
  }
  return table;
}

/**
 * The dirty guest ranges of a bitmap (coalesced, in order, clipped to the virtual size).
 * Refuses a bitmap in use (code EINCONSISTENT): its bits cannot be trusted.
 */
export function readDirtyRanges(path: string, read: ReadAt, e: BitmapEntry, clusterSize: number, virtualSize: number, fileSize: number): DirtyRange[] {
  if (e.inUse) {
    throw new DisksnapError(`${path}: bitmap '${e.name}' is in use (flag in_use): it was not saved after its last change, so its bits cannot be trusted`, 'EINCONSISTENT', undefined, path);
  }
  const table = readBitmapTable(path, read, e, clusterSize, fileSize);
  const out: DirtyRange[] = [];
  const g = e.granularity;
  const push = (from: number, to: number): void => {
    const start = from * g;
    if (start >= virtualSize) return;
    const end = Math.min(virtualSize, to * g);
    const last = out[out.length - 1];
    if (last && last.offset + last.length === start) last.length = end - last.offset;
    else out.push({ offset: start, length: end - start });
  };
  const bitsPerCluster = clusterSize * 8;
  const data = Buffer.alloc(clusterSize);
  for (let i = 0; i < e.tableSize; i++) {
    const base = i * bitsPerCluster; // first bit of this cluster
    if (base * g >= virtualSize) break;
    if (tableEntryAllOnes(table, i)) {
      push(base, base + bitsPerCluster);
      continue;
    }
    const off = tableEntryOffset(table, i);
    if (off === 0) continue;
    read(data, off);
    // only the bits of guest offsets below the virtual size (a cluster's last bits lie past it)
    const runs = native().bitRuns(data, Math.min(bitsPerCluster, Math.ceil(virtualSize / g) - base));
    for (let k = 0; k < runs.length; k += 2) push(base + runs[k], base + runs[k + 1]);
  }
  return out;
}

// -----------------------------------------------------------------------------------------
// qemu-img check

export interface BitmapReference {
  offset: number;
  length: number;
  what: string;
}

export interface BitmapCheck {
  /** clusters the bitmaps use: to be counted with every other reference */
  references: BitmapReference[];
  /** corruptions, as qemu-img check counts them */
  errors: string[];
  /** not errors: stale extension, bitmaps in use */
  notes: string[];
  /** the extension is there but the autoclear bit is clear */
  stale: boolean;
}

/**
 * The bitmap part of `qemu-img check`: with a consistent extension, the directory, each
 * table and each data cluster is a reference (refcount 1 expected); a directory QEMU would
 * not load is one corruption, so is every invalid table entry. With the autoclear bit clear
 * the bitmaps count for nothing, so their clusters show as leaks (as in QEMU).
 */
export function checkBitmaps(
  path: string,
  read: ReadAt,
  h: { extensions: HeaderExtension[]; autoclear: number; clusterSize: number; size: number },
  fileSize: number,
): BitmapCheck {
  const res: BitmapCheck = { references: [], errors: [], notes: [], stale: false };
  let state: BitmapsState;
  try {
    state = bitmapsState(path, h, fileSize);
  } catch (e) {
    if (!(e instanceof DisksnapError) || e.code !== 'ECORRUPT') throw e;
    res.errors.push(e.message);
    return res;
  }
  if (state.status === 'stale') {
    res.stale = true;
    res.notes.push('the bitmaps extension is stale (autoclear bit 0 clear: a program lacking bitmap support wrote the image); its clusters count as leaks');
  }
  const ext = state.ext;
  if (!ext) return res;
  const cs = h.clusterSize;
  res.references.push({ offset: ext.directoryOffset, length: ext.directorySize, what: 'bitmap directory' });
  let entries: BitmapEntry[];
  try {
    entries = readBitmapDirectory(path, read, ext, cs, h.size, fileSize);
    for (const e of entries) if (e.extraData.length > 0 || e.flags & FLAGS_RESERVED_QEMU) throw corrupt(path, `bitmap '${e.name}' has extra data or flags QEMU does not support`);
  } catch (e) {
    if (!(e instanceof DisksnapError) || e.code !== 'ECORRUPT') throw e;
    res.errors.push(e.message);
    return res;
  }
  for (const e of entries) {
    if (e.inUse) res.notes.push(`bitmap '${e.name}' is in use (inconsistent)`);
    res.references.push({ offset: e.tableOffset, length: e.tableSize * 8, what: `bitmap '${e.name}' table` });
    const table = Buffer.alloc(e.tableSize * 8);
    read(table, e.tableOffset);
    for (let i = 0; i < e.tableSize; i++) {
      const why = tableEntryProblem(table, i, cs, fileSize);
      if (why) {
        res.errors.push(`bitmap '${e.name}' table entry ${i} is ${why}`);
        continue;
      }
      const off = tableEntryOffset(table, i);
      if (off !== 0) res.references.push({ offset: off, length: cs, what: `bitmap '${e.name}' data cluster ${i}` });
    }
  }
  return res;
}
