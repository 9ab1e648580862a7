/**
 * Packs: a snapshot's pieces (64 KiB granules, ./manifest.ts) stored as parts of a few large
 * objects instead of one object each.
 *
 * Why: an incremental that rewrote 1% of a volume in scattered writes stores hundreds of
 * pieces, and one object per piece costs a round trip and the gateway's per-request work on
 * S3 (164 PUTs of 64 KiB: 0.6 s on the Ceph gateway of the tests; the same bytes as 6 PUTs:
 * 0.12 s, and a fifth of the gateway's CPU), and a file, a fdatasync and a link each in a
 * directory store (656 objects of 64 KiB: 0.155 s; one 41 MiB file: 0.08 s). Whole blocks stay
 * objects of their own: they are large already, and shared by content across volumes.
 *
 * A pack is an object under `blocks/` holding the stored bytes of its pieces one after the
 * other (sealed pieces as sealed, with their trailers), ~PACK_BYTES each, named by the SHA-256
 * of its piece table (packName; until session 32, of its bytes: both kinds of name are read
 * alike, since nothing derives a pack's name again). It is written like any object (whole or
 * not at all, durable before the manifest that needs it is committed), so gc, copies and the
 * crash order need no new rule beyond marking it live.
 *
 * Where a piece lives: `snapshots/<id>.packs`, the pack index of a snapshot whose manifest is
 * version 3, written beside the manifest before the record says `completed`. It lists every
 * piece of that manifest that is in a pack (its own new ones and those it kept from its
 * parent), sorted by piece digest, so that a snapshot restores alone after its parent is
 * deleted, and gc keeps a pack as long as any index names it:
 *
 *   offset  size  field
 *   0       8     magic "DSNAPPK\n"
 *   8       2     version (1; 2 for an index that lists whole blocks too: see below)
 *   10      2     entry length (72)
 *   12      4     reserved, 0
 *   16      72*n  entries: piece digest (32), pack digest (32), offset in the pack (u32),
 *                 stored length (u32), sorted by piece digest, no digest twice
 *   end-40  8     entry count n (u64)
 *   end-32  32    SHA-256 of every byte before it
 *
 * Little-endian. A reader does not have to trust the index: every piece read through it is
 * checked against its digest as before (authenticated, when sealed), so a damaged or altered
 * index can make a piece unreadable, never wrong.
 *
 * Whole blocks in packs (index version 2, since session 41). An unsealed incremental that reads
 * its dirty blocks in place (../dirty.ts) packs the whole blocks it stores too (those it
 * compacts included), not only the pieces: 41 dirty 1 MiB writes over a 16 GiB qcow2 volume
 * were 82 objects of 512 KiB, each a file, an O_DIRECT write, a fdatasync and a link (or a PUT
 * on S3), and are now ~11 packs. Such a block keeps its slot-0 entry in the manifest, named by
 * its digest as before; its snapshot's index lists where it is, and so does the index of every
 * later snapshot that keeps the entry. An index that lists a whole block has version 2, so that
 * a reader that knows only version 1 refuses it instead of finding the block's object missing,
 * and so that the writer of a child knows it must look its parent's whole-block entries up too
 * (PackTable.listsWhole; a chain without packed whole blocks pays nothing for them). The cost: a
 * whole block in a pack is shared within its volume's chain (the parent's index is consulted)
 * but not with other volumes, which look for objects; full snapshots, sealed stores and tag
 * scans still store whole blocks as objects, shared by content across volumes.
 */
import { createHash } from 'node:crypto';
import { corrupt, isDisksnapError } from '../../engine/errors';
import { native } from '../../engine/native';
import { ObjectData, StoreBackend, dataLength } from './backend';
import type { Throttle } from '../pool';
import { bigBuffer } from './direct';

/** The size a pack is filled to before it is written. */
export const PACK_BYTES = 4 * 1024 * 1024;
/**
 * How many pack buffers one writer fills and writes at a time: a buffer goes back to filling
 * once its pack is stored. Fresh memory costs page faults (./direct.ts), and a buffer per pack
 * (11 for 1% of a 4 GiB volume in scattered writes) cost the incremental ~40 ms of faults and
 * garbage collection on the bench's VM; 4 keep 3 packs in flight while the next one fills.
 * A remote backend (one with a `concurrency`) gets as many as the snapshot's write throttle
 * admits (64 MiB), as before: there a PUT's round trip, not memory, is what packs wait for.
 */
