/**
 * FIFREEZE and FITHAW of a mounted filesystem, with the safety nets that make sure a freeze
 * always ends. (Which volume to freeze, and for how long, is point-in-time.ts's business.)
 *
 * FIFREEZE makes the filesystem flush everything (its journal included) down to its device
 * and block every new write until FITHAW: applications writing to it stall meanwhile, so the
 * freeze must be short and must end on every path:
 *   - withFrozen() thaws in `finally`, whatever fn does (throws, rejects);
 *   - while anything is frozen, SIGINT/SIGTERM/SIGHUP and process 'exit' thaw it
 *     (exit-cleanup.ts: the signal is re-raised after the thaw, so the process still dies of it);
 *   - a small guard process (thaw-guard.ts) watches a pipe from this process and thaws if it
 *     breaks without a "done" — i.e. if this process is SIGKILLed or crashes natively while
 *     frozen, which no handler in it could catch.
 * Whoever holds a freeze must not write to the frozen filesystem itself: that write would block
 * forever, and so would the thaw behind it.
 */
import type { ChildProcess } from 'node:child_process';
import { native } from '../engine/native';
import { DisksnapError, busy } from '../engine/errors';
import { untilExit } from './exit-cleanup';
import { endGuard, startGuard } from './guard-process';

interface Frozen {
  guard: ChildProcess | undefined;
  /** forgets the exit-path thaw (the normal thaw happened) */
  forget: () => void;
}

/** The filesystems this process has frozen, by mountpoint. */
const frozen = new Map<string, Frozen>();

/** FIFREEZE, with the safety nets; throws EBUSY if the filesystem is already frozen. */
export async function freeze(mountpoint: string, opts: { noGuard?: boolean } = {}): Promise<void> {
  if (frozen.has(mountpoint)) throw busy(`${mountpoint} is already frozen by this process`, mountpoint);
  const guard = opts.noGuard ? undefined : await startGuard('thaw-guard.js', mountpoint);
  // in place before the freeze: a signal arriving during FIFREEZE still thaws
  const forget = untilExit(() => {
    frozen.delete(mountpoint);
    try {
      native().fsThaw(mountpoint);
    } finally {
      void endGuard(guard);
    }
  });
  try {
    await native().fsFreezeAsync(mountpoint);
  } catch (e) {
    forget();
    void endGuard(guard);
    if (e instanceof DisksnapError && e.code === 'EBUSY') {
      throw busy(`${mountpoint} is already frozen (by another process?): not freezing it twice`, mountpoint);
    }
    throw e;
  }
  frozen.set(mountpoint, { guard, forget });
}

/** FITHAW of a filesystem this process froze. */
export function thaw(mountpoint: string): void {
  const f = frozen.get(mountpoint);
  try {
    native().fsThaw(mountpoint);
  } finally {
    frozen.delete(mountpoint);
    f?.forget();
    void endGuard(f?.guard); // a "done" lost at exit only makes the guard thaw a thawed filesystem
  }
}

/** Runs fn with the filesystem frozen; thaws on every path (see the module note). */
export async function withFrozen<T>(mountpoint: string, fn: () => T | Promise<T>, opts: { noGuard?: boolean } = {}): Promise<T> {
  await freeze(mountpoint, opts);
  try {
    return await fn();
  } finally {
    thaw(mountpoint);
  }
}
