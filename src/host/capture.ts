/**
 * What `snapshot create` reads: the volume itself, or a point-in-time view of it when its
 * filesystem is mounted. The loop library (src/host/freeze.ts) does the freezing, cloning and
 * thawing; this module picks the case, keeps the snapshot out of harm's way, and says which
 * consistency the snapshot gets.
 *
 *   VOLUME                                  read                        consistency
 *   raw image, not attached or not mounted  the image                   not-mounted
 *   raw image, mounted, host fs reflinks    FIFREEZE, FICLONE -> clone, frozen-clone
 *                                           FITHAW (ms); the clone
 *   raw image, mounted, no reflink          the image, frozen until     frozen
 *                                           the read is done
 *   /dev/loopN (any block device), mounted  the device, frozen          frozen
 *   mounted, --no-freeze                    a clone where reflinks      crash-consistent
 *                                           work, else the live image
 *   qcow2 child attached through FUSE       refused: storage snapshots take raw images
 *
 * The snapshot always belongs to VOLUME (its volume record, its path): the clone is only
 * where the bytes come from. The clone lives beside the image (`.<image>.disksnap-pit-<pid>-…`,
 * FICLONE cannot cross filesystems) and is removed on every path: release() in a `finally`,
 * SIGINT/SIGTERM/SIGHUP and process exit while it exists; one left by a SIGKILLed process is
 * removed by the next snapshot of the same volume (its pid is dead).
 *
 * A store inside the filesystem being frozen is refused before anything is frozen: the
 * snapshot's own writes would block on the freeze, and the thaw behind them.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DisksnapError } from '../engine/errors';
import { attachmentOf } from './attach';
import { freeze, thaw, pointInTime } from './freeze';
import type { Consistency } from './freeze';
import { mountpointsOf } from './state';

export interface CaptureSource {
  /** the file to read: the volume, or a reflink clone of it */
  path: string;
  consistency: Consistency;
  /** how long the filesystem was frozen (ms); for 'frozen' known after release() */
  frozenMs: number | undefined;
  /** thaws and/or removes the clone; idempotent */
  release(): Promise<void>;
}

export interface CaptureOptions {
  /** --no-freeze: never freeze; the snapshot of a mounted volume is crash-consistent */
  noFreeze?: boolean;
  /** do not try a reflink clone: stay frozen while reading */
  noClone?: boolean;
  /** the store directory, which must not be inside the filesystem that gets frozen */
  storeDir: string;
}

const SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

