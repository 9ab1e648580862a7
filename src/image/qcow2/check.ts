/**
 * `diff check`: the consistency check of qemu-img check, on one qcow2 file (its backing
 * chain is not opened).
 *
 * Every reference is counted into an array (one counter per host cluster of the file):
 * header, L1 table, refcount table, refcount blocks, L2 tables, data clusters (each cluster
 * a compressed cluster touches). Then the stored refcounts are compared:
 *   stored < counted  corruption (a cluster in use looks free, or is used twice: overlap)
 *   stored > counted  leak (allocated, used by nothing: what a crash may leave)
 * plus entries pointing past the end of the file, misaligned, or with a COPIED flag that
 * contradicts the refcount. Repair fixes leaks only, and only when there is no corruption
 * (we never write to an image we know to be corrupt).
 *
 * Exit codes, as qemu-img check: 0 clean, 2 corruption, 3 leaks only.
 */
import { BlockFile } from '../../engine/file';
import { DisksnapError, isDisksnapError } from '../../engine/errors';
import {
  compressedDescriptor,
  entryOffset,
  getRefcount,
  HI_COMPRESSED,
  HI_COPIED,
  LO_ZERO,
  parseHeader,
  Qcow2Header,
  setRefcount,
  EXT_BITMAPS,
} from './format';
import { readHeaderCluster } from './header';

export interface CheckResult {
  filename: string;
  format: 'qcow2';
  /** errors: references the refcounts do not account for, entries past the end, ... */
  corruptions: number;
  leaks: number;
  corruptionsFixed: number;
  leaksFixed: number;
  allocatedClusters: number;
  totalClusters: number;
  imageEndOffset: number;
  /** 0 clean, 2 corruption, 3 leaks only (after repair: what remains) */
  exitCode: 0 | 2 | 3;
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

function run(path: string, file: BlockFile, repair: boolean): CheckResult {
  const fileSize = file.size();
  const result: CheckResult = {
    filename: path,
    format: 'qcow2',
    corruptions: 0,
    leaks: 0,
    corruptionsFixed: 0,
    leaksFixed: 0,
    allocatedClusters: 0,
    totalClusters: 0,
    imageEndOffset: 0,
    exitCode: 0,
    messages: [],
  };
  const error = (msg: string): void => {
    result.corruptions++;
    if (result.messages.length < MAX_MESSAGES) result.messages.push(`ERROR ${msg}`);
  };
  let h: Qcow2Header;
  try {
    h = parseHeader(path, readHeaderCluster(file, fileSize), fileSize);
  } catch (e) {
    if (isDisksnapError(e, 'ECORRUPT')) {
      error(e.message);
      result.exitCode = 2;
      return result;
    }
    throw e;
  }
  if (h.nbSnapshots > 0) {
    throw new DisksnapError(`${path}: has internal snapshots, which disksnap's check does not count; use qemu-img check`, 'EUNSUPPORTED', undefined, path);
  }
  if (h.extensions.some((e) => e.type === EXT_BITMAPS)) {
    throw new DisksnapError(`${path}: has persistent dirty bitmaps, which disksnap's check does not count; use qemu-img check`, 'EUNSUPPORTED', undefined, path);
  }
  const cs = h.clusterSize;
  const nClusters = Math.ceil(fileSize / cs);
  const counted = new Uint32Array(nClusters);
  const inc = (offset: number, length: number, what: string): boolean => {
    if (offset % cs !== 0 && !what.startsWith('compressed')) {
      error(`${what} at ${offset} is not cluster aligned`);
      return false;
    }
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / cs);
    if (first >= nClusters) {
      error(`${what} at ${offset} is past the end of the file (${fileSize} bytes)`);
      return false;
    }
    for (let c = first; c <= last && c < nClusters; c++) counted[c]++;
    return true;
  };

  inc(0, cs, 'header');
  if (h.l1Size > 0) inc(h.l1TableOffset, h.l1Size * 8, 'L1 table');
  inc(h.refcountTableOffset, h.refcountTableClusters * cs, 'refcount table');

