/**
 * `compare`: the strategies on the same image and the same work, measured, every result
 * checked byte-exact. Pointer snapshots (compare/pointer.ts, reflink clones) run beside the
 * two below where the working directory's filesystem shares extents, with a pointer-snapshot/
 * directory of their own; elsewhere the report says why they are missing.
 *
 *   user's image ──(read only)──▶ WORK/base.img   the state at the snapshot (hash H0)
 *                                    │
 *         ┌──────────────────────────┼─────────────────────────────┐
 *         ▼                          ▼                             ▼
 *   raw/volume.img             differencing-disk/             storage-snapshot/
 *   (no snapshot: the          base.img + child.qcow2         volume.img + store/
 *   baseline, and H1 =         snapshot, write, read,         snapshot, write, read,
 *   H0 + workload)             restore, survival, rollback    restore, survival, rollback
 *                                    then growth: 1, 4, 16 snapshots, each on a fresh copy
 *
 * Every copy is a reflink where the filesystem allows it, else a sparse copy of the data
 * extents. The runner times each library call, measures space with st_blocks, and checks:
 * the read-back of the workload, the whole image while the snapshot exists (== H1), the
 * rollback (== H0), the restore (== H0), the state after each growth run (== the raw
 * baseline after the same writes). A failed check fails the run (ECHECK) and no report is
 * written: the figures are only of operations that worked.
 *
 * Deliberately simple: one operation at a time, page cache left as it is (figures are of
 * warm-cache work on both sides alike), timings are single runs, not medians — compare
 * answers "which strategy on this image", `npm run bench` answers "how fast, precisely".
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DisksnapError, isDisksnapError } from '../engine/errors';
import { openImage } from '../image';
import { canReflink } from '../host';
import { formatSize } from '../engine/size';
import { WorkDir, checkRoom } from './workdir';
import { allocatedBytes, copySparse, hashFile, hashImage, warm } from './files';
import { checkSourceImage, generateImage, SourceInfo } from './source';
import { amountBytes, applyPlan, footprint, makeWorkload, readBackPlan, roundPlan, Workload, WorkloadSpec, WritePlan } from './workload';
import { captureFsWorkload, ensureExt4, fsWorkloadUnavailable } from './fsworkload';
import { Progress, silentProgress } from './progress';
import { Check, CompareReport, GrowthPoint, Strategy, StrategyMetrics, StrategyName, StrategyReport, StrategySession, STRATEGY_NAMES } from './types';
import { strategyFor } from './strategies';
import { verdict } from './verdict';

export interface CompareOptions {
  /** the user's image (only read) — or generate one: */
  image?: string;
  /** size of a generated demo image */
  generate?: number;
  workload: WorkloadSpec;
  seed?: number;
  /** where the temporary working directory goes (default os.tmpdir()) */
  dir?: string;
  /** growth points (default 1, 4, 16) */
  growth?: number[];
  /** which strategies (default both) */
  strategies?: StrategyName[];
  progress?: Progress;
}

const MB = 1e6;
const MiB = 2 ** 20;

export const DEFAULT_GROWTH = [1, 4, 16];

function seconds(t0: bigint): number {
  return Number(process.hrtime.bigint() - t0) / 1e9;
}

/**
 * Reads do not change anything, so they are repeated and the median taken (3 passes up to
 * 1 GiB, one pass above): one slow pass on a busy machine does not decide the figure.
 */
function readPasses(virtualSize: number): number {
  return virtualSize <= 2 ** 30 ? 3 : 1;
}

async function medianPass<T extends { seconds: number }>(passes: number, fn: () => Promise<T>): Promise<T & { spread?: number }> {
  const runs: T[] = [];
  for (let i = 0; i < passes; i++) runs.push(await fn());
  runs.sort((a, b) => a.seconds - b.seconds);
  const mid = runs[runs.length >> 1];
  // (slowest - fastest) / median: how far apart the passes were, for the report's noise notes
  const spread = runs.length > 1 && mid.seconds > 0 ? (runs[runs.length - 1].seconds - runs[0].seconds) / mid.seconds : undefined;
  return { ...mid, ...(spread !== undefined ? { spread } : {}) };
}

