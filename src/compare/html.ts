/**
 * The HTML report of `compare` (`--html FILE`) and its charts as standalone SVG (`--svg FILE`).
 *
 * Self-contained: inline CSS and static inline SVG, no script, no font, no image and no link
 * to anything outside the file, so it reads the same offline. Every chart is an <svg> with
 * `data-chart` naming what it shows; every bar is a <rect class="bar"> with
 * `data-strategy` and `data-value`, every growth point a <circle class="point">, so tests and
 * scripts can find them.
 */
import { formatSize } from '../engine/size';
import { CompareReport, GrowthPoint, StrategyMetrics } from './types';
import { bestOf, formatMBps, formatSeconds, formatValue, MetricDef, noiseOf, SCALAR_METRICS, SHORT_NAMES, TIE_MARGIN } from './verdict';

export const COLORS: Record<string, string> = {
  'differencing-disk': '#2f6db5',
  'storage-snapshot': '#d9731f',
  'pointer-snapshot': '#2e8b57',
  baseline: '#8d949b',
};

const LABELS = SHORT_NAMES;

export function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

function num(v: number): string {
  return Number.isFinite(v) ? String(Math.round(v * 1000) / 1000) : '0';
}

interface Bar {
  series: string;
  value: number;
}

const BAR_W = 460;
const BAR_LABEL = 130;
const BAR_VALUE = 90;

/** Horizontal bars of one metric: one per strategy (and the raw baseline where it applies). */
export function barChart(def: MetricDef, bars: Bar[], x = 0, y = 0): string {
  const rowH = 22;
  const top = 26;
  const h = top + bars.length * rowH + 8;
  const area = BAR_W - BAR_LABEL - BAR_VALUE;
  const finite = bars.map((b) => (Number.isFinite(b.value) ? b.value : 0));
  const max = Math.max(...finite, 1e-12);
  const better = def.higherIsBetter ? 'higher is better' : 'lower is better';
  const rows = bars
    .map((b, i) => {
      const v = finite[i];
      const w = Math.max(v > 0 ? 1 : 0, (v / max) * area);
      const yy = top + i * rowH;
      return (
        `<text x="${BAR_LABEL - 6}" y="${yy + 14}" text-anchor="end" class="lbl">${esc(LABELS[b.series] ?? b.series)}</text>` +
        `<rect class="bar" data-strategy="${esc(b.series)}" data-value="${num(b.value)}" x="${BAR_LABEL}" y="${yy + 3}" width="${num(w)}" height="${rowH - 7}" fill="${COLORS[b.series] ?? '#555'}"><title>${esc(LABELS[b.series] ?? b.series)}: ${esc(formatValue(b.value, def.unit))}</title></rect>` +
        `<text x="${num(BAR_LABEL + w + 5)}" y="${yy + 14}" class="val">${esc(formatValue(b.value, def.unit))}</text>`
      );
    })
    .join('');
  return (
    `<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-chart="${def.key}" x="${x}" y="${y}" width="${BAR_W}" height="${h}" viewBox="0 0 ${BAR_W} ${h}" role="img" aria-label="${esc(def.label)}">` +
    `<text x="0" y="15" class="ttl">${esc(def.label)}</text><text x="${BAR_W - 4}" y="15" text-anchor="end" class="sub">${better}</text>` +
    `<line x1="${BAR_LABEL}" y1="${top}" x2="${BAR_LABEL}" y2="${h - 6}" class="axis"/>` +
    rows +
    `</svg>`
  );
}

export interface GrowthDef {
  key: keyof Pick<GrowthPoint, 'snapshotSeconds' | 'extraBytes' | 'readMBps'>;
  label: string;
  unit: MetricDef['unit'];
}

export const GROWTH_METRICS: readonly GrowthDef[] = [
  { key: 'snapshotSeconds', label: 'time to take N snapshots', unit: 's' },
  { key: 'extraBytes', label: 'extra space with N snapshots', unit: 'B' },
  { key: 'readMBps', label: 'whole-image read with N snapshots', unit: 'MB/s' },
];

