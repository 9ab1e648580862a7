/**
 * Snapshot manifests: which block object each block of the volume is, as compact binary.
 *
 * A manifest is *sparse*: it lists only the blocks that hold data, as fixed-size entries
 * (block index, digest) in strictly ascending index order. A block with no entry is all
 * zeros — a hole of the volume or a block of zeros — and is not stored (the "zero marker" is
 * absence). Chosen by measurement over one dense 32-byte entry per block: a 1 TiB volume
 * with 4 MiB of data has 2 Mi blocks of 512 KiB, so a dense manifest is 64 MiB on disk and in
 * memory per snapshot, while the sparse one is 8 entries (a few hundred bytes). For a fully
 * written volume the sparse form costs 40 bytes per block instead of 32 (+25%); manifests
 * are streamed in 1 MiB chunks, never loaded whole, so that cost is disk only.
 *
 *   offset  size  field
 *   0       8     magic "DSNAPMF\n"
 *   8       2     version (1; 2 for a manifest with pieces; 3 with pieces in packs: see below)
 *   10      2     header length (128)
 *   12      2     entry length (40)
 *   14      1     digest algorithm: 1 = SHA-256, 2 = HMAC-SHA-256 (keyed, encrypted stores)
 *   15      1     flags: bit 0 = block objects are sealed (encrypted); other bits must be 0
 *   16      4     block size
 *   20      4     piece size: 0 in version 1; in version 2 an eighth of the block size,
 *                 at least 4096 (see "Pieces")
 *   24      8     volume size in bytes
 *   32      32    snapshot id, ASCII, NUL padded   (binds the manifest to its record)
 *   64      32    volume id, ASCII, NUL padded
 *   96      32    reserved, 0
 *   128     40*n  entries: block index (u64; in version 2 the low 56 bits, and the top byte
 *                 the entry's slot), digest (32 bytes)
 *   end-40  8     entry count n (u64)
 *   end-32  32    SHA-256 of every byte before it; for a sealed manifest (flag bit 0) an
 *                 HMAC-SHA-256 under the key's manifest subkey (src/storage/store/crypto.ts), so that
 *                 entries cannot be reordered or swapped without the key
 *
 * All integers little-endian. The trailer (count, checksum) comes last so that a manifest is
 * written append-only (a file today, a multipart upload later). Readers check the header
 * field by field when they open a manifest, the ordering and range of every entry as they
 * stream it, and the count and checksum when they reach the end; consumers that produce an
 * output (restore, diff, verify) finish the stream before they publish anything.
 *
 * Pieces (version 2). An incremental that knows which 64 KiB granules of a block were written
 * (a QEMU dirty bitmap, two reflink clones, granule change tags) reads and stores only those granules, as objects
 * of their own, instead of the whole 512 KiB block: with 1% of a 4 GiB qcow2 volume rewritten
 * in scattered 64 KiB writes, that is 41 MiB read and stored instead of the 285 MiB of whole
 * blocks around them. A block then has up to 1 + blockSize/pieceSize entries, in ascending
 * (index, slot) order:
 *   slot 0       the whole block's object (absent: the block starts as zeros);
 *   slot s >= 1  a piece: the object of bytes [(s-1)*pieceSize, s*pieceSize) of the block
 *                (cut at the block's end), which replace those of slot 0.
 * A block with entries of slot 0 only is as in version 1. A scan that compares whole-block
 * digests with the parent finds a pieced block changed, hashes it whole and stores it whole.
 * A change tag (./tags.ts) of a pieced block is of the bytes all its entries make, so a tag
 * scan that finds the tag unchanged keeps every entry of the block; a tag scan also stores
 * pieces, of the granules whose granule tags moved. Writers use version 2 only where a
 * snapshot may hold pieces; readers take both.
 *
 * Packs (version 3: version 2 whose pieces may be stored in packs). A snapshot stores its new
 * pieces as parts of a few pack objects of ~4 MiB, not one object each, and lists where each
 * piece it references lives in `snapshots/<id>.packs` (./packs.ts), written beside the manifest.
 * Entries are as in version 2 (a piece's digest is still of its own bytes); a piece not in
 * the index is an object of its own, as in version 2. Since session 41 an index may list whole
 * blocks too (its version 2, ./packs.ts): an unsealed incremental packs the whole blocks it reads
 * in place; their slot-0 entries are unchanged, and a block the index does not list is an object.
 */
