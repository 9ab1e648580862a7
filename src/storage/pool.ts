/**
 * The small building blocks of the read and write pipelines: a growable list of numbers, a
 * pool of chunk buffers that bounds memory, a throttle that bounds outstanding writes, and a
 * read-ahead loop that starts chunk c+1 while chunk c is handled.
 */
import { bigBuffer } from './store/direct';

/** A growable list of numbers in a Float64Array (never a JS object per block). */
export class NumberList {
  private a = new Float64Array(1024);
  length = 0;
  push(v: number): void {
    if (this.length === this.a.length) {
      const b = new Float64Array(this.a.length * 2);
      b.set(this.a);
      this.a = b;
    }
    this.a[this.length++] = v;
  }
  get(i: number): number {
    return this.a[i];
  }
  toArray(): number[] {
    return Array.from(this.a.subarray(0, this.length));
  }
  /** A membership test for ascending queries (each index at least the previous one). */
  ascendingHas(): (index: number) => boolean {
    let j = 0;
    return (index: number) => {
      while (j < this.length && this.a[j] < index) j++;
      return j < this.length && this.a[j] === index;
    };
  }
}

/** Fixed-size buffers handed out and returned; at most `max` exist. */
export class BufferPool {
  private free: Buffer[] = [];
  private count = 0;
  private waiters: ((b: Buffer) => void)[] = [];
  constructor(
    private readonly size: number,
    private readonly max: number,
    private readonly alloc: (size: number) => Buffer = (n) => bigBuffer(n),
  ) {}
  async acquire(): Promise<Buffer> {
    const b = this.free.pop();
    if (b) return b;
    if (this.count < this.max) {
      this.count++;
      return this.alloc(this.size);
    }
    return new Promise((resolve) => this.waiters.push(resolve));
  }
  release(b: Buffer): void {
    const w = this.waiters.shift();
    if (w) w(b);
    else this.free.push(b);
  }
  /**
   * A pool buffer shared by the writes queued from it: `hold()` before each, the function it
   * returns after; `done()` drops the caller's own reference. Back in the pool when all let go.
   */
  shared(buf: Buffer): { hold: () => () => void; done: () => void } {
    let refs = 1;
    const unref = () => {
      if (--refs === 0) this.release(buf);
    };
    return {
      hold: () => {
        refs++;
        return unref;
      },
      done: unref,
    };
  }
}

/** Runs async jobs with at most `limit` bytes outstanding; the first failure is rethrown. */
export class Throttle {
  private inflight = new Set<Promise<void>>();
  private bytes = 0;
  private failure: unknown;
  constructor(private readonly limit: number) {}
  async add(bytes: number, job: () => Promise<void>): Promise<void> {
    while (this.bytes > 0 && this.bytes + bytes > this.limit && this.inflight.size) await Promise.race(this.inflight);
    this.check();
    this.bytes += bytes;
    const p: Promise<void> = job()
      .catch((e) => {
        this.failure ??= e;
      })
      .finally(() => {
        this.bytes -= bytes;
        this.inflight.delete(p);
      });
    this.inflight.add(p);
  }
  check(): void {
    if (this.failure !== undefined) throw this.failure;
  }
  async drain(): Promise<void> {
    while (this.inflight.size) await Promise.race(this.inflight);
    this.check();
  }
  /** Waits for everything without throwing (cleanup paths). */
  async settle(): Promise<void> {
    while (this.inflight.size) await Promise.race(this.inflight);
  }
}

/**
 * For c = 0..count-1: `start(c)` is begun while chunk c-1 is still being handled, and
 * `each(c, value)` handles chunk c in order. A start that fails is reported when its turn
 * comes; one begun for a chunk never handled (an earlier `each` threw) is handed to
 * `discard` so its resources go back.
 */
export async function readAhead<T>(
  count: number,
  start: (c: number) => Promise<T>,
  each: (c: number, value: T) => Promise<void>,
  discard?: (value: T) => void,
): Promise<void> {
  const begin = (c: number) => {
    const p = start(c);
    // Rejections are seen where the promise is awaited (its turn, or the discard below).
    p.catch(() => undefined);
    return p;
  };
  let ahead = count > 0 ? begin(0) : undefined;
  try {
    for (let c = 0; c < count; c++) {
      const value = await ahead!;
      ahead = c + 1 < count ? begin(c + 1) : undefined;
      await each(c, value);
    }
  } finally {
    // A chunk read ahead of a failure: its value is dropped; its own error was not the first.
    if (ahead) {
      const left = await ahead.catch(() => undefined);
      if (left !== undefined) discard?.(left);
    }
  }
}
