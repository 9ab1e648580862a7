/**
 * `disksnap compare` on a small generated image, as a user runs it: the JSON report has both
 * strategies with every metric present and plausible, every byte-exact check passed, the
 * HTML report carries the charts and nothing from outside the file, and the working
 * directory is gone afterwards.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { cli } from './helpers/cli';
import { needLoop, scratch, sh } from './helpers/loop';
import { fsType } from '../src/compare/run';
import { METRIC_NAMES } from '../src/compare/types';
import { SCALAR_METRICS } from '../src/compare/verdict';
import type { CompareReport, StrategyMetrics } from '../src/compare/types';

const MiB = 2 ** 20;

t.test('compare --generate: JSON, HTML, table and verdict of a real run', async (t) => {
  const dir = t.testdir({ work: {} });
  const work = path.join(dir, 'work');
  const json = path.join(dir, 'report.json');
  const html = path.join(dir, 'report.html');
  const r = cli(['compare', '--generate', '48M', '--dir', work, '--json', json, '--html', html]);
  t.equal(r.status, 0, r.stderr);
  t.same(fs.readdirSync(work), [], 'the working directory is removed');

  // stdout: the table and the verdict
  t.match(r.out, /time to snapshot/);
  t.match(r.out, /survives losing the volume\s+no \(ENOENT\)\s+yes/);
  t.match(r.out, /checks: (\d+)\/\1 byte-exact/);
  t.match(r.out, /verdict:\n- Measured on a 48\.0 MiB image/);
  t.match(r.out, /pointer snapshot: not available here \(the working directory is on ext4, which cannot share extents/, 'the third kind says why it is missing');
  // progress went to stderr, not stdout
  t.match(r.stderr, /compare: \[\d+\/\d+\] differencing-disk: take a snapshot/);
  t.notMatch(r.out, /compare: \[/);

  const rep = JSON.parse(fs.readFileSync(json, 'utf8')) as CompareReport;
  t.same(
    rep.strategies.map((s) => s.name),
    ['differencing-disk', 'storage-snapshot'],
    'two strategies, in the order DESIGN.md shows',
  );
  t.equal(fsType(work), 'ext4', 'this test runs on ext4 (the machine root): no reflinks');
  t.same(rep.unavailable.map((u) => [u.name, u.reason.replace(/ext4/, 'FS')]), [['pointer-snapshot', 'the working directory is on FS, which cannot share extents (reflinks); run with --dir on xfs or btrfs']]);
  t.equal(rep.image.virtualSize, 48 * MiB);
  t.equal(rep.image.generated, true);
  t.match(rep.image.sha256, /^[0-9a-f]{64}$/);
  t.equal(rep.workload.kind, 'random');
  t.equal(rep.workload.spec, 'random:3%:4k-1m');
  t.ok(rep.workload.bytes >= 0.03 * 48 * MiB - 4096 && rep.workload.bytes <= 0.03 * 48 * MiB + MiB, `3% written: ${rep.workload.bytes}`);
  t.ok(rep.workload.touched.cluster64k >= rep.workload.bytes * 0.5, 'touched clusters cover the writes');

  for (const s of rep.strategies) {
    const m = s.metrics;
    for (const k of METRIC_NAMES) t.ok(k in m, `${s.name}: ${k} present`);
    for (const def of SCALAR_METRICS) {
      const v = m[def.key];
      t.ok(Number.isFinite(v) && v >= 0, `${s.name}: ${def.key} = ${v} is a finite non-negative number`);
      if (def.unit !== 'B') t.ok(v > 0, `${s.name}: ${def.key} is positive`);
    }
    t.ok(m.writeSeconds > 0 && m.writeFlushSeconds >= 0 && m.writeFlushSeconds <= m.writeSeconds, `${s.name}: write timing parts`);
    t.same(
      m.growth.map((g) => g.snapshots),
      [1, 4, 16],
      `${s.name}: growth at 1, 4, 16 snapshots`,
    );
    for (const g of m.growth) {
      t.ok(g.verified, `${s.name}: growth ${g.snapshots} verified`);
      t.ok(g.snapshotSeconds > 0 && g.readMBps > 0 && g.extraBytes > 0, `${s.name}: growth ${g.snapshots} figures positive`);
    }
    t.ok(m.growth[2].extraBytes > m.growth[0].extraBytes, `${s.name}: more snapshots take more space`);
  }

  const d = rep.strategies[0].metrics as StrategyMetrics;
  const s = rep.strategies[1].metrics as StrategyMetrics;
  // a fresh child is a few clusters of metadata; a first storage snapshot copies the data
  t.ok(d.snapshotBytes < MiB, `empty child: ${d.snapshotBytes} bytes`);
  t.ok(s.snapshotBytes > rep.image.allocatedBytes * 0.5, `first snapshot holds the data: ${s.snapshotBytes} of ${rep.image.allocatedBytes}`);
  // the child holds the clusters the writes touched, plus its tables
  t.ok(d.extraBytes >= rep.workload.touched.cluster64k, `child ${d.extraBytes} >= touched clusters ${rep.workload.touched.cluster64k}`);
  t.ok(d.extraBytes <= rep.workload.touched.cluster64k + 2 * MiB, `child ${d.extraBytes} ~ touched clusters + metadata`);
  // writing to the volume does not grow the store
  t.ok(Math.abs(s.extraBytes - s.snapshotBytes) < 256 * 1024, 'the store does not grow with writes to the volume');
  // a chain of 16 children holds roughly the 16 batches; the store holds them in 512 KiB blocks
  t.ok(d.growth[2].extraBytes < s.growth[2].extraBytes, 'a chain of children takes less than a store with a full first copy');

  t.equal(d.survivesVolumeLoss, false, 'a child does not survive losing its parent');
  t.equal(d.survival.code, 'ENOENT');
  t.match(d.survival.outcome, /does not exist/);
  t.equal(s.survivesVolumeLoss, true, 'a storage snapshot survives losing the volume');

  t.ok(rep.checks.length >= 14, `${rep.checks.length} checks`);
  t.ok(rep.checks.every((c) => c.ok), 'every byte-exact check passed');
  for (const strat of ['differencing-disk', 'storage-snapshot'] as const) {
    for (const name of ['read-back', 'state-with-snapshot', 'restore', 'rollback', 'growth-1', 'growth-4', 'growth-16']) {
      t.ok(rep.checks.some((c) => c.strategy === strat && c.name === name && c.ok), `${strat}: ${name} checked`);
    }
  }
  t.ok(rep.verdict.length >= 8 && rep.verdict.every((p) => p.length < 400), 'a verdict in short points');
  t.match(rep.verdict.join('\n'), /Losing the volume file: storage snapshot came back byte-exact; differencing disk did not \(ENOENT\)/);
  t.match(rep.verdict.join('\n'), /Pointer snapshot: not measured here/);
  t.ok(rep.baseline.writeMBps > 0 && rep.baseline.readMBps > 0 && rep.baseline.fullReadMBps > 0, 'raw baseline figures');

  // HTML: every chart, inline, nothing fetched from anywhere
  const page = fs.readFileSync(html, 'utf8');
  t.match(page, /^<!DOCTYPE html>/);
  for (const def of SCALAR_METRICS) t.match(page, new RegExp(`<svg[^>]*data-chart="${def.key}"`), `bar chart ${def.key}`);
  for (const g of ['growth-snapshotSeconds', 'growth-extraBytes', 'growth-readMBps']) t.match(page, new RegExp(`data-chart="${g}"`), `growth chart ${g}`);
  t.equal((page.match(/<rect class="bar" data-strategy="differencing-disk"/g) ?? []).length, SCALAR_METRICS.length, 'one blue bar per metric');
  t.equal((page.match(/<rect class="bar" data-strategy="storage-snapshot"/g) ?? []).length, SCALAR_METRICS.length, 'one orange bar per metric');
  t.equal((page.match(/<circle class="point"/g) ?? []).length, 2 * 3 * 3, 'growth points: 2 strategies x 3 N x 3 charts');
  t.notMatch(page, /<script|<link|<img|\bsrc=|\bhref=|@import|url\(/i, 'no script, stylesheet, image or link');
  t.notMatch(page.replace(/xmlns="http:\/\/www\.w3\.org\/2000\/svg"/g, ''), /https?:\/\//, 'no URL other than the SVG namespace');
  for (const p of rep.verdict) t.ok(page.includes(`<li>${p.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;')}</li>`), `the verdict point is on the page: ${p.slice(0, 40)}`);
  t.match(page, /<tr class="unavailable" data-strategy="pointer-snapshot">.*not available here/);
});

t.test('compare --json - prints the report on stdout; outputs are not overwritten without --force', async (t) => {
  const dir = t.testdir({ work: {}, 'taken.html': 'mine' });
  const work = path.join(dir, 'work');
  let r = cli(['compare', '--generate', '8M', '--growth', '1', '--dir', work, '--json', '-']);
  t.equal(r.status, 0, r.stderr);
  const rep = JSON.parse(r.out) as CompareReport;
  t.same(rep.strategies.map((s) => s.metrics.growth.length), [1, 1]);
  t.same(fs.readdirSync(work), []);

  const taken = path.join(dir, 'taken.html');
  r = cli(['compare', '--generate', '8M', '--growth', '1', '--dir', work, '--html', taken]);
  t.equal(r.status, 1);
  t.match(r.stderr, /already exists.*--force/);
  t.equal(fs.readFileSync(taken, 'utf8'), 'mine', 'untouched');
  t.notMatch(r.stderr, /compare: \[1\//, 'refused before any work');

  r = cli(['compare', '--generate', '8M', '--growth', '1', '--dir', work, '--html', taken, '--force']);
  t.equal(r.status, 0, r.stderr);
  t.match(fs.readFileSync(taken, 'utf8'), /<svg/);
  t.same(fs.readdirSync(dir).sort(), ['taken.html', 'work'], 'no temporary report files left');
});

t.test('the same seed does the same work on the same image', async (t) => {
  const dir = t.testdir({ work: {} });
  const work = path.join(dir, 'work');
  const run = (seed: string) => JSON.parse(cli(['compare', '--generate', '8M', '--growth', '1', '--seed', seed, '--dir', work, '--json', '-', '--only', 'storage-snapshot']).out) as CompareReport;
  const a = run('7');
  const b = run('7');
  const c = run('8');
  t.equal(a.image.sha256, b.image.sha256);
  t.same(a.workload, b.workload);
  t.not(a.image.sha256, c.image.sha256, 'another seed, another image');
  t.same(a.strategies.map((s) => s.name), ['storage-snapshot'], '--only runs one strategy');
});

const xfsSkip = needLoop(['mkfs.xfs']);

t.test('on xfs: pointer snapshots (reflink clones) are the third strategy, measured as the other two', { skip: xfsSkip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const img = path.join(s.dir, 'xfs.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 400 * MiB);
  const mk = sh('mkfs.xfs', ['-q', '-m', 'reflink=1', img]);
  t.equal(mk.status, 0, mk.stderr);
  const mp = path.join(s.dir, 'mnt');
  s.mount(img, mp, ['-o', 'loop']);
  const work = path.join(mp, 'work');
  fs.mkdirSync(work);
  t.equal(fsType(work), 'xfs', 'the mount table names the filesystem');
  const r = cli(['compare', '--generate', '32M', '--growth', '1,4', '--dir', work, '--json', '-']);
  t.equal(r.status, 0, r.stderr);
  const rep = JSON.parse(r.out) as CompareReport;
  t.same(rep.strategies.map((x) => x.name), ['differencing-disk', 'storage-snapshot', 'pointer-snapshot']);
  t.same(rep.unavailable, []);
  t.equal(rep.host.workDirFs, 'xfs');
  t.equal(rep.host.reflink, true);
  const p = rep.strategies[2].metrics;
  for (const k of METRIC_NAMES) t.ok(k in p, `pointer: ${k} present`);
  t.ok(p.snapshotBytes < 256 * 1024, `a clone shares every extent: ${p.snapshotBytes} bytes extra (st_blocks would count ${rep.image.allocatedBytes} again)`);
  // after the writes, the clone keeps the old extents the volume no longer maps: at most the
  // bytes written (writes into holes replace nothing), far less than a second copy
  t.ok(p.extraBytes > 0 && p.extraBytes <= rep.workload.touched.cluster64k, `the replaced extents stay with the clone: 0 < ${p.extraBytes} <= ${rep.workload.touched.cluster64k}`);
  t.ok(p.extraBytes < rep.image.allocatedBytes / 2, `not a copy of the image: ${p.extraBytes} < ${rep.image.allocatedBytes} / 2`);
  t.equal(p.survivesVolumeLoss, true, 'the clone is a file of its own: it survives losing the image file');
  t.same(p.growth.map((g) => g.snapshots), [1, 4]);
  t.ok(p.growth[1].extraBytes > p.growth[0].extraBytes, 'each clone keeps what the next batch overwrote');
  for (const name of ['read-back', 'state-with-snapshot', 'restore', 'rollback', 'growth-1', 'growth-4']) {
    t.ok(rep.checks.some((c) => c.strategy === 'pointer-snapshot' && c.name === name && c.ok), `pointer: ${name} checked byte-exact`);
  }
  t.same(fs.readdirSync(work), [], 'the working directory is removed');
  // asked for by name where it cannot work: refused before any work, saying why
  const ext4Work = t.testdir({ w: {} });
  const refused = cli(['compare', '--generate', '8M', '--growth', '1', '--dir', path.join(ext4Work, 'w'), '--only', 'pointer-snapshot']);
  t.equal(refused.status, 1);
  t.match(refused.stderr, /pointer snapshots: the working directory is on ext4, which cannot share extents/);
});
