/**
 * Guest clusters of a qcow2 file (QEMU: qcow2-cluster.c): the L1 table and the L2 tables,
 * the guest -> host lookup behind every read, copy-on-write into newly allocated clusters,
 * zero clusters, and the write-back of L2 tables and L1 entries in the order refcounts.ts
 * lays down.
 *
 * In memory
 * ---------
 *   L1 table   whole, a Buffer of 64-bit entries; dirty entries tracked by index
 *   L2 tables  bounded LRU (TableCache), dirty flag per table; each table is validated
 *              (metadata.ts) when read from the file, before any entry is used
 *
 * Guest data goes straight to the file with pwrite; metadata stays dirty in the caches until
 * a flush or the eviction of a dirty table (writeback, as QEMU does with cache=writeback: no
 * fsync per write). A write into a cluster this image does not own alone (unallocated,
 * zero, compressed, or from the backing file) allocates a new run of clusters, fills it
 * with the old head and tail and the new bytes, and only then points the L2 entries at it;
 * the old clusters lose their reference at the next flush (pending frees).
 */
import type * as Zlib from 'node:zlib';
import { BlockFile } from '../../engine/file';
import { native } from '../../engine/native';
import { corrupt } from '../../engine/errors';
import { CachedTable, TableCache } from './cache';
import { compressedDescriptor, entryOffset, HI_COMPRESSED, HI_COPIED, LO_ZERO, writeEntry } from './format';
import { BackingLayer } from './layer';
import { Qcow2Tables, walkL2 } from './metadata';
import { DATA, L1, L2, RefcountLayer } from './refcounts';

/** Largest run written through a scratch buffer in one pwrite (bigger runs write head/data/tail apart). */
const SCRATCH_MAX = 1 << 20;

/** Sizes of the table caches (entries); defaults: 4 MiB of L2 tables, 1 MiB of refcount blocks. */
export interface CacheSizes {
  l2CacheEntries?: number;
  refcountCacheEntries?: number;
}

export abstract class ClusterLayer extends RefcountLayer {
  readonly virtualSize: number;
  abstract readonly backing: BackingLayer | undefined;

  protected readonly l2Bits: number; // log2(entries per L2 table)
  protected readonly l2Span: number; // guest bytes one L2 table maps
  protected readonly zeroFlag: boolean; // version 3: bit 0 of an L2 entry reads as zeros
  protected readonly l1: Buffer;
  protected readonly l1Dirty = new Set<number>();
  private readonly l2Cache: TableCache;
  private lastL1i = -1;
  private lastL2: CachedTable | undefined;
  private scratch: Buffer;
  private compressedCache: { offset: number; data: Buffer } | undefined;

  protected constructor(p: string, file: BlockFile, t: Qcow2Tables, caches: CacheSizes) {
    super(p, file, t, caches.refcountCacheEntries);
    const h = t.header;
    this.virtualSize = h.size;
    this.l2Bits = h.clusterBits - 3;
    this.l2Span = 2 ** (h.clusterBits + this.l2Bits);
    this.zeroFlag = h.version >= 3;
    this.l1 = t.l1;
    this.scratch = Buffer.alloc(h.clusterSize);
    this.l2Cache = new TableCache(caches.l2CacheEntries ?? Math.max(16, Math.floor((4 * 2 ** 20) / h.clusterSize)));
  }

  protected override tableEvicted(): void {
    this.lastL1i = -1;
    this.lastL2 = undefined;
  }

  // ---------------------------------------------------------------------------------------
  // Reading