import { createHash, createHmac, Hash, Hmac } from 'node:crypto';
import { DisksnapError, corrupt, invalid } from '../../engine/errors';
import type { ObjectReader, ObjectWriter } from './backend';
import { native } from '../../engine/native';
import { DigestList, EntryWriter } from './entries';
import { DIGEST_LENGTH, ENTRY_LENGTH, HEADER_LENGTH, ManifestHeader, TRAILER_LENGTH, decodeHeader, encodeHeader } from './manifest-header';

export * from './manifest-header';

/** Entries per read or write chunk: 1 MiB and a bit. */
const CHUNK_ENTRIES = 26214;

/** One entry of a block: slot 0 the whole block's object, s >= 1 piece s-1 (see above). */
export interface SlotEntry {
  slot: number;
  digest: Buffer;
}

/** Every entry of one block, in slot order (digests copied). */
export interface BlockEntries {
  index: number;
  /** the whole block's object, or undefined (then the block starts as zeros) */
  digest: Buffer | undefined;
  /** its pieces in slot order, or undefined for a block without any */
  pieces: SlotEntry[] | undefined;
}

/** Whether two blocks' entries name the same objects in the same slots. */
export function sameEntries(a: BlockEntries, b: BlockEntries): boolean {
  if (!a.digest !== !b.digest || (a.digest && !a.digest.equals(b.digest!))) return false;
  const pa = a.pieces ?? [];
  const pb = b.pieces ?? [];
  return pa.length === pb.length && pa.every((p, j) => p.slot === pb[j].slot && p.digest.equals(pb[j].digest));
}

/** Bytes [offset, offset+length) of block `index` that slot `slot` (>= 1) replaces. */
export function pieceRange(slot: number, index: number, volumeSize: number, bs: number, ps: number): { offset: number; length: number } {
  const offset = (slot - 1) * ps;
  return { offset, length: Math.min(ps, blockLength(index, volumeSize, bs) - offset) };
}

/** The block index of the entry at `o` of `chunk` (`slots`: a manifest with pieces, whose slot is the top byte). */
function entryIndex(chunk: Buffer, o: number, slots: boolean): number {
  const hi = chunk.readUInt32LE(o + 4);
  return chunk.readUInt32LE(o) + (slots ? hi & 0xffffff : hi) * 0x100000000;
}

export function blockCount(volumeSize: number, blockSize: number): number {
  return Math.ceil(volumeSize / blockSize);
}

/** Length of block `index` (the last block of a volume may be short). */
export function blockLength(index: number, volumeSize: number, blockSize: number): number {
  return Math.min(blockSize, volumeSize - index * blockSize);
}

/**
 * Appends entries to an ObjectWriter in 1 MiB chunks, computing the checksum as it goes.
 * `commit()` writes the trailer and makes the manifest durable under its final name.
 */
/** The trailer's checksum: plain SHA-256, or an HMAC under the key of a sealed manifest. */
function checksum(header: ManifestHeader, macKey: Uint8Array | undefined): Hash | Hmac {
  if (header.sealed !== (macKey !== undefined)) {
    throw new DisksnapError(`manifest of ${header.snapshotId}: ${header.sealed ? 'a sealed manifest needs its key' : 'a plain manifest takes no key'}`, 'EINVALID');
  }
  return macKey ? createHmac('sha256', macKey) : createHash('sha256');
}

export class ManifestWriter {
  private readonly w: EntryWriter;
  private readonly blocks: number;
  /** slots per block besides slot 0 (0 in version 1) */
  private readonly slots: number;
  private lastSlot = 0;
  /** a packed manifest's piece digests (what its pack index must list, ./packs.ts) */
  private readonly pieceList: DigestList | undefined;
  /** a packed manifest's whole-block digests that may be in packs (noteWhole, noteEveryWhole) */
  private readonly wholeList: DigestList | undefined;
  private everyWhole = false;

