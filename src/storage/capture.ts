/**
 * One attempt at reading a volume into a new manifest: the shared read pipeline, and the
 * frame around the change-detection path (./detect.ts) that decides which blocks to read,
 * hash and store.
 *
 *   stable stat ──► manifest (+ change tags) writers ──► parent's manifest (+ tags) opened
 *   ──► detector(pipeline, parent) ──► [second pass: every block as it was read]
 *   ──► stat again: moved => VolumeChanged ──► readDone() (thaw, drop the clone)
 *   ──► every object write settled
 *
 * The pipeline is the same for every path: chunk buffers from a small pool (memory bound),
 * a read-ahead of one chunk (./pool.ts readAhead), hashing on worker threads, sealing where
 * the store encrypts, object writes throttled to MAX_WRITE_BYTES in flight, and progress
 * after each chunk. An object is always written from the buffer whose bytes were hashed, so
 * its bytes match its name even when the volume changes under the read.
 *
 * One moment: the stat check sees write(2), but not stores through a shared mmap into pages
 * that are already dirty (neither mtime nor ctime moves). A volume read live (no freeze, no
 * clone) is proven to be of one moment in one of two ways:
 *   - By clean pages (a regular file on ext4, xfs or btrfs): after the first stat, an
 *     fdatasync of the volume writes its dirty pages back, which write-protects every shared
 *     mapping of them; from then on the first store into any page faults, and these
 *     filesystems' page_mkwrite updates mtime (to a later time than the stat's: stableStat,
 *     ./volume-times.ts). Every change after the fdatasync, through write(2) or a mapping,
 *     then moves mtime or ctime, and the stat after the read sees it. No second read.
 *   - By reading again (block devices, other filesystems — tmpfs pages are never written
 *     back, nor write-protected — or the proveByReading test hook): each block's change tag
 *     (GHASH, no SHA-256) computed again and compared with the tag of the bytes the snapshot
 *     recorded, and every block the snapshot has as zero or hole checked to be zero still.
 *     Each byte then had the same value when first read and when read again, and every first
 *     read came before every second one: the snapshot equals the volume at the instant
 *     between the two passes. On a 1 GiB incremental this pass was ~0.3 s of its ~0.9 s.
 * A block that moved throws VolumeChanged (the attempt is retried, then the snapshot is `error`).
 */
import { randomBytes } from 'node:crypto';
import { BlockFile } from '../engine/file';
import type { DiskImage } from '../image';
import { BlockHashes, native } from '../engine/native';
import type { Store } from './store/store';
import type { ObjectData } from './store/backend';
import { sealChunk } from './store/crypto-pool';
import { EntryRun, ManifestCursor, ManifestReader, ManifestWriter, blockCount, blockLength, pieceSizeFor } from './store/manifest';
import { TagKey, TagReader, TagWriter, maskGranules, tagIvs, xor16, SALT_LENGTH } from './store/tags';
import { SnapshotRecord, emptyStats } from './store/records';
import { HASH_CHUNK_BYTES, MAX_BUFFERS, MAX_WRITE_BYTES, ProgressFn, blocksPerChunk, chunksOf, dataRuns, guestRuns, queueObject, queueObjects, sleep, volumeSizeOf } from './common';
import { BufferPool, NumberList, Throttle, readAhead } from './pool';
import { Captured, abortQuietly, percentOf } from './lifecycle';
import { sameStat, stableStat, statMoved, statOf, unsettledMs, writesMoveMtime } from './volume-times';
import { bigBuffer } from './store/direct';
import { PackWriter } from './store/packs';
import { openOutputs, openParent } from './outputs';

/** An object to store from a chunk buffer: `len` bytes at `off`, named `digest`; a piece goes into a pack. */
export interface StoreItem {
  off: number;
  len: number;
  digest: Buffer;
  /** goes into a pack where the snapshot packs (a piece, or a whole block of an unsealed incremental: ./store/packs.ts) */
  piece?: boolean;
}

/** The volume moved while it was being read: the attempt is thrown away (and retried). */
export class VolumeChanged extends Error {}

/** Blocks read into a pool buffer and hashed there (ReadPipeline.readAndHash). */
export interface Hashed {
  buf: Buffer;
  again: BlockHashes;
}

/** What the parent snapshot offers a change-detection path (each part only where usable). */
export interface ParentView {
  /** the parent's manifest: its digest of each block */
  cursor?: ManifestCursor;
  /** the parent's change tags (only with a cursor and a tag key) */
  tags?: TagReader;
}

