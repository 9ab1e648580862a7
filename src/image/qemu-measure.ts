/**
 * `disksnap measure`: qemu-img measure for the formats disksnap writes (QEMU 7.2:
 * block/raw-format.c raw_measure, block/qcow2.c qcow2_measure and qcow2_calc_prealloc_size,
 * block/qcow2-bitmap.c qcow2_get_persistent_dirty_bitmap_size): the bytes a new image would
 * need to hold FILE's guest view (or an empty disk of SIZE), as a raw file or as a qcow2
 * image without a backing file (version 3, 16-bit refcounts, no extended L2, the given
 * cluster size).
 *
 *   required         what the file needs as written now: every metadata cluster of a fully
 *                    allocated image (QEMU overestimates the same way), plus every cluster
 *                    that holds data somewhere in FILE's chain (zero clusters and holes are
 *                    skipped); the whole size for raw
 *   fully-allocated  the same with every cluster allocated
 *   bitmaps          qcow2 target and a qcow2 (v3) FILE: room for FILE's persistent bitmaps
 */
import { invalid } from '../engine/errors';
import { Qcow2Image } from './qcow2/image';
import { dirEntrySize } from './qcow2/bitmaps';
import { bitmapsOf, QemuJson } from './qemu-info';
import { openLayer, qemuLength, qemuMapEntries } from './qemu-map';

export interface MeasureOptions {
  /** image whose guest view is measured (its whole chain) */
  file?: string;
  /** or: the virtual size of an empty image */
  size?: number;
  /** format of the new image (qemu-img's -O; default raw) */
  target?: 'raw' | 'qcow2';
  /** qcow2 cluster size of the new image (default 64 KiB) */
  clusterSize?: number;
}

/** QEMU's limit on an L1 table (QCOW_MAX_L1_SIZE). */
const MAX_L1_BYTES = 32 * 2 ** 20;

export function measure(o: MeasureOptions): QemuJson {
  if ((o.file === undefined) === (o.size === undefined)) throw invalid('measure needs either a file or --size, not both');
  const target = o.target ?? 'raw';
  if (target === 'raw') {
    const required = o.file !== undefined ? withImage(o.file, (l) => qemuLength(l)) : Math.ceil(o.size! / 512) * 512;
    return { required, 'fully-allocated': required };
  }
  const cs = o.clusterSize ?? 65536;
  const roundUp = (n: number): number => Math.ceil(n / cs) * cs;
  let virtualSize = roundUp(o.size ?? 0);
  if (Math.ceil(virtualSize / cs / (cs / 8)) * 8 > MAX_L1_BYTES) {
    throw invalid(`the image size is too large for ${cs}-byte clusters (try a larger cluster size)`);
  }
  let required = 0;
  let bitmaps: number | undefined;
  if (o.file !== undefined) {
    withImage(o.file, (top) => {
      const ssize = qemuLength(top);
      virtualSize = roundUp(ssize);
      required = dataClusters(top, ssize, cs);
      if (top instanceof Qcow2Image && top.header.version >= 3) bitmaps = bitmapBytes(top, ssize, cs);
    });
  }
  const fully = preallocSize(virtualSize, cs, 4);
  const out: QemuJson = {};
  if (bitmaps !== undefined) out.bitmaps = bitmaps;
  out.required = fully - virtualSize + required;
  out['fully-allocated'] = fully;
  return out;
}

function withImage<T>(file: string, fn: (l: ReturnType<typeof openLayer>) => T): T {
  const l = openLayer(file);
  try {
    return fn(l);
  } finally {
    l.close();
  }
}

/**
 * qcow2_measure's walk: a data run counts from the start of its first cluster to the end of its
 * last, and the walk resumes at that cluster end (whatever lies in between is not looked at).
 */
function dataClusters(top: ReturnType<typeof openLayer>, ssize: number, cs: number): number {
  const entries = qemuMapEntries(top);
  let required = 0;
  let offset = 0;
  let i = 0;
  while (offset < ssize) {
    while (entries[i].start + entries[i].length <= offset) i++;
    const e = entries[i];
    const end = e.start + e.length;
    if (e.zero || !e.data) {
      offset = end;
      continue;
    }
    const pnum = Math.ceil(end / cs) * cs - offset;
    required += (offset % cs) + pnum;
    offset += pnum;
  }
  return required;
}

/** qcow2_get_persistent_dirty_bitmap_size: each bitmap's data and table as if fully allocated, plus the directory. */
function bitmapBytes(top: Qcow2Image, ssize: number, cs: number): number {
  let size = 0;
  let dir = 0;
  for (const b of bitmapsOf(top.path, top.file, top.header, top.file.size())) {
    const bytes = Math.ceil(Math.ceil(ssize / b.granularity) / 8);
    const clusters = Math.ceil(bytes / cs);
    size += clusters * cs + Math.ceil((clusters * 8) / cs) * cs;
    dir += dirEntrySize(Buffer.byteLength(b.name), 0);
  }
  return size + Math.ceil(dir / cs) * cs;
}

/** qcow2_calc_prealloc_size: header, L2 tables, L1 table, refcount metadata and data of a fully allocated image. */
export function preallocSize(totalSize: number, cs: number, refcountOrder: number): number {
  const aligned = Math.ceil(totalSize / cs) * cs;
  let meta = cs; // header
  const perL2 = cs / 8;
  const nl2e = Math.ceil(aligned / cs / perL2) * perL2;
  meta += nl2e * 8;
  const nl1e = Math.ceil((nl2e * 8) / cs / (cs / 8)) * (cs / 8);
  meta += nl1e * 8;
  meta += refcountMetadataSize((meta + aligned) / cs, cs, refcountOrder);
  return meta + aligned;
}

/** qcow2_refcount_metadata_size (generous_increase false): the fixed point of blocks and table clusters. */
function refcountMetadataSize(clusters: number, cs: number, refcountOrder: number): number {
  const blocksPerTableCluster = cs / 8;
  const refcountsPerBlock = (cs * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / refcountsPerBlock);
    table = Math.ceil(blocks / blocksPerTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * cs;
}