  /**
   * Reads guest [guest, guest+len) into buf[bufOff..]. With `defer`, reads of this layer's
   * allocated clusters are appended there as [host, bufOff, len] triples instead of run.
   */
  readAt(buf: Buffer, bufOff: number, len: number, guest: number, defer?: number[]): void {
    const cs = this.clusterSize;
    while (len > 0) {
      const l1i = Math.floor(guest / this.l2Span);
      const inTable = guest - l1i * this.l2Span;
      const table = this.l2ForRead(l1i);
      if (table === undefined) {
        const n = Math.min(len, this.l2Span - inTable);
        this.readBacking(buf, bufOff, n, guest);
        bufOff += n;
        guest += n;
        len -= n;
        continue;
      }
      const t = table.buf;
      let idx = Math.floor(inTable / cs);
      const inCluster = inTable - idx * cs;
      const hi = t.readUInt32BE(idx * 8);
      const lo = t.readUInt32BE(idx * 8 + 4);
      const maxIdx = 1 << this.l2Bits;
      let n = Math.min(len, cs - inCluster);
      if (hi & HI_COMPRESSED) {
        const data = this.readCompressed(hi, lo, guest - inCluster);
        data.copy(buf, bufOff, inCluster, inCluster + n);
      } else if (lo & LO_ZERO && this.zeroFlag) {
        // extend over following zero clusters
        while (n < len && idx + 1 < maxIdx && t.readUInt32BE(idx * 8 + 12) & LO_ZERO && !(t.readUInt32BE(idx * 8 + 8) & HI_COMPRESSED)) {
          idx++;
          n = Math.min(len, n + cs);
        }
        buf.fill(0, bufOff, bufOff + n);
      } else {
        const host = entryOffset(hi, lo);
        if (host === 0) {
          while (n < len && idx + 1 < maxIdx && t.readUInt32BE(idx * 8 + 8) === 0 && t.readUInt32BE(idx * 8 + 12) === 0) {
            idx++;
            n = Math.min(len, n + cs);
          }
          this.readBacking(buf, bufOff, n, guest);
        } else {
          n = Math.min(len, this.contiguousRun(t, idx, host, false, Math.ceil((inCluster + len) / cs)) * cs - inCluster);
          const at = host + inCluster;
          if (defer) defer.push(at, bufOff, n);
          else this.file.readFullSync(buf.subarray(bufOff, bufOff + n), at);
        }
      }
      bufOff += n;
      guest += n;
      len -= n;
    }
  }

  /**
   * How many entries from `idx` on map host-contiguous clusters starting at `host` (at least
   * one, at most `need`); with `owned`, only clusters this image owns alone (COPIED, not
   * compressed).
   */
  private contiguousRun(t: Buffer, idx: number, host: number, owned: boolean, need: number): number {
    const maxIdx = 1 << this.l2Bits;
    let k = 1;
    while (k < need && idx + k < maxIdx) {
      const h2 = t.readUInt32BE((idx + k) * 8);
      const l2 = t.readUInt32BE((idx + k) * 8 + 4);
      if (owned ? !copiedStandard(h2) : h2 & HI_COMPRESSED) break;
      if ((l2 & LO_ZERO && this.zeroFlag) || entryOffset(h2, l2) !== host + k * this.clusterSize) break;
      k++;
    }
    return k;
  }

  protected readBacking(buf: Buffer, bufOff: number, n: number, guest: number): void {
    const b = this.backing;
    if (b === undefined || guest >= b.virtualSize) {
      buf.fill(0, bufOff, bufOff + n);
      return;
    }
    const part = Math.min(n, b.virtualSize - guest);
    b.readAt(buf, bufOff, part, guest);
    if (part < n) buf.fill(0, bufOff + part, bufOff + n);
  }

