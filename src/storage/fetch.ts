/**
 * Reading blocks back from the store, shared by restore, verify and copy: objects fetched
 * concurrently into a chunk buffer, each checked against its length and digest (plain
 * objects hashed again in one native call; sealed ones authenticated by AES-GCM on a worker),
 * and a manifest streamed through that in batches with the next batches fetched ahead.
 */
import { DisksnapError, isDisksnapError } from '../engine/errors';
import { native } from '../engine/native';
import type { Store } from './store/store';
import { DerivedKeys, TRAILER_BYTES } from './store/crypto';
import { acquireStaging, openChunk, releaseStaging } from './store/crypto-pool';
import { BlockEntries, ManifestReader, blockLength, pieceRange, pieceSizeFor } from './store/manifest';
import { DIRECT_ALIGN, bigBuffer } from './store/direct';
import type { SnapshotRecord } from './store/records';
import { BULK_REUSE, Progress, ProgressFn, blocksPerChunk } from './common';
import { BufferPool } from './pool';

/** A block of a manifest: its whole object (if any) and its pieces (./store/manifest.ts). */
export type BatchEntry = BlockEntries;

export interface Fetched {
  /** bytes of the batch in `buf` */
  len: number;
  /** the blocks (k within the batch) that are bad, with why, in k order */
  bad: { k: number; why: string }[];
  /** the buffer to use from then on (the same memory; the object may have moved through a worker) */
  buf: Buffer;
}

/** Bytes of a batch of blocks laid out at k*bs: only the volume's last block can be short, and it comes last. */
function batchBytes(entries: BatchEntry[], volumeSize: number, bs: number): number {
  return entries.length ? (entries.length - 1) * bs + blockLength(entries[entries.length - 1].index, volumeSize, bs) : 0;
}

/**
 * Reads the objects of `entries` into `buf` (block k at k*bs) and checks each one. With
 * `recheck`, a sealed object's plaintext is hashed again too (verify does both).
 */
export async function fetchVerified(store: Store, entries: BatchEntry[], buf: Buffer, volumeSize: number, threads: number, recheck = false): Promise<Fetched> {
  const r = store.codec.keys ? await fetchSealed(store, store.codec.keys, entries, buf, volumeSize, threads, recheck) : await fetchPlain(store, entries, buf, volumeSize, threads);
  await overlayPieces(store, entries, r, volumeSize, threads);
  return r;
}

/**
 * The pieces of the batch's blocks, once their whole objects are in place and checked: each
 * fetched (authenticated, when sealed) and copied over its range of the block, then all of
 * them checked against their digests in one native job (hashSpansAsync, on the pool's threads:
 * node's createHash a piece at a time ran on the event loop, ~1 ms a MiB). A block without a
 * whole object starts as zeros. A bad piece makes its block bad.
 */
async function overlayPieces(store: Store, entries: BatchEntry[], r: Fetched, volumeSize: number, threads: number): Promise<void> {
  const bs = store.blockSize;
  const ps = pieceSizeFor(bs);
  const isBad = (k: number) => r.bad.some((b) => b.k === k);
  const pieced = entries.map((e, k) => k).filter((k) => entries[k].pieces && !isBad(k));
  if (!pieced.length) return;
  const copied: Array<{ k: number; at: number; length: number; digest: Buffer }> = [];
  await Promise.all(
    pieced.map(async (k) => {
      const e = entries[k];
      try {
        // (the pieces of a block cover different ranges: fetched at once, a GET each on S3)
        await Promise.all(
          e.pieces!.map(async (piece) => {
            const { offset, length } = pieceRange(piece.slot, e.index, volumeSize, bs, ps);
            const got = await store.getBlock(piece.digest);
            if (got.length !== length) throw new DisksnapError(`piece object ${store.describeBlock(piece.digest)} has ${got.length} bytes, expected ${length}`, 'ECORRUPT');
            got.copy(r.buf, k * bs + offset);
            copied.push({ k, at: k * bs + offset, length, digest: piece.digest });
          }),
        );
      } catch (err) {
        if (!(err instanceof DisksnapError) || (err.code !== 'ECORRUPT' && err.code !== 'ENOENT' && err.code !== 'EIO')) throw err;
        r.bad.push({ k, why: err.message });
      }
    }),
  );
  const check = copied.filter((c) => !isBad(c.k));
  if (check.length) {
    const spans = new Float64Array(check.length * 2);
    check.forEach((c, j) => spans.set([c.at, c.length], j * 2));
    const digests = await native().hashSpansAsync(r.buf, spans, threads, store.codec.digestKey);
    check.forEach((c, j) => {
      if (digests.compare(c.digest, 0, 32, j * 32, j * 32 + 32) !== 0 && !isBad(c.k)) r.bad.push({ k: c.k, why: `piece object ${store.describeBlock(c.digest)} does not match its digest (damaged)` });
    });
  }
  r.bad.sort((a, b) => a.k - b.k);
}