/** The scale a byte axis is labelled in: the largest of KiB, MiB, GiB, TiB not above `v`. */
function byteScale(v: number): [number, string] {
  let out: [number, string] = [1, 'B'];
  for (const [k, name] of [[2 ** 10, 'KiB'], [2 ** 20, 'MiB'], [2 ** 30, 'GiB'], [2 ** 40, 'TiB']] as const) if (v >= k) out = [k, name];
  return out;
}

/**
 * Round ticks from 0 for an axis whose data reach `v`: a step of 1, 2 or 5 times a power of
 * ten (in the axis's own scale for bytes), 3 to 6 ticks, the last one at or above `v`. So
 * "0, 2 s, 4 s, 6 s" rather than "0, 1.56 s, 3.13 s, ...".
 */
export function niceTicks(v: number, unit: MetricDef['unit']): number[] {
  const max = Number.isFinite(v) && v > 0 ? v : 1;
  const [scale] = unit === 'B' ? byteScale(max) : [1];
  const x = max / scale;
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  const step = [0.1, 0.2, 0.5, 1, 2, 5, 10].map((f) => f * p).find((st) => Math.ceil(x / st - 1e-9) <= 5)!;
  const n = Math.max(1, Math.ceil(x / step - 1e-9));
  return Array.from({ length: n + 1 }, (_, i) => Number((i * step).toPrecision(12)) * scale);
}

/** A tick label: as few digits as the tick needs, in the axis's unit (bytes in the scale of the top tick). */
export function tickLabel(v: number, unit: MetricDef['unit'], top: number): string {
  if (v === 0) return '0';
  const trim = (x: number) => String(Number(x.toPrecision(6)));
  if (unit === 'B') {
    const [k, name] = byteScale(top);
    return `${trim(v / k)} ${name}`;
  }
  if (unit === 's') return top < 1 ? `${trim(v * 1000)} ms` : `${trim(v)} s`;
  return `${trim(v)} MB/s`;
}

const G_W = 320;
const G_H = 230;

/**
 * A growth curve: value against N for each strategy. N is on a logarithmic axis (1, 4, 16
 * evenly spaced), and the axis title says so; y ticks are round (niceTicks); the legend sits
 * above the plot area, so it never covers a point.
 */
export function growthChart(def: GrowthDef, series: { name: string; points: GrowthPoint[] }[], x = 0, y = 0): string {
  const left = 64;
  const right = 14;
  const top = 30 + series.length * 14;
  const bottom = 34;
  const all = series.flatMap((s) => s.points.map((p) => p[def.key])).filter(Number.isFinite);
  const ticks = niceTicks(Math.max(...all, 0), def.unit);
  const max = ticks[ticks.length - 1];
  const ns = [...new Set(series.flatMap((s) => s.points.map((p) => p.snapshots)))].sort((a, b) => a - b);
  const lo = Math.log(ns[0] ?? 1);
  const hi = Math.log(ns[ns.length - 1] ?? 1);
  const px = (n: number) => left + (hi > lo ? ((Math.log(n) - lo) / (hi - lo)) * (G_W - left - right) : (G_W - left - right) / 2);
  const py = (v: number) => G_H - bottom - (Math.min(Number.isFinite(v) ? v : 0, max) / max) * (G_H - top - bottom);
  let out =
    `<svg xmlns="http://www.w3.org/2000/svg" class="chart growth" data-chart="growth-${def.key}" x="${x}" y="${y}" width="${G_W}" height="${G_H}" viewBox="0 0 ${G_W} ${G_H}" role="img" aria-label="${esc(def.label)}">` +
    `<text x="0" y="15" class="ttl">${esc(def.label)}</text>`;
  series.forEach((s, i) => {
    const ly = 24 + i * 14;
    out += `<g class="legend"><rect x="${left}" y="${ly}" width="10" height="3" fill="${COLORS[s.name]}"/><text x="${left + 14}" y="${ly + 5}" class="tick">${esc(LABELS[s.name] ?? s.name)}</text></g>`;
  });
  out +=
    `<line x1="${left}" y1="${top}" x2="${left}" y2="${G_H - bottom}" class="axis"/>` +
    `<line x1="${left}" y1="${G_H - bottom}" x2="${G_W - right}" y2="${G_H - bottom}" class="axis"/>`;
  for (const t of ticks) {
    out += `<text x="${left - 4}" y="${num(py(t) + 4)}" text-anchor="end" class="tick ytick">${esc(tickLabel(t, def.unit, max))}</text>`;
    out += `<line x1="${left}" y1="${num(py(t))}" x2="${G_W - right}" y2="${num(py(t))}" class="grid"/>`;
  }
  for (const n of ns) out += `<text x="${num(px(n))}" y="${G_H - bottom + 14}" text-anchor="middle" class="tick xtick">${n}</text>`;
  out += `<text x="${(left + G_W - right) / 2}" y="${G_H - 4}" text-anchor="middle" class="sub xtitle">snapshots N (log scale)</text>`;
  for (const s of series) {
    const pts = s.points.map((p) => `${num(px(p.snapshots))},${num(py(p[def.key]))}`).join(' ');
    out += `<polyline class="line" data-strategy="${esc(s.name)}" points="${pts}" fill="none" stroke="${COLORS[s.name]}" stroke-width="2"/>`;
    for (const p of s.points) {
      out += `<circle class="point" data-strategy="${esc(s.name)}" data-n="${p.snapshots}" data-value="${num(p[def.key])}" cx="${num(px(p.snapshots))}" cy="${num(py(p[def.key]))}" r="3.5" fill="${COLORS[s.name]}"><title>${esc(LABELS[s.name])}, N=${p.snapshots}: ${esc(formatValue(p[def.key], def.unit))}</title></circle>`;
    }
  }
  return out + `</svg>`;
}

