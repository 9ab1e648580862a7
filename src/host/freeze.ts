/**
 * Point-in-time views of a volume whose filesystem is mounted through a loop device.
 *
 * A raw image attached and mounted changes under anyone reading it: the filesystem inside
 * writes whenever it likes, and a block-by-block copy taken over seconds mixes moments (a
 * torn journal, metadata pointing at blocks from later). FIFREEZE stops that: the filesystem
 * flushes everything (its journal included) down to the loop device, which writes it into the
 * image file, and blocks every new write until FITHAW. The image is then a clean, consistent
 * filesystem — for as long as the freeze lasts. So the freeze must be as short as possible
 * (applications writing to the volume stall meanwhile) and must always end.
 *
 *   pointInTime(volume):
 *     not mounted ............................ read the image as is          'not-mounted'
 *     mounted, image on xfs/btrfs (reflink) .. freeze, FICLONE image -> clone, thaw
 *                                               (milliseconds), read the clone 'frozen-clone'
 *     mounted, no reflink ..................... freeze, read the image, thaw   'frozen'
 *                                               (frozen for the whole read)
 *     --no-freeze ............................. reflink clone if possible, else the image
 *                                               itself                         'crash-consistent'
 *
 * The clone is a new file in the image's own directory (FICLONE cannot cross filesystems),
 * named `.<image>.disksnap-pit-<random>`, removed by release(). It shares every extent with the
 * image, so it costs no space until the volume is written again.
 *
 * The thaw happens on every path:
 *   - withFrozen() thaws in `finally`, whatever fn does (throws, rejects);
 *   - while anything is frozen, SIGINT/SIGTERM/SIGHUP handlers thaw, then re-raise the signal
 *     with the default action, so the process still dies of it;
 *   - a process 'exit' handler thaws whatever is still frozen (process.exit() inside fn);
 *   - a small guard process (thaw-guard.ts) watches a pipe from this process and thaws if it
 *     breaks without a "done" — i.e. if this process is SIGKILLed or crashes natively while
 *     frozen, which no handler in it could catch.
 * Reading while frozen must not touch the frozen filesystem itself (the snapshot store must not
 * live inside the volume): that write would block forever, and so would the thaw behind it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn, ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { native } from '../engine/native';
import { PACKAGE_ROOT } from '../engine/root';
import { BlockFile } from '../engine/file';
import { DisksnapError, busy } from '../engine/errors';
import { attachmentOf, Attachment } from './attach';

/**
 * How a volume was captured (recorded by storage snapshots):
 *   'not-mounted'      the volume was not mounted: read as it was
 *   'frozen'           its filesystem was frozen (FIFREEZE) for the whole read
 *   'frozen-clone'     frozen only while a reflink clone was made; the clone was read
 *   'crash-consistent' mounted and not frozen (--no-freeze): like a power cut's disk
 */
export type Consistency = 'frozen-clone' | 'frozen' | 'crash-consistent' | 'not-mounted';

export interface PointInTime {
  /** the file to read: a reflink clone of the volume, or the volume itself */
  path: string;
  consistency: Consistency;
  /** the volume's attachment (device, mountpoints), when attached */
  attachment?: Attachment;
  /** the mountpoint that was (or still is) frozen */
  frozen?: string;
  /** how long the filesystem was frozen for the clone (frozen-clone), in ms */
  frozenMs?: number;
  /** thaws (frozen) and removes the clone (frozen-clone); idempotent */
  release(): Promise<void>;
}

export interface PointInTimeOptions {
  /** do not freeze: the view is crash-consistent (still a reflink clone where possible) */
  noFreeze?: boolean;
  /** do not try reflink: with a freeze, stay frozen while the caller reads */
  noClone?: boolean;
  /** do not start the thaw guard process (tests of the guard itself) */
  noGuard?: boolean;
}

// ---------------------------------------------------------------------------------------------
// Mounts of an image

/** Mountpoints of the filesystem on the loop device the image is attached to (may be empty). */
export function mountsOfImage(imagePath: string): string[] {
  return attachmentOf(imagePath)?.mountpoints ?? [];
}

/** The mountpoint of a loop device backed by this image, or undefined (not attached or not mounted). */
export function findMount(imagePath: string): string | undefined {
  return mountsOfImage(imagePath)[0];
}

// ---------------------------------------------------------------------------------------------
// Freeze bookkeeping: what this process has frozen, and the handlers that thaw it

const frozen = new Map<string, ChildProcess | undefined>();
const SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
let handlersInstalled = false;