/**
 * A change-detection path: reads the volume through `p`, records every data block in
 * `p.writer` (and its tag in `p.tagWriter`), and queues the objects the store lacks.
 */
export type ChangeDetector = (p: ReadPipeline, parent: ParentView) => Promise<void>;

/**
 * A volume read as a guest view (a qcow2 image or chain, through the image layer) instead
 * of as the bytes of its file: holes come from the image's map, and `dirty` (from a trusted
 * persistent bitmap) limits the read to the blocks written since the parent.
 */
export interface GuestVolume {
  image: DiskImage;
  dirty?: Array<{ offset: number; length: number }>;
  /** after the read: why the volume moved since this attempt's change information was taken, if it did */
  moved?: () => string | undefined;
}

/**
 * A raw volume read through a new reflink clone whose parent kept a trusted clone too
 * (./reflink.ts): the byte ranges where the two clones map to different physical extents.
 */
export interface ReflinkView {
  dirty: Array<{ offset: number; length: number }>;
}

export interface CaptureSettings {
  /** the volume's guest view, when it is an image format rather than raw bytes */
  guest?: GuestVolume;
  /** the changed ranges from reflink clones, when the parent's clone can be trusted */
  reflink?: ReflinkView;
  threads: number;
  attempt: number;
  tk: TagKey | undefined;
  onProgress?: ProgressFn;
  onLog?: (message: string) => void;
  saveProgress: (percent: number) => void;
  afterChunk?: (attempt: number, chunk: number) => void | Promise<void>;
  /** read live (no freeze, no clone): prove one moment (see above) */
  prove: boolean;
  /** prove it by the second read pass even where clean pages would do (a test hook) */
  proveByReading?: boolean;
}

/** The data blocks recorded so far, ascending, with the unmasked change tag of the bytes recorded. */
class RecordedTags {
  readonly index = new NumberList();
  private tags = Buffer.allocUnsafe(16 * 1024);
  get length(): number {
    return this.index.length;
  }
  push(i: number, u: Buffer, uOff: number): void {
    const n = this.index.length;
    if ((n + 1) * 16 > this.tags.length) {
      const t = Buffer.allocUnsafe(this.tags.length * 2);
      this.tags.copy(t, 0, 0, n * 16);
      this.tags = t;
    }
    u.copy(this.tags, n * 16, uOff, uOff + 16);
    this.index.push(i);
  }
  same(j: number, u: Buffer, uOff: number): boolean {
    return this.tags.compare(u, uOff, uOff + 16, j * 16, j * 16 + 16) === 0;
  }
}

/** The read pipeline of one attempt, shared by every change-detection path. */
export class ReadPipeline {
  readonly n = native();
  readonly bs: number;
  readonly maxBlocks: number;
  /** blocks per native hashFile/tagFile call */
  readonly hashBlocks: number;
  private runsCache: Array<[number, number]> | undefined;
  private totalCache: number | undefined;
  readonly pool: BufferPool;
  /** object writes in flight */
  readonly writes = new Throttle(MAX_WRITE_BYTES);
  /** chunks being sealed and queued for writing (bounded by the buffer pool) */
  readonly chunks = new Throttle(Number.MAX_SAFE_INTEGER);
  /** the digest key of the store's codec (HMAC), or none (SHA-256) */
  readonly key: Uint8Array | undefined;
  /** the salt of every tag this attempt computes */
  readonly salt = randomBytes(SALT_LENGTH);
  /**
   * The key of the unmasked tags every path computes: the change-tag key, or a key of this
   * attempt's own when there is none (the tags then only serve the second pass).
   */
  readonly proofKey: Buffer;
  /** what the second pass compares with */
  readonly recorded = new RecordedTags();
  private done = 0;
  private chunkNo = 0;
  private lastRecorded = -1;
  /** the piece size of the new manifest (0: whole blocks only) */
  readonly pieceSize: number;
  /** the guest view read instead of `file` (a qcow2 volume) */
  readonly image: DiskImage | undefined;
  /** where new pieces go in a packed manifest (./store/packs.ts) */
  readonly packs: PackWriter | undefined;
  /** whether new pieces go into packs (not DISKSNAP_NO_PACKS) */
  readonly packNew: boolean;
  /**
   * Whether the pool's buffers, allocated on first use, are for bulk traffic (2 MiB pages:
   * ./store/direct.ts bigBuffer): set by a path that reads the whole volume through them, when
   * that is at least BULK_REUSE times their bytes.
   */
  bulk = false;

