/**
 * Keeping QEMU's persistent dirty bitmaps up to date while disksnap writes a qcow2 image,
 * and adding, clearing and removing bitmaps. Layout and parsing: bitmaps.ts.
 *
 * The writer reaches the image only through a BitmapHost: read and write at a host offset,
 * allocate clusters (refcount 1), set a refcount, and a durability barrier. Qcow2Image
 * provides one over its own allocator; bitmap-file.ts provides one for an image that no
 * other process is writing.
 *
 * A write session, as QEMU runs it
 * --------------------------------
 *   first guest write that sets a new bit:  in_use set on every enabled bitmap (4-byte
 *                                           in-place writes of the flags), then a barrier,
 *                                           then the guest data may go to the file
 *   further writes:                         bits set in memory (bitmap data clusters are
 *                                           loaded on demand; one covers clusterSize*8
 *                                           granules, 32 GiB of guest at the defaults)
 *   flush:  1. changed data clusters written (in place, or to new clusters)  -> barrier
 *           2. table entries for the new clusters written in place          -> barrier
 *           3. in_use cleared                                               -> barrier
 * A crash anywhere leaves in_use set (the bitmap is then known inconsistent, never silently
 * wrong) or a bitmap that covers every write. Bits only go from 0 to 1 in a session.
 *
 * Adding or removing a bitmap writes a new directory to new clusters, then switches the
 * header extension in one write of cluster 0, then frees the old directory (QEMU's order);
 * clearing zeroes the table in place, then frees the data clusters. The autoclear bit stays
 * set throughout: this writer maintains the bitmaps.
 *
 * Deliberately simple: the bitmaps of a session are held as their touched data clusters
 * only; tables are small (one entry per 32 GiB of guest at the defaults) and kept whole.
 */
import { DisksnapError, invalid } from '../../engine/errors';
import { AUTOCLEAR_BITMAPS, EXT_BITMAPS, EXT_PARENT_GUARD, HeaderExtension, OFF_AUTOCLEAR, parseHeader } from './format';
import { encodeExtensions, extensionsSize } from './encode';
import {
  BitmapEntry,
  BitmapsExtension,
  bitmapBytes,
  bitmapsState,
  DirtyRange,
  DIR_FLAGS_OFFSET,
  encodeBitmapDirectory,
  encodeBitmapsExtension,
  FLAG_AUTO,
  FLAG_IN_USE,
  FLAGS_RESERVED_QEMU,
  MAX_BITMAP_BYTES,
  MAX_BITMAPS,
  MAX_DIRECTORY_BYTES,
  MAX_GRANULARITY_BITS,
  MAX_NAME_BYTES,
  MIN_GRANULARITY_BITS,
  parseBitmapDirectory,
  readBitmapDirectory,
  readBitmapTable,
  readDirtyRanges,
  tableEntriesFor,
  tableEntryAllOnes,
  tableEntryOffset,
  TYPE_DIRTY_TRACKING,
} from './bitmaps';

/** What the bitmap writer needs from the image it lives in. */
export interface BitmapHost {
  readonly path: string;
  readonly clusterSize: number;
  readonly virtualSize: number;
  /** bytes of the image file, clusters allocated but not yet written included */
  fileSize(): number;
  /** reads exactly buf.length bytes at a host offset */
  read(buf: Buffer, hostOffset: number): void;
  write(buf: Buffer, hostOffset: number): void;
  /** `count` contiguous free clusters, each given refcount 1: the host offset of the first */
  allocate(count: number): number;
  /** sets the refcount of the cluster at a host offset (0 frees it) */
  setRefcount(hostOffset: number, value: number): void;
  /** every write and refcount change so far is durable before anything written after */
  sync(): void;
}

export interface AddBitmapOptions {
  /** bytes of guest per bit, a power of two from 512 B to 2 GiB (default 64 KiB, QEMU's default) */
  granularity?: number;
  /** created disabled (not 'auto'): no write sets its bits (default: enabled) */
  disabled?: boolean;
}

/** A bitmap the writer maintains: its table and the data clusters touched this session. */
interface Tracked {
  entry: BitmapEntry;
  table: Buffer;
  clusters: Map<number, Buffer>;
  dirty: Set<number>;
}

export const DEFAULT_GRANULARITY = 65536;

