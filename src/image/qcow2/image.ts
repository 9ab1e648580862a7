/**
 * Qcow2Image: a qcow2 file (v2 or v3) and its backing chain, as a DiskImage.
 *
 * In memory
 * ---------
 *   L1 table        whole, a Buffer of 64-bit entries; dirty entries tracked by index
 *   refcount table  whole, a Buffer; dirty entries tracked by index
 *   L2 tables       bounded LRU (TableCache), dirty flag per table
 *   refcount blocks bounded LRU, dirty flag per block
 *   pending frees   clusters whose last reference was dropped but whose refcount decrement
 *                   may reach the file only after the L2/L1 entries that dropped it
 *
 * Guest data goes straight to the file with pwrite; metadata stays dirty in the caches until
 * flushSync()/close() or the eviction of a dirty table (writeback, as QEMU does with
 * cache=writeback: no fsync per write).
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
 * was written since the last fdatasync (`barrier()`): a flush of many dirty tables costs two
 * or three fdatasyncs, not one per table. After a crash (or SIGKILL between any two
 * syscalls) the file can have leaked clusters, never an entry pointing at a free or
 * half-written cluster.
 *
 * Allocation: first free cluster(s) at or after a hint (QEMU's free_cluster_index), in
 * practice the end of the file. A missing refcount block is placed inside the range it
 * describes (it counts itself); a full refcount table moves to a larger one at the end of
 * the file (new blocks and table written and synced, then the header switched in one
 * sector write, then the old table freed).
 *
 * Deliberately left simple: writes run synchronously on the calling thread (the page cache
 * makes a 4 KiB pwrite a few microseconds; a thread-pool hop would cost more); the async
 * forms hand large reads of allocated data to the thread pool. No internal snapshots
 * (refused for writing), no lazy refcounts, no subclusters, no compression on write.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { inflateRawSync } from 'node:zlib';
import { BlockFile } from '../../engine/file';
import { corrupt, DisksnapError, invalid, busy } from '../../engine/errors';
import { checkRange, DiskImage, ImageInfo, ImageOpenOptions, LayerInfo, MapExtent } from '../view';
import { CachedTable, TableCache } from './cache';
import {
  compressedDescriptor,
  entryOffset,
  getRefcount,
  HI_COMPRESSED,
  HI_COPIED,
  INCOMPAT_DIRTY,
  LO_ZERO,
  MAX_CHAIN_DEPTH,
  maxRefcount,
  OFF_AUTOCLEAR,
  OFF_REFCOUNT_TABLE_OFFSET,
  parseHeader,
  Qcow2Header,
  setRefcount,
  writeEntry,
  QCOW2_MAGIC,
} from './format';
import { BackingLayer, RawLayer } from './layer';
import { compare as compareGuard, parentChangedError } from './guard';
import { commitMarkerPath } from '../sidecars';
import { assertNoChildren } from '../children';
import { readHeaderCluster, realpathOr, resolveBacking } from './header';

export interface Qcow2OpenOptions extends ImageOpenOptions {
  /** L2 tables kept in memory (default: 4 MiB worth, at least 16) */
  l2CacheEntries?: number;
  /** refcount blocks kept in memory (default: 1 MiB worth, at least 4) */
  refcountCacheEntries?: number;
  /** open without the backing chain (check, repair, header rewrites) */
  noBacking?: boolean;
  /** open even though a commit of this image into its parent was interrupted (diff commit) */
  allowCommitInProgress?: boolean;
  /** open for writing although the image has children (diff commit writing into it) */
  allowChildren?: boolean;
  /** paths (real) of the layers above, to detect a backing chain that loops */
  seen?: string[];
}

/** Layers of the write ordering (see the note above); bit values for the unsynced mask. */
const DATA = 1;
const REFBLOCK = 2;
const REFTABLE = 4;
const L2 = 8;
const L1 = 16;
const HEADER = 32;
const FREES = 64;
const REQUIRES: Record<number, number> = {
  [DATA]: 0,
  [REFBLOCK]: 0,
  [REFTABLE]: REFBLOCK,
  [L2]: DATA | REFBLOCK | REFTABLE,
  [L1]: DATA | REFBLOCK | REFTABLE | L2,
  [HEADER]: DATA | REFBLOCK | REFTABLE | L2 | L1 | FREES,
  [FREES]: L2 | L1,
};

/** Largest run written through a scratch buffer in one pwrite (bigger runs write head/data/tail apart). */
const SCRATCH_MAX = 1 << 20;

export type GuardState = 'ok' | 'unrecorded' | 'ignored' | `changed: ${string}`;

export class Qcow2Image implements DiskImage, BackingLayer {
  readonly format = 'qcow2' as const;
  readonly path: string;
  readonly virtualSize: number;
  readonly writable: boolean;
  readonly file: BlockFile;
  readonly header: Qcow2Header;
  readonly clusterSize: number;
  readonly clusterBits: number;
  /** resolved path of the backing file, when there is one */
  readonly backingPath: string | undefined;
  readonly backing: BackingLayer | undefined;
  /** state of the parent guard at open */
  readonly guardState: GuardState | undefined;

  private readonly l2Bits: number; // log2(entries per L2 table)
  private readonly l2Span: number; // guest bytes one L2 table maps
  private readonly rbBits: number; // log2(refcounts per refcount block)
  private readonly order: number;
  private readonly zeroFlag: boolean;
  private fileSize: number;
  /** first cluster index past every cluster known to be in use or allocated */
  private allocEnd: number;
  private freeHint = 0;

