/**
 * The one interface through which a snapshot store touches its storage: a directory
 * (src/storage/store/dir.ts) or an S3 bucket (src/storage/store/s3.ts). Snapshot logic (src/storage/*.ts,
 * src/storage/store/store.ts) sees a FullBackend: the small core every backend implements, plus
 * optional faster forms that `fullBackend()` fills in from the core where a backend lacks them.
 *
 * The core — what an S3-compatible backend (a bucket and a key prefix) would implement, one
 * request each:
 *
 *   get           GET key                                    ENOENT on 404
 *   putIfAbsent   PUT key with `If-None-Match: *`            false on 412 (block objects,
 *                 (the parts are the body, concatenated)     key records, store.json)
 *   put           PUT key                                    records: the only objects that
 *                                                            change (pending -> completed)
 *   list          ListObjectsV2 prefix (paginated)           `temporary` is always false
 *   delete        DeleteObject                               false when it was not there
 *
 * `put` is in the core because records change state; everything else is written once.
 * Optional, with their fallback when a backend does not implement them:
 *
 *   stat          HEAD (fallback: get and measure)           which blocks a store holds
 *   open          GET with Range: (fallback: get whole)      manifests, streamed in 1 MiB reads
 *   create        multipart upload (fallback: buffer in      manifests, written append-only
 *                 memory, put at commit)
 *   flush         nothing for S3 (PUTs are durable when      the directory backend fsyncs its
 *                 they return; fallback: no-op)              directories here
 *   allocBuffer   (fallback: none)                           O_DIRECT-aligned buffers
 *
 * An S3 backend would implement the core plus stat and open (a HEAD per new block, ranged
 * GETs of manifests); create is worth it only for manifests of many millions of blocks.
 * Locking is not part of this interface: the directory store locks local files
 * (src/storage/store/lock.ts); a remote backend needs a lease object (a conditional PUT of
 * `lock` with an expiry) — the one piece of snapshot logic that would change.
 *
 * Keys are '/'-separated relative names: `store.json`, `keys/<key-id>.json`,
 * `volumes/<id>.json`, `snapshots/<id>.json`, `snapshots/<id>.map`, `blocks/<aa>/<digest hex>`.
 *
 * Durability contract:
 * - `put` and `ObjectWriter.commit` return once the object is durable under its name.
 * - `putIfAbsent` returns once the content is durable; the *name* may become durable only at
 *   the next `flush()` (the directory backend batches directory fsyncs there). An object is
 *   never visible under its name with content that is not yet durable.
 * - Objects appear atomically: a reader sees the old object, the new one, or none.
 */
import * as path from 'node:path';
import { DisksnapError, isDisksnapError } from '../../engine/errors';

export interface ObjectInfo {
  key: string;
  /** bytes; -1 where the listing was asked for no sizes and would have had to look */
  size: number;
}

export interface ListOptions {
  /** false: the caller reads no size (records are read whole anyway); default true */
  sizes?: boolean;
}

export interface ObjectReader {
  readonly size: number;
  /** Up to `length` bytes at `offset` (short only at the end of the object). */
  read(offset: number, length: number): Promise<Buffer>;
  close(): Promise<void>;
}

export interface ObjectWriter {
  write(data: Uint8Array): Promise<void>;
  /** Makes the object durable and visible under its key (replacing any old one). */
  commit(): Promise<void>;
  /** Discards what was written; the key is untouched. */
  abort(): Promise<void>;
}

/** An object's bytes: one buffer, or parts written one after the other (gathered). */
export type ObjectData = Uint8Array | readonly Uint8Array[];

/** Whether a store location is an S3 URL (./s3.ts) rather than a directory. */
export function isS3Url(s: string): boolean {
  return s.startsWith('s3://');
}

export function dataLength(data: ObjectData): number {
  if (data instanceof Uint8Array) return data.length;
  let n = 0;
  for (const p of data) n += p.length;
  return n;
}

export function dataBytes(data: ObjectData): Uint8Array {
  return data instanceof Uint8Array ? data : Buffer.concat(data as Uint8Array[]);
}

export interface StoreBackend {
  /** For messages: a directory path, a bucket URL. */
  readonly location: string;
  /** Path of an object for error messages. */
  describe(key: string): string;

  // ---- the core ----