export class PersistentBitmaps {
  private entries: BitmapEntry[] = [];
  private ext: BitmapsExtension | undefined;
  private status: 'none' | 'stale' | 'consistent';
  private tracked: Tracked[] = [];
  private session = false;
  /** startWriting() was called: markDirty maintains the enabled bitmaps */
  private writer = false;

  private constructor(private readonly host: BitmapHost, h: { extensions: HeaderExtension[]; autoclear: number }) {
    const state = bitmapsState(host.path, { ...h, clusterSize: host.clusterSize }, host.fileSize());
    this.status = state.status;
    this.ext = state.ext;
    if (this.ext) this.entries = readBitmapDirectory(host.path, (b, o) => host.read(b, o), this.ext, host.clusterSize, host.virtualSize, host.fileSize());
  }

  /** Loads the bitmaps of an image (header already parsed); ECORRUPT naming the field when they are malformed. */
  static open(host: BitmapHost, h: { extensions: HeaderExtension[]; autoclear: number }): PersistentBitmaps {
    return new PersistentBitmaps(host, h);
  }

  /** 'none': no bitmaps; 'stale': another writer cleared the autoclear bit; 'consistent' */
  get state(): 'none' | 'stale' | 'consistent' {
    return this.status;
  }

  list(): readonly BitmapEntry[] {
    return this.entries;
  }

  find(name: string): BitmapEntry | undefined {
    return this.entries.find((e) => e.name === name);
  }

  private need(name: string): BitmapEntry {
    const e = this.find(name);
    if (!e) throw new DisksnapError(`${this.host.path}: has no bitmap named '${name}'`, 'ENOENT', 2, this.host.path);
    return e;
  }

  private read = (b: Buffer, o: number): void => this.host.read(b, o);

  dirtyRanges(name: string): DirtyRange[] {
    this.flush();
    return readDirtyRanges(this.host.path, this.read, this.need(name), this.host.clusterSize, this.host.virtualSize, this.host.fileSize());
  }

  /**
   * Refuses (EUNSUPPORTED, naming the bitmap) an image whose bitmaps a writer could not
   * keep consistent; then prepares every enabled, consistent bitmap for marking. Bitmaps in
   * use stay as they are (already known inconsistent, as QEMU leaves them); disabled ones
   * are not touched.
   */
  startWriting(): void {
    const cs = this.host.clusterSize;
    this.tracked = [];
    this.writer = true;
    for (const e of this.entries) {
      if (e.inUse || !e.auto) continue;
      const why =
        e.extraData.length > 0
          ? `it has ${e.extraData.length} bytes of extra data disksnap does not know`
          : e.flags & FLAGS_RESERVED_QEMU
            ? `flags 0x${e.flags.toString(16)} include bits QEMU does not support`
            : e.tableSize !== tableEntriesFor(this.host.virtualSize, e.granularityBits, cs)
              ? `its table has ${e.tableSize} entries, the virtual size ${this.host.virtualSize} needs ${tableEntriesFor(this.host.virtualSize, e.granularityBits, cs)}`
              : undefined;
      if (why) {
        throw new DisksnapError(
          `${this.host.path}: enabled persistent bitmap '${e.name}' cannot be maintained (${why}); remove it with 'qemu-img bitmap --remove' or disable it before writing`,
          'EUNSUPPORTED',
          undefined,
          this.host.path,
        );
      }
      const table = readBitmapTable(this.host.path, this.read, e, cs, this.host.fileSize());
      this.tracked.push({ entry: e, table, clusters: new Map(), dirty: new Set() });
    }
  }

  /** True when a write must call markDirty (some enabled bitmap is maintained). */
  get tracking(): boolean {
    return this.tracked.length > 0;
  }

  /**
   * Sets the bits of guest [offset, offset+length) in every maintained bitmap. Call before
   * the guest data is written: the first change of a session marks the bitmaps in use on
   * disk (durably) first.
   */
  markDirty(offset: number, length: number): void {
    if (length <= 0 || this.tracked.length === 0) return;
    const cs = this.host.clusterSize;
    const bitsPerCluster = cs * 8;
    for (const t of this.tracked) {
      const gb = t.entry.granularityBits;
      const first = Math.floor(offset / 2 ** gb);
      const last = Math.floor((offset + length - 1) / 2 ** gb);
      for (let ci = Math.floor(first / bitsPerCluster); ci <= Math.floor(last / bitsPerCluster); ci++) {
        const base = ci * bitsPerCluster;
        const from = Math.max(first, base) - base;
        const to = Math.min(last + 1, base + bitsPerCluster) - base;
        const data = this.cluster(t, ci);
        if (allSet(data, from, to)) continue;
        if (!this.session) this.beginSession();
        setBits(data, from, to);
        t.dirty.add(ci);
      }
    }
  }

