/**
 * Raw images: the guest view is the file itself, byte for byte. Holes read as zeros;
 * `writeZeroesSync` punches holes so that zeroed ranges give their space back.
 */
import { BlockFile } from '../engine/file';
import { writeAtomically } from '../engine/atomic';
import { invalid } from '../engine/errors';
import { assertNoChildren } from './children';
import { checkRange, DiskImage, ImageInfo, ImageOpenOptions, MapExtent } from './view';

export class RawImage implements DiskImage {
  readonly format = 'raw' as const;
  readonly path: string;
  readonly virtualSize: number;
  readonly writable: boolean;
  readonly file: BlockFile;

  private constructor(file: BlockFile, size: number) {
    this.file = file;
    this.path = file.path;
    this.writable = file.writable;
    this.virtualSize = size;
  }

  static open(path: string, opts: ImageOpenOptions = {}): RawImage {
    if (opts.write) assertNoChildren(path);
    const file = BlockFile.open(path, { write: opts.write, direct: opts.direct, lock: opts.write ? 'exclusive' : opts.readLock });
    return new RawImage(file, file.size());
  }

  readSync(buf: Uint8Array, offset: number): void {
    checkRange(this, offset, buf.length);
    this.file.readFullSync(buf, offset);
  }

  writeSync(buf: Uint8Array, offset: number): void {
    checkRange(this, offset, buf.length);
    this.file.writeSync(buf, offset);
  }

  async read(buf: Uint8Array, offset: number): Promise<void> {
    checkRange(this, offset, buf.length);
    const n = await this.file.read(buf, offset);
    if (n < buf.length) buf.fill(0, n);
  }

  async write(buf: Uint8Array, offset: number): Promise<void> {
    checkRange(this, offset, buf.length);
    await this.file.write(buf, offset);
  }

  readBatchSync(buf: Uint8Array, requests: Float64Array): void {
    this.checkBatch(requests);
    this.file.readBatchSync(buf, requests);
  }

  async readBatch(buf: Uint8Array, requests: Float64Array): Promise<void> {
    this.checkBatch(requests);
    await this.file.readBatch(buf, requests);
  }

  async readBatchWith<T>(buf: Uint8Array, requests: Float64Array, io: (fd: number, host: Float64Array) => Promise<T>): Promise<T> {
    this.checkBatch(requests);
    return io(this.file.fd, requests);
  }

  writeBatchSync(buf: Uint8Array, requests: Float64Array): void {
    this.checkBatch(requests);
    this.file.writeBatchSync(buf, requests);
  }

  writeZeroesSync(offset: number, length: number): void {
    checkRange(this, offset, length);
    if (length > 0) this.file.punchHoleSync(offset, length);
  }

  flushSync(): void {
    this.file.syncSync(true);
  }

  flush(): Promise<void> {
    return this.file.sync(true);
  }

  map(): MapExtent[] {
    const out: MapExtent[] = [];
    let pos = 0;
    for (const e of this.file.extents(0, this.virtualSize)) {
      if (e.offset > pos) out.push({ offset: pos, length: e.offset - pos, kind: 'zero', depth: 0 });
      out.push({ offset: e.offset, length: e.length, kind: 'data', depth: 0, file: this.path, hostOffset: e.offset });
      pos = e.offset + e.length;
    }
    if (pos < this.virtualSize) out.push({ offset: pos, length: this.virtualSize - pos, kind: 'zero', depth: 0 });
    return out;
  }

  info(chain = false): ImageInfo {
    const st = this.file.stat();
    const layer = { path: this.path, format: this.format, virtualSize: this.virtualSize, allocatedBytes: st.allocated };
    return chain ? { ...layer, chain: [layer] } : layer;
  }

  close(): void {
    this.file.close();
  }

  private checkBatch(requests: Float64Array): void {
    for (let i = 0; i < requests.length; i += 3) checkRange(this, requests[i], requests[i + 2]);
  }
}

/** Creates a sparse raw image of `size` bytes (temporary name, then rename). */
export async function createRawImage(path: string, size: number, opts: { force?: boolean } = {}): Promise<void> {
  if (!Number.isSafeInteger(size) || size <= 0) throw invalid(`image size ${size} must be a positive number of bytes`, path);
  await writeAtomically(path, { force: opts.force, sync: true }, (tmp) => {
    const f = BlockFile.open(tmp, { create: true, exclusive: true });
    try {
      f.truncateSync(size);
    } finally {
      f.close();
    }
  });
}
