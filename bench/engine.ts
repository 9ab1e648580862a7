/**
 * The native engine beside the tools a user would otherwise reach for, on the same file:
 * sequential reads (cp to /dev/null), hashing (sha256sum, openssl dgst, node:crypto),
 * and `disksnap bench` beside `qemu-img bench` on the same raw file.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { native } from '../src/engine/native';
import { BlockFile } from '../src/engine/file';
import { RawImage } from '../src/image/raw';
import { runBench } from '../src/image/bench';
import { BenchOptions, BenchRow } from './types';
import { fillRandom, hasCommand, MB, medianOf, MiB, run, timed, warm } from './util';

export async function benchEngine(opts: BenchOptions): Promise<BenchRow[]> {
  const rows: BenchRow[] = [];
  const runs = opts.runs ?? (opts.quick ? 1 : 5);
  const size = opts.quick ? 64 * MiB : 1024 * MiB;
  const file = path.join(opts.dir, 'engine.img');
  fillRandom(file, 0, size);
  warm(file);
  const label = `${size / MiB} MiB, page cache`;

  // Sequential read: 256 KiB reads through the engine (a buffer that stays in the CPU's
  // cache; larger ones measured slower) vs cp to /dev/null.
  const f = BlockFile.open(file, { lock: 'shared' });
  try {
    const chunk = 256 * 1024;
    const buf = Buffer.allocUnsafe(chunk);
    const readAll = (): void => {
      for (let pos = 0; pos < size; pos += chunk) f.readSync(buf, pos);
    };
    const ours = await medianOf(runs, () => timed(readAll));
    const cp = await medianOf(runs, () => run('cp', [file, '/dev/null']).seconds);
    rows.push(row('engine', `sequential read, ${label}`, size / ours / MB, 'cp FILE /dev/null', size / cp / MB, 'MB/s', true));

    // Hashing a file: 512 KiB blocks on both cores vs the single-threaded tools.
    const threads = 2;
    const hashOurs = await medianOf(runs, () => timed(() => native().hashFile(f.fd, 0, size, 512 * 1024, threads, undefined, undefined)));
    const sha256sum = await medianOf(runs, () => run('sha256sum', [file]).seconds);
    rows.push(row('engine', `SHA-256 of a file, 512 KiB blocks, ${threads} threads, ${label}`, size / hashOurs / MB, 'sha256sum', size / sha256sum / MB, 'MB/s', true));
    if (hasCommand('openssl')) {
      const ossl = await medianOf(runs, () => run('openssl', ['dgst', '-sha256', file]).seconds);
      rows.push(row('engine', `SHA-256 of a file, 512 KiB blocks, ${threads} threads, ${label}`, size / hashOurs / MB, 'openssl dgst -sha256', size / ossl / MB, 'MB/s', true));
    }
  } finally {
    f.close();
  }

  // Hashing data already in memory, per thread and on both cores, vs node:crypto.
  const mem = Buffer.allocUnsafe(opts.quick ? 64 * MiB : 256 * MiB);
  fs.readSync(fs.openSync(file, 'r'), mem, 0, mem.length, 0);
  const block = 512 * 1024;
  const nodeHash = (): void => {
    for (let pos = 0; pos < mem.length; pos += block) createHash('sha256').update(mem.subarray(pos, pos + block)).digest();
  };
  const nodeSecs = await medianOf(runs, () => timed(nodeHash));
  for (const threads of [1, 2]) {
    const secs = await medianOf(runs, () => timed(() => native().hashBlocks(mem, block, threads)));
    rows.push(row('engine', `SHA-256 in memory, 512 KiB blocks, ${threads} thread${threads > 1 ? 's' : ''}`, mem.length / secs / MB, 'node:crypto createHash, 1 thread', mem.length / nodeSecs / MB, 'MB/s', true));
  }

  // disksnap bench vs qemu-img bench, same raw file, 4 KiB requests from the page cache.
  if (hasCommand('qemu-img')) {
    const count = opts.quick ? 20000 : 200000;
    for (const depth of [1, 64]) {
      const ours = await medianOf(runs, () => {
        const img = RawImage.open(file);
        try {
          return runBench(img, { size: 4096, count, depth }).iops;
        } finally {
          img.close();
        }
      });
      const qemu = await medianOf(runs, () => {
        const { out } = run('qemu-img', ['bench', '-f', 'raw', '-t', 'writeback', '-c', String(count), '-d', String(depth), '-s', '4k', file]);
        return count / parseQemuSeconds(out);
      });
      rows.push(row('engine', `4 KiB reads, depth ${depth}, page cache (disksnap bench: batches of ${depth})`, ours, `qemu-img bench -d ${depth} -t writeback`, qemu, 'req/s', true));
    }
  }
  fs.rmSync(file, { force: true });
  return rows;
}

export function parseQemuSeconds(out: string): number {
  const m = /Run completed in ([\d.]+) seconds/.exec(out);
  if (!m) throw new Error(`unexpected qemu-img bench output: ${out}`);
  return Number(m[1]);
}

function row(area: string, metric: string, disksnap: number, peer: string, peerValue: number, unit: string, higherIsBetter: boolean): BenchRow {
  return { area, metric, disksnap, peer, peerValue, unit, higherIsBetter };
}
