/**
 * The only module that loads the C++ addon (`build/Release/disksnap.node`). Everything else
 * imports the typed API below, never the addon itself.
 *
 * Conventions of the boundary:
 * - Offsets and lengths are plain JS numbers (exact up to 2^53 bytes = 8 PiB).
 * - Buffers are passed as Uint8Array views; C++ uses the view's own offset and length.
 * - Every failing call throws `DisksnapError` (code, errno, path), built by C++ from the
 *   constructor handed over in `setErrorClass`.
 * - `...Async` forms run on libuv's thread pool (napi AsyncWorker) and return Promises; the
 *   JS stack of the caller is kept in the rejection.
 * - Batched I/O: `requests` is a Float64Array of triples [fileOffset, bufferOffset, length],
 *   all executed in one native call.
 */
import * as path from 'node:path';
import { DisksnapError } from './errors';

/** `open` flags, our own bit set (mapped to O_* in C++). */
export const OPEN_READ = 0;
export const OPEN_WRITE = 1; // O_RDWR (otherwise O_RDONLY)
export const OPEN_CREATE = 2; // O_CREAT
export const OPEN_EXCL = 4; // O_EXCL
export const OPEN_DIRECT = 8; // O_DIRECT: buffers, offsets and lengths must be aligned
export const OPEN_TRUNC = 16; // O_TRUNC

/** `lock` modes: OFD locks on the byte range QEMU uses, so QEMU and disksnap see each other. */
export const LOCK_NONE = 0;
export const LOCK_SHARED = 1;
export const LOCK_EXCLUSIVE = 2;

/** `fallocate` modes. */
export const FALLOC_ALLOCATE = 0;
export const FALLOC_PUNCH_HOLE = 1; // PUNCH_HOLE|KEEP_SIZE
export const FALLOC_ZERO_RANGE = 2; // ZERO_RANGE (falls back to punch-hole where unsupported)

/** native mtimeProbe's answer for one directory. */
export interface MtimeProbe {
  /** st_dev of the filesystem probed */
  dev: number;
  fine: boolean;
  wholeSeconds: boolean;
}

export interface NativeStat {
  size: number;
  /** bytes actually allocated (st_blocks * 512) */
  allocated: number;
  mtimeNs: bigint;
  ctimeNs: bigint;
  dev: number;
  ino: bigint;
  mode: number;
  /** st_blksize */
  blockSize: number;
  isBlockDevice: boolean;
  isRegular: boolean;
}

export interface BlockHashes {
  /** 32 bytes per block, consecutive */
  digests: Buffer;
  /** one byte per block: 1 when every byte of the block is zero */
  zero: Uint8Array;
  /** with a tag key: 16 bytes per block, the unmasked change tag (zeros for zero blocks) */
  tags?: Buffer;
  /**
   * hashBlocksAsync with a granule size: each granule's tag and zero flag, blockSize /
   * granuleSize per block (past a short last block: zero)
   */
  granules?: BlockTags;
}

export interface BlockTags {
  /** 16 bytes per block: the unmasked change tag (zeros for zero blocks) */
  tags: Buffer;
  zero: Uint8Array;
}

/** tagFile's collect mode: the changed blocks' slots in the caller's buffer. */
export interface CollectedTags extends BlockTags {
  slot: Int32Array;
  /** slots filled */
  collected: number;
  /**
   * With a granuleSize: the granules of the copies, granule s of slot k at k * blockSize /
   * granuleSize + s (as tagBlocksAsync over the buffer would give), taken from the copies
   */
  granuleTags?: Buffer;
  granuleZero?: Uint8Array;
}

export interface HashFileOptions {
  threads?: number;
  /** HMAC-SHA-256 key; plain SHA-256 when absent */
  key?: Uint8Array;
  /** called on the JS thread with bytes hashed so far */
  onProgress?: (done: number, total: number) => void;
}

/** `loopStatus` (LOOP_GET_STATUS64); `loopStatus` returns null for an unbound device. */
export interface LoopStatus {
  /** lo_number */
  number: number;
  /** st_dev of the backing file, in stat(2)'s encoding */
  backingDev: number;
  backingIno: bigint;
  offset: number;
  sizeLimit: number;
  /** LO_FLAGS_*: 1 read-only, 4 autoclear, 8 partscan, 16 direct I/O */
  flags: number;
  /** lo_file_name: the first 63 bytes of the path given at attach (sysfs has the whole path) */
  fileName: string;
}

