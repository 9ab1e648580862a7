/**
 * The format table: which implementation opens a file, decided from its content (never from
 * its name). Raw files and qcow2 images (with their backing chains) are the formats known.
 */
import { BlockFile } from '../engine/file';
import { QCOW2_MAGIC, parseHeader } from './qcow2/format';
import { readHeaderCluster } from './qcow2/header';
import { Qcow2Image } from './qcow2/image';
import { RawImage } from './raw';
import type { DiskImage, ImageFormat, ImageOpenOptions } from './view';

/** Detects the format from the first bytes of the file's content (never from its name). */
export function detectFormat(path: string): ImageFormat {
  const f = BlockFile.open(path, { lock: 'none' });
  try {
    const head = Buffer.alloc(4);
    const n = f.readSync(head, 0);
    if (n === 4 && head.readUInt32BE(0) === QCOW2_MAGIC) return 'qcow2';
    return 'raw';
  } finally {
    f.close();
  }
}

/**
 * The size a guest sees of the open image `file` of `fileSize` bytes: a qcow2 header's
 * virtual size, else `fileSize` (a raw file or device). A bad qcow2 header is an error that
 * names the field.
 */
export function guestSizeOf(file: BlockFile, fileSize: number): number {
  const head = Buffer.alloc(4);
  if (file.readSync(head, 0) !== 4 || head.readUInt32BE(0) !== QCOW2_MAGIC) return fileSize;
  return parseHeader(file.path, readHeaderCluster(file, fileSize), fileSize).size;
}

export function openImage(path: string, opts: ImageOpenOptions = {}): DiskImage {
  const format = detectFormat(path);
  if (format === 'qcow2') {
    // a qcow2 file and its backing chain; every parent checked against its guard
    return Qcow2Image.open(path, opts);
  }
  return RawImage.open(path, opts);
}