  private readCompressed(hi: number, lo: number, guestCluster: number): Buffer {
    const d = compressedDescriptor(hi, lo, this.clusterBits);
    if (this.compressedCache && this.compressedCache.offset === d.offset) return this.compressedCache.data;
    if (d.offset >= this.fileSize) {
      throw corrupt(this.path, `compressed L2 entry for guest offset ${guestCluster} points to ${d.offset}, past the end of the file (${this.fileSize} bytes)`);
    }
    const raw = Buffer.alloc(Math.min(d.length, this.fileSize - d.offset));
    this.file.readFullSync(raw, d.offset);
    let data: Buffer;
    try {
      // (zlib is loaded on the first compressed cluster: most images have none)
      // eslint-disable-next-line @typescript-eslint/no-require-imports
      const { inflateRawSync } = require('node:zlib') as typeof Zlib;
      data = inflateRawSync(raw, { finishFlush: 2 /* Z_SYNC_FLUSH: trailing bytes are allowed */, maxOutputLength: this.clusterSize });
    } catch (e) {
      // The stream may be followed by padding; zlib reports that as an error only when the
      // output is short.
      throw corrupt(this.path, `compressed cluster for guest offset ${guestCluster} at ${d.offset} does not inflate: ${(e as Error).message}`);
    }
    if (data.length < this.clusterSize) {
      // QEMU writes whole clusters and refuses a stream that inflates to less
      throw corrupt(this.path, `compressed cluster for guest offset ${guestCluster} at ${d.offset} inflates to ${data.length} bytes, not a cluster (${this.clusterSize})`);
    }
    this.compressedCache = { offset: d.offset, data };
    return data;
  }

  // ---------------------------------------------------------------------------------------
  // L2 tables

  protected l2ForRead(l1i: number): CachedTable | undefined {
    if (l1i === this.lastL1i) return this.lastL2;
    const off = entryOffset(this.l1.readUInt32BE(l1i * 8), this.l1.readUInt32BE(l1i * 8 + 4));
    if (off === 0) return undefined;
    const t = this.loadL2(l1i, off);
    this.lastL1i = l1i;
    this.lastL2 = t;
    return t;
  }

  private loadL2(l1i: number, off: number): CachedTable {
    const cached = this.l2Cache.get(off);
    if (cached) return cached;
    this.makeRoom(this.l2Cache, L2);
    const buf = Buffer.alloc(this.clusterSize);
    this.file.readFullSync(buf, off);
    this.validateL2(l1i, buf);
    const e = { offset: off, buf, dirty: false };
    this.l2Cache.insert(e);
    return e;
  }

  /**
   * Every entry of an L2 table read from the file must be well formed (metadata.ts), point
   * inside the file and at no metadata: checked before any entry is used.
   */
  private validateL2(l1i: number, t: Buffer): void {
    if (this.l2IsOrdinary(t)) return;
    const fail = (message: string): never => {
      throw corrupt(this.path, message);
    };
    walkL2(t, l1i, this.clusterBits, this.zeroFlag, this.fileSize, (ref, guest) => {
      if (ref.kind !== 'compressed' && ref.offset !== 0 && this.metaClusters.has(ref.offset / this.clusterSize)) {
        fail(`L2 entry for guest offset ${guest} points to ${ref.offset}, which holds metadata (overlapping metadata)`);
      }
    }, fail);
  }

  /**
   * The common case of validateL2, without decoding: every entry empty, zero, or an aligned
   * data cluster inside the file and on no metadata (native/qcow2.cc: a loop in TypeScript cost
   * ~80 ns an entry, 262,144 entries for a 16 GiB image). Anything else (compressed entries
   * included) goes through walkL2, which names the problem. Decoding every entry into an
   * object cost 75 ms of a 0.9 s incremental snapshot of a 16 GiB image (32 tables).
   */
  private l2IsOrdinary(t: Buffer): boolean {
    const { bits, limit } = this.metaClusters.bitArray();
    return native().l2Ordinary(t, this.clusterSize, this.fileSize, bits, limit);
  }

