/**
 * AES-256-GCM of whole chunks on worker threads, so that encryption does not run on the event
 * loop (the same rule as hashing: nothing that takes milliseconds blocks it).
 *
 * Measured here (1 GiB, 512 KiB blocks, 2 vCPUs): node:crypto seals at ~2.2 GB/s, but done
 * block by block on the event loop it serialised the snapshot pipeline and cost 60% more wall
 * time than no encryption; without the sealing the encrypted path ran as fast as the plain one.
 *
 * How: the chunk buffer (16 MiB of blocks, usually O_DIRECT-aligned) is *transferred* to a
 * worker — postMessage with a transfer list moves the memory, no copy — sealed or opened in
 * place there, and transferred back: a new ArrayBuffer object over the same memory, which is
 * why callers must use the returned Buffer (the one they passed is detached) and why the
 * O_DIRECT alignment is re-registered (src/store/direct.ts `transferAlignment`). Shared memory
 * would avoid the hand-over, but the native addon takes only ArrayBuffer-backed buffers.
 *
 * The formats are those of src/store/crypto.ts (sealBlock / unsealBlock, which also serve as
 * the fallback on the event loop: for small jobs, where workers cannot start, or with
 * DISKSNAP_CRYPTO_THREADS=0). One worker per CPU but one, started on first use, unref'd
 * while idle.
 */
import * as os from 'node:os';
import { Worker } from 'node:worker_threads';
import { DerivedKeys, TRAILER_BYTES, sealBlock, unsealBlock } from './crypto';
import { transferAlignment } from './direct';

/** Below this many bytes a job is done on the event loop: a message costs more. */
const MIN_WORKER_BYTES = 1024 * 1024;

// The worker: plain JavaScript, evaluated (no file to find from dist/ or src/). It must produce
// exactly what sealBlock produces and accept exactly what unsealBlock accepts (tests check).
const WORKER_CODE = `
const { parentPort } = require('node:worker_threads');
const { createCipheriv, createDecipheriv, randomFillSync } = require('node:crypto');
const MAGIC = Buffer.from('DSE1', 'latin1');
const AAD = Buffer.from('disksnap-block-v1:', 'latin1');
// AES in 16 KiB pieces: each piece's output is a small allocation the allocator reuses; a
// 512 KiB one per block is fresh memory to fault in every time (measured: a third of the
// system time of an encrypted restore).
const PIECE = 16384;
parentPort.on('message', (m) => {
  const key = Buffer.from(m.key);
  if (m.op === 'seal') {
    const trailers = [];
    let error = null;
    try {
      const buf = Buffer.from(m.ab, m.off, m.len);
      const nonces = randomFillSync(Buffer.alloc(12 * m.items.length));
      for (let i = 0; i < m.items.length; i++) {
        const it = m.items[i];
        const v = buf.subarray(it.off, it.off + it.len);
        const nonce = nonces.subarray(i * 12, i * 12 + 12);
        const c = createCipheriv('aes-256-gcm', key, nonce);
        c.setAAD(Buffer.concat([AAD, it.digest]));
        for (let q = 0; q < v.length; q += PIECE) v.set(c.update(v.subarray(q, q + PIECE)), q);
        c.final();
        trailers.push(Buffer.concat([nonce, c.getAuthTag(), MAGIC]));
      }
    } catch (e) {
      error = String((e && e.message) || e);
    }
    parentPort.postMessage({ id: m.id, ab: m.ab, trailers, error }, [m.ab]);
  } else {
    const errors = [];
    let error = null;
    try {
      const src = Buffer.from(m.sab, m.soff, m.slen);
      const out = Buffer.from(m.oab, m.ooff, m.olen);
      for (const it of m.items) {
        const stored = src.subarray(it.sOff, it.sOff + it.sLen);
        if (stored.length < 32) { errors.push('short'); continue; }
        const n = stored.length - 32;
        const tr = stored.subarray(n);
        if (!tr.subarray(28).equals(MAGIC)) { errors.push('magic'); continue; }
        const d = createDecipheriv('aes-256-gcm', key, tr.subarray(0, 12));
        d.setAAD(Buffer.concat([AAD, it.digest]));
        d.setAuthTag(tr.subarray(12, 28));
        const o = out.subarray(it.oOff, it.oOff + n);
        for (let q = 0; q < n; q += PIECE) o.set(d.update(stored.subarray(q, Math.min(n, q + PIECE))), q);
        // Unauthenticated plaintext never stays behind: zeros where the object failed.
        try { d.final(); } catch { o.fill(0); errors.push('auth'); continue; }
        errors.push(null);
      }
    } catch (e) {
      error = String((e && e.message) || e);
    }
    const transfer = m.sab === m.oab ? [m.sab] : [m.sab, m.oab];
    parentPort.postMessage({ id: m.id, sab: m.sab, oab: m.oab, errors, error }, transfer);
  }
});
`;

interface Slot {
  worker: Worker;
  pending: Map<number, { resolve: (v: Reply) => void; reject: (e: Error) => void }>;
}

interface Reply {
  id: number;
  error: string | null;
  ab?: ArrayBuffer;
  trailers?: Uint8Array[];
  sab?: ArrayBuffer;
  oab?: ArrayBuffer;
  errors?: (string | null)[];
}

let slots: Slot[] | undefined;
let disabled = false;
let nextId = 1;

function threads(): number {
  const env = process.env.DISKSNAP_CRYPTO_THREADS;
  if (env !== undefined && /^\d+$/.test(env)) return Number(env);
  // One core stays with the event loop and the native hashing threads. Measured on 2 vCPUs:
  // 0, 1 or 2 workers give the same wall time there (the machine is then CPU-bound), with
  // the workers costing a little more CPU; with more cores the workers are what scales.
  return Math.max(1, Math.min(8, os.availableParallelism() - 1));
}

