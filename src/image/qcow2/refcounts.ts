/**
 * Refcounts, allocation and the write ordering of a qcow2 file (QEMU: qcow2-refcount.c and
 * the dependencies of qcow2-cache.c). The base of Qcow2Image: clusters.ts builds the L1/L2
 * layer on it, image.ts the public image.
 *
 * In memory
 * ---------
 *   refcount table  whole, a Buffer; dirty entries tracked by index
 *   refcount blocks bounded LRU (TableCache), dirty flag per block
 *   pending frees   clusters whose last reference was dropped but whose refcount decrement
 *                   may reach the file only after the L2/L1 entries that dropped it
 *   metaClusters    host clusters holding metadata (header, L1, refcount table and blocks,
 *                   L2 tables): never handed out, never a data cluster
 *
 * Crash safety: the order of writes (dependencies, as QEMU's qcow2 cache dependencies)
 * ------------------------------------------------------------------------------------
 *   1. data + copy-on-write head/tail  -> written to a newly allocated cluster first
 *   2. refcount blocks (increments)    -> may reach the file any time (a crash leaks at worst)
 *   3. refcount table entries          -> only after the new refcount blocks they point to
 *   4. L2 tables                       -> only after 1, 2 and 3 are durable
 *   5. L1 entries                      -> only after the L2 tables they point to are durable
 *   6. refcount decrements (frees)     -> only after the L2/L1 entries that dropped the
 *                                         references are durable; until then the cluster is
 *                                         not reused
 *   header (refcount table move)       -> only after everything else is durable
 * Each write of a layer is preceded by one fdatasync if, and only if, a layer it depends on
 * was written since the last fdatasync (`barrier()`, the REQUIRES table below): a flush of
 * many dirty tables costs two or three fdatasyncs, not one per table. After a crash (or
 * SIGKILL between any two syscalls) the file can have leaked clusters, never an entry
 * pointing at a free or half-written cluster.
 *
 * Allocation: first free cluster(s) at or after a hint (QEMU's free_cluster_index), in
 * practice the end of the file. A missing refcount block is placed inside the range it
 * describes (it counts itself); a full refcount table moves to a larger one at the end of
 * the file (new blocks and table written and synced, then the header switched in one
 * sector write, then the old table freed).
 *
 * Deliberately left simple: no lazy refcounts; freed clusters are found again by the hint
 * moving back, not by a free-space index.
 */
import { BlockFile } from '../../engine/file';
import { corrupt, DisksnapError } from '../../engine/errors';
import { CachedTable, TableCache } from './cache';
import { getRefcount, MAX_REFTABLE_BYTES, maxRefcount, OFF_AUTOCLEAR, OFF_REFCOUNT_TABLE_OFFSET, Qcow2Header, reftableEntryOffset, setRefcount, writeEntry } from './format';
import { Qcow2Tables } from './metadata';

/** Layers of the write ordering (see the note above); bit values for the unsynced mask. */
export const DATA = 1;
export const REFBLOCK = 2;
export const REFTABLE = 4;
export const L2 = 8;
export const L1 = 16;
export const HEADER = 32;
export const FREES = 64;
/** What must be durable before a write of each layer. */
const REQUIRES: Record<number, number> = {
  [DATA]: 0,
  [REFBLOCK]: 0,
  [REFTABLE]: REFBLOCK,
  [L2]: DATA | REFBLOCK | REFTABLE,
  [L1]: DATA | REFBLOCK | REFTABLE | L2,
  [HEADER]: DATA | REFBLOCK | REFTABLE | L2 | L1 | FREES,
  [FREES]: L2 | L1,
};

/**
 * A set of host cluster indices that also answers `has` from a bit array (built at the first
 * hasFast or bitArray, kept current by add and delete): every entry of every L2 table read is
 * checked against the metadata clusters, and a Set lookup per entry was most of that check
 * (262,144 entries for a 16 GiB image). The addon's check of a whole table (native/qcow2.cc,
 * through clusters.ts) reads the bit array itself.
 */
export class ClusterSet extends Set<number> {
  private bits: Uint8Array | undefined;
  /** indices past this are looked up in the Set (a bit array of 16 MiB at most) */
  private static readonly MAX_BITS = 2 ** 27;

  override add(c: number): this {
    const b = this.bits;
    if (b && c < ClusterSet.MAX_BITS) {
      if (c >> 3 < b.length) b[c >> 3] |= 1 << (c & 7);
      else this.bits = undefined; // past the array: built again, larger, when next needed
    }
    return super.add(c);
  }