  /** The L2 table for writing, allocated (zeroed: everything falls through) when missing. */
  private l2ForWrite(l1i: number): CachedTable {
    if (l1i === this.lastL1i && this.lastL2 !== undefined) return this.lastL2;
    const hi = this.l1.readUInt32BE(l1i * 8);
    const off = entryOffset(hi, this.l1.readUInt32BE(l1i * 8 + 4));
    let t: CachedTable;
    if (off === 0) {
      const host = this.allocClusters(1);
      this.metaClusters.add(host / this.clusterSize);
      this.makeRoom(this.l2Cache, L2);
      t = { offset: host, buf: Buffer.alloc(this.clusterSize), dirty: true };
      this.l2Cache.insert(t);
      writeEntry(this.l1, l1i * 8, host, HI_COPIED);
      this.l1Dirty.add(l1i);
    } else {
      if (!(hi & HI_COPIED)) throw this.unsupported(`an L2 table shared with an internal snapshot (L1 entry ${l1i})`);
      t = this.loadL2(l1i, off);
    }
    this.lastL1i = l1i;
    this.lastL2 = t;
    return t;
  }

  // ---------------------------------------------------------------------------------------
  // Writing

  /** Host offset of guest byte `guest` if its cluster can be written in place, else -1. */
  protected inPlaceHost(guest: number): number {
    const l1i = Math.floor(guest / this.l2Span);
    let t: CachedTable | undefined;
    if (l1i === this.lastL1i) t = this.lastL2;
    else {
      if (!(this.l1.readUInt32BE(l1i * 8) & HI_COPIED)) return -1;
      t = this.l2ForRead(l1i);
    }
    if (t === undefined) return -1;
    const inTable = guest - l1i * this.l2Span;
    const idx = Math.floor(inTable / this.clusterSize);
    const hi = t.buf.readUInt32BE(idx * 8);
    const lo = t.buf.readUInt32BE(idx * 8 + 4);
    if (!copiedStandard(hi) || lo & LO_ZERO) return -1;
    const host = entryOffset(hi, lo);
    return host === 0 ? -1 : host + (inTable - idx * this.clusterSize);
  }

  protected noteWriteLazy(end: number): void {
    if (end > this.fileSize) this.fileSize = end;
  }

  /** Writes guest [guest, guest+len) from buf[bufOff..]. */
  protected writeAt(buf: Buffer, bufOff: number, len: number, guest: number): void {
    const cs = this.clusterSize;
    while (len > 0) {
      const l1i = Math.floor(guest / this.l2Span);
      const inTable = guest - l1i * this.l2Span;
      const table = this.l2ForWrite(l1i);
      const idx = Math.floor(inTable / cs);
      const inCluster = inTable - idx * cs;
      const hi = table.buf.readUInt32BE(idx * 8);
      const lo = table.buf.readUInt32BE(idx * 8 + 4);
      const host = entryOffset(hi, lo);
      let n: number;
      if (copiedStandard(hi) && !(lo & LO_ZERO && this.zeroFlag) && host !== 0) {
        // In place, over as many host-contiguous owned clusters as the write covers.
        n = Math.min(len, this.contiguousRun(table.buf, idx, host, true, Math.ceil((inCluster + len) / cs)) * cs - inCluster);
        this.writeFile(buf.subarray(bufOff, bufOff + n), host + inCluster);
        this.noteWrite(host + inCluster, n, DATA);
      } else {
        n = this.writeAllocating(table, idx, inCluster, buf, bufOff, len, guest);
      }
      bufOff += n;
      guest += n;
      len -= n;
    }
  }