const PACK_BUFFERS = 4;
const REMOTE_PACK_BUFFERS = 16;
const MAGIC = Buffer.from('DSNAPPK\n', 'latin1');
const VERSION = 1;
/** The version of an index that lists whole blocks (slot 0) too (see above). */
const VERSION_WHOLE = 2;
const HEADER = 16;
const ENTRY = 72;
const TRAILER = 40;

export function packsKey(id: string): string {
  return `snapshots/${id}.packs`;
}

/** Where a piece is: a pack's digest, and its bytes there. */
export interface PackedAt {
  pack: Buffer;
  offset: number;
  length: number;
}

/**
 * Piece digest -> where, over the pack indexes read so far (sorted entry tables). The searches
 * are native (native/sorted.cc): an index lists every packed piece of a volume gathered over its
 * snapshots, and a binary search of Buffer#compare calls cost ~2 us a lookup in TypeScript.
 */
export class PackTable {
  private readonly tables: Buffer[] = [];
  private whole = false;

  /** Adds a table of sorted entries (as a pack index holds them); `whole`: the index lists whole blocks too (version 2). */
  add(entries: Buffer, whole = false): void {
    if (entries.length) this.tables.push(entries);
    this.whole ||= whole && entries.length > 0;
  }

  /** Whether a table added lists whole blocks: then a manifest that keeps their entries must look each whole block up. */
  get listsWhole(): boolean {
    return this.whole;
  }

  /** Every pack the tables name, each once. */
  packs(): Buffer[] {
    return packsOf(Buffer.concat(this.tables));
  }

  /** The tables, in the order they were added (read-only: for PackWriter#index). */
  get entryTables(): readonly Buffer[] {
    return this.tables;
  }

  lookup(digest: Uint8Array): PackedAt | undefined {
    const d = digest.length === 32 ? digest : digest.subarray(0, 32);
    for (const t of this.tables) {
      const i = native().sortedFind(t, ENTRY, d);
      if (i < 0) continue;
      const o = i * ENTRY;
      return { pack: t.subarray(o + 32, o + 64), offset: t.readUInt32LE(o + 64), length: t.readUInt32LE(o + 68) };
    }
    return undefined;
  }
}

/** `entries` as the 72-byte entries of an index, in the order given. */
function entryTable(entries: ReadonlyArray<{ digest: Buffer } & PackedAt>): Buffer {
  const out = Buffer.allocUnsafe(entries.length * ENTRY);
  let o = 0;
  for (const e of entries) {
    e.digest.copy(out, o, 0, 32);
    e.pack.copy(out, o + 32, 0, 32);
    out.writeUInt32LE(e.offset, o + 64);
    out.writeUInt32LE(e.length, o + 68);
    o += ENTRY;
  }
  return out;
}

/** The encoded pack index of `entries` (unsorted; of a digest listed twice the first is kept); `whole`: some are whole blocks (version 2). */
export function encodePackIndex(entries: ReadonlyArray<{ digest: Buffer } & PackedAt>, whole = false): Buffer {
  const table = entryTable(entries);
  return frameIndex(table.subarray(0, native().sortRecords(table, ENTRY, 32) * ENTRY), whole);
}

/** A pack index around `sorted`, entries already sorted by digest, each digest once; `whole`: some are whole blocks (version 2). */
function frameIndex(sorted: Buffer, whole: boolean): Buffer {
  const out = Buffer.allocUnsafe(HEADER + sorted.length + TRAILER);
  sorted.copy(out, HEADER);
  const end = frameAround(out, whole);
  createHash('sha256').update(out.subarray(0, end)).digest().copy(out, end);
  return out;
}

/**
 * Writes the header and the entry count of a pack index into `out`, whose entries are in place
 * between the header's room and the trailer's; returns where the checksum goes (the SHA-256 of
 * every byte before it).
 */
