/**
 * The one-paragraph verdict of a compare run, from the numbers alone.
 *
 * Each metric has a winner when one side is better by more than a margin that follows how
 * repeatable the figure is: 10 % for space (st_blocks does not jitter), 20 % for times and
 * 25 % for throughputs (single timed runs; on a busy machine they vary by that much from
 * run to run). A time is also a tie when the slower one took under 2 ms — both are
 * "instant" to a person. The paragraph
 * states the figures that decide, then who wins what, then when to pick which:
 * - differencing disks are for cheap, frequent checkpoints that are rolled back (test
 *   environments) when their wins are snapshot time, space and rollback;
 * - storage snapshots are for copies that must outlive the volume (they are the only ones
 *   that survive its loss, checked), for write-heavy use (no copy-on-write on the live
 *   volume), and for many versions (no chain to read through);
 * and it says where this image contradicts the usual expectation (e.g. a child that writes
 * as fast as the raw volume, or a store that costs less than the child).
 */
import { formatSize } from '../engine/size';
import { CompareReport, StrategyMetrics } from './types';

/** Differences within these margins are ties (see the note above). */
export const TIE_MARGIN: Record<'s' | 'B' | 'MB/s', number> = { B: 0.1, s: 0.2, 'MB/s': 0.25 };
const INSTANT = 0.002;

export type Winner = 'differencing-disk' | 'storage-snapshot' | 'tie';

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

export function winner(d: number, s: number, def: Pick<MetricDef, 'unit' | 'higherIsBetter'>): Winner {
  if (def.unit === 's' && Math.max(d, s) < INSTANT) return 'tie';
  const [good, bad] = def.higherIsBetter ? [Math.max(d, s), Math.min(d, s)] : [Math.min(d, s), Math.max(d, s)];
  if (good === bad) return 'tie';
  const margin = def.higherIsBetter ? (good - bad) / Math.max(good, 1e-12) : (bad - good) / Math.max(bad, 1e-12);
  if (margin <= TIE_MARGIN[def.unit]) return 'tie';
  const dBetter = def.higherIsBetter ? d > s : d < s;
  return dBetter ? 'differencing-disk' : 'storage-snapshot';
}

/** "12x", "1.4x": how many times better the winner is. */
export function factor(d: number, s: number, higherIsBetter: boolean): string {
  const hi = Math.max(d, s);
  const lo = Math.min(d, s);
  if (lo <= 0) return '∞x';
  const f = hi / lo;
  void higherIsBetter;
  return f >= 10 ? `${Math.round(f)}x` : `${f.toFixed(1)}x`;
}

function metricsOf(r: CompareReport, name: string): StrategyMetrics | undefined {
  return r.strategies.find((s) => s.name === name)?.metrics;
}