  private readonly l1: Buffer;
  private readonly l1Dirty = new Set<number>();
  private reftable: Buffer;
  private reftableOffset: number;
  private reftableEntries: number;
  private readonly reftableDirty = new Set<number>();
  private readonly l2Cache: TableCache;
  private readonly rbCache: TableCache;
  /** host cluster index -> references dropped, applied at flush after the L2/L1 writes */
  private readonly pendingFrees = new Map<number, number>();
  /** cluster indices of metadata: header, L1, refcount table, refcount blocks, L2 tables */
  private readonly metaClusters = new Set<number>();

  private unsynced = 0;
  private inflight = 0;
  private lastL1i = -1;
  private lastL2: CachedTable | undefined;
  private scratch: Buffer;
  private compressedCache: { offset: number; data: Buffer } | undefined;
  private closed = false;

  static open(p: string, opts: Qcow2OpenOptions = {}): Qcow2Image {
    if (opts.direct) {
      throw new DisksnapError(`${p}: O_DIRECT is not supported on qcow2 images`, 'EUNSUPPORTED', undefined, p);
    }
    if (!opts.allowCommitInProgress && fs.existsSync(commitMarkerPath(p))) {
      throw busy(`${p}: a commit of this child into its parent was interrupted; finish it with 'disksnap diff commit ${p}' before using the child`, p);
    }
    if (opts.write && !opts.allowChildren) {
      assertNoChildren(p);
    }
    const file = BlockFile.open(p, { write: !!opts.write, lock: opts.write ? 'exclusive' : opts.readLock });
    try {
      return new Qcow2Image(p, file, opts);
    } catch (e) {
      file.close();
      throw e;
    }
  }

  private constructor(p: string, file: BlockFile, opts: Qcow2OpenOptions) {
    this.path = p;
    this.file = file;
    this.writable = file.writable;
    const st = file.stat();
    this.fileSize = st.size;
    const h = parseHeader(p, readHeaderCluster(file, st.size), st.size);
    this.header = h;
    this.clusterSize = h.clusterSize;
    this.clusterBits = h.clusterBits;
    this.virtualSize = h.size;
    this.l2Bits = h.clusterBits - 3;
    this.l2Span = 2 ** (h.clusterBits + this.l2Bits);
    this.order = h.refcountOrder;
    this.rbBits = h.clusterBits + 3 - h.refcountOrder;
    this.zeroFlag = h.version >= 3;
    this.allocEnd = Math.ceil(st.size / h.clusterSize);
    this.scratch = Buffer.alloc(h.clusterSize);

    if (this.writable) {
      if (h.nbSnapshots > 0) throw this.unsupported(`internal snapshots (${h.nbSnapshots}); disksnap writes only images without them`);
      if (h.incompatible & INCOMPAT_DIRTY) {
        throw this.unsupported('the dirty bit (lazy refcounts left stale by an unclean shutdown); repair it with qemu-img check -r all first');
      }
      if (this.order > 6) throw this.unsupported(`refcount_order ${this.order}`);
    }

    // L1 table
    this.l1 = Buffer.alloc(h.l1Size * 8);
    if (h.l1Size > 0) file.readFullSync(this.l1, h.l1TableOffset);
    // refcount table
    this.reftableOffset = h.refcountTableOffset;
    this.reftableEntries = (h.refcountTableClusters * h.clusterSize) / 8;
    this.reftable = Buffer.alloc(h.refcountTableClusters * h.clusterSize);
    const rtAvail = Math.max(0, Math.min(this.reftable.length, st.size - h.refcountTableOffset));
    file.readFullSync(this.reftable.subarray(0, rtAvail), h.refcountTableOffset);

    this.metaClusters.add(0);
    this.addMetaRange(h.l1TableOffset, h.l1Size * 8);
    this.addMetaRange(h.refcountTableOffset, this.reftable.length);
    for (let i = 0; i < this.reftableEntries; i++) {
      const off = this.reftableEntryOffset(i);
      if (off === 0) continue;
      if (off % h.clusterSize !== 0) throw corrupt(p, `refcount table entry ${i} is ${off}: not cluster aligned`);
      if (off >= st.size) throw corrupt(p, `refcount table entry ${i} points to ${off}, past the end of the file (${st.size} bytes)`);
      const c = off / h.clusterSize;
      if (this.metaClusters.has(c)) throw corrupt(p, `refcount table entry ${i} points to ${off}, which overlaps other metadata`);
      this.metaClusters.add(c);
    }
    for (let i = 0; i < h.l1Size; i++) {
      const hi = this.l1.readUInt32BE(i * 8);
      const lo = this.l1.readUInt32BE(i * 8 + 4);
      const off = entryOffset(hi, lo);
      if (off === 0) continue;
      if (off % h.clusterSize !== 0 || (lo & 0x1ff) !== 0) throw corrupt(p, `L1 entry ${i} is 0x${hi.toString(16)}${lo.toString(16).padStart(8, '0')}: L2 table offset not cluster aligned`);
      if (off >= st.size) throw corrupt(p, `L1 entry ${i} points to an L2 table at ${off}, past the end of the file (${st.size} bytes)`);
      const c = off / h.clusterSize;
      if (this.metaClusters.has(c)) throw corrupt(p, `L1 entry ${i} points to an L2 table at ${off}, which overlaps other metadata (header, L1, refcount table or block, or another L2 table)`);
      this.metaClusters.add(c);
    }

    const l2Entries = opts.l2CacheEntries ?? Math.max(16, Math.floor((4 * 2 ** 20) / h.clusterSize));
    const rbEntries = opts.refcountCacheEntries ?? Math.max(4, Math.floor(2 ** 20 / h.clusterSize));
    this.l2Cache = new TableCache(l2Entries);
    this.rbCache = new TableCache(rbEntries);

    if (this.writable && h.autoclear !== 0 && h.version >= 3) {
      // We do not maintain bitmaps or a raw external data file: clear their autoclear bits,
      // as any writer that does not know them must.
      const b = Buffer.alloc(8);
      file.writeSync(b, OFF_AUTOCLEAR);
      file.syncSync(true);
    }

    // The backing chain, each parent checked against the identity recorded at creation.
    const seen = [...(opts.seen ?? []), realpathOr(p)];
    if (h.backingFile !== undefined && !opts.noBacking) {
      const resolved = resolveBacking(p, h.backingFile);
      this.backingPath = resolved;
      this.backing = openBacking(p, resolved, h.backingFormat, seen, opts);
      try {
        if (!h.guard) this.guardState = 'unrecorded';
        else {
          const changes = compareGuard(h.guard, this.backing.file);
          if (changes.length === 0) this.guardState = 'ok';
          else if (opts.ignoreParentGuard) this.guardState = `changed: ${changes.join('; ')}`;
          else throw parentChangedError(p, resolved, changes);
        }
      } catch (e) {
        this.backing.close();
        throw e;
      }
    } else if (h.backingFile !== undefined) {
      this.backingPath = resolveBacking(p, h.backingFile);
    }
  }

