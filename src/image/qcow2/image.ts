/**
 * Qcow2Image: a qcow2 file (v2 or v3) and its backing chain, as a DiskImage.
 *
 * The format is split by concern, as QEMU splits block/qcow2*.c:
 *   format.ts     on-disk layouts, feature bits, entry decoding (qcow2.h)
 *   header.ts     reading cluster 0, resolving the backing file name
 *   metadata.ts   the one metadata walker (open and check both use it)
 *   refcounts.ts  refcounts, allocation, refcount-table growth, and the write ordering that
 *                 keeps the file crash-safe (the REQUIRES table)      (qcow2-refcount.c)
 *   clusters.ts   L1/L2 lookup, copy-on-write, zero clusters         (qcow2-cluster.c)
 *   cache.ts      the bounded table cache                            (qcow2-cache.c)
 *   image.ts      open + validate, the backing chain, the DiskImage API, map and info (qcow2.c)
 *   check.ts      `diff check` (qemu-img check); create.ts: new images; encode.ts: header
 *                 clusters written (create, accept-parent, checkpoints, bitmaps)
 * The class is built in three layers: RefcountLayer <- ClusterLayer <- Qcow2Image.
 *
 * Deliberately left simple: writes run synchronously on the calling thread (the page cache
 * makes a 4 KiB pwrite a few microseconds; a thread-pool hop would cost more); the async
 * forms hand large reads of allocated data to the thread pool. No internal snapshots
 * (refused for writing), no lazy refcounts, no subclusters, no compression on write.
 */
import * as fs from 'node:fs';
import { BlockFile } from '../../engine/file';
import { corrupt, DisksnapError, fromNodeError, invalid, busy } from '../../engine/errors';
import { checkRange, DiskImage, ImageInfo, ImageOpenOptions, LayerInfo, MapExtent } from '../view';
import { AUTOCLEAR_BITMAPS, EXT_BITMAPS, INCOMPAT_DIRTY, MAX_CHAIN_DEPTH, parseHeader, Qcow2Header } from './format';
import { BitmapHost, PersistentBitmaps } from './bitmap-writer';
import { BackingLayer, OwnStatus, RawLayer } from './layer';
import { compare as compareGuard, parentChangedError } from './guard';
import { commitMarkerPath } from '../sidecars';
import { assertNoChildren } from '../children';
import { readHeaderCluster, realpathOr, resolveBacking } from './header';
import { decodeL2, Qcow2Tables, readTables, walkTables } from './metadata';
import { ClusterLayer } from './clusters';
import { probeBackingFormat } from './probe';
import { DATA } from './refcounts';

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

export type GuardState = 'ok' | 'unrecorded' | 'ignored' | `changed: ${string}`;

