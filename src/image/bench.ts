/**
 * `disksnap bench`: the request pattern of `qemu-img bench`, on any image disksnap opens.
 *
 * COUNT requests of SIZE bytes; the first at OFFSET, each next one STEP further (STEP
 * defaults to SIZE, i.e. sequential), wrapping to OFFSET at the end of the image; with
 * `random`, offsets are SIZE-aligned and drawn uniformly (fixed seed, so runs repeat).
 * DEPTH requests are "in flight" together: they are issued as one batch through the
 * image's batched path (one native call for a raw image), which is how disksnap keeps
 * several requests outstanding without a JavaScript promise per request.
 */
import { DiskImage } from './view';
import { invalid } from '../engine/errors';

export interface BenchOptions {
  write?: boolean;
  size?: number;
  count?: number;
  depth?: number;
  step?: number;
  offset?: number;
  random?: boolean;
  /** byte written by write requests (qemu-img bench --pattern; default 0) */
  pattern?: number;
  /**
   * Flush after the run (default true for writes). As in `qemu-img bench`, whose figure ends
   * before the image is closed and flushed, the flush is timed apart: `flushSeconds`.
   */
  flush?: boolean;
  /** called once the arguments are checked, just before the first request (the CLI's banner) */
  onStart?: () => void;
}

export interface BenchResult {
  operation: 'read' | 'write';
  size: number;
  count: number;
  depth: number;
  step: number;
  offset: number;
  random: boolean;
  seconds: number;
  flushSeconds: number;
  iops: number;
  bytesPerSecond: number;
}

export function runBench(image: DiskImage, opts: BenchOptions = {}): BenchResult {
  const size = opts.size ?? 4096;
  const count = opts.count ?? 75000;
  const depth = opts.depth ?? 64;
  const step = opts.step ?? size;
  const start = opts.offset ?? 0;
  const random = !!opts.random;
  const write = !!opts.write;
  if (!Number.isSafeInteger(size) || size <= 0) throw invalid(`request size ${size} must be a positive number of bytes`);
  if (size > 64 * 2 ** 20) throw invalid(`request size ${size} is larger than the 64 MiB a request may be`);
  if (!Number.isSafeInteger(count) || count <= 0) throw invalid(`count ${count} must be a positive integer`);
  if (!Number.isSafeInteger(depth) || depth <= 0 || depth > 4096) throw invalid(`depth ${depth} must be an integer from 1 to 4096`);
  if (!Number.isSafeInteger(step) || step < 0) throw invalid(`step ${step} must be a non-negative number of bytes`);
  if (!Number.isSafeInteger(start) || start < 0) throw invalid(`offset ${start} must be a non-negative number of bytes`);
  if (start + size > image.virtualSize) {
    throw invalid(`a ${size}-byte request at offset ${start} does not fit in ${image.path} (virtual size ${image.virtualSize})`, image.path);
  }
  if (write && !image.writable) throw invalid(`${image.path} is open read-only; a write benchmark needs it writable`, image.path);

  opts.onStart?.();
  const buf = Buffer.alloc(size * depth, write ? (opts.pattern ?? 0) : 0);
  const requests = new Float64Array(depth * 3);
  const slots = Math.floor((image.virtualSize - start) / size);
  let seed = 0x2545f491;
  const nextRandom = (): number => {
    // xorshift32: deterministic, cheap, good enough to spread offsets
    seed ^= seed << 13;
    seed >>>= 0;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    seed >>>= 0;
    return seed;
  };
  let pos = start;
  const t0 = process.hrtime.bigint();
  for (let done = 0; done < count; ) {
    const n = Math.min(depth, count - done);
    for (let i = 0; i < n; i++) {
      let off: number;
      if (random) {
        off = start + ((nextRandom() * 0x100000000 + nextRandom()) % slots) * size;
      } else {
        if (pos + size > image.virtualSize) pos = start;
        off = pos;
        pos += step;
      }
      requests[i * 3] = off;
      requests[i * 3 + 1] = i * size;
      requests[i * 3 + 2] = size;
    }
    const batch = n === depth ? requests : requests.subarray(0, n * 3);
    if (write) image.writeBatchSync(buf, batch);
    else image.readBatchSync(buf, batch);
    done += n;
  }
  const t1 = process.hrtime.bigint();
  if (write && opts.flush !== false) image.flushSync();
  const seconds = Number(t1 - t0) / 1e9;
  const flushSeconds = Number(process.hrtime.bigint() - t1) / 1e9;
  return {
    operation: write ? 'write' : 'read',
    size,
    count,
    depth,
    step,
    offset: start,
    random,
    seconds,
    flushSeconds,
    iops: count / seconds,
    bytesPerSecond: (count * size) / seconds,
  };
}
