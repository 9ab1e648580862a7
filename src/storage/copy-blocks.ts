/**
 * The block loop of `snapshot copy` (./copy.ts has the keys, records and the why): the
 * source manifest in batches; per block, the previous copy's digest where the source did not
 * change it, else the object read and verified, hashed again under another key, sealed for
 * an encrypted destination, and written unless the destination has it.
 */
import { native } from '../engine/native';
import type { Store } from './store/store';
import { sealChunk } from './store/crypto-pool';
import { ManifestCursor, ManifestReader, ManifestWriter, blockCount, blockLength, sameEntries } from './store/manifest';
import { SnapshotJson, SnapshotRecord } from './store/records';
import { MAX_BUFFERS, MAX_WRITE_BYTES, blocksPerChunk, queueObject, threadsOf } from './common';
import { faultsOf } from './faults';
import { BufferPool, Throttle } from './pool';
import { BatchEntry, blocksListed, corruptBlock, fetchVerified, nextBatch } from './fetch';
import { completeSnapshot, failSnapshot, percentOf, progressSaver } from './lifecycle';
import type { CopySnapshotOptions } from './copy';
import { bigBuffer } from './store/direct';

interface CopyState {
  src: Store;
  dst: Store;
  rec: SnapshotRecord;
  out: SnapshotRecord;
  threads: number;
  /** one key (or none) on both sides: digests are the same */
  sameDigests: boolean;
  pool: BufferPool;
  writes: Throttle;
  dstCursor?: ManifestCursor;
  srcCursor?: ManifestCursor;
}

export async function runCopy(
  src: Store,
  rec: SnapshotRecord,
  dst: Store,
  out: SnapshotRecord,
  dstParent: SnapshotRecord | undefined,
  srcParent: SnapshotRecord | undefined,
  opts: CopySnapshotOptions,
): Promise<SnapshotJson> {
  const progress = progressSaver(dst, out);
  const bs = rec.blockSize;
  const maxBlocks = blocksPerChunk(bs);
  const s: CopyState = {
    src,
    dst,
    rec,
    out,
    threads: threadsOf(opts),
    sameDigests: (src.codec.keys?.id ?? null) === (dst.codec.keys?.id ?? null),
    pool: new BufferPool(maxBlocks * bs, MAX_BUFFERS, (n) => dst.backend.allocBuffer?.(n) ?? bigBuffer(n)),
    writes: new Throttle(MAX_WRITE_BYTES),
  };
  const afterBatch = faultsOf(opts).afterBatch;
  let writer: ManifestWriter | undefined;
  const readers: ManifestReader[] = [];
  try {
    writer = await dst.createManifest({ blockSize: bs, volumeSize: rec.volumeSize, snapshotId: out.id, volumeId: out.volumeId, digest: dst.codec.digest, sealed: dst.codec.sealed });
    const reader = await src.openManifest(rec);
    readers.push(reader);
    if (dstParent) await openParents(s, dstParent, srcParent, readers, opts);
    const total = blocksListed(reader, rec);
    let done = 0;
    for (let batchNo = 0; ; batchNo++) {
      const batch = await nextBatch(reader, maxBlocks);
      if (!batch.length) break;
      await copyBatch(s, batch, writer);
      done += batch.length;
      opts.onProgress?.({ phase: 'copy', done, total });
      progress.save(percentOf(done, total));
      await afterBatch?.(batchNo);
      s.writes.check();
    }
    // nextBatch returned nothing: the source manifest was read to its end and authenticated.
    await s.writes.drain();
    out.stats.zeroBlocks = blockCount(rec.volumeSize, bs) - out.stats.dataBlocks;
    return await completeSnapshot(dst, out, { manifest: writer }, progress, () => (writer = undefined));
  } catch (e) {
    await s.writes.settle();
    throw await failSnapshot(dst, out, writer && { manifest: writer }, progress, e);
  } finally {
    for (const r of readers) await r.close();
  }
}

/** The previous copy's manifest (and its source's): a damaged one only costs reading every block. */
async function openParents(s: CopyState, dstParent: SnapshotRecord, srcParent: SnapshotRecord | undefined, readers: ManifestReader[], opts: CopySnapshotOptions): Promise<void> {
  try {
    const r = await s.dst.openManifest(dstParent);
    readers.push(r);
    s.dstCursor = new ManifestCursor(r);
    if (srcParent) {
      const r2 = await s.src.openManifest(srcParent);
      readers.push(r2);
      s.srcCursor = new ManifestCursor(r2);
    }
  } catch (e) {
    opts.onLog?.(`previous copy ${dstParent.id} cannot be used (${(e as Error).message}); reading every block`);
    s.dstCursor = s.srcCursor = undefined;
  }
}

