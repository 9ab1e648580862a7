/**
 * The dirty-range scan of `snapshot create` (./detect.ts picks it): a trusted record of which
 * byte ranges may have changed since the parent (a qcow2 volume's persistent bitmap, the
 * extents where two reflink clones differ, or nothing at all for a volume proven unchanged).
 *
 * Only the blocks those ranges touch are read and hashed; every other block keeps the parent's
 * manifest entries and, where the new snapshot writes change tags, the parent's tag entry (a
 * block that became zero was written too, so it is among the dirty ones).
 *
 * Pieces (./store/manifest.ts): where the new manifest has them, a dirty block that has at
 * most MAX_NEW_PIECES of its eight 64 KiB granules dirty reads only those granules and
 * stores each as a piece of its own (in a pack: ./store/packs.ts). The parent's entries for
 * the block stay beside them.
 * With 1% of a 4 GiB qcow2 volume rewritten in scattered 64 KiB writes, an incremental reads
 * and stores 41 MiB instead of the 285 MiB of blocks around them. A block where a dirty
 * granule now reads as zeros (or whose pieces would number more than MAX_PIECES: one for each
 * granule, so never by count) is read whole again and stored as one object (compacted); a
 * restore reads at most 1 + MAX_PIECES objects for a block.
 * A block this scan stores as pieces gets no change tag (it read only the granules, and a tag
 * is of a whole block's bytes): the next tag scan finds it changed. A parent's block with
 * pieces that a tag scan tagged keeps its tag entry (of the bytes all its entries make).
 *
 * Dirty blocks are read in groups that fill a buffer and span at most 8 buffers' worth of
 * blocks, so the parent entries held back to keep the manifest in block order stay few. The
 * blocks read whole get fresh tags under this attempt's salt.
 *
 * Where new pieces go into packs unsealed, a group's pieces are read straight into a region of
 * a pack buffer (PackWriter.reserve; at most a pack's bytes per group), hashed there, and the
 * region settled once the group is planned: the pieces found new stay, the others' bytes are
 * closed up before the pack is written. Before, they were read into the pool buffer and copied
 * into the pack, ~12% of the event loop's work in the scattered incremental above.
 * Since session 41 the group's whole blocks are read into that region too, ahead of its pieces,
 * and the new ones stored in the pack (whole blocks in packs: ./store/packs.ts): the 1 MiB
 * pattern's 82 blocks were 82 objects, each a file, a fdatasync and a link. Compacted blocks,
 * read again into a pool buffer, are copied into the packs too.
 */
import type { BlockHashes } from '../engine/native';
import { BlockEntries, ENTRY_LENGTH, EntryRun, ManifestCursor, ManifestHeader, SlotEntry, addSlot, blockLength, pieceRange } from './store/manifest';
import { TagReader, TagWriter, tagIvs, xor16 } from './store/tags';
import type { ChangeDetector, ReadPipeline, StoreItem } from './capture';
import { PACK_BYTES, type PackRegion } from './store/packs';


/** A block with more dirty granules than this is read whole. */
export const MAX_NEW_PIECES = 4;
/**
 * A block whose pieces would number more than this is read whole again (compacted). Eight:
 * one for each granule of a block (pieces are an eighth of a block), so a block's pieces never
 * need compacting by their count, only when a dirty granule reads as zeros. It was four until
 * session 42: along a chain of scattered 64 KiB incrementals, more and more blocks reached a
 * fifth piece and were read whole again, on the merge's path (the compaction is known only once
 * the parent's entries are merged): over 16 GiB with 4 GiB of data, 656 writes a round, the
 * bytes read went 41 -> 49 MiB by round 24 and 76 MiB by round 48, and the incremental 0.091
 * -> 0.109 -> 0.136 s. With eight, in the same run beside it (its own store and bitmap over the
 * same writes): 41 MiB every round, 0.091 -> 0.097 -> 0.115 s. The price: bigger manifests and
 * pack indexes (at round 48 1.33 against 1.11 MB, 1.81 against 1.50 MB), bounded by nine
 * entries a block, and a restore that reads up to nine objects for a block (the last snapshot
 * of that chain restored in 5.2-5.5 s against 4.9-6.9 s).
 */
