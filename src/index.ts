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