  /** `expectEntries`: about how many entries it will have (its parent's): a packed manifest's digest lists get room at once. */
  constructor(
    out: ObjectWriter,
    readonly header: ManifestHeader,
    macKey?: Uint8Array,
    expectEntries = 0,
  ) {
    this.blocks = blockCount(header.volumeSize, header.blockSize);
    this.slots = header.pieceSize ? header.blockSize / header.pieceSize : 0;
    const listed = header.packed ? (entries: Buffer) => this.listed(entries) : undefined;
    this.w = new EntryWriter(out, checksum(header, macKey), ENTRY_LENGTH, CHUNK_ENTRIES, encodeHeader(header), listed);
    if (header.packed) {
      this.pieceList = new DigestList(expectEntries);
      this.wholeList = new DigestList(expectEntries);
    }
  }

  /** The digests of every piece entry so far (a packed manifest only; empty otherwise), 32 bytes each (a view, valid until the next entry). */
  get pieceDigests(): Buffer {
    return this.pieceList?.bytesWith(this.w.unflushed, true) ?? Buffer.alloc(0);
  }

  /** The whole-block digests noted so far that may be in packs (a packed manifest only), 32 bytes each, repeats possible (a view, valid until the next entry). */
  get wholeDigests(): Buffer {
    return (this.everyWhole ? this.wholeList?.bytesWith(this.w.unflushed, false) : this.wholeList?.bytes) ?? Buffer.alloc(0);
  }

  /** Lists the digests of a chunk of entries as it is emitted: its pieces, and its whole blocks where every one is noted. */
  private listed(entries: Buffer): void {
    this.pieceList!.gather(entries, true);
    if (this.everyWhole) this.wholeList!.gather(entries, false);
  }

  /** Notes a whole block's digest as one its pack index must look up: one this snapshot put into a pack (./packs.ts). */
  noteWhole(src: Uint8Array, offset = 0): void {
    if (!this.everyWhole) this.wholeList?.push(src, offset); // (else its entry lists it)
  }

  /** Notes every whole-block entry: where the parent's pack index lists whole blocks (PackTable.listsWhole). Before the first entry. */
  noteEveryWhole(): void {
    if (this.w.entries) throw new Error('internal: noteEveryWhole after the first entry');
    this.everyWhole = !!this.wholeList;
  }

  get entries(): number {
    return this.w.entries;
  }

  /**
   * Adds an entry of block `index` with its digest: slot 0 (the whole block) or, in a
   * manifest with pieces, piece slot s >= 1. (index, slot) must be greater than the last.
   */
  append(index: number, digest: Uint8Array, digestOffset = 0, slot = 0): void {
    const last = this.w.last;
    if (!(index > last || (index === last && slot > this.lastSlot)) || index >= this.blocks || !Number.isSafeInteger(index)) {
      throw invalid(`manifest entry ${index}${slot ? ` slot ${slot}` : ''} out of order or past block ${this.blocks - 1}`);
    }
    if (slot !== 0 && !(Number.isInteger(slot) && slot > 0 && slot <= this.slots && pieceRange(slot, index, this.header.volumeSize, this.header.blockSize, this.header.pieceSize!).length > 0)) {
      throw invalid(`manifest entry ${index}: slot ${slot} is not a piece of this block (${this.slots} per block)`);
    }
    const o = this.w.add(index);
    if (slot) this.w.buf[o + 7] = slot;
    this.lastSlot = slot;
    if (Buffer.isBuffer(digest)) digest.copy(this.w.buf, o + 8, digestOffset, digestOffset + DIGEST_LENGTH);
    else this.w.buf.set(digest.subarray(digestOffset, digestOffset + DIGEST_LENGTH), o + 8);
  }