/** The spread of the figures measured in passes, where there was more than one pass. */
function spreadOf(read: { spread?: number }, full: { spread?: number }): { spread?: Partial<Record<'readMBps' | 'fullReadMBps', number>> } {
  if (read.spread === undefined && full.spread === undefined) return {};
  return { spread: { ...(read.spread !== undefined ? { readMBps: read.spread } : {}), ...(full.spread !== undefined ? { fullReadMBps: full.spread } : {}) } };
}

async function timed(fn: () => unknown): Promise<number> {
  const t0 = process.hrtime.bigint();
  await fn();
  return seconds(t0);
}

function mbps(bytes: number, secs: number): number {
  return secs > 0 ? bytes / secs / MB : Infinity;
}

/** A failed byte-exact check: the run stops, nothing is reported as a figure. */
export class CheckFailed extends DisksnapError {
  constructor(readonly check: Check) {
    super(
      `compare: ${check.strategy} ${check.name} check failed: expected ${check.expected}, got ${check.actual}${check.detail ? ` (${check.detail})` : ''}`,
      'ECHECK',
    );
  }
}

class Checks {
  readonly list: Check[] = [];
  add(strategy: Check['strategy'], name: string, expected: string, actual: string, detail?: string): void {
    const c: Check = { name, strategy, ok: expected === actual, expected, actual, ...(detail ? { detail } : {}) };
    this.list.push(c);
    if (!c.ok) throw new CheckFailed(c);
  }
}

function short(h: string): string {
  return `sha256:${h.slice(0, 16)}`;
}

/** Validates everything that can be validated before any byte is copied. */
export function validate(opts: CompareOptions): void {
  if ((opts.image === undefined) === (opts.generate === undefined)) {
    throw new DisksnapError('compare needs an IMAGE or --generate SIZE (one of the two)', 'EINVALID');
  }
  if (opts.workload.kind === 'fs') {
    const why = fsWorkloadUnavailable();
    if (why) throw new DisksnapError(why, 'EPERM', 1);
  }
  const growth = opts.growth ?? DEFAULT_GROWTH;
  if (growth.length === 0 || growth.some((n) => !Number.isSafeInteger(n) || n < 1 || n > 64)) {
    throw new DisksnapError(`growth points ${growth.join(',')} must be whole numbers from 1 to 64`, 'EINVALID');
  }
  for (const s of opts.strategies ?? STRATEGY_NAMES) strategyFor(s).ensureAvailable();
}

/**
 * Space the run needs at its peak, without counting on reflinks (which would make the
 * copies nearly free): a generated source and the base copy, then the larger of
 * - the main run: the volume (plus the bytes written into it), a full first snapshot or a
 *   child holding the touched 64 KiB clusters, and one restored image;
 * - a growth run: the volume plus every batch's bytes, and a store holding a full copy
 *   plus every batch's touched 512 KiB blocks (a chain of children needs less);
 * plus the fs trace and 32 MiB for metadata and slack. Footprints are computed from the
 * plans; the fs workload's is estimated at twice its amount (ext4 adds metadata and
 * journal writes to the file data).
 */
export function spaceNeeded(p: {
  allocated: number;
  generatedSource: number;
  mainBytes: number;
  main64k: number;
  growthBytes: number;
  growth512k: number;
  fsTrace: number;
}): number {
  const mainPeak = 3 * p.allocated + Math.max(p.mainBytes, p.main64k);
  const growthPeak = 2 * p.allocated + p.growthBytes + p.growth512k;
  return p.generatedSource + p.allocated + p.fsTrace + Math.max(mainPeak, growthPeak) + 32 * MiB;
}

