/**
 * The parts of `compare` that need no disk: workload specs, the seeded write plans, the
 * read-back check (overlapping writes included), the winner rule and the verdict text.
 */
import t from 'tap';
import { parseWorkload, randomPlan, sequentialPlan, footprint, applyPlan, readBackPlan, makeWorkload, WritePlan } from '../src/compare/workload';
import { bestOf, noiseOf, winner, verdict, formatSeconds, SCALAR_METRICS } from '../src/compare/verdict';
import { niceTicks, tickLabel } from '../src/compare/html';
import { metrics } from './helpers/compare-report';
import type { DiskImage, ImageInfo, MapExtent } from '../src/image';
import type { CompareReport } from '../src/compare/types';

const KiB = 1024;
const MiB = 1024 * 1024;

/** A DiskImage in memory, so that plans can be applied and read back without files. */
class MemImage implements DiskImage {
  readonly path = 'mem';
  readonly format = 'raw' as const;
  readonly writable = true;
  readonly bytes: Buffer;
  constructor(readonly virtualSize: number) {
    this.bytes = Buffer.alloc(virtualSize);
  }
  readSync(buf: Uint8Array, offset: number): void {
    buf.set(this.bytes.subarray(offset, offset + buf.length));
  }
  writeSync(buf: Uint8Array, offset: number): void {
    this.bytes.set(buf, offset);
  }
  async read(buf: Uint8Array, offset: number): Promise<void> {
    this.readSync(buf, offset);
  }
  async write(buf: Uint8Array, offset: number): Promise<void> {
    this.writeSync(buf, offset);
  }
  readBatchSync(buf: Uint8Array, req: Float64Array): void {
    for (let i = 0; i < req.length; i += 3) this.readSync(buf.subarray(req[i + 1], req[i + 1] + req[i + 2]), req[i]);
  }
  async readBatch(buf: Uint8Array, req: Float64Array): Promise<void> {
    this.readBatchSync(buf, req);
  }
  writeBatchSync(buf: Uint8Array, req: Float64Array): void {
    for (let i = 0; i < req.length; i += 3) this.writeSync(buf.subarray(req[i + 1], req[i + 1] + req[i + 2]), req[i]);
  }
  writeZeroesSync(offset: number, length: number): void {
    this.bytes.fill(0, offset, offset + length);
  }
  flushSync(): void {}
  async flush(): Promise<void> {}
  map(): MapExtent[] {
    return [];
  }
  info(): ImageInfo {
    return { path: 'mem', format: 'raw', virtualSize: this.virtualSize, allocatedBytes: this.virtualSize };
  }
  close(): void {}
}

t.test('workload specs: defaults, normalised text that parses back, clear errors', async (t) => {
  const cases: [string | undefined, string][] = [
    [undefined, 'random:3%:4k-1m'],
    ['random', 'random:3%:4k-1m'],
    ['RANDOM:5%:8k-64k', 'random:5%:8k-64k'],
    ['random:0.5%', 'random:0.5%:4k-1m'],
    ['random:16M:64k', 'random:16m:64k'],
    ['sequential', 'sequential:10%:1m'],
    ['sequential:16M', 'sequential:16m:1m'],
    ['sequential:1%:256k', 'sequential:1%:256k'],
    ['fs', 'fs:64m'],
    ['fs:10M', 'fs:10m'],
  ];
  for (const [input, text] of cases) {
    const w = parseWorkload(input);
    t.equal(w.text, text, `${input} -> ${text}`);
    t.same(parseWorkload(w.text), w, `${text} parses back to itself`);
  }
  t.throws(() => parseWorkload('zipf'), { code: 'EINVALID', message: /unknown workload 'zipf'/ });
  t.throws(() => parseWorkload('fs:8M:4k'), { message: /fs takes no request sizes/ });
  t.throws(() => parseWorkload('random:3%:6k'), { message: /multiples of 4 KiB/ });
});

