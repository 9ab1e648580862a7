/**
 * `diff check`: the consistency check of qemu-img check, on one qcow2 file (its backing
 * chain is not opened).
 *
 * The metadata is walked with the same walker open uses (metadata.ts), and every reference
 * is counted into an array (one counter per host cluster of the file): header, L1 table,
 * refcount table, refcount blocks, L2 tables, data clusters (each cluster a compressed
 * cluster touches). Then the stored refcounts are compared:
 *   stored < counted  corruption (a cluster in use looks free, or is used twice: overlap)
 *   stored > counted  leak (allocated, used by nothing: what a crash may leave)
 * plus entries the walker finds unusable (past the end of the file, misaligned, reserved
 * bits) and COPIED flags that contradict the refcount. Repair fixes leaks only, and only
 * when there is no corruption (we never write to an image we know to be corrupt).
 *
 * Verdicts and exit codes, as qemu-img check: 0 clean, 2 corruption, 3 leaks only; a file
 * whose check cannot be done (a header QEMU would not open, an unsupported feature, a
 * backing file that is missing or loops) throws, which the CLI reports with exit 1; a raw
 * image has no qcow2 metadata to check (QEMU's 63, "does not support checks"). The corrupt
 * bit, extended L2 entries and internal snapshots (snapshots.ts: each one's L1 table, L2 tables
 * and data clusters are references) are checked, as QEMU checks them. allocatedClusters and
 * totalClusters count guest clusters, as QEMU's allocated-clusters and total-clusters.
 */
import * as fs from 'node:fs';
import { BlockFile } from '../../engine/file';
import { corrupt, DisksnapError } from '../../engine/errors';
import { entryOffset, getRefcount, INCOMPAT_EXTL2, LO_RESERVED_L1, MAX_CHAIN_DEPTH, parseHeader, QCOW2_MAGIC, Qcow2Header, setRefcount } from './format';
import { readHeaderCluster, realpathOr, resolveBacking } from './header';
import { BitmapReference, checkBitmaps } from './bitmaps';
import { rewriteBitmapsExtension } from './bitmap-writer';
import { FileBitmapHost } from './bitmap-file';
import { Qcow2Tables, readTables, walkL2, walkTables } from './metadata';
import { foreignFormat } from './probe';
import { InternalSnapshot, readSnapshotTable, SnapshotTable } from './snapshots';

export interface CheckResult {
  filename: string;
  /** raw: not a qcow2 file, nothing was checked (exit code 63, as qemu-img check) */
  format: 'qcow2' | 'raw';
  /** errors: references the refcounts do not account for, entries past the end, ... */
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  /** guest clusters this image stores (data, compressed, preallocated zero), as QEMU counts */
  allocatedClusters: number;
  /** guest clusters of the virtual size */
  totalClusters: number;
  /** compressed guest clusters (QEMU's compressed-clusters) */
  compressedClusters: number;
  /**
   * QEMU's fragmented-clusters: every compressed cluster, and every allocated cluster whose
   * host offset does not follow the previous one's in the same L2 table
   */
  fragmentedClusters: number;
  /** end of the last cluster in use or with a non-zero refcount (QEMU's image-end-offset) */
  imageEndOffset: number;
  /** 0 clean, 2 corruption, 3 leaks only (after repair: what remains), 63 raw: nothing to check */
  exitCode: 0 | 2 | 3 | 63;
  messages: string[];
}

const MAX_MESSAGES = 200;

export function checkImage(path: string, opts: { repair?: boolean } = {}): CheckResult {
  const file = BlockFile.open(path, opts.repair ? { write: true } : { lock: 'shared' });
  try {
    return run(path, file, !!opts.repair);
  } finally {
    file.close();
  }
}

interface RefcountBlock {
  offset: number;
  buf: Buffer;
  dirty: boolean;
}

/** What the walk counted: references per host cluster, the stored refcount blocks, COPIED flags to verify. */
interface Counts {
  counted: Uint32Array;
  /** guest clusters with a data, compressed or preallocated cluster */
  allocated: number;
  compressed: number;
  fragmented: number;
  blocks: Map<number, RefcountBlock>;
  copiedChecks: { offset: number; copied: boolean; what: string }[];
}

