/**
 * Format-neutral view of a disk image: the interface every format implements. Every format
 * disksnap understands (raw, qcow2 and chains of qcow2 children) is opened through
 * `openImage` (open.ts) and used through `DiskImage`, so that `read`, `write`, `map`, `info`
 * and `bench` work the same on all of them.
 *
 * Offsets are guest (virtual) offsets. Every range must lie inside [0, virtualSize): the
 * caller (CLI or library user) gets EINVALID before any I/O otherwise.
 */
import { BlockFile } from '../engine/file';
import { DisksnapError, invalid } from '../engine/errors';

export type ImageFormat = 'raw' | 'qcow2';

export interface MapExtent {
  /** guest offset */
  offset: number;
  length: number;
  /** data: bytes stored somewhere in the chain; zero: reads as zero (hole or zero cluster) */
  kind: 'data' | 'zero';
  /**
   * layer that answers for the bytes: 0 = the image itself, 1 = its backing file, ...; for a
   * range no layer stores, the lowest layer that looked (past the end of a shorter backing
   * file: the layer above it), as qemu-img map's depth
   */
  depth: number;
  /** file that provides the bytes (absent for zero extents with no provider) */
  file?: string;
  /** offset in that file, where the format knows it */
  hostOffset?: number;
}

export interface LayerInfo {
  path: string;
  format: ImageFormat;
  virtualSize: number;
  /** bytes the file occupies on disk */
  allocatedBytes: number;
  /** for qcow2 */
  clusterSize?: number;
  backing?: string;
  /** the parent guard of a child: 'ok' | 'changed: <what>' | 'unrecorded' (made by another tool) */
  parentGuard?: string;
}

export interface ImageInfo extends LayerInfo {
  /** with chain: the image first, then each backing layer */
  chain?: LayerInfo[];
  /** where the image is attached (loop device, mountpoints), when it is */
  attached?: {
    device: string;
    via: string;
    readOnly: boolean;
    mountpoints: string[];
  };
}

export interface DiskImage {
  readonly path: string;
  readonly format: ImageFormat;
  readonly virtualSize: number;
  readonly writable: boolean;
  /** reads exactly buf.length bytes at a guest offset */
  readSync(buf: Uint8Array, offset: number): void;
  writeSync(buf: Uint8Array, offset: number): void;
  read(buf: Uint8Array, offset: number): Promise<void>;
  write(buf: Uint8Array, offset: number): Promise<void>;
  /** triples [guestOffset, bufferOffset, length], executed in order as one batch */
  readBatchSync(buf: Uint8Array, requests: Float64Array): void;
  /** readBatchSync with the file reads on the thread pool (in parallel), off the event loop */
  readBatch(buf: Uint8Array, requests: Float64Array): Promise<void>;
  /**
   * readBatch with the reads of the image's own file left to `io`: the rest (zeros, backing
   * layers, compressed clusters) is filled here, then `io(fd, host)` must read `host`
   * ([fileOffset, bufferOffset, length] triples, maybe none) from `fd` into buf. For a read and
   * a hash in one pool job (native hashBlocksAsync's `reads`, src/storage/dirty.ts).
   */
  readBatchWith<T>(buf: Uint8Array, requests: Float64Array, io: (fd: number, host: Float64Array) => Promise<T>): Promise<T>;
  writeBatchSync(buf: Uint8Array, requests: Float64Array): void;
  /** make a range read as zeros, releasing space where the format allows */
  writeZeroesSync(offset: number, length: number): void;
  flushSync(): void;
  flush(): Promise<void>;
  /** guest extents in order, covering [0, virtualSize) */
  map(): MapExtent[];
  info(chain?: boolean): ImageInfo;
  close(): void;
}

export interface ImageOpenOptions {
  write?: boolean;
  /** O_DIRECT on the image files */
  direct?: boolean;
  /** for qcow2: accept a parent whose recorded identity differs (rebase -u style) */
  ignoreParentGuard?: boolean;
  /**
   * Lock of a read-only open: 'shared' (default) refuses an image another process is
   * writing; 'none' reads it anyway, for `info` on an image in use (like `qemu-img -U`).
   */
  readLock?: 'shared' | 'none';
}

/** Throws EINVALID unless [offset, offset+length) lies within the image. */
export function checkRange(image: { path: string; virtualSize: number }, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0) throw invalid(`offset ${offset} is not a non-negative integer`, image.path);
  if (!Number.isSafeInteger(length) || length < 0) throw invalid(`length ${length} is not a non-negative integer`, image.path);
  if (offset + length > image.virtualSize) {
    throw invalid(
      `range ${offset}+${length} ends past the end of ${image.path} (virtual size ${image.virtualSize})`,
      image.path,
    );
  }
}
