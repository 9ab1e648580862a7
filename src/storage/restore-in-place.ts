/**
 * Restore in place: pass 1 hashes the volume's data blocks and compares them with the
 * manifest, making a plan (blocks to write, blocks to punch); then every object the plan
 * needs is read and verified; only then is the volume record marked "in-place restore of X
 * in progress" and pass 2 writes the planned blocks, punches holes where the snapshot has
 * zeros, fsyncs, and clears the mark. Each step is idempotent: re-running after an
 * interruption re-plans from the volume as it is and finishes the job. While the mark is set,
 * snapshots of the volume are refused.
 *
 * A qcow2 volume (an image or the top of a chain) is restored through the qcow2 writer: its
 * guest view is compared and written, zero blocks become zero clusters of the top image, the
 * backing files are never written, and every enabled persistent bitmap is marked (so the next
 * bitmap-driven snapshot sees the restore). A chain other than the one the snapshot recorded
 * is refused unless `allowChainChange`: the same guest bytes would then sit over other parents.
 */
import { BlockFile } from '../engine/file';
import { DisksnapError } from '../engine/errors';
import { native } from '../engine/native';
import { assertNotAttached } from '../host/attach';
import type { Store } from './store/store';
import { ManifestCursor, blockLength } from './store/manifest';
import type { SnapshotRecord } from './store/records';
import { detectFormat, openImage } from '../image';
import { blocksPerChunk, chunksOf, dataRuns, findVolumeByPath, guestRuns, openVolume, realVolumePath, threadsOf, volumeSizeOf } from './common';
import { faultsOf } from './faults';
import { NumberList } from './pool';
import { pipelineBlocks } from './fetch';
import type { RestoreOptions, RestoreReport } from './restore';
import { bigBuffer } from './store/direct';

export async function restoreInPlace(store: Store, rec: SnapshotRecord, volume: string, opts: RestoreOptions): Promise<RestoreReport> {
  const real = realVolumePath(volume);
  const vol = await findVolumeByPath(store, real);
  if (!vol || vol.id !== rec.volumeId) {
    throw new DisksnapError(
      `snapshot ${rec.id} is of volume ${rec.volumeId} (${rec.volumePath}), not of ${real}${vol ? ` (${vol.id})` : ' (not registered in this store)'}; refusing to roll back another volume — restore it with --to FILE instead`,
      'EINVALID',
      undefined,
      real,
    );
  }
  // The kernel has an attached image open: refuse with how to detach it.
  assertNotAttached(real, 'restore it in place');
  const nowQcow2 = detectFormat(real) === 'qcow2';
  if (nowQcow2 !== (rec.volumeFormat === 'qcow2')) {
    const was = rec.volumeFormat === 'qcow2' ? 'the guest view of a qcow2 image' : 'raw bytes';
    throw new DisksnapError(
      `volume ${real} is ${nowQcow2 ? 'a qcow2 image' : 'not a qcow2 image'} now, but snapshot ${rec.id} holds ${was}; refusing to restore in place (restore it with --to FILE)`,
      'EINVALID',
      undefined,
      real,
    );
  }
  const target = nowQcow2 ? openQcow2Target(real, rec, opts) : rawTarget(openVolume(real, true));
  const report = emptyReport(rec, real, 'in-place');
  try {
    if (target.size !== rec.volumeSize) {
      throw new DisksnapError(`volume ${real} is ${target.size} bytes, snapshot ${rec.id} is of ${rec.volumeSize} bytes; refusing to restore in place`, 'EINVALID', undefined, real);
    }
    const plan = await planRestore(store, rec, target, report, opts);
    if (plan.toWrite.length === 0 && plan.toPunch.length === 0) return report;
    // Verify every object the plan needs before the volume is touched.
    await withManifest(store, rec, (reader) =>
      pipelineBlocks(store, rec, reader, { threads: threadsOf(opts), total: plan.toWrite.length, phase: 'verify', onProgress: opts.onProgress, filter: plan.toWrite.ascendingHas() }, async () => undefined),
    );
    vol.inPlaceRestore = { snapshotId: rec.id, startTime: new Date().toISOString() };
    await store.writeVolume(vol);
    await applyPlan(store, rec, target, plan, report, opts);
    vol.inPlaceRestore = null;
    await store.writeVolume(vol);
    return report;
  } finally {
    target.close();
  }
}

/** What an in-place restore reads and writes: a raw file or block device, or a qcow2 guest view. */
interface Target {
  size: number;
  /** data block runs [first, end): everything else reads as zeros */
  runs(bs: number): Array<[number, number]>;
  read(buf: Buffer, offset: number): Promise<number>;
  writeBatch(buf: Buffer, requests: Float64Array): Promise<void>;
  /** makes [offset, offset+length) read as zeros */
  zero(offset: number, length: number): void;
  sync(): Promise<void>;
  close(): void;
}

function rawTarget(file: BlockFile): Target {
  const size = volumeSizeOf(file, file.stat());
  return {
    size,
    runs: (bs) => dataRuns(file, size, bs),
    read: (buf, offset) => file.read(buf, offset),
    writeBatch: (buf, reqs) => file.writeBatch(buf, reqs),
    zero: (offset, length) => file.punchHoleSync(offset, length),
    sync: () => file.sync(),
    close: () => file.close(),
  };
}