  /**
   * Adds a run of entries as read (ManifestCursor.runNow), one copy for all: it must follow
   * the last entry and fit the volume; pieces (slots checked against their own manifest's
   * header as they were read) only where block, piece and volume size are the same.
   */
  appendRun(run: EntryRun): void {
    const last = this.w.last;
    if (!(run.first > last || (run.first === last && run.firstSlot > this.lastSlot)) || run.last >= this.blocks) {
      throw invalid(`manifest entries ${run.first}-${run.last} out of order or past block ${this.blocks - 1}`);
    }
    const h = this.header;
    if (run.pieces && !(this.slots && run.header.pieceSize === h.pieceSize && run.header.blockSize === h.blockSize && run.header.volumeSize === h.volumeSize)) {
      throw invalid(`manifest entries ${run.first}-${run.last}: pieces of another piece, block or volume size`);
    }
    this.w.addRaw(run.chunk, run.start, run.end, run.last);
    this.lastSlot = run.lastSlot;
  }

  /** Waits for buffered writes (keeps memory bounded when called now and then). */
  async drain(): Promise<void> {
    await this.w.drain();
  }

  async commit(): Promise<void> {
    await this.w.commit();
  }

  async abort(): Promise<void> {
    await this.w.abort();
  }
}

/**
 * Streams a manifest's entries in order, validating as it goes. `next()` returns the next
 * entry index or -1 at the end (after checking count and checksum); the digest of the current
 * entry is `digest` (a view, valid until the next call).
 */
export interface ManifestReadOptions {
  /** the manifest subkey of a sealed manifest's key */
  macKey?: Uint8Array;
  /**
   * Read a sealed manifest without its key: entries, order and count are checked, the keyed
   * trailer is not (gc, which holds no keys, and only ever keeps more because of it).
   */
  unauthenticated?: boolean;
}

export class ManifestReader {
  readonly header: ManifestHeader;
  readonly entryCount: number;
  readonly blocks: number;
  private readonly hash: Hash | Hmac | undefined;
  private chunk: Buffer = Buffer.alloc(0);
  private pos = 0; // offset in chunk
  private fileOffset: number; // next byte to read from the object
  private read = 0; // entries consumed
  private lastIndex = -1;
  private lastSlot = 0;
  private finished = false;
  /** slots per block besides slot 0 (0 in version 1) */
  private readonly slots: number;
  /** the entry nextBlock read past the block it returned (index, slot, digest copy) */
  private ahead: SlotEntry & { index: number } | undefined;
  /** the chunk holding the current entry, whose digest is at `digestOffset` in it */
  chunkBytes: Buffer = Buffer.alloc(0);
  digestOffset = 0;
  index = -1;
  /** the slot of the current entry: 0 the whole block, s >= 1 a piece */
  slot = 0;
  /** takeBelow's arguments and results (native scanEntries) */
  private readonly scanState = new Float64Array(9);

  private constructor(
    private readonly file: string,
    private readonly src: ObjectReader,
    header: ManifestHeader,
    headerBytes: Buffer,
    opts: ManifestReadOptions,
  ) {
    this.header = header;
    if (header.sealed && !opts.macKey) {
      if (!opts.unauthenticated) throw new DisksnapError(`${file}: a sealed manifest is read with its key`, 'ENOKEY', undefined, file);
      this.hash = undefined;
    } else {
      this.hash = checksum(header, header.sealed ? opts.macKey : undefined);
    }
    this.hash?.update(headerBytes);
    const body = src.size - HEADER_LENGTH - TRAILER_LENGTH;
    if (body < 0 || body % ENTRY_LENGTH !== 0) {
      throw corrupt(file, `manifest is ${src.size} bytes: not a ${HEADER_LENGTH}-byte header, whole ${ENTRY_LENGTH}-byte entries and a ${TRAILER_LENGTH}-byte trailer`);
    }
    this.entryCount = body / ENTRY_LENGTH;
    this.blocks = blockCount(header.volumeSize, header.blockSize);
    this.slots = header.pieceSize ? header.blockSize / header.pieceSize : 0;
    if (this.entryCount > this.blocks * (1 + this.slots)) throw corrupt(file, `manifest has ${this.entryCount} entries for a volume of ${this.blocks} blocks`);
    this.fileOffset = HEADER_LENGTH;
  }

