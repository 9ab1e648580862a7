/**
 * The retention flags of `snapshot prune` and `volume policy` (one definition for both), and
 * how a prune report is printed (after prune, and after a snapshot its volume's policy pruned).
 */
import { Command } from 'commander';
import type { PrunePolicy, PruneReport } from '../storage';
import { collect, intArg, UsageError } from './util';
import { stdoutWriter } from '../engine/stdio';

export type KeepFlags = Record<'keepLast' | 'keepHourly' | 'keepDaily' | 'keepWeekly' | 'keepMonthly' | 'keepYearly', number | undefined> & { keepTag: string[] };

/** Adds --keep-last ... --keep-yearly and --keep-tag to a command. */
export function keepOptions(cmd: Command): Command {
  return cmd
    .option('--keep-last <n>', 'the n newest', intArg('--keep-last', 1))
    .option('--keep-hourly <n>', 'the newest of each of the n newest hours', intArg('--keep-hourly', 1))
    .option('--keep-daily <n>', 'the newest of each of the n newest days', intArg('--keep-daily', 1))
    .option('--keep-weekly <n>', 'the newest of each of the n newest ISO weeks', intArg('--keep-weekly', 1))
    .option('--keep-monthly <n>', 'the newest of each of the n newest months', intArg('--keep-monthly', 1))
    .option('--keep-yearly <n>', 'the newest of each of the n newest years', intArg('--keep-yearly', 1))
    .option('--keep-tag <key[=value]>', 'every snapshot with this tag (repeatable)', collect, []);
}

/** The policy the flags give; bad usage when they give none (it would remove everything). */
export function policyOf(o: KeepFlags, what: string): PrunePolicy {
  for (const k of o.keepTag) if (k === '' || k.startsWith('=')) throw new UsageError(`--keep-tag '${k}' must be KEY or KEY=VALUE`);
  const p: PrunePolicy = { last: o.keepLast, hourly: o.keepHourly, daily: o.keepDaily, weekly: o.keepWeekly, monthly: o.keepMonthly, yearly: o.keepYearly, tags: o.keepTag };
  if (Object.values(p).every((v) => v === undefined || (Array.isArray(v) && v.length === 0))) {
    throw new UsageError(`${what} needs at least one --keep-* rule (without one it would remove every snapshot)`);
  }
  for (const k of Object.keys(p) as Array<keyof PrunePolicy>) if (p[k] === undefined || (k === 'tags' && !p.tags!.length)) delete p[k];
  return p;
}

/** A policy in the words of its flags: "--keep-daily 7 --keep-tag env=prod". */
export function policyText(p: PrunePolicy): string {
  const parts: string[] = [];
  for (const k of ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const) if (p[k] !== undefined) parts.push(`--keep-${k} ${p[k]}`);
  for (const t of p.tags ?? []) parts.push(`--keep-tag ${t}`);
  return parts.join(' ');
}

export function printPrune(r: PruneReport, out: { write(text: string): unknown } = stdoutWriter): void {
  for (const d of r.kept) out.write(`keep    ${d.id}  ${d.startTime}  (${d.keptBy.join(', ')})\n`);
  for (const d of r.removed) out.write(`${r.dryRun ? 'would remove' : 'removed'} ${d.id}  ${d.startTime}\n`);
  out.write(`${r.kept.length} kept, ${r.removed.length} ${r.dryRun ? 'would be removed (dry run)' : 'removed; their blocks go at the next store gc'}\n`);
}