const STYLE_SVG =
  '.ttl{font:600 13px sans-serif;fill:#222}.sub{font:11px sans-serif;fill:#777}.lbl{font:12px sans-serif;fill:#333}' +
  '.val{font:12px sans-serif;fill:#222}.tick{font:10px sans-serif;fill:#555}.axis{stroke:#444;stroke-width:1}.grid{stroke:#e3e3e3;stroke-width:1}';

/** The raw volume's figure of a metric, where the baseline measures it. */
function baselineOf(r: CompareReport, key: MetricDef['key']): number | undefined {
  const b = r.baseline as unknown as Record<string, unknown>;
  return typeof b[key] === 'number' ? (b[key] as number) : undefined;
}

function barsFor(r: CompareReport, def: MetricDef): Bar[] {
  const bars: Bar[] = r.strategies.map((s) => ({ series: s.name, value: s.metrics[def.key] }));
  const base = baselineOf(r, def.key);
  if (base !== undefined) bars.push({ series: 'baseline', value: base });
  return bars;
}

function legend(r: CompareReport, x: number, y: number, withBaseline: boolean): string {
  const items: string[] = [...r.strategies.map((s) => s.name), ...(withBaseline ? ['baseline'] : [])];
  return items
    .map((k, i) => `<rect x="${x + i * 170}" y="${y}" width="12" height="12" fill="${COLORS[k]}"/><text x="${x + i * 170 + 17}" y="${y + 11}" class="lbl">${LABELS[k]}</text>`)
    .join('');
}

/** Every chart of a report in one standalone SVG (for READMEs: docs/compare-demo.svg). */
export function renderOverviewSvg(r: CompareReport): string {
  const gap = 16;
  const charts: string[] = [];
  let y = 64;
  let col = 0;
  let rowH = 0;
  for (const def of SCALAR_METRICS) {
    const svg = barChart(def, barsFor(r, def), col * (BAR_W + gap), y);
    const h = Number(/height="(\d+)"/.exec(svg)![1]);
    rowH = Math.max(rowH, h);
    charts.push(svg);
    if (++col === 2) {
      col = 0;
      y += rowH + gap;
      rowH = 0;
    }
  }
  if (col) y += rowH + gap;
  const series = r.strategies.map((s) => ({ name: s.name, points: s.metrics.growth }));
  GROWTH_METRICS.forEach((g, i) => charts.push(growthChart(g, series, i * (G_W + gap), y)));
  y += G_H + gap;
  const width = Math.max(2 * BAR_W + gap, 3 * G_W + 2 * gap);
  const title = `disksnap compare — ${formatSize(r.image.virtualSize)} image, workload ${r.workload.spec}`;
  return (
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${y}" viewBox="0 0 ${width} ${y}" data-chart="overview">` +
    `<style>${STYLE_SVG}</style><rect width="100%" height="100%" fill="#fff"/>` +
    `<text x="0" y="18" class="ttl" style="font-size:16px">${esc(title)}</text>` +
    legend(r, 0, 34, true) +
    charts.join('') +
    `</svg>\n`
  );
}