  /** Opens and checks the header; `expect` fields (ids, sizes) must match or ECORRUPT. */
  static async open(file: string, src: ObjectReader, expect: Partial<ManifestHeader> = {}, opts: ManifestReadOptions = {}): Promise<ManifestReader> {
    try {
      const hb = await src.read(0, Math.min(HEADER_LENGTH, src.size));
      const header = decodeHeader(file, hb);
      for (const [k, v] of Object.entries(expect) as [keyof ManifestHeader, unknown][]) {
        if (v !== undefined && header[k] !== v) {
          throw corrupt(file, `manifest ${k} is ${JSON.stringify(header[k])}, but its record says ${JSON.stringify(v)}`);
        }
      }
      return new ManifestReader(file, src, header, hb, opts);
    } catch (e) {
      await src.close();
      throw e;
    }
  }

  private async fill(): Promise<boolean> {
    const remaining = this.entryCount - this.read;
    if (remaining <= 0) return false;
    const n = Math.min(remaining, CHUNK_ENTRIES);
    const len = n * ENTRY_LENGTH;
    this.chunk = await this.src.read(this.fileOffset, len);
    if (this.chunk.length !== len) throw corrupt(this.file, `manifest ended early at byte ${this.fileOffset + this.chunk.length}`);
    this.hash?.update(this.chunk);
    this.fileOffset += len;
    this.pos = 0;
    return true;
  }

  /** Next entry index, or -1 at the end (count and checksum verified by then). */
  async next(): Promise<number> {
    const now = this.nextBuffered();
    if (now !== undefined) return now;
    if (!(await this.fill())) {
      await this.finish();
      return -1;
    }
    return this.take();
  }

  /**
   * The next entry when it is already read, without I/O or an await (the scans copy thousands
   * of parent entries, most from the chunk in memory); undefined when `next` must read.
   */
  nextBuffered(): number | undefined {
    if (this.finished) return -1;
    if (this.pos >= this.chunk.length) return undefined;
    return this.take();
  }

  /**
   * Consumes the buffered entries after the current one whose block index is below `limit`,
   * each checked as take() checks it (native scanEntries, in one call), and stops before the
   * first one at or past it, before one that fails a check (the next take() names what is
   * wrong) or at the chunk's end. The last one consumed becomes the current entry. Returns how
   * many were consumed, how many of them start another block than the entry before, and
   * whether any is a piece.
   */
  takeBelow(limit: number): { n: number; newBlocks: number; pieces: boolean } {
    if (this.finished || this.pos >= this.chunk.length) return { n: 0, newBlocks: 0, pieces: false };
    const h = this.header;
    const st = this.scanState;
    st[0] = this.lastIndex;
    st[1] = this.lastSlot;
    st[2] = this.slots;
    st[3] = this.blocks;
    st[4] = h.volumeSize;
    st[5] = h.blockSize;
    st[6] = h.pieceSize ?? 0;
    const n = native().scanEntries(this.chunk, this.pos, limit, st);
    if (n === 0) return { n: 0, newBlocks: 0, pieces: false };
    this.lastIndex = this.index = st[0];
    this.lastSlot = this.slot = st[1];
    this.chunkBytes = this.chunk;
    this.pos += n * ENTRY_LENGTH;
    this.digestOffset = this.pos - ENTRY_LENGTH + 8;
    this.read += n;
    return { n, newBlocks: st[7], pieces: st[8] === 1 };
  }

  /** Consumes the entry at `pos` (there is one), checking its order. */
  private take(): number {
    const o = this.pos;
    const slot = this.slots ? this.chunk[o + 7] : 0;
    const index = entryIndex(this.chunk, o, this.slots !== 0);
    if (!(index > this.lastIndex || (index === this.lastIndex && slot > this.lastSlot)) || index >= this.blocks) {
      throw corrupt(this.file, `manifest entry ${this.read} has block index ${index}${slot ? ` slot ${slot}` : ''} (previous ${this.lastIndex}, volume has ${this.blocks} blocks)`);
    }
    if (slot > this.slots || (slot && pieceRange(slot, index, this.header.volumeSize, this.header.blockSize, this.header.pieceSize!).length <= 0)) {
      throw corrupt(this.file, `manifest entry ${this.read} of block ${index} has slot ${slot}, which is not a piece of that block`);
    }
    this.lastIndex = index;
    this.lastSlot = slot;
    this.slot = slot;
    this.chunkBytes = this.chunk;
    this.digestOffset = o + 8;
    this.index = index;
    this.pos += ENTRY_LENGTH;
    this.read++;
    return index;
  }

