/**
 * The strategies `compare` drives, by name. compare implements neither of disksnap's two:
 * each room implements the common interface (src/strategy.ts) beside its own operations.
 * The third, a pointer snapshot, is the filesystem's reflink clone (./pointer.ts).
 */
import { DisksnapError } from '../engine/errors';
import { differencingDisk } from '../differencing/strategy';
import { storageSnapshot } from '../storage/strategy';
import type { Strategy, StrategyName } from '../strategy';
import { pointerSnapshot } from './pointer';

export { differencingDisk, storageSnapshot, pointerSnapshot };

export function strategyFor(name: StrategyName): Strategy {
  if (name === 'differencing-disk') return differencingDisk;
  if (name === 'storage-snapshot') return storageSnapshot;
  if (name === 'pointer-snapshot') return pointerSnapshot;
  throw new DisksnapError(`unknown strategy '${name}' (expected differencing-disk, storage-snapshot or pointer-snapshot)`, 'EINVALID');
}