export const MAX_PIECES = 8;
/**
 * Groups read and hashed ahead of the one being merged. One, while the event loop's share of a
 * group (merging, copying pieces into packs) was the longer one; two since the pieces are read
 * in place: in alternating fixed-state runs of the scattered qcow2 incremental the dirty pass
 * went 75 -> 62 ms at the median (12 of 12 pairs faster), and the 1 MiB pattern's 73 -> 64 ms (9
 * of 10); three were no faster than two.
 */
const READ_AHEAD = 2;

/** A dirty block: read whole, or only the piece slots (1-based, ascending) its dirty granules are. */
export interface Unit {
  i: number;
  slots?: number[];
}

/**
 * The dirty blocks of `ranges` (byte ranges, in any order), ascending: each with the slots of
 * its dirty granules of `ps` bytes where it has at most MAX_NEW_PIECES of them (ps 0: none).
 */
export function unitsOf(ranges: Array<{ offset: number; length: number }>, bs: number, ps: number, size: number): Unit[] {
  const masks = new Map<number, number>();
  const order: number[] = [];
  const sorted = [...ranges].sort((a, b) => a.offset - b.offset);
  for (const r of sorted) {
    const end = Math.min(size, r.offset + r.length);
    if (r.length <= 0 || r.offset >= end) continue;
    for (let i = Math.floor(r.offset / bs); i * bs < end; i++) {
      let bits = 0xff;
      if (ps) {
        const a = Math.floor((Math.max(r.offset, i * bs) - i * bs) / ps);
        const b = Math.ceil((Math.min(end, (i + 1) * bs) - i * bs) / ps);
        bits = ((1 << b) - 1) & ~((1 << a) - 1);
      }
      const m = masks.get(i);
      if (m === undefined) order.push(i);
      masks.set(i, (m ?? 0) | bits);
    }
  }
  order.sort((a, b) => a - b);
  return order.map((i) => {
    const m = masks.get(i)!;
    const slots: number[] = [];
    for (let s = 0; s < 8; s++) if (m & (1 << s)) slots.push(s + 1);
    return ps && slots.length <= MAX_NEW_PIECES ? { i, slots } : { i };
  });
}

/**
 * A group of units as read, each part hashed: the whole blocks at k*bs of a pool buffer, and
 * the pieces one after the other, each at j*pieceSize, either after the whole blocks in that
 * buffer (from `base` on) or, where new pieces go into packs unsealed, in a pack buffer's
 * region (`region`), read there in place.
 */
interface UnitsRead {
  /** the pool buffer (none when the group was read into a region) */
  buf: Buffer | undefined;
  /** the whole blocks' hashes (with unmasked tags under the proof key), in unit order */
  whole: BlockHashes | undefined;
  /** the pieces' hashes, in unit then slot order */
  pieces: BlockHashes | undefined;
  /** where the pieces start in `buf` or in the region (after the whole blocks, at k*bs of either) */
  base: number;
  region: PackRegion | undefined;
}

/** Bytes a unit reads. */
function unitBytes(p: ReadPipeline, u: Unit): number {
  if (!u.slots) return p.spanBytes(u.i, u.i + 1);
  return u.slots.reduce((n, s) => n + pieceRange(s, u.i, p.size, p.bs, p.pieceSize).length, 0);
}

/**
 * Whether dirty blocks and pieces are read straight into pack buffers (./store/packs.ts
 * PackWriter.reserve) and the new ones stored there: when pieces go into packs, and unsealed (a
 * sealed object is stored with a trailer after it).
 */
function inPlace(p: ReadPipeline): boolean {
  return p.packNew && !p.store.codec.keys;
}

