/**
 * Storage snapshots to an S3 store (the one-node Ceph RADOS Gateway of .ci/ceph.sh), beside
 * the gateway's own floor and restic on the same server, in one run:
 *
 *   full snapshot      disksnap snapshot create --store s3://B   vs  a plain parallel PUT of
 *                                                                    the same 512 KiB objects
 *                                                                    (32 in flight, from memory)
 *                                                                vs  restic -r s3:... backup
 *   incremental (~1%)  disksnap snapshot create                  vs  restic's second backup
 *                                                                vs  a parallel PUT of as many
 *                                                                    objects as it added (and
 *                                                                    that + `node -e 0`)
 *   restore            disksnap snapshot restore --to FILE       vs  a plain parallel GET of
 *                                                                    the same objects (to memory)
 *                                                                vs  the same GETs written into
 *                                                                    a new file, + fdatasync
 *                                                                vs  restic restore
 *
 * The image: 4 GiB sparse with 1 GiB of random data (quick: 256 MiB with 64 MiB), so 2048
 * objects of 512 KiB. Each run uses fresh buckets; figures are medians of the runs.
 * Needs the Ceph packages (.ci/run installs them); the cluster is started if not running.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { BenchOptions, BenchRow } from './types';
import { CLI, nodeAsCli, GiB, MiB, fillRandom, hasCommand, median, run, sumByRun, warm, rewrite } from './util';
import { S3Backend } from '../src/storage/store/s3';

/** A store's block objects (packs included) and their sizes, by key. */
async function objectSizes(url: string): Promise<Map<string, number>> {
  const b = new S3Backend(url);
  const out = new Map<string, number>();
  try {
    for await (const o of b.list('blocks/')) out.set(o.key, o.size);
  } finally {
    b.destroy();
  }
  return out;
}

const CEPH = path.resolve(__dirname, '..', '..', '.ci', 'ceph.sh');
const AREA = 'S3 store (Ceph RGW)';
const BLOCK = 512 * 1024;

function seconds(fn: () => void): number {
  const t0 = process.hrtime.bigint();
  fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

async function secondsAsync(fn: () => Promise<unknown>): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

function startCeph(): Record<string, string> {
  const r = spawnSync('bash', [CEPH, 'start'], { encoding: 'utf8', timeout: 300_000 });
  if (r.status !== 0) throw new Error(`.ci/ceph.sh start failed: ${r.stderr.trim()}`);
  const env: Record<string, string> = {};
  for (const line of r.stdout.split('\n')) {
    const m = /^([A-Z0-9_]+)=(.*)$/.exec(line.trim());
    if (m) env[m[1]] = m[2];
  }
  return env;
}

/** The image's data region as 512 KiB objects, in memory. */
function readBlocks(file: string, offset: number, bytes: number): Buffer[] {
  const fd = fs.openSync(file, 'r');
  try {
    const out: Buffer[] = [];
    for (let at = 0; at < bytes; at += BLOCK) {
      const b = Buffer.allocUnsafe(BLOCK);
      fs.readSync(fd, b, 0, BLOCK, offset + at);
      out.push(b);
    }
    return out;
  } finally {
    fs.closeSync(fd);
  }
}

const CLK_TCK = Number(spawnSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).stdout.trim()) || 100;

/** utime + stime (s) of a /proc/PID/stat line; `children`: cutime + cstime (waited-for children) instead. */
function statCpu(stat: string, children = false): number {
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' '); // f[0] is field 3 (state)
  return children ? (Number(f[13]) + Number(f[14])) / CLK_TCK : (Number(f[11]) + Number(f[12])) / CLK_TCK;
}

/** CPU seconds so far of the commands this process ran and waited for. */
function commandsCpu(): number {
  return statCpu(fs.readFileSync('/proc/self/stat', 'utf8'), true);
}

/** CPU seconds so far of the cluster's daemons (radosgw, ceph-osd, ceph-mon): the gateway's side of a run. */
function gatewayCpu(): number {
  let sum = 0;
  for (const pid of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    try {
      if (!['radosgw', 'ceph-osd', 'ceph-mon'].includes(fs.readFileSync(`/proc/${pid}/comm`, 'utf8').trim())) continue;
      sum += statCpu(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'));
    } catch {
      // gone meanwhile
    }
  }
  return sum;
}

async function parallel<T>(items: T[], n: number, fn: (x: T, i: number) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: n }, async () => {
      while (next < items.length) {
        const i = next++;
        await fn(items[i], i);
      }
    }),
  );
}