export function renderHtml(r: CompareReport): string {
  const ms = r.strategies.map((st) => st.metrics);
  const rows = SCALAR_METRICS.map((def) => {
    const w = bestOf(r.strategies.map((st) => [st.name, st.metrics[def.key]]), def);
    const noise = noiseOf(r, def);
    const base = baselineOf(r, def.key);
    return (
      `<tr><th scope="row">${esc(def.label)}</th>` +
      ms.map((m) => `<td class="num">${esc(formatValue(m[def.key], def.unit))}</td>`).join('') +
      `<td class="num">${base !== undefined ? esc(formatValue(base, def.unit)) : ''}</td>` +
      `<td>${w === 'tie' ? '≈' : `<span class="dot" style="background:${COLORS[w]}"></span>${esc(LABELS[w])}`}</td>` +
      `<td class="noise${noise.flagged ? ' flagged' : ''}" data-metric="${def.key}" data-flagged="${noise.flagged}">${noise.flagged ? '⚠ ' : ''}${esc(noise.text)}</td></tr>`
    );
  }).join('\n');
  const survivors = r.strategies.filter((st) => st.metrics.survivesVolumeLoss);
  const survivalRow =
    `<tr><th scope="row">survives losing the volume</th>` +
    ms.map((m) => `<td class="num">${esc(m.survivesVolumeLoss ? 'yes' : `no (${m.survival.code ?? 'error'})`)}</td>`).join('') +
    `<td></td><td>${survivors.length === 1 ? `<span class="dot" style="background:${COLORS[survivors[0].name]}"></span>${esc(LABELS[survivors[0].name])}` : ''}</td><td class="noise">checked</td></tr>`;
  const unavailableRows = (r.unavailable ?? [])
    .map((u) => `<tr class="unavailable" data-strategy="${esc(u.name)}"><th scope="row">${esc(LABELS[u.name])}</th><td colspan="${ms.length + 3}">not available here: ${esc(u.reason)}</td></tr>`)
    .join('\n');
  const bars = SCALAR_METRICS.map((def) => `<figure>${barChart(def, barsFor(r, def))}</figure>`).join('\n');
  const series = r.strategies.map((st) => ({ name: st.name, points: st.metrics.growth }));
  const growth = GROWTH_METRICS.map((g) => `<figure>${growthChart(g, series)}</figure>`).join('\n');
  const growthRows = ms[0]?.growth
    .map((g, i) =>
      `<tr><td class="num">${g.snapshots}</td>` +
      r.strategies.map((st) => {
        const p = st.metrics.growth[i];
        return `<td class="num">${esc(formatSeconds(p.snapshotSeconds))}</td><td class="num">${esc(formatSize(p.extraBytes))}</td><td class="num">${esc(formatMBps(p.readMBps))}</td>`;
      }).join('') +
      `</tr>`,
    )
    .join('\n');
  const how = r.strategies
    .map((st) => `<h3><span class="dot" style="background:${COLORS[st.name]}"></span>${esc(st.title)}</h3><dl>${Object.entries(st.how).map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join('')}</dl>` +
      `<p>Losing the volume: ${esc(st.metrics.survival.lost)} was moved away; ${esc(st.metrics.survival.tried)} → ${esc(st.metrics.survival.outcome)}</p>`)
    .join('\n');
  const checks = r.checks
    .map((c) => `<li class="${c.ok ? 'ok' : 'bad'}">${c.ok ? '✔' : '✘'} ${esc(c.strategy)} · ${esc(c.name)}: ${esc(c.actual)}${c.detail ? ` <span class="sub">(${esc(c.detail)})</span>` : ''}</li>`)
    .join('\n');
  const wl = r.workload;
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>disksnap compare — ${esc(r.image.path)}</title>
<style>
body{font:15px/1.5 system-ui,sans-serif;color:#222;max-width:1000px;margin:2em auto;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
.meta{color:#555}.verdict{background:#f6f8fa;border-left:4px solid #2f6db5;padding:.6em 1em .6em 2em}.verdict li{margin:.2em 0}td.noise{color:#777;font-size:.9em}td.noise.flagged{color:#b3261e}
table{border-collapse:collapse;margin:.5em 0}th,td{padding:.25em .7em;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;border:1px solid #eee;padding:8px;border-radius:4px}
.dot{display:inline-block;width:.8em;height:.8em;border-radius:2px;margin-right:.35em;vertical-align:-1px}
li.ok{color:#1a7f37}li.bad{color:#b3261e}.sub{color:#777;font-size:.9em}dt{font-weight:600;float:left;width:6em;clear:left}dd{margin-left:6.5em}
${STYLE_SVG}
</style>
</head>
<body>
<h1>disksnap compare</h1>
<p class="meta">${esc(r.image.path)} — ${esc(formatSize(r.image.virtualSize))} virtual, ${esc(formatSize(r.image.allocatedBytes))} allocated.
Workload <code>${esc(wl.spec)}</code> (seed ${wl.seed}): ${esc(formatSize(wl.bytes))} in ${wl.requests} writes${wl.fs ? `, from ${wl.fs.files} files (${esc(formatSize(wl.fs.fileBytes))}) written into ext4 through ${esc(wl.fs.mountedWith)}` : ''}.
${esc(r.date)}, node ${esc(r.host.node)} on ${esc(r.host.platform)}, ${r.host.cpus} CPUs, working copies on ${esc(r.host.workDirFs ?? '?')}${r.host.reflink ? ' (reflinks)' : ''}.</p>
<h2>Verdict</h2>
<ul class="verdict">
${r.verdict.map((p) => `<li>${esc(p)}</li>`).join('\n')}
</ul>
<h2>Figures</h2>
<table>
<thead><tr><th>metric</th>${r.strategies.map((st) => `<th>${esc(LABELS[st.name])}</th>`).join('')}<th>raw, no snapshot</th><th>better</th><th>noise</th></tr></thead>
<tbody>
${rows}
${survivalRow}
</tbody>
</table>
<table class="unavailable">
<tbody>
${unavailableRows}
</tbody>
</table>
<p class="sub">Times and throughputs are single runs (reads: the median of 3 passes) on this machine; ≈ marks a difference within ${TIE_MARGIN.s * 100}% (times), ${TIE_MARGIN['MB/s'] * 100}% (throughput) or ${TIE_MARGIN.B * 100}% (space); ⚠ flags a row whose figures are noise (passes that disagree by more than that, or the raw volume slower than a strategy), which the verdict does not count as a win.</p>
<div class="charts">
${bars}
</div>
<h2>Growth with the number of snapshots</h2>
<p>N snapshots on a fresh copy, ${esc(formatSize(wl.growthRoundBytes))} written after each: a chain of N children for the differencing disk, N incremental snapshots in one store for the storage snapshot, N reflink clones for the pointer snapshot. N is on a logarithmic axis.</p>
<div class="charts">
${growth}
</div>
<table>
<thead><tr><th>N</th>${r.strategies.map((st) => `<th colspan="3">${esc(LABELS[st.name])}: time, space, read</th>`).join('')}</tr></thead>
<tbody>
${growthRows ?? ''}
</tbody>
</table>
<h2>How each was measured</h2>
${how}
<h2>Byte-exact checks</h2>
<ul>
${checks}
</ul>
</body>
</html>
`;
}
