/**
 * `BlockFile`: an open file or block device, as the rest of disksnap sees it. A thin,
 * typed wrapper over the native handle (src/engine/native.ts): it owns the descriptor, the lock,
 * and the path that every error names, and refuses use after close.
 *
 * Reads and writes come in three forms: synchronous (for tight loops on the page cache,
 * where a thread-pool hop costs more than the syscall), asynchronous (off the event loop),
 * and batched (many requests in one native call).
 */
import {
  native,
  NativeStat,
  OPEN_CREATE,
  OPEN_DIRECT,
  OPEN_EXCL,
  OPEN_TRUNC,
  OPEN_WRITE,
  LOCK_EXCLUSIVE,
  LOCK_NONE,
  LOCK_SHARED,
  FALLOC_PUNCH_HOLE,
  FALLOC_ZERO_RANGE,
} from './native';
import { DisksnapError } from './errors';

export type LockMode = 'none' | 'shared' | 'exclusive';

export interface OpenOptions {
  /** open read-write (default read-only) */
  write?: boolean;
  /** create if missing (implies write) */
  create?: boolean;
  /** with create: fail with EEXIST if it exists */
  exclusive?: boolean;
  /** with create: truncate an existing file */
  truncate?: boolean;
  /** O_DIRECT */
  direct?: boolean;
  /** file mode for create (default 0o644) */
  mode?: number;
  /**
   * Lock to take right after opening. Default: 'exclusive' for write, 'shared' for read.
   * A conflicting lock throws ELOCKED and closes the file.
   */
  lock?: LockMode;
}

export interface Extent {
  offset: number;
  length: number;
}

export class BlockFile {
  readonly path: string;
  readonly writable: boolean;
  private fdValue: number;
  private lockMode: LockMode = 'none';

  private constructor(path: string, fd: number, writable: boolean) {
    this.path = path;
    this.fdValue = fd;
    this.writable = writable;
  }

  static open(path: string, opts: OpenOptions = {}): BlockFile {
    const n = native();
    const write = !!(opts.write || opts.create);
    let flags = write ? OPEN_WRITE : 0;
    if (opts.create) flags |= OPEN_CREATE;
    if (opts.exclusive) flags |= OPEN_EXCL;
    if (opts.truncate) flags |= OPEN_TRUNC;
    if (opts.direct) flags |= OPEN_DIRECT;
    const fd = n.open(path, flags, opts.mode ?? 0o644);
    const file = new BlockFile(path, fd, write);
    const lock = opts.lock ?? (write ? 'exclusive' : 'shared');
    try {
      file.setLock(lock);
    } catch (e) {
      n.close(fd);
      file.fdValue = -1;
      throw e;
    }
    return file;
  }

  get fd(): number {
    if (this.fdValue < 0) throw new DisksnapError(`${this.path}: file is closed`, 'EBADF', 9, this.path);
    return this.fdValue;
  }

  get closed(): boolean {
    return this.fdValue < 0;
  }

  get lock(): LockMode {
    return this.lockMode;
  }

  setLock(mode: LockMode): void {
    const m = mode === 'exclusive' ? LOCK_EXCLUSIVE : mode === 'shared' ? LOCK_SHARED : LOCK_NONE;
    native().lock(this.fd, m, this.path);
    this.lockMode = mode;
  }

  stat(): NativeStat {
    return native().fstat(this.fd);
  }

  size(): number {
    return native().fstat(this.fd).size;
  }

  /** Reads into buf at offset; returns bytes read (short only at end of file). */
  readSync(buf: Uint8Array, offset: number): number {
    return native().pread(this.fd, buf, offset);
  }

  /** Reads exactly buf.length bytes, zero-filling past end of file. */
  readFullSync(buf: Uint8Array, offset: number): void {
    const n = native().pread(this.fd, buf, offset);
    if (n < buf.length) buf.fill(0, n);
  }

  writeSync(buf: Uint8Array, offset: number): void {
    native().pwrite(this.fd, buf, offset);
  }

  read(buf: Uint8Array, offset: number): Promise<number> {
    return native().preadAsync(this.fd, buf, offset);
  }

  write(buf: Uint8Array, offset: number): Promise<void> {
    return native().pwriteAsync(this.fd, buf, offset);
  }

  /** requests: triples [fileOffset, bufferOffset, length]; past EOF reads as zeros. */
  readBatchSync(buf: Uint8Array, requests: Float64Array): number {
    return native().preadBatch(this.fd, buf, requests);
  }

  writeBatchSync(buf: Uint8Array, requests: Float64Array): void {
    native().pwriteBatch(this.fd, buf, requests);
  }

  readBatch(buf: Uint8Array, requests: Float64Array): Promise<number> {
    return native().preadBatchAsync(this.fd, buf, requests);
  }

  writeBatch(buf: Uint8Array, requests: Float64Array): Promise<void> {
    return native().pwriteBatchAsync(this.fd, buf, requests);
  }

  syncSync(dataOnly = false): void {
    native().fsync(this.fd, dataOnly);
  }

  sync(dataOnly = false): Promise<void> {
    return native().fsyncAsync(this.fd, dataOnly);
  }

  truncateSync(size: number): void {
    native().ftruncate(this.fd, size);
  }

  punchHoleSync(offset: number, length: number): void {
    native().fallocate(this.fd, FALLOC_PUNCH_HOLE, offset, length);
  }

  zeroRangeSync(offset: number, length: number): void {
    native().fallocate(this.fd, FALLOC_ZERO_RANGE, offset, length);
  }

  /** Data extents within [offset, offset+length) (whole file by default). */
  extents(offset = 0, length?: number): Extent[] {
    const len = length ?? Math.max(0, this.size() - offset);
    const pairs = native().extents(this.fd, offset, len);
    const out: Extent[] = [];
    for (let i = 0; i + 1 < pairs.length; i += 2) out.push({ offset: pairs[i], length: pairs[i + 1] });
    return out;
  }

  close(): void {
    if (this.fdValue < 0) return;
    const fd = this.fdValue;
    this.fdValue = -1;
    this.lockMode = 'none';
    native().close(fd);
  }
}
