/** Shared helpers of the benchmarks: timing, medians, running peer commands. */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomFillSync } from 'node:crypto';

export function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** Runs fn `runs` times and returns the median of what it returns (e.g. seconds). */
export async function medianOf(runs: number, fn: () => number | Promise<number>): Promise<number> {
  const out: number[] = [];
  for (let i = 0; i < runs; i++) out.push(await fn());
  return median(out);
}

/** Two series of one bench's runs added run by run (a floor and the runtime's start beside it). */
export function sumByRun(a: number[], b: number[]): number[] {
  return a.map((x, k) => x + b[k]);
}

/** Seconds taken by fn. */
export async function timed(fn: () => unknown): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

/** The CLI as a user runs it: the executable itself, whose first two lines start node. */
export const CLI = path.resolve(__dirname, '..', 'src', 'cli', 'main.js');

/**
 * `node ARGS` started as the executable starts node (without NODE_EXTRA_CA_CERTS, through an exec:
 * src/engine/extra-ca.ts): the runtime's start in a floor costs what it costs the CLI.
 */
export function nodeAsCli(args: string[]): [string, string[]] {
  return ['/usr/bin/env', ['-u', 'NODE_EXTRA_CA_CERTS', process.execPath, ...args]];
}

/** Runs a command, throws with its stderr on failure, returns stdout and the seconds taken. */
export function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv; input?: string } = {}): { out: string; seconds: number } {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { env: { ...process.env, ...opts.env }, input: opts.input, maxBuffer: 1 << 28 });
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.error) throw r.error;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr.toString().trim()}`);
  return { out: r.stdout.toString(), seconds };
}

export function hasCommand(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

/** Writes `bytes` of random data at `offset` of a file (created if missing), in 8 MiB pieces. */
export function fillRandom(file: string, offset: number, bytes: number): void {
  const fd = fs.openSync(file, fs.existsSync(file) ? 'r+' : 'w+');
  try {
    const buf = Buffer.alloc(8 * 2 ** 20);
    for (let pos = 0; pos < bytes; pos += buf.length) {
      const n = Math.min(buf.length, bytes - pos);
      randomFillSync(buf, 0, n);
      fs.writeSync(fd, buf, 0, n, offset + pos);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Rewrites ~`fraction` of the data region in 64 KiB pieces at pseudo-random places. */
export function rewrite(file: string, dataOffset: number, dataBytes: number, fraction: number, seed: number): void {
  const piece = 64 * 1024;
  const pieces = Math.max(1, Math.round((dataBytes * fraction) / piece));
  let x = seed * 2654435761;
  for (let i = 0; i < pieces; i++) {
    x = (x * 1103515245 + 12345) % 2147483648;
    const at = dataOffset + Math.floor((x / 2147483648) * (dataBytes / piece)) * piece;
    fillRandom(file, at, piece);
  }
}

/** Reads a file once so that the page cache holds it (benchmarks of the warm path). */
export function warm(file: string): void {
  run('sh', ['-c', 'cat "$1" > /dev/null', 'sh', file]);
}

/** Drops clean page-cache pages where allowed (root); returns false otherwise. */
export function dropCaches(): boolean {
  try {
    spawnSync('sync');
    fs.writeFileSync('/proc/sys/vm/drop_caches', '3');
    return true;
  } catch {
    return false;
  }
}

export const MB = 1e6;
export const MiB = 2 ** 20;
export const GiB = 2 ** 30;

/**
 * Compiles bench/floor.c (a store's object writes in C: the floor of the snapshot benches) into
 * `dir` with the system's C compiler; undefined, said on stderr, without one.
 */
export function buildFloor(dir: string, bench: string): string | undefined {
  const src = [path.resolve(__dirname, '..', '..', 'bench', 'floor.c'), path.resolve(__dirname, 'floor.c')].find((f) => fs.existsSync(f));
  if (!src || !hasCommand('cc')) {
    process.stderr.write(`bench ${bench}: no C compiler (cc) or bench/floor.c: no floor rows\n`);
    return undefined;
  }
  const bin = path.join(dir, 'floor');
  run('cc', ['-O2', '-pthread', '-o', bin, src]);
  return bin;
}

/**
 * The disk's floor for writing `bytes` of `src` (from `offset`, a multiple of 4 MiB) durably:
 * `streams` dd processes at once, each copying its slice into a file of its own in `dir` in
 * 4 MiB requests, O_DIRECT, then fdatasync; with `readDirect` the reads bypass the page cache
 * too (a restore reads objects that are not cached). No hashing, no objects, no metadata: what
 * the device does with the same bytes when nothing else is asked of it. Seconds, from the
 * first dd starting to the last one's fdatasync; the files are removed afterwards.
 */
export function diskFloor(src: string, offset: number, bytes: number, dir: string, streams = 4, readDirect = false): number {
  const req = 4 * MiB;
  const slice = Math.ceil(bytes / streams / req) * req;
  const out = (k: number) => path.join(dir, `disk-floor-${process.pid}-${k}`);
  const dds = Array.from({ length: streams }, (_, k) => {
    const count = Math.min(slice, bytes - k * slice) / req;
    return `dd if='${src}' of='${out(k)}' bs=${req} skip=${(offset + k * slice) / req} count=${Math.ceil(count)} ${readDirect ? 'iflag=direct ' : ''}oflag=direct conv=fdatasync status=none & pids+=($!);`;
  });
  try {
    // each dd waited for by its pid: a failed one fails the floor
    return run('bash', ['-c', `set -e; pids=(); ${dds.join(' ')} for p in "\${pids[@]}"; do wait "$p"; done`]).seconds;
  } finally {
    for (let k = 0; k < streams; k++) fs.rmSync(out(k), { force: true });
  }
}
