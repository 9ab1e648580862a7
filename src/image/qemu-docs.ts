/**
 * The shapes of the documents `qemu-img ... --output=json` prints, which disksnap prints key
 * for key with `--output json` (qemu-info.ts, qemu-map.ts, qemu-measure.ts build them as
 * plain QemuJson objects in qemu-img's key order). Types only: they are the source of the
 * JSON Schemas in schemas/ (qemu-info, qemu-info-chain, qemu-map, qemu-check, qemu-measure),
 * which the CLI tests check every such document against. Names and meanings are QEMU's
 * (qapi/block-core.json: ImageInfo, ImageCheck, MapEntry, BlockMeasureInfo) as of QEMU 7.2.
 */
import type { QemuMapEntry } from './qemu-map';

/** A bitmap of a qcow2 image (Qcow2BitmapInfo). */
export interface QemuBitmapInfo {
  name: string;
  /** @minimum 1 */
  granularity: number;
  flags: Array<'in-use' | 'auto'>;
}

/** An internal snapshot (SnapshotInfo). */
export interface QemuSnapshotInfo {
  id: string;
  name: string;
  'vm-state-size': number;
  'date-sec': number;
  'date-nsec': number;
  'vm-clock-sec': number;
  'vm-clock-nsec': number;
  icount?: number;
}

/** ImageInfoSpecificQCow2 */
export interface QemuQcow2Specific {
  compat: '0.10' | '1.1';
  'compression-type': 'zlib' | 'zstd';
  'lazy-refcounts'?: boolean;
  bitmaps?: QemuBitmapInfo[];
  'refcount-bits': number;
  corrupt?: boolean;
  'extended-l2'?: boolean;
}

/** `qemu-img info --output=json FILE` (ImageInfo) */
export interface QemuImageInfo {
  filename: string;
  format: 'raw' | 'qcow2';
  /** @minimum 0 */
  'virtual-size': number;
  /**
   * bytes the file takes on its filesystem
   * @minimum 0
   */
  'actual-size': number;
  'dirty-flag': boolean;
  'cluster-size'?: number;
  'format-specific'?: { type: 'qcow2'; data: QemuQcow2Specific };
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  snapshots?: QemuSnapshotInfo[];
}

/** `qemu-img info --backing-chain --output=json FILE`: the image first, then each backing file */
export type QemuImageInfoChain = QemuImageInfo[];

/** `qemu-img map --output=json FILE` */
export type QemuMap = QemuMapEntry[];

/** `qemu-img check --output=json FILE` (ImageCheck; counts that are 0 are left out, as qemu-img does) */
export interface QemuImageCheck {
  filename: string;
  format: string;
  'check-errors': number;
  'image-end-offset'?: number;
  'total-clusters'?: number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  'compressed-clusters'?: number;
  corruptions?: number;
  leaks?: number;
  'corruptions-fixed'?: number;
  'leaks-fixed'?: number;
}

/** `qemu-img measure --output=json` (BlockMeasureInfo) */
export interface QemuMeasure {
  required: number;
  'fully-allocated': number;
  bitmaps?: number;
}
