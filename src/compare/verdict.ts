/**
 * The verdict of a compare run, from the numbers alone, as short points a reader can skim.
 *
 * Each metric has a winner when the best strategy beats every other by more than a margin
 * that follows how repeatable the figure is: 10 % for space (st_blocks and FIEMAP do not
 * jitter), 20 % for times and 25 % for throughputs (single timed runs; on a busy machine they
 * vary by that much from run to run). A time is also a tie when the slower one took under 2 ms
 * — both are "instant" to a person. The points state the figures side by side, metric group
 * by metric group, then who wins what and when to pick which:
 * - differencing disks: cheap, frequent checkpoints that are rolled back (test environments);
 * - storage snapshots: copies that must outlive the volume (checked by losing it), write-heavy
 *   use, many versions (no chain to read through);
 * - pointer snapshots (reflink clones, xfs/btrfs): instant checkpoints on the same disk,
 *   no backup.
 * A figure that cannot be right (the raw volume, which does the least work, slower than a
 * strategy) or whose passes disagree by more than the margin is flagged as noise.
 */
import { formatSize } from '../engine/size';
import { CompareReport, StrategyMetrics, StrategyName } from './types';

/** Differences within these margins are ties (see the note above). */
export const TIE_MARGIN: Record<'s' | 'B' | 'MB/s', number> = { B: 0.1, s: 0.2, 'MB/s': 0.25 };
const INSTANT = 0.002;

export type Winner = StrategyName | 'tie';

export interface MetricDef {
  key: 'snapshotSeconds' | 'snapshotBytes' | 'writeMBps' | 'readMBps' | 'fullReadMBps' | 'extraBytes' | 'rollbackSeconds' | 'restoreSeconds';
  label: string;
  unit: 's' | 'B' | 'MB/s';
  higherIsBetter: boolean;
}

/** The scalar metrics, in report order (tables and charts use this list). */
export const SCALAR_METRICS: readonly MetricDef[] = [
  { key: 'snapshotSeconds', label: 'time to snapshot', unit: 's', higherIsBetter: false },
  { key: 'snapshotBytes', label: 'space right after the snapshot', unit: 'B', higherIsBetter: false },
  { key: 'writeMBps', label: 'write throughput with the snapshot', unit: 'MB/s', higherIsBetter: true },
  { key: 'readMBps', label: 'read-back throughput with the snapshot', unit: 'MB/s', higherIsBetter: true },
  { key: 'fullReadMBps', label: 'whole-image read with the snapshot', unit: 'MB/s', higherIsBetter: true },
  { key: 'extraBytes', label: 'extra space after the workload', unit: 'B', higherIsBetter: false },
  { key: 'rollbackSeconds', label: 'time to roll back', unit: 's', higherIsBetter: false },
  { key: 'restoreSeconds', label: 'time to restore into a new volume', unit: 's', higherIsBetter: false },
];

export function formatSeconds(s: number): string {
  if (!Number.isFinite(s)) return String(s);
  if (s < 1e-3) return `${(s * 1e6).toFixed(0)} µs`;
  if (s < 1) return `${(s * 1e3).toFixed(s < 0.01 ? 2 : 1)} ms`;
  return `${s.toFixed(s < 10 ? 2 : 1)} s`;
}

export function formatMBps(v: number): string {
  if (!Number.isFinite(v)) return '∞ MB/s';
  return `${v >= 100 ? Math.round(v).toLocaleString('en-US') : v.toFixed(1)} MB/s`;
}

export function formatValue(v: number, unit: MetricDef['unit']): string {
  return unit === 's' ? formatSeconds(v) : unit === 'B' ? formatSize(v) : formatMBps(v);
}

/**
 * The strategy whose figure beats every other's by more than the metric's margin, or 'tie'.
 * NaN and missing figures take no part.
 */
export function bestOf(values: Array<[StrategyName, number]>, def: Pick<MetricDef, 'unit' | 'higherIsBetter'>): Winner {
  const vs = values.filter(([, v]) => !Number.isNaN(v));
  if (vs.length < 2) return 'tie';
  const better = (a: number, b: number) => (def.higherIsBetter ? a > b : a < b);
  const sorted = [...vs].sort((a, b) => (better(a[1], b[1]) ? -1 : better(b[1], a[1]) ? 1 : 0));
  const [[name, good], [, bad]] = sorted;
  if (def.unit === 's' && Math.max(good, bad) < INSTANT) return 'tie';
  if (good === bad) return 'tie';
  const margin = def.higherIsBetter ? (good - bad) / Math.max(good, 1e-12) : (bad - good) / Math.max(bad, 1e-12);
  return margin <= TIE_MARGIN[def.unit] ? 'tie' : name;
}

