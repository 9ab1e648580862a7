/**
 * disksnap's public API. The CLI (src/cli/) is a thin layer over these calls.
 */
export { DisksnapError, isDisksnapError } from './errors';
export { BlockFile } from './file';
export type { OpenOptions, LockMode, Extent } from './file';
export { openImage, detectFormat, checkRange } from './image';
export type { DiskImage, ImageFormat, ImageInfo, LayerInfo, MapExtent, ImageOpenOptions } from './image';
export { RawImage, createRawImage } from './raw';
export { runBench } from './bench';
export type { BenchOptions, BenchResult } from './bench';
export { parseSize, formatSize } from './size';

/** Differencing disks: qcow2 children over read-only parents (createChild, rollback, reset, commit, flatten, check). */
export * as diff from './diff';
/** Storage snapshots: the EBS-style block store (createSnapshot, restoreSnapshot, diffSnapshots, gc, ...). */
export * as snapshots from './snapshot';
/** Loopback: attach/detach, FUSE views of children, freeze and point-in-time views of mounted volumes. */
export * as loop from './loop';
/** The two strategies measured side by side on one image. */
export * as comparison from './compare';
