/**
 * The one walk over a qcow2 file's metadata, shared by open (Qcow2Image) and `diff check`.
 *
 *   header cluster -> L1 table -> refcount table -> refcount blocks -> L2 tables -> L2 entries
 *
 * The walk decodes every table entry (with the helpers and reserved-bit masks of format.ts)
 * and checks what one entry can say about itself: its offset is cluster aligned, lies
 * inside the file, and has no reserved bit set. Each usable region goes to the visitor's
 * `meta` (metadata) or `entry` (an L2 entry); each unusable one to `bad`, with a message
 * naming the entry, its value and the problem. What depends on the other entries is the
 * visitor's business: open refuses an overlap with metadata as soon as it sees one; check
 * counts references and compares them with the stored refcounts.
 */
import { BlockFile } from '../../engine/file';
import { native } from '../../engine/native';
import {
  compressedDescriptor,
  entryOffset,
  HI_COMPRESSED,
  HI_COPIED,
  HI_RESERVED_L2,
  LO_RESERVED_L1,
  LO_RESERVED_L2,
  LO_RESERVED_REFTABLE,
  LO_ZERO,
  Qcow2Header,
  reftableEntryOffset,
} from './format';

/** What a qcow2 file's tables are, as read at open. */
export interface Qcow2Tables {
  header: Qcow2Header;
  fileSize: number;
  /** the L1 table, l1_size entries */
  l1: Buffer;
  /** the refcount table, refcount_table_clusters clusters (zeros past the end of the file) */
  reftable: Buffer;
}

export type MetaKind = 'header' | 'L1 table' | 'refcount table' | 'refcount block' | 'L2 table';

export interface MetaVisitor {
  /**
   * A metadata region: `index` is the refcount table or L1 index that points to a refcount
   * block or L2 table; `copied` is the L1 entry's COPIED flag.
   */
  meta(kind: MetaKind, offset: number, length: number, index: number, copied: boolean): void;
  /** An entry that cannot be used; the message names it, its value and the problem. */
  bad(message: string): void;
}

/** One non-empty L2 entry, decoded. */
export interface L2Ref {
  /** data: a host cluster; zero: reads as zeros (a preallocated cluster when offset > 0); compressed */
  kind: 'data' | 'zero' | 'compressed' | 'unallocated';
  /** host offset of the cluster or of the compressed bytes (0: none) */
  offset: number;
  /** bytes referenced from `offset` (a cluster, or the compressed stream's sectors) */
  length: number;
  copied: boolean;
}

/** Reads the L1 and refcount tables a parsed header describes. */
export function readTables(file: BlockFile, header: Qcow2Header, fileSize: number): Qcow2Tables {
  // Parts past the end of the file read as zeros (open refuses such tables in parseHeader;
  // check counts them as references past the end).
  const readClipped = (buf: Buffer, offset: number): Buffer => {
    const avail = Math.max(0, Math.min(buf.length, fileSize - offset));
    if (avail > 0) file.readFullSync(buf.subarray(0, avail), offset);
    return buf;
  };
  const l1 = readClipped(Buffer.alloc(header.l1Size * 8), header.l1TableOffset);
  const reftable = readClipped(Buffer.alloc(header.refcountTableClusters * header.clusterSize), header.refcountTableOffset);
  return { header, fileSize, l1, reftable };
}

function hex64(hi: number, lo: number): string {
  return `0x${(hi >>> 0).toString(16)}${(lo >>> 0).toString(16).padStart(8, '0')}`;
}

/**
 * The indexes of the 8-byte entries of `table` that are not all zeros, in order. The stretches
 * of zeros are skipped natively, halving the range until a half is all zeros: a refcount table
 * is one cluster of 8,192 entries, mostly empty, and an entry-by-entry loop over it took ~9 ms
 * in a fresh process (interpreted, two `readUInt32BE` calls an entry). In a snapshot command,
 * which has compiled `readUInt32BE` by then, the gain was within noise. The result may include
 * an entry whose offset bits are zero but whose flag bits are not: the caller decodes each one.
 */
export function nonzeroEntries(table: Buffer): number[] {
  const out: number[] = [];
  const walk = (from: number, to: number): void => {
    if (to - from <= 32) {
      for (let i = from; i < to; i++) if (table.readUInt32BE(i * 8) !== 0 || table.readUInt32BE(i * 8 + 4) !== 0) out.push(i);
    } else if (!native().isZero(table.subarray(from * 8, to * 8))) {
      const mid = from + Math.floor((to - from) / 2);
      walk(from, mid);
      walk(mid, to);
    }
  };
  walk(0, Math.floor(table.length / 8));
  return out;
}