  private cluster(t: Tracked, ci: number): Buffer {
    let c = t.clusters.get(ci);
    if (c) return c;
    c = Buffer.alloc(this.host.clusterSize);
    if (tableEntryAllOnes(t.table, ci)) c.fill(0xff);
    else {
      const off = tableEntryOffset(t.table, ci);
      if (off !== 0) this.host.read(c, off);
    }
    t.clusters.set(ci, c);
    return c;
  }

  private writeFlags(e: BitmapEntry, flags: number): void {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(flags >>> 0, 0);
    this.host.write(b, this.ext!.directoryOffset + e.dirOffset + DIR_FLAGS_OFFSET);
    e.flags = flags >>> 0;
    e.inUse = (flags & FLAG_IN_USE) !== 0;
  }

  private beginSession(): void {
    for (const t of this.tracked) this.writeFlags(t.entry, t.entry.flags | FLAG_IN_USE);
    this.host.sync();
    this.session = true;
  }

  /** Writes the bits of this session and clears in_use (see the order in the note above). */
  flush(): void {
    if (!this.session) return;
    const tablesToWrite: Tracked[] = [];
    for (const t of this.tracked) {
      let tableChanged = false;
      for (const ci of [...t.dirty].sort((a, b) => a - b)) {
        const data = t.clusters.get(ci)!;
        let off = tableEntryOffset(t.table, ci);
        if (off === 0) {
          off = this.host.allocate(1);
          writeTableEntry(t.table, ci, off);
          tableChanged = true;
        }
        this.host.write(data, off);
      }
      t.dirty.clear();
      if (tableChanged) tablesToWrite.push(t);
    }
    this.host.sync();
    if (tablesToWrite.length) {
      for (const t of tablesToWrite) this.host.write(t.table, t.entry.tableOffset);
      this.host.sync();
    }
    for (const t of this.tracked) this.writeFlags(t.entry, t.entry.flags & ~FLAG_IN_USE);
    this.host.sync();
    this.session = false;
  }

  // ---------------------------------------------------------------------------------------
  // Adding, clearing, removing

  /** Adds a new, empty, persistent bitmap (enabled unless told otherwise). */
  add(name: string, opts: AddBitmapOptions = {}): BitmapEntry {
    this.flush();
    const cs = this.host.clusterSize;
    const nameBytes = Buffer.byteLength(name, 'utf8');
    if (nameBytes === 0 || nameBytes > MAX_NAME_BYTES) throw invalid(`bitmap name must be 1..${MAX_NAME_BYTES} bytes (got ${nameBytes})`, this.host.path);
    const granularity = opts.granularity ?? DEFAULT_GRANULARITY;
    const gb = Math.log2(granularity);
    if (!Number.isInteger(gb) || gb < MIN_GRANULARITY_BITS || gb > MAX_GRANULARITY_BITS) {
      throw invalid(`bitmap granularity must be a power of two from ${2 ** MIN_GRANULARITY_BITS} to ${2 ** MAX_GRANULARITY_BITS} (got ${granularity})`, this.host.path);
    }
    if (bitmapBytes(this.host.virtualSize, gb) > MAX_BITMAP_BYTES) throw invalid(`a bitmap of granularity ${granularity} over ${this.host.virtualSize} bytes would exceed ${MAX_BITMAP_BYTES} bytes; use a larger granularity`, this.host.path);
    // A stale extension is dropped with its clusters leaked, as QEMU does on a read-write open.
    const keep = this.status === 'consistent' ? this.entries : [];
    if (keep.some((e) => e.name === name)) throw new DisksnapError(`${this.host.path}: a bitmap named '${name}' already exists`, 'EEXIST', 17, this.host.path);
    if (keep.length >= MAX_BITMAPS) throw invalid(`the image already has ${MAX_BITMAPS} bitmaps`, this.host.path);
    const tableSize = tableEntriesFor(this.host.virtualSize, gb, cs);
    const tableClusters = Math.ceil((tableSize * 8) / cs);
    const tableOffset = this.host.allocate(tableClusters);
    this.host.write(Buffer.alloc(tableClusters * cs), tableOffset);
    const entry = {
      name,
      tableOffset,
      tableSize,
      flags: opts.disabled ? 0 : FLAG_AUTO,
      inUse: false,
      auto: !opts.disabled,
      type: TYPE_DIRTY_TRACKING,
      granularityBits: gb,
      granularity,
      extraData: Buffer.alloc(0),
    };
    this.writeDirectory([...keep, entry]);
    this.retrack();
    return this.need(name);
  }

