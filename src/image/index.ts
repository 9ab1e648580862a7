/**
 * The image layer: the format-neutral guest view of a disk image (view.ts), the format table
 * that opens one (open.ts), raw files (raw.ts), qcow2 images and chains (qcow2/), the parent
 * lock every writable open consults (children.ts, sidecars.ts) and the request-pattern
 * benchmark (bench.ts). Nothing here knows about loop devices, stores or strategies.
 */
export { checkRange } from './view';
export type { DiskImage, ImageFormat, ImageInfo, LayerInfo, MapExtent, ImageOpenOptions } from './view';
export { detectFormat, guestSizeOf, openImage } from './open';
export { RawImage, createRawImage } from './raw';
export { runBench } from './bench';
export type { BenchOptions, BenchResult } from './bench';