  /**
   * Copy-on-write: the run of clusters from L2 index `idx` that need a new cluster (within
   * this table) gets newly allocated clusters holding the old head, the new bytes and the
   * old tail; then the entries point there. Returns the bytes of `buf` written.
   */
  private writeAllocating(table: CachedTable, idx: number, inCluster: number, buf: Buffer, bufOff: number, len: number, guest: number): number {
    const cs = this.clusterSize;
    const t = table.buf;
    const maxIdx = 1 << this.l2Bits;
    let k = 1;
    let covered = cs - inCluster;
    while (covered < len && idx + k < maxIdx) {
      const h2 = t.readUInt32BE((idx + k) * 8);
      const l2 = t.readUInt32BE((idx + k) * 8 + 4);
      if (copiedStandard(h2) && !(l2 & LO_ZERO && this.zeroFlag) && entryOffset(h2, l2) !== 0) break;
      k++;
      covered += cs;
    }
    const n = Math.min(len, covered);
    const clusterGuest = guest - inCluster;
    const newHost = this.allocClusters(k);
    const tailStart = inCluster + n; // within the run
    const runBytes = k * cs;
    const lastIdx = idx + k - 1;
    const tailGuest = clusterGuest + (k - 1) * cs;
    if (runBytes <= SCRATCH_MAX) {
      if (this.scratch.length < runBytes) this.scratch = Buffer.alloc(Math.max(runBytes, this.scratch.length * 2));
      const s = this.scratch;
      if (inCluster > 0) this.readOld(t, idx, clusterGuest, s, 0, inCluster, 0);
      buf.copy(s, inCluster, bufOff, bufOff + n);
      if (tailStart < runBytes) this.readOld(t, lastIdx, tailGuest, s, tailStart, runBytes - tailStart, tailStart - (k - 1) * cs);
      this.writeFile(s.subarray(0, runBytes), newHost);
    } else {
      if (inCluster > 0) {
        const head = Buffer.alloc(inCluster);
        this.readOld(t, idx, clusterGuest, head, 0, inCluster, 0);
        this.writeFile(head, newHost);
      }
      this.writeFile(buf.subarray(bufOff, bufOff + n), newHost + inCluster);
      if (tailStart < runBytes) {
        const tail = Buffer.alloc(runBytes - tailStart);
        this.readOld(t, lastIdx, tailGuest, tail, 0, runBytes - tailStart, tailStart - (k - 1) * cs);
        this.writeFile(tail, newHost + tailStart);
      }
    }
    this.noteWrite(newHost, runBytes, DATA);
    for (let i = 0; i < k; i++) {
      this.dropReference(t, idx + i);
      writeEntry(t, (idx + i) * 8, newHost + i * cs, HI_COPIED);
    }
    table.dirty = true;
    return n;
  }

  /**
   * Fills dst[dstOff, dstOff+len) with what bytes [start, start+len) of the cluster at L2
   * index `idx` (guest offset `clusterGuest`) show now: the copy-on-write source.
   */
  private readOld(t: Buffer, idx: number, clusterGuest: number, dst: Buffer, dstOff: number, len: number, start: number): void {
    const hi = t.readUInt32BE(idx * 8);
    const lo = t.readUInt32BE(idx * 8 + 4);
    if (hi & HI_COMPRESSED) {
      this.readCompressed(hi, lo, clusterGuest).copy(dst, dstOff, start, start + len);
      return;
    }
    if (lo & LO_ZERO && this.zeroFlag) {
      dst.fill(0, dstOff, dstOff + len);
      return;
    }
    const host = entryOffset(hi, lo);
    if (host === 0) {
      const g = clusterGuest + start;
      const inside = Math.max(0, Math.min(len, this.virtualSize - g));
      if (inside > 0) this.readBacking(dst, dstOff, inside, g);
      if (inside < len) dst.fill(0, dstOff + inside, dstOff + len);
      return;
    }
    this.file.readFullSync(dst.subarray(dstOff, dstOff + len), host + start);
  }

  /** The cluster (or compressed clusters) an L2 entry points to loses this reference. */
  private dropReference(t: Buffer, idx: number): void {
    const hi = t.readUInt32BE(idx * 8);
    const lo = t.readUInt32BE(idx * 8 + 4);
    if (hi === 0 && lo === 0) return;
    const cs = this.clusterSize;
    if (hi & HI_COMPRESSED) {
      const d = compressedDescriptor(hi, lo, this.clusterBits);
      const first = Math.floor(d.offset / cs);
      const last = Math.floor((d.offset + d.length - 1) / cs);
      for (let c = first; c <= last; c++) this.pendingFrees.set(c, (this.pendingFrees.get(c) ?? 0) + 1);
      if (this.compressedCache?.offset === d.offset) this.compressedCache = undefined;
      return;
    }
    const host = entryOffset(hi, lo);
    if (host !== 0) {
      const c = host / cs;
      this.pendingFrees.set(c, (this.pendingFrees.get(c) ?? 0) + 1);
    }
  }