function frameAround(out: Buffer, whole: boolean): number {
  const end = out.length - TRAILER;
  MAGIC.copy(out, 0);
  out.writeUInt16LE(whole ? VERSION_WHOLE : VERSION, 8);
  out.writeUInt16LE(ENTRY, 10);
  out.writeUInt32LE(0, 12);
  out.writeBigUInt64LE(BigInt((end - HEADER) / ENTRY), end);
  return end + 8;
}

/** The SHA-256 of `b`, on the addon's thread pool (an index of thousands of pieces: ~1 ms a MB of the event loop's time otherwise). */
async function sha256Off(b: Buffer): Promise<Buffer> {
  return native().hashSpansAsync(b, Float64Array.of(0, b.length), 1);
}

/** A pack index as read: its sorted entries, and whether it lists whole blocks too (version 2). */
export interface PackIndex {
  entries: Buffer;
  whole: boolean;
}

/** The sorted entries of an encoded pack index, checked (ECORRUPT naming `file` otherwise). */
export function decodePackIndex(file: string, b: Buffer): Buffer {
  return openPackIndex(file, b).entries;
}

/** An encoded pack index, checked (ECORRUPT naming `file` otherwise). */
export function openPackIndex(file: string, b: Buffer): PackIndex {
  const sum = checkFrame(file, b);
  if (!createHash('sha256').update(sum).digest().equals(b.subarray(b.length - 32))) throw corrupt(file, 'pack index does not match its checksum (damaged)');
  return checkedEntries(file, b);
}

/** openPackIndex with the checksum computed off the event loop (sha256Off). */
async function openPackIndexAsync(file: string, b: Buffer): Promise<PackIndex> {
  const sum = checkFrame(file, b);
  if (!(await sha256Off(sum)).equals(b.subarray(b.length - 32))) throw corrupt(file, 'pack index does not match its checksum (damaged)');
  return checkedEntries(file, b);
}

/** The header and count of an encoded pack index checked; returns the bytes its checksum covers. */
function checkFrame(file: string, b: Buffer): Buffer {
  if (b.length < HEADER + TRAILER || !b.subarray(0, 8).equals(MAGIC)) throw corrupt(file, 'pack index has no "DSNAPPK\\n" header');
  const version = b.readUInt16LE(8);
  if ((version !== VERSION && version !== VERSION_WHOLE) || b.readUInt16LE(10) !== ENTRY) {
    throw corrupt(file, `pack index version ${version} with ${b.readUInt16LE(10)}-byte entries, expected version ${VERSION} or ${VERSION_WHOLE} with ${ENTRY}`);
  }
  const body = b.length - HEADER - TRAILER;
  const n = Number(b.readBigUInt64LE(b.length - TRAILER));
  if (body % ENTRY !== 0 || n !== body / ENTRY) throw corrupt(file, `pack index is ${b.length} bytes for ${n} entries`);
  return b.subarray(0, b.length - 32);
}

/** The entries of a pack index whose frame and checksum are checked, their order checked too. */
function checkedEntries(file: string, b: Buffer): PackIndex {
  const entries = b.subarray(HEADER, b.length - TRAILER);
  // each entry's digest must be greater than the one before it
  const unordered = native().sortedCheck(entries, ENTRY, 32);
  if (unordered >= 0) throw corrupt(file, `pack index entry ${unordered} is out of order`);
  return { entries, whole: b.readUInt16LE(8) === VERSION_WHOLE };
}

const NAME_DOMAIN = Buffer.from('DSNAPPK name\n', 'latin1');

/**
 * A pack's name: the SHA-256 of its piece table (each piece's digest, offset and stored length,
 * in pack order), not of its bytes. An unsealed piece's digest is the SHA-256 of its stored
 * bytes, so the table commits to them as a hash of the whole would; a sealed piece's digest is
 * its plaintext's HMAC, and its stored bytes are authenticated by its own trailer on every read.
 * Hashing the ~4 MiB of each pack again cost a scattered qcow2 incremental 40 MiB of SHA-256
 * (~25 ms of CPU on two cores) for a name nothing re-derives: readers go by the pack index.
 */
