/**
 * The internal snapshot table (qcow2.txt, "Snapshots"), read for `diff check` only: disksnap
 * writes no image that has internal snapshots, but an image made by `qemu-img snapshot -c`
 * or by a VM's savevm must check as qemu-img checks it. Each snapshot owns an L1 table whose
 * L2 tables and data clusters are references like the active ones (usually shared with them,
 * hence refcounts above 1).
 *
 * One table entry, big-endian, padded to a multiple of 8 bytes:
 *   0 l1_table_offset u64 | 8 l1_size u32 | 12 id_str_size u16 | 14 name_size u16 |
 *   16 date_sec u32 | 20 date_nsec u32 | 24 vm_clock_nsec u64 | 32 vm_state_size u32 |
 *   36 extra_data_size u32 | 40 extra data | id string | name
 */
import { corrupt } from '../../engine/errors';
import { Qcow2Header } from './format';

/** QEMU's limits (block/qcow2.h): snapshots per image, bytes of extra data, bytes of the table. */
const MAX_SNAPSHOTS = 65536;
const MAX_EXTRA_DATA = 1024;
const MAX_TABLE_BYTES = 64 * 1024 * 1024;
/** An L1 table of a snapshot: at most QEMU's 32 MiB (4 Mi entries). */
const MAX_L1_ENTRIES = (32 * 1024 * 1024) / 8;

export interface InternalSnapshot {
  id: string;
  name: string;
  l1TableOffset: number;
  l1Size: number;
  /** when it was taken (date_sec, date_nsec) */
  dateSec: number;
  dateNsec: number;
  /** guest clock at the time (vm_clock_nsec) */
  vmClockNsec: number;
  /** bytes of saved VM state (the 64-bit extra field when there is one) */
  vmStateSize: number;
  /** instruction count (record/replay), when the extra data has it (QEMU's -1: none) */
  icount: number | undefined;
}

export interface SnapshotTable {
  /** bytes the table occupies from header.snapshotsOffset */
  bytes: number;
  snapshots: InternalSnapshot[];
}

/**
 * Reads the snapshot table for the check, with qemu-img check's verdicts: an entry QEMU cannot
 * load (the table past the end of the file, extra data or an L1 table over QEMU's limits, an
 * L1 table offset that is not cluster aligned) throws, as QEMU's check fails then (exit 1); a
 * version 3 entry without the 16 bytes of extra data is "incomplete", a corruption reported
 * through `error`, and its tables are still counted.
 */
export function readSnapshotTable(
  path: string,
  h: Qcow2Header,
  fileSize: number,
  read: (buf: Buffer, offset: number) => void,
  error: (message: string) => void,
): SnapshotTable {
  const fail = (i: number, why: string) => corrupt(path, `internal snapshot table entry ${i} (table at ${h.snapshotsOffset}): ${why}`);
  if (h.nbSnapshots > MAX_SNAPSHOTS) throw corrupt(path, `${h.nbSnapshots} internal snapshots, more than QEMU's ${MAX_SNAPSHOTS}`);
  const snapshots: InternalSnapshot[] = [];
  let at = h.snapshotsOffset;
  const fixed = Buffer.alloc(40);
  const readAt = (buf: Buffer, i: number): void => {
    if (at + buf.length > fileSize) throw fail(i, `runs past the end of the file (${fileSize} bytes)`);
    if (at + buf.length - h.snapshotsOffset > MAX_TABLE_BYTES) throw fail(i, `the table exceeds QEMU's ${MAX_TABLE_BYTES} bytes`);
    if (buf.length > 0) read(buf, at);
    at += buf.length;
  };
  for (let i = 0; i < h.nbSnapshots; i++) {
    readAt(fixed, i);
    const l1TableOffset = fixed.readUInt32BE(0) * 2 ** 32 + fixed.readUInt32BE(4);
    const l1Size = fixed.readUInt32BE(8);
    const idSize = fixed.readUInt16BE(12);
    const nameSize = fixed.readUInt16BE(14);
    const extraSize = fixed.readUInt32BE(36);
    if (extraSize > MAX_EXTRA_DATA) {
      throw fail(i, `${extraSize} bytes of extra data, more than QEMU's ${MAX_EXTRA_DATA} (qemu-img check -r all removes it)`);
    }
    const rest = Buffer.alloc(extraSize + idSize + nameSize);
    readAt(rest, i);
    at = h.snapshotsOffset + Math.ceil((at - h.snapshotsOffset) / 8) * 8;
    const id = rest.subarray(extraSize, extraSize + idSize).toString('utf8');
    const name = rest.subarray(extraSize + idSize).toString('utf8');
    if (l1Size > MAX_L1_ENTRIES) throw fail(i, `its L1 table has ${l1Size} entries, more than QEMU's ${MAX_L1_ENTRIES}`);
    if (l1Size > 0 && (l1TableOffset % h.clusterSize !== 0 || l1TableOffset === 0)) {
      throw fail(i, `its L1 table offset ${l1TableOffset} is not a cluster-aligned offset past the header`);
    }
    // Version 3 requires 16 bytes of extra data (large VM state size, disk size); QEMU's check
    // calls a shorter entry incomplete, a corruption, and still counts its tables.
    if (h.version >= 3 && extraSize < 16) error(`internal snapshot table entry ${i} is incomplete: ${extraSize} bytes of extra data, version 3 needs 16`);
    const extra = rest.subarray(0, extraSize);
    snapshots.push({
      id: id || String(i),
      name,
      l1TableOffset,
      l1Size,
      dateSec: fixed.readUInt32BE(16),
      dateNsec: fixed.readUInt32BE(20),
      vmClockNsec: Number(fixed.readBigUInt64BE(24)),
      vmStateSize: extraSize >= 8 ? Number(extra.readBigUInt64BE(0)) : fixed.readUInt32BE(32),
      icount: extraSize >= 24 && extra.readBigUInt64BE(16) !== 0xffffffffffffffffn ? Number(extra.readBigUInt64BE(16)) : undefined,
    });
  }
  return { bytes: at - h.snapshotsOffset, snapshots };
}
