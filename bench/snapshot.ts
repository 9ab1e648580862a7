/**
 * Storage snapshots beside restic and cp, in one run, on the same files:
 *
 *   a sparse raw image (4 GiB; quick: 256 MiB) holding random data (1 GiB; quick: 64 MiB),
 *   then about 1% of that data rewritten in 64 KiB pieces at random places:
 *     full snapshot         disksnap snapshot create    vs restic backup (new repository)
 *     unchanged snapshot    disksnap snapshot create    vs restic backup (second, nothing changed)
 *     incremental snapshot  disksnap snapshot create    vs restic backup (third)
 *     restore to a new file disksnap snapshot restore   vs restic restore
 *   each also beside `cp --sparse=always` of the same image (the copy limit);
 *   the same three with the volume encrypted (AES-256-GCM objects, HMAC-SHA-256 digests),
 *     right after the unencrypted ones on the same image: throughput of each, side by side
 *     (issue 5: encryption may cost at most 25%);
 *   and peak RSS of snapshots of a 1 TiB sparse volume holding a few MiB (budget: 256 MiB).
 *
 * Restore has a floor on this disk that no restore escapes: it reads 1 GiB of objects (not in
 * the page cache: written with O_DIRECT) and writes 1 GiB durably, and this VM's disk
 * serves reads and writes from one budget. The "floor" row measures it in the same runs: dd
 * copying the image's 1 GiB of data to a new file, O_DIRECT on both sides, then fdatasync. Where the filesystem shares extents, a restore from a plain store clones the
 * objects instead of writing them: the "on xfs" rows repeat full snapshot and restore, both
 * tools, on a loop-mounted xfs (as root, with mkfs.xfs installed).
 *
 * Each of full, incremental and restore is measured twice per run (issue 18): on a "fresh
 * machine" (a `sync` before each operation) and on a "worked-in machine" (bench/workedin.ts
 * before each operation: page cache full of other data, 1 GiB written and deleted, a background
 * reader/writer beside it), each beside restic and beside its floor measured the same way in
 * the same run: bench/floor.c for snapshots (the volume read through the page cache, the same
 * objects stored with O_TMPFILE, O_DIRECT write, fdatasync, linkat on 16 threads, no hashing)
 * and the dd copy for restores. disksnap beats both (it issues fewer syncs than floor.c's 16
 * threads, and reads and writes in parallel where the dd copy does one then the other), so each
 * state also has the device's own floor: the same 1 GiB written by 4 dd streams at once (O_DIRECT,
 * 4 MiB requests, fdatasync; for a restore, read uncached too), with `node -e 0` added: a ratio
 * against restic that needs less time than that cannot be reached on this machine by any
 * Node process. Encrypted, copy-limit, xfs and memory rows: fresh only.
 *
 * Both tools run as processes through their CLIs (disksnap as its executable, whose shell lines
 * start node without NODE_EXTRA_CA_CERTS, and every `node -e 0` of a floor started the same
 * way: bench/util.ts nodeAsCli), from a warm page cache (the image is read once before each
 * operation), so neither pays for the other's dirty pages. disksnap
 * fsyncs every object and its restored image before it reports success; restic 0.14 fsyncs
 * the pack files it writes but not the files it restores, and cp fsyncs nothing — the
 * "data on disk" rows add a `sync` to each so that all three finish with the bytes durable.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { BenchOptions, BenchRow } from './types';
import { CLI, nodeAsCli, GiB, MiB, buildFloor, diskFloor, fillRandom, hasCommand, median, run, sumByRun, warm, rewrite } from './util';
import { WorkedIn } from './workedin';

const LIB = path.resolve(__dirname, '..', 'src', 'storage', 'index.js');
const AREA = 'storage snapshot';

function seconds(fn: () => void): number {
  const t0 = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

const GNU_TIME = fs.existsSync('/usr/bin/time') ? '/usr/bin/time' : undefined;

/**
 * Runs a command; returns wall seconds and, where GNU time is installed, the CPU seconds
 * (user + sys) of the command and its children: a figure that a busy machine distorts less.
 */