function thawQuietly(mountpoint: string): void {
  try {
    native().fsThaw(mountpoint);
  } catch {
    // EINVAL: not frozen (any more); nothing else can be done from an exit path
  }
}

function thawAllSync(): void {
  for (const [mp, guard] of frozen) {
    thawQuietly(mp);
    endGuard(guard);
  }
  frozen.clear();
}

function onSignal(signal: NodeJS.Signals): void {
  thawAllSync();
  removeHandlers();
  process.kill(process.pid, signal); // default action now: the process dies of the signal
}

function onExit(): void {
  thawAllSync();
}

function installHandlers(): void {
  if (handlersInstalled) return;
  handlersInstalled = true;
  for (const s of SIGNALS) process.on(s, onSignal);
  process.on('exit', onExit);
}

function removeHandlers(): void {
  if (!handlersInstalled) return;
  handlersInstalled = false;
  for (const s of SIGNALS) process.removeListener(s, onSignal);
  process.removeListener('exit', onExit);
}

function guardScript(): string | undefined {
  const here = path.join(__dirname, 'thaw-guard.js');
  if (fs.existsSync(here)) return here;
  const compiled = path.join(PACKAGE_ROOT, 'dist', 'src', 'host', 'thaw-guard.js');
  return fs.existsSync(compiled) ? compiled : undefined;
}

/** Starts the guard and waits until it is listening, so that it is in place before the freeze. */
async function startGuard(mountpoint: string): Promise<ChildProcess | undefined> {
  const script = guardScript();
  if (!script) return undefined;
  const child = spawn(process.execPath, [script, mountpoint], { stdio: ['pipe', 'pipe', 'ignore'], detached: true });
  const ok = await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), 10_000);
    child.stdout!.once('data', () => {
      clearTimeout(timer);
      resolve(true);
    });
    child.once('exit', () => {
      clearTimeout(timer);
      resolve(false);
    });
  });
  if (!ok) {
    child.kill('SIGKILL');
    return undefined;
  }
  child.unref();
  (child.stdout as unknown as { unref?: () => void }).unref?.();
  (child.stdin as unknown as { unref?: () => void }).unref?.();
  return child;
}

function endGuard(guard: ChildProcess | undefined): void {
  if (!guard || !guard.stdin || guard.stdin.destroyed) return;
  try {
    guard.stdin.end('done\n');
  } catch {
    // it is gone: nothing to tell it
  }
}

/** FIFREEZE, with the safety nets; throws EBUSY if the filesystem is already frozen. */
export async function freeze(mountpoint: string, opts: { noGuard?: boolean } = {}): Promise<void> {
  if (frozen.has(mountpoint)) throw busy(`${mountpoint} is already frozen by this process`, mountpoint);
  const guard = opts.noGuard ? undefined : await startGuard(mountpoint);
  installHandlers();
  try {
    await native().fsFreezeAsync(mountpoint);
  } catch (e) {
    endGuard(guard);
    if (!frozen.size) removeHandlers();
    if (e instanceof DisksnapError && e.code === 'EBUSY') {
      throw busy(`${mountpoint} is already frozen (by another process?): not freezing it twice`, mountpoint);
    }
    throw e;
  }
  frozen.set(mountpoint, guard);
}

