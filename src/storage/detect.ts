/**
 * The change-detection paths of `snapshot create`: each one decides which blocks of the
 * volume to read, hash and store, over the one read pipeline of ./capture.ts, and each has
 * the same signature (ChangeDetector), so a new source of change information (QEMU's dirty
 * bitmaps) is one more function here.
 *
 *   fullHash  no usable parent: read each 16 MiB chunk once into a buffer, hash it there
 *             (SHA-256 and tag), write the new blocks from that same buffer.
 *   tagScan   the parent has change tags (src/storage/store/tags.ts: a GMAC per block under
 *             a secret key, ~6x cheaper than SHA-256): native tagFile over 64 MiB chunks; a
 *             block whose tag is its parent's keeps the parent's digest and tag; the others
 *             are copied by that same read into a buffer (only those past the buffer's room
 *             are read a second time). Where the parent has granule tags, a changed block
 *             whose moved 64 KiB granules are few is stored as those granules (pieces);
 *             the others are hashed there with SHA-256 and stored whole (if new).
 *   hashScan  a parent without usable tags: native hashFile over 64 MiB chunks (SHA-256, and
 *             the tags for next time), then only the changed blocks read into a buffer and
 *             hashed again there.
 *   unchangedScan  a raw volume whose identity and times are those its parent recorded
 *             (read live on ext4, xfs or btrfs, where every write moves them): nothing is
 *             read; every block keeps the parent's entries.
 *   reflinkScan  a raw volume on xfs/btrfs whose parent kept a trusted reflink clone
 *             (./reflink.ts): only the blocks whose physical extents differ between the new
 *             clone and the parent's are read (from the new clone) and hashed; the others keep
 *             the parent's manifest and tag entries. bitmapScan (a qcow2 volume's persistent
 *             bitmap) is the same scan over the bitmap's dirty ranges (./dirty.ts), and both
 *             store a block with few dirty 64 KiB granules as pieces.
 *
 * Every path computes the unmasked tag of each block it records (under p.proofKey), for the
 * tag file and for the second pass of ./capture.ts (where the one moment is proven by reading).
 *
 * A block read twice whose two hashes differ is proof the volume moved (VolumeChanged).
 */
import type { BlockTags, CollectedTags } from '../engine/native';
import { GRANULES_AT, SALT_LENGTH, TAG_LENGTH, TagKey, granuleSizeFor, maskGranules, tagIvs, xor16 } from './store/tags';
import type { ManifestCursor, SlotEntry } from './store/manifest';
import type { TagReader } from './store/tags';
import { BULK_REUSE, MAX_BUFFERS, chunksOf } from './common';
import { readAhead } from './pool';
import { ChangeDetector, GuestVolume, ParentView, ReadPipeline, ReflinkView, StoreItem, VolumeChanged } from './capture';
import { MAX_NEW_PIECES, MAX_PIECES, dirtyScan } from './dirty';
import type { ChangeSource } from './store/records';

/**
 * The path for what the parent offers. A guest view (qcow2) is read through the image layer
 * into buffers, so the native file scans do not apply: its trusted bitmap's dirty blocks
 * only, or every data block hashed and compared with the parent.
 */
export function pickDetector(parent: ParentView, guest?: GuestVolume, reflink?: ReflinkView, unchanged?: boolean): ChangeDetector {
  if (unchanged && parent.cursor) return unchangedScan;
  if (reflink && parent.cursor) return reflinkScan(reflink.dirty);
  if (guest) {
    if (!parent.cursor) return fullHash;
    return guest.dirty ? bitmapScan(guest.dirty) : guestScan;
  }
  if (!parent.cursor) return fullHash;
  if (parent.tags) return tagScan;
  return hashScan;
}

/** What a detector is called in a snapshot's `changeSource`. */
export function changeSourceOf(d: ChangeDetector): ChangeSource {
  if (REFLINK.has(d)) return 'reflink';
  return SOURCES.get(d) ?? 'bitmap';
}

/**
 * Every data block of the runs read chunk by chunk, hashed in its buffer and recorded;
 * `changed` says which ones count as changed and are written (where the store lacks them).
 * With `tags`, the unmasked change tags are computed too (the one-moment proof, and the
 * next snapshot's tag file).
 */
