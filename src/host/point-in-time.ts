/**
 * Point-in-time views of a volume whose filesystem may be mounted: what `snapshot create`
 * (and any other reader of a live volume) reads, and which consistency that gives it.
 *
 * A raw image attached and mounted changes under anyone reading it: the filesystem inside
 * writes whenever it likes, and a block-by-block copy taken over seconds mixes moments (a torn
 * journal, metadata pointing at blocks from later). A freeze (freeze.ts) makes the image a
 * clean, consistent filesystem for as long as it lasts; a reflink clone taken while frozen
 * keeps that moment after the thaw, so the freeze lasts milliseconds.
 *
 *   VOLUME                                  read                          consistency
 *   not attached, or attached, not mounted  the volume as it is           not-mounted
 *   raw image, mounted, host fs reflinks    FIFREEZE, FICLONE -> clone,   frozen-clone
 *     (xfs, btrfs)                          FITHAW (ms); the clone
 *   raw image, mounted, no reflink          the image, frozen until       frozen
 *                                           release()
 *   raw image attached through disksnap's   FIFREEZE, CBW session starts, frozen-cbw
 *     FUSE view (`attach --via fuse`),      FITHAW (ms); the view's `snap`
 *     mounted (any host filesystem)         node (frozen moment) until release()
 *   /dev/loopN (any block device), mounted  the device, frozen            frozen
 *   qcow2 child attached through FUSE,      its flat FUSE view, frozen    frozen
 *     mounted                               (refused with `rawOnly`: storage snapshots take raw images)
 *   mounted, noFreeze                       a clone where reflinks        crash-consistent
 *                                           work, else the live volume
 *   a running VM's image (snapshot create   the image, after QEMU was     guest-frozen (the agent
 *     --qmp: src/storage/live.ts)           switched to a temporary       froze the guest for the
 *                                           overlay                       switch), else crash-consistent
 *
 * Copy-before-write (cbw.ts): the FUSE server of the attachment keeps the frozen moment
 * readable after the thaw — before the VM's filesystem overwrites a chunk the snapshot has not
 * read yet, the server copies the old bytes into a preserve file beside the image. The preserve
 * file is bounded (cbwLimit, default DEFAULT_CBW_LIMIT = 1 GiB; CLI `snapshot create
 * --cbw-limit`): past it the server stops preserving, the volume's writes go on untouched, and
 * release() fails the snapshot with ENOSPC naming the limit. The session belongs to the `ctl`
 * file this process holds open: release() ends it, and so does this process's death (the kernel
 * releases the file). frozenMs, as for a clone, runs from the moment the freeze holds (after
 * FIFREEZE's flush) to the thaw; preservedBytes says how much the VM wrote over meanwhile.
 * A plain loop attachment on a filesystem without reflinks is read frozen, and onLog is told
 * that `attach --via fuse` would make the freeze short.
 *
 * The clone is a new file in the image's own directory (FICLONE cannot cross filesystems),
 * named `.<image>.disksnap-pit-<pid>-<random>`. It shares every extent with the image, so it
 * costs no space until the volume is written again. It is removed by release(), by
 * SIGINT/SIGTERM/SIGHUP and process exit while it exists (exit-cleanup.ts), and — when a
 * SIGKILLed process left it — by the next point-in-time view of the same volume (its pid is dead),
 * which also removes a preserve file whose FUSE server died before unlinking it.
 *
 * A directory the caller writes to while reading (`storeDir`: the snapshot store) must not be
 * inside the filesystem that gets frozen: those writes would block on the freeze, and the thaw
 * behind them. It is refused before anything is frozen.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { native } from '../engine/native';
import { BlockFile } from '../engine/file';
import { DisksnapError, fromNodeError } from '../engine/errors';
import { attachmentOf, Attachment } from './attach';
import { freeze, thaw, withFrozen } from './freeze';
import { untilExit } from './exit-cleanup';
import { mountpointsOf } from './state';
import { CTL_NAME, CTL_SIZE, SNAP_NAME, type CbwStatus } from './cbw';

/** How a snapshot's bytes were captured (the table above); recorded with each snapshot. */
export type Consistency = 'frozen-clone' | 'frozen-cbw' | 'frozen' | 'crash-consistent' | 'not-mounted' | 'guest-frozen';
export const CONSISTENCIES: readonly Consistency[] = ['frozen-clone', 'frozen-cbw', 'frozen', 'crash-consistent', 'not-mounted', 'guest-frozen'];