export const LO_FLAGS_READ_ONLY = 1;
export const LO_FLAGS_AUTOCLEAR = 4;
export const LO_FLAGS_DIRECT_IO = 16;

export interface NativeAddon {
  readonly version: string;
  setErrorClass(ctor: typeof DisksnapError): void;

  open(path: string, flags: number, mode: number): number;
  close(fd: number): void;
  /** Throws ELOCKED (with the path) when a conflicting lock is held by another open file. */
  lock(fd: number, mode: number, path: string): void;

  pread(fd: number, buf: Uint8Array, offset: number): number;
  pwrite(fd: number, buf: Uint8Array, offset: number): void;
  preadAsync(fd: number, buf: Uint8Array, offset: number): Promise<number>;
  pwriteAsync(fd: number, buf: Uint8Array, offset: number): Promise<void>;
  preadBatch(fd: number, buf: Uint8Array, requests: Float64Array): number;
  pwriteBatch(fd: number, buf: Uint8Array, requests: Float64Array): void;
  preadBatchAsync(fd: number, buf: Uint8Array, requests: Float64Array): Promise<number>;
  pwriteBatchAsync(fd: number, buf: Uint8Array, requests: Float64Array): Promise<void>;

  fsync(fd: number, dataOnly: boolean): void;
  fsyncAsync(fd: number, dataOnly: boolean): Promise<void>;
  fallocate(fd: number, mode: number, offset: number, length: number): void;
  fstat(fd: number): NativeStat;
  /** A directory's entries (not . or ..), each with st_mode and st_uid as lstat gives them; ENOTDIR for a link to one. */
  lstatDir(dir: string): { names: string[]; modes: number[]; uids: number[] };
  /**
   * The files `names` of directory `dir`, each read whole (native/records.cc): `data` holds
   * them one after the other, file i ending at ends[i]; `failed` is [index, error, ...] for
   * those that could not be read (ENOENT when gone, ELOOP for a link, which is not followed,
   * EISDIR, EFBIG past maxBytes). Throws when `dir` cannot be opened.
   */
  readFiles(dir: string, names: string[], maxBytes: number): { data: Buffer; ends: Float64Array; failed: Array<number | DisksnapError> };
  /** Resolution of CLOCK_REALTIME_COARSE (ns), the clock file mtimes are stamped from; 0 if unknown. */
  timestampTickNs(): number;
  /**
   * How writes move a file's mtime on `dir`'s filesystem, probed on an unnamed O_TMPFILE (null
   * where none can be made): `fine` when a write right after an fstat always moves it (Linux
   * 6.13+ multigrain timestamps), `wholeSeconds` when times have no nanoseconds.
   */
  mtimeProbe(dir: string): MtimeProbe | null;
  ftruncate(fd: number, size: number): void;
  /** Data extents in [offset, offset+length) as pairs [start, length] (SEEK_DATA/SEEK_HOLE). */
  extents(fd: number, offset: number, length: number): Float64Array;
  /**
   * FS_IOC_FIEMAP over [offset, offset+length), the file's dirty pages written back first:
   * quads [logical, physical, length, flags] (FIEMAP_EXTENT_* flags; see FIEMAP_FLAGS).
   */
  fiemap(fd: number, offset: number, length: number): Float64Array;
  fiemapAsync(fd: number, offset: number, length: number): Promise<Float64Array>;
  /** copy_file_range, falling back to pread/pwrite; returns bytes copied (short only at EOF). */
  copyRange(fdIn: number, offIn: number, fdOut: number, offOut: number, length: number): number;
  copyRangeAsync(fdIn: number, offIn: number, fdOut: number, offOut: number, length: number): Promise<number>;
  /** FICLONE; false where the filesystem cannot share extents (the caller falls back). */
  clone(fdSrc: number, fdDst: number): boolean;
  /** FICLONERANGE; false where unsupported or not aligned for the filesystem. */
  cloneRange(fdSrc: number, srcOffset: number, fdDst: number, dstOffset: number, length: number): boolean;