  private async finish(): Promise<void> {
    const t = await this.src.read(this.fileOffset, TRAILER_LENGTH);
    if (t.length !== TRAILER_LENGTH) throw corrupt(this.file, 'manifest trailer is missing');
    const count = t.readBigUInt64LE(0);
    if (count !== BigInt(this.entryCount)) throw corrupt(this.file, `manifest trailer counts ${count} entries, the file holds ${this.entryCount}`);
    if (this.hash) {
      this.hash.update(t.subarray(0, 8));
      if (!this.hash.digest().equals(t.subarray(8))) {
        throw corrupt(
          this.file,
          this.header.sealed
            ? 'manifest authentication (HMAC) does not match its contents: the file was damaged or altered'
            : 'manifest checksum does not match its contents (the file was damaged)',
        );
      }
    }
    this.finished = true;
    this.index = -1;
  }

  /**
   * The digest of the current entry: a view, valid until the next call. (Scans that copy
   * thousands of entries take `chunkBytes` at `digestOffset` instead: no view made per entry.)
   */
  get digest(): Buffer {
    return this.chunkBytes.subarray(this.digestOffset, this.digestOffset + DIGEST_LENGTH);
  }

  /**
   * The next block's entries (whole object, pieces), or undefined at the end (count and
   * checksum verified by then). Not to be mixed with `next` on one reader.
   */
  async nextBlock(): Promise<BlockEntries | undefined> {
    let first = this.ahead;
    this.ahead = undefined;
    if (!first) {
      const i = this.nextBuffered() ?? (await this.next());
      if (i < 0) return undefined;
      first = { index: i, slot: this.slot, digest: Buffer.from(this.digest) };
    }
    const e: BlockEntries = { index: first.index, digest: undefined, pieces: undefined };
    addSlot(e, first);
    if (!this.slots) return e; // version 1: one entry per block
    for (;;) {
      const i = this.nextBuffered() ?? (await this.next());
      if (i < 0) break;
      const entry = { index: i, slot: this.slot, digest: Buffer.from(this.digest) };
      if (i !== e.index) {
        this.ahead = entry;
        break;
      }
      addSlot(e, entry);
    }
    return e;
  }

  /** Reads to the end, checking everything; the reader is then finished. */
  async validate(): Promise<void> {
    while ((await this.next()) >= 0);
  }

  async close(): Promise<void> {
    await this.src.close();
  }
}

/** Adds one entry to a block's entries (slot 0: the whole object, else a piece, in slot order). */
export function addSlot(e: BlockEntries, x: SlotEntry): void {
  if (x.slot === 0) e.digest = x.digest;
  else (e.pieces ??= []).push({ slot: x.slot, digest: x.digest });
}

/**
 * Consecutive entries of a manifest as read (ManifestCursor.runNow), each checked as `next`
 * checks it: bytes [start, end) of `chunk` (valid until the reader reads on), the manifest's
 * header, block index and slot of the first and last entry, how many blocks they are of, the
 * blocks with a slot-0 entry (ascending), whether any entry is a piece, and `spent`: the chunk
 * ended the run, and the cursor stands on its last entry (`step` moves on).
 */
export interface EntryRun { chunk: Buffer; start: number; end: number; header: ManifestHeader; first: number; firstSlot: number; last: number; lastSlot: number; blocks: number; wholes: number[]; pieces: boolean; spent: boolean }

/**
 * Looks up entries of a manifest by ascending block index (the parent manifest while a new
 * snapshot is hashed, the snapshot's manifest while a volume is restored in place).
 */
export class ManifestCursor {
  private current = -2; // -2: not started, -1: at end

  constructor(readonly reader: ManifestReader) {}

