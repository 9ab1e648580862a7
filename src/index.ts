/**
 * disksnap's public API. The CLI (src/cli/) is a thin layer over these calls.
 */
export { DisksnapError, isDisksnapError } from './engine/errors';
export { BlockFile } from './engine/file';
export type { OpenOptions, LockMode, Extent } from './engine/file';
export { openImage, detectFormat, checkRange } from './image';
export type { DiskImage, ImageFormat, ImageInfo, LayerInfo, MapExtent, ImageOpenOptions } from './image';
export { RawImage, createRawImage } from './image/raw';
export { runBench } from './image/bench';
export type { BenchOptions, BenchResult } from './image/bench';
export { parseSize, formatSize } from './engine/size';

/** Differencing disks: qcow2 children over read-only parents (createChild, rollback, reset, commit, flatten, check). */
export * as diff from './differencing';
/** Storage snapshots: the EBS-style block store (createSnapshot, restoreSnapshot, diffSnapshots, gc, ...). */
export * as snapshots from './storage';
/** Loopback: attach/detach, FUSE views of children, freeze and point-in-time views of mounted volumes. */
export * as loop from './host';
/** qemu-img's --output=json documents (info, map, check, measure), computed by disksnap. */
export * as qemu from './image/qemu';
/** The two strategies measured side by side on one image. */
export * as comparison from './compare';