  /** SHA-256 (or HMAC-SHA-256 with key) of consecutive blocks of buf; the last may be short. */
  hashBlocks(buf: Uint8Array, blockSize: number, threads: number, key?: Uint8Array, tagKey?: Uint8Array): BlockHashes;
  /**
   * With a 32-byte `tagKey`, also each block's unmasked change tag (src/storage/store/tags.ts);
   * with a `granuleSize` (a divisor of blockSize) too, each granule's, and the blocks' tags
   * are then combined from their granules' (one GHASH pass for both where the CPU has
   * VPCLMULQDQ: native/ghash.h Combine). With `fd` and `reads` ([fileOffset, bufferOffset,
   * length] triples, buffer offsets within buf, as preadBatchAsync), the same pool job reads
   * them into buf first (zeros past the end of the file), then hashes.
   */
  hashBlocksAsync(buf: Uint8Array, blockSize: number, threads: number, key?: Uint8Array, tagKey?: Uint8Array, granuleSize?: number, fd?: number, reads?: Float64Array): Promise<BlockHashes>;
  /**
   * SHA-256 (or HMAC-SHA-256 with key) of each span of buf (`spans`: [offset, length] pairs),
   * 32 bytes each in that order, in one pool job on up to `threads` threads, two spans at a
   * time where SHA-NI allows; no zero check. For objects scattered in one buffer.
   */
  hashSpansAsync(buf: Uint8Array, spans: Float64Array, threads: number, key?: Uint8Array): Promise<Buffer>;
  /**
   * Reads [offset, offset+length) of fd like hashFile but computes no SHA-256: zero flags and
   * the unmasked change tag (GHASH under tagKey, 16 bytes) of each non-zero block.
   */
  tagFile(fd: number, offset: number, length: number, blockSize: number, threads: number, tagKey: Uint8Array): Promise<BlockTags>;
  /**
   * The same read, and in it the blocks that changed: a non-zero block whose tag is not
   * `expect` (16 bytes per block; only where `known` is 1) is copied into `buf` at slot *
   * blockSize, not hashed (the caller hashes those it stores whole); slots go in any order, as
   * many as `buf` holds. `slot[b]`: the block's slot, -1 when zero or unchanged, -2 when changed
   * but past `buf`'s capacity (read it again). With `granuleSize`, also the zero flags and
   * unmasked tags of each copy's granules, and its block tag combined from them (one GHASH pass
   * over the copy for both).
   */
  tagFile(fd: number, offset: number, length: number, blockSize: number, threads: number, tagKey: Uint8Array, expect: Uint8Array, known: Uint8Array, buf: Uint8Array, granuleSize?: number): Promise<CollectedTags>;
  /**
   * Zero flags and unmasked change tags of the consecutive blocks of `buf` (no SHA-256): the
   * tags of 64 KiB granules of blocks already in memory (src/storage/store/tags.ts).
   */
  tagBlocksAsync(buf: Uint8Array, blockSize: number, threads: number, tagKey: Uint8Array): Promise<BlockTags>;
  /** GMAC masks E_K(J0(iv)), 16 bytes per 16-byte iv: stored tag = unmasked tag ^ mask. */
  tagMasks(tagKey: Uint8Array, ivs: Uint8Array): Buffer;
  /**
   * What tagFile measured reading the file fd is open on, in this process: ns of CPU per MiB
   * read mapped and by pread (-1 where not measured). A file's first call of at least 16 MiB
   * of data maps, its second preads, and every later call takes the cheaper way (the page
   * cache's state decides which: native/hash_engine.cc ChooseReadWay). A diagnostic.
   */
  tagReadCosts(fd: number): { mapped: number; pread: number };
  /**
   * What this process hashes with (DISKSNAP_HASH_IMPL and the CPU decide, once): SHA-256 with
   * SHA-NI (`sha-ni-x2`) or node's OpenSSL; change tags' GHASH with VPCLMULQDQ in 512-bit
   * (`vpclmulqdq-512`, AVX-512) or 256-bit registers, or OpenSSL's GMAC.
   */
  hashImplementations(): { sha256: 'sha-ni-x2' | 'openssl'; ghash: 'vpclmulqdq-512' | 'vpclmulqdq-256' | 'openssl' };
  /**
   * AES-256-GCM seal of block objects in place (format: src/storage/store/crypto.ts), on `threads`
   * threads: spans are [offset, length] pairs in buf, digests 32 bytes each (the AAD).
   * Resolves to the 32-byte trailers, one after the other.
   */
  gcmSealAsync(key: Uint8Array, buf: Uint8Array, spans: Float64Array, digests: Uint8Array, threads: number): Promise<Buffer>;
  /**
   * Opens sealed objects: spans are [stagingOffset, sealedLength, outOffset] triples. Resolves
   * to a code per object: 0 opened, 1 too short, 2 no trailer, 3 failed authentication (its
   * plaintext zeroed in out).
   */
  gcmOpenAsync(key: Uint8Array, staging: Uint8Array, out: Uint8Array, spans: Float64Array, digests: Uint8Array, threads: number): Promise<Uint8Array>;
  /**
   * Writes an object into `dir` (an unnamed file, O_DIRECT for an aligned head, fdatasync)
   * and links it under `name` if that is free: 0 published, 1 the name existed.
   */
  putObjectAsync(dir: string, name: string, head: Uint8Array, tail?: Uint8Array): Promise<number>;
  /**
   * putObjectAsync for each object (no tails), several in flight, in one pool job: per object 0
   * published, 1 the name existed, plus 2 where the call made the object's directory; -ENOENT
   * (-2) where the directory's parent is missing too; rejects with the first other failure once
   * all are done.
   */
  putObjectsAsync(dirs: string[], names: string[], heads: Uint8Array[]): Promise<Int32Array>;
  /** Reads a whole file into buf when it fits; resolves to the file's size either way. */
  readObjectAsync(path: string, buf: Uint8Array): Promise<number>;
  /** Opens, fsyncs and closes each directory, several at a time, in one pool job; rejects with the first failure. */
  syncDirsAsync(dirs: string[]): Promise<void>;
  /** Bytes from the start of `buf` to its first address that is a multiple of `align` (a power of two). */
  alignOffset(buf: Uint8Array, align: number): number;
  /**
   * `size` bytes of fresh zero memory, a mapping of its own starting on a 2 MiB boundary, in
   * 2 MiB pages, or 4 KiB ones where the guest hands free memory back to its host
   * (bufferPages), unmapped when the Buffer is collected (native/object.cc). `bulk`: a buffer
   * that carries many times its size of O_DIRECT requests, in 2 MiB pages either way (unless
   * DISKSNAP_BUFFER_PAGES=small).
   */
  allocBig(size: number, bulk?: boolean): Buffer;
  /** The page size allocBig uses in this process, and why (DISKSNAP_BUFFER_PAGES=huge|small forces one). */
  bufferPages(): { pages: 'huge' | 'small'; reason: 'forced' | 'free page reporting' | 'default' };
  /**
   * Faults in buf's whole pages for writing on the thread pool (MADV_POPULATE_WRITE), its
   * contents unchanged; false where the kernel cannot (before Linux 5.14).
   */
  populateAsync(buf: Uint8Array): Promise<boolean>;
  /**
   * The consecutive manifest entries of `chunk` from byte `pos` with a block index below
   * `limit`, each checked as ManifestReader.take checks it; stops before the first that is not
   * (past the limit, or failing a check) or at the chunk's end, and returns how many.
   * `state`: [lastIndex, lastSlot, slots, blocks, volumeSize, blockSize, pieceSize] in; [0] and
   * [1] set to the last entry consumed, [7] to how many consumed entries start another block,
   * [8] to 1 when any is a piece (native/manifest.cc).
   */
  scanEntries(chunk: Uint8Array, pos: number, limit: number, state: Float64Array): number;
  /**
   * Copies the digest of each 40-byte manifest entry in [0, end) of `chunk` that is a piece
   * (`pieces`) or a whole block (not) into `out` at `outOffset`, one after the other; returns
   * how many (native/manifest.cc). `out` needs room for a digest per entry.
   */
  entryDigests(chunk: Uint8Array, end: number, pieces: boolean, out: Uint8Array, outOffset: number): number;
  /**
   * Whether every 8-byte entry of the qcow2 L2 table `table` is empty, zero, or a plain data
   * cluster inside `fileSize`, cluster-aligned and not a metadata cluster (bit c of `metaBits`,
   * for c below `metaLimit`; a cluster at or past it answers false) (native/qcow2.cc).
   */
  l2Ordinary(table: Uint8Array, clusterSize: number, fileSize: number, metaBits: Uint8Array, metaLimit: number): boolean;
  /**
   * The runs of set bits among the first `limit` bits of `data` (bit i: bit i % 8 of byte
   * i / 8), as [from, to) pairs laid flat, in order (native/qcow2.cc).
   */
  bitRuns(data: Uint8Array, limit: number): Float64Array;
  /**
   * Tables of `entryLength`-byte entries sorted by the key at their start, each key once
   * (native/sorted.cc): the index of the entry whose key is `key` (its first key.length bytes),
   * or -1.
   */
  sortedFind(table: Uint8Array, entryLength: number, key: Uint8Array): number;
  /** -1 when every entry's key (its first keyLength bytes) is greater than the one before, else the index of the first that is not. */
  sortedCheck(table: Uint8Array, entryLength: number, keyLength: number): number;
  /** Sorts the entries in place by key, keeps the first of each key at the front, and returns how many that is. */
  sortRecords(table: Uint8Array, entryLength: number, keyLength: number): number;
  /**
   * For each distinct key of `keys` and `laterKeys` (keyLength bytes each, any order, repeats
   * allowed), in ascending order, the entry of the first of `tables` (sorted, as sortedCheck
   * accepts) that holds it; keys in no table are left out. `later`: how many of those entries
   * are for keys among `laterKeys`. `entries` has `before` zero bytes ahead of them and `after`
   * behind (room for a header and a trailer).
   */
  sortedJoin(keys: Uint8Array, keyLength: number, tables: Uint8Array[], entryLength: number, laterKeys?: Uint8Array, before?: number, after?: number): { entries: Buffer; later: number };
  /** Process-wide malloc settings for short commands that move a lot of data (native/object.cc); false where refused. */
  tuneMalloc(): boolean;
  /** Reads [offset, offset+length) of fd and hashes it block by block on worker threads. */
  hashFile(
    fd: number,
    offset: number,
    length: number,
    blockSize: number,
    threads: number,
    key: Uint8Array | undefined,
    onProgress: ((done: number, total: number) => void) | undefined,
    /** with it, also each block's unmasked change tag */
    tagKey?: Uint8Array,
  ): Promise<BlockHashes>;
  isZero(buf: Uint8Array): boolean;