/** The default bound of a copy-before-write preserve file (PointInTimeOptions.cbwLimit). */
export const DEFAULT_CBW_LIMIT = 1024 ** 3;

export interface PointInTime {
  /** the file to read: a reflink clone of the volume, or the volume (or its FUSE view) itself */
  path: string;
  consistency: Consistency;
  /** the volume's attachment (device, mountpoints), when attached */
  attachment?: Attachment;
  /** the mountpoint that was (or still is) frozen */
  frozen?: string;
  /** how long the filesystem was frozen, in ms: for a clone or CBW at once, for 'frozen' after release() */
  frozenMs?: number;
  /** frozen-cbw: bytes the FUSE server preserved for this view (final after release()) */
  preservedBytes?: number;
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
  /** a directory the caller writes to meanwhile: refused when it is inside the frozen filesystem */
  storeDir?: string;
  /** the caller reads raw images only: a mounted qcow2 child (FUSE view) is refused, not read */
  rawOnly?: boolean;
  /** frozen-cbw: the most bytes the preserve file may hold (default DEFAULT_CBW_LIMIT) */
  cbwLimit?: number;
  /** a notice for the user: a long freeze that another attachment would avoid */
  onLog?: (message: string) => void;
}

/** The view `snapshot create` reads: raw images only, its store outside what gets frozen. */
export type CaptureSource = PointInTime;
export type CaptureOptions = Pick<PointInTimeOptions, 'noFreeze' | 'noClone' | 'cbwLimit' | 'onLog'> & { storeDir: string };

// ---------------------------------------------------------------------------------------------
// Mounts of a volume

/** Mountpoints of the filesystem on the loop device the image is attached to (may be empty). */
export function mountsOfImage(imagePath: string): string[] {
  return attachmentOf(imagePath)?.mountpoints ?? [];
}

/** The mountpoint of a loop device backed by this image, or undefined (not attached or not mounted). */
export function findMount(imagePath: string): string | undefined {
  return mountsOfImage(imagePath)[0];
}

function majorMinor(rdev: bigint): string {
  const major = ((rdev >> 8n) & 0xfffn) | ((rdev >> 32n) & ~0xfffn);
  const minor = (rdev & 0xffn) | ((rdev >> 12n) & ~0xffn);
  return `${major}:${minor}`;
}

/** Where a volume is mounted, and what to read of it. */
interface Placement {
  /** what to read when no clone is taken: the volume, or a FUSE view of it */
  source: string;
  attachment?: Attachment;
  /**
   * the mounted filesystem: its mountpoint, its block device, whether the volume can be cloned,
   * and for a raw image served by disksnap's FUSE server, that view's directory (ctl, snap)
   */
  mounted?: { mountpoint: string; rdev: bigint; clonable: boolean; cbwView?: string };
}

function placementOf(volume: string, rawOnly: boolean): Placement {
  const st = fs.statSync(volume, { bigint: true });
  if (st.isBlockDevice()) {
    const mps = mountpointsOf(majorMinor(st.rdev));
    return { source: volume, mounted: mps.length ? { mountpoint: mps[0], rdev: st.rdev, clonable: false } : undefined };
  }
  const attachment = attachmentOf(volume);
  const fuse = attachment?.via === 'fuse+loop';
  const mountpoint = attachment?.mountpoints[0];
  const cbwView = fuse && attachment.format === 'raw' ? attachment.fuse?.mountpoint : undefined;
  if (fuse && mountpoint && rawOnly && !cbwView) {
    throw new DisksnapError(
      `${volume} is attached through a FUSE view (${attachment.device}, mounted on ${attachment.mountpoints.join(', ')}); storage snapshots take raw images — ` +
        'unmount and detach it, or snapshot a raw copy (`disksnap diff flatten`)',
      'EINVALID',
      undefined,
      volume,
    );
  }
  // a raw image is its own flat view: read it, not its FUSE file, when frozen
  const source = fuse && !rawOnly && !cbwView ? attachment.backing : volume;
  if (!attachment || !mountpoint) return { source, attachment };
  const rdev = fs.statSync(attachment.device, { bigint: true }).rdev;
  return { source, attachment, mounted: { mountpoint, rdev, clonable: !fuse, cbwView } };
}

