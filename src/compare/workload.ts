/**
 * Workloads of `disksnap compare`: the writes both strategies receive, identical byte for
 * byte, so that their figures are of the same work.
 *
 * SPEC (`--workload`), KIND[:AMOUNT][:MIN-MAX]:
 *
 *   random[:3%][:4k-1m]   requests of MIN..MAX bytes (log-uniform, 4 KiB aligned) at
 *                         seeded random 4 KiB-aligned offsets until AMOUNT is written
 *                         (default; overlaps allowed, as a real guest does)
 *   sequential[:10%][:1m] one contiguous overwrite from offset 0 in requests of MAX
 *                         bytes (default 1 MiB)
 *   fs[:64M]              files written into an ext4 filesystem in the image through a
 *                         loop mount (root only; see fsworkload.ts): the blocks the
 *                         filesystem changed are captured once and replayed into each
 *                         strategy, so both see exactly the writes ext4 made
 *
 * AMOUNT is a percentage of the virtual size (`3%`, `0.5%`) or a size (`16M`). Everything
 * is deterministic for one `--seed`: offsets, sizes and the bytes written (AES-CTR
 * keystream of the seed), so two runs on the same image do the same work, and the data is
 * incompressible and never all-zero (so neither strategy gets it for free).
 *
 * The growth measurements (1, 4, 16 snapshots) need a fresh batch of writes between
 * snapshots: `round(i)` gives batch i of a quarter of AMOUNT each, with its own seed
 * (random and fs: random writes; sequential: the next stretch of the image).
 */
import { createCipheriv, createHash } from 'node:crypto';
import { DisksnapError, invalid } from '../engine/errors';
import { DiskImage } from '../image';
import { parseSize, formatSize } from '../engine/size';

export type WorkloadKind = 'random' | 'sequential' | 'fs';
export const WORKLOAD_KINDS: readonly WorkloadKind[] = ['random', 'sequential', 'fs'];

export interface WorkloadSpec {
  kind: WorkloadKind;
  /** the text the user gave, normalised */
  text: string;
  /** amount as a fraction of the image, or absolute bytes */
  amount: { percent: number } | { bytes: number };
  minRequest: number;
  maxRequest: number;
}

const KiB = 1024;
const MiB = 1024 * 1024;
export const ALIGN = 4 * KiB;

const DEFAULTS: Record<WorkloadKind, { amount: WorkloadSpec['amount']; min: number; max: number }> = {
  random: { amount: { percent: 3 }, min: 4 * KiB, max: MiB },
  sequential: { amount: { percent: 10 }, min: MiB, max: MiB },
  fs: { amount: { bytes: 64 * MiB }, min: 4 * KiB, max: 4 * MiB },
};

export const WORKLOAD_HELP =
  'KIND[:AMOUNT][:MIN-MAX] with KIND random (default random:3%:4k-1m), sequential ' +
  '(default sequential:10%:1m) or fs (ext4 files through a loop mount, root only; default fs:64M); ' +
  'AMOUNT is a percentage of the image or a size';

/** 4096 -> "4k", 1048576 -> "1m", 1536 -> "1536": the spec's own notation, so it parses back. */
export function compactSize(bytes: number): string {
  for (const [unit, mul] of [['t', 2 ** 40], ['g', 2 ** 30], ['m', 2 ** 20], ['k', 2 ** 10]] as const) {
    if (bytes >= mul && bytes % mul === 0) return `${bytes / mul}${unit}`;
  }
  return String(bytes);
}

function amountText(a: WorkloadSpec['amount']): string {
  return 'percent' in a ? `${a.percent}%` : compactSize(a.bytes);
}

