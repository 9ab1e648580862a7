/** A StrategyMetrics with plausible figures, for report tests (compare-unit, compare-browser). */
import type { StrategyMetrics } from '../../src/compare/types';

const MiB = 2 ** 20;

export function metrics(over: Partial<StrategyMetrics>): StrategyMetrics {
  return {
    snapshotSeconds: 0.1,
    snapshotBytes: MiB,
    writeMBps: 500,
    writeSeconds: 0.01,
    writeFlushSeconds: 0.001,
    readMBps: 1000,
    fullReadMBps: 1000,
    extraBytes: MiB,
    rollbackSeconds: 0.1,
    restoreSeconds: 0.1,
    survivesVolumeLoss: false,
    survival: { lost: 'x', tried: 'y', survives: false, outcome: 'z', code: 'ENOENT' },
    growth: [1, 4, 16].map((n) => ({ snapshots: n, snapshotSeconds: n * 0.01, extraBytes: n * MiB, readMBps: 1000, verified: true })),
    ...over,
  };
}
