/**
 * `npm run bench`: every benchmark of the project in one run, each figure beside its peer
 * measured in the same run on the same files, as medians and ratios.
 *
 *   npm run bench [-- --quick] [-- --runs N] [-- --json FILE] [-- --only engine,diff,snapshot,qcow2vol,loop,compare,s3] [-- --dir DIR]
 *
 * The ratio is always "how many times better disksnap is": disksnap/peer for throughput,
 * peer/disksnap for times. Figures are not asserted anywhere: tests never time things.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BenchOptions, BenchRow } from './types';

type Suite = (opts: BenchOptions) => Promise<BenchRow[]>;

function suites(): Record<string, () => Suite> {
  const out: Record<string, () => Suite> = {
    engine: () => require('./engine').benchEngine,
  };
  // Suites of later areas register themselves by existing.
  const optional: Record<string, [string, string]> = {
    diff: ['./qcow2', 'benchDiff'],
    snapshot: ['./snapshot', 'benchSnapshot'],
    qcow2vol: ['./qcow2vol', 'benchQcow2Volume'],
    loop: ['./loop', 'benchLoop'],
    compare: ['./compare', 'benchCompare'],
    s3: ['./s3', 'benchS3'],
  };
  for (const [name, [mod, fn]] of Object.entries(optional)) {
    if (fs.existsSync(path.join(__dirname, `${mod}.js`)) || fs.existsSync(path.join(__dirname, `${mod}.ts`))) {
      out[name] = () => require(mod)[fn];
    }
  }
  return out;
}

export function ratio(r: BenchRow): number {
  return r.higherIsBetter ? r.disksnap / r.peerValue : r.peerValue / r.disksnap;
}

function fmt(v: number): string {
  if (v >= 100) return Math.round(v).toLocaleString('en-US');
  if (v >= 10) return v.toFixed(1);
  return v.toFixed(3);
}

export function renderTable(rows: BenchRow[]): string {
  const header = ['area', 'metric', 'disksnap', 'peer', 'peer value', 'unit', 'ratio'];
  const body = rows.map((r) => [r.area, r.metric, fmt(r.disksnap), r.peer, fmt(r.peerValue), r.unit, `${ratio(r).toFixed(2)}x`]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i])).join('  ').trimEnd();
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...body.map(line)].join('\n');
}

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const flag = (name: string): string | undefined => {
    const i = args.indexOf(name);
    return i >= 0 ? args[i + 1] : undefined;
  };
  const quick = args.includes('--quick');
  const runsArg = flag('--runs');
  const runs = runsArg !== undefined && /^[1-9]\d*$/.test(runsArg) ? Number(runsArg) : undefined;
  const only = flag('--only')?.split(',');
  const jsonFile = flag('--json');
  const parent = flag('--dir') ?? os.tmpdir();
  fs.mkdirSync(parent, { recursive: true }); // (a --dir that does not exist yet is made)
  const dir = fs.mkdtempSync(path.join(parent, 'disksnap-bench-'));
  const rows: BenchRow[] = [];
  try {
    for (const [name, load] of Object.entries(suites())) {
      if (only && !only.includes(name)) continue;
      process.stderr.write(`bench: ${name}...\n`);
      const sub = fs.mkdtempSync(path.join(dir, `${name}-`));
      try {
        rows.push(...(await load()({ dir: sub, quick, runs })));
      } catch (e) {
        process.stderr.write(`bench: ${name} failed: ${(e as Error).stack}\n`);
        process.exitCode = 1;
      } finally {
        fs.rmSync(sub, { recursive: true, force: true });
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  process.stdout.write(renderTable(rows) + '\n');
  if (jsonFile) {
    const doc = { date: new Date().toISOString(), host: { cpus: os.cpus().length, model: os.cpus()[0]?.model, node: process.version }, quick, rows: rows.map((r) => ({ ...r, ratio: ratio(r) })) };
    fs.writeFileSync(jsonFile, JSON.stringify(doc, null, 2) + '\n');
  }
}

if (require.main === module) void main();
