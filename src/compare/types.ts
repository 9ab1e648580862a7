/**
 * What `compare` measures and reports. The JSON report (`--json`) is a `CompareReport`;
 * its `strategies` array has the shape DESIGN.md gives:
 * `{"strategies": [{"name": "differencing-disk", "metrics": {...}}, {"name": "storage-snapshot", "metrics": {...}}], ...}`.
 *
 * Units: seconds, bytes, and MB/s (10^6 bytes per second, as `npm run bench`).
 */

import type { StrategyName } from '../strategy';

export { STRATEGY_NAMES } from '../strategy';
export type { Strategy, StrategyName, StrategySession } from '../strategy';

/** One point of the growth measurement: N snapshots (a chain of N children, or N snapshots in a store). */
export interface GrowthPoint {
  snapshots: number;
  /** time of the N snapshot operations together */
  snapshotSeconds: number;
  /** extra space allocated after N snapshots with a batch of writes after each */
  extraBytes: number;
  /** sequential read of the whole image as the user sees it (through the chain / the raw volume) */
  readMBps: number;
  /** the current state read back byte-exact (a failed comparison fails the run) */
  verified: boolean;
}

export interface Survival {
  /** what was taken away */
  lost: string;
  /** what was tried afterwards */
  tried: string;
  /** true when the snapshot's bytes came back byte-exact without the lost file */
  survives: boolean;
  /** one line: the error or the check that came back */
  outcome: string;
  code?: string;
}

export interface StrategyMetrics {
  /** time to take the first snapshot of the volume */
  snapshotSeconds: number;
  /** extra bytes allocated right after the first snapshot (st_blocks) */
  snapshotBytes: number;
  /** workload writes while the snapshot exists (timed calls + final flush) */
  writeMBps: number;
  writeSeconds: number;
  /** the part of writeSeconds spent in the final flush (fsync) that makes the writes durable */
  writeFlushSeconds: number;
  /** the workload's ranges read back (and checked) while the snapshot exists; reads are the median of 3 passes up to 1 GiB */
  readMBps: number;
  /** the whole image read front to back while the snapshot exists */
  fullReadMBps: number;
  /** extra bytes allocated with the snapshot kept and the workload written */
  extraBytes: number;
  /** time to roll the volume back to the snapshot (checked byte-exact) */
  rollbackSeconds: number;
  /** time to restore the snapshot into a new, independent volume (checked byte-exact) */
  restoreSeconds: number;
  /** whether the snapshot survives losing the parent/volume (actually tried) */
  survivesVolumeLoss: boolean;
  survival: Survival;
  /** 1, 4, 16 snapshots */
  growth: GrowthPoint[];
  /** figures measured in several passes: (slowest - fastest) / median of the passes */
  spread?: Partial<Record<'readMBps' | 'fullReadMBps', number>>;
}

/** The metric names every strategy reports (tests check each is present). */
export const METRIC_NAMES: readonly (keyof StrategyMetrics)[] = [
  'snapshotSeconds',
  'snapshotBytes',
  'writeMBps',
  'writeSeconds',
  'writeFlushSeconds',
  'readMBps',
  'fullReadMBps',
  'extraBytes',
  'rollbackSeconds',
  'restoreSeconds',
  'survivesVolumeLoss',
  'survival',
  'growth',
];

export interface StrategyReport {
  name: StrategyName;
  title: string;
  /** how each operation was done, in words (for the report) */
  how: Record<string, string>;
  metrics: StrategyMetrics;
}

export interface Check {
  /** e.g. "rollback", "restore", "read-back", "growth-16" */
  name: string;
  strategy: StrategyName | 'baseline';
  ok: boolean;
  expected: string;
  actual: string;
  detail?: string;
}

export interface CompareReport {
  /** 2: verdict became a list of points; pointer snapshots and `unavailable` were added */
  version: 2;
  date: string;
  image: {
    path: string;
    generated: boolean;
    virtualSize: number;
    /** allocated bytes of the volume at the first snapshot (after mkfs for fs) */
    allocatedBytes: number;
    /** SHA-256 of the volume at the moment of the first snapshot (after mkfs for fs) */
    sha256: string;
  };
  workload: {
    spec: string;
    kind: string;
    seed: number;
    bytes: number;
    requests: number;
    /** bytes of 64 KiB clusters / 512 KiB blocks the writes touch */
    touched: { cluster64k: number; block512k: number };
    growthRoundBytes: number;
    fs?: { files: number; fileBytes: number; formatted: boolean; mountedWith: string };
  };
  /** the same work on a plain raw copy with no snapshot at all */
  baseline: { writeMBps: number; writeFlushSeconds: number; readMBps: number; fullReadMBps: number; spread?: Partial<Record<'readMBps' | 'fullReadMBps', number>> };
  strategies: StrategyReport[];
  /** strategies that could not run here (pointer snapshots on a filesystem without reflinks), and why */
  unavailable: Array<{ name: StrategyName; title: string; reason: string }>;
  checks: Check[];
  /** short points, figures first, then what each strategy wins and when to pick it */
  verdict: string[];
  host: { node: string; platform: string; cpus: number; workDirFs?: string; reflink: boolean };
}