  // Loop devices, freeze, FUSE mounts (native/loop.cc, native/fuse.cc; policy in src/host/).
  /**
   * LOOP_CTL_GET_FREE + LOOP_CONFIGURE (or LOOP_SET_FD + LOOP_SET_STATUS64), retried on races.
   * The device keeps its own reference to fd's open file description (and so its OFD lock)
   * until detached; `name` goes into lo_file_name.
   */
  loopAttach(fd: number, readOnly: boolean, directIo: boolean, name: string): { device: string; index: number; method: string };
  /** LOOP_CLR_FD; ENXIO when nothing is attached. */
  loopDetach(device: string): void;
  loopStatus(device: string): LoopStatus | null;
  /** FIFREEZE / FITHAW on any file or directory of a mounted filesystem. */
  fsFreeze(mountpoint: string): void;
  fsFreezeAsync(mountpoint: string): Promise<void>;
  fsThaw(mountpoint: string): void;
  /** BLKGETSIZE64 */
  blockDeviceSize(fd: number): number;
  /** Opens /dev/fuse and mounts it (type fuse.disksnap) at mountpoint; returns the /dev/fuse fd. */
  fuseMount(mountpoint: string, fsname: string, readOnly: boolean, extraOptions: string): number;
  /** umount2, MNT_DETACH when lazy. */
  unmount(path: string, lazy: boolean): void;
}