  /**
   * Empties a bitmap: it then records the writes from now on. Also makes a bitmap in use
   * consistent again (an empty bitmap is true of the image as it is now), and fits its
   * table to the virtual size.
   */
  clear(name: string): void {
    this.flush();
    const e = this.need(name);
    const cs = this.host.clusterSize;
    const table = readBitmapTable(this.host.path, this.read, e, cs, this.host.fileSize());
    const want = tableEntriesFor(this.host.virtualSize, e.granularityBits, cs);
    if (e.tableSize !== want) {
      // A resized image: a new table of the right size, then the directory, then frees.
      const clusters = Math.ceil((want * 8) / cs);
      const off = this.host.allocate(clusters);
      this.host.write(Buffer.alloc(clusters * cs), off);
      const oldTable = { offset: e.tableOffset, size: e.tableSize };
      this.writeDirectory(this.entries.map((x) => (x === e ? { ...x, tableOffset: off, tableSize: want, flags: x.flags & ~FLAG_IN_USE, inUse: false } : x)));
      this.freeTable(table, oldTable.offset, oldTable.size);
    } else {
      this.host.write(Buffer.alloc(e.tableSize * 8), e.tableOffset);
      this.host.sync();
      if (e.inUse) {
        this.writeFlags(e, e.flags & ~FLAG_IN_USE);
        this.host.sync();
      }
      this.freeData(table, e.tableSize);
    }
    this.host.sync();
    this.retrack();
  }

  /** Removes a bitmap and frees its clusters; the last one takes the extension with it. */
  remove(name: string): void {
    this.flush();
    const e = this.need(name);
    const table = readBitmapTable(this.host.path, this.read, e, this.host.clusterSize, this.host.fileSize());
    this.writeDirectory(this.entries.filter((x) => x !== e));
    this.freeTable(table, e.tableOffset, e.tableSize);
    this.host.sync();
    this.retrack();
  }

  /** After the directory changed: a writer tracks the bitmaps as they are now. */
  private retrack(): void {
    if (this.writer) this.startWriting();
  }

  private freeData(table: Buffer, size: number): void {
    for (let i = 0; i < size; i++) {
      const off = tableEntryOffset(table, i);
      if (off !== 0) this.host.setRefcount(off, 0);
    }
  }

  private freeTable(table: Buffer, offset: number, size: number): void {
    this.freeData(table, size);
    const cs = this.host.clusterSize;
    for (let c = 0; c < Math.ceil((size * 8) / cs); c++) this.host.setRefcount(offset + c * cs, 0);
  }

  /**
   * Writes a new directory to new clusters, switches the header to it (autoclear bit set),
   * then frees the old one. No entries: the extension goes and the autoclear bit is cleared.
   */
  private writeDirectory(entries: Omit<BitmapEntry, 'index' | 'dirOffset'>[]): void {
    const cs = this.host.clusterSize;
    const old = this.ext;
    let ext: BitmapsExtension | undefined;
    let dir: Buffer | undefined;
    if (entries.length > 0) {
      dir = encodeBitmapDirectory(entries);
      if (dir.length > MAX_DIRECTORY_BYTES) throw invalid(`the bitmap directory would exceed ${MAX_DIRECTORY_BYTES} bytes`, this.host.path);
      const clusters = Math.ceil(dir.length / cs);
      const off = this.host.allocate(clusters);
      const padded = Buffer.alloc(clusters * cs);
      dir.copy(padded);
      this.host.write(padded, off);
      ext = { nbBitmaps: entries.length, directorySize: dir.length, directoryOffset: off };
    }
    this.host.sync();
    rewriteBitmapsExtension(this.host, ext);
    this.host.sync();
    if (old && this.status === 'consistent') {
      for (let c = 0; c < Math.ceil(old.directorySize / cs); c++) this.host.setRefcount(old.directoryOffset + c * cs, 0);
    }
    this.ext = ext;
    this.status = ext ? 'consistent' : 'none';
    this.entries = ext && dir ? parseBitmapDirectory(this.host.path, dir, ext, cs, this.host.virtualSize, this.host.fileSize()) : [];
  }
}

