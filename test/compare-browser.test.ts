/**
 * The HTML report of `compare` in a real browser, offline: headless Chromium loads the page
 * from a file with networking disabled, the DOM it builds has the charts with their bars,
 * and a screenshot shows the bars painted in both strategies' colours.
 *
 * Needs `chromium` (Debian package); skips with a reason where it is missing, except under
 * DISKSNAP_REQUIRE_TOOLS=1 (CI), where a missing browser fails.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as zlib from 'node:zlib';
import { spawnSync } from 'node:child_process';
import { cli } from './helpers/cli';
import { missing } from './helpers/tools';
import { SCALAR_METRICS } from '../src/compare/verdict';
import { COLORS, renderHtml } from '../src/compare/html';
import type { CompareReport, StrategyMetrics } from '../src/compare/types';
import { metrics } from './helpers/compare-report';

const MiB = 2 ** 20;

const skip = missing({ commands: ['chromium'] });

function chromium(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-chromium-'));
  try {
    const r = spawnSync(
      'chromium',
      [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
        '--disable-extensions',
        // nothing may be fetched: every URL but file: is sent nowhere
        '--host-resolver-rules=MAP * ~NOTFOUND',
        `--user-data-dir=${profile}`,
        ...args,
      ],
      { encoding: 'utf8', timeout: 90_000, maxBuffer: 1 << 26 },
    );
    return { status: r.status, stdout: r.stdout ?? '', stderr: r.stderr ?? '' };
  } finally {
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

interface Png {
  width: number;
  height: number;
  channels: number;
  pixels: Buffer;
}

/** A minimal PNG decoder (8-bit RGB/RGBA, non-interlaced: what Chromium writes). */
function decodePng(buf: Buffer): Png {
  if (!buf.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]))) throw new Error('not a PNG');
  let pos = 8;
  let width = 0;
  let height = 0;
  let channels = 0;
  const idat: Buffer[] = [];
  while (pos < buf.length) {
    const len = buf.readUInt32BE(pos);
    const type = buf.toString('latin1', pos + 4, pos + 8);
    const data = buf.subarray(pos + 8, pos + 8 + len);
    if (type === 'IHDR') {
      width = data.readUInt32BE(0);
      height = data.readUInt32BE(4);
      const depth = data[8];
      const color = data[9];
      if (depth !== 8 || (color !== 2 && color !== 6) || data[12] !== 0) throw new Error(`unsupported PNG: depth ${depth} color ${color}`);
      channels = color === 6 ? 4 : 3;
    } else if (type === 'IDAT') idat.push(data);
    else if (type === 'IEND') break;
    pos += 12 + len;
  }
  const raw = zlib.inflateSync(Buffer.concat(idat));
  const stride = width * channels;
  const out = Buffer.alloc(stride * height);
  for (let y = 0; y < height; y++) {
    const f = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let x = 0; x < stride; x++) {
      const a = x >= channels ? out[y * stride + x - channels] : 0;
      const b = y > 0 ? out[(y - 1) * stride + x] : 0;
      const c = x >= channels && y > 0 ? out[(y - 1) * stride + x - channels] : 0;
      let v = line[x];
      if (f === 1) v += a;
      else if (f === 2) v += b;
      else if (f === 3) v += (a + b) >> 1;
      else if (f === 4) {
        const p = a + b - c;
        const pa = Math.abs(p - a);
        const pb = Math.abs(p - b);
        const pc = Math.abs(p - c);
        v += pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      }
      out[y * stride + x] = v & 0xff;
    }
  }
  return { width, height, channels, pixels: out };
}

function countColour(png: Png, hex: string): number {
  const r = parseInt(hex.slice(1, 3), 16);
  const g = parseInt(hex.slice(3, 5), 16);
  const b = parseInt(hex.slice(5, 7), 16);
  let n = 0;
  for (let i = 0; i < png.pixels.length; i += png.channels) {
    if (Math.abs(png.pixels[i] - r) <= 3 && Math.abs(png.pixels[i + 1] - g) <= 3 && Math.abs(png.pixels[i + 2] - b) <= 3) n++;
  }
  return n;
}