/**
 * Reads `units` and hashes them where they were read: a pack region where they are read in
 * place, else a pool buffer. The caller owns the buffer or the region.
 */
async function readUnits(p: ReadPipeline, units: Unit[]): Promise<UnitsRead> {
  const { bs, size, pieceSize: ps } = p;
  const whole: number[] = [];
  let kw = 0;
  let wlen = 0;
  for (const u of units) {
    if (u.slots) continue;
    const len = blockLength(u.i, size, bs);
    whole.push(u.i * bs, kw * bs, len);
    wlen = kw * bs + len; // only the volume's last block is short, and it comes last
    kw++;
  }
  const pieces: number[] = [];
  let j = 0;
  let plen = 0;
  for (const u of units) {
    for (const s of u.slots ?? []) {
      const r = pieceRange(s, u.i, size, bs, ps);
      pieces.push(u.i * bs + r.offset, j * ps, r.length);
      plen = j * ps + r.length;
      j++;
    }
  }
  // in place: the whole blocks, then the pieces, in one region of a pack buffer; else the
  // whole blocks, then the pieces, in a pool buffer
  const direct = inPlace(p);
  const base = direct ? wlen : kw * bs;
  const buf = direct ? undefined : await p.pool.acquire();
  let region: PackRegion | undefined;
  try {
    if (direct) region = await p.packs!.reserve(wlen + plen);
    const mem = region?.buf ?? buf!;
    const into = mem.subarray(base);
    // Each part is read by the pool job that hashes it (hashBlocksAsync's `reads`): a read and
    // then a hash waited for the event loop between them, busy merging the group before. Both
    // jobs end before a failure is thrown: the buffers go back only then.
    const [a, b] = await Promise.allSettled([
      kw ? p.readWith(mem, Float64Array.from(whole), (fd, host) => p.n.hashBlocksAsync(mem.subarray(0, wlen), bs, p.threads, p.key, p.proofKey, undefined, fd, host)) : undefined,
      j ? p.readWith(into, Float64Array.from(pieces), (fd, host) => p.n.hashBlocksAsync(into.subarray(0, plen), ps, p.threads, p.key, undefined, undefined, fd, host)) : undefined,
    ]);
    if (a.status === 'rejected') throw a.reason;
    if (b.status === 'rejected') throw b.reason;
    return { buf, whole: a.value, pieces: b.value, base, region };
  } catch (e) {
    if (buf) p.pool.release(buf);
    if (region) p.packs!.settle(region, []);
    throw e;
  }
}

/**
 * The parent entries of a group's span held back while the group is stored (they go into the
 * manifest between its blocks): runs of entries as read (ManifestCursor.runNow, cut at the
 * group's dirty blocks, so no run spans one), copied one after the other into one buffer, and
 * the tag entries (from the salt on) of their blocks that have one. Holding a run is one copy,
 * not one per entry: a scattered incremental holds most of the parent's entries (~8,000 of a
 * 16 GiB qcow2 volume with 4 GiB of data), and one at a time they cost it ~12 ms.
 * (Exported for tests.)
 */
export class Held {
  private m: Buffer = Buffer.allocUnsafe(256 * ENTRY_LENGTH);
  private used = 0; // entries in m
  private t: Buffer = Buffer.alloc(0);
  private tUsed = 0;
  /** the runs held: each ends at entry `end` of m (it starts where the one before ended) */
  private readonly runs: Array<Omit<EntryRun, 'chunk' | 'start' | 'header' | 'wholes' | 'spent'>> = [];
  private readonly tagIdx: number[] = [];
  private readonly tagOff: number[] = [];
  private done = 0; // runs recorded
  private tagsDone = 0;

  constructor(private readonly header: ManifestHeader) {}