function devOf(p: string): bigint | undefined {
  try {
    return fs.statSync(p, { bigint: true }).dev;
  } catch {
    return undefined; // gone between existsSync and stat: then it is on no filesystem to freeze
  }
}

/** EINVALID when the store lives on the filesystem of block device `rdev` (the one to freeze). */
function assertStoreOutside(storeDir: string, rdev: bigint, mountpoint: string, volume: string): void {
  if (storeDir.startsWith('s3://')) return; // a bucket is on no local filesystem
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

// ---------------------------------------------------------------------------------------------
// Reflink clones

/** `.<image>.disksnap-<kind>-<pid>-<random>` beside the image: a clone ('pit') or a probe (and cbw.ts's preserve files). */
function scratchName(image: string, kind: 'pit' | 'probe'): string {
  return path.join(path.dirname(image), `.${path.basename(image)}.disksnap-${kind}-${process.pid}-${randomBytes(4).toString('hex')}`);
}

/** The pid in a scratch name of `image` made by scratchName, else undefined. */
function scratchPid(image: string, name: string): number | undefined {
  const prefix = `.${path.basename(image)}.disksnap-`;
  if (!name.startsWith(prefix)) return undefined;
  const m = /^(?:pit|probe|cbw)-(\d+)-[0-9a-f]{8}$/.exec(name.slice(prefix.length));
  return m ? Number(m[1]) : undefined;
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** Removes clones, probes and preserve files of `volume` left by processes that no longer exist (SIGKILL). */
export function reapStaleClones(volume: string): string[] {
  const dir = path.dirname(volume);
  const removed: string[] = [];
  let names: string[];
  try {
    names = fs.readdirSync(dir);
  } catch {
    return removed; // an unreadable directory has nothing we could remove either
  }
  for (const n of names) {
    const pid = scratchPid(volume, n);
    if (pid === undefined || pid === process.pid || pidAlive(pid)) continue;
    try {
      fs.rmSync(path.join(dir, n), { force: true });
      removed.push(path.join(dir, n));
    } catch {
      // another process's leftover that we may not remove: it costs space, never correctness
    }
  }
  return removed;
}

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
    return false; // any failure to make or clone the probe means: no reflink here
  } finally {
    fs.rmSync(a, { force: true });
    fs.rmSync(b, { force: true });
  }
}

/** FICLONE inside a freeze of `mountpoint`; the freeze lasts as long as the clone. */
async function cloneFrozen(image: string, dest: string, mountpoint: string, noGuard?: boolean): Promise<{ cloned: boolean; frozenMs?: number }> {
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
    { noGuard },
  );
  return { cloned, frozenMs: t1 - t0 };
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
  return cloneFrozen(image, dest, mountpoint, opts.noGuard);
}

// ---------------------------------------------------------------------------------------------
// Point in time

function once(fn: () => void | Promise<void>): () => Promise<void> {
  let done = false;
  return async () => {
    if (done) return;
    done = true;
    await fn();
  };
}

