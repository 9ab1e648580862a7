/**
 * The parent guard: qcow2 itself never checks that a backing file is the one a child was
 * made on, so a changed parent silently corrupts every child. disksnap records the
 * parent's identity in a header extension of the child (format.ts, EXT_PARENT_GUARD) and
 * every open of a child compares it with the parent it finds.
 *
 * Identity = size + mtime (ns) + a fingerprint: SHA-256 of the size, the first and last
 * 64 KiB and 16 sampled 4 KiB blocks spread evenly over the file (~200 KiB read per open,
 * whatever the parent's size).
 *
 * Trade-off: hashing the whole parent would catch every change but costs a full read of
 * a possibly huge image on every open. Size + mtime catch every ordinary write (the
 * parent is also read-only while it has children); the fingerprint catches a parent
 * replaced by another image, or rewritten with its mtime restored, where the change
 * touches the regions that differ between images in practice (partition tables, boot
 * sectors, filesystem superblocks at the start, GPT backup at the end). A change confined
 * to unsampled blocks *and* hidden by a restored mtime goes unnoticed.
 * Moving or copying parent and child together keeps size and content; `cp -p` keeps the
 * mtime, a plain `cp` does not, and the child then asks for `diff accept-parent`.
 */
import { createHash } from 'node:crypto';
import { BlockFile } from '../../engine/file';
import { DisksnapError } from '../../engine/errors';
import { GUARD_VERSION, RawGuard } from './format';

const EDGE = 64 * 1024;
const SAMPLE_SIZE = 4096;
const SAMPLE_COUNT = 16;

export interface ParentIdentity {
  size: number;
  mtimeNs: bigint;
  fingerprint: Buffer;
}

/** Computes the identity of an open parent file. */
export function identify(file: BlockFile): ParentIdentity {
  const st = file.stat();
  return { size: st.size, mtimeNs: st.mtimeNs, fingerprint: fingerprint(file, st.size, SAMPLE_SIZE, SAMPLE_COUNT) };
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
  return {
    version: GUARD_VERSION,
    flags: 0,
    parentSize: id.size,
    mtimeHi: Number(id.mtimeNs >> 32n),
    mtimeLo: Number(id.mtimeNs & 0xffffffffn),
    sampleSize: SAMPLE_SIZE,
    sampleCount: SAMPLE_COUNT,
    fingerprint: Buffer.from(id.fingerprint),
    reserved: Buffer.alloc(64),
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
  if (st.size !== recorded.parentSize) changes.push(`size ${recorded.parentSize} -> ${st.size} bytes`);
  const mtime = (BigInt(recorded.mtimeHi >>> 0) << 32n) | BigInt(recorded.mtimeLo >>> 0);
  if (st.mtimeNs !== mtime) changes.push(`modification time ${formatNs(mtime)} -> ${formatNs(st.mtimeNs)}`);
  const sampleSize = recorded.sampleSize > 0 && recorded.sampleSize <= 1 << 20 ? recorded.sampleSize : SAMPLE_SIZE;
  const sampleCount = recorded.sampleCount <= 1024 ? recorded.sampleCount : SAMPLE_COUNT;
  if (!fingerprint(file, st.size, sampleSize, sampleCount).equals(recorded.fingerprint)) changes.push('content (sampled fingerprint)');
  return changes;
}

export function parentChangedError(child: string, parent: string, changes: string[]): DisksnapError {
  return new DisksnapError(
    `${child}: its parent ${parent} changed since the child was made (${changes.join('; ')}); ` +
      `reading through it would show corrupt data. If the change was deliberate, accept the parent as it is now ` +
      `with 'disksnap diff accept-parent ${child}'`,
    'EPARENTCHANGED',
    undefined,
    parent,
  );
}