export function packName(parts: ReadonlyArray<{ digest: Buffer; offset: number; length: number }>): Buffer {
  const table = Buffer.allocUnsafe(parts.length * 40);
  parts.forEach((p, i) => {
    p.digest.copy(table, i * 40, 0, 32);
    table.writeUInt32LE(p.offset, i * 40 + 32);
    table.writeUInt32LE(p.length, i * 40 + 36);
  });
  return createHash('sha256').update(NAME_DOMAIN).update(table).digest();
}

/** The pack digests an index's entries name (each once). */
export function packsOf(entries: Buffer): Buffer[] {
  const seen = new Map<string, Buffer>();
  for (let o = 0; o < entries.length; o += ENTRY) {
    const p = entries.subarray(o + 32, o + 64);
    seen.set(p.toString('hex'), p);
  }
  return [...seen.values()];
}

/** A snapshot's pack index at `key`, or undefined when there is none. */
export async function readPackIndex(backend: Pick<StoreBackend, 'get' | 'describe'>, key: string): Promise<PackIndex | undefined> {
  let b: Buffer;
  try {
    b = await backend.get(key);
  } catch (e) {
    if (isDisksnapError(e, 'ENOENT')) return undefined;
    throw e;
  }
  return openPackIndexAsync(backend.describe(key), b);
}

/** A pack buffer being filled. */
interface Filling {
  buf: Buffer;
  /** bytes put or reserved from its start */
  used: number;
  parts: Array<{ digest: Buffer; offset: number; length: number }>;
  /** regions reserved in it and not settled yet: it is written only after the last one */
  open: number;
  /** no more pieces go in: written once no region is open */
  sealed: boolean;
}

/** Room in a pack buffer that pieces are read into in place (PackWriter.reserve, settle). */
export interface PackRegion {
  /** the room: `bytes` of the pack buffer */
  readonly buf: Buffer;
  readonly at: number;
  readonly f: Filling;
}

/**
 * Collects a snapshot's new pieces into packs and writes each full one through `writes` (the
 * snapshot's object writes: drained before its manifest is committed). A piece the snapshot
 * already packed, or one the parent's index places in a pack, is not stored again.
 *
 * Pieces come in two ways. `add` copies a piece's bytes into the pack being filled (into a
 * region it reserves and settles at once). A dirty-range scan (../dirty.ts) instead reads its
 * pieces into the pack buffer itself: it `reserve`s room for a group's pieces before reading
 * them, and `settle`s the region once it knows which of them are new; the bytes of the others
 * are closed up before the pack is written. In a scattered qcow2 incremental (656 pieces of
 * 64 KiB) the copies out of the read buffers had been ~12% of the event loop's work, and the
 * loop was the busier side there.
 */