function newResult(path: string): CheckResult {
  return {
    filename: path,
    format: 'qcow2',
    corruptions: 0,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    allocatedClusters: 0,
    totalClusters: 0,
    compressedClusters: 0,
    fragmentedClusters: 0,
    imageEndOffset: 0,
    exitCode: 0,
    messages: [],
  };
}

function run(path: string, file: BlockFile, repair: boolean): CheckResult {
  const fileSize = file.size();
  const result = newResult(path);
  const error = (msg: string): void => {
    result.corruptions++;
    if (result.messages.length < MAX_MESSAGES) result.messages.push(`ERROR ${msg}`);
  };
  const head = readHeaderCluster(file, fileSize);
  if (head.length < 4 || head.readUInt32BE(0) !== QCOW2_MAGIC) return notQcow2(path, head, result);
  const h = parseHeader(path, head, fileSize, { forCheck: true });
  checkBackingChain(path, h);
  // Internal snapshots: the table, and each snapshot's L1 table with what it references.
  const snapshots = readSnapshotTable(path, h, fileSize, (b, o) => file.readFullSync(b, o), error);
  // Persistent dirty bitmaps: directory, tables and data clusters are references too (none
  // when the extension is stale: its clusters are then leaks, as qemu-img check says).
  const bitmaps = checkBitmaps(path, (b, o) => file.readFullSync(b, o), h, fileSize);
  for (const msg of bitmaps.errors) error(msg);
  for (const note of bitmaps.notes) if (result.messages.length < MAX_MESSAGES) result.messages.push(note);
  const counts = countReferences(file, readTables(file, h, fileSize), error, bitmaps.references, snapshots);
  const leaked = compareRefcounts(h, counts, result, error);
  if (repair && leaked.length > 0 && result.corruptions === 0) {
    // A stale bitmaps extension goes first (as QEMU drops it on a read-write open): its
    // clusters are among the leaks freed next.
    if (bitmaps.stale) {
      rewriteBitmapsExtension(new FileBitmapHost(file), undefined);
      file.syncSync(true);
    }
    repairLeaks(file, h, counts, leaked, result);
  }
  result.exitCode = result.corruptions > 0 ? 2 : result.leaks > 0 ? 3 : 0;
  return result;
}

/** Walks the metadata (metadata.ts) and counts every reference into one counter per host cluster. */
function countReferences(
  file: BlockFile,
  t: Qcow2Tables,
  error: (msg: string) => void,
  extra: BitmapReference[],
  snapshots: SnapshotTable,
): Counts {
  const h = t.header;
  const cs = h.clusterSize;
  const nClusters = Math.ceil(t.fileSize / cs);
  const counts: Counts = { counted: new Uint32Array(nClusters), allocated: 0, compressed: 0, fragmented: 0, blocks: new Map(), copiedChecks: [] };
  const inc = (offset: number, length: number, what: string): boolean => {
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / cs);
    if (first >= nClusters) {
      error(`${what} at ${offset} is past the end of the file (${t.fileSize} bytes)`);
      return false;
    }
    for (let c = first; c <= last && c < nClusters; c++) counts.counted[c]++;
    return true;
  };
  for (const r of extra) inc(r.offset, r.length, r.what);
  const l2 = Buffer.alloc(cs);
  walkTables(t, {
    meta: (kind, offset, length, index, copied) => {
      if (!inc(offset, length, kind)) return;
      if (kind === 'refcount block') {
        const buf = Buffer.alloc(cs);
        file.readFullSync(buf, offset);
        counts.blocks.set(index, { offset, buf, dirty: false });
      } else if (kind === 'L2 table') {
        counts.copiedChecks.push({ offset, copied, what: `L2 table at ${offset} (L1 entry ${index})` });
        file.readFullSync(l2, offset);
        let nextContiguous = 0; // per L2 table, as QEMU's check_refcounts_l2 counts fragments
        walkL2(l2, index, h.clusterBits, h.version >= 3, t.fileSize, (ref, guest) => {
          if (ref.offset !== 0) counts.allocated++; // every entry of the table, as QEMU counts (none lie past the size in a sound image)
          if (ref.kind === 'compressed') {
            counts.compressed++;
            counts.fragmented++;
          } else if (ref.offset !== 0) {
            if (nextContiguous !== 0 && ref.offset !== nextContiguous) counts.fragmented++;
            nextContiguous = ref.offset + cs;
          }
          if (ref.kind === 'compressed') {
            if (ref.copied) error(`compressed cluster for guest offset ${guest} has the COPIED flag`);
            inc(ref.offset, ref.length, `compressed data for guest offset ${guest}`);
          } else if (ref.offset !== 0 && inc(ref.offset, cs, `data cluster for guest offset ${guest}`)) {
            counts.copiedChecks.push({ offset: ref.offset, copied: ref.copied, what: `data cluster at ${ref.offset} (guest offset ${guest})` });
          }
        }, error, (h.incompatible & INCOMPAT_EXTL2) !== 0);
      }
    },
    bad: error,
  });
  if (snapshots.bytes > 0) inc(h.snapshotsOffset, snapshots.bytes, 'internal snapshot table');
  for (const s of snapshots.snapshots) countSnapshot(file, t, s, inc, error);
  return counts;
}