/**
 * Whether a source block is copied as one whole object: a block with pieces (or pieces over
 * zeros) is read assembled and stored whole, so a copy holds no pieces (./store/manifest.ts)
 * and costs what the block is, once; its next copy reuses it while the source keeps the
 * same entries.
 */
function flattened(e: BatchEntry): boolean {
  return !e.digest || !!e.pieces;
}

/** One batch: each block's destination digest found or computed, the missing objects written, the entries recorded. */
async function copyBatch(s: CopyState, batch: BatchEntry[], writer: ManifestWriter): Promise<void> {
  const digests = Buffer.alloc(batch.length * 32);
  const prev: (Buffer | undefined)[] = new Array(batch.length);
  const need: number[] = [];
  for (let k = 0; k < batch.length; k++) {
    const e = batch[k];
    const p = s.dstCursor ? await s.dstCursor.lookup(e.index) : undefined;
    prev[k] = p && Buffer.from(p);
    const sp = s.srcCursor ? await s.srcCursor.lookupBlock(e.index) : undefined;
    if (sp && prev[k] && sameEntries(sp, e)) {
      digests.set(prev[k]!, k * 32); // unchanged since the previous copy: no I/O
      continue;
    }
    if (s.sameDigests && !flattened(e)) {
      digests.set(e.digest!, k * 32);
      if (await s.dst.hasBlock(e.digest!)) continue;
    }
    need.push(k);
  }
  if (need.length) await copyObjects(s, batch, need, digests);
  for (let k = 0; k < batch.length; k++) {
    writer.append(batch[k].index, digests, k * 32);
    s.out.stats.dataBlocks++;
    if (!prev[k] || prev[k]!.compare(digests, k * 32, k * 32 + 32) !== 0) s.out.stats.changedBlocks++;
  }
}

/** Reads and verifies the blocks `need` of a batch, fills in their digests, writes what the destination lacks. */
async function copyObjects(s: CopyState, batch: BatchEntry[], need: number[], digests: Buffer): Promise<void> {
  const { dst, rec } = s;
  const bs = rec.blockSize;
  const size = rec.volumeSize;
  let buf = await s.pool.acquire();
  let ref: ReturnType<BufferPool['shared']> | undefined;
  try {
    const sub = need.map((k) => batch[k]);
    const r = await fetchVerified(s.src, sub, buf, size, s.threads);
    buf = r.buf; // the same memory, possibly moved through a worker
    if (r.bad.length) throw corruptBlock(rec, sub[r.bad[0].k].index, r.bad[0].why);
    s.out.stats.bytesScanned += r.len;
    const anyFlat = need.some((k) => flattened(batch[k]));
    if (!s.sameDigests || anyFlat) {
      const h = await native().hashBlocksAsync(buf.subarray(0, r.len), bs, s.threads, dst.codec.digestKey);
      need.forEach((k, j) => {
        if (!s.sameDigests || flattened(batch[k])) digests.set(h.digests.subarray(j * 32, j * 32 + 32), k * 32);
      });
    }
    const digestOf = (j: number) => digests.subarray(need[j] * 32, need[j] * 32 + 32);
    // Only what the destination lacks is sealed and written (same digests: checked already).
    const js: number[] = [];
    for (let j = 0; j < need.length; j++) if ((s.sameDigests && !flattened(batch[need[j]])) || !(await dst.hasBlock(digestOf(j)))) js.push(j);
    const lenOf = (j: number) => blockLength(batch[need[j]].index, size, bs);
    let trailers: Buffer[] | undefined;
    if (dst.codec.keys && js.length) {
      const sr = await sealChunk(dst.codec.keys, buf, js.map((j) => ({ off: j * bs, len: lenOf(j), digest: digestOf(j) })));
      buf = sr.buf;
      trailers = sr.trailers;
    }
    ref = s.pool.shared(buf);
    for (let x = 0; x < js.length; x++) {
      const slot = buf.subarray(js[x] * bs, js[x] * bs + lenOf(js[x]));
      const t = trailers?.[x];
      await queueObject(s.writes, dst, s.out.stats, digestOf(js[x]), t ? [slot, t] : slot, slot.length, ref.hold());
    }
  } finally {
    if (ref) ref.done();
    else s.pool.release(buf);
  }
}