import { PACKAGE_ROOT as ROOT } from './root';

function load(): NativeAddon {
  const candidates = [
    path.join(ROOT, 'build', 'Release', 'disksnap.node'),
    path.join(ROOT, 'build', 'Debug', 'disksnap.node'),
  ];
  const failures: string[] = [];
  for (const file of candidates) {
    try {
      // eslint-disable-next-line @typescript-eslint/no-var-requires
      const addon = require(file) as NativeAddon;
      addon.setErrorClass(DisksnapError);
      return namingFiles(addon);
    } catch (e) {
      const err = e as NodeJS.ErrnoException;
      if (err.code === 'MODULE_NOT_FOUND' && String(err.message).includes(file)) continue;
      failures.push(`${file}: ${err.message}`);
    }
  }
  const why = failures.length
    ? `it failed to load:\n  ${failures.join('\n  ')}`
    : `it is not built (no build/Release/disksnap.node under ${ROOT})`;
  throw new DisksnapError(
    `disksnap's native addon cannot be used: ${why}\n` +
      'Rebuild it with `npm run build:native` (needs python3, make and a C++17 compiler; ' +
      'node-addon-api comes from `npm install`).',
    'ENOADDON',
  );
}

/**
 * Native calls on a descriptor know only the descriptor, so their errors would read
 * "ENOSPC: No space left on device, pwritev" with no file. The paths of descriptors opened
 * here are remembered, and an error of a call on one of them gets its path:
 * "ENOSPC: No space left on device, pwritev '/images/new.img'".
 */