  /** Holds a run as read (valid until the reader reads on, so it is copied now). */
  addRun(run: EntryRun): void {
    const n = (run.end - run.start) / ENTRY_LENGTH;
    if ((this.used + n) * ENTRY_LENGTH > this.m.length) this.m = grown(this.m, Math.max(2 * this.m.length, (this.used + n) * ENTRY_LENGTH), this.used * ENTRY_LENGTH);
    run.chunk.copy(this.m, this.used * ENTRY_LENGTH, run.start, run.end);
    this.used += n;
    this.runs.push({ end: this.used, first: run.first, firstSlot: run.firstSlot, last: run.last, lastSlot: run.lastSlot, blocks: run.blocks, pieces: run.pieces });
  }

  /** Holds block j's tag entry, at `at` of the parent's tag reader (after its run). */
  addTag(j: number, tags: TagReader, at: number): void {
    const n = tags.entryBytes;
    if (this.tUsed + n > this.t.length) this.t = grown(this.t, Math.max(2 * this.t.length, 64 * n), this.tUsed);
    tags.entries.copy(this.t, this.tUsed, at, at + n);
    this.tagIdx.push(j);
    this.tagOff.push(this.tUsed);
    this.tUsed += n;
  }

  /** Records the held runs of blocks below `limit` not recorded yet, as one run, with their tag entries. */
  recordUntil(limit: number, p: Pick<ReadPipeline, 'recordRun'>, tw: TagWriter | undefined, ptags: TagReader | undefined): void {
    const { runs } = this;
    const a = this.done;
    let b = a;
    let blocks = 0;
    let pieces = false;
    for (; b < runs.length && runs[b].first < limit; b++) {
      // a run that goes on with the block the one before ended in (a chunk ended it) adds one block less
      blocks += runs[b].blocks - (b > a && runs[b].first === runs[b - 1].last ? 1 : 0);
      pieces ||= runs[b].pieces;
    }
    if (b === a) return;
    const start = a ? runs[a - 1].end : 0;
    p.recordRun({ chunk: this.m, start: start * ENTRY_LENGTH, end: runs[b - 1].end * ENTRY_LENGTH, header: this.header, first: runs[a].first, firstSlot: runs[a].firstSlot, last: runs[b - 1].last, lastSlot: runs[b - 1].lastSlot, blocks, wholes: [], pieces, spent: false });
    for (; this.tagsDone < this.tagIdx.length && this.tagIdx[this.tagsDone] < limit; this.tagsDone++) {
      tw!.carryCopy(this.tagIdx[this.tagsDone], ptags!, this.t, this.tagOff[this.tagsDone]);
    }
    this.done = b;
  }
}

/** A buffer of `size` bytes holding the first `used` of `b`. */
function grown(b: Buffer, size: number, used: number): Buffer {
  const n = Buffer.allocUnsafe(size);
  b.copy(n, 0, 0, used);
  return n;
}

export function dirtyScan(dirty: Array<{ offset: number; length: number }>): ChangeDetector {
  return (p, parent) => new DirtyScan(p, parent.cursor!, parent.tags).run(dirty);
}

/**
 * The parent manifest's side of a dirty-range scan: its entries in block order, from where the
 * last call stopped, kept (recorded, or held for a group) or, for a dirty block, handed over.
 * (Exported for tests.)
 */
export class ParentEntries {
  private next = 0; // first index the parent's manifest has not been consulted for

  constructor(
    private readonly cursor: ManifestCursor,
    private readonly rec: Pick<ReadPipeline, 'recordRun'>,
    private readonly ptags?: TagReader,
    private readonly tw?: TagWriter,
  ) {}

