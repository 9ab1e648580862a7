/**
 * AES-256-GCM of whole chunks of block objects, in place, on native threads (native/gcm.cc)
 * so that encryption never runs on the event loop (the same rule as hashing).
 *
 * Measured on this project's VM (2 vCPUs, 512 KiB blocks): node:crypto seals at ~1.1 GiB/s
 * per thread, because every Cipher.update allocates its output and faulting in that fresh
 * memory costs more than AES itself (perf: a third of the time in the AES-NI/PCLMUL loop);
 * the same OpenSSL loop run by the addon over the caller's buffer seals at 3.4 GiB/s on one
 * thread and 5.0 GiB/s on two. (Until then, chunks were transferred to worker threads running
 * node:crypto in 16 KiB pieces: ~2.2 GB/s, and a copy of every chunk's ownership each way.)
 *
 * The formats are those of src/storage/store/crypto.ts: sealBlock / unsealBlock there are the
 * reference (tests check that each side opens what the other sealed) and the fallback, on the
 * event loop, with DISKSNAP_CRYPTO_THREADS=0.
 */
import * as os from 'node:os';
import { native } from '../../engine/native';
import { bigBuffer } from './direct';
import { DerivedKeys, TRAILER_BYTES, sealBlock, unsealBlock } from './crypto';

/** Native threads per chunk; 0: node:crypto on the event loop. */
function threads(): number {
  const env = process.env.DISKSNAP_CRYPTO_THREADS;
  if (env !== undefined && /^\d+$/.test(env)) return Math.min(64, Number(env));
  return Math.max(1, Math.min(8, os.availableParallelism()));
}

/** Whether sealChunk/openChunk run natively (not node:crypto on the event loop). */
export function nativeCrypto(): boolean {
  return threads() > 0;
}

function digestsOf(items: { digest: Uint8Array }[]): Buffer {
  const all = Buffer.allocUnsafe(items.length * 32);
  items.forEach((it, k) => all.set(it.digest.subarray(0, 32), k * 32));
  return all;
}

export interface SealItem {
  /** offset and length of the block's plaintext in the buffer */
  off: number;
  len: number;
  /** its keyed digest (the AAD) */
  digest: Uint8Array;
}

/**
 * Seals the blocks of `buf` in place; returns the buffer to use from now on (`buf` itself)
 * and each block's trailer.
 */
export async function sealChunk(keys: DerivedKeys, buf: Buffer, items: SealItem[]): Promise<{ buf: Buffer; trailers: Buffer[] }> {
  const n = threads();
  if (items.length && n > 0) {
    const spans = new Float64Array(items.length * 2);
    items.forEach((it, k) => spans.set([it.off, it.len], k * 2));
    const all = await native().gcmSealAsync(keys.block, buf, spans, digestsOf(items), n);
    return { buf, trailers: items.map((_, k) => all.subarray(k * 32, k * 32 + 32)) };
  }
  const trailers = items.map((it) => sealBlock(keys, it.digest, buf.subarray(it.off, it.off + it.len))[1]);
  return { buf, trailers };
}

export interface OpenItem {
  /** the sealed object in the staging buffer */
  sOff: number;
  sLen: number;
  /** where its plaintext (sLen - 32 bytes) goes in the output buffer */
  oOff: number;
  digest: Uint8Array;
  /** the object's path, for messages */
  where: string;
}

const WHY: Record<number, string> = {
  1: `shorter than a sealed object's ${TRAILER_BYTES}-byte trailer`,
  2: 'does not end in a sealed object\'s trailer ("DSE1"): damaged, or not encrypted',
  3: 'failed authentication (AES-GCM): damaged, swapped with another block\'s object, or sealed under another key',
};

/**
 * Opens sealed objects held in `staging` into `out` (another buffer); returns the buffers to
 * use from now on (the same ones) and, per item, null or why it is bad. Plaintext of an
 * object that fails authentication is never left in `out`.
 */
export async function openChunk(
  keys: DerivedKeys,
  staging: Buffer,
  out: Buffer,
  items: OpenItem[],
): Promise<{ staging: Buffer; out: Buffer; errors: (string | null)[] }> {
  const n = threads();
  if (items.length && n > 0 && staging.buffer !== out.buffer) {
    const spans = new Float64Array(items.length * 3);
    items.forEach((it, k) => spans.set([it.sOff, it.sLen, it.oOff], k * 3));
    const codes = await native().gcmOpenAsync(keys.block, staging, out, spans, digestsOf(items), n);
    return { staging, out, errors: items.map((it, k) => (codes[k] === 0 ? null : `object ${it.where} ${WHY[codes[k]] ?? `failed to open (${codes[k]})`}`)) };
  }
  const errors = items.map((it) => {
    try {
      unsealBlock(keys, it.digest, staging.subarray(it.sOff, it.sOff + it.sLen), it.where, out.subarray(it.oOff, it.oOff + it.sLen - TRAILER_BYTES));
      return null;
    } catch (e) {
      return (e as Error).message;
    }
  });
  return { staging, out, errors };
}

/** Staging buffers for sealed objects on their way in, reused across batches. */
const staging = new Map<number, Buffer[]>();

/** A staging buffer of `size` bytes; a new one from `alloc` (aligned for O_DIRECT) if given. */
export function acquireStaging(size: number, alloc?: (size: number) => Buffer): Buffer {
  return staging.get(size)?.pop() ?? (alloc ? alloc(size) : bigBuffer(size));
}

export function releaseStaging(b: Buffer): void {
  if (b.length === 0) return; // detached (a worker died with it)
  const list = staging.get(b.length) ?? [];
  if (list.length < 8) list.push(b);
  staging.set(b.length, list);
}