t.test('the HTML report renders its SVG charts in headless Chromium', { skip }, async (t) => {
  const dir = t.testdir({ work: {} });
  const html = path.join(dir, 'report.html');
  const r = cli(['compare', '--generate', '16M', '--growth', '1,4', '--dir', path.join(dir, 'work'), '--html', html]);
  t.equal(r.status, 0, r.stderr);
  const url = `file://${html}`;

  // the DOM as the browser built it
  const dom = chromium(['--dump-dom', url]);
  t.equal(dom.status, 0, dom.stderr.slice(-2000));
  const page = dom.stdout;
  t.match(page, /<h1>disksnap compare<\/h1>/);
  for (const def of SCALAR_METRICS) {
    const m = new RegExp(`<svg[^>]*data-chart="${def.key}"[^>]*>([\\s\\S]*?)</svg>`).exec(page);
    t.ok(m, `chart ${def.key} is in the DOM`);
    if (!m) continue;
    const bars = [...m[1].matchAll(/<rect class="bar" data-strategy="([\w-]+)" data-value="([\d.e+-]+)"[^>]*width="([\d.]+)"/g)];
    t.same(
      bars.slice(0, 2).map((b) => b[1]),
      ['differencing-disk', 'storage-snapshot'],
      `${def.key}: a bar per strategy`,
    );
    const max = Math.max(...bars.map((b) => Number(b[2])));
    for (const b of bars) {
      if (Number(b[2]) === max) t.ok(Number(b[3]) > 100, `${def.key}: the largest bar (${b[1]}) is drawn long`);
      if (Number(b[2]) > 0) t.ok(Number(b[3]) >= 1, `${def.key}: ${b[1]} bar is visible`);
    }
  }
  for (const g of ['growth-snapshotSeconds', 'growth-extraBytes', 'growth-readMBps']) {
    const m = new RegExp(`<svg[^>]*data-chart="${g}"[^>]*>([\\s\\S]*?)</svg>`).exec(page);
    t.ok(m, `${g} is in the DOM`);
    t.equal((m?.[1].match(/<polyline class="line"/g) ?? []).length, 2, `${g}: two curves`);
    t.equal((m?.[1].match(/<circle class="point"/g) ?? []).length, 4, `${g}: 2 points per curve`);
  }

  // the pixels: both strategies' colours are painted in quantity
  const shot = path.join(dir, 'shot.png');
  const s = chromium(['--window-size=1100,2600', '--hide-scrollbars', `--screenshot=${shot}`, url]);
  t.equal(s.status, 0, s.stderr.slice(-2000));
  const png = decodePng(fs.readFileSync(shot));
  t.equal(png.width, 1100);
  const blue = countColour(png, COLORS['differencing-disk']);
  const orange = countColour(png, COLORS['storage-snapshot']);
  const grey = countColour(png, COLORS.baseline);
  t.ok(blue > 2000, `differencing-disk bars painted (${blue} px)`);
  t.ok(orange > 2000, `storage-snapshot bars painted (${orange} px)`);
  t.ok(grey > 200, `raw baseline bars painted (${grey} px)`);
});

/** A report of three strategies whose growth curves start at the top left (where a legend inside the plot would sit). */
function threeStrategyReport(): CompareReport {
  const growth = [1, 4, 16].map((n) => ({ snapshots: n, snapshotSeconds: 6.25 / n, extraBytes: (188 * MiB) / n, readMBps: 4723 / n, verified: true }));
  const survives = { survivesVolumeLoss: true, survival: { lost: 'x', tried: 'y', survives: true, outcome: 'ok' } };
  const m = (over: Partial<StrategyMetrics>) => metrics({ growth, ...survives, ...over });
  return {
    version: 2,
    date: '2026-12-02T00:00:00Z',
    image: { path: '/img', generated: true, virtualSize: 256 * MiB, allocatedBytes: 100 * MiB, sha256: '0'.repeat(64) },
    workload: { spec: 'random:3%:4k-1m', kind: 'random', seed: 1, bytes: 8 * MiB, requests: 40, touched: { cluster64k: 9 * MiB, block512k: 20 * MiB }, growthRoundBytes: 2 * MiB },
    baseline: { writeMBps: 268, writeFlushSeconds: 0.001, readMBps: 3000, fullReadMBps: 3000, spread: { readMBps: 0.05, fullReadMBps: 0.05 } },
    strategies: [
      { name: 'differencing-disk', title: 'd', how: {}, metrics: m({ writeMBps: 300, survivesVolumeLoss: false, survival: { lost: 'x', tried: 'y', survives: false, outcome: 'no', code: 'ENOENT' } }) },
      { name: 'storage-snapshot', title: 's', how: {}, metrics: m({ writeMBps: 600 }) },
      { name: 'pointer-snapshot', title: 'p', how: {}, metrics: m({ writeMBps: 550 }) },
    ],
    unavailable: [],
    checks: [],
    verdict: ['one point', 'another point'],
    host: { node: 'v20', platform: 'linux', cpus: 2, workDirFs: 'xfs', reflink: true },
  };
}

