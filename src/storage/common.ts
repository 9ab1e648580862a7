/**
 * What every storage operation shares: the options common to all of them, the one progress
 * type, opening the volume and finding its record, and the store lock around an operation.
 */
import * as fs from 'node:fs';
import type { DiskImage } from '../image';
import * as os from 'node:os';
import { BlockFile } from '../engine/file';
import { DisksnapError, invalid, isDisksnapError, fromNodeError } from '../engine/errors';
import { NativeStat } from '../engine/native';
import type { KeySpec } from './keys';
import type { HeldStoreLock, Store } from './store/store';
import type { SnapshotStats, VolumeRecord } from './store/records';
import type { ObjectData } from './store/backend';
import type { Throttle } from './pool';

/** Bytes per read/hash chunk; also the unit of pipelining. */
export const CHUNK_BYTES = 16 * 1024 * 1024;
/** Chunk buffers of a capture or copy in memory at once. */
export const MAX_BUFFERS = 4;
/** Bytes per native hashFile/tagFile call of an incremental snapshot (only digests come back). */
export const HASH_CHUNK_BYTES = 64 * 1024 * 1024;
/** Outstanding bytes of object writes before the reader waits for them. */
export const MAX_WRITE_BYTES = 64 * 1024 * 1024;

/**
 * How many times its bytes a pipeline's buffer pool must carry to get 2 MiB pages where the
 * host takes free memory back (./capture.ts ReadPipeline.bulk, ./fetch.ts pipelineBlocks).
 * There a first touch costs ~4x more per byte in huge pages (2.5 against 0.65 ms per 2 MiB on
 * session 40's VM), and each O_DIRECT request from them much less (./store/direct.ts
 * bigBuffer). A full snapshot of 1 GiB through the 64 MiB pool gained 90 ms net; below about
 * 6x its bytes the extra faults would cost more than the requests save.
 */
export const BULK_REUSE = 8;

/** How long commands wait for a running gc (or gc for running commands) by default. */
export const DEFAULT_LOCK_WAIT_MS = 60_000;

export interface StoreOptions {
  /** store directory; default $DISKSNAP_STORE, else the per-user data directory */
  store?: string;
  /** how long to wait for a conflicting store lock (ms) */
  lockWaitMs?: number;
  /** hashing threads (default: one per CPU) */
  threads?: number;
  /**
   * The key of encrypted volumes and snapshots (src/storage/keys.ts): needed to snapshot an encrypted
   * volume, restore or verify an encrypted snapshot, or see its name, description and tags.
   */
  key?: KeySpec;
}

/** Progress of a long storage operation: `done` of `total` (bytes for scan, blocks otherwise). */
export interface Progress {
  phase: 'scan' | 'plan' | 'verify' | 'write' | 'copy';
  done: number;
  total: number;
}

export type ProgressFn = (p: Progress) => void;

export function threadsOf(opts: StoreOptions): number {
  return opts.threads ?? Math.max(1, os.availableParallelism());
}

/** Blocks of `bs` bytes per chunk buffer. */
export function blocksPerChunk(bs: number): number {
  return Math.max(1, Math.floor(CHUNK_BYTES / bs));
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Ranges of blocks [first, end) that hold any data byte, from the file's data extents. */
export function dataRuns(file: BlockFile, size: number, bs: number): Array<[number, number]> {
  const runs: Array<[number, number]> = [];
  for (const e of file.extents(0, size)) {
    const first = Math.floor(e.offset / bs);
    const end = Math.ceil(Math.min(size, e.offset + e.length) / bs);
    if (end <= first) continue;
    const last = runs[runs.length - 1];
    if (last && first <= last[1]) last[1] = Math.max(last[1], end);
    else runs.push([first, end]);
  }
  return runs;
}

/** Blocks of the guest view that hold data (its map's data extents), as runs [first, end). */
export function guestRuns(image: DiskImage, size: number, bs: number): Array<[number, number]> {
  const runs: Array<[number, number]> = [];
  for (const e of image.map()) {
    if (e.kind !== 'data') continue;
    const first = Math.floor(e.offset / bs);
    const end = Math.ceil(Math.min(size, e.offset + e.length) / bs);
    const last = runs[runs.length - 1];
    if (last && first <= last[1]) last[1] = Math.max(last[1], end);
    else runs.push([first, end]);
  }
  return runs;
}

/** Splits runs into chunks of at most `maxBlocks` blocks. */
export function* chunksOf(runs: Array<[number, number]>, maxBlocks: number): Generator<[number, number]> {
  for (const [first, end] of runs) {
    for (let a = first; a < end; a += maxBlocks) yield [a, Math.min(end, a + maxBlocks)];
  }
}

export function volumeSizeOf(file: BlockFile, st: NativeStat): number {
  if (!st.isRegular && !st.isBlockDevice) throw invalid(`volume ${file.path} is not a regular file or block device`, file.path);
  return st.size;
}

export function openVolume(p: string, write: boolean): BlockFile {
  if (!fs.existsSync(p)) throw new DisksnapError(`volume ${p} does not exist`, 'ENOENT', 2, p);
  try {
    return BlockFile.open(p, write ? { write: true, lock: 'exclusive' } : { lock: 'shared' });
  } catch (e) {
    if (isDisksnapError(e, 'ELOCKED')) {
      throw new DisksnapError(`volume ${p} is in use: ${(e as Error).message}`, 'ELOCKED', undefined, p);
    }
    throw e;
  }
}

/** 'a/b' -> absolute real path (the volume identity); ENOENT when missing. */
export function realVolumePath(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new DisksnapError(`volume ${p} does not exist`, 'ENOENT', 2, p);
    throw fromNodeError(e, p);
  }
}

