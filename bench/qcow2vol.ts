/**
 * Storage snapshots of a qcow2 volume (issue 13), beside restic and beside the floor, in one run:
 *
 *   a 16 GiB qcow2 image (quick: 1 GiB) holding 4 GiB of random data (quick: 256 MiB) in four
 *   regions, 64 KiB clusters, no backing file, made by `qemu-img convert` from a sparse raw file;
 *     full snapshot          disksnap snapshot create   vs restic backup of the qcow2 file
 *                                                        vs the store's floor: bench/floor.c
 *                                                           writing as many 512 KiB objects
 *                                                        vs the disk's floor: 4 dd streams
 *                                                           writing as many bytes (O_DIRECT,
 *                                                           fdatasync) + `node -e 0`
 *   then ~1% of the data rewritten by qemu-io (cache=none, as a VM with cache=none writes),
 *   twice, in two patterns, each followed by an incremental snapshot, which reads the
 *   persistent dirty bitmap the first snapshot added (changeSource must say `bitmap`):
 *     scattered 64 KiB writes     the worst case for 512 KiB blocks: each dirty granule
 *                                  is read and stored as a piece (src/storage/dirty.ts)
 *     1 MiB writes                 whole blocks (a guest writing files sequentially)
 *     incremental            disksnap snapshot create   vs restic's second backup (it re-reads
 *                                                           the 4 GiB file: its mtime moved)
 *                                                        vs the floor: a node process that
 *                                                           preads the dirty data (host offsets
 *                                                           from `qemu-img map`, found before
 *                                                           the clock starts) and SHA-256s it,
 *                                                           once for the dirty 64 KiB granules
 *                                                           and once for the dirty 512 KiB blocks
 *                                                        vs `node -e 0`: the runtime's own start,
 *                                                           which both floors include
 *                                                        vs the store's floor: bench/floor.c
 *                                                           writing as many objects of the same
 *                                                           size as the incremental added
 *                                                        vs the disk's floor: 4 dd streams
 *                                                           writing as many bytes (O_DIRECT,
 *                                                           fdatasync) + `node -e 0`
 *   then, on the last run's store, 20 more rounds of scattered writes, each snapshotted, and
 *   3 more timed: an incremental after 23 earlier snapshots (quick: 4 + 3), against restic's
 *   second backup and against the first incremental (it must not grow with the chain);
 *   and peak RSS of snapshots of a 1 TiB sparse qcow2 volume holding 4 MiB (budget: 256 MiB).
 *
 * Each run measures full snapshot and both incrementals, with their peers and floors, in two
 * machine states, as bench/snapshot.ts does (issue 18): "fresh" (a `sync` before each measured
 * operation) and "worked-in" (bench/workedin.ts before each: the page cache full of other data,
 * 1 GiB written and deleted, a background reader/writer beside it), each state with a store of
 * its own; then the image read once (both tools start from a warm page cache). The floor
 * processes start from the same state. The chain and memory rows: fresh only.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BenchOptions, BenchRow } from './types';
import { CLI, nodeAsCli, GiB, MiB, buildFloor, diskFloor, fillRandom, hasCommand, median, run, sumByRun, warm } from './util';
import { WorkedIn } from './workedin';

/** The machine states each run measures in (issue 18's "worked-in machine": bench/workedin.ts). */
const STATES = ['fresh', 'worked-in'] as const;
/** The key prefix of a state's figures ('' for fresh, as before the states). */
const prefixOf = (state: (typeof STATES)[number]): string => (state === 'fresh' ? '' : 'w ');

/** A directory store's block objects (packs included) and their sizes, by path. */
function objectSizes(store: string): Map<string, number> {
  const out = new Map<string, number>();
  const root = path.join(store, 'blocks');
  for (const d of fs.readdirSync(root)) for (const f of fs.readdirSync(path.join(root, d))) out.set(`${d}/${f}`, fs.statSync(path.join(root, d, f)).size);
  return out;
}

const LIB = path.resolve(__dirname, '..', 'src', 'storage', 'index.js');
const AREA = 'storage snapshot, qcow2 volume';
const KiB = 1024;
const BLOCK = 512 * KiB;

interface Range {
  offset: number;
  length: number;
}