function measure(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}): { wall: number; cpu: number } {
  const argv = GNU_TIME ? [GNU_TIME, '-f', 'BENCHTIME %U %S', cmd, ...args] : [cmd, ...args];
  const t0 = process.hrtime.bigint();
  const r = spawnSync(argv[0], argv.slice(1), { env: { ...process.env, ...env }, maxBuffer: 1 << 28 });
  const wall = Number(process.hrtime.bigint() - t0) / 1e9;
  const stderr = r.stderr?.toString() ?? '';
  if (r.error) throw r.error;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${stderr.trim()}`);
  const m = /BENCHTIME ([\d.]+) ([\d.]+)\s*$/.exec(stderr);
  return { wall, cpu: m ? Number(m[1]) + Number(m[2]) : NaN };
}

function sync(): void {
  spawnSync('sync');
}

function disksnap(args: string[]): string {
  return run(CLI, args).out;
}

/** Peak RSS (MiB) of a fresh process that snapshots `volume` into `store` through the library. */
function peakRss(volume: string, store: string): { rssMiB: number; seconds: number } {
  const script = `
    const s = require(${JSON.stringify(LIB)});
    const t0 = Date.now();
    s.createSnapshot(${JSON.stringify(volume)}, { store: ${JSON.stringify(store)} }).then(() => {
      // VmHWM of this process's own memory: getrusage's maxRSS survives execve on Linux and
      // so reports the bench process's RSS at the fork when that was larger (it was: 100 MiB).
      const hwm = /VmHWM:\\s+(\\d+) kB/.exec(require('fs').readFileSync('/proc/self/status', 'utf8'));
      process.stdout.write(JSON.stringify({ rss: hwm ? Number(hwm[1]) : process.resourceUsage().maxRSS, ms: Date.now() - t0 }));
    }, (e) => { console.error(e.message); process.exit(1); });`;
  const r = JSON.parse(run(process.execPath, ['-e', script]).out);
  return { rssMiB: r.rss / 1024, seconds: r.ms / 1000 };
}

export async function benchSnapshot(opts: BenchOptions): Promise<BenchRow[]> {
  const quick = !!opts.quick;
  const runs = opts.runs ?? (quick ? 1 : 3);
  const size = quick ? 256 * MiB : 4 * GiB;
  const data = quick ? 64 * MiB : 1 * GiB;
  const dataOffset = size / 8;
  const label = `${quick ? '256 MiB' : '4 GiB'} sparse image, ${quick ? '64 MiB' : '1 GiB'} of data`;
  const haveRestic = hasCommand('restic');
  const resticEnv = { RESTIC_PASSWORD: 'disksnap-bench', RESTIC_CACHE_DIR: path.join(opts.dir, 'restic-cache') };
  const restic = (args: string[]) => run('restic', ['--quiet', ...args], { env: resticEnv });

  const img = path.join(opts.dir, 'vol.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, size);
  fillRandom(img, dataOffset, data);
  const keyFile = path.join(opts.dir, 'bench.key');
  fillRandom(keyFile, 0, 32);
  fs.chmodSync(keyFile, 0o600); // a key file others can read is refused

  const t: Record<string, number[]> = {};
  const add = (k: string, v: number) => (t[k] ??= []).push(v);
  /** Records wall and CPU seconds of one command under `k`. */
  const time = (k: string, cmd: string, args: string[], env?: NodeJS.ProcessEnv) => {
    const r = measure(cmd, args, env);
    add(k, r.wall);
    add(`${k} cpu`, r.cpu);
    return r.wall;
  };
  const ds = (k: string, args: string[]) => time(k, CLI, args);
  const rs = (k: string, args: string[]) => time(k, 'restic', ['--quiet', ...args], resticEnv);

  // Stores and repositories stay until every run is done: this VM's root ext4 has no journal,
  // and there the kernel skips inodes freed in the last minute when it allocates new ones, one
  // by one (ext4 recently_deleted(); perf: a third of the kernel time of a full snapshot taken
  // right after removing the previous run's 2048-object store, 1.17-1.35 s instead of
  // 0.85-0.88 s). Removing them between runs would measure that, not the snapshot.
  const leftovers: string[] = [];
  const floorBin = buildFloor(opts.dir, 'snapshot');
  const workedIn = new WorkedIn(opts.dir, quick);
  /** The store's block objects: how many, and their bytes. */
  const objectsIn = (store: string) => {
    let n = 0;
    let bytes = 0;
    const b = path.join(store, 'blocks');
    if (fs.existsSync(b)) {
      for (const d of fs.readdirSync(b)) {
        for (const f of fs.readdirSync(path.join(b, d))) {
          n++;
          bytes += fs.statSync(path.join(b, d, f)).size;
        }
      }
    }
    return { n, bytes };
  };
  try {
    for (let i = 0; i < runs; i++) {
      for (const state of ['fresh', 'worked-in'] as const) {
        const fresh = state === 'fresh';
        const p = fresh ? '' : 'w '; // key prefix of the worked-in figures
        /** Before each measured operation: a sync on a fresh machine, the worked-in state otherwise; then the image warm. */
        const before = (warmImage = true) => {
          if (fresh) sync();
          else workedIn.prepare();
          if (warmImage) warm(img);
        };
        const after = () => workedIn.stop();
        const step = (fn: () => void, warmImage = true) => {
          before(warmImage);
          try {
            fn();
          } finally {
            after();
          }
        };
        const store = path.join(opts.dir, `store-${p ? 'w' : ''}${i}`);
        const repo = path.join(opts.dir, `restic-${p ? 'w' : ''}${i}`);
        if (haveRestic) restic(['init', '-r', repo]);

        if (fresh) {
          // cp: the copy limit, and cp + sync: the copy limit with the bytes on disk.
          const copy = path.join(opts.dir, 'copy.img');
          sync();
          warm(img);
          const cp = time('cp', 'cp', ['--sparse=always', img, copy]);
          add('cp+sync', cp + seconds(sync));
          fs.rmSync(copy);
        }

        // Full snapshot, unencrypted and (fresh only) encrypted (the order alternates between runs).
        const encStore = path.join(opts.dir, `store-enc-${i}`);
        if (fresh) disksnap(['volume', 'register', img, '--store', encStore, '--encrypted', '--key-file', keyFile]);
        const both = (k: string, plainArgs: string[], encArgs: string[]) => {
          for (const enc of fresh ? (i % 2 ? [true, false] : [false, true]) : [false]) step(() => ds(enc ? `${k} enc` : p + k, enc ? encArgs : plainArgs));
        };
        both('full', ['snapshot', 'create', img, '--store', store], ['snapshot', 'create', img, '--store', encStore, '--key-file', keyFile]);
        if (haveRestic) step(() => rs(`${p}restic full`, ['-r', repo, 'backup', img]));
        const floorDir = (what: string) => path.join(opts.dir, `floor-${what}-${p ? 'w' : ''}${i}`);
        // writeSize: the bytes of each stored object, where they are not whole blocks (pieces)
        const objectFloor = (k: string, writes: number, writeSize = 512 * 1024) => {
          if (!floorBin) return;
          const dir = floorDir(k);
          leftovers.push(dir);
          step(() => add(`${p}${k} floor`, Number(run(floorBin, [img, String(dataOffset), String(data), String(512 * 1024), dir, '16', String(writes), String(writeSize)]).out)));
        };
        const afterFull = objectsIn(store);
        const fullObjects = afterFull.n;
        objectFloor('full', fullObjects);
        // The device's own floor for the same bytes (4 dd streams, O_DIRECT, fdatasync) and the
        // runtime starting: what no snapshot by a Node process escapes.
        step(() => add(`${p}disk write floor`, diskFloor(img, dataOffset, data, opts.dir)));
        add(`${p}node start`, run(...nodeAsCli(['-e', '0'])).seconds);

        // Nothing written since: both tools see it from the file's identity and times.
        step(() => ds(`${p}unchanged`, ['snapshot', 'create', img, '--store', store]));
        if (haveRestic) step(() => rs(`${p}restic unchanged`, ['-r', repo, 'backup', img]));

        // About 1% rewritten, then the incremental snapshot.
        rewrite(img, dataOffset, data, 0.01, i + 1 + (fresh ? 0 : 100));
        both('incremental', ['snapshot', 'create', img, '--store', store], ['snapshot', 'create', img, '--store', encStore, '--key-file', keyFile]);
        if (haveRestic) step(() => rs(`${p}restic incremental`, ['-r', repo, 'backup', img]));
        const now = objectsIn(store);
        const added = now.n - fullObjects;
        add(`${p}incremental objects`, added);
        // since granule change tags most of them are 64 KiB pieces: the floor stores objects
        // of their mean size (whole 4 KiB pages, for O_DIRECT), not 512 KiB blocks
        const mean = added ? (now.bytes - afterFull.bytes) / added : 512 * 1024;
        add(`${p}incremental object bytes`, mean);
        objectFloor('incremental', added, Math.max(4096, Math.round(mean / 4096) * 4096));

        // Restore the latest snapshot to a new file.
        const latest = JSON.parse(disksnap(['snapshot', 'list', '--store', store, '--json'])).snapshots.pop().id as string;
        const out = path.join(opts.dir, 'restored.img');
        const latestEnc = fresh ? (JSON.parse(disksnap(['snapshot', 'list', '--store', encStore, '--json'])).snapshots.pop().id as string) : '';
        for (const enc of fresh ? (i % 2 ? [true, false] : [false, true]) : [false]) {
          if (enc) step(() => ds('restore enc', ['snapshot', 'restore', latestEnc, '--to', out, '--store', encStore, '--key-file', keyFile]), false);
          else step(() => {
            const w = ds(`${p}restore`, ['snapshot', 'restore', latest, '--to', out, '--store', store]);
            if (fresh) add('restore+sync', w + seconds(sync));
          }, false);
          fs.rmSync(out);
          sync(); // the freed extents, before the other side runs
        }
        if (fresh) leftovers.push(encStore);
        if (haveRestic) {
          const target = path.join(opts.dir, 'restic-out');
          step(() => {
            const w = rs(`${p}restic restore`, ['-r', repo, 'restore', 'latest', '--target', target]);
            if (fresh) add('restic restore+sync', w + seconds(sync));
          }, false);
          fs.rmSync(target, { recursive: true, force: true });
          leftovers.push(repo);
        }
        leftovers.push(store);

        // The floor of a restore: the image's 1 GiB of data (on disk, not read from the page
        // cache) copied by dd into a new file, O_DIRECT on both sides, then fdatasync. Last in
        // the run: the freed extents of its output are discarded (the root is mounted with
        // -o discard) while nothing else is measured.
        const floorOut = path.join(opts.dir, 'floor.img');
        const mib16 = 16 * MiB;
        step(() => time(`${p}restore floor`, 'dd', [`if=${img}`, `of=${floorOut}`, `bs=${mib16}`, `skip=${dataOffset / mib16}`, `count=${data / mib16}`, 'iflag=direct', 'oflag=direct', 'conv=fdatasync', 'status=none']), false);
        fs.rmSync(floorOut);
        sync();
        // the same copy by 4 dd streams at once: the device's best, reads and writes uncached
        step(() => add(`${p}restore disk floor`, diskFloor(img, dataOffset, data, opts.dir, 4, true)), false);
        sync();
      }
    }
  } finally {
    workedIn.close();
  }
  for (const d of leftovers) fs.rmSync(d, { recursive: true, force: true });

  const m = (k: string) => median(t[k]);
  const rows: BenchRow[] = [];
  const cpNote = (k: string) => `cp --sparse=always of the same image: ${m(k).toFixed(2)} s`;
  const floorRow = (metric: string, k: string, fk: string, note: string, peer = 'floor') => {
    if (!t[fk] || !t[k]) return;
    rows.push({ area: AREA, metric, disksnap: m(k), peer, peerValue: m(fk), unit: 's', higherIsBetter: false, note });
  };
  /** `fk` + `node start`, run by run: a device floor with the runtime's start beside it. */
  const withStart = (fk: string, p: string) => {
    if (t[fk] && t[`${p}node start`]) t[`${fk}+start`] = sumByRun(t[fk], t[`${p}node start`]);
    return `${fk}+start`;
  };
  const pair = (metric: string, k: string, rk: string, note: string) => {
    if (!haveRestic) return;
    rows.push({ area: AREA, metric: `${metric} (${label})`, disksnap: m(k), peer: rk.replace(/\+sync$/, ' + sync'), peerValue: m(rk), unit: 's', higherIsBetter: false, note });
    if (t[`${k} cpu`] && !Number.isNaN(m(`${k} cpu`)) && !Number.isNaN(m(`${rk} cpu`))) {
      rows.push({ area: AREA, metric: `${metric}, CPU time user+sys (${label})`, disksnap: m(`${k} cpu`), peer: rk, peerValue: m(`${rk} cpu`), unit: 'cpu s', higherIsBetter: false, note: 'GNU time; less distorted by other load on the machine than wall time' });
    }
  };
  for (const [state, p] of [['fresh machine', ''], ['worked-in machine', 'w ']] as const) {
    const at = `${state}, ${label}`;
    pair(`full snapshot [${state}]`, `${p}full`, `${p}restic full`, `peer: restic backup into a new repository${p ? '; before each operation: bench/workedin.ts' : `; ${cpNote('cp')}`}`);
    floorRow(`full snapshot vs its floor [${at}]`, `${p}full`, `${p}full floor`, 'bench/floor.c: the volume read through the page cache and every block stored as an object (O_TMPFILE, O_DIRECT write, fdatasync, linkat), 16 threads; no hashing');
    floorRow(`full snapshot vs the disk's write floor + node -e 0 [${at}]`, `${p}full`, withStart(`${p}disk write floor`, p), '4 dd streams writing the same 1 GiB (read from the page cache) into new files, 4 MiB O_DIRECT requests, fdatasync, plus `node -e 0`: the device and the runtime alone', 'disk write floor + node -e 0');
    pair(`incremental snapshot, nothing changed [${state}]`, `${p}unchanged`, `${p}restic unchanged`, "peer: restic's backup of the unchanged file (restic too skips reading a file whose size, times and inode are its parent's)");
    pair(`incremental snapshot, ~1% rewritten [${state}]`, `${p}incremental`, `${p}restic incremental`, "peer: restic's second backup");
    floorRow(`incremental snapshot vs its floor [${at}]`, `${p}incremental`, `${p}incremental floor`, `bench/floor.c: the volume read through the page cache and the ${m(`${p}incremental objects`)} objects the incremental added (mean ${Math.round(m(`${p}incremental object bytes`) / 1024)} KiB) stored the same way`);
    floorRow(`incremental snapshot vs its floor + node -e 0 [${at}]`, `${p}incremental`, withStart(`${p}incremental floor`, p), 'the same floor plus `node -e 0` started as the executable starts node: what any Node command adds before its first read', 'floor + node -e 0');
    pair(`restore to a new file [${state}]`, `${p}restore`, `${p}restic restore`, 'disksnap reads objects it wrote with O_DIRECT (not cached) and fsyncs the image; restic reads cached packs and does not fsync');
    floorRow(`restore to a new file vs the disk's floor [${at}]`, `${p}restore`, `${p}restore floor`, 'dd copy of the same data, O_DIRECT both ways + fdatasync: a restore reads the objects (not cached) and writes the image durably; dd does only that, sequentially, in 16 MiB requests');
    floorRow(`restore to a new file vs the disk's copy floor + node -e 0 [${at}]`, `${p}restore`, withStart(`${p}restore disk floor`, p), 'the same copy by 4 dd streams at once (4 MiB requests, O_DIRECT both ways, fdatasync), plus `node -e 0`', 'disk copy floor + node -e 0');
  }
  if (haveRestic) {
    rows.push({ area: AREA, metric: `restore to a new file, data on disk (${label})`, disksnap: m('restore+sync'), peer: 'restic restore + sync', peerValue: m('restic restore+sync'), unit: 's', higherIsBetter: false, note: `each followed by sync; cp --sparse=always + sync: ${m('cp+sync').toFixed(2)} s` });
  }
  if (!haveRestic) {
    rows.push({ area: AREA, metric: `full snapshot (${label})`, disksnap: m('full'), peer: 'restic (not installed)', peerValue: NaN, unit: 's', higherIsBetter: false, note: 'install restic for the side-by-side figures' });
  }
  for (const [metric, k] of [
    ['full snapshot', 'full'],
    ['incremental snapshot, ~1% rewritten', 'incremental'],
    ['restore to a new file', 'restore'],
  ] as const) {
    rows.push({ area: AREA, metric: `${metric} vs the copy limit (${label})`, disksnap: m(k), peer: 'cp --sparse=always', peerValue: m('cp'), unit: 's', higherIsBetter: false, note: 'cp copies the whole image once, into the page cache, without fsync' });
  }

  // Encryption beside no encryption, same image, same run: throughput of the data (MB/s).
  for (const [metric, k, bytes] of [
    ['full snapshot', 'full', data],
    ['incremental snapshot, ~1% rewritten (scans all data)', 'incremental', data],
    ['restore to a new file', 'restore', data],
  ] as const) {
    rows.push({
      area: AREA,
      metric: `${metric}, encrypted vs unencrypted (${label})`,
      disksnap: bytes / 1e6 / m(`${k} enc`),
      peer: 'disksnap unencrypted',
      peerValue: bytes / 1e6 / m(k),
      unit: 'MB/s',
      higherIsBetter: true,
      note: `AES-256-GCM objects + HMAC-SHA-256 digests; medians ${m(`${k} enc`).toFixed(2)} s vs ${m(k).toFixed(2)} s, CPU ${m(`${k} enc cpu`).toFixed(2)} vs ${m(`${k} cpu`).toFixed(2)} s; budget: ratio >= 0.75`,
    });
  }

  if (haveRestic && process.getuid?.() === 0 && hasCommand('mkfs.xfs')) rows.push(...onXfs(opts, img, runs, label, resticEnv));

  // Memory: a 1 TiB sparse volume with a few MiB of data; full then incremental.
  const big = path.join(opts.dir, 'sparse-1t.img');
  fs.writeFileSync(big, '');
  fs.truncateSync(big, 2 ** 40);
  for (const at of [0, 2 ** 38, 2 ** 39 + 12345, 2 ** 40 - 4 * MiB]) fillRandom(big, at, MiB);
  const bigStore = path.join(opts.dir, 'store-1t');
  const full = peakRss(big, bigStore);
  fillRandom(big, 2 ** 38 + 4096, 8192);
  const incr = peakRss(big, bigStore);
  const manifestBytes = fs
    .readdirSync(path.join(bigStore, 'snapshots'))
    .filter((f) => f.endsWith('.map'))
    .map((f) => fs.statSync(path.join(bigStore, 'snapshots', f)).size);
  rows.push({
    area: AREA,
    metric: 'peak RSS, full snapshot of a 1 TiB sparse volume holding 4 MiB',
    disksnap: full.rssMiB,
    peer: 'budget of the issue',
    peerValue: 256,
    unit: 'MiB',
    higherIsBetter: false,
    note: `took ${full.seconds.toFixed(2)} s; manifests ${manifestBytes.join(', ')} bytes (a dense one would be 64 MiB)`,
  });
  rows.push({
    area: AREA,
    metric: 'peak RSS, incremental snapshot of the same 1 TiB volume',
    disksnap: incr.rssMiB,
    peer: 'budget of the issue',
    peerValue: 256,
    unit: 'MiB',
    higherIsBetter: false,
    note: `took ${incr.seconds.toFixed(2)} s`,
  });
  rows.push(history(opts.dir, quick ? 50 : 300, runs));
  return rows;
}