t.test('random plans are seeded, aligned, in bounds, and write exactly the amount', async (t) => {
  const size = 64 * MiB;
  const a = randomPlan('main', size, 2 * MiB, 4 * KiB, MiB, 1);
  const b = randomPlan('main', size, 2 * MiB, 4 * KiB, MiB, 1);
  const c = randomPlan('main', size, 2 * MiB, 4 * KiB, MiB, 2);
  t.same(Array.from(a.offsets), Array.from(b.offsets), 'same seed, same offsets');
  t.same(Array.from(a.lengths), Array.from(b.lengths), 'same seed, same sizes');
  t.notSame(Array.from(a.offsets), Array.from(c.offsets), 'another seed, other offsets');
  t.equal(a.bytes, 2 * MiB);
  for (let i = 0; i < a.offsets.length; i++) {
    if (a.offsets[i] % 4096 || a.lengths[i] % 4096) t.fail(`write ${i} not 4 KiB aligned`);
    if (a.offsets[i] + a.lengths[i] > size) t.fail(`write ${i} past the end`);
    if (a.lengths[i] > MiB) t.fail(`write ${i} larger than 1 MiB`);
  }
  const x = Buffer.alloc(a.lengths[0]);
  const y = Buffer.alloc(a.lengths[0]);
  a.fill(0, x);
  b.fill(0, y);
  t.ok(x.equals(y), 'the data is repeatable');
  t.notOk(x.equals(Buffer.alloc(x.length)), 'and not zeros');
  const z = Buffer.alloc(a.lengths[0]);
  c.fill(0, z);
  t.notOk(x.equals(z), 'another seed writes other bytes');
});

t.test('sequential plans overwrite one contiguous stretch, wrapping at the end', async (t) => {
  const p = sequentialPlan('main', 8 * MiB, 3 * MiB + 8 * KiB, MiB, 0, 1);
  t.same(Array.from(p.offsets), [0, MiB, 2 * MiB, 3 * MiB]);
  t.same(Array.from(p.lengths), [MiB, MiB, MiB, 8 * KiB]);
  const w = sequentialPlan('round', 8 * MiB, 2 * MiB, MiB, 7 * MiB, 1);
  t.same(Array.from(w.offsets), [7 * MiB, 0], 'wraps');
});

t.test('footprint counts each touched cluster once', async (t) => {
  const plan: WritePlan = {
    label: 'x',
    offsets: Float64Array.from([0, 4096, 65536 - 4096, 10 * 65536]),
    lengths: Float64Array.from([4096, 4096, 8192, 65536]),
    bytes: 4096 * 4 + 65536,
    maxLength: 65536,
    fill: () => {},
  };
  t.equal(footprint([plan], 65536, 16 * 65536), 3 * 65536, 'clusters 0, 1 and 10');
  t.equal(footprint([plan], 512 * KiB, 16 * 65536), 2 * 512 * KiB, 'blocks 0 and 1');
});

t.test('read-back checks every range a later write did not overwrite, and catches a wrong byte', async (t) => {
  const img = new MemImage(16 * MiB);
  // a plan with overlaps: random 4k-1m over a small image overlaps a lot
  const plan = randomPlan('main', 16 * MiB, 8 * MiB, 4 * KiB, MiB, 3);
  await applyPlan(img, plan);
  let r = await readBackPlan(img, plan);
  t.equal(r.mismatches, 0, 'everything reads back');
  t.ok(r.checked > 0 && r.checked <= plan.offsets.length, `${r.checked} of ${plan.offsets.length} ranges checkable`);
  t.ok(r.checked < plan.offsets.length, 'overlapped earlier writes are skipped');
  // the last write is never overwritten: flip a byte in it
  const last = plan.offsets.length - 1;
  img.bytes[plan.offsets[last] + 5] ^= 0xff;
  r = await readBackPlan(img, plan);
  t.equal(r.mismatches, 1, 'a flipped byte is one mismatch');
});

t.test('growth rounds: a quarter of the amount each, all different', async (t) => {
  const w = makeWorkload(parseWorkload('random:4M'), 64 * MiB, 1);
  const r1 = w.round(1);
  const r2 = w.round(2);
  t.equal(r1.bytes, MiB);
  t.notSame(Array.from(r1.offsets), Array.from(r2.offsets));
  const s = makeWorkload(parseWorkload('sequential:4M'), 64 * MiB, 1);
  t.equal(s.round(1).offsets[0], 4 * MiB, 'sequential rounds continue after the main stretch');
  t.equal(s.round(2).offsets[0], 5 * MiB);
});