/** Measures the rendered charts from inside the page: boxes of legends, points and tick labels, as JSON in <pre id="geometry">. */
const GEOMETRY_SCRIPT = `<script>
window.addEventListener('load', () => {
  const box = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  const out = [...document.querySelectorAll('svg.growth')].map((svg) => ({
    chart: svg.dataset.chart,
    legends: [...svg.querySelectorAll('.legend')].map(box),
    points: [...svg.querySelectorAll('circle.point')].map(box),
    yticks: [...svg.querySelectorAll('text.ytick')].map((e) => ({ text: e.textContent, box: box(e) })),
    xtitle: svg.querySelector('text.xtitle')?.textContent,
  }));
  const pre = document.createElement('pre');
  pre.id = 'geometry';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>`;

t.test('the growth charts as Chromium lays them out: the legend covers no point, ticks are round and apart, N is labelled as a log axis', { skip }, async (t) => {
  const dir = t.testdir();
  const html = path.join(dir, 'report.html');
  // the report as disksnap writes it, plus a measuring script that only this test adds
  fs.writeFileSync(html, renderHtml(threeStrategyReport()).replace('</body>', `${GEOMETRY_SCRIPT}</body>`));
  const dom = chromium(['--dump-dom', '--window-size=1100,2600', `file://${html}`]);
  t.equal(dom.status, 0, dom.stderr.slice(-2000));
  const m = /<pre id="geometry">([^<]*)<\/pre>/.exec(dom.stdout);
  t.ok(m, 'the page measured itself');
  if (!m) return;
  const charts = JSON.parse(m[1].replace(/&quot;/g, '"').replace(/&amp;/g, '&')) as Array<{ chart: string; legends: number[][]; points: number[][]; yticks: Array<{ text: string; box: number[] }>; xtitle: string }>;
  t.equal(charts.length, 3, 'three growth charts');
  const overlap = (a: number[], b: number[]) => a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3];
  for (const c of charts) {
    t.equal(c.legends.length, 3, `${c.chart}: a legend entry per strategy`);
    t.equal(c.points.length, 9, `${c.chart}: 3 strategies x 3 N`);
    t.notOk(c.legends.some((l) => c.points.some((p) => overlap(l, p))), `${c.chart}: no legend entry covers a point`);
    t.match(c.xtitle, /log scale/, `${c.chart}: the N axis says it is logarithmic`);
    const labels = c.yticks.map((y) => y.text);
    t.ok(labels.every((l) => /^(0|\d+(\.\d)? (s|ms|KiB|MiB|GiB|MB\/s))$/.test(l)), `${c.chart}: round tick labels: ${labels.join(', ')}`);
    const values = labels.map((l) => Number(l.split(' ')[0]));
    const steps = values.slice(1).map((v, i) => Number((v - values[i]).toPrecision(6)));
    t.ok(steps.every((s) => s === steps[0] && s > 0), `${c.chart}: evenly spaced ticks (${steps.join(', ')})`);
    t.notOk(c.yticks.some((a, i) => c.yticks.some((b, j) => i < j && overlap(a.box, b.box))), `${c.chart}: tick labels do not overlap`);
  }
  // the noise column, as the browser shows it: the raw volume (268 MB/s) slower than two strategies is flagged
  t.match(dom.stdout, /<td class="noise flagged" data-metric="writeMBps" data-flagged="true">⚠ 1 run; raw slower than storage snapshot: noise<\/td>/);
  t.match(dom.stdout, /<td class="noise" data-metric="fullReadMBps" data-flagged="false">passes within ±3%<\/td>/);
  t.match(dom.stdout, /<ul class="verdict">\s*<li>one point<\/li>\s*<li>another point<\/li>/);
});