export class PackWriter {
  private cur: Filling | undefined;
  /** hex digests of pieces queued into packs by this writer */
  private readonly seen = new Set<string>();
  /** the pieces in packs queued for writing so far, each with its pack's name */
  private readonly placed: Array<{ digest: Buffer } & PackedAt> = [];
  /** of those, the pieces whose pack is written */
  private writtenCount = 0;
  private readonly free: Buffer[] = [];
  private buffers = 0;
  private readonly waiting: Array<() => void> = [];
  private readonly maxBuffers: number;
  /** pack writes not admitted by `writes` yet */
  private readonly queued = new Set<Promise<void>>();
  /** reservations are made one after the other, in the order asked */
  private reserveTurn: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly backend: Pick<StoreBackend, 'putIfAbsent' | 'allocBuffer' | 'concurrency'>,
    private readonly table: PackTable,
    private readonly writes: Throttle,
    private readonly keyOf: (digest: Buffer) => string,
  ) {
    this.maxBuffers = backend.concurrency ? REMOTE_PACK_BUFFERS : PACK_BUFFERS;
  }

  /** Whether a piece is packed already (by this writer, or in a parent's pack); notes it as packed if not. */
  private packed(digest: Buffer): boolean {
    const hex = digest.toString('hex');
    if (this.seen.has(hex) || this.table.lookup(digest)) return true;
    this.seen.add(hex);
    return false;
  }

  /** Queues one piece (its stored bytes), copied; false when it was packed already (not stored again). */
  async add(digest: Buffer, data: ObjectData): Promise<boolean> {
    if (this.packed(digest)) return false;
    const r = await this.reserve(dataLength(data));
    let at = 0;
    for (const part of data instanceof Uint8Array ? [data] : data) {
      r.buf.set(part, at);
      at += part.length;
    }
    this.close(r, [{ off: 0, len: at, digest }]);
    return true;
  }

  /**
   * Room for `bytes` of pieces to be read into, in the pack being filled or a fresh one (of its
   * own where they are more than PACK_BYTES); the pack is not written before the region is
   * settled. Reservations are made in the order they are asked for.
   */
  reserve(bytes: number): Promise<PackRegion> {
    const r = this.reserveTurn.then(async () => {
      if (this.cur && this.cur.used + bytes > this.cur.buf.length) this.seal();
      const f = (this.cur ??= this.filling(await this.take(bytes)));
      const region = { buf: f.buf.subarray(f.used, f.used + bytes), at: f.used, f };
      f.used += bytes;
      f.open++;
      return region;
    });
    this.reserveTurn = r.catch(() => undefined);
    return r;
  }

  /**
   * The pieces read into `region` that are to be stored ([offset in the region, length,
   * digest], ascending): those not packed already go into its pack, the bytes of the others are
   * dropped. Call once per region, after the read (also after a failure, with none). Returns
   * how many pieces and bytes were added.
   */
  settle(region: PackRegion, pieces: Array<{ off: number; len: number; digest: Buffer }>): { count: number; bytes: number } {
    const fresh = pieces.filter((x) => !this.packed(x.digest));
    this.close(region, fresh);
    return { count: fresh.length, bytes: fresh.reduce((n, x) => n + x.len, 0) };
  }

  /** The region's pieces `pieces` go into its pack, which is written if sealed and this was its last open region. */
  private close(region: PackRegion, pieces: Array<{ off: number; len: number; digest: Buffer }>): void {
    const f = region.f;
    for (const x of pieces) f.parts.push({ digest: Buffer.from(x.digest), offset: region.at + x.off, length: x.len });
    f.open--;
    if (f.sealed && f.open === 0) this.queue(f);
  }

  /** No more pieces go into the pack being filled: it is written once its regions are settled. */
  private seal(): void {
    const f = this.cur;
    this.cur = undefined;
    if (!f) return;
    f.sealed = true;
    if (f.open === 0) this.queue(f);
  }

  private filling(buf: Buffer): Filling {
    return { buf, used: 0, parts: [], open: 0, sealed: false };
  }

  /**
   * Allocates the pack buffers that `bytes` of new pieces will fill (up to the writer's limit)
   * and has their pages faulted in now, one buffer after another on the thread pool, while the
   * snapshot reads: the first touch of fresh pack buffers is otherwise taken by whoever fills
   * them (4,096 faults for four 4 MiB buffers of 4 KiB pages): until session 35 the copies on
   * the event loop, now the read jobs that fill them in place (../dirty.ts). For a caller
   * that knows what it will pack before it reads (a dirty-range scan, ../dirty.ts). Measured on
   * a scattered qcow2 incremental (40 MiB of pieces), alternating fixed-state pairs: -10, 0 and
   * -5 ms at the median in three sets (15, 15 and 20 pairs).
   */
  prepare(bytes: number): void {
    let chain: Promise<unknown> = Promise.resolve();
    for (let want = Math.min(this.maxBuffers, Math.ceil(bytes / PACK_BYTES)); this.buffers < want; ) {
      const buf = this.alloc(PACK_BYTES);
      this.buffers++;
      this.free.push(buf);
      chain = chain.then(() => native().populateAsync(buf)).catch(() => undefined); // (only a head start: a failure costs nothing)
    }
  }

  /**
   * A buffer to fill: a free one, a new one while fewer than maxBuffers exist, else the
   * next one a finished write gives back. (A piece larger than PACK_BYTES, of a store with
   * blocks over 32 MiB, gets a buffer of its own, not kept.)
   */
  private async take(len: number): Promise<Buffer> {
    if (len > PACK_BYTES) return this.alloc(len);
    while (!this.free.length && this.buffers >= this.maxBuffers) await new Promise<void>((r) => this.waiting.push(r));
    const buf = this.free.pop();
    if (buf) return buf;
    this.buffers++;
    return this.alloc(PACK_BYTES);
  }

  private give(buf: Buffer): void {
    if (buf.length !== PACK_BYTES) return;
    this.free.push(buf);
    this.waiting.shift()?.();
  }

  private alloc(n: number): Buffer {
    return this.backend.allocBuffer?.(n) ?? bigBuffer(n);
  }

  /**
   * Queues the write of pack `f` on `writes`: its parts closed up over the bytes of the pieces
   * not stored (in offset order), written as one object; an empty one is not written.
   */
  private queue(f: Filling): void {
    const parts = f.parts.sort((a, b) => a.offset - b.offset);
    let len = 0;
    for (const p of parts) {
      if (p.offset !== len) f.buf.copyWithin(len, p.offset, p.offset + p.length);
      p.offset = len;
      len += p.length;
    }
    if (!parts.length) {
      this.give(f.buf);
      return;
    }
    const buf = f.buf;
    // Named (and placed, for the pack index) as it is queued: the index can be made while the
    // last packs are still being written (../lifecycle.ts completeSnapshot).
    const name = packName(parts);
    for (const p of parts) this.placed.push({ ...p, pack: name });
    const admitted = this.writes.add(len, async () => {
      try {
        const body = buf.subarray(0, len);
        // a remote backend signs the body's SHA-256 (x-amz-content-sha256): hashed off the event loop
        const payload = this.backend.concurrency ? Buffer.from((await native().hashBlocksAsync(body, len, 1)).digests.subarray(0, 32)) : undefined;
        await this.backend.putIfAbsent(this.keyOf(name), body, payload);
        this.writtenCount += parts.length;
      } finally {
        // (after a failure too: a filler waiting for a buffer goes on, and the writes' throttle reports the error)
        this.give(buf);
      }
    });
    // Refused before it ran (an earlier write failed: `writes` reports that one when drained):
    // the buffer goes back all the same, or a filler waiting for one would wait forever.
    const q = admitted.catch(() => this.give(buf));
    this.queued.add(q);
    void q.then(() => this.queued.delete(q));
  }

  /**
   * Writes the pack being filled, if any, and waits until every pack write is queued on
   * `writes`; throws the first write that failed so far.
   */
  async flush(): Promise<void> {
    this.seal();
    while (this.queued.size) await Promise.all([...this.queued]);
    this.writes.check();
  }

  /**
   * The pack index of a manifest whose piece entries are `pieceDigests` and whose whole-block
   * entries that may be in packs are `wholeDigests` (32 bytes each, in any order, repeats
   * allowed): where each one is, from this writer's packs or the tables read (the parent's);
   * those in neither are objects of their own and not listed. Version 2 when it lists a whole
   * block. Call once every pack is queued (`flush`); the writes may still be running, and the
   * index must not count as durable before they are done (`pending`).
   */
  async index(pieceDigests: Buffer, wholeDigests: Buffer = Buffer.alloc(0)): Promise<Buffer> {
    const mine = entryTable(this.placed);
    const tables = [mine.subarray(0, native().sortRecords(mine, ENTRY, 32) * ENTRY), ...this.table.entryTables];
    // One join of both kinds (a digest both a piece's and a whole block's is one object, listed
    // once), into the index's frame; a whole block's digest found makes it version 2. Its
    // checksum is computed on the thread pool while the caller goes on (the manifest's commit).
    const { entries: out, later } = native().sortedJoin(pieceDigests, 32, tables, ENTRY, wholeDigests, HEADER, TRAILER);
    const end = frameAround(out, later > 0);
    (await sha256Off(out.subarray(0, end))).copy(out, end);
    return out;
  }

  /** Whether a piece this writer took is not in a written pack yet: a bug if so once the writes are done. */
  get pending(): boolean {
    return this.writtenCount < this.seen.size;
  }
}