/** Parses `--workload`; a bad spec is EINVALID naming what is wrong and what is allowed. */
export function parseWorkload(text: string | undefined): WorkloadSpec {
  const raw = (text ?? 'random').trim();
  const parts = raw.split(':');
  const kind = parts[0].toLowerCase() as WorkloadKind;
  if (!WORKLOAD_KINDS.includes(kind)) {
    throw invalid(`unknown workload '${raw}': expected ${WORKLOAD_HELP}`);
  }
  if (parts.length > 3) throw invalid(`workload '${raw}' has too many parts: expected ${WORKLOAD_HELP}`);
  const d = DEFAULTS[kind];
  let amount = d.amount;
  if (parts[1] !== undefined && parts[1] !== '') {
    const p = /^(\d+(?:\.\d+)?)%$/.exec(parts[1]);
    if (p) {
      const percent = Number(p[1]);
      if (!(percent > 0 && percent <= 100)) throw invalid(`workload '${raw}': ${parts[1]} must be more than 0% and at most 100%`);
      amount = { percent };
    } else {
      const bytes = parseSize(parts[1], `workload amount in '${raw}'`);
      if (bytes <= 0) throw invalid(`workload '${raw}': the amount must be more than 0 bytes`);
      amount = { bytes };
    }
  }
  let min = d.min;
  let max = d.max;
  if (parts[2] !== undefined && parts[2] !== '') {
    if (kind === 'fs') throw invalid(`workload '${raw}': fs takes no request sizes (ext4 decides them)`);
    const range = parts[2].split('-');
    if (range.length > 2) throw invalid(`workload '${raw}': request sizes are MIN-MAX or one SIZE`);
    min = parseSize(range[0], `request size in '${raw}'`);
    max = range.length === 2 ? parseSize(range[1], `request size in '${raw}'`) : min;
    if (kind === 'sequential') min = max;
    for (const v of [min, max]) {
      if (v < ALIGN || v % ALIGN !== 0 || v > 64 * MiB) {
        throw invalid(`workload '${raw}': request sizes must be multiples of 4 KiB from 4 KiB to 64 MiB`);
      }
    }
    if (min > max) throw invalid(`workload '${raw}': the smallest request size is larger than the largest`);
  }
  const sizes = min === max ? compactSize(max) : `${compactSize(min)}-${compactSize(max)}`;
  const textOut = kind === 'fs' ? `fs:${amountText(amount)}` : `${kind}:${amountText(amount)}:${sizes}`;
  return { kind, text: textOut, amount, minRequest: min, maxRequest: max };
}

/** Bytes the spec writes on an image of `virtualSize` bytes (at least one aligned request). */
export function amountBytes(spec: WorkloadSpec, virtualSize: number): number {
  const raw = 'percent' in spec.amount ? (virtualSize * spec.amount.percent) / 100 : spec.amount.bytes;
  const bytes = Math.max(ALIGN, Math.floor(raw / ALIGN) * ALIGN);
  if (bytes > virtualSize) {
    throw invalid(`workload ${spec.text} writes ${formatSize(bytes)}, more than the image's ${formatSize(virtualSize)}`);
  }
  return bytes;
}

/**
 * One batch of writes: parallel arrays of offsets and lengths, and a way to produce the
 * bytes of write i (deterministically, as often as asked: the read-back check re-derives
 * them instead of keeping them in memory).
 */
export interface WritePlan {
  readonly label: string;
  readonly offsets: Float64Array;
  readonly lengths: Float64Array;
  /** sum of lengths */
  readonly bytes: number;
  readonly maxLength: number;
  fill(index: number, into: Buffer): void;
}

/** 32-bit PRNG (mulberry32): small, fast, and the same on every machine. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function derive(...parts: (string | number)[]): Buffer {
  return createHash('sha256').update(parts.join('/')).digest();
}

/** Fills `into` with the AES-128-CTR keystream for (seed, label, index): incompressible, repeatable. */
export function fillKeystream(into: Buffer, seed: number, label: string, index: number): void {
  const key = derive('disksnap-compare', seed, label, index);
  const c = createCipheriv('aes-128-ctr', key.subarray(0, 16), key.subarray(16, 32));
  into.fill(0);
  const n = c.update(into);
  n.copy(into);
}

class GeneratedPlan implements WritePlan {
  constructor(
    readonly label: string,
    readonly offsets: Float64Array,
    readonly lengths: Float64Array,
    readonly bytes: number,
    readonly maxLength: number,
    private readonly seed: number,
  ) {}

  fill(index: number, into: Buffer): void {
    fillKeystream(into, this.seed, this.label, index);
  }
}

function build(label: string, seed: number, list: [number, number][]): WritePlan {
  const offsets = new Float64Array(list.length);
  const lengths = new Float64Array(list.length);
  let bytes = 0;
  let max = 0;
  list.forEach(([o, l], i) => {
    offsets[i] = o;
    lengths[i] = l;
    bytes += l;
    max = Math.max(max, l);
  });
  return new GeneratedPlan(label, offsets, lengths, bytes, max, seed);
}

/** Random writes of min..max bytes (log-uniform, 4 KiB multiples) until `total` bytes. */
export function randomPlan(label: string, virtualSize: number, total: number, min: number, max: number, seed: number): WritePlan {
  const rnd = prng(derive(seed, label).readUInt32LE(0));
  const slots = Math.floor(virtualSize / ALIGN);
  const list: [number, number][] = [];
  let written = 0;
  const ratio = max / min;
  while (written < total) {
    let len = Math.round((min * Math.pow(ratio, rnd())) / ALIGN) * ALIGN;
    len = Math.min(Math.max(len, min), max, total - written, slots * ALIGN);
    len = Math.max(ALIGN, Math.floor(len / ALIGN) * ALIGN);
    const lenSlots = len / ALIGN;
    const off = Math.floor(rnd() * (slots - lenSlots + 1)) * ALIGN;
    list.push([off, len]);
    written += len;
  }
  return build(label, seed, list);
}

