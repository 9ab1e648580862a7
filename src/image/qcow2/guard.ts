/**
 * The parent guard: qcow2 itself never checks that a backing file is the one a child was
 * made on, so a changed parent silently corrupts every child. disksnap records the
 * parent's identity in a header extension of the child (format.ts, EXT_PARENT_GUARD) and
 * every open of a child compares it with the parent it finds.
 *
 * Identity = size + mtime (ns) + a fingerprint: SHA-256 of the size, the first and last
 * 64 KiB and 16 sampled 4 KiB blocks spread evenly over the file (~200 KiB read per open,
 * whatever the parent's size). Guards with flag FLAG_FILE_IDENTITY also hold the parent's
 * ctime (ns), device and inode in the first 24 reserved bytes: a parent that is another file
 * (a rebase, a copy) is named as such; no write can set ctime back, so a write outside the
 * samples with the mtime restored is caught. A device number alone changing (the same inode
 * and ctime on a remounted filesystem) is not a change.
 *
 * Trade-off: hashing the whole parent would catch every change but costs a full read of
 * a possibly huge image on every open. Size + mtime catch every ordinary write (the
 * parent is also read-only while it has children); the fingerprint catches a parent
 * replaced by another image, or rewritten with its mtime restored, where the change
 * touches the regions that differ between images in practice (partition tables, boot
 * sectors, filesystem superblocks at the start, GPT backup at the end); ctime catches what
 * the samples miss. Moving the directory that holds parent and child keeps everything; a
 * parent copied (a new inode), or renamed or chmod-ed by itself (a new ctime), makes the child
 * ask for `diff accept-parent`. disksnap's own chmods and links re-record the guards they move.
 */
import { createHash } from 'node:crypto';
import { BlockFile } from '../../engine/file';
import { DisksnapError } from '../../engine/errors';
import { GUARD_VERSION, RawGuard } from './format';

const EDGE = 64 * 1024;
const SAMPLE_SIZE = 4096;
const SAMPLE_COUNT = 16;

/** Guard flag: reserved[0..24] hold ctime (ns), st_dev and st_ino, big-endian u64 each. */
const FLAG_FILE_IDENTITY = 1;
/** How compare() starts the change that makes the parent another file. */
const DIFFERENT_FILE = 'a different file';
const STATUS_CHANGE = 'status change time (ctime)';

export interface ParentIdentity {
  size: number;
  mtimeNs: bigint;
  ctimeNs: bigint;
  dev: number;
  ino: bigint;
  fingerprint: Buffer;
}

/** Computes the identity of an open parent file. */
export function identify(file: BlockFile): ParentIdentity {
  const st = file.stat();
  return { size: st.size, mtimeNs: st.mtimeNs, ctimeNs: st.ctimeNs, dev: st.dev, ino: st.ino, fingerprint: fingerprint(file, st.size, SAMPLE_SIZE, SAMPLE_COUNT) };
}

function fingerprint(file: BlockFile, size: number, sampleSize: number, sampleCount: number): Buffer {
  const h = createHash('sha256');
  const sizeBuf = Buffer.alloc(8);
  sizeBuf.writeBigUInt64BE(BigInt(size));
  h.update('disksnap parent guard v1\0');
  h.update(sizeBuf);
  const edge = Buffer.alloc(Math.min(EDGE, size));
  file.readFullSync(edge, 0);
  h.update(edge);
  file.readFullSync(edge, size - edge.length);
  h.update(edge);
  const sample = Buffer.alloc(Math.min(sampleSize, size));
  for (let i = 1; i <= sampleCount; i++) {
    const at = Math.floor((size * i) / (sampleCount + 1) / sampleSize) * sampleSize;
    file.readFullSync(sample, Math.min(at, size - sample.length));
    h.update(sample);
  }
  return h.digest();
}