  /**
   * The whole object. With `into`, reads into it when the object fits and returns a view of
   * it (no allocation per block); otherwise allocates. ENOENT when absent.
   */
  get(key: string, into?: Buffer): Promise<Buffer>;
  /**
   * Writes the object unless one exists under the key; true when it wrote. `sha256`, when the
   * caller already has it, is the SHA-256 of the data (a plain block's digest): an S3 backend
   * sends it as the signed payload hash instead of hashing the body again, and the server
   * refuses a body that does not match it.
   */
  putIfAbsent(key: string, data: ObjectData, sha256?: Uint8Array): Promise<boolean>;
  /**
   * putIfAbsent of several objects at once, each as it would be alone (true: written); a
   * failure of any is thrown once every one has finished. Fallback: none (callers put each).
   */
  putManyIfAbsent?(items: Array<{ key: string; data: Uint8Array }>): Promise<boolean[]>;
  /** Atomically replaces the object; durable on return. */
  put(key: string, data: Uint8Array): Promise<void>;
  /**
   * Objects under a prefix ending in '/', recursively, in no particular order. Temporary
   * objects of interrupted writers are listed too, with `temporary` set, so gc can remove them.
   * With `sizes: false` a backend may give -1 for sizes it would have to ask for one by one
   * (the directory store skips a stat a file).
   */
  list(prefix: string, opts?: ListOptions): AsyncIterable<ObjectInfo & { temporary: boolean }>;
  /** Removes the object; false when it was not there. */
  delete(key: string): Promise<boolean>;

  // ---- optional (fullBackend() supplies them from the core) ----

  /**
   * A small object (a record) whole, as get() reads it, where the backend has a cheaper way for
   * small ones (the directory backend: one synchronous read, not a thread-pool trip each).
   */
  getSmall?(key: string): Promise<Buffer>;
  /**
   * Small objects (records) whole, in the order of `keys`: each a Buffer, or the DisksnapError
   * that reading it gave (ENOENT for one that is gone). The directory backend reads them in
   * one native call; the fallback runs RECORD_READS getSmall at a time (on S3 each one is a
   * round trip). Errors other than DisksnapErrors are thrown.
   */
  getSmallMany?(keys: string[]): Promise<Array<Buffer | DisksnapError>>;
  /** Size of an object, or undefined when absent (HEAD). */
  stat?(key: string): Promise<number | undefined>;
  /** Reader for ranges of one object; ENOENT when absent. */
  open?(key: string): Promise<ObjectReader>;
  /**
   * Up to `length` bytes at `offset` of one object (short only at its end), in one request:
   * a piece in a pack (./packs.ts). ENOENT when absent.
   */
  getRange?(key: string, offset: number, length: number): Promise<Buffer>;
  /** Streaming put; nothing visible until commit. */
  create?(key: string): Promise<ObjectWriter>;
  /** Makes every name created by putIfAbsent so far durable. */
  flush?(): Promise<void>;
  /**
   * Starts reading objects that are about to be opened or read and that nobody changes (a
   * completed snapshot's manifest and tags, the tag key), where that is a round trip (S3): the
   * next open() or get() of each key gets this read, so the wait overlaps other work.
   * Fallback: nothing.
   */
  prefetch?(keys: string[]): void;
  /**
   * A buffer the backend writes fastest from (the directory backend aligns it for O_DIRECT).
   * Callers that fill blocks in it pass views of it to putIfAbsent. `bulk`: it will carry many
   * times its size (./direct.ts bigBuffer).
   */
  allocBuffer?(size: number, bulk?: boolean): Buffer;
  /**
   * Object requests the backend serves at once, where throughput needs that many in flight
   * (S3: its bound on requests); readers keep at least twice this many queued. Undefined: local.
   */
  readonly concurrency?: number;
  /**
   * The local file that holds an object, where objects are files (the directory backend):
   * a restore clones plain blocks from it on filesystems that share extents.
   */
  localFile?(key: string): string;
}

export type FullBackend = Required<Omit<StoreBackend, 'allocBuffer' | 'localFile' | 'concurrency' | 'putManyIfAbsent'>> & Pick<StoreBackend, 'allocBuffer' | 'localFile' | 'concurrency' | 'putManyIfAbsent'>;