export async function compare(opts: CompareOptions): Promise<CompareReport> {
  validate(opts);
  const progress = opts.progress ?? silentProgress;
  const seed = opts.seed ?? 1;
  const growth = [...new Set(opts.growth ?? DEFAULT_GROWTH)].sort((a, b) => a - b);
  let strategies = (opts.strategies ?? STRATEGY_NAMES).map(strategyFor);

  let source: SourceInfo | undefined = opts.image !== undefined ? checkSourceImage(opts.image) : undefined;
  const virtualSize = source?.virtualSize ?? opts.generate!;
  // amounts are validated against the size before anything is written
  const amount = amountBytes(opts.workload, virtualSize);

  const parent = opts.dir ?? os.tmpdir();
  const work = WorkDir.create(parent);
  try {
    // the plans exist before anything is copied, so the space check can use their footprints
    const isFs = opts.workload.kind === 'fs';
    const planned = isFs ? undefined : makeWorkload(opts.workload, virtualSize, seed);
    const rounds: WritePlan[] = [];
    for (let i = 1; i <= growth[growth.length - 1]; i++) rounds.push(roundPlan(opts.workload, virtualSize, seed, i));
    const BLOCK = 512 * 1024;
    const CLUSTER = 64 * 1024;
    // a generated image is about half data (see generateImage); an fs one starts empty
    const allocated = source?.allocatedBytes ?? Math.ceil(virtualSize * (isFs ? 0.1 : 0.6));
    checkRoom(
      work.path,
      spaceNeeded({
        allocated,
        generatedSource: source ? 0 : allocated,
        mainBytes: planned ? planned.main.bytes : 2 * amount,
        main64k: planned ? footprint([planned.main], CLUSTER, virtualSize) : 2 * amount,
        growthBytes: rounds.reduce((sum, r) => sum + r.bytes, 0),
        growth512k: rounds.reduce((sum, r) => sum + footprint([r], BLOCK, virtualSize), 0),
        fsTrace: isFs ? 2 * amount : 0,
      }),
      'this comparison',
    );

    const reflink = canReflink(work.file('probe'));
    const unavailable = unavailableHere(strategies, reflink, work.path, !!opts.strategies?.includes('pointer-snapshot'));
    strategies = strategies.filter((s) => !unavailable.some((u) => u.name === s.name));

    const steps = 6 + strategies.length * (7 + growth.length);
    progress.start(steps);

    // 1. the starting state
    const base = work.file('base.img');
    if (!source) {
      progress.step(`generate a ${formatSize(virtualSize)} demo image`);
      source = await generateImage(work.file('source.img'), virtualSize, seed, { empty: opts.workload.kind === 'fs' });
    } else {
      progress.step(`copy ${source.path}`);
    }
    await copySparse(source.path, base);
    if (source.generated) fs.rmSync(source.path);

    let workload: Workload;
    let fsAfter: string | undefined;
    progress.step(`prepare workload ${opts.workload.text}`);
    if (opts.workload.kind === 'fs') {
      const formatted = ensureExt4(base);
      const cap = await captureFsWorkload(work, base, amount, seed, formatted, (d) => progress.detail(d));
      workload = makeWorkload(opts.workload, virtualSize, seed, cap.plan, cap.detail);
      fsAfter = cap.afterSha256;
    } else {
      workload = planned!;
    }

    progress.step('hash the starting state');
    const h0 = await hashFile(base);
    // the volume as the strategies get it (for fs: formatted), not the file it came from
    const baseAllocated = allocatedBytes(base);
    const checks = new Checks();

    // 2. baseline: the same writes on a plain raw copy, no snapshot anywhere
    const { h1, growthHashes, baseline } = await runBaseline(work, base, workload, rounds, growth, virtualSize, fsAfter, checks, progress);

    // 3. each strategy
    const reports: StrategyReport[] = [];
    for (const s of strategies) {
      reports.push(await runStrategy(s, work, base, h0, h1, workload, rounds, growth, growthHashes, checks, progress));
    }
    progress.stop();

    const report: CompareReport = {
      version: 2,
      date: new Date().toISOString(),
      image: {
        path: opts.image !== undefined ? source.path : `(generated ${formatSize(virtualSize)} demo image, seed ${seed})`,
        generated: source.generated,
        virtualSize,
        allocatedBytes: baseAllocated,
        sha256: h0,
      },
      workload: {
        spec: workload.spec.text,
        kind: workload.spec.kind,
        seed,
        bytes: workload.main.bytes,
        requests: workload.main.offsets.length,
        touched: { cluster64k: footprint([workload.main], 64 * 1024, virtualSize), block512k: footprint([workload.main], 512 * 1024, virtualSize) },
        growthRoundBytes: rounds[0]?.bytes ?? 0,
        ...(workload.fsDetail ? { fs: workload.fsDetail } : {}),
      },
      baseline,
      strategies: reports,
      checks: checks.list,
      unavailable,
      verdict: [],
      host: { node: process.version, platform: `${os.platform()} ${os.release()}`, cpus: os.cpus().length, workDirFs: fsType(work.path), reflink },
    };
    report.verdict = verdict(report);
    return report;
  } finally {
    progress.stop();
    work.cleanup();
  }
}

