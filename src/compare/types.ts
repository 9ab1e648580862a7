/**
 * What `compare` measures and reports. The JSON report (`--json`) is a `CompareReport`;
 * its `strategies` array has the shape DESIGN.md gives:
 * `{"strategies": [{"name": "differencing-disk", "metrics": {...}}, {"name": "storage-snapshot", "metrics": {...}}], ...}`.
 *
 * Units: seconds, bytes, and MB/s (10^6 bytes per second, as `npm run bench`).
 */
import { DiskImage } from '../image/image';

export type StrategyName = 'differencing-disk' | 'storage-snapshot';
export const STRATEGY_NAMES: readonly StrategyName[] = ['differencing-disk', 'storage-snapshot'];

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
  version: 1;
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
  baseline: { writeMBps: number; writeFlushSeconds: number; readMBps: number; fullReadMBps: number };
  strategies: StrategyReport[];
  checks: Check[];
  verdict: string;
  host: { node: string; platform: string; cpus: number; workDirFs?: string; reflink: boolean };
}

/**
 * One strategy, as the runner drives it. The runner times each call, measures space and
 * does every byte-exact check itself; a strategy only calls its library.
 */
export interface StrategySession {
  /** the file the user would call the volume (differencing: the parent) */
  readonly volumePath: string;
  /** take a snapshot of the current state (differencing: a new child on top of the chain) */
  snapshot(): Promise<void>;
  /** the current state as the user writes and reads it (differencing: the top child) */
  open(write: boolean): DiskImage;
  /** bytes allocated beyond the volume copy itself: children, or the store */
  extraBytes(): number;
  /** back to the last snapshot (differencing: discard the top child) */
  rollback(): Promise<void>;
  /** the last snapshot's content as a new independent raw image at `out` */
  restore(out: string): Promise<void>;
  /** with volumePath gone: try to get the last snapshot's content into `out`; throws if impossible */
  recoverAfterLoss(out: string): Promise<void>;
  /** release everything (locks, open files); the runner removes the directory */
  close(): Promise<void>;
}

export interface Strategy {
  readonly name: StrategyName;
  readonly title: string;
  readonly how: Record<string, string>;
  /** the survival test in words: what is taken away, what is tried without it */
  readonly loss: { lost: string; tried: string };
  /** throws ENOTBUILT when the library it measures is missing from this build */
  ensureAvailable(): void;
  /** a session on `volume` (a raw copy that the session owns) inside `dir` */
  open(dir: string, volume: string): Promise<StrategySession>;
}