/**
 * One internal snapshot's references: its L1 table, each L2 table it points to, and each
 * cluster those L2 tables map (counted once per L1 that reaches them, as QEMU counts: a
 * cluster shared by the active table and two snapshots has refcount 3). COPIED flags and
 * allocated clusters concern the active table only.
 */
function countSnapshot(
  file: BlockFile,
  t: Qcow2Tables,
  s: InternalSnapshot,
  inc: (offset: number, length: number, what: string) => boolean,
  error: (msg: string) => void,
): void {
  const h = t.header;
  const cs = h.clusterSize;
  const label = `snapshot ${JSON.stringify(s.id)}`;
  if (s.l1Size === 0 || !inc(s.l1TableOffset, s.l1Size * 8, `L1 table of ${label}`)) return;
  const l1 = Buffer.alloc(s.l1Size * 8);
  file.readFullSync(l1.subarray(0, Math.max(0, Math.min(l1.length, t.fileSize - s.l1TableOffset))), s.l1TableOffset);
  const l2 = Buffer.alloc(cs);
  const extL2 = (h.incompatible & INCOMPAT_EXTL2) !== 0;
  for (let i = 0; i < s.l1Size; i++) {
    const hi = l1.readUInt32BE(i * 8);
    const lo = l1.readUInt32BE(i * 8 + 4);
    const off = entryOffset(hi, lo);
    if (off === 0) continue;
    if (off % cs !== 0 || lo & LO_RESERVED_L1) {
      error(`L1 entry ${i} of ${label} is ${off}: L2 table offset not cluster aligned`);
      continue;
    }
    if (!inc(off, cs, `L2 table of ${label} (L1 entry ${i})`)) continue;
    file.readFullSync(l2, off);
    walkL2(l2, i, h.clusterBits, h.version >= 3, t.fileSize, (ref, guest) => {
      if (ref.kind === 'compressed') inc(ref.offset, ref.length, `compressed data of ${label} for guest offset ${guest}`);
      else if (ref.offset !== 0) inc(ref.offset, cs, `data cluster of ${label} for guest offset ${guest}`);
    }, (msg) => error(`${label}: ${msg}`), extL2);
  }
}

/** Compares counted references with stored refcounts; fills the result; returns the leaked clusters. */
function compareRefcounts(h: Qcow2Header, counts: Counts, result: CheckResult, error: (msg: string) => void): number[] {
  const cs = h.clusterSize;
  const order = h.refcountOrder;
  const perBlock = 2 ** (h.clusterBits + 3 - order);
  const { counted, blocks } = counts;
  const nClusters = counted.length;
  const stored = (c: number): number => {
    const b = blocks.get(Math.floor(c / perBlock));
    return b ? getRefcount(b.buf, c % perBlock, order) : 0;
  };
  let maxStoredCluster = -1;
  for (const [i, b] of blocks) {
    for (let k = perBlock - 1; k >= 0; k--) {
      if (getRefcount(b.buf, k, order) !== 0) {
        maxStoredCluster = Math.max(maxStoredCluster, i * perBlock + k);
        break;
      }
    }
  }
  const leaked: number[] = [];
  const limit = Math.max(nClusters, maxStoredCluster + 1);
  for (let c = 0; c < limit; c++) {
    const want = c < nClusters ? counted[c] : 0;
    const have = stored(c);
    if (want === have) continue;
    if (want > have) {
      error(`cluster ${c} (offset ${c * cs}): refcount ${have}, but ${want} reference${want > 1 ? 's' : ''}${want > 1 ? ' (overlapping metadata or data)' : ''}`);
    } else {
      result.leaks++;
      leaked.push(c);
      if (result.messages.length < MAX_MESSAGES) result.messages.push(`Leaked cluster ${c} (offset ${c * cs}) refcount=${have} reference=${want}`);
    }
  }
  for (const cc of counts.copiedChecks) {
    const rc = stored(cc.offset / cs);
    if (cc.copied !== (rc === 1)) error(`COPIED flag of ${cc.what} is ${cc.copied ? 'set' : 'clear'} but its refcount is ${rc}`);
  }
  for (let c = 0; c < nClusters; c++) if (counted[c] > 0 || stored(c) > 0) result.imageEndOffset = (c + 1) * cs;
  result.allocatedClusters = counts.allocated;
  result.compressedClusters = counts.compressed;
  result.fragmentedClusters = counts.fragmented;
  result.totalClusters = Math.ceil(h.size / cs);
  return leaked;
}

