/** The human report of `compare` on stdout: metric table, growth table, survival, checks, verdict. */
import { formatSize } from '../engine/size';
import { CompareReport, StrategyMetrics } from './types';
import { bestOf, formatMBps, formatSeconds, formatValue, noiseOf, SCALAR_METRICS, SHORT_NAMES, TIE_MARGIN } from './verdict';

function table(header: string[], rows: string[][], right: boolean[] = []): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) =>
    cells
      .map((c, i) => (right[i] ? c.padStart(widths[i]) : c.padEnd(widths[i])))
      .join('  ')
      .trimEnd();
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...rows.map(line)].join('\n');
}

export function wrap(text: string, width = 100): string {
  const out: string[] = [];
  let line = '';
  for (const word of text.split(/\s+/)) {
    if (line && line.length + 1 + word.length > width) {
      out.push(line);
      line = word;
    } else line = line ? `${line} ${word}` : word;
  }
  if (line) out.push(line);
  return out.join('\n');
}

const SHORT: Record<string, string> = { 'differencing-disk': 'differencing', 'storage-snapshot': 'storage', 'pointer-snapshot': 'pointer', tie: '~' };
const COLUMN: Record<string, string> = { 'differencing-disk': 'diff', 'storage-snapshot': 'store', 'pointer-snapshot': 'pointer' };

export function renderText(r: CompareReport): string {
  const col = (m: StrategyMetrics, f: (m: StrategyMetrics) => string) => f(m);
  const out: string[] = [];
  out.push(
    `disksnap compare: ${r.image.path}`,
    `  ${formatSize(r.image.virtualSize)} virtual, ${formatSize(r.image.allocatedBytes)} allocated; workload ${r.workload.spec}, seed ${r.workload.seed}: ` +
      `${formatSize(r.workload.bytes)} in ${r.workload.requests} writes` +
      (r.workload.fs ? ` (${r.workload.fs.files} files, ${formatSize(r.workload.fs.fileBytes)}, through ${r.workload.fs.mountedWith})` : ''),
    '',
  );
  const baselineOf: Record<string, number | undefined> = {
    writeMBps: r.baseline.writeMBps,
    readMBps: r.baseline.readMBps,
    fullReadMBps: r.baseline.fullReadMBps,
  };
  const ms = r.strategies.map((s) => s.metrics);
  const rows = SCALAR_METRICS.map((m) => {
    const noise = noiseOf(r, m);
    return [
      m.label,
      ...ms.map((x) => col(x, (y) => formatValue(y[m.key], m.unit))),
      baselineOf[m.key] !== undefined ? formatValue(baselineOf[m.key]!, m.unit) : '',
      SHORT[bestOf(r.strategies.map((s) => [s.name, s.metrics[m.key]]), m)],
      `${noise.flagged ? '! ' : ''}${noise.text}`,
    ];
  });
  const survivors = r.strategies.filter((s) => s.metrics.survivesVolumeLoss);
  rows.push([
    'survives losing the volume',
    ...ms.map((x) => (x.survivesVolumeLoss ? 'yes' : `no (${x.survival.code ?? 'error'})`)),
    '',
    survivors.length === 1 ? SHORT[survivors[0].name] : '',
    'checked',
  ]);
  const names = r.strategies.map((s) => SHORT_NAMES[s.name]);
  out.push(table(['metric', ...names, 'raw, no snapshot', 'better', 'noise'], rows, [false, ...names.map(() => true), true, false, false]));
  for (const u of r.unavailable ?? []) out.push(`${SHORT_NAMES[u.name]}: not available here (${u.reason})`);
  out.push('');

  const points = ms[0]?.growth.map((g) => g.snapshots) ?? [];
  if (points.length) {
    const grows = points.map((n, i) => [
      String(n),
      ...ms.flatMap((x) => [formatSeconds(x.growth[i].snapshotSeconds), formatSize(x.growth[i].extraBytes), formatMBps(x.growth[i].readMBps)]),
    ]);
    out.push(`growth: N snapshots (a chain of N children / N snapshots in one store / N clones), ${formatSize(r.workload.growthRoundBytes)} written after each`);
    const head = r.strategies.flatMap((s) => [`${COLUMN[s.name]}: snapshot time`, `${COLUMN[s.name]}: space`, `${COLUMN[s.name]}: read`]);
    out.push(table(['N', ...head], grows, [true, ...head.map(() => true)]));
    out.push('');
  }
  for (const st of r.strategies) {
    out.push(`${st.title}, losing the volume: ${st.metrics.survival.lost} gone → ${st.metrics.survival.outcome}`);
  }
  const ok = r.checks.filter((c) => c.ok).length;
  out.push(`checks: ${ok}/${r.checks.length} byte-exact (${[...new Set(r.checks.map((c) => c.name.replace(/-\d+$/, '-N')))].join(', ')})`);
  out.push(
    'times and throughputs are single runs (reads: median of 3 passes) on this machine; "~" marks a difference within ' +
      `${TIE_MARGIN.s * 100}% (times), ${TIE_MARGIN['MB/s'] * 100}% (throughput) or ${TIE_MARGIN.B * 100}% (space); "!" flags a row whose figures are noise`,
  );
  out.push('');
  out.push('verdict:');
  for (const p of r.verdict) out.push(wrap(`- ${p}`, 100).replace(/\n/g, '\n  '));
  return out.join('\n') + '\n';
}
