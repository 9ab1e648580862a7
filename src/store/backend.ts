/**
 * The one interface through which a snapshot store touches its storage. The directory
 * backend (src/store/dir.ts) is the only one today; an S3-compatible bucket prefix can be
 * added later by implementing this interface, without touching snapshot logic:
 *
 *   get           GET (whole object, or a range through `open`)
 *   putIfAbsent   PUT with If-None-Match: * — content-addressed block objects
 *   put           PUT — records (atomic replace)
 *   create        multipart upload — manifests, streamed, published on commit
 *   list          LIST prefix
 *   delete        DELETE
 *   flush         nothing (S3 PUTs are durable when they return)
 *
 * Keys are '/'-separated relative names: `store.json`, `volumes/<id>.json`,
 * `snapshots/<id>.json`, `snapshots/<id>.map`, `blocks/<aa>/<digest hex>`.
 *
 * Durability contract:
 * - `put` and `ObjectWriter.commit` return once the object is durable under its name.
 * - `putIfAbsent` returns once the content is durable; the *name* may become durable only at
 *   the next `flush()` (the directory backend batches directory fsyncs there). An object is
 *   never visible under its name with content that is not yet durable.
 * - Objects appear atomically: a reader sees the old object, the new one, or none.
 *
 * Locking is not part of this interface: the directory store locks a local file
 * (src/store/lock.ts); a remote backend will need a lease object instead.
 */

export interface ObjectInfo {
  key: string;
  size: number;
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

export interface StoreBackend {
  /** For messages: a directory path, a bucket URL. */
  readonly location: string;
  /** Path of an object for error messages. */
  describe(key: string): string;
  /**
   * The whole object. With `into`, reads into it when the object fits and returns a view of
   * it (no allocation per block); otherwise allocates. ENOENT when absent.
   */
  get(key: string, into?: Buffer): Promise<Buffer>;
  /** Size of an object, or undefined when absent (HEAD). */
  stat(key: string): Promise<number | undefined>;
  /** Writes the object unless one exists under the key; true when it wrote. */
  putIfAbsent(key: string, data: Uint8Array): Promise<boolean>;
  /** Atomically replaces the object; durable on return. */
  put(key: string, data: Uint8Array): Promise<void>;
  /** Streaming put; nothing visible until commit. */
  create(key: string): Promise<ObjectWriter>;
  /** Reader for ranges of one object; ENOENT when absent. */
  open(key: string): Promise<ObjectReader>;
  /**
   * Objects under a prefix ending in '/', recursively, in no particular order. Temporary
   * objects of interrupted writers are listed too, with `temporary` set, so gc can remove them.
   */
  list(prefix: string): AsyncIterable<ObjectInfo & { temporary: boolean }>;
  /** Removes the object; false when it was not there. */
  delete(key: string): Promise<boolean>;
  /** Makes every name created by putIfAbsent so far durable. */
  flush(): Promise<void>;
  /**
   * Optional: a buffer the backend writes fastest from (the directory backend aligns it for
   * O_DIRECT). Callers that fill blocks in it pass views of it to putIfAbsent.
   */
  allocBuffer?(size: number): Buffer;
}