  constructor(
    readonly store: Store,
    readonly file: BlockFile,
    readonly rec: SnapshotRecord,
    readonly size: number,
    readonly writer: ManifestWriter,
    readonly tagWriter: TagWriter | undefined,
    readonly settings: CaptureSettings,
  ) {
    this.bs = store.blockSize;
    this.maxBlocks = blocksPerChunk(this.bs);
    this.hashBlocks = Math.max(this.maxBlocks, Math.floor(HASH_CHUNK_BYTES / this.bs));
    this.image = settings.guest?.image;
    this.pool = new BufferPool(this.maxBlocks * this.bs, MAX_BUFFERS, (n) => store.backend.allocBuffer?.(n, this.bulk) ?? bigBuffer(n, false, this.bulk));
    this.key = store.codec.digestKey;
    this.proofKey = settings.tk?.key ?? randomBytes(32);
    this.pieceSize = writer.header.pieceSize ?? 0;
    this.packs = writer.header.packed ? new PackWriter(store.backend, store.packs, this.writes, (d) => store.blockKey(d)) : undefined;
    // DISKSNAP_NO_PACKS=1, a diagnostic: new pieces are objects of their own (the index still lists the parent's)
    this.packNew = !!this.packs && process.env.DISKSNAP_NO_PACKS !== '1';
  }

  /**
   * The volume's data runs in blocks, found on first use: a path that reads only what a
   * bitmap marked never needs them, and mapping every cluster of a large qcow2 image costs
   * more than such an incremental (0.45 s of 1.2 s for a 16 GiB image with 4 GiB of data).
   */
  get runs(): Array<[number, number]> {
    return (this.runsCache ??= this.image ? guestRuns(this.image, this.size, this.bs) : dataRuns(this.file, this.size, this.bs));
  }

  /** Bytes this attempt reads, for progress: the data runs unless the detector said otherwise. */
  get totalBytes(): number {
    return (this.totalCache ??= this.runs.reduce((n, [a, b]) => n + this.spanBytes(a, b), 0));
  }

  /** A detector that reads only some blocks says how many bytes (progress counts those). */
  willRead(bytes: number): void {
    this.totalCache = bytes;
  }

  get threads(): number {
    return this.settings.threads;
  }

  get tk(): TagKey | undefined {
    return this.settings.tk;
  }

  /** Bytes of blocks [a, b) of the volume. */
  spanBytes(a: number, b: number): number {
    return Math.min(this.size, b * this.bs) - a * this.bs;
  }

  /**
   * Records an entry of data block i: its digest at digests[dOff], and slot 0 (the whole
   * block) or a piece slot (./store/manifest.ts). `u` is the unmasked tag (under proofKey) of
   * the whole block's bytes as recorded, which a read that must prove one moment needs with
   * the block's first entry (the guest-view paths, which never prove, have none).
   */
  record(i: number, digests: Buffer, dOff: number, u?: Buffer, uOff = 0, slot = 0): void {
    const first = i !== this.lastRecorded;
    if (first) this.rec.stats.dataBlocks++;
    this.lastRecorded = i;
    this.writer.append(i, digests, dOff, slot);
    if (!this.settings.prove || !first) return;
    if (!u) throw new Error(`internal: block ${i} recorded without the tag its proof needs`);
    this.recorded.push(i, u, uOff);
  }

  /** Notes the whole block whose digest is at `dOff` of `digests` as one put into a pack: the pack index must list it (./store/packs.ts). */
  notePacked(digests: Buffer, dOff: number): void {
    this.writer.noteWhole(digests, dOff);
  }

  /** Records a run of the parent's entries as they are (not in a proving snapshot: no tags to prove them). */
  recordRun(run: EntryRun): void {
    if (this.settings.prove) throw new Error('internal: a proving snapshot records each block with its tag');
    this.writer.appendRun(run);
    this.rec.stats.dataBlocks += run.blocks - (run.first === this.lastRecorded ? 1 : 0);
    this.lastRecorded = run.last;
  }