/** fetchVerified for plain objects (SHA-256 names). */
async function fetchPlain(store: Store, entries: BatchEntry[], buf: Buffer, volumeSize: number, threads: number): Promise<Fetched> {
  const bs = store.blockSize;
  const bad: { k: number; why: string }[] = [];
  await Promise.all(
    entries.map(async (e, k) => {
      const want = blockLength(e.index, volumeSize, bs);
      const slot = buf.subarray(k * bs, (k + 1) * bs);
      if (!e.digest) {
        slot.fill(0, 0, want); // pieces over zeros
        return;
      }
      try {
        const got = await store.getBlock(e.digest, slot);
        if (got.length !== want) {
          bad.push({ k, why: `object ${store.backend.describe(store.blockKey(e.digest))} has ${got.length} bytes, expected ${want}` });
        } else if (got.buffer !== slot.buffer || got.byteOffset !== slot.byteOffset) {
          slot.set(got);
        }
      } catch (err) {
        if (!(err instanceof DisksnapError) || (err.code !== 'ECORRUPT' && err.code !== 'ENOENT' && err.code !== 'EIO')) throw err;
        bad.push({ k, why: err.message });
      }
    }),
  );
  const len = batchBytes(entries, volumeSize, bs);
  if (entries.length) await recheckDigests(store, entries, buf.subarray(0, len), threads, store.codec.digestKey, bad);
  bad.sort((a, b) => a.k - b.k);
  return { len, bad, buf };
}

/** Hashes the blocks fetched into `data` and adds to `bad` each one that does not match its entry. */
async function recheckDigests(store: Store, entries: BatchEntry[], data: Buffer, threads: number, key: Uint8Array | undefined, bad: { k: number; why: string }[]): Promise<void> {
  const { digests } = await native().hashBlocksAsync(data, store.blockSize, threads, key);
  for (let k = 0; k < entries.length; k++) {
    const d = entries[k].digest;
    if (!d || bad.some((b) => b.k === k)) continue; // (a block of pieces over zeros: each piece is checked on its own)
    if (digests.compare(d, 0, 32, k * 32, k * 32 + 32) !== 0) {
      bad.push({ k, why: `object ${store.backend.describe(store.blockKey(d))} does not match its digest (damaged)` });
    }
  }
}

/**
 * fetchVerified for sealed objects: read whole into a staging buffer, opened (authenticated
 * and decrypted) on a worker into `buf`. GCM's tag, with the digest as AAD, proves the object
 * is the one sealed under this key for this digest, so the plaintext is not hashed again
 * unless `recheck`.
 */
async function fetchSealed(store: Store, keys: DerivedKeys, entries: BatchEntry[], buf: Buffer, volumeSize: number, threads: number, recheck: boolean): Promise<Fetched> {
  const bs = store.blockSize;
  // Each object at a 4 KiB-aligned place of an aligned buffer: read with O_DIRECT like plain
  // ones (native/object.cc), not through the page cache.
  const stride = Math.ceil((bs + TRAILER_BYTES) / DIRECT_ALIGN) * DIRECT_ALIGN;
  const bad: { k: number; why: string }[] = [];
  let staging = acquireStaging(Math.max(1, entries.length) * stride, store.backend.allocBuffer);
  const items: { k: number; sOff: number; sLen: number; oOff: number; digest: Buffer; where: string }[] = [];
  try {
    await Promise.all(
      entries.map(async (e, k) => {
        if (!e.digest) {
          buf.fill(0, k * bs, k * bs + blockLength(e.index, volumeSize, bs)); // pieces over zeros
          return;
        }
        const want = blockLength(e.index, volumeSize, bs) + TRAILER_BYTES;
        const key = store.blockKey(e.digest);
        const where = store.backend.describe(key);
        try {
          const got = await store.backend.get(key, staging.subarray(k * stride, (k + 1) * stride));
          if (got.length !== want) bad.push({ k, why: `object ${where} has ${got.length} bytes, expected ${want} (a sealed block of ${want - TRAILER_BYTES})` });
          else items.push({ k, sOff: k * stride, sLen: want, oOff: k * bs, digest: e.digest, where });
        } catch (err) {
          if (isDisksnapError(err, 'ENOENT')) bad.push({ k, why: `block object ${where} is missing` });
          else if (isDisksnapError(err, 'EIO')) bad.push({ k, why: (err as Error).message });
          else throw err;
        }
      }),
    );
    items.sort((a, b) => a.k - b.k);
    const r = await openChunk(keys, staging, buf, items);
    staging = r.staging;
    buf = r.out;
    r.errors.forEach((why, j) => {
      if (why !== null) bad.push({ k: items[j].k, why });
    });
  } finally {
    releaseStaging(staging);
  }
  const len = batchBytes(entries, volumeSize, bs);
  if (recheck && entries.length) await recheckDigests(store, entries, buf.subarray(0, len), threads, keys.digest, bad);
  bad.sort((a, b) => a.k - b.k);
  return { len, bad, buf };
}