/** A reflink clone of the mounted `volume` (frozen unless noFreeze), or undefined where none can be made. */
async function cloneView(volume: string, mountpoint: string, attachment: Attachment | undefined, opts: PointInTimeOptions): Promise<PointInTime | undefined> {
  if (!canReflink(volume)) return undefined;
  const dest = scratchName(volume, 'pit');
  // registered before the clone exists: an interruption from here on leaves nothing behind
  const forget = untilExit(() => fs.rmSync(dest, { force: true }));
  const release = once(() => {
    try {
      fs.rmSync(dest, { force: true });
    } finally {
      forget();
    }
  });
  try {
    if (opts.noFreeze) {
      if (cloneFile(volume, dest)) return { path: dest, consistency: 'crash-consistent', attachment, release };
    } else {
      const r = await cloneFrozen(volume, dest, mountpoint, opts.noGuard);
      if (r.cloned) return { path: dest, consistency: 'frozen-clone', attachment, frozen: mountpoint, frozenMs: r.frozenMs, release };
    }
  } catch (e) {
    await release();
    throw e;
  }
  // reflink stopped working between probe and clone (filesystem full?): no clone after all
  await release();
  return undefined;
}

/** A view read while `mountpoint` stays frozen; release() thaws and records for how long. */
function frozenView(source: string, mountpoint: string, attachment: Attachment | undefined): PointInTime {
  const t0 = performance.now();
  const view: PointInTime = {
    path: source,
    consistency: 'frozen',
    attachment,
    frozen: mountpoint,
    release: once(() => {
      thaw(mountpoint);
      view.frozenMs = performance.now() - t0;
    }),
  };
  return view;
}

/** The status a FUSE server's `ctl` node reports (cbw.ts). */
function cbwStatus(fd: number): CbwStatus {
  const buf = Buffer.alloc(CTL_SIZE);
  const n = fs.readSync(fd, buf, 0, buf.length, 0);
  return JSON.parse(buf.toString('utf8', 0, n)) as CbwStatus;
}

/** Why a CBW view could not give the snapshot its frozen moment, as one line; undefined when it did. */
function cbwFailure(volume: string, st: CbwStatus): string | undefined {
  if (st.overflow && st.refusedReads > 0) {
    return (
      `the snapshot of ${volume} was abandoned: ${st.overflow}. The volume and its writes are unaffected; ` +
      'raise the limit (`snapshot create --cbw-limit SIZE`), or take the snapshot while the volume is written less'
    );
  }
  if (st.refusedReads > 0) return `the frozen moment of ${volume} could not be read back whole (${st.refusedReads} read(s) refused by its FUSE server; see its log)`;
  if (st.session === 'none') return `the copy-before-write session of ${volume} ended before the snapshot had read it (was its FUSE server restarted?)`;
  return undefined;
}

/**
 * Copy-before-write through the FUSE server serving the raw `volume` (its view in `viewDir`):
 * frozen only while the session starts. Undefined where the server offers no `ctl` (an older
 * disksnap's server) or cannot preserve (a read-only attachment): the caller freezes for the read.
 */
async function cbwView(volume: string, viewDir: string, mountpoint: string, attachment: Attachment | undefined, opts: PointInTimeOptions): Promise<PointInTime | undefined> {
  const limit = opts.cbwLimit ?? DEFAULT_CBW_LIMIT;
  let fd: number;
  try {
    fd = fs.openSync(path.join(viewDir, CTL_NAME), 'r+');
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'EROFS' || code === 'EACCES') return undefined;
    throw fromNodeError(e, path.join(viewDir, CTL_NAME));
  }
  let t0 = 0;
  let frozenMs = 0;
  try {
    await withFrozen(
      mountpoint,
      () => {
        t0 = performance.now();
        try {
          fs.writeSync(fd, `start ${limit}\n`, 0);
        } catch (e) {
          const why = cbwStatus(fd).lastError ?? (e as Error).message;
          throw new DisksnapError(`copy-before-write of ${volume} could not start: ${why}`, 'EIO', undefined, volume);
        }
      },
      { noGuard: opts.noGuard },
    );
    frozenMs = performance.now() - t0;
  } catch (e) {
    fs.closeSync(fd);
    throw e;
  }
  const view: PointInTime = {
    path: path.join(viewDir, SNAP_NAME),
    consistency: 'frozen-cbw',
    attachment,
    frozen: mountpoint,
    frozenMs,
    preservedBytes: 0,
    release: once(() => {
      try {
        const st = cbwStatus(fd);
        view.preservedBytes = st.preservedBytes;
        fs.writeSync(fd, 'end\n', 0);
        const why = cbwFailure(volume, st);
        if (why) throw new DisksnapError(why, st.overflow ? 'ENOSPC' : 'EIO', undefined, volume);
      } finally {
        fs.closeSync(fd); // ends the session in the server too, whatever happened above
      }
    }),
  };
  return view;
}