async function hashEveryBlock(p: ReadPipeline, tags: boolean, changed: (i: number, digests: Buffer, k: number) => Promise<boolean>): Promise<void> {
  const list = [...chunksOf(p.runs, p.maxBlocks)];
  p.bulk = p.totalBytes >= BULK_REUSE * MAX_BUFFERS * p.maxBlocks * p.bs;
  // the granule tags of the next snapshot's tag file (./store/tags.ts), beside the blocks'
  const G = tags ? (p.tagWriter?.granules ?? 0) : 0;
  await readAhead(
    list.length,
    // (granule tags in the same pass: the blocks' tags are combined from them)
    (c) => p.loadHashed(list[c][0], list[c][1], tags, G ? granuleSizeFor(p.bs) : undefined),
    async (c, cur) => {
      const [first, end] = list[c];
      let digests: Buffer;
      const keep: number[] = [];
      try {
        const h = cur.h;
        const gt = h.granules;
        digests = h.digests;
        for (let k = 0; k < end - first; k++) {
          if (h.zero[k]) continue;
          p.record(first + k, digests, k * 32, h.tags, k * 16);
          if (!(await changed(first + k, digests, k))) continue;
          p.rec.stats.changedBlocks++;
          keep.push(k);
        }
        const full = (k: number) => p.spanBytes(first + k, first + k + 1) === p.bs;
        if (tags && h.tags) p.newTags(keep.map((k) => first + k), h.tags, (j) => keep[j] * 16, gt?.tags, (j) => (full(keep[j]) ? keep[j] * G * 16 : -1));
      } catch (e) {
        p.pool.release(cur.buf);
        throw e;
      }
      // Sealing and queueing the writes of this chunk overlap the hashing of the next one;
      // the pool's few buffers bound how far ahead it goes.
      await p.chunks.add(0, () => p.storeSlots(cur.buf, keep, digests, (k) => p.spanBytes(first + k, first + k + 1)));
      await p.chunkDone(cur.len);
    },
    (cur) => p.pool.release(cur.buf),
  );
}

/** Every block read, hashed and (where new) written from the one buffer. */
export const fullHash: ChangeDetector = (p) => hashEveryBlock(p, true, async () => true);

/** Per block of a chunk: the parent's entries and tag entry, where it has them. */
interface ParentChunk {
  /** the parent's slot-0 digest of block k at k*32, where hasPrev[k] */
  digests: Buffer;
  hasPrev: Uint8Array;
  /** the parent's pieces of block k, where it has any */
  pieces: Array<SlotEntry[] | undefined>;
  /** the parent's tag entries from their salt on (salt, tag, granule tags): el bytes at k*el */
  entries: Buffer;
  el: number;
  /** 1 where entries[k] has granule tags this snapshot's tag file can keep */
  granules: Uint8Array;
  /** k of the blocks the parent has a tag for */
  tagged: number[];
  /** the unmasked tag each block has if unchanged (16 bytes at k*16), where `known[k]` */
  expect: Buffer;
  /** 1 where the parent has both entries for the block and its tag */
  known: Uint8Array;
}

/**
 * The parent's entries for blocks [a, a+nb), looked up before the chunk is read (the cursors
 * move forward only, chunk after chunk), with the tag each block has if it did not change:
 * stored tag = unmasked tag ^ mask, so expect = stored tag ^ mask.
 */
async function parentChunk(p: ReadPipeline, tk: TagKey, a: number, nb: number, cursor: ManifestCursor, tags: TagReader): Promise<ParentChunk> {
  const el = GRANULES_AT + tags.granules * TAG_LENGTH; // an entry from its salt on
  const G = p.tagWriter?.granules ?? 0;
  const pc: ParentChunk = { digests: Buffer.allocUnsafe(nb * 32), hasPrev: new Uint8Array(nb), pieces: new Array(nb), entries: Buffer.allocUnsafe(nb * el), el, granules: new Uint8Array(nb), tagged: [], expect: Buffer.alloc(nb * 16), known: new Uint8Array(nb) };
  const inPrev = new Uint8Array(nb);
  for (let k = 0; k < nb; k++) {
    // (the entries are mostly in the readers' chunks already: no await for those)
    if ((cursor.peekNow(a + k) ?? (await cursor.peek(a + k))) === a + k) {
      inPrev[k] = 1;
      if (cursor.reader.slot === 0) {
        cursor.reader.digest.copy(pc.digests, k * 32);
        pc.hasPrev[k] = 1;
        if (!cursor.stepNow()) await cursor.step();
      }
      // a block with pieces: the rest of its entries
      if ((cursor.peekNow(a + k) ?? (await cursor.peek(a + k))) === a + k) pc.pieces[k] = (await cursor.lookupBlock(a + k))!.pieces;
    }
    const at = tags.lookupNow(a + k) ?? (await tags.lookup(a + k));
    if (at >= 0) {
      tags.entries.copy(pc.entries, k * el, at, at + el);
      pc.tagged.push(k);
      if (G && tags.granules === G && tags.hasGranules(at)) pc.granules[k] = 1;
    }
  }
  if (pc.tagged.length) {
    const masks = p.n.tagMasks(tk.key, tagIvs(pc.tagged.map((k) => a + k), pc.entries, (j) => pc.tagged[j] * el));
    pc.tagged.forEach((k, j) => {
      xor16(pc.entries, k * el + SALT_LENGTH, masks, j * 16, pc.expect, k * 16);
      pc.known[k] = inPrev[k];
    });
  }
  return pc;
}