/** bestOf for the two strategies disksnap builds. */
export function winner(d: number, s: number, def: Pick<MetricDef, 'unit' | 'higherIsBetter'>): Winner {
  return bestOf([['differencing-disk', d], ['storage-snapshot', s]], def);
}

export const SHORT_NAMES: Record<string, string> = {
  'differencing-disk': 'differencing disk',
  'storage-snapshot': 'storage snapshot',
  'pointer-snapshot': 'pointer snapshot',
  baseline: 'raw, no snapshot',
};

/** How trustworthy one row's figures are: a short note, flagged when it is noise. */
export interface NoiseNote {
  text: string;
  flagged: boolean;
}

const BASELINE_KEYS = ['writeMBps', 'readMBps', 'fullReadMBps'] as const;

/**
 * The noise note of a metric row: the spread of its passes where it was measured more than
 * once (flagged beyond the metric's margin), "1 run" otherwise; and a flag when the raw
 * volume without any snapshot — the least work — is slower than a strategy by more than the
 * margin: that figure is the machine's noise, not the strategy's merit.
 */
export function noiseOf(r: CompareReport, def: MetricDef): NoiseNote {
  const margin = TIE_MARGIN[def.unit];
  const spreadOf = (x: { spread?: Partial<Record<string, number>> }) => x.spread?.[def.key];
  const spreads = [...r.strategies.map((s) => spreadOf(s.metrics)), spreadOf(r.baseline)].filter(
    (x): x is number => x !== undefined && Number.isFinite(x),
  );
  const notes: string[] = [];
  let flagged = false;
  if (spreads.length) {
    const worst = Math.max(...spreads);
    notes.push(`passes within ±${Math.round(worst * 50)}%`);
    if (worst > margin) flagged = true;
  } else notes.push('1 run');
  const base = (r.baseline as unknown as Record<string, number | undefined>)[def.key];
  if (base !== undefined && Number.isFinite(base) && (BASELINE_KEYS as readonly string[]).includes(def.key)) {
    for (const s of r.strategies) {
      const v = s.metrics[def.key];
      const faster = def.higherIsBetter ? (v - base) / Math.max(v, 1e-12) : (base - v) / Math.max(base, 1e-12);
      if (faster > margin) {
        notes.push(`raw slower than ${SHORT_NAMES[s.name]}: noise`);
        flagged = true;
        break;
      }
    }
  }
  return { text: notes.join('; '), flagged };
}

function figures(r: CompareReport, f: (m: StrategyMetrics) => string): string {
  return r.strategies.map((s) => `${SHORT_NAMES[s.name]} ${f(s.metrics)}`).join(', ');
}

function winnerPhrase(w: Winner, what: string): string {
  return w === 'tie' ? `no clear ${what}` : `${what}: ${SHORT_NAMES[w]}`;
}

const ADVICE: Record<StrategyName, string> = {
  'differencing-disk': 'frequent, short-lived checkpoints you roll back or throw away (test environments, CI), as long as the parent is kept safe',
  'storage-snapshot': 'backups that must outlive the volume, write-heavy volumes and keeping many versions',
  'pointer-snapshot': 'instant checkpoints on xfs or btrfs; they share the volume\'s disk, so they are no backup',
};