export function toRecord(id: ParentIdentity): RawGuard {
  const reserved = Buffer.alloc(64);
  reserved.writeBigUInt64BE(id.ctimeNs, 0);
  reserved.writeBigUInt64BE(BigInt(id.dev), 8);
  reserved.writeBigUInt64BE(id.ino, 16);
  return {
    version: GUARD_VERSION,
    flags: FLAG_FILE_IDENTITY,
    parentSize: id.size,
    mtimeHi: Number(id.mtimeNs >> 32n),
    mtimeLo: Number(id.mtimeNs & 0xffffffffn),
    sampleSize: SAMPLE_SIZE,
    sampleCount: SAMPLE_COUNT,
    fingerprint: Buffer.from(id.fingerprint),
    reserved,
  };
}

function formatNs(ns: bigint): string {
  const ms = Number(ns / 1000000n);
  const frac = (ns % 1000000000n).toString().padStart(9, '0');
  return new Date(ms).toISOString().replace(/\.\d+Z$/, `.${frac}Z`);
}

/**
 * Compares the recorded identity with the parent as it is now; returns what changed
 * (empty when it is the same parent).
 */
export function compare(recorded: RawGuard, file: BlockFile): string[] {
  if (recorded.version !== GUARD_VERSION) return [`parent guard version ${recorded.version} is not understood`];
  const st = file.stat();
  const changes: string[] = [];
  if (recorded.flags & FLAG_FILE_IDENTITY) {
    const ctime = recorded.reserved.readBigUInt64BE(0);
    const dev = recorded.reserved.readBigUInt64BE(8);
    const ino = recorded.reserved.readBigUInt64BE(16);
    if (st.ino !== ino || (BigInt(st.dev) !== dev && st.ctimeNs !== ctime)) {
      changes.push(`${DIFFERENT_FILE} (inode ${st.ino} on device ${st.dev}, was inode ${ino} on device ${dev})`);
    }
    else if (st.ctimeNs !== ctime) changes.push(`${STATUS_CHANGE} ${formatNs(ctime)} -> ${formatNs(st.ctimeNs)}`);
  }
  if (st.size !== recorded.parentSize) changes.push(`size ${recorded.parentSize} -> ${st.size} bytes`);
  const mtime = (BigInt(recorded.mtimeHi >>> 0) << 32n) | BigInt(recorded.mtimeLo >>> 0);
  if (st.mtimeNs !== mtime) changes.push(`modification time ${formatNs(mtime)} -> ${formatNs(st.mtimeNs)}`);
  const sampleSize = recorded.sampleSize > 0 && recorded.sampleSize <= 1 << 20 ? recorded.sampleSize : SAMPLE_SIZE;
  const sampleCount = recorded.sampleCount <= 1024 ? recorded.sampleCount : SAMPLE_COUNT;
  if (!fingerprint(file, st.size, sampleSize, sampleCount).equals(recorded.fingerprint)) changes.push('content (sampled fingerprint)');
  return changes;
}


/**
 * True when the only change is the parent's ctime: its size, mtime, inode and sampled bytes
 * are as recorded. disksnap's own steps cause that (a chmod that makes a parent read-only, a
 * hard link or rename of a checkpoint node) and then re-record the guard (refreshGuard in
 * differencing/checkpoint-merge.ts); anything else that moves ctime alone — a write with
 * the mtime set back, for one — is for the user to accept.
 */
export function onlyStatusChanged(changes: string[]): boolean {
  return changes.length > 0 && changes.every((c) => c.startsWith(STATUS_CHANGE));
}

export function parentChangedError(child: string, parent: string, changes: string[]): DisksnapError {
  const what = changes.some((c) => c.startsWith(DIFFERENT_FILE))
    ? `it is now a different file than the one the child was made on (a rebase onto another file, or a copy)`
    : `it was written since (a commit into it — qemu-img commit, QMP block-commit — writes a parent, as does any other writer)`;
  return new DisksnapError(
    `${child}: its parent ${parent} changed since the child was made: ${what} (${changes.join('; ')}). ` +
      `The child refuses to read through a parent it was not made on. If the change was deliberate, ` +
      `'disksnap diff accept-parent ${child}' records ${parent} as it is now as the child's parent; ` +
      `the child then shows its own data over ${parent}'s present bytes`,
    'EPARENTCHANGED',
    undefined,
    parent,
  );
}