  /**
   * Records the change tags of blocks `idx` (ascending, after every block recorded so far),
   * computed now from their unmasked tags (u, 16 bytes each at uOff(j)) under this attempt's
   * salt; with `gu`, the unmasked tags of each block's granules too (the tag writer's
   * granules x 16 bytes at gOff(j), or none where gOff gives -1).
   */
  newTags(idx: number[], u: Buffer, uOff: (j: number) => number, gu?: Buffer, gOff?: (j: number) => number): void {
    const tk = this.tk;
    const tw = this.tagWriter;
    if (!tw || !tk || !idx.length) return;
    const masks = this.n.tagMasks(tk.key, tagIvs(idx, this.salt, () => 0));
    const G = tw.granules;
    const gm = gu && gOff && G ? maskGranules(tk.key, idx, G, this.salt, () => 0, gu, gOff) : undefined;
    for (let j = 0; j < idx.length; j++) {
      xor16(u, uOff(j), masks, j * 16, masks, j * 16);
      tw.append(idx[j], this.salt, 0, masks, j * 16, gm && gOff!(j) >= 0 ? gm : undefined, j * G * 16);
    }
  }

  /**
   * Reads blocks [first, end) into a pool buffer and hashes them there, in one pool job whose
   * hashing threads each read the part they hash next (native ReadFill), with unmasked change
   * tags under proofKey where `tags`, and granule tags too with a `granuleSize`. The caller owns
   * the buffer from then on. (A load then a hash, as two jobs, left the read on one thread: on
   * the 2-core AMD EPYC VM of session 40, 7-9 ms to read a 16 MiB chunk beside 7 ms to hash it.)
   */
  async loadHashed(first: number, end: number, tags: boolean, granuleSize?: number): Promise<{ buf: Buffer; len: number; h: BlockHashes }> {
    const buf = await this.pool.acquire();
    const len = this.spanBytes(first, end);
    try {
      const reqs = Float64Array.of(first * this.bs, 0, len);
      const h = await this.readWith(buf, reqs, (fd, host) => this.n.hashBlocksAsync(buf.subarray(0, len), this.bs, this.threads, this.key, tags ? this.proofKey : undefined, granuleSize, fd, host));
      return { buf, len, h };
    } catch (e) {
      this.pool.release(buf);
      throw e;
    }
  }

  /**
   * Stores the blocks in slots `ks` of `buf` (slot k at k*bs, its digest at digests[k*32],
   * `lenOf(k)` bytes): see storeItems; `packed`: into packs. Takes `buf`.
   */
  async storeSlots(buf: Buffer, ks: number[], digests: Buffer, lenOf: (k: number) => number, packed = false): Promise<void> {
    await this.storeItems(
      buf,
      ks.map((k) => ({ off: k * this.bs, len: lenOf(k), digest: digests.subarray(k * 32, k * 32 + 32), piece: packed })),
    );
  }

  /**
   * Stores objects held in `buf` (each `len` bytes at `off`, named by `digest`): sealed on a
   * worker when the store encrypts, then queued for writing from that same memory. Takes
   * `buf`: back in the pool once the last write is done.
   */
  async storeItems(buf: Buffer, items: StoreItem[]): Promise<void> {
    let ref: ReturnType<BufferPool['shared']> | undefined;
    try {
      const keys = this.store.codec.keys;
      let data = (x: number): ObjectData => buf.subarray(items[x].off, items[x].off + items[x].len);
      if (keys && items.length) {
        const r = await sealChunk(keys, buf, items);
        buf = r.buf; // the same memory; the buffer object may have moved through a worker
        const sealedBuf = r.buf;
        data = (x) => [sealedBuf.subarray(items[x].off, items[x].off + items[x].len), r.trailers[x]];
      }
      ref = this.pool.shared(buf);
      const stats = this.rec.stats;
      // Plain objects go to a backend that takes many at once together (queueObjects).
      const together = !keys && this.store.backend.putManyIfAbsent ? ([] as Array<{ digest: Buffer; data: Buffer }>) : undefined;
      for (let x = 0; x < items.length; x++) {
        const it = items[x];
        if (!this.packNew || !it.piece) {
          if (together) together.push({ digest: it.digest, data: buf.subarray(it.off, it.off + it.len) });
          else await queueObject(this.writes, this.store, stats, it.digest, data(x), it.len, ref.hold());
        } else if (await this.packs!.add(it.digest, data(x))) {
          stats.blocksAdded++; // (its bytes copied into the pack: nothing held)
          stats.bytesAdded += it.len;
        }
      }
      if (together?.length) await queueObjects(this.writes, this.store, stats, together, ref.hold());
    } finally {
      if (ref) ref.done();
      else this.pool.release(buf);
    }
  }