/** The notice for a volume read frozen that `attach --via fuse` would freeze for milliseconds only. */
function longFreezeNotice(volume: string, attachment: Attachment | undefined, mountpoint: string): string | undefined {
  if (attachment?.via !== 'loop') return undefined;
  return (
    `${volume} is mounted on ${mountpoint} from a plain loop device on a filesystem without reflinks: it stays frozen for the whole read. ` +
    `Attached with \`disksnap attach --via fuse\`, a snapshot freezes it for milliseconds (copy-before-write)`
  );
}

/**
 * A consistent view of a (possibly attached and mounted) volume to read from: a raw image, a
 * block device, or a qcow2 child attached through FUSE. Call release() when done — or use
 * withPointInTime(). See the module note for the cases.
 */
export async function pointInTime(volumePath: string, opts: PointInTimeOptions = {}): Promise<PointInTime> {
  const { source, attachment, mounted } = placementOf(volumePath, !!opts.rawOnly);
  if (!mounted) return { path: source, consistency: 'not-mounted', attachment, release: async () => undefined };
  if (!opts.noFreeze && opts.storeDir !== undefined) assertStoreOutside(opts.storeDir, mounted.rdev, mounted.mountpoint, volumePath);
  if (mounted.clonable || mounted.cbwView) reapStaleClones(volumePath);
  if (mounted.clonable && !opts.noClone) {
    const clone = await cloneView(volumePath, mounted.mountpoint, attachment, opts);
    if (clone) return clone;
  }
  if (opts.noFreeze) return { path: source, consistency: 'crash-consistent', attachment, release: async () => undefined };
  if (mounted.cbwView) {
    const cbw = await cbwView(volumePath, mounted.cbwView, mounted.mountpoint, attachment, opts);
    if (cbw) return cbw;
  }
  const notice = longFreezeNotice(volumePath, attachment, mounted.mountpoint);
  if (notice && !opts.noClone) opts.onLog?.(notice);
  await freeze(mounted.mountpoint, { noGuard: opts.noGuard });
  return frozenView(source, mounted.mountpoint, attachment);
}

/** pointInTime + fn + release on every path. */
export async function withPointInTime<T>(volumePath: string, opts: PointInTimeOptions, fn: (view: PointInTime) => T | Promise<T>): Promise<T> {
  const view = await pointInTime(volumePath, opts);
  try {
    return await fn(view);
  } finally {
    await view.release();
  }
}

/** What `snapshot create` reads of `volume` (an absolute real path) for one attempt. */
export function openCapture(volume: string, opts: CaptureOptions): Promise<CaptureSource> {
  return pointInTime(volume, { ...opts, rawOnly: true });
}

/**
 * The `freeze` hook of createSnapshot (CreateSnapshotOptions.freeze in src/storage): before
 * each attempt it freezes the filesystem mounted from the volume (if any) and returns the thaw,
 * which createSnapshot calls in a `finally` after reading. The volume is read while frozen;
 * for a reflink clone use pointInTime() instead.
 */
export function snapshotFreezeHook(opts: { noGuard?: boolean } = {}): (volumePath: string) => Promise<(() => Promise<void>) | void> {
  return async (volumePath: string) => {
    const mountpoint = findMount(volumePath);
    if (!mountpoint) return undefined;
    await freeze(mountpoint, opts);
    return async () => thaw(mountpoint);
  };
}