function majorMinor(rdev: bigint): string {
  const major = ((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn);
  const minor = (rdev & 0xffn) | ((rdev >> 12n) & ~0xffn);
  return `${major}:${minor}`;
}

function devOf(p: string): bigint | undefined {
  try {
    return fs.statSync(p, { bigint: true }).dev;
  } catch {
    return undefined;
  }
}

/** EINVALID when the store lives on the filesystem of block device `rdev` (the one to freeze). */
function assertStoreOutside(storeDir: string, rdev: bigint, mountpoint: string, volume: string): void {
  // The store may not exist yet: its nearest existing ancestor is where it will be created.
  let p = path.resolve(storeDir);
  while (!fs.existsSync(p) && path.dirname(p) !== p) p = path.dirname(p);
  if (devOf(p) === rdev) {
    throw new DisksnapError(
      `the snapshot store ${storeDir} is inside the filesystem of ${volume} (mounted on ${mountpoint}), which the snapshot would freeze; ` +
        'put the store elsewhere (--store DIR), or take a crash-consistent snapshot with --no-freeze',
      'EINVALID',
      undefined,
      storeDir,
    );
  }
}

/** Removes `file` if this process is killed by a catchable signal or exits while it exists. */
function removeOnExit(file: string): () => void {
  const rm = () => {
    try {
      fs.rmSync(file, { force: true });
    } catch {
      // nothing more can be done on the way out
    }
  };
  const onSignal = (signal: NodeJS.Signals) => {
    rm();
    dispose();
    // Re-raise, as the loop library's thaw handler does: with our listener gone the signal
    // gets its default action (or whoever else listens). Waiting for "somebody else" to do it
    // deadlocks with libraries such as signal-exit, which wait for us in turn.
    process.kill(process.pid, signal);
  };
  const dispose = () => {
    for (const s of SIGNALS) process.removeListener(s, onSignal);
    process.removeListener('exit', rm);
  };
  for (const s of SIGNALS) process.on(s, onSignal);
  process.on('exit', rm);
  return dispose;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Removes point-in-time clones of `volume` left by processes that no longer exist (SIGKILL). */
export function reapStaleClones(volume: string): string[] {
  const dir = path.dirname(volume);
  const prefix = `.${path.basename(volume)}.disksnap-pit-`;
  const removed: string[] = [];
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return removed;
  }
  for (const n of names) {
    if (!n.startsWith(prefix)) continue;
    const m = /^(\d+)-[0-9a-f]{8}$/.exec(n.slice(prefix.length));
    if (!m || Number(m[1]) === process.pid || pidAlive(Number(m[1]))) continue;
    try {
      fs.rmSync(path.join(dir, n), { force: true });
      removed.push(path.join(dir, n));
    } catch {
      // not ours to insist on
    }
  }
  return removed;
}

/** The consistent view of `volume` (an absolute real path) to read for one attempt. */
export async function openCapture(volume: string, opts: CaptureOptions): Promise<CaptureSource> {
  const st = fs.statSync(volume, { bigint: true });
  const plain = (consistency: Consistency): CaptureSource => ({ path: volume, consistency, frozenMs: undefined, release: async () => undefined });

  if (st.isBlockDevice()) {
    const mm = majorMinor(st.rdev);
    const mps = mountpointsOf(mm);
    if (!mps.length) return plain('not-mounted');
    if (opts.noFreeze) return plain('crash-consistent');
    assertStoreOutside(opts.storeDir, st.rdev, mps[0], volume);
    await freeze(mps[0]);
    return frozenSource(volume, () => thaw(mps[0]));
  }

  const a = attachmentOf(volume);
  if (!a || !a.mountpoints.length) return plain('not-mounted');
  if (a.via !== 'loop') {
    throw new DisksnapError(
      `${volume} is attached through a FUSE view (${a.device}, mounted on ${a.mountpoints.join(', ')}); storage snapshots take raw images — ` +
        'unmount and detach it, or snapshot a raw copy (`disksnap diff flatten`)',
      'EINVALID',
      undefined,
      volume,
    );
  }
  if (!opts.noFreeze) assertStoreOutside(opts.storeDir, fs.statSync(a.device, { bigint: true }).rdev, a.mountpoints[0], volume);
  reapStaleClones(volume);
  const view = await pointInTime(volume, { noFreeze: opts.noFreeze, noClone: opts.noClone });
  if (view.consistency === 'frozen' && view.path === volume) return frozenSource(volume, () => view.release());
  if (view.path === volume) return { path: volume, consistency: view.consistency, frozenMs: undefined, release: () => view.release() };
  // A clone: make sure it goes away even if this process is interrupted while reading it.
  const dispose = removeOnExit(view.path);
  return {
    path: view.path,
    consistency: view.consistency,
    frozenMs: view.frozenMs,
    release: async () => {
      try {
        await view.release();
      } finally {
        dispose();
      }
    },
  };
}

/** A source read while frozen; release() thaws and records for how long it was frozen. */
function frozenSource(volume: string, doThaw: () => unknown): CaptureSource {
  const t0 = performance.now();
  let released = false;
  const src: CaptureSource = {
    path: volume,
    consistency: 'frozen',
    frozenMs: undefined,
    release: async () => {
      if (released) return;
      released = true;
      await doThaw();
      src.frozenMs = performance.now() - t0;
    },
  };
  return src;
}
