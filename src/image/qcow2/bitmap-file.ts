/**
 * Persistent bitmaps of a qcow2 file that no other process is writing (the file is locked
 * as QEMU locks it): list, read, add, clear, remove, as `qemu-img bitmap` does.
 *
 * FileBitmapHost is the smallest allocator that keeps refcounts right for the few clusters
 * bitmaps need: new clusters come from the end of the file; a missing refcount block is
 * placed at the start of the run it describes (it counts itself), written and synced
 * before the refcount table entry that points to it. Refcount changes are written through
 * (one 512-byte piece of a block each). It does not grow the refcount table: an image whose
 * table is full is refused (EUNSUPPORTED) — with 64 KiB clusters one table cluster covers
 * 16 TiB of file. Guest writes go through Qcow2Image, which hosts the bitmaps itself.
 */
import { BlockFile } from '../../engine/file';
import { corrupt, DisksnapError } from '../../engine/errors';
import { getRefcount, INCOMPAT_DIRTY, parseHeader, Qcow2Header, setRefcount } from './format';
import { readHeaderCluster } from './header';
import { BitmapEntry, DirtyRange } from './bitmaps';
import { AddBitmapOptions, BitmapHost, PersistentBitmaps } from './bitmap-writer';

export class FileBitmapHost implements BitmapHost {
  readonly path: string;
  readonly clusterSize: number;
  readonly virtualSize: number;
  readonly header: Qcow2Header;
  private readonly reftable: Buffer;
  private readonly perBlock: number;
  private readonly blocks = new Map<number, { offset: number; buf: Buffer }>();
  /** first cluster index past everything written or allocated */
  private end: number;
  /**
   * Whether this host wrote since its last sync. A sync with nothing new is skipped: on the
   * journal-less ext4 of the test VMs every fdatasync flushes the device's cache even when
   * the file has nothing dirty (a device flush each: ~0.2 ms on a quiet disk, ~1 ms beside
   * another writer), and a bitmap removal followed by its caller's own sync made two in a row.
   */
  private unsynced = false;

  constructor(readonly file: BlockFile) {
    this.path = file.path;
    const size = file.size();
    const h = parseHeader(file.path, readHeaderCluster(file, size), size);
    this.header = h;
    this.clusterSize = h.clusterSize;
    this.virtualSize = h.size;
    this.perBlock = 2 ** (h.clusterBits + 3 - h.refcountOrder);
    this.end = Math.ceil(size / h.clusterSize);
    this.reftable = Buffer.alloc(h.refcountTableClusters * h.clusterSize);
    const avail = Math.max(0, Math.min(this.reftable.length, size - h.refcountTableOffset));
    file.readFullSync(this.reftable.subarray(0, avail), h.refcountTableOffset);
    if (file.writable) {
      if (h.incompatible & INCOMPAT_DIRTY) {
        throw new DisksnapError(`${this.path}: the dirty bit is set (refcounts may be stale); repair it with qemu-img check -r all first`, 'EUNSUPPORTED', undefined, this.path);
      }
      if (h.version < 3) throw new DisksnapError(`${this.path}: persistent bitmaps need a qcow2 version 3 image (this one is version ${h.version})`, 'EUNSUPPORTED', undefined, this.path);
    }
  }

  fileSize(): number {
    return Math.max(this.file.size(), this.end * this.clusterSize);
  }

  read(buf: Buffer, hostOffset: number): void {
    this.file.readFullSync(buf, hostOffset);
  }

  write(buf: Buffer, hostOffset: number): void {
    this.unsynced = true;
    this.file.writeSync(buf, hostOffset);
    const c = Math.ceil((hostOffset + buf.length) / this.clusterSize);
    if (c > this.end) this.end = c;
  }

  sync(): void {
    if (!this.unsynced) return;
    this.file.syncSync(true);
    this.unsynced = false;
  }

  private blockOffset(rbi: number): number {
    if (rbi >= this.reftable.length / 8) return -1;
    const hi = this.reftable.readUInt32BE(rbi * 8);
    const lo = this.reftable.readUInt32BE(rbi * 8 + 4);
    return hi * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
  }

  private block(rbi: number): { offset: number; buf: Buffer } | undefined {
    const cached = this.blocks.get(rbi);
    if (cached) return cached;
    const off = this.blockOffset(rbi);
    if (off <= 0) return undefined;
    if (off % this.clusterSize !== 0) throw corrupt(this.path, `refcount table entry ${rbi} is ${off}: not cluster aligned`);
    const buf = Buffer.alloc(this.clusterSize);
    this.file.readFullSync(buf, off);
    const b = { offset: off, buf };
    this.blocks.set(rbi, b);
    return b;
  }

  refcountOf(cluster: number): number {
    const b = this.block(Math.floor(cluster / this.perBlock));
    return b ? getRefcount(b.buf, cluster % this.perBlock, this.header.refcountOrder) : 0;
  }

