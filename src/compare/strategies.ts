/**
 * The strategies `compare` drives, by name. compare implements neither: each room implements
 * the common interface (src/strategy.ts) beside its own operations.
 */
import { DisksnapError } from '../engine/errors';
import { differencingDisk } from '../differencing/strategy';
import { storageSnapshot } from '../storage/strategy';
import type { Strategy, StrategyName } from '../strategy';

export { differencingDisk, storageSnapshot };

export function strategyFor(name: StrategyName): Strategy {
  if (name === 'differencing-disk') return differencingDisk;
  if (name === 'storage-snapshot') return storageSnapshot;
  throw new DisksnapError(`unknown strategy '${name}' (expected differencing-disk or storage-snapshot)`, 'EINVALID');
}