export async function benchS3(opts: BenchOptions): Promise<BenchRow[]> {
  if (!hasCommand('radosgw') || !hasCommand('ceph-mon')) {
    process.stderr.write('bench: s3: skipped, the Ceph packages are not installed (ceph-mon ceph-osd radosgw ceph-common; .ci/run installs them)\n');
    return [];
  }
  const env = startCeph();
  Object.assign(process.env, { AWS_ENDPOINT_URL: env.AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID: env.AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: env.AWS_SECRET_ACCESS_KEY, AWS_REGION: env.AWS_REGION });
  const quick = !!opts.quick;
  const runs = opts.runs ?? (quick ? 1 : 3);
  const size = quick ? 256 * MiB : 4 * GiB;
  const data = quick ? 64 * MiB : 1 * GiB;
  const dataOffset = size / 8;
  const label = `${quick ? '256 MiB' : '4 GiB'} sparse image, ${quick ? '64 MiB' : '1 GiB'} of data`;
  const haveRestic = hasCommand('restic');
  const admin = new S3Client({ forcePathStyle: true });
  const bucket = async (label: string) => {
    const name = `bench-${label}-${randomBytes(4).toString('hex')}`;
    await admin.send(new CreateBucketCommand({ Bucket: name }));
    return name;
  };
  const port = new URL(env.AWS_ENDPOINT_URL).port;
  const resticEnv = { ...env, RESTIC_PASSWORD: 'disksnap-bench', RESTIC_CACHE_DIR: path.join(opts.dir, 'restic-cache'), AWS_DEFAULT_REGION: env.AWS_REGION };
  const restic = (repo: string, args: string[]) => run('restic', ['--quiet', '-r', `s3:http://127.0.0.1:${port}/${repo}`, ...args], { env: resticEnv }).seconds;
  const ds = (args: string[]) => run(CLI, args, { env }).seconds;

  const img = path.join(opts.dir, 'vol.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, size);
  fillRandom(img, dataOffset, data);

  const t: Record<string, number[]> = {};
  const add = (k: string, v: number) => (t[k] ??= []).push(v);
  for (let i = 0; i < runs; i++) {
    // The floor: the data's 512 KiB objects PUT from memory, 32 in flight, over the same client.
    const blocks = readBlocks(img, dataOffset, data);
    const floorBucket = await bucket('floor');
    const floor = new S3Backend(`s3://${floorBucket}`, { maxInFlight: 32 });
    add('put floor', await secondsAsync(() => parallel(blocks, 32, (b, k) => floor.put(`blocks/${k}`, b))));
    add('get floor', await secondsAsync(() => parallel(blocks, 32, async (_b, k) => void (await floor.get(`blocks/${k}`, Buffer.allocUnsafe(BLOCK))))));
    // A restore's floor: the same GETs, each object written at its place in a new sparse file
    // of the volume's size, then fdatasync (the restore writes its file durably too).
    const floorOut = path.join(opts.dir, 'floor-restored.img');
    add(
      'get+write floor',
      await secondsAsync(async () => {
        const fh = await fs.promises.open(floorOut, 'w');
        try {
          await fh.truncate(size);
          await parallel(blocks, 32, async (_b, k) => {
            const got = await floor.get(`blocks/${k}`, Buffer.allocUnsafe(BLOCK));
            await fh.write(got, 0, got.length, dataOffset + k * BLOCK);
          });
          await fh.datasync();
        } finally {
          await fh.close();
        }
      }),
    );
    fs.rmSync(floorOut);
    blocks.length = 0;

    const store = `s3://${await bucket('ds')}/store`;
    warm(img);
    add('full', ds(['snapshot', 'create', img, '--store', store]));
    const repo = `bench-restic-${randomBytes(4).toString('hex')}`; // restic init makes the bucket
    if (haveRestic) {
      restic(repo, ['init']);
      warm(img);
      add('restic full', restic(repo, ['backup', img]));
    }

    rewrite(img, dataOffset, data, 0.01, i + 1);
    warm(img);
    const had = await objectSizes(store);
    const [c0, g0] = [commandsCpu(), gatewayCpu()];
    add('incremental', ds(['snapshot', 'create', img, '--store', store]));
    add('incremental client cpu', commandsCpu() - c0);
    add('incremental gateway cpu', gatewayCpu() - g0);
    if (haveRestic) {
      warm(img);
      add('restic incremental', restic(repo, ['backup', img]));
    }

    const last = JSON.parse(run(CLI, ['snapshot', 'list', '--store', store, '--json'], { env }).out).snapshots.pop() as { id: string; stats: { blocksAdded: number; bytesAdded: number } };
    const latest = last.id;
    // The incremental's own floor: as many objects as it wrote, of their mean size (packs of its
    // 64 KiB pieces, and whole blocks), PUT from memory the same way; and the runtime starting,
    // which every command pays before its first request.
    const wrote = [...(await objectSizes(store))].filter(([k]) => !had.has(k)).map(([, n]) => n);
    const added = wrote.length;
    const pieces = Array.from({ length: added }, () => randomBytes(Math.max(1, Math.round(wrote.reduce((a, b) => a + b, 0) / Math.max(1, added)))));
    add('incremental objects', added);
    add('incremental put floor', await secondsAsync(() => parallel(pieces, 32, async (b, k) => void (await floor.putIfAbsent(`pieces/${i}/${k}`, b)))));
    add('runtime start', run(...nodeAsCli(['-e', '0'])).seconds);
    floor.destroy();
    const out = path.join(opts.dir, 'restored.img');
    add('restore', ds(['snapshot', 'restore', latest, '--to', out, '--store', store]));
    fs.rmSync(out);
    if (haveRestic) {
      const target = path.join(opts.dir, 'restic-out');
      add('restic restore', restic(repo, ['restore', 'latest', '--target', target]));
      fs.rmSync(target, { recursive: true, force: true });
    }
    add('sync', seconds(() => spawnSync('sync')));
  }
  admin.destroy();
  // every run's figures, for the record (the table has the medians)
  for (const [k, v] of Object.entries(t)) process.stderr.write(`bench: s3: ${k}: ${v.map((x) => x.toFixed(2)).join(' ')} s\n`);

  const m = (k: string) => median(t[k]);
  const rows: BenchRow[] = [];
  const row = (metric: string, k: string, peer: string, pk: string, note: string) => {
    if (!t[pk]) return;
    rows.push({ area: AREA, metric: `${metric} (${label})`, disksnap: m(k), peer, peerValue: m(pk), unit: 's', higherIsBetter: false, note });
  };
  const n = data / BLOCK;
  row('full snapshot', 'full', `parallel PUT of ${n} x 512 KiB (floor)`, 'put floor', 'the gateway\'s own floor: the same objects PUT from memory, 32 in flight');
  row('full snapshot', 'full', 'restic backup (s3:)', 'restic full', 'restic into a new repository in a bucket of the same gateway');
  row('incremental snapshot, ~1% rewritten', 'incremental', 'restic backup, second (s3:)', 'restic incremental', '');
  if (t['incremental put floor']) {
    const objects = Math.round(m('incremental objects'));
    row('incremental snapshot, ~1% rewritten', 'incremental', `parallel PUT of the ${objects} objects it added (floor)`, 'incremental put floor', 'as many objects as the incremental stored, of their mean size, PUT from memory, 32 in flight, with If-None-Match as the store sends them');
    t['incremental put+start floor'] = sumByRun(t['incremental put floor'], t['runtime start']);
    row('incremental snapshot, ~1% rewritten', 'incremental', 'node -e 0 + that PUT (floor)', 'incremental put+start floor', 'the runtime starting and exiting, plus the PUT floor above, run by run: what a command of this runtime that only stored those objects would take');
  }
  // Where the time goes: the machine's two cores are shared by disksnap and the gateway. The
  // CPU both used, over the cores, is what no schedule of that work on them finishes sooner.
  if (t['incremental gateway cpu']) {
    const cores = os.availableParallelism();
    const client = m('incremental client cpu');
    const gw = m('incremental gateway cpu');
    t['incremental cpu floor'] = [(client + gw) / cores];
    row('incremental snapshot, ~1% rewritten', 'incremental', `(disksnap CPU + gateway CPU) / ${cores} cores`, 'incremental cpu floor', `disksnap ${client.toFixed(2)} s of CPU, the gateway (radosgw, OSD, monitor) ${gw.toFixed(2)} s, medians: the cores were busy for all but the rest`);
  }
  row('restore to a new file', 'restore', `parallel GET of ${n} x 512 KiB (floor)`, 'get floor', 'the same objects GET into memory, 32 in flight; disksnap also verifies every digest and writes the file');
  row('restore to a new file', 'restore', `parallel GET of ${n} x 512 KiB, written into a new file + fdatasync (floor)`, 'get+write floor', 'the same GETs, each object written at its offset of a new sparse file, then fdatasync: the GETs and the file a restore must write, without verifying');
  row('restore to a new file', 'restore', 'restic restore (s3:)', 'restic restore', '');
  return rows;
}