/** Header, L1 table, refcount table, refcount blocks, L2 tables, in that order. */
export function walkTables(t: Qcow2Tables, v: MetaVisitor): void {
  const h = t.header;
  const cs = h.clusterSize;
  v.meta('header', 0, cs, 0, false);
  if (h.l1Size > 0) v.meta('L1 table', h.l1TableOffset, h.l1Size * 8, 0, false);
  v.meta('refcount table', h.refcountTableOffset, t.reftable.length, 0, false);
  for (const i of nonzeroEntries(t.reftable)) {
    const off = reftableEntryOffset(t.reftable, i);
    if (off === 0) continue;
    if (t.reftable.readUInt32BE(i * 8 + 4) & LO_RESERVED_REFTABLE || off % cs !== 0) {
      v.bad(`refcount table entry ${i} is ${off}: not cluster aligned`);
    } else if (off >= t.fileSize) {
      v.bad(`refcount table entry ${i} points to ${off}, past the end of the file (${t.fileSize} bytes)`);
    } else v.meta('refcount block', off, cs, i, false);
  }
  for (const i of nonzeroEntries(t.l1)) {
    const hi = t.l1.readUInt32BE(i * 8);
    const lo = t.l1.readUInt32BE(i * 8 + 4);
    const off = entryOffset(hi, lo);
    if (off === 0) continue;
    if (off % cs !== 0 || lo & LO_RESERVED_L1) v.bad(`L1 entry ${i} is ${hex64(hi, lo)}: L2 table offset not cluster aligned`);
    else if (off >= t.fileSize) v.bad(`L1 entry ${i} points to an L2 table at ${off}, past the end of the file (${t.fileSize} bytes)`);
    else v.meta('L2 table', off, cs, i, !!(hi & HI_COPIED));
  }
}

/** Decodes L2 entry `idx` of `table`; zeroFlag: version 3 (bit 0 means "reads as zeros"). */
export function decodeL2(table: Buffer, idx: number, clusterBits: number, zeroFlag: boolean): L2Ref {
  const hi = table.readUInt32BE(idx * 8);
  const lo = table.readUInt32BE(idx * 8 + 4);
  const copied = !!(hi & HI_COPIED);
  if (hi & HI_COMPRESSED) {
    const d = compressedDescriptor(hi, lo, clusterBits);
    return { kind: 'compressed', offset: d.offset, length: d.length, copied };
  }
  const offset = entryOffset(hi, lo);
  const kind = lo & LO_ZERO && zeroFlag ? 'zero' : offset === 0 ? 'unallocated' : 'data';
  return { kind, offset, length: 2 ** clusterBits, copied };
}

/**
 * What is wrong with L2 entry `idx` on its own (reserved bits, alignment, past the end of
 * the file), or undefined. `guest` is the guest offset it maps, for the message.
 */
export function l2EntryProblem(table: Buffer, idx: number, ref: L2Ref, guest: number, fileSize: number): string | undefined {
  const hi = table.readUInt32BE(idx * 8);
  const lo = table.readUInt32BE(idx * 8 + 4);
  if (ref.kind === 'compressed') {
    if (ref.offset >= fileSize) return `L2 entry for guest offset ${guest} points to compressed data at ${ref.offset}, past the end of the file (${fileSize} bytes)`;
    return undefined;
  }
  if (lo & LO_RESERVED_L2 || hi & HI_RESERVED_L2) return `L2 entry for guest offset ${guest} is ${hex64(hi, lo)}: reserved bits set`;
  if (ref.offset === 0) return undefined;
  if (ref.offset % ref.length !== 0) return `L2 entry for guest offset ${guest} is ${hex64(hi, lo)}: cluster offset ${ref.offset} not cluster aligned`;
  if (ref.offset >= fileSize) return `L2 entry for guest offset ${guest} points to ${ref.offset}, past the end of the file (${fileSize} bytes)`;
  return undefined;
}

/**
 * Every non-empty entry of the L2 table of L1 index `l1i`: `entry` for usable ones (with
 * the guest offset they map), `bad` for the others. With extended L2 entries (`extL2`, 16
 * bytes: the standard descriptor, then the subcluster bitmap) only the descriptor is
 * decoded, and zeros are the bitmap's business, not bit 0.
 */
export function walkL2(
  table: Buffer,
  l1i: number,
  clusterBits: number,
  zeroFlag: boolean,
  fileSize: number,
  entry: (ref: L2Ref, guest: number) => void,
  bad: (message: string) => void,
  extL2 = false,
): void {
  const words = extL2 ? 2 : 1; // 64-bit words per entry
  const n = 2 ** (clusterBits - 3) / words;
  const span = n * 2 ** clusterBits;
  for (let idx = 0; idx < n; idx++) {
    const w = idx * words;
    if (table.readUInt32BE(w * 8) === 0 && table.readUInt32BE(w * 8 + 4) === 0) continue;
    const guest = l1i * span + idx * 2 ** clusterBits;
    const ref = decodeL2(table, w, clusterBits, zeroFlag && !extL2);
    const problem = l2EntryProblem(table, w, ref, guest, fileSize);
    if (problem !== undefined) bad(problem);
    else entry(ref, guest);
  }
}