/**
 * A store that has been working holds many snapshots: `snapshot create` of a small volume
 * into a store already holding `n` snapshots of it (made through the library, 1 MiB changed
 * between them), beside the same command into a store holding only the runs' own. Ratio
 * near 1: a snapshot costs the same whatever the store's history.
 */
function history(dir: string, n: number, runs: number): BenchRow {
  const vol = path.join(dir, 'history.img');
  fs.writeFileSync(vol, '');
  fs.truncateSync(vol, 64 * MiB);
  const stores = { one: path.join(dir, 'store-history-1'), many: path.join(dir, `store-history-${n}`) };
  const script = `
    const s = require(${JSON.stringify(LIB)});
    (async () => { for (let i = 0; i < ${n - 1}; i++) await s.createSnapshot(${JSON.stringify(vol)}, { store: ${JSON.stringify(stores.many)} }); })()
      .catch((e) => { console.error(e.message); process.exit(1); });`;
  fillRandom(vol, 0, MiB);
  run(process.execPath, ['-e', script]);
  const times: Record<'one' | 'many', number[]> = { one: [], many: [] };
  disksnap(['snapshot', 'create', vol, '--store', stores.one, '-q']);
  for (let i = 0; i < runs; i++) {
    for (const k of ['one', 'many'] as const) {
      fillRandom(vol, (i % 64) * MiB, MiB);
      sync();
      times[k].push(measure(CLI, ['snapshot', 'create', vol, '--store', stores[k], '-q']).wall);
    }
  }
  for (const d of [...Object.values(stores), vol]) fs.rmSync(d, { recursive: true, force: true });
  return {
    area: AREA,
    metric: `snapshot create of a 64 MiB volume (1 MiB rewritten), store holding ${n} snapshots of it`,
    disksnap: median(times.many),
    peer: `the same, store holding ${runs > 1 ? `1-${runs}` : '1'}`,
    peerValue: median(times.one),
    unit: 's',
    higherIsBetter: false,
    note: 'each create lists the snapshot records (the parent, the clones to keep); the directory store stats and reads them synchronously (before: one thread-pool trip each, in turn; a store of ~330 by hand: 0.58 s -> 0.28 s)',
  };
}

