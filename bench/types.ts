/** One figure of `npm run bench`: disksnap beside the peer measured in the same run. */
export interface BenchRow {
  /** e.g. "engine", "differencing disk", "storage snapshot" */
  area: string;
  /** what was measured, e.g. "sequential read 1 GiB (page cache)" */
  metric: string;
  /** disksnap's median */
  disksnap: number;
  /** the peer's name and command, e.g. "qemu-img bench -d 1" */
  peer: string;
  /** the peer's median, measured in the same run on the same files */
  peerValue: number;
  /** unit of both figures, e.g. "MB/s", "req/s", "s" */
  unit: string;
  /** true for throughput, false for times */
  higherIsBetter: boolean;
  note?: string;
}

export interface BenchOptions {
  /** a scratch directory the benchmark owns */
  dir: string;
  /** small sizes, one repetition: a smoke run */
  quick?: boolean;
  /** repetitions of each measurement (default 3; quick: 1) */
  runs?: number;
}