/**
 * Rewrites cluster 0 with the bitmaps extension replaced (or added, or removed) and the
 * autoclear bit set to match; the backing file name moves behind the extensions. One write.
 */
export function rewriteBitmapsExtension(host: BitmapHost, ext: BitmapsExtension | undefined): void {
  const cs = host.clusterSize;
  const head = Buffer.alloc(cs);
  host.read(head, 0);
  const h = parseHeader(host.path, head, host.fileSize());
  const had = h.extensions.some((e) => e.type === EXT_BITMAPS);
  if (ext === undefined && !had && (h.autoclear & AUTOCLEAR_BITMAPS) === 0) return;
  if (h.version < 3) throw new DisksnapError(`${host.path}: persistent bitmaps need a qcow2 version 3 image (this one is version ${h.version})`, 'EUNSUPPORTED', undefined, host.path);
  const exts = h.extensions.filter((e) => e.type !== EXT_BITMAPS);
  if (ext) {
    // Where QEMU would put it: before extensions of unknown types such as our parent guard.
    const at = exts.findIndex((e) => e.type === EXT_PARENT_GUARD);
    exts.splice(at < 0 ? exts.length : at, 0, { type: EXT_BITMAPS, data: encodeBitmapsExtension(ext) });
  }
  const name = h.backingFile === undefined ? undefined : Buffer.from(h.backingFile, 'utf8');
  const need = h.headerLength + extensionsSize(exts) + (name?.length ?? 0);
  if (need > cs) throw new DisksnapError(`${host.path}: the header, its extensions and the backing file name would need ${need} bytes, more than one ${cs}-byte cluster`, 'EUNSUPPORTED', undefined, host.path);
  const out = Buffer.alloc(cs);
  head.copy(out, 0, 0, h.headerLength);
  const end = encodeExtensions(exts, out, h.headerLength);
  if (name) {
    name.copy(out, end);
    out.writeUInt32BE(0, 8);
    out.writeUInt32BE(end, 12);
  }
  const lo = out.readUInt32BE(OFF_AUTOCLEAR + 4);
  out.writeUInt32BE((ext ? lo | AUTOCLEAR_BITMAPS : lo & ~AUTOCLEAR_BITMAPS) >>> 0, OFF_AUTOCLEAR + 4);
  host.write(out, 0);
}

function writeTableEntry(table: Buffer, i: number, offset: number): void {
  const hi = Math.floor(offset / 0x100000000);
  table.writeUInt32BE(hi >>> 0, i * 8);
  table.writeUInt32BE((offset - hi * 0x100000000) >>> 0, i * 8 + 4);
}

/** True when bits [from, to) of a little-endian bit array are all set. */
export function allSet(data: Buffer, from: number, to: number): boolean {
  let i = from;
  while (i < to && i % 8 !== 0) {
    if (!((data[i >>> 3] >>> (i & 7)) & 1)) return false;
    i++;
  }
  while (i + 8 <= to) {
    if (data[i >>> 3] !== 0xff) return false;
    i += 8;
  }
  while (i < to) {
    if (!((data[i >>> 3] >>> (i & 7)) & 1)) return false;
    i++;
  }
  return true;
}

/** Sets bits [from, to) of a little-endian bit array. */
export function setBits(data: Buffer, from: number, to: number): void {
  let i = from;
  while (i < to && i % 8 !== 0) {
    data[i >>> 3] |= 1 << (i & 7);
    i++;
  }
  if (i + 8 <= to) {
    const end = Math.floor(to / 8);
    data.fill(0xff, i >>> 3, end);
    i = end * 8;
  }
  while (i < to) {
    data[i >>> 3] |= 1 << (i & 7);
    i++;
  }
}