/** A chunk of tagScan as read: the parent's entries, the tags, and the changed blocks in `buf`. */
interface TagChunk {
  pc: ParentChunk;
  first: CollectedTags;
  buf: Buffer;
}

/** What tagScan stores and records for a chunk as read. */
interface ChunkPlan {
  /** k of the chunk's data blocks */
  data: number[];
  /** k of the blocks whose tags moved (fresh tags) */
  check: number[];
  /** k of the changed blocks past the buffer's capacity (read again) */
  again: number[];
  /** objects to store from the buffer */
  items: StoreItem[];
  /** block k's entries when it has pieces (the parent's, kept, or new ones) */
  piecesOf: Map<number, SlotEntry[]>;
  /** the unmasked tags of the collected blocks' granules (granules x 16 bytes at slot*granules*16) */
  gt: BlockTags | undefined;
  /** new pieces (block k, granule slot, offset in buf) before they are hashed */
  fresh: Array<{ k: number; slot: number; off: number }>;
}

/**
 * The granules of collected block k (in `slot` of buf) whose tags moved, planned as pieces
 * over the parent's entries (hashed later, with the chunk's other objects: ChunkPlan.fresh):
 * false where the block is stored whole instead (none or more than MAX_NEW_PIECES moved, one
 * is now zero, or the block would have more than MAX_PIECES pieces).
 */
function piecesFor(p: ReadPipeline, k: number, slot: number, pc: ParentChunk, gt: BlockTags, gexpect: Buffer, gx: number, plan: ChunkPlan): boolean {
  const G = p.tagWriter!.granules;
  const dirty: number[] = [];
  for (let s = 0; s < G; s++) {
    const u = (slot * G + s) * 16;
    if (gt.tags.compare(gexpect, gx + s * 16, gx + s * 16 + 16, u, u + 16) === 0) continue;
    if (gt.zero[slot * G + s]) return false;
    dirty.push(s + 1);
  }
  const old = pc.pieces[k] ?? [];
  const kept = old.filter((x) => !dirty.includes(x.slot));
  if (!dirty.length || dirty.length > MAX_NEW_PIECES || kept.length + dirty.length > MAX_PIECES) return false;
  for (const s of dirty) plan.fresh.push({ k, slot: s, off: slot * p.bs + (s - 1) * p.pieceSize });
  plan.piecesOf.set(k, kept);
  return true;
}

/**
 * A chunk as read: which blocks are unchanged, changed and stored whole, changed and stored
 * as pieces (the granules whose tags moved, where the parent has granule tags: see
 * ./store/tags.ts), or to be read again.
 */
