/**
 * `disksnap compare`: both snapshot strategies measured on one image. The library surface
 * (the CLI in src/cli/compare.ts and `npm start` are a few lines over it).
 */
export { compare, validate, CheckFailed, DEFAULT_GROWTH } from './run';
export type { CompareOptions } from './run';
export { parseWorkload, WORKLOAD_HELP, WORKLOAD_KINDS } from './workload';
export type { WorkloadSpec, WorkloadKind } from './workload';
export { renderText } from './table';
export { renderHtml, renderOverviewSvg } from './html';
export { verdict, SCALAR_METRICS } from './verdict';
export { stderrProgress, silentProgress } from './progress';
export type { Progress } from './progress';
export { METRIC_NAMES, STRATEGY_NAMES } from './types';
export type { CompareReport, StrategyReport, StrategyMetrics, GrowthPoint, Check, StrategyName } from './types';