/** A contiguous overwrite of `total` bytes from `start` (wrapping at the end) in `request`-byte pieces. */
export function sequentialPlan(label: string, virtualSize: number, total: number, request: number, start: number, seed: number): WritePlan {
  const end = Math.floor(virtualSize / ALIGN) * ALIGN;
  const list: [number, number][] = [];
  let pos = start % end;
  let written = 0;
  while (written < total) {
    const len = Math.min(request, total - written, end - pos);
    list.push([pos, len]);
    written += len;
    pos += len;
    if (pos >= end) pos = 0;
  }
  return build(label, seed, list);
}

/** Units (clusters or blocks) touched by a plan: how much a copy-on-write layer must hold. */
export function footprint(plans: WritePlan[], unit: number, virtualSize: number): number {
  const units = Math.ceil(virtualSize / unit);
  const seen = new Uint8Array(units);
  let count = 0;
  for (const p of plans) {
    for (let i = 0; i < p.offsets.length; i++) {
      const first = Math.floor(p.offsets[i] / unit);
      const last = Math.floor((p.offsets[i] + p.lengths[i] - 1) / unit);
      for (let u = first; u <= last; u++) {
        if (!seen[u]) {
          seen[u] = 1;
          count++;
        }
      }
    }
  }
  return count * unit;
}

export interface Workload {
  spec: WorkloadSpec;
  seed: number;
  virtualSize: number;
  /** the writes applied while the first snapshot exists */
  main: WritePlan;
  /** batch i (1-based) of the growth measurement */
  round(i: number): WritePlan;
  /** for fs: what was done inside the filesystem */
  fsDetail?: FsDetail;
}

export interface FsDetail {
  files: number;
  fileBytes: number;
  /** true when compare ran mkfs.ext4 on the copy (the image had no ext2/3/4 filesystem) */
  formatted: boolean;
  /** how the image was mounted: disksnap's loopback library or mount -o loop */
  mountedWith: string;
}

/**
 * Batch i (1-based) of the growth runs: a quarter of the amount, its own seed (random and
 * fs: random writes; sequential: the stretch after the main one and the previous batches).
 */
export function roundPlan(spec: WorkloadSpec, virtualSize: number, seed: number, i: number): WritePlan {
  const total = amountBytes(spec, virtualSize);
  const roundBytes = Math.max(ALIGN, Math.floor(total / 4 / ALIGN) * ALIGN);
  if (spec.kind === 'sequential') {
    return sequentialPlan(`round-${i}`, virtualSize, roundBytes, spec.maxRequest, total + (i - 1) * roundBytes, seed);
  }
  const min = spec.kind === 'fs' ? 4 * KiB : spec.minRequest;
  const max = spec.kind === 'fs' ? MiB : spec.maxRequest;
  return randomPlan(`round-${i}`, virtualSize, roundBytes, min, max, seed);
}

/** The random/sequential workload of a spec on an image (fs builds its main plan elsewhere). */
export function makeWorkload(spec: WorkloadSpec, virtualSize: number, seed: number, main?: WritePlan, fsDetail?: FsDetail): Workload {
  if (virtualSize < 16 * ALIGN) throw invalid(`the image is ${formatSize(virtualSize)}; compare needs at least 64 KiB`);
  const total = amountBytes(spec, virtualSize);
  let plan = main;
  if (!plan) {
    if (spec.kind === 'random') plan = randomPlan('main', virtualSize, total, spec.minRequest, spec.maxRequest, seed);
    else if (spec.kind === 'sequential') plan = sequentialPlan('main', virtualSize, total, spec.maxRequest, 0, seed);
    else throw new DisksnapError('internal: the fs workload needs its captured plan', 'EINVALID');
  }
  return { spec, seed, virtualSize, main: plan, round: (i) => roundPlan(spec, virtualSize, seed, i), fsDetail };
}

/** Largest buffer a batch of writes or reads uses (requests are grouped up to this size). */
const BATCH_BYTES = 16 * MiB;

export interface IoResult {
  bytes: number;
  /** time inside the image's write/read calls (and the final flush for writes) */
  seconds: number;
  /** writes: the part of `seconds` spent in the final flush (making the writes durable) */
  flushSeconds: number;
}

/**
 * Applies a plan to an image in batches of up to 16 MiB. Only the image's own calls are
 * timed (and the flush at the end): generating the data is not part of the write.
 */
