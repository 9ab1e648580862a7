/** The human report of `compare` on stdout: metric table, growth table, survival, checks, verdict. */
import { formatSize } from '../engine/size';
import { CompareReport, StrategyMetrics } from './types';
import { formatMBps, formatSeconds, formatValue, SCALAR_METRICS, TIE_MARGIN, winner } from './verdict';

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

const SHORT: Record<string, string> = { 'differencing-disk': 'differencing', 'storage-snapshot': 'storage', tie: '~' };

export function renderText(r: CompareReport): string {
  const d = r.strategies.find((s) => s.name === 'differencing-disk')?.metrics;
  const s = r.strategies.find((s) => s.name === 'storage-snapshot')?.metrics;
  const col = (m: StrategyMetrics | undefined, f: (m: StrategyMetrics) => string) => (m ? f(m) : '-');
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
  const rows = SCALAR_METRICS.map((m) => [
    m.label,
    col(d, (x) => formatValue(x[m.key], m.unit)),
    col(s, (x) => formatValue(x[m.key], m.unit)),
    baselineOf[m.key] !== undefined ? formatValue(baselineOf[m.key]!, m.unit) : '',
    d && s ? SHORT[winner(d[m.key], s[m.key], m)] : '',
  ]);
  rows.push([
    'survives losing the volume',
    col(d, (x) => (x.survivesVolumeLoss ? 'yes' : `no (${x.survival.code ?? 'error'})`)),
    col(s, (x) => (x.survivesVolumeLoss ? 'yes' : `no (${x.survival.code ?? 'error'})`)),
    '',
    d && s && d.survivesVolumeLoss !== s.survivesVolumeLoss ? SHORT[d.survivesVolumeLoss ? 'differencing-disk' : 'storage-snapshot'] : '',
  ]);
  out.push(table(['metric', 'differencing disk', 'storage snapshot', 'raw, no snapshot', 'better'], rows, [false, true, true, true, false]));
  out.push('');

  const points = (d ?? s)?.growth.map((g) => g.snapshots) ?? [];
  if (points.length) {
    const grows = points.map((n, i) => [
      String(n),
      col(d, (x) => formatSeconds(x.growth[i].snapshotSeconds)),
      col(d, (x) => formatSize(x.growth[i].extraBytes)),
      col(d, (x) => formatMBps(x.growth[i].readMBps)),
      col(s, (x) => formatSeconds(x.growth[i].snapshotSeconds)),
      col(s, (x) => formatSize(x.growth[i].extraBytes)),
      col(s, (x) => formatMBps(x.growth[i].readMBps)),
    ]);
    out.push(`growth: N snapshots (a chain of N children / N snapshots in one store), ${formatSize(r.workload.growthRoundBytes)} written after each`);
    out.push(
      table(
        ['N', 'diff: snapshot time', 'diff: space', 'diff: read', 'store: snapshot time', 'store: space', 'store: read'],
        grows,
        [true, true, true, true, true, true, true],
      ),
    );
    out.push('');
  }
  for (const st of r.strategies) {
    out.push(`${st.title}, losing the volume: ${st.metrics.survival.lost} gone → ${st.metrics.survival.outcome}`);
  }
  const ok = r.checks.filter((c) => c.ok).length;
  out.push(`checks: ${ok}/${r.checks.length} byte-exact (${[...new Set(r.checks.map((c) => c.name.replace(/-\d+$/, '-N')))].join(', ')})`);
  out.push(
    'times and throughputs are single runs (reads: median of 3 passes) on this machine; "~" marks a difference within ' +
      `${TIE_MARGIN.s * 100}% (times), ${TIE_MARGIN['MB/s'] * 100}% (throughput) or ${TIE_MARGIN.B * 100}% (space)`,
  );
  out.push('');
  out.push(wrap(r.verdict));
  return out.join('\n') + '\n';
}