export async function findVolumeByPath(store: Store, real: string): Promise<VolumeRecord | undefined> {
  const { volumes } = await store.listVolumes();
  return volumes.find((v) => v.path === real);
}

export async function withStoreLock<T>(store: Store, mode: 'shared' | 'exclusive', opts: StoreOptions & { onLog?: (message: string) => void }, fn: (lock: HeldStoreLock) => Promise<T>): Promise<T> {
  const lock = await store.lock(mode, { waitMs: opts.lockWaitMs ?? DEFAULT_LOCK_WAIT_MS });
  return holding(lock, `the ${mode} lock of store ${store.dir}`, opts.onLog, () => fn(lock));
}

/**
 * Runs `fn` holding `held` (a store lock or a snapshot's lease), then gives it back. After a
 * failure of `fn` the release is quiet: the first failure is the one to report (a gateway
 * that broke `fn` usually fails the release too, and its error would hide which request
 * failed: a restore said "PUT locks/shared/... failed", not which block). After success a
 * failed release is only logged: the work is done and durable, and a lease not given back
 * runs out on its own (a command that exits 1 must not have completed its snapshot).
 */
export async function holding<T>(held: { release(): void | Promise<void> }, what: string, onLog: ((message: string) => void) | undefined, fn: () => Promise<T>): Promise<T> {
  let result: T;
  try {
    result = await fn();
  } catch (e) {
    await Promise.resolve()
      .then(() => held.release())
      .catch(() => undefined);
    throw e;
  }
  try {
    await held.release();
  } catch (e) {
    onLog?.(`${what} was not given back (${(e as Error).message}); it runs out on its own`);
  }
  return result;
}

/** "snapshot X is error (why); only completed snapshots can be <verb>" unless it is completed. */
export function assertCompleted(rec: { id: string; state: string; error: string | null }, verb: string): void {
  if (rec.state === 'completed') return;
  throw invalid(`snapshot ${rec.id} is ${rec.state}${rec.error ? ` (${rec.error})` : ''}; only completed snapshots can be ${verb}`);
}

/**
 * Queues the write of one block object (plaintext, or the parts of its sealed form) of
 * `plainLength` bytes; counted in `stats` when this write published it (two equal blocks in
 * flight at once both try: putIfAbsent lets one win). `release` lets go of the memory the
 * data lives in, once the write is done or was never queued.
 */
export async function queueObject(writes: Throttle, store: Store, stats: SnapshotStats, digest: Buffer, data: ObjectData, plainLength: number, release: () => void): Promise<void> {
  await queueClaimed(writes, [{ digest, data, plainLength }], release, async ([o]) => {
    if (await (o.data instanceof Uint8Array ? store.putBlock(o.digest, o.data as Buffer) : store.putSealed(o.digest, o.data))) {
      stats.blocksAdded++;
      stats.bytesAdded += o.plainLength;
    }
  });
}

/**
 * queueObject for several blocks of an unsealed store at once: one call where the backend
 * takes many (putManyIfAbsent: one native job on a directory store), else one put each;
 * counted against the throttle together; `release` once all are done.
 */
export async function queueObjects(writes: Throttle, store: Store, stats: SnapshotStats, objs: Array<{ digest: Buffer; data: Buffer }>, release: () => void): Promise<void> {
  if (store.codec.sealed) {
    release();
    throw new Error('internal: queueObjects takes plain blocks');
  }
  await queueClaimed(writes, objs.map((o) => ({ ...o, plainLength: o.data.length })), release, async (mine) => {
    const many = store.backend.putManyIfAbsent;
    const added = many
      ? await many.call(store.backend, mine.map((o) => ({ key: store.blockKey(o.digest), data: o.data })))
      : await Promise.all(mine.map((o) => store.putBlock(o.digest, o.data)));
    added.forEach((a, i) => {
      if (!a) return;
      stats.blocksAdded++;
      stats.bytesAdded += mine[i].plainLength;
    });
  });
}

/**
 * The objects of `objs` not in flight already are claimed (the same object twice in flight,
 * two equal blocks of one batch, is written once: on S3 two racing conditional PUTs of one key
 * can both succeed, and both be counted as added) and `put` for them is queued on the throttle.
 * Their claims go, and `release` is called, once `put` is done or was never queued.
 */
async function queueClaimed<T extends { digest: Buffer; plainLength: number }>(writes: Throttle, objs: T[], release: () => void, put: (mine: T[]) => Promise<void>): Promise<void> {
  let flying = IN_FLIGHT.get(writes);
  if (!flying) IN_FLIGHT.set(writes, (flying = new Set()));
  const fly = flying;
  const keys: string[] = [];
  const mine = objs.filter((o) => {
    const key = o.digest.toString('hex');
    if (fly.has(key)) return false;
    fly.add(key);
    keys.push(key);
    return true;
  });
  const done = () => {
    for (const k of keys) fly.delete(k);
    release();
  };
  if (!mine.length) return done();
  try {
    await writes.add(
      mine.reduce((n, o) => n + o.plainLength, 0),
      async () => {
        try {
          await put(mine);
        } finally {
          done();
        }
      },
    );
  } catch (e) {
    done(); // an earlier write failed: these were never queued
    throw e;
  }
}

/** Digests of the object writes in flight, per throttle (see queueObject). */
const IN_FLIGHT = new WeakMap<Throttle, Set<string>>();