export class Qcow2Image extends ClusterLayer implements DiskImage, BackingLayer {
  readonly format = 'qcow2' as const;
  /** resolved path of the backing file, when there is one */
  readonly backingPath: string | undefined;
  readonly backing: BackingLayer | undefined;
  /** state of the parent guard at open */
  readonly guardState: GuardState | undefined;
  private closed = false;
  /** the enabled persistent bitmaps this writer maintains, when there are any */
  private bitmaps: PersistentBitmaps | undefined;

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
      const size = file.stat().size;
      const h = parseHeader(p, readHeaderCluster(file, size), size);
      if (file.writable) refuseWriting(p, h.nbSnapshots, h.incompatible, h.refcountOrder);
      return new Qcow2Image(p, file, readTables(file, h, size), opts);
    } catch (e) {
      file.close();
      throw e;
    }
  }

  private constructor(p: string, file: BlockFile, t: Qcow2Tables, opts: Qcow2OpenOptions) {
    super(p, file, t, opts);
    const h = t.header;
    this.markMetadata(t);
    if (this.writable && h.version >= 3) this.openBitmaps(h);
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

  /**
   * Persistent dirty bitmaps (bitmap-writer.ts): a consistent extension stays consistent
   * (every write marks the enabled bitmaps first; the autoclear bit stays set), and an
   * enabled bitmap that cannot be maintained refuses the open, naming it. Every other
   * autoclear bit is cleared, as a writer that does not maintain its feature must.
   */
  private openBitmaps(h: Qcow2Header): void {
    let keep = 0;
    if (h.autoclear & AUTOCLEAR_BITMAPS && h.extensions.some((e) => e.type === EXT_BITMAPS)) {
      const bitmaps = PersistentBitmaps.open(this.bitmapHost(), h);
      bitmaps.startWriting();
      if (bitmaps.tracking) this.bitmaps = bitmaps;
      keep = AUTOCLEAR_BITMAPS;
    }
    // the other bits are cleared before the first write (refcounts.ts firstWrite), so that
    // a write refused before it changes anything leaves the file as it was
    this.autoclearKeep = keep;
    this.autoclearPending = h.autoclear !== keep;
  }

  /** The file and the allocator, as the bitmap writer needs them. */
  private bitmapHost(): BitmapHost {
    const cs = this.clusterSize;
    return {
      path: this.path,
      clusterSize: cs,
      virtualSize: this.virtualSize,
      fileSize: () => Math.max(this.fileSize, this.allocEnd * cs),
      read: (b, o) => this.file.readFullSync(b, o),
      write: (b, o) => {
        this.file.writeSync(b, o);
        this.noteWrite(o, b.length, DATA);
      },
      allocate: (k) => this.allocClusters(k),
      setRefcount: (o, v) => this.setRefcountOf(o / cs, v),
      // bitmap data reaches the file before the table entries, and those before in_use is
      // cleared: each step is made durable with the refcounts of the clusters it uses
      sync: () => {
        this.writeRefcounts();
        this.file.syncSync(true);
        this.unsynced = 0;
      },
    };
  }

  /**
   * Walks the tables (metadata.ts) and records every metadata cluster; an entry that is
   * malformed, past the end of the file or on other metadata makes the image corrupt.
   */
  private markMetadata(t: Qcow2Tables): void {
    const cs = this.clusterSize;
    walkTables(t, {
      meta: (kind, offset, length, index) => {
        if (kind === 'refcount block' || kind === 'L2 table') {
          if (this.metaClusters.has(offset / cs)) {
            throw corrupt(
              this.path,
              kind === 'refcount block'
                ? `refcount table entry ${index} points to ${offset}, which overlaps other metadata`
                : `L1 entry ${index} points to an L2 table at ${offset}, which overlaps other metadata (header, L1, refcount table or block, or another L2 table)`,
            );
          }
        }
        this.addMetaRange(offset, length);
      },
      bad: (message) => {
        throw corrupt(this.path, message);
      },
    });
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
    this.checkBatch(buf, requests);
    const b = asBuffer(buf);
    const reqs: number[] = [];
    for (let i = 0; i < requests.length; i += 3) this.readAt(b, requests[i + 1], requests[i + 2], requests[i], reqs);
    if (reqs.length) this.file.readBatchSync(b, Float64Array.from(reqs));
  }

  async readBatch(buf: Uint8Array, requests: Float64Array): Promise<void> {
    await this.readBatchWith(buf, requests, async (_fd, host) => {
      if (host.length) await this.file.readBatch(buf, host);
    });
  }

  async readBatchWith<T>(buf: Uint8Array, requests: Float64Array, io: (fd: number, host: Float64Array) => Promise<T>): Promise<T> {
    this.checkOpen();
    this.checkBatch(buf, requests);
    const b = asBuffer(buf);
    const reqs: number[] = [];
    for (let i = 0; i < requests.length; i += 3) this.readAt(b, requests[i + 1], requests[i + 2], requests[i], reqs);
    this.inflight++;
    try {
      return await io(this.file.fd, Float64Array.from(reqs));
    } finally {
      this.inflight--;
    }
  }

  private checkBatch(buf: Uint8Array, requests: Float64Array): void {
    for (let i = 0; i < requests.length; i += 3) {
      checkRange(this, requests[i], requests[i + 2]);
      if (requests[i + 1] < 0 || requests[i + 1] + requests[i + 2] > buf.length) throw invalid(`batch request ${i / 3} does not fit in the buffer`, this.path);
    }
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
    this.bitmaps?.markDirty(offset, buf.length);
    this.writeAt(asBuffer(buf), 0, buf.length, offset);
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    this.writeSync(buf, offset);
  }

  writeBatchSync(buf: Uint8Array, requests: Float64Array): void {
    this.checkWritable();
    this.checkBatch(buf, requests);
    if (this.bitmaps) for (let i = 0; i < requests.length; i += 3) this.bitmaps.markDirty(requests[i], requests[i + 2]);
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
        this.firstWrite();
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

  writeZeroesSync(offset: number, length: number): void {
    this.checkWritable();
    checkRange(this, offset, length);
    this.bitmaps?.markDirty(offset, length);
    this.zeroRange(offset, length);
  }

  /** Same as writeZeroesSync: discarded ranges read as zeros and give their clusters back. */
  discardSync(offset: number, length: number): void {
    this.writeZeroesSync(offset, length);
  }

  // ---------------------------------------------------------------------------------------
  // Flushing

  flushSync(): void {
    this.checkOpen();
    if (!this.writable) return;
    this.writeMetadata();
    this.bitmaps?.flush();
    if (this.unsynced) {
      this.file.syncSync(true);
      this.unsynced = 0;
    }
  }

  async flush(): Promise<void> {
    this.checkOpen();
    if (!this.writable) return;
    this.writeMetadata();
    this.bitmaps?.flush();
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
        const ref = decodeL2(table.buf, idx, this.clusterBits, this.zeroFlag);
        if (ref.kind === 'compressed') out.push({ offset: pos, length: n, kind: 'data', depth, file: this.path });
        else if (ref.kind === 'zero') out.push({ offset: pos, length: n, kind: 'zero', depth });
        else if (ref.kind === 'unallocated') this.mapBacking(pos, n, depth, out);
        else out.push({ offset: pos, length: n, kind: 'data', depth, file: this.path, hostOffset: ref.offset + (pos % cs) });
        pos += n;
      }
    }
  }

  /**
   * This layer's own status, as QEMU's qcow2 driver reports it (qcow2_co_block_status): a
   * data cluster with its host offset, a compressed one without, a zero cluster (with the
   * host offset of a preallocated one), or unallocated. qemu-map.ts builds qemu-img's map on it.
   */
  ownStatus(offset: number, length: number, out: OwnStatus[]): void {
    const cs = this.clusterSize;
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const l1i = Math.floor(pos / this.l2Span);
      const tableEnd = Math.min(end, (l1i + 1) * this.l2Span);
      const table = this.l2ForRead(l1i);
      if (table === undefined) {
        out.push({ start: pos, length: tableEnd - pos, kind: 'unallocated' });
        pos = tableEnd;
        continue;
      }
      while (pos < tableEnd) {
        const idx = Math.floor((pos - l1i * this.l2Span) / cs);
        const n = Math.min(tableEnd, (Math.floor(pos / cs) + 1) * cs) - pos;
        const ref = decodeL2(table.buf, idx, this.clusterBits, this.zeroFlag);
        const host = ref.kind === 'compressed' || ref.offset === 0 ? undefined : ref.offset + (pos % cs);
        out.push({ start: pos, length: n, kind: ref.kind === 'compressed' ? 'data' : ref.kind, host });
        pos += n;
      }
    }
  }

  /**
   * QEMU's guess that the image was preallocated with metadata only (qcow2_detect_metadata_preallocation):
   * more clusters in use than the file has allocated blocks. QEMU then asks the file whether a
   * data cluster is a hole, and reports such clusters as zero.
   */
  metadataPreallocated(): boolean {
    const cs = this.clusterSize;
    const st = this.file.stat();
    const real = Math.floor(st.allocated / cs);
    const threshold = Math.max(Math.floor((real * 10) / 9), real + 2);
    const end = Math.ceil(st.size / cs);
    let used = 0;
    for (let c = 0; c < end && used < threshold; c++) if (this.refcountOf(c) > 0) used++;
    return used >= threshold;
  }

  private mapBacking(pos: number, n: number, depth: number, out: MapExtent[]): void {
    const b = this.backing;
    if (b === undefined || pos >= b.virtualSize) {
      out.push({ offset: pos, length: n, kind: 'zero', depth });
      return;
    }
    const part = Math.min(n, b.virtualSize - pos);
    b.mapRange(pos, part, depth + 1, out);
    // past the end of a shorter backing file: this layer answers "zeros", as qemu-img map says
    if (part < n) out.push({ offset: pos + part, length: n - part, kind: 'zero', depth });
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
        const ref = decodeL2(table.buf, idx, this.clusterBits, this.zeroFlag);
        if (ref.kind === 'unallocated') continue;
        const kind = ref.kind === 'zero' ? 'zero' : 'data';
        const host = ref.kind === 'data' ? ref.offset : undefined;
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

/** Refusals for writing, decided from the header before anything is read. */
function refuseWriting(p: string, nbSnapshots: number, incompatible: number, refcountOrder: number): void {
  const unsupported = (what: string) => new DisksnapError(`${p}: uses ${what}, which disksnap does not support`, 'EUNSUPPORTED', undefined, p);
  if (nbSnapshots > 0) throw unsupported(`internal snapshots (${nbSnapshots}); disksnap writes only images without them`);
  if (incompatible & INCOMPAT_DIRTY) {
    throw unsupported('the dirty bit (lazy refcounts left stale by an unclean shutdown); repair it with qemu-img check -r all first');
  }
  if (refcountOrder > 6) throw unsupported(`refcount_order ${refcountOrder}`);
}

function asBuffer(b: Uint8Array): Buffer {
  return Buffer.isBuffer(b) ? b : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
}

function openBacking(child: string, backing: string, format: string | undefined, seen: string[], opts: Qcow2OpenOptions): BackingLayer {
  let real: string;
  try {
    real = fs.realpathSync(backing);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== 'ENOENT' && code !== 'ENOTDIR') throw fromNodeError(e, backing);
    throw new DisksnapError(`${child}: its backing file ${backing} does not exist`, 'ENOENT', 2, backing);
  }
  if (seen.includes(real)) {
    throw corrupt(child, `the backing chain loops: ${[...seen, real].join(' -> ')}`);
  }
  if (seen.length >= MAX_CHAIN_DEPTH) throw corrupt(child, `the backing chain is deeper than ${MAX_CHAIN_DEPTH} layers`);
  const fmt = format ?? probeBackingFormat(child, backing);
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