/**
 * Strategies that cannot run in the working directory, and why: pointer snapshots need a
 * filesystem that shares extents, probed in the working directory itself (not from the copy
 * of the source, which may come from another filesystem). Asked for by name, it is an error.
 */
function unavailableHere(strategies: Strategy[], reflink: boolean, workDir: string, askedFor: boolean): CompareReport['unavailable'] {
  if (reflink || !strategies.some((s) => s.name === 'pointer-snapshot')) return [];
  const reason = `the working directory is on ${fsType(workDir) ?? 'a filesystem'}, which cannot share extents (reflinks); run with --dir on xfs or btrfs`;
  if (askedFor) throw new DisksnapError(`pointer snapshots: ${reason}`, 'EOPNOTSUPP', 95);
  return [{ name: 'pointer-snapshot', title: strategyFor('pointer-snapshot').title, reason }];
}

interface BaselineResult {
  /** the expected state after the workload */
  h1: string;
  /** the expected state after each growth round that is measured */
  growthHashes: Map<number, string>;
  baseline: CompareReport['baseline'];
}

/**
 * The same writes on a plain raw copy, no snapshot anywhere. Three passes, each on a fresh
 * copy of the base: the expected state after the workload (which also warms up the JIT and
 * the caches), the expected states of the growth runs, and the timed raw figures, measured
 * under the same conditions as the strategies' own.
 */
async function runBaseline(
  work: WorkDir,
  base: string,
  workload: Workload,
  rounds: WritePlan[],
  growth: number[],
  virtualSize: number,
  fsAfter: string | undefined,
  checks: Checks,
  progress: Progress,
): Promise<BaselineResult> {
  progress.step('baseline: expected state after the workload');
  const rawDir = work.mkdir('raw');
  const rawVol = `${rawDir}/volume.img`;
  let h1: string;
  await copySparse(base, rawVol);
  let rawImg = openImage(rawVol, { write: true });
  try {
    await applyPlan(rawImg, workload.main, (d) => progress.detail(pct(d, workload.main.bytes)));
    const r = await readBackPlan(rawImg, workload.main);
    checks.add('baseline', 'read-back', `${r.checked} ranges equal`, `${r.checked - r.mismatches} ranges equal`);
    h1 = (await hashImage(rawImg)).sha256;
  } finally {
    rawImg.close();
  }
  fs.rmSync(rawVol);
  if (fsAfter !== undefined) {
    checks.add('baseline', 'fs-replay', short(fsAfter), short(h1), 'the captured ext4 writes replayed on a raw copy give the filesystem ext4 wrote');
  }

  progress.step('baseline: expected states for the growth runs');
  const growthHashes = new Map<number, string>();
  await copySparse(base, rawVol);
  rawImg = openImage(rawVol, { write: true });
  try {
    for (let i = 1; i <= rounds.length; i++) {
      await applyPlan(rawImg, rounds[i - 1]);
      if (growth.includes(i)) growthHashes.set(i, (await hashImage(rawImg)).sha256);
    }
  } finally {
    rawImg.close();
  }
  fs.rmSync(rawVol);

  progress.step('baseline: raw volume without a snapshot');
  let baseline: CompareReport['baseline'];
  const passes = readPasses(virtualSize);
  await copySparse(base, rawVol);
  await warm(rawVol);
  rawImg = openImage(rawVol, { write: true });
  try {
    const w = await applyPlan(rawImg, workload.main, (d) => progress.detail(pct(d, workload.main.bytes)));
    const r = await medianPass(passes, () => readBackPlan(rawImg, workload.main));
    const full = await medianPass(passes, () => hashImage(rawImg));
    checks.add('baseline', 'state-after-workload', short(h1), short(full.sha256), 'the workload gives the same state every time');
    baseline = { writeMBps: mbps(w.bytes, w.seconds), writeFlushSeconds: w.flushSeconds, readMBps: mbps(r.bytes, r.seconds), fullReadMBps: mbps(full.bytes, full.seconds), ...spreadOf(r, full) };
  } finally {
    rawImg.close();
  }
  fs.rmSync(rawDir, { recursive: true, force: true });
  return { h1, growthHashes, baseline: baseline! };
}