/** The verdict as short points: figures side by side, then what each wins and when to pick it. */
export function verdict(r: CompareReport): string[] {
  const pts: string[] = [];
  const img = `${formatSize(r.image.virtualSize)} image, ${formatSize(r.image.allocatedBytes)} allocated`;
  pts.push(`Measured on a ${img}; workload ${r.workload.spec}: ${formatSize(r.workload.bytes)} in ${r.workload.requests} writes.`);
  for (const u of r.unavailable ?? []) pts.push(`${capitalise(SHORT_NAMES[u.name])}: not measured here — ${u.reason}.`);
  if (r.strategies.length === 0) return pts;
  const def = (key: MetricDef['key']) => SCALAR_METRICS.find((m) => m.key === key)!;
  const w = (key: MetricDef['key']) => bestOf(r.strategies.map((s) => [s.name, s.metrics[key]]), def(key));
  const flag = (key: MetricDef['key']) => (noiseOf(r, def(key)).flagged ? ' (noisy: see the table)' : '');
  pts.push(
    `Snapshot: ${figures(r, (m) => `${formatSeconds(m.snapshotSeconds)}, ${formatSize(m.snapshotBytes)}`)}; ${winnerPhrase(w('snapshotSeconds'), 'fastest')}.`,
  );
  pts.push(
    `Writes with the snapshot: ${figures(r, (m) => formatMBps(m.writeMBps))}; raw volume ${formatMBps(r.baseline.writeMBps)}${flag('writeMBps')}.`,
  );
  pts.push(`Space after the workload: ${figures(r, (m) => formatSize(m.extraBytes))} (the writes touch ${formatSize(r.workload.touched.cluster64k)} of 64 KiB clusters).`);
  pts.push(`Reads: ${figures(r, (m) => formatMBps(m.fullReadMBps))} for the whole image; raw ${formatMBps(r.baseline.fullReadMBps)}${flag('fullReadMBps')}.`);
  pts.push(`Roll back: ${figures(r, (m) => formatSeconds(m.rollbackSeconds))}. New volume: ${figures(r, (m) => formatSeconds(m.restoreSeconds))}.`);
  const n = r.strategies[0].metrics.growth.length;
  if (n > 1) {
    const at = (m: StrategyMetrics) => m.growth[n - 1];
    pts.push(
      `With ${at(r.strategies[0].metrics).snapshots} snapshots: reads ${figures(r, (m) => formatMBps(at(m).readMBps))}; space ${figures(r, (m) => formatSize(at(m).extraBytes))}.`,
    );
  }
  const survived = r.strategies.filter((s) => s.metrics.survivesVolumeLoss);
  const lost = r.strategies.filter((s) => !s.metrics.survivesVolumeLoss);
  pts.push(
    `Losing the volume file: ${survived.length ? `${list(survived.map((s) => SHORT_NAMES[s.name]))} came back byte-exact` : 'nothing came back'}` +
      (lost.length ? `; ${list(lost.map((s) => `${SHORT_NAMES[s.name]} did not (${s.metrics.survival.code ?? 'error'})`))}` : '') +
      (survived.some((s) => s.name === 'pointer-snapshot') ? ' (a pointer snapshot lives on the same disk: losing the disk loses it)' : '') +
      '.',
  );

  const wins = new Map<StrategyName, string[]>();
  const won = (name: Winner, what: string) => {
    if (name !== 'tie') wins.set(name, [...(wins.get(name) ?? []), what]);
  };
  for (const m of SCALAR_METRICS) if (!noiseOf(r, m).flagged) won(w(m.key), m.label);
  if (n > 1) {
    const g = (key: 'readMBps' | 'extraBytes', unit: MetricDef['unit'], higherIsBetter: boolean) =>
      bestOf(r.strategies.map((s) => [s.name, s.metrics.growth[n - 1][key]]), { unit, higherIsBetter });
    won(g('readMBps', 'MB/s', true), `reads with ${r.strategies[0].metrics.growth[n - 1].snapshots} snapshots`);
    won(g('extraBytes', 'B', false), `space with ${r.strategies[0].metrics.growth[n - 1].snapshots} snapshots`);
  }
  if (survived.length === 1) won(survived[0].name, 'surviving the loss of the volume');
  for (const s of r.strategies) {
    const ws = wins.get(s.name);
    if (ws) pts.push(`${capitalise(SHORT_NAMES[s.name])}s win on ${list(ws)}: pick them for ${ADVICE[s.name]}.`);
  }
  if (!wins.size) pts.push('The strategies are within the noise of each other on every figure here.');
  return pts;
}

function list(xs: string[]): string {
  if (xs.length <= 1) return xs.join('');
  return `${xs.slice(0, -1).join(', ')} and ${xs[xs.length - 1]}`;
}

function capitalise(s: string): string {
  return s.charAt(0).toUpperCase() + s.slice(1);
}