  /**
   * Parent entries of blocks [next, limit): recorded when `hold` is absent, else held
   * (copied); those of the dirty blocks `dirty` (ascending) go to `dirtyPrev`. Entries already
   * in the readers' chunks are taken without an await, and those between dirty blocks go over
   * in runs, one copy each (ManifestCursor.runNow): a bitmap incremental copies every data
   * block's entry, 8192 of a 16 GiB qcow2 volume with 4 GiB of data, two million of a full
   * 1 TiB one.
   */
  async until(limit: number, dirty: number[], hold?: Held, dirtyPrev?: Map<number, BlockEntries>): Promise<void> {
    const { cursor, ptags } = this;
    let d = 0; // dirty[d] is the first dirty block at or after the cursor's
    for (;;) {
      const j = cursor.peekNow(this.next) ?? (await cursor.peek(this.next));
      if (j < 0 || j >= limit) break;
      while (d < dirty.length && dirty[d] < j) d++;
      if (d < dirty.length && dirty[d] === j) {
        const { slot, chunkBytes, digestOffset } = cursor.reader; // the entry peek stopped on
        if (dirtyPrev) addEntry(dirtyPrev, j, { slot, digest: Buffer.from(chunkBytes.subarray(digestOffset, digestOffset + 32)) });
        if (!cursor.stepNow()) await cursor.step();
        this.next = j;
        continue;
      }
      // j is kept: it and the blocks after it up to the next dirty one go over as a run
      const run = cursor.runNow(Math.min(limit, d < dirty.length ? dirty[d] : limit), !!ptags)!;
      if (hold) hold.addRun(run);
      else this.rec.recordRun(run);
      if (ptags) {
        // (a block's tag entry goes with its first entry, slot 0; pieces over zeros lose theirs)
        for (const w of run.wholes) {
          const at = ptags.lookupNow(w) ?? (await ptags.lookup(w));
          if (at < 0) continue;
          if (hold) hold.addTag(w, ptags, at);
          else this.tw!.carry(w, ptags, at);
        }
      }
      this.next = run.last;
      if (run.spent) await cursor.step();
    }
    this.next = Math.max(this.next, limit);
  }
}

/** A group as planned for storing: per unit where its new entries come from. */
interface GroupPlan {
  /** objects to store from the group's buffer */
  items: StoreItem[];
  /** blocks to read whole again (compacted) */
  compact: number[];
  /** per unit: its whole-block hash index in the group's read (whole units) */
  at: number[];
  /** per pieced unit kept as pieces: its pieces in the new manifest, in slot order */
  piecesOf: Map<number, SlotEntry[]>;
  /** the new blocks and pieces read in place into the group's pack region: offset there, length, digest */
  packed: Array<{ off: number; len: number; digest: Buffer }>;
}

/** One run of the dirty-range scan (see the note above). */
class DirtyScan {
  private readonly parent: ParentEntries;
  private readonly tw: TagWriter | undefined;
  private readonly ptags: TagReader | undefined;

  constructor(
    private readonly p: ReadPipeline,
    private readonly cursor: ManifestCursor,
    tags: TagReader | undefined,
  ) {
    this.tw = p.tagWriter && p.tk ? p.tagWriter : undefined;
    this.ptags = this.tw ? tags : undefined;
    this.parent = new ParentEntries(cursor, p, this.ptags, this.tw);
  }