/** The pieces of one rewrite: `count` ranges of `piece` bytes at seeded random places inside the data regions. */
function pieces(regions: Range[], piece: number, count: number, seed: number): Range[] {
  // a 32-bit LCG in exact integer arithmetic (the float form before lost its low bits past
  // 2^53, and for some seeds fell into a cycle shorter than `count` places: a hang)
  let x = Math.imul(seed, 2654435761) >>> 0;
  const next = () => (x = (Math.imul(x, 1103515245) + 12345) >>> 0) / 4294967296;
  const out = new Map<number, Range>();
  while (out.size < count) {
    const r = regions[Math.floor(next() * regions.length)];
    const at = r.offset + Math.floor(next() * (r.length / piece)) * piece;
    out.set(at, { offset: at, length: piece });
  }
  return [...out.values()].sort((a, b) => a.offset - b.offset);
}

/** The ranges widened to whole `unit`s and merged. */
function widen(ranges: Range[], unit: number): Range[] {
  const out: Range[] = [];
  for (const r of ranges) {
    const a = Math.floor(r.offset / unit) * unit;
    const b = Math.ceil((r.offset + r.length) / unit) * unit;
    const last = out[out.length - 1];
    if (last && a <= last.offset + last.length) last.length = Math.max(last.length, b - last.offset);
    else out.push({ offset: a, length: b - a });
  }
  return out;
}

const bytesOf = (ranges: Range[]) => ranges.reduce((n, r) => n + r.length, 0);

/** Guest ranges to host ranges of a qcow2 image without a backing file (qemu-img map is the oracle). */
function hostRanges(img: string, guest: Range[]): Range[] {
  const map = JSON.parse(run('qemu-img', ['map', '--output=json', '-f', 'qcow2', img]).out) as Array<{ start: number; length: number; data: boolean; offset?: number }>;
  const out: Range[] = [];
  let m = 0;
  for (const g of guest) {
    for (let at = g.offset; at < g.offset + g.length; ) {
      while (map[m].start + map[m].length <= at) m++;
      const e = map[m];
      const n = Math.min(g.offset + g.length, e.start + e.length) - at;
      if (!e.data || e.offset === undefined) throw new Error(`bench: guest offset ${at} is not data in ${img}`);
      out.push({ offset: e.offset + (at - e.start), length: n });
      at += n;
    }
  }
  return out;
}

/** The floor process: pread each range of `file` into one buffer and SHA-256 it; prints nothing. */
const FLOOR = `
const fs = require('fs'), { createHash } = require('crypto');
const [file, list] = process.argv.slice(1);
const ranges = JSON.parse(fs.readFileSync(list, 'utf8'));
const fd = fs.openSync(file, 'r');
const buf = Buffer.allocUnsafe(Math.max(...ranges.map((r) => r[1])));
for (const [off, len] of ranges) {
  let n = 0;
  while (n < len) n += fs.readSync(fd, buf, n, len - n, off + n);
  createHash('sha256').update(buf.subarray(0, len)).digest();
}`;

function sync(): void {
  run('sync', []);
}

/** Peak RSS (MiB) and seconds of a fresh process that snapshots `volume` into `store` through the library. */
function peakRss(volume: string, store: string): { rssMiB: number; seconds: number } {
  const script = `
    const s = require(${JSON.stringify(LIB)});
    const t0 = Date.now();
    s.createSnapshot(${JSON.stringify(volume)}, { store: ${JSON.stringify(store)} }).then(() => {
      const hwm = /VmHWM:\\s+(\\d+) kB/.exec(require('fs').readFileSync('/proc/self/status', 'utf8'));
      process.stdout.write(JSON.stringify({ rss: Number(hwm[1]), ms: Date.now() - t0 }));
    }, (e) => { console.error(e.message); process.exit(1); });`;
  const r = JSON.parse(run(process.execPath, ['-e', script]).out);
  return { rssMiB: r.rss / 1024, seconds: r.ms / 1000 };
}

/** Empties every file under `dir` (truncated to 0 bytes): its space freed, no inode freed (see `leftovers` below). */
function hollow(dir: string): void {
  if (!fs.existsSync(dir)) return;
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const at = path.join(dir, e.name);
    if (e.isDirectory()) hollow(at);
    else if (e.isFile()) fs.truncateSync(at, 0);
  }
}

/** Removes every persistent bitmap of the image (a new run starts as a volume never snapshotted). */
function dropBitmaps(img: string): void {
  const info = JSON.parse(run('qemu-img', ['info', '--output=json', '-f', 'qcow2', img]).out);
  for (const b of info['format-specific']?.data?.bitmaps ?? []) run('qemu-img', ['bitmap', '--remove', '-f', 'qcow2', img, b.name]);
}