export function verdict(r: CompareReport): string {
  const d = metricsOf(r, 'differencing-disk');
  const s = metricsOf(r, 'storage-snapshot');
  const img = `${formatSize(r.image.virtualSize)} image with ${formatSize(r.image.allocatedBytes)} allocated`;
  const wl = `${r.workload.spec} (${formatSize(r.workload.bytes)} written in ${r.workload.requests} requests)`;
  if (!d || !s) {
    const only = d ? 'differencing-disk' : 'storage-snapshot';
    return `Only the ${only} strategy was measured on this ${img} with workload ${wl}; a verdict needs both.`;
  }
  const parts: string[] = [];
  parts.push(`On this ${img} with workload ${wl}:`);

  const w = (key: MetricDef['key']): Winner => winner(d[key], s[key], SCALAR_METRICS.find((m) => m.key === key)!);

  // snapshot
  parts.push(
    `a differencing disk is taken in ${formatSeconds(d.snapshotSeconds)} and costs ${formatSize(d.snapshotBytes)}, ` +
      `a storage snapshot in ${formatSeconds(s.snapshotSeconds)} for ${formatSize(s.snapshotBytes)} ` +
      (w('snapshotSeconds') === 'tie' ? '(about the same time);' : `(${factor(d.snapshotSeconds, s.snapshotSeconds, false)} ${w('snapshotSeconds') === 'differencing-disk' ? 'slower' : 'faster'});`),
  );
  // writes
  const rawW = r.baseline.writeMBps;
  const pctRaw = rawW > 0 && Number.isFinite(rawW) ? Math.round((d.writeMBps / rawW) * 100) : undefined;
  parts.push(
    `while it exists the child takes writes at ${formatMBps(d.writeMBps)}` +
      (pctRaw !== undefined ? ` (${pctRaw}% of the raw volume's ${formatMBps(rawW)})` : '') +
      `, the snapshotted volume at ${formatMBps(s.writeMBps)}, and the child grows to ${formatSize(d.extraBytes)} ` +
      `(the writes touch ${formatSize(r.workload.touched.cluster64k)} of 64 KiB clusters) while the store stays at ${formatSize(s.extraBytes)};`,
  );
  // rollback / restore
  parts.push(
    `rolling back takes ${formatSeconds(d.rollbackSeconds)} (discard the child) against ${formatSeconds(s.rollbackSeconds)} (rewrite the changed blocks), ` +
      `and a new independent volume takes ${formatSeconds(d.restoreSeconds)} against ${formatSeconds(s.restoreSeconds)}.`,
  );
  // growth
  const dg = d.growth;
  const sg = s.growth;
  if (dg.length > 1 && sg.length > 1) {
    const d0 = dg[0];
    const dn = dg[dg.length - 1];
    const s0 = sg[0];
    const sn = sg[sg.length - 1];
    const readDrop = d0.readMBps > 0 ? Math.round((1 - dn.readMBps / d0.readMBps) * 100) : 0;
    parts.push(
      `With ${dn.snapshots} snapshots instead of ${d0.snapshots}, a whole-image read through the chain goes from ${formatMBps(d0.readMBps)} to ${formatMBps(dn.readMBps)}` +
        (readDrop > 10 ? ` (${readDrop}% slower)` : readDrop < -10 ? '' : ' (about the same)') +
        ` while the raw volume reads at ${formatMBps(sn.readMBps)}; the children take ${formatSize(dn.extraBytes)} and the store ${formatSize(sn.extraBytes)} ` +
        `(${formatSize(s0.extraBytes)} after one snapshot), and taking them costs ${formatSeconds(dn.snapshotSeconds)} against ${formatSeconds(sn.snapshotSeconds)}.`,
    );
  }
  // survival
  if (s.survivesVolumeLoss && !d.survivesVolumeLoss) {
    parts.push(`Only the storage snapshot survived losing the volume: it restored byte-exact, while the child without its parent failed (${d.survival.code ?? 'error'}).`);
  } else if (s.survivesVolumeLoss && d.survivesVolumeLoss) {
    parts.push('Both came back after the volume was lost.');
  } else {
    parts.push(`Losing the volume: differencing disk ${d.survivesVolumeLoss ? 'survived' : 'did not survive'}, storage snapshot ${s.survivesVolumeLoss ? 'survived' : 'did not survive'}.`);
  }

  // who wins what
  const dWins: string[] = [];
  const sWins: string[] = [];
  for (const m of SCALAR_METRICS) {
    const x = w(m.key);
    if (x === 'differencing-disk') dWins.push(m.label);
    else if (x === 'storage-snapshot') sWins.push(m.label);
  }
  if (dg.length > 1 && sg.length > 1) {
    const last = dg.length - 1;
    const gRead = winner(dg[last].readMBps, sg[last].readMBps, { unit: 'MB/s', higherIsBetter: true });
    if (gRead === 'storage-snapshot') sWins.push(`reads with ${dg[last].snapshots} snapshots`);
    else if (gRead === 'differencing-disk') dWins.push(`reads with ${dg[last].snapshots} snapshots`);
    const gSpace = winner(dg[last].extraBytes, sg[last].extraBytes, { unit: 'B', higherIsBetter: false });
    if (gSpace === 'storage-snapshot') sWins.push(`space with ${sg[last].snapshots} snapshots`);
    else if (gSpace === 'differencing-disk') dWins.push(`space with ${dg[last].snapshots} snapshots`);
  }
  if (s.survivesVolumeLoss && !d.survivesVolumeLoss) sWins.push('surviving the loss of the volume');

  const advice: string[] = [];
  const dQuick = dWins.includes('time to snapshot') || dWins.includes('time to roll back');
  if (dWins.length) {
    advice.push(
      `Differencing disks win here on ${list(dWins)}` +
        (dQuick ? ': pick them for frequent, short-lived checkpoints that you roll back or throw away (test environments, CI), as long as the parent is kept safe — a child is worthless without it' : ''),
    );
  }
  if (sWins.length) {
    const why: string[] = [];
    if (sWins.includes('surviving the loss of the volume')) why.push('backups that must outlive the volume');
    if (sWins.includes('write throughput with the snapshot')) why.push('write-heavy volumes');
    if (sWins.some((x) => x.startsWith('reads with') || x.startsWith('space with'))) why.push('keeping many versions');
    if (sWins.includes('time to restore into a new volume')) why.push('cloning volumes');
    advice.push(`storage snapshots win on ${list(sWins)}` + (why.length ? `: pick them for ${list(why)}` : ''));
  }
  if (!advice.length) advice.push('The two strategies are within the noise of each other on every figure here');
  parts.push(capitalise(advice.join('; ')) + '.');
  return parts.join(' ');
}

function list(xs: string[]): string {
  if (xs.length <= 1) return xs.join('');
  return `${xs.slice(0, -1).join(', ')} and ${xs[xs.length - 1]}`;
}

function capitalise(s: string): string {
  return s.charAt(0).toUpperCase() + s.slice(1);
}