async function planChunk(p: ReadPipeline, tk: TagKey, a: number, b: number, pc: ParentChunk, first: CollectedTags, buf: Buffer): Promise<ChunkPlan> {
  const G = p.tagWriter?.granules ?? 0;
  const plan: ChunkPlan = { data: [], check: [], again: [], items: [], piecesOf: new Map(), gt: undefined, fresh: [] };
  // (the copies' granule tags came with them from tagFile: same layout as tagBlocksAsync's)
  if (G && first.collected) plan.gt = first.granuleTags ? { tags: first.granuleTags, zero: first.granuleZero! } : await p.n.tagBlocksAsync(buf.subarray(0, first.collected * p.bs), granuleSizeFor(p.bs), p.threads, tk.key);
  // the granule tags the candidates for pieces have if unchanged (parent's stored ^ mask)
  const full = (k: number) => p.spanBytes(a + k, a + k + 1) === p.bs;
  const cands = plan.gt && p.pieceSize === granuleSizeFor(p.bs) ? pc.tagged.filter((k) => first.slot[k] >= 0 && pc.granules[k] && pc.known[k] && full(k)) : [];
  const at = (j: number) => cands[j] * pc.el;
  const gexpect = cands.length ? maskGranules(tk.key, cands.map((k) => a + k), G, pc.entries, at, pc.entries, (j) => at(j) + GRANULES_AT) : Buffer.alloc(0);
  const gxOf = new Map(cands.map((k, j) => [k, j * G * 16]));
  const whole: number[] = []; // k of the collected blocks stored whole: hashed below
  for (let k = 0; k < b - a; k++) {
    if (first.zero[k]) continue;
    plan.data.push(k);
    const slot = first.slot[k];
    if (slot === -1) {
      if (pc.pieces[k]) plan.piecesOf.set(k, pc.pieces[k]!); // unchanged: every entry kept
      continue;
    }
    plan.check.push(k);
    if (slot === -2) {
      plan.again.push(k);
      continue;
    }
    const gx = gxOf.get(k);
    if (gx !== undefined && piecesFor(p, k, slot, pc, plan.gt!, gexpect, gx, plan)) {
      p.rec.stats.changedBlocks++;
      continue;
    }
    whole.push(k);
  }
  // One pool job hashes the new pieces and the blocks stored whole, where they are in buf.
  const lenOf = (k: number) => p.spanBytes(a + k, a + k + 1);
  const { fresh } = plan;
  const ps = p.pieceSize;
  const spans = new Float64Array((fresh.length + whole.length) * 2);
  fresh.forEach((x, j) => spans.set([x.off, ps], j * 2));
  whole.forEach((k, j) => spans.set([first.slot[k] * p.bs, lenOf(k)], (fresh.length + j) * 2));
  const digests = spans.length ? await p.n.hashSpansAsync(buf, spans, p.threads, p.key) : Buffer.alloc(0);
  fresh.forEach((x, j) => {
    const digest = digests.subarray(j * 32, j * 32 + 32);
    const was = pc.pieces[x.k]?.find((o) => o.slot === x.slot);
    if (!was || !was.digest.equals(digest)) plan.items.push({ off: x.off, len: ps, digest, piece: true });
    plan.piecesOf.get(x.k)!.push({ slot: x.slot, digest });
  });
  for (const k of new Set(fresh.map((x) => x.k))) plan.piecesOf.get(k)!.sort((x, y) => x.slot - y.slot);
  whole.forEach((k, i) => {
    const j = fresh.length + i;
    const unchanged = pc.hasPrev[k] && !pc.pieces[k] && digests.compare(pc.digests, k * 32, k * 32 + 32, j * 32, j * 32 + 32) === 0;
    digests.copy(pc.digests, k * 32, j * 32, j * 32 + 32);
    if (unchanged) return;
    p.rec.stats.changedBlocks++;
    plan.items.push({ off: first.slot[k] * p.bs, len: lenOf(k), digest: digests.subarray(j * 32, j * 32 + 32) });
  });
  return plan;
}

/**
 * The new tags of a chunk in block order: the parent's entry where unchanged, fresh ones for
 * `check` (with the granule tags of the blocks collected whole into the buffer).
 */
function chunkTags(p: ReadPipeline, tk: TagKey, a: number, first: CollectedTags, pc: ParentChunk, plan: ChunkPlan): void {
  const tw = p.tagWriter;
  if (!tw) return;
  const { data, check, gt } = plan;
  const G = tw.granules;
  const fresh = new Map<number, number>(); // k -> j: its new tag at masks[j*16]
  const masks = check.length ? p.n.tagMasks(tk.key, tagIvs(check.map((k) => a + k), p.salt, () => 0)) : Buffer.alloc(0);
  check.forEach((k, j) => {
    xor16(first.tags, k * 16, masks, j * 16, masks, j * 16);
    fresh.set(k, j);
  });
  const withG = gt && G ? check.filter((k) => first.slot[k] >= 0 && p.spanBytes(a + k, a + k + 1) === p.bs) : [];
  const gm = withG.length ? maskGranules(tk.key, withG.map((k) => a + k), G, p.salt, () => 0, gt!.tags, (j) => first.slot[withG[j]] * G * 16) : undefined;
  const gAt = new Map(withG.map((k, j) => [k, j * G * 16]));
  for (const k of data) {
    const j = fresh.get(k);
    const o = k * pc.el;
    if (j === undefined) tw.append(a + k, pc.entries, o, pc.entries, o + SALT_LENGTH, pc.granules[k] ? pc.entries : undefined, o + GRANULES_AT);
    else tw.append(a + k, p.salt, 0, masks, j * 16, gAt.has(k) ? gm : undefined, gAt.get(k) ?? 0);
  }
}