export async function benchQcow2Volume(opts: BenchOptions): Promise<BenchRow[]> {
  if (!hasCommand('qemu-img') || !hasCommand('qemu-io')) {
    process.stderr.write('bench qcow2vol: qemu-img/qemu-io not installed: no rows\n');
    return [];
  }
  const quick = !!opts.quick;
  const runs = opts.runs ?? (quick ? 1 : 3);
  const size = quick ? GiB : 16 * GiB;
  const data = quick ? 256 * MiB : 4 * GiB;
  const regions: Range[] = [0, 1, 2, 3].map((r) => ({ offset: r * (size / 4) + size / 16, length: data / 4 }));
  const label = quick ? '1 GiB qcow2, 256 MiB of data' : '16 GiB qcow2, 4 GiB of data';
  const haveRestic = hasCommand('restic');
  const resticEnv = { RESTIC_PASSWORD: 'disksnap-bench', RESTIC_CACHE_DIR: path.join(opts.dir, 'restic-cache') };

  const raw = path.join(opts.dir, 'src.raw');
  const img = path.join(opts.dir, 'vol.qcow2');
  fs.writeFileSync(raw, '');
  fs.truncateSync(raw, size);
  for (const r of regions) fillRandom(raw, r.offset, r.length);
  run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=65536', raw, img]);
  fs.rmSync(raw);
  // What qemu-io writes (`write -s FILE`): a random file of its own for each write, as a guest
  // writes different data each time (one file for all writes made every 64 KiB piece the same
  // object, which flattered the store until session 14). The files are written over with new
  // data each round, not removed and made again: 656 inodes freed just before each incremental
  // is the state the floors' leftovers below avoid (a file longer than a round needs is read
  // only as far as its write goes).
  const sources = path.join(opts.dir, 'sources');
  const sourcesFor = (piece: number, count: number): string[] => {
    fs.mkdirSync(sources, { recursive: true });
    return Array.from({ length: count }, (_, k) => {
      const f = path.join(sources, `${k}.bin`);
      fillRandom(f, 0, piece);
      return f;
    });
  };

  const t: Record<string, number[]> = {};
  const add = (k: string, v: number) => (t[k] ??= []).push(v);
  const timeOf = (cmd: string, args: string[], env?: NodeJS.ProcessEnv) => run(cmd, args, { env }).seconds;
  const patterns = [
    { key: '64k', piece: 64 * KiB, what: 'scattered 64 KiB writes' },
    { key: '1m', piece: MiB, what: '1 MiB writes' },
  ];
  const facts: Record<string, string> = {};
  const floorBin = buildFloor(opts.dir, 'qcow2vol');
  // The floors' objects stay until every run is done, as bench/snapshot.ts keeps its stores: on
  // an ext4 without a journal (this VM's root) the kernel skips the inodes freed in the last few
  // minutes when it allocates new ones, one by one (ext4 recently_deleted()), so removing the
  // 8,192 objects of a full snapshot's floor made the next run's full snapshot (8,192 new
  // objects) measure that, and restic (a few hundred files) hardly. Session 45, a store of
  // 2,048 objects (1 GiB) removed, then a full snapshot of the same 1 GiB into a new store:
  // 1.67-1.91 s one second after, 1.77 s 70 s after, 1.19 s 400 s after (the kernel's window is
  // 60 s, 360 s while the inode table block is dirty).
  // Their files are emptied instead once their state is done (truncated: the space freed, the
  // inodes kept), and the whole directories removed at the end.
  const leftovers: string[] = [];
  let chainStore = '';
  const workedIn = new WorkedIn(opts.dir, quick);
  try {
    for (let i = 0; i < runs; i++) {
      for (const state of STATES) {
        const p = prefixOf(state);
        const tag = `${p ? 'w' : ''}${i}`; // in the names of the state's directories
        /** Before each measured operation: a sync on a fresh machine, the worked-in state otherwise (bench/workedin.ts); then the image warm. */
        const before = () => {
          if (p) workedIn.prepare();
          else sync();
          warm(img);
        };
        /** One measured operation, with the worked-in state's background I/O beside it. */
        const step = <T>(fn: () => T): T => {
          before();
          try {
            return fn();
          } finally {
            workedIn.stop();
          }
        };
        dropBitmaps(img);
        if (chainStore) hollow(chainStore); // the previous state's store (the last one's takes the chain below)
        const store = path.join(opts.dir, `store-${tag}`);
        const repo = path.join(opts.dir, `restic-${tag}`);
        const scratch = [repo];
        chainStore = store;
        leftovers.push(store, repo);
        const fullRec = step(() => {
          const f0 = process.hrtime.bigint();
          const r = JSON.parse(run(CLI, ['snapshot', 'create', img, '--store', store, '--json']).out);
          add(`${p}full`, Number(process.hrtime.bigint() - f0) / 1e9);
          return r;
        });
        // The store's floor for the full snapshot: as many 512 KiB objects written by bench/floor.c
        // from the image's bytes in the page cache (the same syscalls as below).
        const fullObjects = fullRec.stats.blocksAdded as number;
        if (floorBin && fullObjects > 0) {
          const fdir = path.join(opts.dir, `floor-full-${tag}`);
          leftovers.push(fdir);
          scratch.push(fdir);
          step(() => add(`${p}store floor full`, Number(run(floorBin, [img, '0', String(fullObjects * BLOCK), String(BLOCK), fdir, '16', String(fullObjects)]).out)));
          facts['full objects'] = `${fullObjects} objects of ${BLOCK / KiB} KiB`;
        }
        if (fullObjects > 0) {
          // the device's own floor for as many bytes (4 dd streams, O_DIRECT, fdatasync), and the runtime starting
          const disk = step(() => diskFloor(img, 0, fullObjects * BLOCK, opts.dir));
          add(`${p}disk floor full+start`, disk + run(...nodeAsCli(['-e', '0'])).seconds);
        }
        if (haveRestic) {
          run('restic', ['--quiet', 'init', '-r', repo], { env: resticEnv });
          step(() => add(`${p}restic full`, timeOf('restic', ['--quiet', '-r', repo, 'backup', img], resticEnv)));
        }
        for (const [j, pat] of patterns.entries()) {
          const dirty = pieces(regions, pat.piece, Math.round((data * 0.01) / pat.piece), 100 * i + j + 1 + (p ? 50 : 0));
          // -n: cache=none, as a VM configured with cache=none writes (O_DIRECT)
          const src = sourcesFor(pat.piece, dirty.length);
          const cmds = dirty.flatMap((r, k) => ['-c', `write -q -s ${src[k]} ${r.offset} ${r.length}`]);
          for (let c = 0; c < cmds.length; c += 2000) run('qemu-io', ['-n', '-f', 'qcow2', ...cmds.slice(c, c + 2000), img]);
          const granules = widen(dirty, 64 * KiB);
          const blocks = widen(dirty, BLOCK);
          const lists = { granules: hostRanges(img, granules), blocks: hostRanges(img, blocks) };
          const had = objectSizes(store);
          const out = step(() => {
            const t0 = process.hrtime.bigint();
            const o = run(CLI, ['snapshot', 'create', img, '--store', store, '--json']).out;
            add(`${p}incr ${pat.key}`, Number(process.hrtime.bigint() - t0) / 1e9);
            return o;
          });
          const wrote = [...objectSizes(store)].filter(([k]) => !had.has(k)).map(([, n]) => n);
          const rec = JSON.parse(out);
          if (rec.changeSource !== 'bitmap') throw new Error(`bench qcow2vol: the incremental did not use the bitmap: ${rec.changeSource} (${rec.changeSourceReason})`);
          facts[`${pat.key} scanned`] = `${(rec.stats.bytesScanned / MiB).toFixed(0)} MiB read (dirty granules ${(bytesOf(granules) / MiB).toFixed(0)} MiB, blocks ${(bytesOf(blocks) / MiB).toFixed(0)} MiB)`;
          if (haveRestic) step(() => add(`${p}restic incr ${pat.key}`, timeOf('restic', ['--quiet', '-r', repo, 'backup', img], resticEnv)));
          // The store's own floor: the objects this incremental wrote (as many, of their mean size:
          // its packs of pieces and whole blocks, not the pieces it counts) written by bench/floor.c
          // with the same syscalls (O_TMPFILE, O_DIRECT write, fdatasync, linkat, a fsync per
          // directory; 16 threads), from the image's bytes in the page cache.
          const objects = wrote.length;
          if (floorBin && objects > 0) {
            const objSize = Math.max(4096, Math.round(wrote.reduce((a, b) => a + b, 0) / objects / 4096) * 4096);
            const fdir = path.join(opts.dir, `floor-${pat.key}-${tag}`);
            leftovers.push(fdir);
            scratch.push(fdir);
            step(() => add(`${p}store floor ${pat.key}`, Number(run(floorBin, [img, '0', String(objects * objSize), String(objSize), fdir, '16', String(objects)]).out)));
            facts[`${pat.key} objects`] = `${objects} objects of ${objSize / KiB} KiB (${rec.stats.blocksAdded} blocks and pieces)`;
          }
          // The device's own floor: as many bytes (rounded down to its 4 MiB requests) written by 4
          // dd streams at once, O_DIRECT, fdatasync: what storing them durably takes on this disk.
          const wroteBytes = Math.floor(wrote.reduce((a, b) => a + b, 0) / (4 * MiB)) * 4 * MiB;
          if (wroteBytes > 0) {
            step(() => add(`${p}disk floor ${pat.key}`, diskFloor(img, 0, wroteBytes, opts.dir)));
            facts[`${pat.key} bytes`] = `${(wroteBytes / MiB).toFixed(0)} MiB`;
          }
          step(() => add(`${p}node start ${pat.key}`, timeOf(...nodeAsCli(['-e', '0']))));
          for (const [k, list] of Object.entries(lists)) {
            const f = path.join(opts.dir, `ranges-${k}.json`);
            fs.writeFileSync(f, JSON.stringify(list.map((r) => [r.offset, r.length])));
            step(() => add(`${p}floor ${k} ${pat.key}`, timeOf(...nodeAsCli(['-e', FLOOR, img, f]))));
          }
        }
        for (const d of scratch) hollow(d);
        sync();
      }
    }
  } finally {
    workedIn.close();
  }
  const before = () => {
    sync();
    warm(img);
  };

  // A long chain: an incremental must still cost what changed after many snapshots before it
  // (each pack index lists every packed piece its volume has gathered: session 30 found one
  // such step growing ~1.5 ms a snapshot). The last store of the runs (the image has its bitmap)
  // takes CHAIN more scattered rounds, each snapshotted untimed, then 3 timed ones (fresh state).
  const CHAIN = quick ? 4 : 20;
  const p64 = patterns[0];
  const count = Math.round((data * 0.01) / p64.piece);
  for (let k = 0; k < CHAIN + 3; k++) {
    const src = sourcesFor(p64.piece, count); // new data each round, as a guest writes
    const cmds = pieces(regions, p64.piece, count, 7000 + k).flatMap((r, j) => ['-c', `write -q -s ${src[j]} ${r.offset} ${r.length}`]);
    for (let c = 0; c < cmds.length; c += 2000) run('qemu-io', ['-n', '-f', 'qcow2', ...cmds.slice(c, c + 2000), img]);
    if (k >= CHAIN) before();
    const t0 = process.hrtime.bigint();
    const rec = JSON.parse(run(CLI, ['snapshot', 'create', img, '--store', chainStore, '--json']).out);
    if (k >= CHAIN) add('incr 64k chain', Number(process.hrtime.bigint() - t0) / 1e9);
    if (rec.changeSource !== 'bitmap') throw new Error(`bench qcow2vol: a chain incremental did not use the bitmap: ${rec.changeSource} (${rec.changeSourceReason})`);
    facts.chainIndex = `its pack index lists ${(fs.statSync(path.join(chainStore, 'snapshots', `${rec.id}.packs`)).size / 72).toFixed(0)} pieces`;
  }

  const m = (k: string) => median(t[k]);
  const rows: BenchRow[] = [];
  const row = (metric: string, k: string, peer: string, pk: string, note: string) => {
    if (!t[k] || !t[pk]) return;
    rows.push({ area: AREA, metric: `${metric} (${label})`, disksnap: m(k), peer, peerValue: m(pk), unit: 's', higherIsBetter: false, note });
  };
  for (const state of STATES) {
    const p = prefixOf(state);
    const at = ` [${state}]`;
    row(`full snapshot${at}`, `${p}full`, 'restic backup', `${p}restic full`, 'restic backs up the qcow2 file into a new repository; target: 5x');
    row(`full snapshot, vs storing its objects${at}`, `${p}full`, 'floor: bench/floor.c storing the same objects', `${p}store floor full`, `what the store's writes alone cost on this disk: ${facts['full objects']}, each O_TMPFILE, O_DIRECT write, fdatasync, linkat (16 threads), then a fsync per directory; read from the image in the page cache, not hashed`);
    row(`full snapshot, vs the disk writing its bytes${at}`, `${p}full`, 'floor: 4 dd streams writing as many bytes + node -e 0', `${p}disk floor full+start`, 'the image\'s first bytes (in the page cache) written by 4 dd processes at once into new files, 4 MiB O_DIRECT requests, fdatasync, plus `node -e 0`: the device and the runtime alone; restic / 5 below this cannot be reached on this machine');
    for (const pat of patterns) {
      const what = `incremental, ~1% rewritten in ${pat.what}${at}`;
      row(what, `${p}incr ${pat.key}`, "restic's second backup", `${p}restic incr ${pat.key}`, `changeSource bitmap; ${facts[`${pat.key} scanned`]}; target: 50x`);
      row(`${what}, vs reading and hashing the dirty granules`, `${p}incr ${pat.key}`, 'floor: node pread + SHA-256 of the dirty 64 KiB granules', `${p}floor granules ${pat.key}`, 'the floor is a process (node start-up included) that reads the dirty data at the host offsets qemu-img map gives; target: ratio >= 0.5 (within 2x)');
      row(`${what}, vs storing its objects`, `${p}incr ${pat.key}`, 'floor: bench/floor.c storing the same objects', `${p}store floor ${pat.key}`, `what the store's writes alone cost on this disk: ${facts[`${pat.key} objects`]}, each O_TMPFILE, O_DIRECT write, fdatasync, linkat (16 threads), then a fsync per directory`);
      const dk = `${p}disk floor ${pat.key}`;
      if (t[dk] && t[`${p}node start ${pat.key}`]) t[`${dk}+start`] = sumByRun(t[dk], t[`${p}node start ${pat.key}`]);
      row(`${what}, vs the disk writing its bytes + node -e 0`, `${p}incr ${pat.key}`, 'floor: 4 dd streams writing as many bytes + node -e 0', `${dk}+start`, `the bytes the incremental stored (${facts[`${pat.key} bytes`]}, rounded down to 4 MiB) written by 4 dd processes at once, 4 MiB O_DIRECT requests, fdatasync, plus \`node -e 0\`: the device and the runtime alone, before a byte is read or hashed. A target below it cannot be reached on this machine by a Node process that stores the data durably`);
      row(`${what}, vs the Node runtime starting`, `${p}incr ${pat.key}`, 'node -e 0 (the runtime starting and exiting)', `${p}node start ${pat.key}`, 'what no Node process avoids, measured beside it: part of both floors above');
      row(`${what}, vs reading and hashing the dirty blocks`, `${p}incr ${pat.key}`, 'floor: node pread + SHA-256 of the dirty 512 KiB blocks', `${p}floor blocks ${pat.key}`, 'the same floor over the whole 512 KiB blocks around the dirty data (what an incremental read before pieces)');
    }
  }

  const chain = `incremental, ~1% rewritten in scattered 64 KiB writes, after ${CHAIN + 3} earlier snapshots of the volume [fresh]`;
  row(chain, 'incr 64k chain', "restic's second backup", 'restic incr 64k', `the median of the ${CHAIN + 4}th to ${CHAIN + 6}th snapshots of one volume; ${facts.chainIndex}; target: 50x`);
  row(`${chain}, vs the first incremental`, 'incr 64k chain', 'the same incremental as the 2nd snapshot (above)', 'incr 64k', 'whether an incremental still costs what changed, not what the chain has gathered: ratio 1 when it does');

  // Memory: a 1 TiB sparse qcow2 volume with 4 MiB of data; full then incremental.
  const big = path.join(opts.dir, 'sparse-1t.qcow2');
  const [source] = sourcesFor(MiB, 1);
  run('qemu-img', ['create', '-q', '-f', 'qcow2', big, '1T']);
  run('qemu-io', ['-f', 'qcow2', ...[0, 2 ** 38, 2 ** 39, 2 ** 40 - 4 * MiB].flatMap((at) => ['-c', `write -q -s ${source} ${at} 1M`]), big]);
  const bigStore = path.join(opts.dir, 'store-1t');
  const full = peakRss(big, bigStore);
  run('qemu-io', ['-f', 'qcow2', '-c', `write -q -s ${source} ${2 ** 38 + 4096} 8k`, big]);
  const incr = peakRss(big, bigStore);
  for (const [metric, r] of [
    ['peak RSS, full snapshot of a 1 TiB sparse qcow2 volume holding 4 MiB', full],
    ['peak RSS, incremental snapshot of it (bitmap)', incr],
  ] as const) {
    rows.push({ area: AREA, metric, disksnap: r.rssMiB, peer: 'budget of the issue', peerValue: 256, unit: 'MiB', higherIsBetter: false, note: `took ${r.seconds.toFixed(2)} s` });
  }
  for (const d of [...leftovers, bigStore]) fs.rmSync(d, { recursive: true, force: true });
  return rows;
}