  /**
   * Reads blocks `group` (ascending, at most a buffer's worth) into a pool buffer and hashes
   * them there (with unmasked change tags when there is a tag key); `decide` sees each block's
   * fresh hashes (it may throw VolumeChanged) and says whether to store it (`packed`: into
   * packs). Returns the hashes.
   */
  async readAndStore(group: number[], decide: (k: number, again: BlockHashes) => boolean, packed = false): Promise<BlockHashes> {
    return this.storeHashed(await this.readAndHash(group), group, decide, packed);
  }

  /**
   * The first half of readAndStore: blocks `group` read into a pool buffer and hashed there.
   * The caller owns the buffer: it passes the result to storeHashed, or gives it back with
   * `discard` (a read ahead whose turn never came).
   */
  async readAndHash(group: number[]): Promise<Hashed> {
    const buf = await this.pool.acquire();
    try {
      const reqs = new Float64Array(group.length * 3);
      group.forEach((i, k) => reqs.set([i * this.bs, k * this.bs, blockLength(i, this.size, this.bs)], k * 3));
      // only the volume's last block is short, and it comes last
      const glen = group.length ? (group.length - 1) * this.bs + blockLength(group[group.length - 1], this.size, this.bs) : 0;
      // read by the pool job that hashes (./dirty.ts readUnits says why)
      return { buf, again: await this.readWith(buf, reqs, (fd, host) => this.n.hashBlocksAsync(buf.subarray(0, glen), this.bs, this.threads, this.key, this.proofKey, undefined, fd, host)) };
    } catch (e) {
      this.pool.release(buf);
      throw e;
    }
  }

  /** Guest requests `reqs` into buf, the volume file's own reads done by `io` (DiskImage.readBatchWith). */
  readWith<T>(buf: Buffer, reqs: Float64Array, io: (fd: number, host: Float64Array) => Promise<T>): Promise<T> {
    return this.image ? this.image.readBatchWith(buf, reqs, io) : io(this.file.fd, reqs);
  }

  /** Gives back the buffer of a readAndHash result that will not be stored. */
  discard(r: Hashed): void {
    this.pool.release(r.buf);
  }

  /** The second half of readAndStore: `decide` per block, then the chosen ones stored (takes the buffer). */
  async storeHashed(r: Hashed, group: number[], decide: (k: number, again: BlockHashes) => boolean, packed = false): Promise<BlockHashes> {
    const ks: number[] = [];
    try {
      for (let k = 0; k < group.length; k++) if (decide(k, r.again)) ks.push(k);
    } catch (e) {
      this.pool.release(r.buf);
      throw e;
    }
    await this.storeSlots(r.buf, ks, r.again.digests, (k) => blockLength(group[k], this.size, this.bs), packed);
    return r.again;
  }

  /** After each chunk of `len` bytes: stats, progress, the test hook, a failed write surfaced. */
  async chunkDone(len: number): Promise<void> {
    this.done += len;
    this.rec.stats.bytesScanned = this.done;
    this.settings.onProgress?.({ phase: 'scan', done: this.done, total: this.totalBytes });
    this.settings.saveProgress(percentOf(this.done, this.totalBytes));
    await this.settings.afterChunk?.(this.settings.attempt, this.chunkNo++);
    this.writes.check();
    this.chunks.check();
  }

  /** The data runs split into hashFile/tagFile-sized chunks. */
  bigChunks(): Array<[number, number]> {
    return [...chunksOf(this.runs, this.hashBlocks)];
  }
}

/**
 * The second pass (see the note above): throws VolumeChanged unless every block is now what
 * the snapshot recorded: the same tag where it has data, zero where it has none.
 */
async function proveOneMoment(p: ReadPipeline): Promise<void> {
  const seen = p.recorded;
  const list = [...chunksOf(dataRuns(p.file, p.size, p.bs), p.hashBlocks)];
  const moved = (i: number) => new VolumeChanged(`block ${i} changed after it was read`);
  let j = 0; // the next recorded block
  await readAhead(
    list.length,
    (c) => p.n.tagFile(p.file.fd, list[c][0] * p.bs, p.spanBytes(list[c][0], list[c][1]), p.bs, p.threads, p.proofKey),
    async (c, now) => {
      const [a, b] = list[c];
      if (j < seen.length && seen.index.get(j) < a) throw moved(seen.index.get(j)); // a hole now
      for (let i = a; i < b; i++) {
        const k = i - a;
        if (j < seen.length && seen.index.get(j) === i) {
          if (now.zero[k] || !seen.same(j, now.tags, k * 16)) throw moved(i);
          j++;
        } else if (!now.zero[k]) {
          throw moved(i); // zero (or a hole) when read, data now
        }
      }
    },
  );
  if (j < seen.length) throw moved(seen.index.get(j));
}