export async function applyPlan(image: DiskImage, plan: WritePlan, onProgress?: (done: number) => void): Promise<IoResult> {
  const buf = Buffer.alloc(Math.min(BATCH_BYTES, Math.max(plan.maxLength, 0)) || ALIGN);
  let ns = 0n;
  let i = 0;
  let done = 0;
  while (i < plan.offsets.length) {
    const reqs: number[] = [];
    let used = 0;
    while (i < plan.offsets.length && (reqs.length === 0 || used + plan.lengths[i] <= buf.length)) {
      const len = plan.lengths[i];
      const target = len <= buf.length ? buf.subarray(used, used + len) : Buffer.alloc(len);
      plan.fill(i, target);
      if (len > buf.length) {
        // a single request larger than the batch buffer: write it on its own
        const t0 = process.hrtime.bigint();
        image.writeSync(target, plan.offsets[i]);
        ns += process.hrtime.bigint() - t0;
      } else {
        reqs.push(plan.offsets[i], used, len);
        used += len;
      }
      done += len;
      i++;
    }
    if (reqs.length) {
      const t0 = process.hrtime.bigint();
      image.writeBatchSync(buf, Float64Array.from(reqs));
      ns += process.hrtime.bigint() - t0;
    }
    onProgress?.(done);
    await yieldLoop();
  }
  const t0 = process.hrtime.bigint();
  await image.flush();
  const flushNs = process.hrtime.bigint() - t0;
  ns += flushNs;
  return { bytes: plan.bytes, seconds: Number(ns) / 1e9, flushSeconds: Number(flushNs) / 1e9 };
}

/**
 * Reads a plan's ranges back and checks each one against the bytes the plan wrote, unless a
 * later write of the same plan overlapped it (then the later bytes are checked where they
 * land; the overlapped earlier range is skipped). Returns the timed read figures and the
 * number of ranges that did not match.
 */
export async function readBackPlan(image: DiskImage, plan: WritePlan): Promise<IoResult & { mismatches: number; checked: number }> {
  const n = plan.offsets.length;
  // a range is checkable when no later write overlaps it
  const checkable = new Uint8Array(n);
  const order = Array.from({ length: n }, (_, k) => k).sort((a, b) => plan.offsets[a] - plan.offsets[b]);
  // sweep: for each write, does any later-indexed write overlap it?
  // O(n log n + overlaps): intervals sorted by start, keep the active ones
  checkable.fill(1);
  const active: number[] = [];
  for (const k of order) {
    const start = plan.offsets[k];
    for (let j = active.length - 1; j >= 0; j--) {
      const a = active[j];
      if (plan.offsets[a] + plan.lengths[a] <= start) {
        active.splice(j, 1);
        continue;
      }
      // a and k overlap: the earlier of the two is overwritten
      if (a < k) checkable[a] = 0;
      else checkable[k] = 0;
    }
    active.push(k);
  }
  const buf = Buffer.alloc(Math.min(BATCH_BYTES, plan.maxLength) || ALIGN);
  const expect = Buffer.alloc(plan.maxLength || ALIGN);
  let ns = 0n;
  let mismatches = 0;
  let checked = 0;
  let i = 0;
  while (i < n) {
    const reqs: number[] = [];
    const idx: number[] = [];
    let used = 0;
    while (i < n && (reqs.length === 0 || used + plan.lengths[i] <= buf.length)) {
      const len = plan.lengths[i];
      if (len > buf.length) {
        const big = Buffer.alloc(len);
        const t0 = process.hrtime.bigint();
        image.readSync(big, plan.offsets[i]);
        ns += process.hrtime.bigint() - t0;
        if (checkable[i]) {
          plan.fill(i, expect.subarray(0, len));
          checked++;
          if (!big.equals(expect.subarray(0, len))) mismatches++;
        }
      } else {
        reqs.push(plan.offsets[i], used, len);
        idx.push(i);
        used += len;
      }
      i++;
    }
    if (reqs.length) {
      const t0 = process.hrtime.bigint();
      image.readBatchSync(buf, Float64Array.from(reqs));
      ns += process.hrtime.bigint() - t0;
      for (let r = 0; r < idx.length; r++) {
        const k = idx[r];
        if (!checkable[k]) continue;
        const len = reqs[r * 3 + 2];
        const at = reqs[r * 3 + 1];
        plan.fill(k, expect.subarray(0, len));
        checked++;
        if (!buf.subarray(at, at + len).equals(expect.subarray(0, len))) mismatches++;
      }
    }
    await yieldLoop();
  }
  return { bytes: plan.bytes, seconds: Number(ns) / 1e9, flushSeconds: 0, mismatches, checked };
}

/** Lets signal handlers and progress redraws run between synchronous batches. */
export function yieldLoop(): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve));
}