/** FITHAW of a filesystem this process froze. */
export function thaw(mountpoint: string): void {
  const guard = frozen.get(mountpoint);
  try {
    native().fsThaw(mountpoint);
  } finally {
    frozen.delete(mountpoint);
    endGuard(guard);
    if (!frozen.size) removeHandlers();
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

// ---------------------------------------------------------------------------------------------
// Reflink clones

/**
 * FICLONE of `image` into a new file `dest` (same filesystem). Returns false, leaving nothing
 * behind, where the filesystem cannot share extents (ext4, tmpfs, across filesystems).
 */
export function cloneFile(image: string, dest: string): boolean {
  const src = BlockFile.open(image, { lock: 'none' });
  try {
    const dst = BlockFile.open(dest, { create: true, exclusive: true, lock: 'none', mode: 0o600 });
    let ok = false;
    try {
      ok = native().clone(src.fd, dst.fd);
    } finally {
      dst.close();
      if (!ok) fs.rmSync(dest, { force: true });
    }
    return ok;
  } finally {
    src.close();
  }
}

/**
 * Clones the image while the filesystem mounted from it is frozen (the freeze lasts as long
 * as FICLONE: milliseconds). Returns false, without freezing, if the image's filesystem cannot
 * reflink — decided by a trial clone beforehand, so that an unsupported filesystem costs no
 * freeze at all.
 */
export async function cloneWhileFrozen(
  image: string,
  dest: string,
  opts: { mountpoint?: string; noGuard?: boolean } = {},
): Promise<{ cloned: boolean; frozenMs?: number }> {
  if (!canReflink(image)) return { cloned: false };
  const mountpoint = opts.mountpoint ?? findMount(image);
  if (!mountpoint) return { cloned: cloneFile(image, dest) };
  let t0 = 0;
  let t1 = 0;
  const cloned = await withFrozen(
    mountpoint,
    () => {
      t0 = performance.now();
      const ok = cloneFile(image, dest);
      t1 = performance.now();
      return ok;
    },
    opts,
  );
  return { cloned, frozenMs: t1 - t0 };
}

/**
 * Whether the image's filesystem shares extents: FICLONE between two empty scratch files next
 * to it (xfs and btrfs accept it, ext4 and tmpfs answer EOPNOTSUPP), so the probe costs
 * nothing even for a large, fragmented image.
 */
export function canReflink(image: string): boolean {
  const a = scratchName(image, 'probe');
  const b = scratchName(image, 'probe');
  try {
    fs.writeFileSync(a, '', { mode: 0o600, flag: 'wx' });
    return cloneFile(a, b);
  } catch {
    return false;
  } finally {
    fs.rmSync(a, { force: true });
    fs.rmSync(b, { force: true });
  }
}

function scratchName(image: string, kind: string): string {
  return path.join(path.dirname(image), `.${path.basename(image)}.disksnap-${kind}-${process.pid}-${randomBytes(4).toString('hex')}`);
}

// ---------------------------------------------------------------------------------------------
// Point in time

/**
 * A consistent view of a (possibly attached and mounted) raw volume to read from. Call
 * release() when done — or use withPointInTime(). See the module note for the cases.
 */
export async function pointInTime(volumePath: string, opts: PointInTimeOptions = {}): Promise<PointInTime> {
  const attachment = attachmentOf(volumePath);
  const mountpoint = attachment?.mountpoints[0];
  const fuseView = attachment?.via === 'fuse+loop' ? attachment.backing : undefined;
  const source = fuseView ?? volumePath;
  const noop = async () => undefined;
  if (!mountpoint) return { path: source, consistency: 'not-mounted', attachment, release: noop };

  const reflink = !opts.noClone && !fuseView && canReflink(volumePath);
  if (reflink) {
    const dest = scratchName(volumePath, 'pit');
    let released = false;
    const release = async () => {
      if (released) return;
      released = true;
      fs.rmSync(dest, { force: true });
    };
    if (opts.noFreeze) {
      cloneFile(volumePath, dest);
      return { path: dest, consistency: 'crash-consistent', attachment, release };
    }
    const r = await cloneWhileFrozen(volumePath, dest, { mountpoint, noGuard: opts.noGuard });
    if (r.cloned) return { path: dest, consistency: 'frozen-clone', attachment, frozen: mountpoint, frozenMs: r.frozenMs, release };
    // reflink stopped working between probe and clone (filesystem full?): fall through
  }
  if (opts.noFreeze) return { path: source, consistency: 'crash-consistent', attachment, release: noop };

  await freeze(mountpoint, { noGuard: opts.noGuard });
  let released = false;
  return {
    path: source,
    consistency: 'frozen',
    attachment,
    frozen: mountpoint,
    release: async () => {
      if (released) return;
      released = true;
      thaw(mountpoint);
    },
  };
}

/** pointInTime + fn + release on every path. */
export async function withPointInTime<T>(
  volumePath: string,
  opts: PointInTimeOptions,
  fn: (view: PointInTime) => T | Promise<T>,
): Promise<T> {
  const view = await pointInTime(volumePath, opts);
  try {
    return await fn(view);
  } finally {
    await view.release();
  }
}

/**
 * A `freeze` hook for createSnapshot (src/storage/faults.ts, Faults.freeze): before
 * each attempt it freezes the filesystem mounted from the volume (if any) and returns the thaw,
 * which createSnapshot calls in a `finally` after reading. Strategy 'frozen' (the volume is
 * read while frozen); for the reflink strategy read from pointInTime()'s clone instead.
 */
export function snapshotFreezeHook(opts: { noGuard?: boolean } = {}): (volumePath: string) => Promise<(() => Promise<void>) | void> {
  return async (volumePath: string) => {
    const mountpoint = findMount(volumePath);
    if (!mountpoint) return undefined;
    await freeze(mountpoint, opts);
    return async () => thaw(mountpoint);
  };
}
