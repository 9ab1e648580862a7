/**
 * `snapshot prune`: a retention policy over each volume's completed snapshots, with restic's
 * `forget` semantics, then `snapshot delete` of what it does not keep (blocks go at the next gc).
 *
 * Per volume, newest first:
 *   --keep-last N        the N newest snapshots
 *   --keep-hourly N ...  for each of the N newest hours (days, ISO weeks, months, years) that
 *                        have a snapshot, the newest snapshot in it; buckets are UTC
 *   --keep-tag T         every snapshot with tag T (`KEY` or `KEY=VALUE`)
 * A snapshot is kept when any rule keeps it (the reasons are reported). Pending and error
 * snapshots are never pruned (`snapshot delete` removes them). A policy with no rule is refused:
 * it would remove everything. `dryRun` reports and deletes nothing.
 */
import { invalid, isDisksnapError } from '../engine/errors';
import { ordinal } from '../engine/order';
import { Store } from './store/store';
import { checkTagFilter, lockedAt, matchesTag } from './store/records';
import type { RetentionPolicy, SnapshotRecord } from './store/records';
import type { StoreOptions } from './common';
import { volumeIds } from './list';
import { KeyRing } from './keys';
import { reveal } from './lookup';
import { deleteSnapshot } from './delete';

/** The rules (restic's forget rules); a volume keeps one as its `retention` (volume policy). */
export type PrunePolicy = RetentionPolicy;

export interface PruneOptions extends StoreOptions {
  /** only this volume's snapshots (as `snapshot list --volume`: path, `vol-` id or attached loop device) */
  volume?: string;
  dryRun?: boolean;
  /** ids kept whatever the rules say, with this reason (the snapshot a policy runs after) */
  protect?: { ids: string[]; reason: string };
}

export interface PruneDecision {
  id: string;
  volumeId: string;
  startTime: string;
  /** why it is kept (empty: removed) */
  keptBy: string[];
}

export interface PruneReport {
  dryRun: boolean;
  kept: PruneDecision[];
  removed: PruneDecision[];
}

type Candidate = Pick<SnapshotRecord, 'id' | 'volumeId' | 'startTime' | 'tags'> & Partial<Pick<SnapshotRecord, 'lockedUntil'>>;

const pad = (n: number) => String(n).padStart(2, '0');

/** The ISO 8601 week of a UTC date, as "YYYY-Www". */
function isoWeek(d: Date): string {
  const t = new Date(Date.UTC(d.getUTCFullYear(), d.getUTCMonth(), d.getUTCDate()));
  const day = t.getUTCDay() || 7;
  t.setUTCDate(t.getUTCDate() + 4 - day); // the Thursday of this week decides its year
  const yearStart = Date.UTC(t.getUTCFullYear(), 0, 1);
  return `${t.getUTCFullYear()}-W${pad(Math.ceil(((t.getTime() - yearStart) / 86_400_000 + 1) / 7))}`;
}

const BUCKETS: Array<[keyof PrunePolicy, (d: Date) => string]> = [
  ['hourly', (d) => d.toISOString().slice(0, 13)],
  ['daily', (d) => d.toISOString().slice(0, 10)],
  ['weekly', isoWeek],
  ['monthly', (d) => d.toISOString().slice(0, 7)],
  ['yearly', (d) => d.toISOString().slice(0, 4)],
];

export function checkPolicy(p: PrunePolicy): void {
  for (const k of ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'] as const) {
    const v = p[k];
    if (v !== undefined && (!Number.isSafeInteger(v) || v < 1)) throw invalid(`--keep-${k} ${String(v)} must be a positive whole number`);
  }
  for (const t of p.tags ?? []) checkTagFilter(t, '--keep-tag');
  const any = ['last', 'hourly', 'daily', 'weekly', 'monthly', 'yearly'].some((k) => p[k as keyof PrunePolicy] !== undefined) || (p.tags?.length ?? 0) > 0;
  if (!any) throw invalid('prune needs at least one --keep-* rule (without one it would remove every snapshot)');
}

/** The policy applied to one volume's completed snapshots (any order); pure, for tests. */
export function decide(snapshots: Candidate[], policy: PrunePolicy, now = Date.now()): PruneDecision[] {
  checkPolicy(policy);
  const newest = [...snapshots].sort((a, b) => ordinal(b.startTime, a.startTime) || ordinal(b.id, a.id));
  const out = newest.map((s) => ({ id: s.id, volumeId: s.volumeId, startTime: s.startTime, keptBy: [] as string[] }));
  if (policy.last) for (let i = 0; i < Math.min(policy.last, out.length); i++) out[i].keptBy.push('last');
  for (const [rule, bucketOf] of BUCKETS) {
    const n = policy[rule] as number | undefined;
    if (!n) continue;
    let seen = 0;
    let last: string | undefined;
    for (let i = 0; i < newest.length && seen < n; i++) {
      const b = bucketOf(new Date(newest[i].startTime));
      if (b === last) continue; // an older snapshot of a bucket already kept
      last = b;
      seen++;
      out[i].keptBy.push(rule);
    }
  }
  for (const t of policy.tags ?? []) {
    newest.forEach((s, i) => {
      if (matchesTag(s.tags, t)) out[i].keptBy.push(`tag ${t}`);
    });
  }
  // a lock keeps a snapshot whatever the rules say (`snapshot lock --until`)
  newest.forEach((s, i) => {
    const until = s.lockedUntil ? lockedAt({ lockedUntil: s.lockedUntil }, now) : undefined;
    if (until) out[i].keptBy.push(`locked until ${until}`);
  });
  return out;
}

/** Applies `policy` to each volume's completed snapshots; deletes the rest unless `dryRun`. */
export async function pruneSnapshots(policy: PrunePolicy, opts: PruneOptions = {}): Promise<PruneReport> {
  checkPolicy(policy);
  const store = await Store.open(opts.store);
  const { snapshots } = await store.listSnapshots();
  await reveal(store, snapshots, new KeyRing(opts.key)); // tags of encrypted snapshots, with their key
  const only = opts.volume !== undefined ? await volumeIds(store, opts.volume) : undefined;
  if (only?.size === 0) throw invalid(`volume ${opts.volume} is not registered in this store`);
  const byVolume = new Map<string, Candidate[]>();
  for (const s of snapshots) {
    if (s.state !== 'completed' || (only && !only.has(s.volumeId))) continue;
    if (s.metadataHidden && (policy.tags?.length ?? 0) > 0) {
      throw invalid(`snapshot ${s.id} is encrypted and its tags are sealed: give its key (--key-file) for --keep-tag to see them`);
    }
    byVolume.set(s.volumeId, [...(byVolume.get(s.volumeId) ?? []), s]);
  }
  const report: PruneReport = { dryRun: !!opts.dryRun, kept: [], removed: [] };
  for (const group of byVolume.values()) {
    for (const d of decide(group, policy)) {
      if (opts.protect?.ids.includes(d.id)) d.keptBy.push(opts.protect.reason);
      (d.keptBy.length ? report.kept : report.removed).push(d);
    }
  }
  if (opts.dryRun) return report;
  for (const d of report.removed) {
    try {
      await deleteSnapshot(d.id, opts);
    } catch (e) {
      if (!isDisksnapError(e, 'ENOENT')) throw e; // deleted meanwhile by someone else: gone either way
    }
  }
  return report;
}
