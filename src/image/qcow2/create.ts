/**
 * Creating an empty qcow2 v3 image, laid out as qemu-img does:
 *
 *   cluster 0          header, extensions, backing file name
 *   clusters 1..R      refcount table (sized for the image fully written, so that it rarely moves)
 *   next B clusters    refcount blocks describing the metadata clusters
 *   next L clusters    L1 table, all zero (nothing allocated: reads fall through to the parent)
 *
 * Every metadata cluster has refcount 1; the file ends at the end of the L1 table.
 */
import { BlockFile } from '../../engine/file';
import { invalid } from '../../engine/errors';
import { DEFAULT_CLUSTER_BITS, l1EntriesFor, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS, RawGuard, setRefcount, writeEntry, HeaderExtension } from './format';
import { encodeHeaderCluster } from './encode';

export interface CreateQcow2Options {
  size: number;
  /** bytes, a power of two from 512 to 2 MiB (default 64 KiB) */
  clusterSize?: number;
  /** backing file name as stored (relative names resolve against the child's directory) */
  backingFile?: string;
  backingFormat?: 'raw' | 'qcow2';
  guard?: RawGuard;
  otherExtensions?: HeaderExtension[];
}

export function clusterBitsOf(clusterSize: number): number {
  const bits = Math.log2(clusterSize);
  if (!Number.isInteger(bits) || bits < MIN_CLUSTER_BITS || bits > MAX_CLUSTER_BITS) {
    throw invalid(`cluster size ${clusterSize} must be a power of two from 512 bytes to 2 MiB`);
  }
  return bits;
}

/** Writes a new, empty image to `path`, which must not exist (O_EXCL). */
export function createQcow2(path: string, opts: CreateQcow2Options): void {
  const bits = opts.clusterSize === undefined ? DEFAULT_CLUSTER_BITS : clusterBitsOf(opts.clusterSize);
  const cs = 2 ** bits;
  const size = opts.size;
  if (!Number.isSafeInteger(size) || size <= 0 || size > MAX_VIRTUAL_SIZE) throw invalid(`virtual size ${size} must be 1 byte to 2^55 bytes`, path);
  const l1Size = l1EntriesFor(size, bits);
  if (l1Size * 8 > MAX_L1_BYTES) throw invalid(`virtual size ${size} needs an L1 table over 32 MiB with ${cs}-byte clusters; use larger clusters`, path);
  const l1Clusters = Math.max(1, Math.ceil((l1Size * 8) / cs));
  const perBlock = (cs * 8) / 16; // refcount_order 4
  const perTableCluster = cs / 8;

  // Size the refcount table for the image fully written: data + L2 tables + metadata.
  const dataClusters = Math.ceil(size / cs);
  let reftableClusters = 1;
  let blocks = 1;
  for (let i = 0; i < 8; i++) {
    const meta = 1 + reftableClusters + blocks + l1Clusters;
    blocks = Math.ceil(meta / perBlock);
    const full = meta + l1Size + dataClusters;
    const wanted = Math.ceil((Math.ceil((full * 1.05) / perBlock) + 1) / perTableCluster);
    reftableClusters = Math.max(1, Math.min(wanted, MAX_REFTABLE_BYTES / cs));
  }
  const metaClusters = 1 + reftableClusters + blocks + l1Clusters;
  if (Math.ceil(metaClusters / perBlock) > blocks) blocks = Math.ceil(metaClusters / perBlock);
  const total = 1 + reftableClusters + blocks + l1Clusters;
  if (blocks > reftableClusters * perTableCluster) throw invalid(`virtual size ${size} is too large for ${cs}-byte clusters`, path);

  const reftableOffset = cs;
  const blocksOffset = (1 + reftableClusters) * cs;
  const l1Offset = (1 + reftableClusters + blocks) * cs;

  const head = encodeHeaderCluster({
    clusterBits: bits,
    size,
    l1Size,
    l1TableOffset: l1Offset,
    refcountTableOffset: reftableOffset,
    refcountTableClusters: reftableClusters,
    backingFile: opts.backingFile,
    backingFormat: opts.backingFormat,
    guard: opts.guard,
    otherExtensions: opts.otherExtensions,
  });
  const meta = Buffer.alloc((1 + reftableClusters + blocks) * cs);
  head.copy(meta, 0);
  for (let b = 0; b < blocks; b++) writeEntry(meta, reftableOffset + b * 8, blocksOffset + b * cs, 0);
  for (let c = 0; c < total; c++) {
    const b = Math.floor(c / perBlock);
    setRefcount(meta.subarray(blocksOffset + b * cs, blocksOffset + (b + 1) * cs), c % perBlock, 4, 1);
  }
  const f = BlockFile.open(path, { create: true, exclusive: true });
  try {
    f.writeSync(meta, 0);
    f.truncateSync(l1Offset + l1Size * 8);
    f.syncSync(false);
  } finally {
    f.close();
  }
}