  private unsupported(what: string): DisksnapError {
    return new DisksnapError(`${this.path}: uses ${what}, which disksnap does not support`, 'EUNSUPPORTED', undefined, this.path);
  }

  private addMetaRange(offset: number, length: number): void {
    if (length <= 0) return;
    const first = Math.floor(offset / this.clusterSize);
    const last = Math.floor((offset + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) this.metaClusters.add(c);
  }

  private reftableEntryOffset(i: number): number {
    const hi = this.reftable.readUInt32BE(i * 8);
    const lo = this.reftable.readUInt32BE(i * 8 + 4);
    return hi * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
  }

  // ---------------------------------------------------------------------------------------
  // Reading

  readSync(buf: Uint8Array, offset: number): void {
    this.checkOpen();
    checkRange(this, offset, buf.length);
    this.readAt(asBuffer(buf), 0, buf.length, offset);
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    this.checkOpen();
    checkRange(this, offset, buf.length);
    const b = asBuffer(buf);
    if (buf.length < 256 * 1024) {
      this.readAt(b, 0, buf.length, offset);
      return;
    }
    // Large reads: allocated data of this layer goes to the thread pool in one batch; the
    // rest (zeros, backing, compressed) is filled here.
    const reqs: number[] = [];
    this.readAt(b, 0, buf.length, offset, reqs);
    if (reqs.length) {
      this.inflight++;
      try {
        await this.file.readBatch(b, Float64Array.from(reqs));
      } finally {
        this.inflight--;
      }
    }
  }

  readBatchSync(buf: Uint8Array, requests: Float64Array): void {
    this.checkOpen();
    for (let i = 0; i < requests.length; i += 3) {
      checkRange(this, requests[i], requests[i + 2]);
      if (requests[i + 1] < 0 || requests[i + 1] + requests[i + 2] > buf.length) throw invalid(`batch request ${i / 3} does not fit in the buffer`, this.path);
    }
    const b = asBuffer(buf);
    const reqs: number[] = [];
    for (let i = 0; i < requests.length; i += 3) this.readAt(b, requests[i + 1], requests[i + 2], requests[i], reqs);
    if (reqs.length) this.file.readBatchSync(b, Float64Array.from(reqs));
  }

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
        while (n < len && idx + 1 < maxIdx && (t.readUInt32BE(idx * 8 + 12) & LO_ZERO) && !(t.readUInt32BE(idx * 8 + 8) & HI_COMPRESSED)) {
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
          let next = host + cs;
          while (n < len && idx + 1 < maxIdx) {
            const h2 = t.readUInt32BE(idx * 8 + 8);
            const l2 = t.readUInt32BE(idx * 8 + 12);
            if (h2 & HI_COMPRESSED || (l2 & LO_ZERO && this.zeroFlag) || entryOffset(h2, l2) !== next) break;
            idx++;
            next += cs;
            n = Math.min(len, n + cs);
          }
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

  private readBacking(buf: Buffer, bufOff: number, n: number, guest: number): void {
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
      data = inflateRawSync(raw, { finishFlush: 2 /* Z_SYNC_FLUSH: trailing bytes are allowed */, maxOutputLength: this.clusterSize });
    } catch (e) {
      // The stream may be followed by padding; zlib reports that as an error only when the
      // output is short.
      throw corrupt(this.path, `compressed cluster for guest offset ${guestCluster} at ${d.offset} does not inflate: ${(e as Error).message}`);
    }
    if (data.length < this.clusterSize) {
      const full = Buffer.alloc(this.clusterSize);
      data.copy(full);
      data = full;
    }
    this.compressedCache = { offset: d.offset, data };
    return data;
  }

  // ---------------------------------------------------------------------------------------
  // L2 tables

  private l2ForRead(l1i: number): CachedTable | undefined {
    if (l1i === this.lastL1i) return this.lastL2;
    const hi = this.l1.readUInt32BE(l1i * 8);
    const lo = this.l1.readUInt32BE(l1i * 8 + 4);
    const off = entryOffset(hi, lo);
    if (off === 0) return undefined;
    const t = this.loadL2(l1i, off);
    this.lastL1i = l1i;
    this.lastL2 = t;
    return t;
  }

  private loadL2(l1i: number, off: number): CachedTable {
    const cached = this.l2Cache.get(off);
    if (cached) return cached;
    this.makeRoom(this.l2Cache, true);
    const buf = Buffer.alloc(this.clusterSize);
    this.file.readFullSync(buf, off);
    this.validateL2(l1i, buf);
    const e = { offset: off, buf, dirty: false };
    this.l2Cache.insert(e);
    return e;
  }

  /** Every entry of an L2 table read from the file must point inside the file and at no metadata. */
  private validateL2(l1i: number, t: Buffer): void {
    const cs = this.clusterSize;
    const n = 1 << this.l2Bits;
    for (let i = 0; i < n; i++) {
      const hi = t.readUInt32BE(i * 8);
      const lo = t.readUInt32BE(i * 8 + 4);
      if (hi === 0 && lo === 0) continue;
      const guest = l1i * this.l2Span + i * cs;
      if (hi & HI_COMPRESSED) {
        const d = compressedDescriptor(hi, lo, this.clusterBits);
        if (d.offset >= this.fileSize) {
          throw corrupt(this.path, `L2 entry for guest offset ${guest} points to compressed data at ${d.offset}, past the end of the file (${this.fileSize} bytes)`);
        }
        continue;
      }
      const off = entryOffset(hi, lo);
      if (off === 0) continue;
      if ((lo & 0x1fe) !== 0 || (hi & 0x3f000000) !== 0) {
        throw corrupt(this.path, `L2 entry for guest offset ${guest} is 0x${(hi >>> 0).toString(16)}${(lo >>> 0).toString(16).padStart(8, '0')}: reserved bits set`);
      }
      if (off >= this.fileSize) {
        throw corrupt(this.path, `L2 entry for guest offset ${guest} points to ${off}, past the end of the file (${this.fileSize} bytes)`);
      }
      if (this.metaClusters.has(off / cs)) {
        throw corrupt(this.path, `L2 entry for guest offset ${guest} points to ${off}, which holds metadata (overlapping metadata)`);
      }
    }
  }

  /** The L2 table for writing, allocated (zeroed: everything falls through) when missing. */
  private l2ForWrite(l1i: number): CachedTable {
    if (l1i === this.lastL1i && this.lastL2 !== undefined) return this.lastL2;
    const hi = this.l1.readUInt32BE(l1i * 8);
    const lo = this.l1.readUInt32BE(l1i * 8 + 4);
    const off = entryOffset(hi, lo);
    let t: CachedTable;
    if (off === 0) {
      const host = this.allocClusters(1);
      this.metaClusters.add(host / this.clusterSize);
      this.makeRoom(this.l2Cache, true);
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

  /** Evicts the least recently used table if the cache is full, writing it back first if dirty. */
  private makeRoom(cache: TableCache, isL2: boolean): void {
    const v = cache.victim();
    if (v === undefined) return;
    if (v.dirty) {
      if (isL2) {
        // An L2 table may reach the file only after the refcounts it relies on and the data
        // it points to: write those first (one barrier), then the table.
        this.writeRefcounts();
        this.barrier(L2);
        this.file.writeSync(v.buf, v.offset);
        this.noteWrite(v.offset, v.buf.length, L2);
      } else {
        this.barrier(REFBLOCK);
        this.file.writeSync(v.buf, v.offset);
        this.noteWrite(v.offset, v.buf.length, REFBLOCK);
      }
      v.dirty = false;
    }
    cache.delete(v.offset);
    this.lastL1i = -1;
    this.lastL2 = undefined;
  }

  // ---------------------------------------------------------------------------------------
  // Writing

  private checkOpen(): void {
    if (this.closed) throw new DisksnapError(`${this.path}: image is closed`, 'EBADF', 9, this.path);
  }

  private checkWritable(): void {
    this.checkOpen();
    if (!this.writable) throw new DisksnapError(`${this.path}: image is open read-only`, 'EBADF', 9, this.path);
  }

  writeSync(buf: Uint8Array, offset: number): void {
    this.checkWritable();
    checkRange(this, offset, buf.length);
    this.writeAt(asBuffer(buf), 0, buf.length, offset);
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    this.writeSync(buf, offset);
  }

  writeBatchSync(buf: Uint8Array, requests: Float64Array): void {
    this.checkWritable();
    for (let i = 0; i < requests.length; i += 3) {
      checkRange(this, requests[i], requests[i + 2]);
      if (requests[i + 1] < 0 || requests[i + 1] + requests[i + 2] > buf.length) throw invalid(`batch request ${i / 3} does not fit in the buffer`, this.path);
    }
    const b = asBuffer(buf);
    // Requests that land inside clusters this image owns go out in one native batch;
    // anything that allocates runs in order after the batch gathered so far.
    let reqs: number[] = [];
    const cs = this.clusterSize;
    for (let i = 0; i < requests.length; i += 3) {
      const guest = requests[i];
      const bo = requests[i + 1];
      const len = requests[i + 2];
      const host = len > 0 && Math.floor(guest / cs) === Math.floor((guest + len - 1) / cs) ? this.inPlaceHost(guest) : -1;
      if (host >= 0) {
        reqs.push(host, bo, len);
        this.noteWriteLazy(host + len);
      } else {
        if (reqs.length) {
          this.file.writeBatchSync(b, Float64Array.from(reqs));
          reqs = [];
        }
        this.writeAt(b, bo, len, guest);
      }
    }
    if (reqs.length) this.file.writeBatchSync(b, Float64Array.from(reqs));
    if (reqs.length || requests.length) this.unsynced |= DATA;
  }

  /** Host offset of guest byte `guest` if its cluster can be written in place, else -1. */
  private inPlaceHost(guest: number): number {
    const l1i = Math.floor(guest / this.l2Span);
    let t: CachedTable | undefined;
    if (l1i === this.lastL1i) t = this.lastL2;
    else {
      const hi = this.l1.readUInt32BE(l1i * 8);
      const lo = this.l1.readUInt32BE(l1i * 8 + 4);
      if (!(hi & HI_COPIED)) return -1;
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

  private noteWriteLazy(end: number): void {
    if (end > this.fileSize) this.fileSize = end;
  }

  private noteWrite(offset: number, len: number, layer: number): void {
    if (offset + len > this.fileSize) this.fileSize = offset + len;
    this.unsynced |= layer;
  }

  /** Writes guest [guest, guest+len) from buf[bufOff..]. */
  private writeAt(buf: Buffer, bufOff: number, len: number, guest: number): void {
    const cs = this.clusterSize;
    while (len > 0) {
      const l1i = Math.floor(guest / this.l2Span);
      const inTable = guest - l1i * this.l2Span;
      const table = this.l2ForWrite(l1i);
      const t = table.buf;
      const idx = Math.floor(inTable / cs);
      const inCluster = inTable - idx * cs;
      const maxIdx = 1 << this.l2Bits;
      const hi = t.readUInt32BE(idx * 8);
      const lo = t.readUInt32BE(idx * 8 + 4);
      const host = entryOffset(hi, lo);
      if (copiedStandard(hi) && !(lo & LO_ZERO && this.zeroFlag) && host !== 0) {
        // In place, over as many host-contiguous owned clusters as the write covers.
        let n = Math.min(len, cs - inCluster);
        let k = idx;
        let next = host + cs;
        while (n < len && k + 1 < maxIdx) {
          const h2 = t.readUInt32BE(k * 8 + 8);
          const l2 = t.readUInt32BE(k * 8 + 12);
          if (!copiedStandard(h2) || (l2 & LO_ZERO && this.zeroFlag) || entryOffset(h2, l2) !== next) break;
          k++;
          next += cs;
          n = Math.min(len, n + cs);
        }
        this.file.writeSync(buf.subarray(bufOff, bufOff + n), host + inCluster);
        this.noteWrite(host + inCluster, n, DATA);
        bufOff += n;
        guest += n;
        len -= n;
        continue;
      }
      // Allocation: the run of clusters from idx that need a new cluster, within this table.
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
      if (runBytes <= SCRATCH_MAX) {
        if (this.scratch.length < runBytes) this.scratch = Buffer.alloc(Math.max(runBytes, this.scratch.length * 2));
        const s = this.scratch;
        if (inCluster > 0) this.readOld(t, idx, clusterGuest, s, 0, inCluster, 0);
        buf.copy(s, inCluster, bufOff, bufOff + n);
        if (tailStart < runBytes) {
          this.readOld(t, lastIdx, clusterGuest + (k - 1) * cs, s, tailStart, runBytes - tailStart, tailStart - (k - 1) * cs);
        }
        this.file.writeSync(s.subarray(0, runBytes), newHost);
      } else {
        if (inCluster > 0) {
          const head = Buffer.alloc(inCluster);
          this.readOld(t, idx, clusterGuest, head, 0, inCluster, 0);
          this.file.writeSync(head, newHost);
        }
        this.file.writeSync(buf.subarray(bufOff, bufOff + n), newHost + inCluster);
        if (tailStart < runBytes) {
          const tail = Buffer.alloc(runBytes - tailStart);
          this.readOld(t, lastIdx, clusterGuest + (k - 1) * cs, tail, 0, runBytes - tailStart, tailStart - (k - 1) * cs);
          this.file.writeSync(tail, newHost + tailStart);
        }
      }
      this.noteWrite(newHost, runBytes, DATA);
      for (let i = 0; i < k; i++) {
        this.dropReference(t, idx + i);
        writeEntry(t, (idx + i) * 8, newHost + i * cs, HI_COPIED);
      }
      table.dirty = true;
      bufOff += n;
      guest += n;
      len -= n;
    }
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

  writeZeroesSync(offset: number, length: number): void {
    this.checkWritable();
    checkRange(this, offset, length);
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
      const hi = this.l1.readUInt32BE(l1i * 8);
      const lo = this.l1.readUInt32BE(l1i * 8 + 4);
      if (entryOffset(hi, lo) === 0 && this.backing === undefined) {
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

  /** Same as writeZeroesSync: discarded ranges read as zeros and give their clusters back. */
  discardSync(offset: number, length: number): void {
    this.writeZeroesSync(offset, length);
  }

  private zeroPartial(pos: number, n: number): void {
    const cur = Buffer.alloc(n);
    this.readAt(cur, 0, n, pos);
    if (isAllZero(cur)) return;
    cur.fill(0);
    this.writeAt(cur, 0, n, pos);
  }

  // ---------------------------------------------------------------------------------------
  // Refcounts and allocation

  private refblock(rbi: number, create: boolean): CachedTable | undefined {
    if (rbi >= this.reftableEntries) return undefined;
    const off = this.reftableEntryOffset(rbi);
    if (off === 0) return undefined;
    const cached = this.rbCache.get(off);
    if (cached) return cached;
    if (!create && off >= this.fileSize) return undefined;
    this.makeRoom(this.rbCache, false);
    const buf = Buffer.alloc(this.clusterSize);
    this.file.readFullSync(buf, off);
    const e = { offset: off, buf, dirty: false };
    this.rbCache.insert(e);
    return e;
  }

  private refcountOf(c: number): number {
    const rb = this.refblock(Math.floor(c / 2 ** this.rbBits), false);
    if (rb === undefined) return 0;
    return getRefcount(rb.buf, c % 2 ** this.rbBits, this.order);
  }

  private setRefcountOf(c: number, value: number): void {
    const rbi = Math.floor(c / 2 ** this.rbBits);
    const rb = this.refblock(rbi, true);
    if (rb === undefined) throw new Error(`internal: no refcount block for cluster ${c}`);
    if (value > maxRefcount(this.order)) throw corrupt(this.path, `refcount of cluster ${c} would overflow ${this.order}-order refcounts`);
    setRefcount(rb.buf, c % 2 ** this.rbBits, this.order, value);
    rb.dirty = true;
  }

  /** Allocates `k` contiguous free clusters (refcount 1 each); returns the host offset. */
  private allocClusters(k: number): number {
    const cs = this.clusterSize;
    const perBlock = 2 ** this.rbBits;
    for (let attempt = 0; ; attempt++) {
      if (attempt > 64) throw new Error('internal: cluster allocation does not converge');
      // 1. find k free clusters from the hint
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
          const blockEnd = (rbi + 1) * perBlock;
          const take = Math.min(k - run, blockEnd - c);
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
      // 2. make sure refcount blocks exist for the range (placing missing ones inside it)
      let restart = false;
      const firstBlock = Math.floor(start / perBlock);
      const lastBlock = Math.floor((start + k - 1) / perBlock);
      for (let rbi = firstBlock; rbi <= lastBlock && !restart; rbi++) {
        if (rbi >= this.reftableEntries) {
          this.growReftable(rbi + 1);
          restart = true;
        } else if (this.reftableEntryOffset(rbi) === 0) {
          const at = Math.max(start, rbi * perBlock);
          this.newRefblock(rbi, at);
          restart = true;
        }
      }
      if (restart) continue;
      // 3. take them
      for (let i = 0; i < k; i++) this.setRefcountOf(start + i, 1);
      // the hint moves past what we took, or stays at a smaller free hole we skipped
      this.freeHint = firstFree === start ? start + k : firstFree;
      if (start + k > this.allocEnd) this.allocEnd = start + k;
      return start * cs;
    }
  }

  /** A new, empty refcount block for index rbi, stored at cluster `at` (inside its own range). */
  private newRefblock(rbi: number, at: number): void {
    const cs = this.clusterSize;
    this.makeRoom(this.rbCache, false);
    const e: CachedTable = { offset: at * cs, buf: Buffer.alloc(cs), dirty: true };
    setRefcount(e.buf, at - rbi * 2 ** this.rbBits, this.order, 1);
    this.rbCache.insert(e);
    writeEntry(this.reftable, rbi * 8, at * cs, 0);
    this.reftableDirty.add(rbi);
    this.metaClusters.add(at);
    if (at + 1 > this.allocEnd) this.allocEnd = at + 1;
  }

  /**
   * Moves the refcount table to a larger one at the end of the file, with the new refcount
   * blocks it needs to describe itself, then switches the header and frees the old table.
   */
  private growReftable(minEntries: number): void {
    const cs = this.clusterSize;
    const perCluster = cs / 8;
    const perBlock = 2 ** this.rbBits;
    let entries = Math.ceil(Math.max(minEntries, this.reftableEntries * 2) / perCluster) * perCluster;
    let c = Math.max(this.allocEnd, Math.ceil(this.fileSize / cs));
    let needed: number[] = [];
    for (let guard = 0; ; guard++) {
      if (guard > 1000) throw new Error('internal: refcount table growth does not converge');
      const tableClusters = entries / perCluster;
      let nb = 0;
      for (;;) {
        needed = [];
        const end = c + tableClusters + nb;
        for (let rbi = Math.floor(c / perBlock); rbi <= Math.floor((end - 1) / perBlock); rbi++) {
          if (rbi >= this.reftableEntries || this.reftableEntryOffset(rbi) === 0) needed.push(rbi);
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
      break;
    }
    const tableClusters = entries / perCluster;
    if (entries * 8 > 8 * 2 ** 20) throw this.unsupported('a refcount table larger than 8 MiB (the image is too large for its cluster size)');
    const newTable = Buffer.alloc(entries * 8);
    this.reftable.copy(newTable, 0, 0, this.reftableEntries * 8);
    // new blocks, in the cache (dirty) and in the new table
    const blockAt = new Map<number, number>();
    needed.forEach((rbi, j) => blockAt.set(rbi, c + tableClusters + j));
    for (const [rbi, at] of blockAt) {
      this.makeRoom(this.rbCache, false);
      this.rbCache.insert({ offset: at * cs, buf: Buffer.alloc(cs), dirty: true });
      writeEntry(newTable, rbi * 8, at * cs, 0);
    }
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
    this.barrier(REFTABLE);
    this.file.writeSync(newTable, c * cs);
    this.noteWrite(c * cs, newTable.length, REFTABLE);
    this.reftableDirty.clear();
    this.barrier(HEADER);
    const hb = Buffer.alloc(12);
    writeEntry(hb, 0, c * cs, 0);
    hb.writeUInt32BE(tableClusters, 8);
    this.file.writeSync(hb, OFF_REFCOUNT_TABLE_OFFSET);
    this.noteWrite(OFF_REFCOUNT_TABLE_OFFSET, 12, HEADER);
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

  // ---------------------------------------------------------------------------------------
  // Flushing

  /** fdatasync before a write of `layer` if a layer it depends on was written since the last one. */
  private barrier(layer: number): void {
    if (this.unsynced & REQUIRES[layer]) {
      this.file.syncSync(true);
      this.unsynced = 0;
    }
  }

  private writeRefcountBlocks(): void {
    for (const e of this.rbCache.dirty()) {
      this.barrier(REFBLOCK);
      this.file.writeSync(e.buf, e.offset);
      this.noteWrite(e.offset, e.buf.length, REFBLOCK);
      e.dirty = false;
    }
  }

  /** Dirty refcount blocks, then (after a barrier) dirty refcount table entries. */
  private writeRefcounts(): void {
    this.writeRefcountBlocks();
    if (this.reftableDirty.size) {
      this.barrier(REFTABLE);
      this.writeDirtyEntries(this.reftable, this.reftableDirty, this.reftableOffset, REFTABLE);
    }
  }

  /** Writes the 512-byte pieces of a table that hold dirty entries. */
  private writeDirtyEntries(table: Buffer, dirty: Set<number>, fileOffset: number, layer: number): void {
    const pieces = [...new Set([...dirty].map((i) => Math.floor(i / 64)))].sort((a, b) => a - b);
    for (const p of pieces) {
      const from = p * 512;
      const to = Math.min(table.length, from + 512);
      this.file.writeSync(table.subarray(from, to), fileOffset + from);
      this.noteWrite(fileOffset + from, to - from, layer);
    }
    dirty.clear();
  }

  /** Writes every dirty table in dependency order; durable only after the final fdatasync. */
  private writeMetadata(): void {
    this.writeRefcounts();
    const l2s = this.l2Cache.dirty();
    for (const e of l2s) {
      this.barrier(L2);
      this.file.writeSync(e.buf, e.offset);
      this.noteWrite(e.offset, e.buf.length, L2);
      e.dirty = false;
    }
    if (this.l1Dirty.size) {
      this.barrier(L1);
      this.writeDirtyEntries(this.l1, this.l1Dirty, this.header.l1TableOffset, L1);
    }
    if (this.pendingFrees.size && this.inflight === 0) {
      // The entries that dropped these references are written; once they are durable the
      // refcounts may go down and the clusters be reused.
      this.barrier(FREES);
      const freed: number[] = [];
      for (const [c, n] of this.pendingFrees) {
        const now = this.refcountOf(c);
        const next = Math.max(0, now - n);
        this.setRefcountOf(c, next);
        if (next === 0) freed.push(c);
      }
      this.pendingFrees.clear();
      for (const e of this.rbCache.dirty()) {
        this.file.writeSync(e.buf, e.offset);
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
          // giving space back is best effort (not every filesystem can punch holes)
        }
        if (freed[i] < this.freeHint) this.freeHint = freed[i];
        i = j;
      }
    }
  }

  flushSync(): void {
    this.checkOpen();
    if (!this.writable) return;
    this.writeMetadata();
    if (this.unsynced) {
      this.file.syncSync(true);
      this.unsynced = 0;
    }
  }

  async flush(): Promise<void> {
    this.checkOpen();
    if (!this.writable) return;
    this.writeMetadata();
    if (this.unsynced) {
      this.unsynced = 0;
      await this.file.sync(true);
    }
  }

  close(): void {
    if (this.closed) return;
    try {
      if (this.writable) this.flushSync();
    } finally {
      this.closed = true;
      this.file.close();
      this.backing?.close();
    }
  }

  // ---------------------------------------------------------------------------------------
  // Map and info

  map(): MapExtent[] {
    this.checkOpen();
    const out: MapExtent[] = [];
    this.mapRange(0, this.virtualSize, 0, out);
    return coalesce(out);
  }

  mapRange(offset: number, length: number, depth: number, out: MapExtent[]): void {
    const cs = this.clusterSize;
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const l1i = Math.floor(pos / this.l2Span);
      const tableEnd = Math.min(end, (l1i + 1) * this.l2Span);
      const table = this.l2ForRead(l1i);
      if (table === undefined) {
        this.mapBacking(pos, tableEnd - pos, depth, out);
        pos = tableEnd;
        continue;
      }
      while (pos < tableEnd) {
        const idx = Math.floor((pos - l1i * this.l2Span) / cs);
        const n = Math.min(tableEnd, (Math.floor(pos / cs) + 1) * cs) - pos;
        const hi = table.buf.readUInt32BE(idx * 8);
        const lo = table.buf.readUInt32BE(idx * 8 + 4);
        if (hi & HI_COMPRESSED) out.push({ offset: pos, length: n, kind: 'data', depth, file: this.path });
        else if (lo & LO_ZERO && this.zeroFlag) out.push({ offset: pos, length: n, kind: 'zero', depth });
        else {
          const host = entryOffset(hi, lo);
          if (host === 0) this.mapBacking(pos, n, depth, out);
          else out.push({ offset: pos, length: n, kind: 'data', depth, file: this.path, hostOffset: host + (pos % cs) });
        }
        pos += n;
      }
    }
  }

  private mapBacking(pos: number, n: number, depth: number, out: MapExtent[]): void {
    const b = this.backing;
    if (b === undefined || pos >= b.virtualSize) {
      out.push({ offset: pos, length: n, kind: 'zero', depth });
      return;
    }
    const part = Math.min(n, b.virtualSize - pos);
    b.mapRange(pos, part, depth + 1, out);
    if (part < n) out.push({ offset: pos + part, length: n - part, kind: 'zero', depth: depth + 1 });
  }

  private layerInfo(): LayerInfo {
    const st = this.file.stat();
    const info: LayerInfo = {
      path: this.path,
      format: 'qcow2',
      virtualSize: this.virtualSize,
      allocatedBytes: st.allocated,
      clusterSize: this.clusterSize,
    };
    if (this.header.backingFile !== undefined) {
      info.backing = this.backingPath;
      info.parentGuard = this.guardState ?? 'unchecked';
    }
    return info;
  }

  chainInfo(): LayerInfo[] {
    return [this.layerInfo(), ...(this.backing?.chainInfo() ?? [])];
  }

  info(chain = false): ImageInfo {
    this.checkOpen();
    const me: ImageInfo = this.layerInfo();
    if (chain) me.chain = this.chainInfo();
    return me;
  }

  /**
   * Guest extents this layer stores itself (allocated data, compressed or not, and zero
   * clusters), in guest order: what a commit must carry into the parent.
   */
  *ownExtents(): Generator<{ offset: number; length: number; kind: 'data' | 'zero'; hostOffset?: number }> {
    const cs = this.clusterSize;
    let cur: { offset: number; length: number; kind: 'data' | 'zero'; hostOffset?: number } | undefined;
    for (let l1i = 0; l1i < this.header.l1Size; l1i++) {
      const table = this.l2ForRead(l1i);
      if (table === undefined) continue;
      const n = 1 << this.l2Bits;
      for (let idx = 0; idx < n; idx++) {
        const guest = l1i * this.l2Span + idx * cs;
        if (guest >= this.virtualSize) break;
        const len = Math.min(cs, this.virtualSize - guest);
        const hi = table.buf.readUInt32BE(idx * 8);
        const lo = table.buf.readUInt32BE(idx * 8 + 4);
        let kind: 'data' | 'zero' | undefined;
        let host: number | undefined;
        if (hi & HI_COMPRESSED) kind = 'data';
        else if (lo & LO_ZERO && this.zeroFlag) kind = 'zero';
        else {
          const h = entryOffset(hi, lo);
          if (h !== 0) {
            kind = 'data';
            host = h;
          }
        }
        if (kind === undefined) continue;
        if (
          cur &&
          cur.kind === kind &&
          cur.offset + cur.length === guest &&
          (kind === 'zero' || (host !== undefined && cur.hostOffset !== undefined && cur.hostOffset + cur.length === host))
        ) {
          cur.length += len;
          continue;
        }
        if (cur) yield cur;
        cur = { offset: guest, length: len, kind, hostOffset: host };
      }
    }
    if (cur) yield cur;
  }
}

function coalesce(list: MapExtent[]): MapExtent[] {
  const out: MapExtent[] = [];
  for (const e of list) {
    const p = out[out.length - 1];
    if (
      p &&
      p.kind === e.kind &&
      p.depth === e.depth &&
      p.file === e.file &&
      p.offset + p.length === e.offset &&
      ((p.hostOffset === undefined && e.hostOffset === undefined) || (p.hostOffset !== undefined && e.hostOffset !== undefined && p.hostOffset + p.length === e.hostOffset))
    ) {
      p.length += e.length;
    } else out.push({ ...e });
  }
  return out;
}

/**
 * True when a high word has COPIED set and COMPRESSED clear: a cluster this image owns alone
 * (written in place). Compared as `hi >>> 30` because `&` on bit 31 yields a negative number.
 */
function copiedStandard(hi: number): boolean {
  return hi >>> 30 === 2;
}

function asBuffer(b: Uint8Array): Buffer {
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}

function isAllZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

function openBacking(child: string, backing: string, format: string | undefined, seen: string[], opts: Qcow2OpenOptions): BackingLayer {
  let real: string;
  try {
    real = fs.realpathSync(backing);
  } catch {
    throw new DisksnapError(`${child}: its backing file ${backing} does not exist`, 'ENOENT', 2, backing);
  }
  if (seen.includes(real)) {
    throw corrupt(child, `the backing chain loops: ${[...seen, real].join(' -> ')}`);
  }
  if (seen.length >= MAX_CHAIN_DEPTH) throw corrupt(child, `the backing chain is deeper than ${MAX_CHAIN_DEPTH} layers`);
  let fmt = format;
  if (fmt === undefined) {
    const f = BlockFile.open(backing, { lock: 'none' });
    try {
      const head = Buffer.alloc(4);
      fmt = f.readSync(head, 0) === 4 && head.readUInt32BE(0) === QCOW2_MAGIC ? 'qcow2' : 'raw';
    } finally {
      f.close();
    }
  }
  if (fmt === 'raw') return new RawLayer(backing);
  if (fmt === 'qcow2') {
    return Qcow2Image.open(backing, {
      write: false,
      ignoreParentGuard: opts.ignoreParentGuard,
      seen,
      l2CacheEntries: opts.l2CacheEntries,
      refcountCacheEntries: opts.refcountCacheEntries,
    });
  }
  throw new DisksnapError(`${child}: backing file ${backing} has format '${fmt}'; disksnap reads raw and qcow2 backing files`, 'EUNSUPPORTED', undefined, child);
}