  setRefcount(hostOffset: number, value: number): void {
    const c = hostOffset / this.clusterSize;
    const rbi = Math.floor(c / this.perBlock);
    const b = this.block(rbi);
    if (!b) {
      if (value === 0) return;
      throw new Error(`internal: no refcount block for cluster ${c}`);
    }
    const idx = c % this.perBlock;
    setRefcount(b.buf, idx, this.header.refcountOrder, value);
    const byte = Math.floor((idx * 2 ** this.header.refcountOrder) / 8);
    const piece = Math.floor(byte / 512) * 512;
    this.unsynced = true;
    this.file.writeSync(b.buf.subarray(piece, piece + 512), b.offset + piece);
  }

  allocate(count: number): number {
    let c = this.end;
    for (let guard = 0; ; guard++) {
      if (guard > 1000) throw new Error('internal: bitmap cluster allocation does not converge');
      let moved = false;
      for (let x = c; x < c + count; x++) {
        const rbi = Math.floor(x / this.perBlock);
        if (this.blockOffset(rbi) < 0) {
          throw new DisksnapError(`${this.path}: the refcount table is full; disksnap's bitmap writer does not grow it (open the image with qemu-img first)`, 'EUNSUPPORTED', undefined, this.path);
        }
        if (this.blockOffset(rbi) === 0) {
          this.newBlock(rbi, c);
          c++;
          moved = true;
          break;
        }
        if (this.refcountOf(x) !== 0) {
          c = x + 1;
          moved = true;
          break;
        }
      }
      if (!moved) break;
    }
    for (let x = c; x < c + count; x++) this.setRefcount(x * this.clusterSize, 1);
    if (c + count > this.end) this.end = c + count;
    return c * this.clusterSize;
  }

  /** A refcount block for index rbi at cluster `at` (inside its own range, or counted by an existing block). */
  private newBlock(rbi: number, at: number): void {
    const cs = this.clusterSize;
    const buf = Buffer.alloc(cs);
    const own = Math.floor(at / this.perBlock) === rbi;
    if (own) setRefcount(buf, at % this.perBlock, this.header.refcountOrder, 1);
    this.unsynced = true;
    this.file.writeSync(buf, at * cs);
    if (!own) this.setRefcount(at * cs, 1);
    this.sync();
    const e = Buffer.alloc(8);
    e.writeUInt32BE(Math.floor((at * cs) / 0x100000000), 0);
    e.writeUInt32BE((at * cs) % 0x100000000, 4);
    e.copy(this.reftable, rbi * 8);
    this.unsynced = true;
    this.file.writeSync(e, this.header.refcountTableOffset + rbi * 8);
    this.sync();
    this.blocks.set(rbi, { offset: at * cs, buf });
    if (at + 1 > this.end) this.end = at + 1;
  }
}

/** Opens a file's bitmaps; `write` takes the exclusive lock (ELOCKED while QEMU runs on it). */
function withBitmaps<T>(path: string, write: boolean, fn: (b: PersistentBitmaps, host: FileBitmapHost) => T): T {
  const file = BlockFile.open(path, write ? { write: true } : { lock: 'shared' });
  try {
    const host = new FileBitmapHost(file);
    const bitmaps = PersistentBitmaps.open(host, host.header);
    const out = fn(bitmaps, host);
    if (write) host.sync();
    return out;
  } finally {
    file.close();
  }
}

export interface BitmapInfo {
  name: string;
  granularity: number;
  /** enabled: writes set its bits */
  auto: boolean;
  /** not saved since its last change (or its writer crashed): its bits cannot be trusted */
  inUse: boolean;
}

export interface BitmapsInfo {
  /** 'stale': a program lacking bitmap support wrote the image; every bitmap is inconsistent */
  state: 'none' | 'stale' | 'consistent';
  bitmaps: BitmapInfo[];
}

function info(e: BitmapEntry): BitmapInfo {
  return { name: e.name, granularity: e.granularity, auto: e.auto, inUse: e.inUse };
}

export function listBitmaps(path: string): BitmapsInfo {
  return withBitmaps(path, false, (b) => ({ state: b.state, bitmaps: b.list().map(info) }));
}

/** The dirty guest ranges of a bitmap; EINCONSISTENT when it is in use or the extension is stale. */
export function readBitmap(path: string, name: string): DirtyRange[] {
  return withBitmaps(path, false, (b) => {
    if (b.state === 'stale') {
      throw new DisksnapError(`${path}: its bitmaps are inconsistent (autoclear bit 0 was cleared by a program lacking bitmap support)`, 'EINCONSISTENT', undefined, path);
    }
    return b.dirtyRanges(name);
  });
}

export function addBitmap(path: string, name: string, opts: AddBitmapOptions = {}): BitmapInfo {
  return withBitmaps(path, true, (b) => info(b.add(name, opts)));
}

export function clearBitmap(path: string, name: string): void {
  withBitmaps(path, true, (b) => b.clear(name));
}

export function removeBitmap(path: string, name: string): void {
  withBitmaps(path, true, (b) => b.remove(name));
}

/** Marks guest ranges dirty in every enabled bitmap, as a write would (for tools and tests). */
export function markBitmaps(path: string, ranges: DirtyRange[]): void {
  withBitmaps(path, true, (b) => {
    b.startWriting();
    for (const r of ranges) b.markDirty(r.offset, r.length);
    b.flush();
  });
}