function pool(): Slot[] | undefined {
  if (disabled) return undefined;
  if (slots) return slots;
  const n = threads();
  if (n === 0) {
    disabled = true;
    return undefined;
  }
  try {
    slots = [];
    for (let i = 0; i < n; i++) {
      const worker = new Worker(WORKER_CODE, { eval: true });
      const slot: Slot = { worker, pending: new Map() };
      worker.on('message', (r: Reply) => {
        const p = slot.pending.get(r.id);
        if (!p) return;
        slot.pending.delete(r.id);
        if (slot.pending.size === 0) worker.unref();
        p.resolve(r);
      });
      const fail = (e: Error) => {
        for (const p of slot.pending.values()) p.reject(e);
        slot.pending.clear();
        disabled = true; // a dead worker: the rest of this process seals on the event loop
      };
      worker.on('error', fail);
      worker.on('exit', (code) => fail(new Error(`crypto worker exited (${code})`)));
      worker.unref();
      slots.push(slot);
    }
    return slots;
  } catch {
    disabled = true;
    return undefined;
  }
}

function post(msg: Record<string, unknown>, transfer: ArrayBuffer[]): Promise<Reply> | undefined {
  const all = pool();
  if (!all) return undefined;
  const slot = all.reduce((a, b) => (b.pending.size < a.pending.size ? b : a));
  const id = nextId++;
  const p = new Promise<Reply>((resolve, reject) => slot.pending.set(id, { resolve, reject }));
  try {
    slot.worker.postMessage({ ...msg, id }, transfer);
  } catch {
    slot.pending.delete(id); // not transferable (a pooled buffer): the caller does it here
    return undefined;
  }
  if (slot.pending.size === 1) slot.worker.ref();
  return p;
}

function movable(b: Buffer): boolean {
  return b.buffer instanceof ArrayBuffer && b.buffer.byteLength >= MIN_WORKER_BYTES;
}

export interface SealItem {
  /** offset and length of the block's plaintext in the buffer */
  off: number;
  len: number;
  /** its keyed digest (the AAD) */
  digest: Uint8Array;
}

/**
 * Seals the blocks of `buf` in place; returns the buffer to use from now on (the same memory;
 * `buf` itself may be detached) and each block's trailer.
 */
export async function sealChunk(keys: DerivedKeys, buf: Buffer, items: SealItem[]): Promise<{ buf: Buffer; trailers: Buffer[] }> {
  const bytes = items.reduce((s, it) => s + it.len, 0);
  if (items.length && bytes >= MIN_WORKER_BYTES && movable(buf)) {
    const ab = buf.buffer as ArrayBuffer;
    const off = buf.byteOffset;
    const len = buf.length;
    const p = post({ op: 'seal', key: keys.block, ab, off, len, items: items.map((it) => ({ off: it.off, len: it.len, digest: Buffer.from(it.digest) })) }, [ab]);
    if (p) {
      const r = await p;
      transferAlignment(ab, r.ab!);
      const back = Buffer.from(r.ab!, off, len);
      if (r.error) throw new Error(`sealing in a worker failed: ${r.error}`);
      return { buf: back, trailers: r.trailers!.map((t) => Buffer.from(t.buffer, t.byteOffset, t.byteLength)) };
    }
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

const WHY: Record<string, string> = {
  short: `shorter than a sealed object's ${TRAILER_BYTES}-byte trailer`,
  magic: 'does not end in a sealed object\'s trailer ("DSE1"): damaged, or not encrypted',
  auth: 'failed authentication (AES-GCM): damaged, swapped with another block\'s object, or sealed under another key',
};

/**
 * Opens sealed objects held in `staging` into `out`; returns the buffers to use from now on
 * (both may have moved) and, per item, null or why it is bad. Plaintext of an object that
 * fails authentication is never written to `out`.
 */
export async function openChunk(
  keys: DerivedKeys,
  staging: Buffer,
  out: Buffer,
  items: OpenItem[],
): Promise<{ staging: Buffer; out: Buffer; errors: (string | null)[] }> {
  const bytes = items.reduce((s, it) => s + it.sLen, 0);
  if (items.length && bytes >= MIN_WORKER_BYTES && movable(staging) && movable(out) && staging.buffer !== out.buffer) {
    const sab = staging.buffer as ArrayBuffer;
    const oab = out.buffer as ArrayBuffer;
    const [soff, slen, ooff, olen] = [staging.byteOffset, staging.length, out.byteOffset, out.length];
    const p = post(
      { op: 'open', key: keys.block, sab, soff, slen, oab, ooff, olen, items: items.map((it) => ({ sOff: it.sOff, sLen: it.sLen, oOff: it.oOff, digest: Buffer.from(it.digest) })) },
      [sab, oab],
    );
    if (p) {
      const r = await p;
      transferAlignment(sab, r.sab!);
      transferAlignment(oab, r.oab!);
      const s2 = Buffer.from(r.sab!, soff, slen);
      const o2 = Buffer.from(r.oab!, ooff, olen);
      if (r.error) throw new Error(`opening in a worker failed: ${r.error}`);
      return { staging: s2, out: o2, errors: r.errors!.map((e, k) => (e === null ? null : `object ${items[k].where} ${WHY[e] ?? e}`)) };
    }
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

export function acquireStaging(size: number): Buffer {
  return staging.get(size)?.pop() ?? Buffer.allocUnsafeSlow(size);
}

export function releaseStaging(b: Buffer): void {
  if (b.length === 0) return; // detached (a worker died with it)
  const list = staging.get(b.length) ?? [];
  if (list.length < 8) list.push(b);
  staging.set(b.length, list);
}