  /**
   * The whole-block digest of block `index` (a view valid until the next call), or undefined
   * when the manifest has no slot-0 entry for it (a zero block, or pieces over zeros: never
   * equal to a whole block's digest). A block with pieces also has entries after this one: a
   * caller comparing whole-block digests finds the block changed unless its bytes are those of
   * slot 0 — then recording slot 0 alone is right. Indexes must not decrease between calls.
   */
  async lookup(index: number): Promise<Buffer | undefined> {
    return (await this.peek(index)) === index && this.reader.slot === 0 ? this.reader.digest : undefined;
  }

  /**
   * Every entry of block `index` (copies), or undefined when it has none; the cursor moves
   * past them. Indexes must increase between calls.
   */
  async lookupBlock(index: number): Promise<BlockEntries | undefined> {
    if ((await this.peek(index)) !== index) return undefined;
    const e: BlockEntries = { index, digest: undefined, pieces: undefined };
    for (;;) {
      addSlot(e, { slot: this.reader.slot, digest: Buffer.from(this.reader.digest) });
      this.current = this.reader.nextBuffered() ?? (await this.reader.next());
      if (this.current !== index) return e;
    }
  }

  /** The next entry at or after `index`, or -1 (the cursor stays on it). */
  async peek(index: number): Promise<number> {
    if (this.current === -2) this.current = await this.reader.next();
    while (this.current >= 0 && this.current < index) this.current = this.reader.nextBuffered() ?? (await this.reader.next());
    return this.current;
  }

  /**
   * As `peek`, where the entries up to the answer are already read (no await); undefined
   * where `peek` would have to read. The digest of the entry it stops on is `reader.digest`.
   */
  peekNow(index: number): number | undefined {
    if (this.current === -2) return undefined;
    while (this.current >= 0 && this.current < index) {
      const n = this.reader.nextBuffered();
      if (n === undefined) return undefined;
      this.current = n;
    }
    return this.current;
  }

  /**
   * Moves past the entry the cursor stands on (to the next one, of the same block or a later
   * one) without I/O; false where that needs a read, which `step` does.
   */
  stepNow(): boolean {
    const n = this.reader.nextBuffered();
    if (n === undefined) return false;
    this.current = n;
    return true;
  }

  async step(): Promise<void> {
    this.current = await this.reader.next();
  }

  /**
   * The entries from the one the cursor stands on up to block `limit`, as far as they are read
   * (none: undefined); the cursor moves past them, or stays on the last (`spent`): the entries
   * checked in one native call (ManifestReader.takeBelow), not a lookup, a record and an append
   * each (ManifestWriter.appendRun). `withWholes`: list the whole-block entries' blocks in
   * `wholes` (else it stays empty).
   */
  runNow(limit: number, withWholes = false): EntryRun | undefined {
    const r = this.reader;
    if (this.current < 0 || this.current >= limit) return undefined;
    const chunk = r.chunkBytes;
    const start = r.digestOffset - 8;
    const at = this.current;
    const run: EntryRun = { chunk, start, end: start + ENTRY_LENGTH, header: r.header, first: at, firstSlot: r.slot, last: at, lastSlot: r.slot, blocks: 1, wholes: [], pieces: r.slot !== 0, spent: false };
    // the entries below `limit` in the chunk already read, at once (the chunk's entries are consecutive)
    const b = r.takeBelow(limit);
    this.current = r.index;
    run.end += b.n * ENTRY_LENGTH;
    run.blocks += b.newBlocks;
    run.pieces ||= b.pieces;
    run.last = r.index;
    run.lastSlot = r.slot;
    if (withWholes) for (let o = run.start; o < run.end; o += ENTRY_LENGTH) if (!r.header.pieceSize || chunk[o + 7] === 0) run.wholes.push(entryIndex(chunk, o, !!r.header.pieceSize));
    // the entry after them: past `limit` (the cursor stands on it), the chunk's end, or one that fails its check (take throws)
    const n = r.nextBuffered();
    if (n === undefined) return Object.assign(run, { spent: true });
    this.current = n;
    if (n >= 0 && n < limit) throw new Error(`internal: manifest entry of block ${n} below ${limit} left out of a run`);
    return run;
  }

  /** Consumes the rest, which verifies count and checksum. */
  async finish(): Promise<void> {
    if (this.current === -2) this.current = await this.reader.next();
    while (this.current >= 0) this.current = await this.reader.next();
  }
}