function pct(done: number, total: number): string {
  return total > 0 ? `${Math.round((done / total) * 100)}%` : '';
}

/**
 * The filesystem type of the mount holding `dir`, as the kernel names it (ext4, xfs, btrfs,
 * tmpfs): from /proc/self/mountinfo, the longest mount point that contains the directory.
 * (`stat -f` reports the superblock magic, which ext2, ext3 and ext4 share: "ext2/ext3".)
 */
export function fsType(dir: string): string | undefined {
  let real: string;
  try {
    real = fs.realpathSync(dir);
  } catch {
    return undefined;
  }
  let best: { at: string; type: string } | undefined;
  let info: string;
  try {
    info = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  } catch {
    return undefined;
  }
  for (const line of info.split('\n')) {
    const [pre, post] = line.split(' - ');
    if (!post) continue;
    const at = (pre.split(' ')[4] ?? '').replace(/\\(\d{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
    const type = post.split(' ')[0];
    const inside = at === '/' || real === at || real.startsWith(`${at}/`);
    if (inside && (!best || at.length >= best.at.length)) best = { at, type };
  }
  return best?.type;
}

async function runStrategy(
  strategy: Strategy,
  work: WorkDir,
  base: string,
  h0: string,
  h1: string,
  workload: Workload,
  rounds: WritePlan[],
  growth: number[],
  growthHashes: Map<number, string>,
  checks: Checks,
  progress: Progress,
): Promise<StrategyReport> {
  const name = strategy.name;
  const step = (what: string) => progress.step(`${name}: ${what}`);
  const dir = work.mkdir(name);
  const volume = `${dir}/volume.img`;
  step('copy the volume');
  await copySparse(base, volume);
  await warm(volume);
  const session = await strategy.open(dir, volume);
  const m: Partial<StrategyMetrics> = {};
  try {
    step('take a snapshot');
    m.snapshotSeconds = await timed(() => session.snapshot());
    m.snapshotBytes = session.extraBytes();

    step(`write ${formatSize(workload.main.bytes)} (${workload.spec.text})`);
    let img = session.open(true);
    try {
      const w = await applyPlan(img, workload.main, (d) => progress.detail(pct(d, workload.main.bytes)));
      m.writeSeconds = w.seconds;
      m.writeFlushSeconds = w.flushSeconds;
      m.writeMBps = mbps(w.bytes, w.seconds);
    } finally {
      img.close();
    }
    m.extraBytes = session.extraBytes();

    step('read back while the snapshot exists');
    img = session.open(false);
    try {
      const passes = readPasses(img.virtualSize);
      const r = await medianPass(passes, () => readBackPlan(img, workload.main));
      checks.add(name, 'read-back', `${r.checked} ranges equal`, `${r.checked - r.mismatches} ranges equal`);
      m.readMBps = mbps(r.bytes, r.seconds);
      const full = await medianPass(passes, () => hashImage(img, (d, t) => progress.detail(pct(d, t))));
      checks.add(name, 'state-with-snapshot', short(h1), short(full.sha256), 'the whole image after the workload equals the raw baseline');
      m.fullReadMBps = mbps(full.bytes, full.seconds);
      Object.assign(m, spreadOf(r, full));
    } finally {
      img.close();
    }

    step('restore into a new volume');
    const restored = `${dir}/restored.img`;
    m.restoreSeconds = await timed(() => session.restore(restored));
    checks.add(name, 'restore', short(h0), short(await hashFile(restored)), 'the restored volume equals the volume at the snapshot');
    fs.rmSync(restored, { force: true });

    step('lose the volume and try to recover');
    m.survival = await survival(strategy, session, `${dir}/recovered.img`, h0);
    m.survivesVolumeLoss = m.survival.survives;

    step('roll back');
    m.rollbackSeconds = await timed(() => session.rollback());
    img = session.open(false);
    try {
      checks.add(name, 'rollback', short(h0), short((await hashImage(img)).sha256), 'the volume after rollback equals the volume at the snapshot');
    } finally {
      img.close();
    }
  } finally {
    await session.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }

  m.growth = [];
  for (const n of growth) {
    step(`growth: ${n} snapshot${n === 1 ? '' : 's'}`);
    m.growth.push(await growthRun(strategy, work, base, rounds.slice(0, n), growthHashes.get(n)!, checks, progress));
  }
  return { name, title: strategy.title, how: strategy.how, metrics: m as StrategyMetrics };
}

/**
 * Takes the volume file away (renamed, as a lost or deleted disk) and asks the strategy to
 * produce the snapshot's bytes without it; puts the file back afterwards.
 */
async function survival(strategy: Strategy, session: StrategySession, out: string, h0: string): Promise<StrategyMetrics['survival']> {
  const vol = session.volumePath;
  const lostAt = `${vol}.lost`;
  fs.renameSync(vol, lostAt);
  const { lost, tried } = strategy.loss;
  try {
    try {
      await session.recoverAfterLoss(out);
    } catch (e) {
      const err = e as DisksnapError;
      // paths inside the working directory mean nothing after the run: keep their names
      const message = err.message.split(`${path.dirname(vol)}${path.sep}`).join('');
      return { lost, tried, survives: false, outcome: oneLine(message), code: isDisksnapError(e) ? err.code : (e as NodeJS.ErrnoException).code };
    }
    const got = await hashFile(out);
    if (got === h0) return { lost, tried, survives: true, outcome: 'the snapshot came back byte-exact' };
    return { lost, tried, survives: false, outcome: `the bytes that came back are not the snapshot's (${short(got)} != ${short(h0)})` };
  } finally {
    fs.rmSync(out, { force: true });
    fs.renameSync(lostAt, vol);
  }
}

function oneLine(s: string): string {
  return s.split('\n')[0].slice(0, 400);
}

/** N snapshots on a fresh copy, a batch of writes after each; then read the current state. */
async function growthRun(strategy: Strategy, work: WorkDir, base: string, rounds: WritePlan[], expected: string, checks: Checks, progress: Progress): Promise<GrowthPoint> {
  const n = rounds.length;
  const dir = work.mkdir(`${strategy.name}-growth-${n}`);
  const volume = `${dir}/volume.img`;
  await copySparse(base, volume);
  await warm(volume);
  const session = await strategy.open(dir, volume);
  try {
    let snapSeconds = 0;
    for (let i = 0; i < n; i++) {
      progress.detail(`snapshot ${i + 1}/${n}`);
      snapSeconds += await timed(() => session.snapshot());
      const img = session.open(true);
      try {
        await applyPlan(img, rounds[i]);
      } finally {
        img.close();
      }
    }
    const extra = session.extraBytes();
    const img = session.open(false);
    let full;
    try {
      full = await medianPass(readPasses(img.virtualSize), () => hashImage(img));
    } finally {
      img.close();
    }
    checks.add(strategy.name, `growth-${n}`, short(expected), short(full.sha256), `the state after ${n} snapshots equals the raw baseline after the same writes`);
    return { snapshots: n, snapshotSeconds: snapSeconds, extraBytes: extra, readMBps: mbps(full.bytes, full.seconds), verified: true };
  } finally {
    await session.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}