  override delete(c: number): boolean {
    const b = this.bits;
    if (b && c < ClusterSet.MAX_BITS && c >> 3 < b.length) b[c >> 3] &= ~(1 << (c & 7));
    return super.delete(c);
  }

  override clear(): void {
    this.bits = undefined;
    super.clear();
  }

  /** The bit array `hasFast` answers from (built now if need be), and the index it answers below. */
  bitArray(): { bits: Uint8Array; limit: number } {
    this.hasFast(0);
    return { bits: this.bits!, limit: ClusterSet.MAX_BITS };
  }

  /** `has`, for many lookups in a row (the bit array is built on the first). */
  hasFast(c: number): boolean {
    if (c >= ClusterSet.MAX_BITS) return super.has(c);
    let b = this.bits;
    if (!b) {
      let max = 0;
      for (const x of this) if (x < ClusterSet.MAX_BITS && x > max) max = x;
      b = this.bits = new Uint8Array((max >> 3) + 1);
      for (const x of this) if (x < ClusterSet.MAX_BITS) b[x >> 3] |= 1 << (x & 7);
    }
    const i = c >> 3;
    return i < b.length && (b[i] & (1 << (c & 7))) !== 0;
  }
}

export abstract class RefcountLayer {
  readonly path: string;
  readonly file: BlockFile;
  readonly writable: boolean;
  readonly header: Qcow2Header;
  readonly clusterSize: number;
  readonly clusterBits: number;

  protected fileSize: number;
  /** first cluster index past every cluster known to be in use or allocated */
  protected allocEnd: number;
  protected freeHint = 0;
  private readonly order: number;
  private readonly rbBits: number; // log2(refcounts per refcount block)
  private reftable: Buffer;
  private reftableOffset: number;
  private reftableEntries: number;
  private readonly reftableDirty = new Set<number>();
  private readonly rbCache: TableCache;
  /** host cluster index -> references dropped, applied at flush after the L2/L1 writes */
  protected readonly pendingFrees = new Map<number, number>();
  /** cluster indices of metadata: header, L1, refcount table, refcount blocks, L2 tables */
  protected readonly metaClusters = new ClusterSet();
  /** layers written since the last fdatasync (bit mask) */
  protected unsynced = 0;
  /** async reads in flight: frees wait for them (a freed cluster could be reused under a read) */
  protected inflight = 0;

  protected constructor(p: string, file: BlockFile, t: Qcow2Tables, refcountCacheEntries: number | undefined) {
    const h = t.header;
    this.path = p;
    this.file = file;
    this.writable = file.writable;
    this.header = h;
    this.clusterSize = h.clusterSize;
    this.clusterBits = h.clusterBits;
    this.fileSize = t.fileSize;
    this.allocEnd = Math.ceil(t.fileSize / h.clusterSize);
    this.order = h.refcountOrder;
    this.rbBits = h.clusterBits + 3 - h.refcountOrder;
    this.reftable = t.reftable;
    this.reftableOffset = h.refcountTableOffset;
    this.reftableEntries = t.reftable.length / 8;
    this.rbCache = new TableCache(refcountCacheEntries ?? Math.max(4, Math.floor(2 ** 20 / h.clusterSize)));
  }

  /**
   * Autoclear feature bits to clear before the first write (a raw external data file, and
   * bitmaps that bitmap-writer.ts does not maintain: a writer that does not maintain a
   * feature must clear its bit). Cleared at the first
   * write rather than at open, so that a write refused before it changes anything (a corrupt
   * table found on the way) leaves the file as it was.
   */
  protected autoclearPending = false;
  /** the autoclear bits that stay set (the bitmaps bit, where bitmap-writer.ts maintains them) */
  protected autoclearKeep = 0;

  /** Every write of the image goes through here (the native batch write calls firstWrite()). */
  protected writeFile(buf: Buffer, offset: number): void {
    this.firstWrite();
    this.file.writeSync(buf, offset);
  }

  protected firstWrite(): void {
    if (!this.autoclearPending) return;
    this.autoclearPending = false;
    const bits = Buffer.alloc(8);
    bits.writeUInt32BE(this.autoclearKeep, 4);
    this.file.writeSync(bits, OFF_AUTOCLEAR);
    this.file.syncSync(true);
  }

  protected unsupported(what: string): DisksnapError {
    return new DisksnapError(`${this.path}: uses ${what}, which disksnap does not support`, 'EUNSUPPORTED', undefined, this.path);
  }