t.test('winner: margins by how repeatable a figure is, and two instant times are a tie', async (t) => {
  const time = { unit: 's' as const, higherIsBetter: false };
  const rate = { unit: 'MB/s' as const, higherIsBetter: true };
  t.equal(winner(0.01, 1, time), 'differencing-disk');
  t.equal(winner(1, 0.01, time), 'storage-snapshot');
  t.equal(winner(1, 1.15, time), 'tie', 'times within 20%');
  t.equal(winner(1, 1.3, time), 'differencing-disk');
  t.equal(winner(0.0001, 0.001, time), 'tie', 'both under 2 ms');
  t.equal(winner(100, 200, rate), 'storage-snapshot');
  t.equal(winner(100, 120, rate), 'tie', 'throughput within 25%');
  t.equal(winner(100, 140, rate), 'storage-snapshot');
  const space = { unit: 'B' as const, higherIsBetter: false };
  t.equal(winner(100, 115, space), 'differencing-disk', 'space beyond 10%');
  t.equal(formatSeconds(0.0123), '12.3 ms');
  t.equal(formatSeconds(2.5), '2.50 s');
  t.equal(bestOf([['differencing-disk', 1], ['storage-snapshot', 1.1], ['pointer-snapshot', 0.5]], time), 'pointer-snapshot', 'three: the best beats both by the margin');
  t.equal(bestOf([['differencing-disk', 0.55], ['storage-snapshot', 1.1], ['pointer-snapshot', 0.5]], time), 'tie', 'three: the best must beat the second too');
  t.equal(bestOf([['differencing-disk', 1]], time), 'tie', 'one strategy wins nothing');
});

t.test('axis ticks are round and labelled in as few digits as they need', async (t) => {
  const labels = (v: number, unit: 's' | 'B' | 'MB/s') => {
    const ticks = niceTicks(v, unit);
    return ticks.map((x) => tickLabel(x, unit, ticks[ticks.length - 1]));
  };
  t.same(labels(6.25, 's'), ['0', '2 s', '4 s', '6 s', '8 s'], 'not 1.56 s, 3.13 s, ...');
  t.same(labels(188 * MiB, 'B'), ['0', '50 MiB', '100 MiB', '150 MiB', '200 MiB'], 'not 47 MiB, 94 MiB, ...');
  t.same(labels(0.37, 's'), ['0', '100 ms', '200 ms', '300 ms', '400 ms']);
  t.same(labels(4723, 'MB/s'), ['0', '1000 MB/s', '2000 MB/s', '3000 MB/s', '4000 MB/s', '5000 MB/s']);
  t.same(labels(1.5 * 2 ** 30, 'B'), ['0', '0.5 GiB', '1 GiB', '1.5 GiB']);
  t.same(labels(0, 's'), ['0', '0.2 s', '0.4 s', '0.6 s', '0.8 s', '1 s'], 'an empty axis still has a scale');
  for (const v of [0.0031, 0.9, 7, 63, 999, 12345, 3 * KiB, 700 * MiB, 9.9 * 2 ** 30]) {
    for (const unit of ['s', 'B', 'MB/s'] as const) {
      const ticks = niceTicks(v, unit);
      t.ok(ticks.length >= 3 && ticks.length <= 7, `${v} ${unit}: ${ticks.length} ticks`);
      t.ok(ticks[ticks.length - 1] >= v && ticks[ticks.length - 2] < v, `${v} ${unit}: the top tick is the first at or above the data`);
    }
  }
});

