/**
 * The append-only file shape shared by manifests (src/storage/store/manifest.ts) and change-tag files
 * (src/storage/store/tags.ts): a header, fixed-size entries that each begin with a block index (u64,
 * strictly ascending), then a 40-byte trailer of the entry count (u64) and a SHA-256 or HMAC
 * of every byte before it. Entries are gathered in chunks and written to an ObjectWriter in
 * order, checksummed as they go; `commit` writes the trailer and publishes the object.
 */
import type { Hash, Hmac } from 'node:crypto';
import type { ObjectWriter } from './backend';
import { native } from '../../engine/native';
import { ENTRY_LENGTH } from './manifest-header';

const EMPTY = Buffer.alloc(0);

export class EntryWriter {
  /** entries not yet emitted; EMPTY until the first one and after each flush */
  private chunk: Buffer = EMPTY;
  private readonly chunkBytes: number;
  private used = 0;
  private count = 0;
  private lastIndex = -1;
  private pending: Promise<void> = Promise.resolve();

  constructor(
    private readonly out: ObjectWriter,
    private readonly hash: Hash | Hmac,
    private readonly entryLength: number,
    chunkEntries: number,
    header: Buffer,
    /** sees each chunk of entries as it is emitted (before the trailer), in order */
    private readonly onChunk?: (entries: Buffer) => void,
  ) {
    this.chunkBytes = chunkEntries * entryLength;
    this.hash.update(header);
    const copy = Buffer.from(header);
    this.pending = this.pending.then(() => this.out.write(copy));
  }

  get entries(): number {
    return this.count;
  }

  /** The last index appended, -1 before the first. */
  get last(): number {
    return this.lastIndex;
  }

  /**
   * Starts the entry of block `index` (the caller has checked it is ascending): writes the
   * index and returns the entry's offset in `buf`, where the caller fills the rest of it.
   */
  add(index: number): number {
    if (this.used === this.chunk.length) this.room();
    this.lastIndex = index;
    const o = this.used;
    this.chunk.writeUInt32LE(index % 0x100000000, o);
    this.chunk.writeUInt32LE(Math.floor(index / 0x100000000), o + 4);
    this.used += this.entryLength;
    this.count++;
    return o;
  }

  /**
   * Appends whole entries as they are: bytes [start, end) of `src`, entries of this writer's
   * length whose order the caller has checked (the last one's block index is `lastIndex`).
   */
  addRaw(src: Buffer, start: number, end: number, lastIndex: number): void {
    if ((end - start) % this.entryLength !== 0 || end <= start) throw new Error(`internal: ${end - start} bytes are not whole entries of ${this.entryLength}`);
    for (let at = start; at < end; ) {
      if (this.used === this.chunk.length) this.room();
      const n = Math.min(end - at, this.chunk.length - this.used);
      src.copy(this.chunk, this.used, at, at + n);
      this.used += n;
      at += n;
    }
    this.count += (end - start) / this.entryLength;
    this.lastIndex = lastIndex;
  }

  /** The chunk that `add`'s offsets point into. */
  get buf(): Buffer {
    return this.chunk;
  }

  /** The entries added but not emitted yet (a view, valid until the next entry). */
  get unflushed(): Buffer {
    return this.chunk.subarray(0, this.used);
  }

  /** A new chunk, the full one (if any) emitted. */
  private room(): void {
    this.flushChunk();
    this.chunk = Buffer.allocUnsafe(this.chunkBytes);
  }

  /**
   * Hands the entries gathered to the writer as they are, and leaves no chunk: the next
   * entry allocates a new one. (The chunk used to be copied and reused: a second write of
   * every byte of the manifest into freshly faulted pages, ~80 page faults for a scattered
   * incremental's 330 KB manifest, at ~10-15 us each on these VMs; and a manifest's last
   * chunk, often its only one, was never reused.)
   */
  private flushChunk(): void {
    if (this.used === 0) return;
    const data = this.chunk.subarray(0, this.used);
    this.onChunk?.(data);
    this.hash.update(data);
    this.pending = this.pending.then(() => this.out.write(data));
    this.chunk = EMPTY;
    this.used = 0;
  }

  /** Waits for buffered writes (keeps memory bounded when called now and then). */
  async drain(): Promise<void> {
    await this.pending;
  }

  async commit(): Promise<void> {
    this.flushChunk();
    const count = Buffer.alloc(8);
    count.writeBigUInt64LE(BigInt(this.count));
    this.hash.update(count);
    const trailer = Buffer.concat([count, this.hash.digest()]);
    this.pending = this.pending.then(() => this.out.write(trailer));
    await this.pending;
    await this.out.commit();
  }

  async abort(): Promise<void> {
    await this.pending.catch(() => undefined);
    await this.out.abort();
  }
}

/**
 * A growing list of 32-byte digests (a manifest's pieces, and its whole blocks in packs:
 * ./manifest.ts): pushed one at a time, or gathered from manifest entries a chunk at a time
 * (native entryDigests).
 */
export class DigestList {
  private b: Buffer;
  private n = 0;

  /** `expect`: how many digests to make room for at once (memory is touched only as they come). */
  constructor(expect = 64) {
    this.b = Buffer.allocUnsafe(Math.max(64, expect) * 32);
  }

  push(src: Uint8Array, offset: number): void {
    this.room(1);
    this.b.set(src.subarray(offset, offset + 32), this.n++ * 32);
  }

  /** Adds the digests of the 40-byte manifest entries of `entries` that are pieces (`pieces`) or whole blocks (not). */
  gather(entries: Buffer, pieces: boolean): void {
    this.n += this.gatherAt(entries, pieces);
  }

  /** The digests so far (a view, valid until the next addition). */
  get bytes(): Buffer {
    return this.b.subarray(0, this.n * 32);
  }

  /** The digests so far and those `gather(entries, pieces)` would add, without adding them (a view, valid until the next addition). */
  bytesWith(entries: Buffer, pieces: boolean): Buffer {
    const more = this.gatherAt(entries, pieces); // (first: it may grow the buffer)
    return this.b.subarray(0, (this.n + more) * 32);
  }

  private gatherAt(entries: Buffer, pieces: boolean): number {
    if (!entries.length) return 0;
    this.room(entries.length / ENTRY_LENGTH);
    return native().entryDigests(entries, entries.length, pieces, this.b, this.n * 32);
  }

  /** Room for `more` digests past the n held. */
  private room(more: number): void {
    if ((this.n + more) * 32 <= this.b.length) return;
    const bigger = Buffer.allocUnsafe(Math.max(this.b.length * 2, (this.n + more) * 32));
    this.b.copy(bigger, 0, 0, this.n * 32);
    this.b = bigger;
  }
}