/**
 * Full snapshot and restore, both tools, with image, store, repository and restored files on a
 * loop-mounted xfs with reflinks: a restore from a plain store clones the objects' extents
 * into the image (after verifying them) instead of writing 1 GiB.
 */
function onXfs(opts: BenchOptions, img: string, runs: number, label: string, resticEnv: NodeJS.ProcessEnv): BenchRow[] {
  const size = fs.statSync(img).size;
  const xfsImg = path.join(opts.dir, 'xfs.img');
  const mnt = path.join(opts.dir, 'xfs');
  fs.mkdirSync(mnt, { recursive: true });
  fs.writeFileSync(xfsImg, '');
  fs.truncateSync(xfsImg, 8 * GiB);
  run('mkfs.xfs', ['-q', '-m', 'reflink=1', xfsImg]);
  run('mount', ['-o', 'loop', xfsImg, mnt]);
  const t: Record<string, number[]> = {};
  const add = (k: string, v: number) => (t[k] ??= []).push(v);
  try {
    const vol = path.join(mnt, 'vol.img');
    spawnSync('cp', ['--sparse=always', img, vol]);
    if (fs.statSync(vol).size !== size) throw new Error('copying the image onto xfs failed');
    for (let i = 0; i < runs; i++) {
      const store = path.join(mnt, `store-${i}`);
      const repo = path.join(mnt, `restic-${i}`);
      const out = path.join(mnt, 'restored.img');
      const target = path.join(mnt, 'restic-out');
      run('restic', ['--quiet', 'init', '-r', repo], { env: resticEnv });
      sync();
      warm(vol);
      add('full', measure(CLI, ['snapshot', 'create', vol, '--store', store]).wall);
      sync();
      warm(vol);
      add('restic full', measure('restic', ['--quiet', '-r', repo, 'backup', vol], resticEnv).wall);
      const latest = JSON.parse(disksnap(['snapshot', 'list', '--store', store, '--json'])).snapshots.pop().id as string;
      sync();
      add('restore', measure(CLI, ['snapshot', 'restore', latest, '--to', out, '--store', store]).wall);
      fs.rmSync(out);
      sync();
      add('restic restore', measure('restic', ['--quiet', '-r', repo, 'restore', 'latest', '--target', target], resticEnv).wall);
      fs.rmSync(target, { recursive: true, force: true });
      fs.rmSync(repo, { recursive: true, force: true });
      fs.rmSync(store, { recursive: true, force: true });
      sync();
    }
  } finally {
    run('umount', [mnt]);
    fs.rmSync(xfsImg, { force: true });
  }
  const m = (k: string) => median(t[k]);
  const where = `on xfs with reflinks, loop-mounted (${label})`;
  return [
    { area: AREA, metric: `full snapshot, ${where}`, disksnap: m('full'), peer: 'restic full', peerValue: m('restic full'), unit: 's', higherIsBetter: false, note: 'image, store and repository on the same xfs' },
    { area: AREA, metric: `restore to a new file, ${where}`, disksnap: m('restore'), peer: 'restic restore', peerValue: m('restic restore'), unit: 's', higherIsBetter: false, note: 'disksnap verifies every object, then clones it into the image (FICLONERANGE) and fsyncs; restic copies and does not fsync' },
  ];
}