/**
 * One attempt: the manifest (and change tags) of `file` as `detect` reads it, ready to
 * commit. Throws VolumeChanged when the volume moved while it was read.
 */
export async function capture(
  store: Store,
  file: BlockFile,
  rec: SnapshotRecord,
  parent: SnapshotRecord | undefined,
  pick: (parent: ParentView, guest?: GuestVolume, reflink?: ReflinkView, unchanged?: boolean) => ChangeDetector,
  settings: CaptureSettings,
  readDone: () => Promise<void>,
): Promise<Captured> {
  // A guest view's stat is not recorded (no volumeStat): it only has to be settled when the
  // read starts, so a wait overlaps the setup below instead of coming first. For a qcow2
  // volume one always came where the filesystem's times are coarse: adding our bitmap a
  // moment ago moved its mtime (./volume-times.ts).
  const st0 = settings.guest ? file.stat() : await stableStat(file);
  // One moment by clean pages where the filesystem allows it (see the note above): every
  // store from here on faults and moves mtime, so the second read pass is not needed.
  const byCleanPages = settings.prove && !settings.proveByReading && writesMoveMtime(file);
  // The fdatasync runs beside the setup below (store, parent, outputs: no read of the volume)
  // and is awaited before the first read: it took 8-15 ms of a raw 1% incremental, where it
  // wrote back the rewrite's pages, with the event loop blocked.
  let cleaned: Promise<void> | undefined;
  if (byCleanPages) {
    cleaned = file.sync(true);
    cleaned.catch(() => undefined); // awaited below, and in the finally on every path
    settings = { ...settings, prove: false };
  }
  const size = settings.guest ? settings.guest.image.virtualSize : volumeSizeOf(file, st0);
  rec.volumeSize = size;
  rec.stats = emptyStats();
  rec.progress = 0;
  let view: ParentView & { reader?: ManifestReader } = {};
  let writer: ManifestWriter | undefined;
  let tagWriter: TagWriter | undefined;
  let p: ReadPipeline | undefined;
  let ok = false;
  try {
    view = await openParent(store, parent, settings);
    // Pieces (./store/manifest.ts) where a dirty-range scan or a tag scan with granule tags
    // (./store/tags.ts) may store them, or the parent has some to keep.
    const pieces = !!(settings.guest?.dirty || settings.reflink || view.reader?.header.pieceSize || view.tags?.granules);
    ({ writer, tagWriter } = await openOutputs(store, rec, size, settings, pieces ? pieceSizeFor(store.blockSize) : 0, view.reader?.entryCount));
    p = new ReadPipeline(store, file, rec, size, writer, tagWriter, settings);
    // Unchanged since the parent, proven by its identity and times (see sameStat): nothing to read.
    const unchanged = byCleanPages && !settings.guest && sameStat(parent?.volumeStat, st0);
    const settle = settings.guest ? unsettledMs(file, st0) : 0;
    if (settle) await sleep(settle); // from here on any write moves the mtime
    await cleaned; // every page of the volume clean before its first read
    await pick(view, settings.guest, settings.reflink, unchanged)(p, view);
    await p.chunks.drain();
    if (settings.prove) await proveOneMoment(p);
    // Every read of the volume is done: check it did not move, then let go of the freeze (or
    // the clone) before waiting for the object writes.
    rec.stats.zeroBlocks = blockCount(size, store.blockSize) - rec.stats.dataBlocks;
    const why = statMoved(st0, file.stat()) ?? settings.guest?.moved?.();
    if (why) throw new VolumeChanged(why);
    rec.volumeStat = byCleanPages && !settings.guest ? statOf(st0) : null;
    await readDone();
    await p.packs?.flush();
    // Every object write is queued; the caller commits the manifest beside the last of them
    // (../lifecycle.ts completeSnapshot waits for `written` before the record).
    const written = p.writes.drain();
    written.catch(() => undefined); // awaited there
    ok = true;
    return { manifest: writer, tags: tagWriter, packs: p.packs, written };
  } finally {
    await cleaned?.catch(() => undefined); // (the caller closes the file after a failure)
    await p?.chunks.settle();
    if (!ok) await p?.writes.settle();
    await view.reader?.close();
    await view.tags?.close();
    if (!ok) {
      if (writer) await abortQuietly(writer);
      if (tagWriter) await abortQuietly(tagWriter);
    }
  }
}
