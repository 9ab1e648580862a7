/**
 * `disksnap compare (IMAGE | --generate SIZE) [--workload SPEC] [--json FILE] [--html FILE]`
 *
 * The table and verdict go to stdout (or the JSON report with `--json -`), progress to
 * stderr. Report files are written under a temporary name and renamed, and an existing file
 * is only replaced with --force; they are checked before the run starts, so a refusal costs
 * nothing.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Command, Option } from 'commander';
import { writeAtomically, checkOutput } from '../engine/atomic';
import { DisksnapError } from '../engine/errors';
import { compare, parseWorkload, renderHtml, renderOverviewSvg, renderText, silentProgress, stderrProgress, WORKLOAD_HELP, DEFAULT_GROWTH } from '../compare';
import { isQuiet } from './progress';
import type { CompareReport, StrategyName } from '../compare';
import { action, intArg, log, sizeArg, traceDocument } from './util';
import { writeOut } from '../engine/stdio';

export interface CompareCommandOptions {
  generate?: number;
  workload?: string;
  seed?: number;
  dir?: string;
  growth?: string;
  only?: StrategyName;
  json?: string;
  html?: string;
  svg?: string;
  force?: boolean;
}

function parseGrowth(text: string | undefined): number[] {
  if (text === undefined) return DEFAULT_GROWTH;
  const parts = text.split(',').map((p) => p.trim());
  if (!parts.every((p) => /^\d+$/.test(p))) throw new DisksnapError(`--growth '${text}' must be a comma-separated list of whole numbers (e.g. 1,4,16)`, 'EINVALID');
  return parts.map(Number);
}

async function writeReport(file: string, text: string, force: boolean): Promise<void> {
  await writeAtomically(file, { force, sync: true }, (tmp) => fs.writeFileSync(tmp, text, { flag: 'wx' }));
}

/** Runs the command; returns the report (for `npm start`, which prints where it went). */
export async function runCompare(image: string | undefined, opts: CompareCommandOptions): Promise<CompareReport> {
  if (image !== undefined && opts.generate !== undefined) {
    throw new DisksnapError('give an IMAGE or --generate SIZE, not both', 'EINVALID');
  }
  if (image === undefined && opts.generate === undefined) {
    throw new DisksnapError('compare needs an IMAGE or --generate SIZE', 'EINVALID');
  }
  const workload = parseWorkload(opts.workload);
  const growth = parseGrowth(opts.growth);
  const outputs = [opts.json, opts.html, opts.svg].filter((f): f is string => f !== undefined && f !== '-');
  for (const f of outputs) checkOutput(f, !!opts.force);
  const report = await compare({
    image,
    generate: opts.generate,
    workload,
    seed: opts.seed,
    dir: opts.dir,
    growth,
    strategies: opts.only ? [opts.only] : undefined,
    progress: isQuiet() ? silentProgress : stderrProgress(),
  });
  const json = JSON.stringify(report, null, 2) + '\n';
  if (opts.json !== undefined) traceDocument('compare-report', opts.json === '-' ? 'stdout' : path.resolve(opts.json));
  if (opts.json !== undefined && opts.json !== '-') await writeReport(opts.json, json, !!opts.force);
  if (opts.html !== undefined) await writeReport(opts.html, renderHtml(report), !!opts.force);
  if (opts.svg !== undefined) await writeReport(opts.svg, renderOverviewSvg(report), !!opts.force);
  if (opts.json === '-') writeOut(json);
  else writeOut(renderText(report));
  for (const [what, f] of [['JSON', opts.json], ['HTML', opts.html], ['SVG', opts.svg]] as const) {
    if (f !== undefined && f !== '-') log(`compare: ${what} report written to ${f}`);
  }
  return report;
}

export function register(program: Command): void {
  program
    .command('compare')
    .description('measure differencing disks, storage snapshots and pointer snapshots (reflinks) side by side on (copies of) one image')
    .argument('[image]', 'a raw image (only read: every operation runs on copies)')
    .option('--generate <size>', 'compare on a generated demo image of SIZE instead', sizeArg('--generate size'))
    .option('--workload <spec>', WORKLOAD_HELP)
    .option('--seed <n>', 'seed of the workload and the generated image (default 1)', intArg('--seed'))
    .option('--dir <dir>', 'where the temporary working copies go (default: the system temp directory)')
    .option('--growth <list>', 'numbers of snapshots for the growth curves (default 1,4,16)')
    .addOption(new Option('--only <strategy>', 'measure one strategy').choices(['differencing-disk', 'storage-snapshot', 'pointer-snapshot']))
    .option('--json <file>', "write the JSON report to FILE ('-': print it instead of the table)")
    .option('--html <file>', 'write a self-contained HTML report with SVG charts')
    .option('--svg <file>', 'write every chart as one standalone SVG')
    .option('-f, --force', 'replace existing report files')
    .action(action(async (image: string | undefined, opts: CompareCommandOptions) => {
      await runCompare(image, opts);
    }));
}