/** The guest view of a qcow2 volume, opened for writing (QEMU's locks: a running VM is ELOCKED). */
function openQcow2Target(real: string, rec: SnapshotRecord, opts: RestoreOptions): Target {
  const image = openImage(real, { write: true });
  try {
    const chain = (image.info(true).chain ?? []).map((l) => l.path);
    const recorded = rec.volumeChain ?? [];
    if (!opts.allowChainChange && recorded.length > 0 && chain.join('\n') !== recorded.join('\n')) {
      throw new DisksnapError(
        `volume ${real}: its backing chain (${chain.join(' -> ')}) is not the one snapshot ${rec.id} was taken of (${recorded.join(' -> ')}); refusing to restore in place (--allow-chain-change writes the snapshot's guest view over the present chain)`,
        'EINVALID',
        undefined,
        real,
      );
    }
  } catch (e) {
    image.close();
    throw e;
  }
  return {
    size: image.virtualSize,
    runs: (bs) => guestRuns(image, image.virtualSize, bs),
    read: async (buf, offset) => {
      image.readSync(buf, offset);
      return buf.length;
    },
    writeBatch: async (buf, reqs) => image.writeBatchSync(buf, reqs),
    zero: (offset, length) => image.writeZeroesSync(offset, length),
    sync: () => image.flush(),
    close: () => image.close(),
  };
}

export function emptyReport(rec: SnapshotRecord, target: string, mode: RestoreReport['mode']): RestoreReport {
  return { snapshotId: rec.id, target, mode, volumeSize: rec.volumeSize, blockSize: rec.blockSize, blocksWritten: 0, bytesWritten: 0, blocksPunched: 0, blocksUnchanged: 0 };
}

interface Plan {
  /** indexes whose content differs */
  toWrite: NumberList;
  /** indexes that are zero in the snapshot and hold data in the volume */
  toPunch: NumberList;
}

async function withManifest<T>(store: Store, rec: SnapshotRecord, fn: (reader: Awaited<ReturnType<Store['openManifest']>>) => Promise<T>): Promise<T> {
  const reader = await store.openManifest(rec);
  try {
    return await fn(reader);
  } finally {
    await reader.close();
  }
}

/** Pass 1: the volume's data blocks hashed and compared with the manifest. */
async function planRestore(store: Store, rec: SnapshotRecord, file: Target, report: RestoreReport, opts: RestoreOptions): Promise<Plan> {
  const plan: Plan = { toWrite: new NumberList(), toPunch: new NumberList() };
  const bs = rec.blockSize;
  const size = rec.volumeSize;
  const threads = threadsOf(opts);
  await withManifest(store, rec, async (reader) => {
    const cursor = new ManifestCursor(reader);
    const runs = file.runs(bs);
    const maxBlocks = blocksPerChunk(bs);
    const buf = bigBuffer(maxBlocks * bs);
    let done = 0;
    const total = runs.reduce((s, [a, b]) => s + (b - a), 0);
    let pos = 0; // blocks below pos are planned
    const planGap = async (upTo: number) => {
      // Blocks in [pos, upTo) are holes in the volume: every snapshot entry there is a write.
      for (let i = await cursor.peek(pos); i >= 0 && i < upTo; i = await cursor.peek(i + 1)) plan.toWrite.push(i);
    };
    for (const [a, b] of chunksOf(runs, maxBlocks)) {
      await planGap(a);
      const len = Math.min(size, b * bs) - a * bs;
      const got = await file.read(buf.subarray(0, len), a * bs);
      if (got < len) buf.fill(0, got, len);
      const { digests, zero } = await native().hashBlocksAsync(buf.subarray(0, len), bs, threads, store.codec.digestKey);
      for (let i = a; i < b; i++) {
        const k = i - a;
        const want = await cursor.lookupBlock(i);
        if (want) {
          // (a block with pieces has no whole digest to compare: it is written)
          if (!zero[k] && want.digest && !want.pieces && want.digest.compare(digests, k * 32, k * 32 + 32) === 0) report.blocksUnchanged++;
          else plan.toWrite.push(i);
        } else if (!zero[k]) {
          plan.toPunch.push(i); // data in the volume, zero in the snapshot
        } else {
          report.blocksUnchanged++; // allocated zeros: same content, left as they are
        }
      }
      pos = b;
      done += b - a;
      opts.onProgress?.({ phase: 'plan', done, total });
    }
    await planGap(Number.MAX_SAFE_INTEGER);
    await cursor.finish(); // checksum of the manifest
  });
  return plan;
}

/** Pass 2 (the volume record is marked): write, punch, sync. */
async function applyPlan(store: Store, rec: SnapshotRecord, file: Target, plan: Plan, report: RestoreReport, opts: RestoreOptions): Promise<void> {
  const bs = rec.blockSize;
  const size = rec.volumeSize;
  const beforeWrite = faultsOf(opts).beforeWrite;
  let batchNo = 0;
  await withManifest(store, rec, (reader) =>
    pipelineBlocks(store, rec, reader, { threads: threadsOf(opts), total: plan.toWrite.length, phase: 'write', onProgress: opts.onProgress, filter: plan.toWrite.ascendingHas() }, async (batch, buf) => {
      await beforeWrite?.(batchNo++);
      const reqs = new Float64Array(batch.length * 3);
      for (let k = 0; k < batch.length; k++) {
        const len = blockLength(batch[k].index, size, bs);
        reqs.set([batch[k].index * bs, k * bs, len], k * 3);
        report.bytesWritten += len;
      }
      await file.writeBatch(buf, reqs);
      report.blocksWritten += batch.length;
    }),
  );
  for (let j = 0; j < plan.toPunch.length; j++) {
    const i = plan.toPunch.get(j);
    file.zero(i * bs, blockLength(i, size, bs));
    report.blocksPunched++;
  }
  await file.sync();
}