  /** Marks the clusters of [offset, offset+length) as metadata. */
  protected addMetaRange(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) this.metaClusters.add(c);
  }

  /** The L2 layer drops its shortcut to the last table when a cache evicts anything. */
  protected abstract tableEvicted(): void;

  // ---------------------------------------------------------------------------------------
  // Ordering

  /** fdatasync before a write of `layer` if a layer it depends on was written since the last one. */
  protected barrier(layer: number): void {
    if (this.unsynced & REQUIRES[layer]) {
      this.file.syncSync(true);
      this.unsynced = 0;
    }
  }

  protected noteWrite(offset: number, len: number, layer: number): void {
    if (offset + len > this.fileSize) this.fileSize = offset + len;
    this.unsynced |= layer;
  }

  /** Writes a table of `layer` after the barrier it needs. */
  protected writeTable(buf: Buffer, offset: number, layer: number): void {
    this.barrier(layer);
    this.writeFile(buf, offset);
    this.noteWrite(offset, buf.length, layer);
  }

  /**
   * Evicts the least recently used table of `cache` (of layer L2 or REFBLOCK) if the cache
   * is full, writing it back first if dirty.
   */
  protected makeRoom(cache: TableCache, layer: number): void {
    const v = cache.victim();
    if (v === undefined) return;
    if (v.dirty) {
      // An L2 table may reach the file only after the refcounts it relies on and the data
      // it points to: write those first (one barrier), then the table.
      if (layer === L2) this.writeRefcounts();
      this.writeTable(v.buf, v.offset, layer);
      v.dirty = false;
    }
    cache.delete(v.offset);
    this.tableEvicted();
  }

  private writeRefcountBlocks(): void {
    for (const e of this.rbCache.dirty()) {
      this.writeTable(e.buf, e.offset, REFBLOCK);
      e.dirty = false;
    }
  }

  /** Dirty refcount blocks, then (after a barrier) dirty refcount table entries. */
  protected writeRefcounts(): void {
    this.writeRefcountBlocks();
    if (this.reftableDirty.size) {
      this.barrier(REFTABLE);
      this.writeDirtyEntries(this.reftable, this.reftableDirty, this.reftableOffset, REFTABLE);
    }
  }

  /** Writes the 512-byte pieces of a table that hold dirty entries. */
  protected writeDirtyEntries(table: Buffer, dirty: Set<number>, fileOffset: number, layer: number): void {
    const pieces = [...new Set([...dirty].map((i) => Math.floor(i / 64)))].sort((a, b) => a - b);
    for (const p of pieces) {
      const from = p * 512;
      const to = Math.min(table.length, from + 512);
      this.writeFile(table.subarray(from, to), fileOffset + from);
      this.noteWrite(fileOffset + from, to - from, layer);
    }
    dirty.clear();
  }

  /**
   * Applies the pending frees, once the L2/L1 entries that dropped the references are
   * written (the FREES barrier makes them durable first), and punches the freed clusters.
   */
  protected applyPendingFrees(): void {
    if (this.pendingFrees.size === 0 || this.inflight > 0) return;
    this.barrier(FREES);
    const freed: number[] = [];
    for (const [c, n] of this.pendingFrees) {
      const next = Math.max(0, this.refcountOf(c) - n);
      this.setRefcountOf(c, next);
      if (next === 0) freed.push(c);
    }
    this.pendingFrees.clear();
    for (const e of this.rbCache.dirty()) {
      this.writeFile(e.buf, e.offset);
      this.noteWrite(e.offset, e.buf.length, FREES);
      e.dirty = false;
    }
    freed.sort((a, b) => a - b);
    for (let i = 0; i < freed.length; ) {
      let j = i + 1;
      while (j < freed.length && freed[j] === freed[j - 1] + 1) j++;
      try {
        this.file.punchHoleSync(freed[i] * this.clusterSize, (j - i) * this.clusterSize);
      } catch {
        // Safe to drop: giving space back is best effort (not every filesystem can punch
        // holes); the clusters are free in the refcounts either way and will be reused.
      }
      if (freed[i] < this.freeHint) this.freeHint = freed[i];
      i = j;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Refcounts

  private refblock(rbi: number, create: boolean): CachedTable | undefined {
    if (rbi >= this.reftableEntries) return undefined;
    const off = reftableEntryOffset(this.reftable, rbi);
    if (off === 0) return undefined;
    const cached = this.rbCache.get(off);
    if (cached) return cached;
    if (!create && off >= this.fileSize) return undefined;
    this.makeRoom(this.rbCache, REFBLOCK);
    const buf = Buffer.alloc(this.clusterSize);
    this.file.readFullSync(buf, off);
    const e = { offset: off, buf, dirty: false };
    this.rbCache.insert(e);
    return e;
  }

  protected refcountOf(c: number): number {
    const rb = this.refblock(Math.floor(c / 2 ** this.rbBits), false);
    if (rb === undefined) return 0;
    return getRefcount(rb.buf, c % 2 ** this.rbBits, this.order);
  }

  protected setRefcountOf(c: number, value: number): void {
    const rbi = Math.floor(c / 2 ** this.rbBits);
    const rb = this.refblock(rbi, true);
    if (rb === undefined) throw new Error(`internal: no refcount block for cluster ${c}`);
    if (value > maxRefcount(this.order)) throw corrupt(this.path, `refcount of cluster ${c} would overflow ${this.order}-order refcounts`);
    setRefcount(rb.buf, c % 2 ** this.rbBits, this.order, value);
    rb.dirty = true;
  }

  /** The first run of `k` free clusters at or after the hint, and the first free cluster seen. */
  private findFree(k: number): { start: number; firstFree: number } {
    const perBlock = 2 ** this.rbBits;
    let start = -1;
    let run = 0;
    let firstFree = -1;
    let c = this.freeHint;
    while (run < k) {
      const rbi = Math.floor(c / perBlock);
      const rb = rbi < this.reftableEntries ? this.refblock(rbi, false) : undefined;
      if (rb === undefined) {
        // no block: every cluster it would describe is free
        if (run === 0) start = c;
        if (firstFree < 0) firstFree = c;
        const take = Math.min(k - run, (rbi + 1) * perBlock - c);
        run += take;
        c += take;
        continue;
      }
      const limit = (rbi + 1) * perBlock;
      for (; c < limit && run < k; c++) {
        const free = getRefcount(rb.buf, c - rbi * perBlock, this.order) === 0 && !this.pendingFrees.has(c) && !this.metaClusters.has(c);
        if (free) {
          if (run === 0) start = c;
          if (firstFree < 0) firstFree = c;
          run++;
        } else run = 0;
      }
    }
    return { start, firstFree };
  }

  /**
   * Allocates `k` contiguous free clusters (refcount 1 each); returns the host offset.
   *
   * The refcount blocks the run lacks go in front of it, in the same free region: a region
   * of m + k clusters is searched, m being the number of blocks that region lacks, until m
   * no longer grows. Placing a block inside the run (in its own range) would split the run;
   * with refcount order 6 a block covers exactly one L2 table's worth of clusters, so a
   * run would be split on every try and never fit.
   */
  protected allocClusters(k: number): number {
    for (let attempt = 0; ; attempt++) {
      if (attempt > 64) throw new Error('internal: cluster allocation does not converge');
      let m = 0;
      let found = this.findFree(k);
      let missing = this.missingBlocks(found.start, k);
      for (let i = 0; missing.length > m; i++) {
        if (i > 64) throw new Error('internal: refcount block placement does not converge');
        m = missing.length;
        found = this.findFree(m + k);
        missing = this.missingBlocks(found.start, m + k);
      }
      const { start, firstFree } = found;
      const beyond = missing.filter((rbi) => rbi >= this.reftableEntries);
      if (beyond.length > 0) {
        this.growReftable(Math.max(...beyond) + 1);
        continue;
      }
      missing.forEach((rbi, j) => this.newRefblock(rbi, start + j));
      const n = missing.length + k;
      for (let i = 0; i < n; i++) this.setRefcountOf(start + i, 1);
      // the hint moves past what we took, or stays at a smaller free hole we skipped
      this.freeHint = firstFree === start ? start + n : firstFree;
      if (start + n > this.allocEnd) this.allocEnd = start + n;
      return (start + missing.length) * this.clusterSize;
    }
  }

  /** Indices of the refcount blocks that clusters [start, start+n) need and that do not exist. */
  private missingBlocks(start: number, n: number): number[] {
    const perBlock = 2 ** this.rbBits;
    const out: number[] = [];
    for (let rbi = Math.floor(start / perBlock); rbi <= Math.floor((start + n - 1) / perBlock); rbi++) {
      if (rbi >= this.reftableEntries || reftableEntryOffset(this.reftable, rbi) === 0) out.push(rbi);
    }
    return out;
  }

  /**
   * A new, empty refcount block for index rbi, stored at cluster `at`; the caller sets the
   * refcount of `at` once every block the allocation needs exists.
   */
  private newRefblock(rbi: number, at: number): void {
    const cs = this.clusterSize;
    this.makeRoom(this.rbCache, REFBLOCK);
    this.rbCache.insert({ offset: at * cs, buf: Buffer.alloc(cs), dirty: true });
    writeEntry(this.reftable, rbi * 8, at * cs, 0);
    this.reftableDirty.add(rbi);
    this.metaClusters.add(at);
  }

  /**
   * Where a refcount table of `entries` entries and the new refcount blocks it needs can go
   * at the end of the file: the first cluster `c` of a free region, the final entry count,
   * and the block indices to create (placed right after the table).
   */
  private placeReftable(minEntries: number): { c: number; entries: number; needed: number[] } {
    const cs = this.clusterSize;
    const perCluster = cs / 8;
    const perBlock = 2 ** this.rbBits;
    let entries = Math.ceil(Math.max(minEntries, this.reftableEntries * 2) / perCluster) * perCluster;
    let c = Math.max(this.allocEnd, Math.ceil(this.fileSize / cs));
    for (let guard = 0; ; guard++) {
      if (guard > 1000) throw new Error('internal: refcount table growth does not converge');
      const tableClusters = entries / perCluster;
      let needed: number[] = [];
      for (let nb = 0; ; ) {
        needed = [];
        const end = c + tableClusters + nb;
        for (let rbi = Math.floor(c / perBlock); rbi <= Math.floor((end - 1) / perBlock); rbi++) {
          if (rbi >= this.reftableEntries || reftableEntryOffset(this.reftable, rbi) === 0) needed.push(rbi);
        }
        if (needed.length <= nb) break;
        nb = needed.length;
      }
      const regionEnd = c + tableClusters + needed.length;
      let busy = -1;
      for (let x = c; x < regionEnd; x++) if (this.refcountOf(x) !== 0 || this.metaClusters.has(x) || this.pendingFrees.has(x)) busy = x;
      if (busy >= 0) {
        c = busy + 1;
        continue;
      }
      const maxRbi = Math.max(Math.floor((regionEnd - 1) / perBlock), minEntries - 1);
      if (maxRbi >= entries) {
        entries = Math.ceil((maxRbi + 1) / perCluster) * perCluster;
        continue;
      }
      return { c, entries, needed };
    }
  }

  /**
   * Moves the refcount table to a larger one at the end of the file, with the new refcount
   * blocks it needs to describe itself, then switches the header and frees the old table.
   */
  private growReftable(minEntries: number): void {
    const cs = this.clusterSize;
    const { c, entries, needed } = this.placeReftable(minEntries);
    const tableClusters = entries / (cs / 8);
    if (entries * 8 > MAX_REFTABLE_BYTES) throw this.unsupported('a refcount table larger than 8 MiB (the image is too large for its cluster size)');
    const newTable = Buffer.alloc(entries * 8);
    this.reftable.copy(newTable, 0, 0, this.reftableEntries * 8);
    // new blocks, in the cache (dirty) and in the new table
    needed.forEach((rbi, j) => {
      const at = c + tableClusters + j;
      this.makeRoom(this.rbCache, REFBLOCK);
      this.rbCache.insert({ offset: at * cs, buf: Buffer.alloc(cs), dirty: true });
      writeEntry(newTable, rbi * 8, at * cs, 0);
    });
    const oldOffset = this.reftableOffset;
    const oldClusters = this.reftable.length / cs;
    // switch the in-memory table first so that refcount updates find the new blocks
    this.reftable = newTable;
    this.reftableEntries = entries;
    this.reftableOffset = c * cs;
    const regionEnd = c + tableClusters + needed.length;
    for (let x = c; x < regionEnd; x++) {
      this.setRefcountOf(x, 1);
      this.metaClusters.add(x);
    }
    // durable order: blocks, table, header, then the old table may go
    this.writeRefcountBlocks();
    this.writeTable(newTable, c * cs, REFTABLE);
    this.reftableDirty.clear();
    const hb = Buffer.alloc(12);
    writeEntry(hb, 0, c * cs, 0);
    hb.writeUInt32BE(tableClusters, 8);
    this.writeTable(hb, OFF_REFCOUNT_TABLE_OFFSET, HEADER);
    this.file.syncSync(true);
    this.unsynced = 0;
    for (let x = 0; x < oldClusters; x++) {
      const oc = oldOffset / cs + x;
      this.metaClusters.delete(oc);
      this.setRefcountOf(oc, this.refcountOf(oc) - 1);
    }
    if (regionEnd > this.allocEnd) this.allocEnd = regionEnd;
    if (oldOffset / cs < this.freeHint) this.freeHint = oldOffset / cs;
  }
}