  /** Makes guest [offset, offset+length) read as zeros, giving whole clusters back. */
  protected zeroRange(offset: number, length: number): void {
    const cs = this.clusterSize;
    let pos = offset;
    const end = offset + length;
    // partial first cluster
    if (pos % cs !== 0 && pos < end) {
      const n = Math.min(end - pos, cs - (pos % cs));
      this.zeroPartial(pos, n);
      pos += n;
    }
    const fullEnd = end - ((end - pos) % cs);
    // whole clusters (the last cluster of an image whose size is not a multiple of the
    // cluster size counts as whole when the range reaches the end of the image)
    const wholeEnd = end === this.virtualSize ? end : fullEnd;
    while (pos < wholeEnd) {
      const l1i = Math.floor(pos / this.l2Span);
      const tableEnd = Math.min(wholeEnd, (l1i + 1) * this.l2Span);
      if (entryOffset(this.l1.readUInt32BE(l1i * 8), this.l1.readUInt32BE(l1i * 8 + 4)) === 0 && this.backing === undefined) {
        pos = tableEnd; // nothing allocated, nothing below: already reads as zero
        continue;
      }
      if (!this.zeroFlag) {
        // version 2 has no zero flag: write zeros
        const z = Buffer.alloc(Math.min(tableEnd - pos, SCRATCH_MAX));
        while (pos < tableEnd) {
          const n = Math.min(z.length, tableEnd - pos);
          this.writeAt(z, 0, n, pos);
          pos += n;
        }
        continue;
      }
      const table = this.l2ForWrite(l1i);
      const t = table.buf;
      for (; pos < tableEnd; pos += cs) {
        const idx = Math.floor((pos - l1i * this.l2Span) / cs);
        const h2 = t.readUInt32BE(idx * 8);
        const l2 = t.readUInt32BE(idx * 8 + 4);
        if (h2 === 0 && l2 === LO_ZERO) continue;
        if (h2 === 0 && l2 === 0 && this.backing === undefined) continue;
        this.dropReference(t, idx);
        t.writeUInt32BE(0, idx * 8);
        t.writeUInt32BE(LO_ZERO, idx * 8 + 4);
        table.dirty = true;
      }
      pos = tableEnd;
    }
    if (pos < end) this.zeroPartial(pos, end - pos);
  }

  private zeroPartial(pos: number, n: number): void {
    const cur = Buffer.alloc(n);
    this.readAt(cur, 0, n, pos);
    if (isAllZero(cur)) return;
    cur.fill(0);
    this.writeAt(cur, 0, n, pos);
  }

  /** Writes every dirty table in dependency order; durable only after the final fdatasync. */
  protected writeMetadata(): void {
    this.writeRefcounts();
    for (const e of this.l2Cache.dirty()) {
      this.writeTable(e.buf, e.offset, L2);
      e.dirty = false;
    }
    if (this.l1Dirty.size) {
      this.barrier(L1);
      this.writeDirtyEntries(this.l1, this.l1Dirty, this.header.l1TableOffset, L1);
    }
    // The entries that dropped references are written; once they are durable the refcounts
    // may go down and the clusters be reused.
    this.applyPendingFrees();
  }
}

/**
 * True when a high word has COPIED set and COMPRESSED clear: a cluster this image owns alone
 * (written in place). Compared as `hi >>> 30` because `&` on bit 31 yields a negative number.
 */
function copiedStandard(hi: number): boolean {
  return hi >>> 30 === 2;
}

function isAllZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}