/** `b` with every optional method: its own where it has one, else built from the core. */
export function fullBackend(b: StoreBackend): FullBackend {
  const stat =
    b.stat?.bind(b) ??
    (async (key: string) => {
      try {
        return (await b.get(key)).length;
      } catch (e) {
        if (isDisksnapError(e, 'ENOENT')) return undefined;
        throw e;
      }
    });
  const open =
    b.open?.bind(b) ??
    (async (key: string): Promise<ObjectReader> => {
      const whole = await b.get(key);
      return {
        size: whole.length,
        read: async (offset, length) => whole.subarray(Math.min(offset, whole.length), Math.min(whole.length, offset + length)),
        close: async () => undefined,
      };
    });
  const create =
    b.create?.bind(b) ??
    (async (key: string): Promise<ObjectWriter> => {
      let parts: Buffer[] | undefined = [];
      return {
        write: async (data) => {
          if (!parts) throw new DisksnapError(`${b.describe(key)}: write after commit or abort`, 'EINVALID');
          parts.push(Buffer.from(data));
        },
        commit: async () => {
          if (!parts) throw new DisksnapError(`${b.describe(key)}: commit after commit or abort`, 'EINVALID');
          const all = Buffer.concat(parts);
          parts = undefined;
          await b.put(key, all);
        },
        abort: async () => {
          parts = undefined;
        },
      };
    });
  const getRange =
    b.getRange?.bind(b) ??
    (async (key: string, offset: number, length: number): Promise<Buffer> => {
      const r = await open(key);
      try {
        return await r.read(offset, length);
      } finally {
        await r.close();
      }
    });
  const getSmall = b.getSmall?.bind(b) ?? ((key: string) => b.get(key));
  const getSmallMany =
    b.getSmallMany?.bind(b) ??
    (async (keys: string[]): Promise<Array<Buffer | DisksnapError>> => {
      const out: Array<Buffer | DisksnapError> = new Array(keys.length);
      let next = 0;
      const worker = async () => {
        for (let i = next++; i < keys.length; i = next++) {
          try {
            out[i] = await getSmall(keys[i]);
          } catch (e) {
            if (e instanceof DisksnapError) out[i] = e;
            else throw e;
          }
        }
      };
      await Promise.all(Array.from({ length: Math.min(RECORD_READS, keys.length) }, worker));
      return out;
    });
  const flush = b.flush?.bind(b) ?? (async () => undefined);
  const prefetch = b.prefetch?.bind(b) ?? (() => undefined);
  return {
    location: b.location,
    describe: (key) => b.describe(key),
    get: (key, into) => b.get(key, into),
    getSmall,
    getSmallMany,
    putIfAbsent: (key, data, sha256) => b.putIfAbsent(key, data, sha256),
    put: (key, data) => b.put(key, data),
    list: (prefix, opts) => b.list(prefix, opts),
    delete: (key) => b.delete(key),
    stat,
    open,
    getRange,
    create,
    flush,
    prefetch,
    allocBuffer: b.allocBuffer?.bind(b),
    putManyIfAbsent: b.putManyIfAbsent?.bind(b),
    localFile: b.localFile?.bind(b),
    concurrency: b.concurrency,
  };
}

/** Records (snapshots, volumes) a listing reads at once where each is a request of its own. */
const RECORD_READS = 16;

/**
 * Every record (`ID.json`) under `prefix`, each given to `read` with its bytes (getSmallMany:
 * one native call on a directory store; on S3 RECORD_READS requests at a time: 60 snapshots
 * on the Ceph gateway, `snapshot list` 0.61 s -> 0.55 s, a small volume's `snapshot create`
 * 1.03 s -> 0.87 s). A backend without getSmallMany (a test's) has `read` called without
 * bytes, RECORD_READS at a time. One deleted while we listed is left out; an unreadable one is
 * reported in listing order, not thrown.
 */
export async function readListed<R>(
  backend: Pick<StoreBackend, 'list' | 'getSmallMany'>,
  prefix: string,
  read: (id: string, bytes?: Buffer) => Promise<R>,
): Promise<{ records: R[]; damaged: { id: string; error: DisksnapError }[] }> {
  const keys: string[] = [];
  for await (const o of backend.list(prefix, { sizes: false })) if (!o.temporary && o.key.endsWith('.json')) keys.push(o.key);
  const ids = keys.map((k) => path.basename(k, '.json'));
  const got: Array<R | undefined> = new Array(ids.length);
  const bad: Array<DisksnapError | undefined> = new Array(ids.length);
  const one = async (i: number, bytes: Buffer | DisksnapError | undefined): Promise<void> => {
    try {
      if (bytes instanceof DisksnapError) throw bytes;
      got[i] = await read(ids[i], bytes);
    } catch (e) {
      if (isDisksnapError(e, 'ENOENT')) return; // deleted while we listed
      if (e instanceof DisksnapError) bad[i] = e;
      else throw e;
    }
  };
  if (backend.getSmallMany) {
    const all = await backend.getSmallMany(keys);
    for (let i = 0; i < ids.length; i++) await one(i, all[i]);
  } else {
    let next = 0;
    const worker = async () => {
      for (let i = next++; i < ids.length; i = next++) await one(i, undefined);
    };
    await Promise.all(Array.from({ length: Math.min(RECORD_READS, ids.length) }, worker));
  }
  return {
    records: got.filter((r): r is R => r !== undefined),
    damaged: ids.flatMap((id, i) => (bad[i] ? [{ id, error: bad[i]! }] : [])),
  };
}