/**
 * Tags only (GHASH, no SHA-256) over 64 MiB chunks, each block's tag compared in the same
 * native pass with the one it has if unchanged (its parent's): blocks whose tag is the
 * parent's keep the parent's entries; the others are copied, in that one read, into a pool
 * buffer. Changed blocks past the buffer's capacity are read again into another buffer, hashed
 * there and checked against the first pass. (Issue 18, 12 alternating runs of a 1% rewrite of
 * 1 GiB: reading the changed blocks a second time cost ~0.045 s of a 0.645 s incremental.)
 *
 * Where the parent has granule tags (./store/tags.ts) a changed block's granules are tagged
 * as tagFile copies it (from the copy, with its block tag in the same pass) and compared with
 * them: a block with at most MAX_NEW_PIECES granules moved is
 * stored as those pieces over the parent's entries (./dirty.ts has the same rule). Only the
 * new pieces and the blocks stored whole are hashed with SHA-256 (one hashSpansAsync job a
 * chunk, on the pool's threads; node's createHash for each piece on the event loop had cost
 * ~11 ms of the incremental below) and written from the buffer where their digest is new.
 * The native read does not hash the blocks it copies: in a small rewrite nearly all of them
 * become pieces, and their whole-block digests were thrown away (1% of 1 GiB: ~80 MiB of
 * SHA-256, ~50 ms of CPU).
 *
 * Measured and dropped (session 22; the incremental's CPU, not its I/O, is what bounds it on
 * two cores): a first tag pass started as soon as the tag key is known, before the parent is
 * (tags only; its changed blocks read again into the buffer once the parent's tags are open,
 * and checked against the first tags). Alternating runs, 1% of 1 GiB rewritten: 469 -> 457 ms
 * in a directory store (8 pairs), 887 -> 874 ms on the Ceph gateway (6 pairs), both inside the
 * run-to-run spread, because the setup leaves no core idle: the early pass's first 64 MiB
 * chunk took 30-44 ms where the same call alone takes 6 ms, and it finished 2-4 of the 16
 * chunks. Two chunks read ahead instead of one (the parent lookups chained in order, which
 * the cursors need) gained nothing either.
 */
export const tagScan: ChangeDetector = async (p, parent) => {
  const tk = p.tk!;
  const cursor = parent.cursor!;
  const tags = parent.tags!;
  const list = p.bigChunks();
  await readAhead(
    list.length,
    async (c): Promise<TagChunk> => {
      const [a, b] = list[c];
      const pc = await parentChunk(p, tk, a, b - a, cursor, tags);
      const buf = await p.pool.acquire();
      try {
        const G = p.tagWriter?.granules;
        const first = await p.n.tagFile(p.file.fd, a * p.bs, p.spanBytes(a, b), p.bs, p.threads, tk.key, pc.expect, pc.known, buf, G ? granuleSizeFor(p.bs) : undefined);
        return { pc, first, buf };
      } catch (e) {
        p.pool.release(buf);
        throw e;
      }
    },
    async (c, { pc, first, buf }) => {
      const [a, b] = list[c];
      let plan: ChunkPlan;
      try {
        plan = await planChunk(p, tk, a, b, pc, first, buf);
      } catch (e) {
        p.pool.release(buf);
        throw e;
      }
      chunkTags(p, tk, a, first, pc, plan); // (before the buffer is sealed in place)
      await p.storeItems(buf, plan.items);
      const { again } = plan;
      for (let g = 0; g < again.length; g += p.maxBlocks) {
        const ks = again.slice(g, g + p.maxBlocks);
        const hashes = await p.readAndStore(
          ks.map((k) => a + k),
          (j, h) => {
            const k = ks[j];
            if (h.tags!.compare(first.tags, k * 16, k * 16 + 16, j * 16, j * 16 + 16) !== 0) throw new VolumeChanged(`block ${a + k} changed between two reads`);
            const unchanged = pc.hasPrev[k] && !pc.pieces[k] && h.digests.compare(pc.digests, k * 32, k * 32 + 32, j * 32, j * 32 + 32) === 0;
            if (!unchanged) p.rec.stats.changedBlocks++;
            return !unchanged;
          },
        );
        ks.forEach((k, j) => hashes.digests.copy(pc.digests, k * 32, j * 32, j * 32 + 32));
      }
      // (every recorded tag is of the bytes its entries are of: one read, or checked in readAndStore)
      for (const k of plan.data) {
        const pieces = plan.piecesOf.get(k);
        if (!pieces) {
          p.record(a + k, pc.digests, k * 32, first.tags, k * 16);
          continue;
        }
        if (pc.hasPrev[k]) p.record(a + k, pc.digests, k * 32, first.tags, k * 16);
        for (const x of pieces) p.record(a + k, x.digest, 0, first.tags, k * 16, x.slot);
      }
      await p.chunkDone(p.spanBytes(a, b));
    },
    ({ buf }) => p.pool.release(buf),
  );
};