/** Sets the refcount of each leaked cluster to what was counted, in place, then syncs. */
function repairLeaks(file: BlockFile, h: Qcow2Header, counts: Counts, leaked: number[], result: CheckResult): void {
  const order = h.refcountOrder;
  const perBlock = 2 ** (h.clusterBits + 3 - order);
  const nClusters = counts.counted.length;
  for (const c of leaked) {
    const b = counts.blocks.get(Math.floor(c / perBlock));
    if (!b) continue;
    setRefcount(b.buf, c % perBlock, order, c < nClusters ? counts.counted[c] : 0);
    b.dirty = true;
  }
  for (const b of counts.blocks.values()) if (b.dirty) file.writeSync(b.buf, b.offset);
  file.syncSync(true);
  result.leaksFixed = leaked.length;
  result.leaks = 0;
  // What a second check would see (qemu-img check -r reports one): the freed clusters no longer count.
  result.imageEndOffset = 0;
  for (let c = 0; c < nClusters; c++) if (counts.counted[c] > 0) result.imageEndOffset = (c + 1) * h.clusterSize;
  result.messages.push(`Repaired ${leaked.length} leaked cluster${leaked.length > 1 ? 's' : ''}`);
}

/**
 * A file without the qcow2 magic: raw (QEMU's "does not support checks", exit 63), or
 * another format, which disksnap does not check.
 */
function notQcow2(path: string, head: Buffer, result: CheckResult): CheckResult {
  const other = foreignFormat(head);
  if (other !== undefined) {
    throw new DisksnapError(`${path}: is a ${other} image; disksnap checks qcow2 images (use qemu-img check)`, 'EUNSUPPORTED', undefined, path);
  }
  result.format = 'raw';
  result.exitCode = 63;
  result.messages.push(`${path}: raw image: no qcow2 metadata to check`);
  return result;
}

/**
 * The backing chain must open for the check to be done, as qemu-img check opens it: a
 * missing backing file or a chain that loops is an error (the CLI's exit 1). Only the
 * existence and the qcow2 headers along the chain are read.
 */
function checkBackingChain(path: string, h: Qcow2Header): void {
  const seen = [realpathOr(path)];
  let child = path;
  let header: Qcow2Header | undefined = h;
  while (header?.backingFile !== undefined) {
    const backing = resolveBacking(child, header.backingFile);
    if (!fs.existsSync(backing)) {
      throw new DisksnapError(`${child}: its backing file ${backing} does not exist; the check needs the chain to open (as qemu-img check)`, 'ENOENT', 2, backing);
    }
    const real = realpathOr(backing);
    if (seen.includes(real)) throw corrupt(child, `the backing chain loops: ${[...seen, real].join(' -> ')}`);
    if (seen.length >= MAX_CHAIN_DEPTH) throw corrupt(child, `the backing chain is deeper than ${MAX_CHAIN_DEPTH} layers`);
    seen.push(real);
    const f = BlockFile.open(backing, { lock: 'none' });
    try {
      const size = f.size();
      const head = readHeaderCluster(f, size);
      header = head.length >= 4 && head.readUInt32BE(0) === QCOW2_MAGIC ? parseHeader(backing, head, size) : undefined;
    } finally {
      f.close();
    }
    child = backing;
  }
}
