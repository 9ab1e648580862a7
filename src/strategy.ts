/**
 * The interface both strategies implement, so that `compare` (and anything else) can drive a
 * differencing disk and a storage snapshot through the same calls. Each room implements it
 * beside its own operations: src/differencing/strategy.ts and src/storage/strategy.ts.
 *
 *                 differencing-disk                     storage-snapshot
 *   snapshot      createChild(top, child)               createSnapshot(volume, store)
 *   write         into the top child (copy-on-write)    into the raw volume itself
 *   rollback      rollback(top child)                   restoreSnapshot(last, inPlace: volume)
 *   restore       flatten of a fresh child of the       restoreSnapshot(last, to: new file)
 *                 snapshot layer, standalone raw
 *   loss          the parent is moved away;             the volume is moved away;
 *                 flatten(top child) is tried           restoreSnapshot(last, to: new file)
 */
import { treeAllocatedBytes, allocatedBytes } from './engine/space';
import type { DiskImage } from './image';

/** The two strategies disksnap builds, and the filesystem's own reflink clone (compare/pointer.ts). */
export type StrategyName = 'differencing-disk' | 'storage-snapshot' | 'pointer-snapshot';
export const STRATEGY_NAMES: readonly StrategyName[] = ['differencing-disk', 'storage-snapshot', 'pointer-snapshot'];

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

/** Extra space of a session: everything in its directory except the volume copy itself. */
export function extraBytesIn(dir: string, volume: string): number {
  let vol = 0;
  try {
    vol = allocatedBytes(volume);
  } catch {
    // the volume may be renamed away (survival test): then everything left is extra
  }
  return Math.max(0, treeAllocatedBytes(dir) - vol);
}