  async run(dirty: Array<{ offset: number; length: number }>): Promise<void> {
    const p = this.p;
    if (p.settings.prove) throw new Error('internal: a dirty-range scan reads an unchanging view and cannot prove one moment');
    const units = unitsOf(dirty, p.bs, p.pieceSize, p.size);
    p.willRead(units.reduce((n, u) => n + unitBytes(p, u), 0));
    // (a group read in place takes one pack region: at most a pack's bytes)
    const cap = inPlace(p) ? Math.min(PACK_BYTES, p.maxBlocks * p.bs) : p.maxBlocks * p.bs;
    const capOf = (u: Unit) => (u.slots ? u.slots.length * p.pieceSize : p.bs);
    const groups: Unit[][] = [];
    for (let d = 0; d < units.length; ) {
      const group: Unit[] = [];
      let used = 0;
      const fits = (u: Unit) => used + capOf(u) <= cap && u.i - group[0].i < 8 * p.maxBlocks;
      while (d < units.length && (group.length === 0 || fits(units[d]))) {
        used += capOf(units[d]);
        group.push(units[d++]);
      }
      groups.push(group);
    }
    // The next groups are read and hashed while this one is merged and stored: a group is often
    // a few blocks (41 dirty 1 MiB pieces over a 16 GiB volume are 41 groups of 2), so the
    // time between reads mattered as much as the reads. READ_AHEAD says how many.
    // the pack buffers the reads will fill, faulted in on the thread pool while the groups are read
    if (inPlace(p)) p.packs!.prepare(units.reduce((n, u) => n + unitBytes(p, u), 0));
    else if (p.packNew) p.packs!.prepare(units.reduce((n, u) => n + (u.slots ? unitBytes(p, u) : 0), 0));
    const aheads: Array<Promise<UnitsRead>> = [];
    let next = 0;
    const fill = () => {
      while (aheads.length < READ_AHEAD && next < groups.length) aheads.push(readUnits(p, groups[next++]));
    };
    fill();
    try {
      for (let gi = 0; gi < groups.length; gi++) {
        const read = await aheads.shift()!;
        fill();
        await this.mergeGroup(groups[gi], read);
      }
    } finally {
      // a failure left reads ahead in flight: their buffers go back to the pool
      for (const a of aheads) await a.then((r) => release(p, r), () => undefined);
    }
    await this.parent.until(Number.MAX_SAFE_INTEGER, []);
  }

  /** What to store and record for a group as read, given the parent's entries of its blocks. */
  private plan(group: Unit[], read: UnitsRead, prev: Map<number, BlockEntries>): GroupPlan {
    const { p } = this;
    const g: GroupPlan = { items: [], compact: [], at: [], piecesOf: new Map(), packed: [] };
    let kw = 0;
    let j = 0;
    for (const u of group) {
      if (!u.slots) {
        const h = read.whole!;
        const k = kw++;
        if (!h.zero[k] && !sameWhole(prev, u.i, h, k)) (read.region ? g.packed : g.items).push({ off: k * p.bs, len: p.spanBytes(u.i, u.i + 1), digest: h.digests.subarray(k * 32, k * 32 + 32) });
        g.at.push(k);
        continue;
      }
      const h = read.pieces!;
      const j0 = j;
      j += u.slots.length;
      g.at.push(-1);
      const old = prev.get(u.i)?.pieces ?? [];
      const kept = old.filter((x) => !u.slots!.includes(x.slot));
      if (u.slots.some((_, x) => h.zero[j0 + x]) || kept.length + u.slots.length > MAX_PIECES) {
        g.compact.push(u.i); // a granule now zero, or too many pieces: read whole
        continue;
      }
      const fresh = u.slots.map((slot, x) => ({ slot, digest: h.digests.subarray((j0 + x) * 32, (j0 + x) * 32 + 32) }));
      fresh.forEach((f, x) => {
        const was = old.find((o) => o.slot === f.slot);
        if (was && was.digest.equals(f.digest)) return;
        const piece = { off: read.base + (j0 + x) * p.pieceSize, len: pieceRange(f.slot, u.i, p.size, p.bs, p.pieceSize).length, digest: f.digest };
        if (read.region) g.packed.push(piece);
        else g.items.push({ ...piece, piece: true });
      });
      g.piecesOf.set(u.i, [...kept, ...fresh].sort((a, b) => a.slot - b.slot));
    }
    return g;
  }