t.test('the verdict names what each strategy wins, from the numbers', async (t) => {
  const report = {
    image: { path: 'x', generated: true, virtualSize: 256 * MiB, allocatedBytes: 100 * MiB, sha256: '' },
    workload: { spec: 'random:3%:4k-1m', kind: 'random', seed: 1, bytes: 8 * MiB, requests: 40, touched: { cluster64k: 9 * MiB, block512k: 20 * MiB }, growthRoundBytes: 2 * MiB },
    baseline: { writeMBps: 600, writeFlushSeconds: 0.001, readMBps: 3000, fullReadMBps: 3000 },
    strategies: [
      { name: 'differencing-disk', title: '', how: {}, metrics: metrics({ snapshotSeconds: 0.005, snapshotBytes: 200 * KiB, writeMBps: 200, rollbackSeconds: 0.003, extraBytes: 9 * MiB }) },
      {
        name: 'storage-snapshot',
        title: '',
        how: {},
        metrics: metrics({ snapshotSeconds: 0.8, snapshotBytes: 100 * MiB, writeMBps: 600, rollbackSeconds: 0.2, extraBytes: 100 * MiB, survivesVolumeLoss: true, survival: { lost: 'v', tried: 'r', survives: true, outcome: 'ok' } }),
      },
    ],
  } as unknown as CompareReport;
  const v = verdict(report);
  t.ok(v.length >= 6 && v.every((p) => p.split(/\s+/).length <= 45), 'short points, not a paragraph');
  t.match(v[0], /^Measured on a 256 MiB image, 100 MiB allocated; workload random:3%:4k-1m/);
  t.match(v.join('\n'), /Differencing disks win on time to snapshot, space right after the snapshot, extra space after the workload and time to roll back: pick them for frequent, short-lived checkpoints/);
  t.match(v.join('\n'), /Storage snapshots win on write throughput with the snapshot and surviving the loss of the volume: pick them for backups/);
  t.match(v.join('\n'), /Losing the volume file: storage snapshot came back byte-exact; differencing disk did not \(ENOENT\)/);
  t.match(v.join('\n'), /Writes with the snapshot: differencing disk 200 MB\/s, storage snapshot 600 MB\/s; raw volume 600 MB\/s\./);

  // a third strategy, and a baseline slower than a strategy: flagged, and not counted as a win
  const three = {
    ...report,
    baseline: { ...report.baseline, writeMBps: 300 },
    strategies: [
      ...report.strategies,
      { name: 'pointer-snapshot', title: '', how: {}, metrics: metrics({ snapshotSeconds: 0.004, snapshotBytes: 0, writeMBps: 590, rollbackSeconds: 0.002, survivesVolumeLoss: true, survival: { lost: 'v', tried: 'r', survives: true, outcome: 'ok' } }) },
    ],
    unavailable: [],
  } as unknown as CompareReport;
  const writes = SCALAR_METRICS.find((m) => m.key === 'writeMBps')!;
  t.same(noiseOf(three, writes), { text: '1 run; raw slower than storage snapshot: noise', flagged: true });
  const v3 = verdict(three).join('\n');
  t.notMatch(v3, /win on [^:]*write throughput/, 'a noisy row wins nothing');
  t.match(v3, /Writes with the snapshot: .*\(noisy: see the table\)/);
  t.match(v3, /Losing the volume file: storage snapshot and pointer snapshot came back byte-exact; differencing disk did not \(ENOENT\) \(a pointer snapshot lives on the same disk/);
  t.match(v3, /Pointer snapshots win on [^:]*time to roll back: pick them for instant checkpoints/);
  const reads = SCALAR_METRICS.find((m) => m.key === 'fullReadMBps')!;
  const spread = { ...three, strategies: three.strategies.map((s, i) => ({ ...s, metrics: { ...s.metrics, spread: { fullReadMBps: i === 1 ? 0.6 : 0.1 } } })) } as CompareReport;
  t.same(noiseOf(spread, reads), { text: 'passes within ±30%', flagged: true }, 'passes 60% apart: beyond the 25% margin');
  const calm = { ...three, strategies: three.strategies.map((s) => ({ ...s, metrics: { ...s.metrics, spread: { fullReadMBps: 0.1 } } })) } as CompareReport;
  t.same(noiseOf(calm, reads), { text: 'passes within ±5%', flagged: false });

  const none = { ...report, unavailable: [{ name: 'pointer-snapshot', title: '', reason: 'the working directory is on ext4, which cannot share extents (reflinks); run with --dir on xfs or btrfs' }] } as unknown as CompareReport;
  t.match(verdict(none)[1], /^Pointer snapshot: not measured here — the working directory is on ext4/);
});