const fdPaths = new Map<number, string>();

function withPath(e: unknown, [label, file]: [string, string]): unknown {
  if (!(e instanceof DisksnapError) || e.path !== undefined) return e;
  const named = new DisksnapError(`${e.message} ${label}`, e.code, e.errno, file);
  if (e.stack) named.stack = e.stack.replace(e.message, named.message);
  return named;
}

/** Calls between two descriptors, and where the second one is: an error names both files. */
const TWO_FILES: Record<string, number> = { copyRange: 2, copyRangeAsync: 2, clone: 1, cloneRange: 2 };

/** [how the message names the files, the error's path (the file written, where two)] */
function filesOf(name: string, args: unknown[]): [string, string] | undefined {
  const first = typeof args[0] === 'number' ? fdPaths.get(args[0]) : undefined;
  const at = TWO_FILES[name];
  const second = at !== undefined && typeof args[at] === 'number' ? fdPaths.get(args[at] as number) : undefined;
  if (first !== undefined && second !== undefined) return [`'${first}' -> '${second}'`, second];
  const one = first ?? second;
  return one === undefined ? undefined : [`'${one}'`, one];
}

function namingFiles(addon: NativeAddon): NativeAddon {
  const wrapped: Record<string, unknown> = { ...addon };
  for (const [name, fn] of Object.entries(addon)) {
    if (typeof fn !== 'function' || name === 'open' || name === 'close') continue;
    // The hot path (a 4 KiB read or write per call) pays for no lookup and no string: the
    // files are looked up when a synchronous call throws (its descriptors are still open),
    // and at the call for an asynchronous one (they may be closed when it settles).
    const call = fn as (...a: unknown[]) => unknown;
    wrapped[name] = (...args: unknown[]): unknown => {
      let r: unknown;
      try {
        r = call(...args);
      } catch (e) {
        const file = filesOf(name, args);
        throw file === undefined ? e : withPath(e, file);
      }
      if (!(r instanceof Promise)) return r;
      const file = filesOf(name, args);
      return file === undefined ? r : r.catch((e: unknown) => Promise.reject(withPath(e, file)));
    };
  }
  wrapped.open = (p: string, flags: number, mode: number): number => {
    const fd = addon.open(p, flags, mode);
    fdPaths.set(fd, p);
    return fd;
  };
  wrapped.close = (fd: number): void => {
    fdPaths.delete(fd);
    addon.close(fd);
  };
  return wrapped as unknown as NativeAddon;
}

/** The addon, loaded on first use so that `--help` works even where it is not built. */
let cached: NativeAddon | undefined;
let tuneOnLoad = false;
export function native(): NativeAddon {
  if (!cached) {
    cached = load();
    if (tuneOnLoad) cached.tuneMalloc();
  }
  return cached;
}

/**
 * The CLI's process keeps freed memory for reuse (native/object.cc, tuneMalloc): set when the
 * addon loads, so that commands that never load it pay nothing.
 */
export function tuneProcessMemory(): void {
  tuneOnLoad = true;
  cached?.tuneMalloc();
}