  /** One group read and hashed: stored, then merged with the held parent entries in block order (takes `read`). */
  private async mergeGroup(group: Unit[], read: UnitsRead): Promise<void> {
    const { p, tw } = this;
    let stored = false;
    let settled = false;
    try {
      const inGroup = group.map((u) => u.i);
      await this.parent.until(group[0].i, inGroup);
      const held = new Held(this.cursor.reader.header);
      const prev = new Map<number, BlockEntries>();
      await this.parent.until(group[group.length - 1].i + 1, inGroup, held, prev);
      const g = this.plan(group, read, prev);
      if (read.region) {
        settled = true; // (once: not again in `finally` should this throw)
        const added = p.packs!.settle(read.region, g.packed);
        p.rec.stats.blocksAdded += added.count;
        p.rec.stats.bytesAdded += added.bytes;
      }
      stored = true;
      if (read.buf) await p.storeItems(read.buf, g.items);
      // the compacted blocks, read whole again (a buffer's worth at a time)
      const again = new Map<number, [BlockHashes, number]>();
      for (let c = 0; c < g.compact.length; c += p.maxBlocks) {
        const part = g.compact.slice(c, c + p.maxBlocks);
        const h = await p.readAndStore(part, (k, hh) => !hh.zero[k] && !sameWhole(prev, part[k], hh, k), inPlace(p));
        part.forEach((i, k) => again.set(i, [h, k]));
      }
      const wholeOf = (u: Unit, x: number): [BlockHashes, number] | undefined => (u.slots ? again.get(u.i) : [read.whole!, g.at[x]]);
      // fresh tags of the group's blocks read whole: the unmasked tag under this attempt's salt
      const tagged: Array<[number, BlockHashes, number]> = [];
      group.forEach((u, x) => {
        const w = wholeOf(u, x);
        if (w && !w[0].zero[w[1]]) tagged.push([u.i, w[0], w[1]]);
      });
      const masks = tw && tagged.length && tagged[0][1].tags ? p.n.tagMasks(p.tk!.key, tagIvs(tagged.map((t) => t[0]), p.salt, () => 0)) : undefined;
      if (masks) tagged.forEach(([, h, k], y) => xor16(h.tags!, k * 16, masks, y * 16, masks, y * 16));
      // the group's blocks and the held parent entries, merged in block order
      let y = 0;
      group.forEach((u, x) => {
        held.recordUntil(u.i, p, tw, this.ptags);
        const w = wholeOf(u, x);
        if (w) {
          const [h, k] = w;
          if (h.zero[k]) return;
          if (!sameWhole(prev, u.i, h, k)) p.rec.stats.changedBlocks++;
          p.record(u.i, h.digests, k * 32);
          // a block read in place, or compacted, went into a pack (or was in one already): its index lists it
          if (inPlace(p)) p.notePacked(h.digests, k * 32);
          if (masks) tw!.append(u.i, p.salt, 0, masks, y++ * 16);
          return;
        }
        const base = prev.get(u.i)?.digest;
        if (base) p.record(u.i, base, 0);
        for (const piece of g.piecesOf.get(u.i)!) p.record(u.i, piece.digest, 0, undefined, 0, piece.slot);
        p.rec.stats.changedBlocks++;
      });
      held.recordUntil(Number.MAX_SAFE_INTEGER, p, tw, this.ptags);
      await p.chunkDone(group.reduce((n, u) => n + unitBytes(p, u), 0) + g.compact.reduce((n, i) => n + p.spanBytes(i, i + 1), 0));
    } finally {
      if (!stored && read.buf) p.pool.release(read.buf);
      if (read.region && !settled) p.packs!.settle(read.region, []);
    }
  }
}

/** Gives back what a group's read holds, unused: its pool buffer, and its pack region (settled with nothing). */
function release(p: ReadPipeline, r: UnitsRead): void {
  if (r.buf) p.pool.release(r.buf);
  if (r.region) p.packs!.settle(r.region, []);
}

/** Whether the parent has block i as one whole object of digest h.digests[k]. */
function sameWhole(prev: Map<number, BlockEntries>, i: number, h: BlockHashes, k: number): boolean {
  const e = prev.get(i);
  return !!e?.digest && !e.pieces && e.digest.compare(h.digests, k * 32, k * 32 + 32) === 0;
}

function addEntry(m: Map<number, BlockEntries>, i: number, x: SlotEntry): void {
  let e = m.get(i);
  if (!e) m.set(i, (e = { index: i, digest: undefined, pieces: undefined }));
  addSlot(e, x);
}