/**
 * How many blocks a manifest lists, for progress: its entry count, except where pieces make
 * several entries per block (then the record's count of data blocks).
 */
export function blocksListed(reader: ManifestReader, rec: SnapshotRecord): number {
  return reader.header.pieceSize ? rec.stats.dataBlocks : reader.entryCount;
}

/** Pulls up to `max` blocks from a manifest reader (digests copied). */
export async function nextBatch(reader: ManifestReader, max: number, filter?: (index: number) => boolean): Promise<BatchEntry[]> {
  const out: BatchEntry[] = [];
  while (out.length < max) {
    const e = await reader.nextBlock();
    if (!e) break;
    if (filter && !filter(e.index)) continue;
    out.push(e);
  }
  return out;
}

export function corruptBlock(rec: SnapshotRecord, index: number, why: string): DisksnapError {
  return new DisksnapError(`snapshot ${rec.id}, block ${index} (offset ${index * rec.blockSize}): ${why}`, 'ECORRUPT');
}

export interface PipelineOptions {
  threads: number;
  /** progress is reported as `done` of `total` blocks */
  total: number;
  phase: Progress['phase'];
  onProgress?: ProgressFn;
  /** only the entries whose index passes (ascending queries) */
  filter?: (index: number) => boolean;
  /** allocates the chunk buffers (memory that suits O_DIRECT on the output; `bulk`: ./direct.ts bigBuffer) */
  alloc?: (size: number, bulk?: boolean) => Buffer;
}

type Loaded = { batch: BatchEntry[]; buf: Buffer } | undefined;

/**
 * Streams a manifest in batches: fetch + verify batch k+1 while `consume` handles batch k.
 * Throws ECORRUPT on the first bad block; the manifest checksum is verified at its end,
 * before this returns.
 */
export async function pipelineBlocks(store: Store, rec: SnapshotRecord, reader: ManifestReader, o: PipelineOptions, consume: (batch: BatchEntry[], buf: Buffer) => Promise<void>): Promise<void> {
  const bs = rec.blockSize;
  const maxBlocks = blocksPerChunk(bs);
  // Three stages overlap: objects of batch k+2 are read while batch k+1 is hashed and batch k
  // is consumed (one buffer each). Taking entries from the manifest is serialised. A backend
  // that needs many requests in flight (S3) gets batches enough to queue twice that many, so
  // its bound stays full while a batch waits for its slowest object and is hashed: with 2,
  // 32 GETs of a 16 MiB batch kept a gateway at ~24 of 32 on average.
  const wanted = store.backend.concurrency ? Math.ceil((2 * store.backend.concurrency) / maxBlocks) + 1 : 2;
  const DEPTH = Math.min(8, Math.max(2, wanted));
  // (2 MiB pages where the restore carries many times the pool's bytes: ./common.ts BULK_REUSE)
  const bulk = o.total * bs >= BULK_REUSE * (DEPTH + 1) * maxBlocks * bs;
  const pool = new BufferPool(maxBlocks * bs, DEPTH + 1, (n) => (o.alloc ? o.alloc(n, bulk) : bigBuffer(n, false, bulk)));
  let done = 0;
  let take: Promise<unknown> = Promise.resolve();
  const fetch = async (): Promise<Loaded> => {
    const p = take.then(() => nextBatch(reader, maxBlocks, o.filter));
    take = p.catch(() => undefined); // the failure is reported by the fetch that awaits `p`
    const batch = await p;
    if (!batch.length) return undefined;
    let buf = await pool.acquire();
    try {
      const r = await fetchVerified(store, batch, buf, rec.volumeSize, o.threads);
      buf = r.buf;
      if (r.bad.length) throw corruptBlock(rec, batch[r.bad[0].k].index, r.bad[0].why);
    } catch (e) {
      pool.release(buf);
      throw e;
    }
    return { batch, buf };
  };
  const queue: Promise<Loaded>[] = [];
  const enqueue = () => {
    const p = fetch();
    p.catch(() => undefined); // awaited in order below
    queue.push(p);
  };
  const drainQueue = async () => {
    // Batches fetched ahead of a failure or of the end: their buffers go back; their own
    // errors come after the one being reported.
    for (const p of queue.splice(0)) {
      const r = await p.catch(() => undefined);
      if (r) pool.release(r.buf);
    }
  };
  for (let i = 0; i < DEPTH; i++) enqueue();
  try {
    for (let cur = await queue.shift()!; cur; cur = await queue.shift()!) {
      enqueue();
      try {
        await consume(cur.batch, cur.buf);
      } finally {
        pool.release(cur.buf);
      }
      done += cur.batch.length;
      o.onProgress?.({ phase: o.phase, done, total: o.total });
    }
  } finally {
    await drainQueue();
  }
}