/**
 * SHA-256 over 64 MiB chunks natively (parallel reads and hashing, no copy into JS), compared
 * with the parent; the changed blocks are read into a buffer, hashed again there (so an
 * object always matches its name) and written from it. With a tag key, the same pass
 * computes every block's tag for the next snapshot.
 */
export const hashScan: ChangeDetector = async (p, parent) => {
  const cursor = parent.cursor!;
  const list = p.bigChunks();
  await readAhead(
    list.length,
    (c) => p.n.hashFile(p.file.fd, list[c][0] * p.bs, p.spanBytes(list[c][0], list[c][1]), p.bs, p.threads, p.key, undefined, p.proofKey),
    async (c, { digests, zero, tags }) => {
      const [a, b] = list[c];
      const changed: number[] = [];
      const data: number[] = [];
      for (let i = a; i < b; i++) {
        const k = i - a;
        if (zero[k]) continue;
        data.push(i);
        const prev = (cursor.peekNow(i) ?? (await cursor.peek(i))) === i ? cursor.reader.digest : undefined;
        p.record(i, digests, k * 32, tags!, k * 16);
        if (prev && prev.compare(digests, k * 32, k * 32 + 32) === 0) continue;
        p.rec.stats.changedBlocks++;
        changed.push(i);
      }
      p.newTags(data, tags!, (j) => (data[j] - a) * 16);
      for (let g = 0; g < changed.length; g += p.maxBlocks) {
        const group = changed.slice(g, g + p.maxBlocks);
        await p.readAndStore(group, (k, again) => {
          const off = (group[k] - a) * 32;
          if (again.digests.compare(digests, off, off + 32, k * 32, k * 32 + 32) !== 0) throw new VolumeChanged(`block ${group[k]} changed between two reads`);
          return true;
        });
      }
      await p.chunkDone(p.spanBytes(a, b));
    },
  );
};

/**
 * A guest view with a parent but no usable bitmap: every data block is read into a buffer
 * and hashed there (as fullHash), its digest compared with the parent's for the stats, and
 * only objects the store lacks are written.
 */
export const guestScan: ChangeDetector = (p, parent) => {
  const cursor = parent.cursor!;
  return hashEveryBlock(p, false, async (i, digests, k) => {
    const prev = (cursor.peekNow(i) ?? (await cursor.peek(i))) === i ? cursor.reader.digest : undefined;
    return !(prev && prev.compare(digests, k * 32, k * 32 + 32) === 0);
  });
};

/** A qcow2 volume's trusted persistent bitmap: its dirty ranges (changeSource 'bitmap'). */
export function bitmapScan(dirty: Array<{ offset: number; length: number }>): ChangeDetector {
  return dirtyScan(dirty);
}

/**
 * A raw volume on a filesystem that shares extents: the ranges where the new reflink clone
 * and the parent's map to different physical extents (./reflink.ts), read from the new clone
 * (changeSource 'reflink').
 */
export function reflinkScan(dirty: Array<{ offset: number; length: number }>): ChangeDetector {
  const d = dirtyScan(dirty);
  REFLINK.add(d);
  return d;
}

const REFLINK = new WeakSet<ChangeDetector>();

/**
 * A raw volume whose identity and times are the parent's (./capture.ts decides): nothing has
 * written it since, so nothing is read and every block keeps the parent's manifest and tag
 * entries (changeSource 'unchanged').
 */
export const unchangedScan: ChangeDetector = dirtyScan([]);

const SOURCES = new Map<ChangeDetector, ChangeSource>([
  [fullHash, 'full'],
  [unchangedScan, 'unchanged'],
  [tagScan, 'tags'],
  [hashScan, 'hash'],
  [guestScan, 'hash'],
]);