  // stored refcounts
  const order = h.refcountOrder;
  const perBlock = 2 ** (h.clusterBits + 3 - order);
  const reftable = Buffer.alloc(h.refcountTableClusters * cs);
  file.readFullSync(reftable, h.refcountTableOffset);
  const blocks = new Map<number, { offset: number; buf: Buffer; dirty: boolean }>();
  for (let i = 0; i < reftable.length / 8; i++) {
    const hi = reftable.readUInt32BE(i * 8);
    const lo = reftable.readUInt32BE(i * 8 + 4);
    const off = hi * 0x100000000 + ((lo & 0xfffffe00) >>> 0);
    if (off === 0) continue;
    if (!inc(off, cs, `refcount block ${i}`)) continue;
    const buf = Buffer.alloc(cs);
    file.readFullSync(buf, off);
    blocks.set(i, { offset: off, buf, dirty: false });
  }
  const stored = (c: number): number => {
    const b = blocks.get(Math.floor(c / perBlock));
    return b ? getRefcount(b.buf, c % perBlock, order) : 0;
  };

  // L1 -> L2 -> data
  const l1 = Buffer.alloc(h.l1Size * 8);
  file.readFullSync(l1, h.l1TableOffset);
  const l2 = Buffer.alloc(cs);
  const copiedChecks: { offset: number; copied: boolean; what: string }[] = [];
  const entriesPerL2 = cs / 8;
  const l2Span = entriesPerL2 * cs;
  for (let i = 0; i < h.l1Size; i++) {
    const hi = l1.readUInt32BE(i * 8);
    const lo = l1.readUInt32BE(i * 8 + 4);
    const off = entryOffset(hi, lo);
    if (off === 0) continue;
    if (!inc(off, cs, `L2 table (L1 entry ${i})`)) continue;
    copiedChecks.push({ offset: off, copied: !!(hi & HI_COPIED), what: `L2 table at ${off} (L1 entry ${i})` });
    file.readFullSync(l2, off);
    for (let j = 0; j < entriesPerL2; j++) {
      const eh = l2.readUInt32BE(j * 8);
      const el = l2.readUInt32BE(j * 8 + 4);
      if (eh === 0 && el === 0) continue;
      const guest = i * l2Span + j * cs;
      if (eh & HI_COMPRESSED) {
        const d = compressedDescriptor(eh, el, h.clusterBits);
        if (eh & HI_COPIED) error(`compressed cluster for guest offset ${guest} has the COPIED flag`);
        inc(d.offset, d.length, `compressed data for guest offset ${guest}`);
        continue;
      }
      const doff = entryOffset(eh, el);
      if (doff === 0) {
        if (el & LO_ZERO) continue;
        error(`L2 entry for guest offset ${guest} has reserved bits set without an offset`);
        continue;
      }
      if (inc(doff, cs, `data cluster for guest offset ${guest}`)) {
        copiedChecks.push({ offset: doff, copied: !!(eh & HI_COPIED), what: `data cluster at ${doff} (guest offset ${guest})` });
      }
    }
  }

  // compare
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
  for (const cc of copiedChecks) {
    const rc = stored(cc.offset / cs);
    if (cc.copied !== (rc === 1)) error(`COPIED flag of ${cc.what} is ${cc.copied ? 'set' : 'clear'} but its refcount is ${rc}`);
  }
  for (let c = 0; c < nClusters; c++) {
    if (counted[c] > 0) {
      result.allocatedClusters++;
      result.imageEndOffset = (c + 1) * cs;
    }
  }
  result.totalClusters = Math.ceil(h.size / cs);

  if (repair && leaked.length > 0 && result.corruptions === 0) {
    for (const c of leaked) {
      const b = blocks.get(Math.floor(c / perBlock));
      if (!b) continue;
      setRefcount(b.buf, c % perBlock, order, c < nClusters ? counted[c] : 0);
      b.dirty = true;
    }
    for (const b of blocks.values()) if (b.dirty) file.writeSync(b.buf, b.offset);
    file.syncSync(true);
    result.leaksFixed = leaked.length;
    result.leaks = 0;
    result.messages.push(`Repaired ${leaked.length} leaked cluster${leaked.length > 1 ? 's' : ''}`);
  }
  result.exitCode = result.corruptions > 0 ? 2 : result.leaks > 0 ? 3 : 0;
  return result;
}
