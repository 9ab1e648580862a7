/**
 * Attach images to loop devices and detach them.
 *
 *   raw image ───────────────────────────────────────────────▶ /dev/loopN      via 'loop'
 *   qcow2 child ─▶ FUSE server (background) ─▶ <run>/fuse/<id>/disk ─▶ /dev/loopN   via 'fuse+loop'
 *   raw image, opts.via 'fuse' (CLI --via fuse): the same FUSE path as a child
 *
 * A raw image served through FUSE costs speed (README "Loopback": large reads 2-4x slower)
 * but lets snapshots of its mounted filesystem freeze it for milliseconds on any host
 * filesystem: the server's copy-before-write keeps the frozen moment (cbw.ts). Its server
 * keeps the shared lock a plain loop attachment keeps, so `snapshot create` can open it.
 *
 * Raw: the image is opened and locked here, handed to the loop driver (native loopAttach:
 * LOOP_CTL_GET_FREE + LOOP_CONFIGURE), then closed. The loop device keeps its own reference to
 * that open file description, and with it the OFD lock, for as long as it is attached — so the
 * lock outlives this process and QEMU or another disksnap writer is refused while the image is
 * attached (ELOCKED). The lock is the shared one: readers such as `snapshot create` and
 * `disksnap read` still work; the probe before it is exclusive, so an image that anyone else has
 * open (QEMU, a FUSE server reading it as a parent, a disksnap writer) is not attached.
 *
 * qcow2 (or anything openImage understands that the loop driver does not): a detached
 * `node dist/src/host/fuse-server.js` opens the image with openImage({write}) — it holds the
 * image's lock, checks the parent guard, and serves the flat view as one file on a FUSE mount
 * (see fuse-server.ts for the protocol and why no libfuse). Attach waits for its "ready" line,
 * then loop-attaches the file. Detach: loop detach, unmount the FUSE mount (the server sees
 * ENODEV, flushes the child, closes it — releasing the lock — and exits), wait for the server.
 *
 * Refusals (before anything is attached): an image already attached for writing, or attached
 * at all when asking for write access; a read-only file (a differencing parent keeps mode
 * a-w while it has children) or a parent listed in the children registry, unless --read-only;
 * a child whose parent guard fails (EPARENTCHANGED from openImage, surfaced as is).
 *
 * State: one record per device in <run>/attachments (state.ts), checked against the kernel on
 * every read. A record whose device is no longer bound to its file is stale: the FUSE server
 * it names (if any) is stopped and the record removed the next time attach or detach runs.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { native } from '../engine/native';
import { PACKAGE_ROOT } from '../engine/root';
import { childrenOf } from '../image/children';
import { BlockFile } from '../engine/file';
import { DisksnapError, fromNodeError, invalid, busy } from '../engine/errors';
import { detectFormat, openImage } from '../image';
import {
  AttachmentRecord,
  AttachVia,
  FuseRecord,
  fuseDir,
  fuseServerAlive,
  kernelLoop,
  KernelLoop,
  kernelLoops,
  loopIndexOf,
  mountpointsOf,
  mounts,
  processStartTime,
  readRecord,
  readRecords,
  recordMatchesKernel,
  removeRecord,
  writeRecord,
} from './state';
import type { FuseCache } from './fuse-server';

export interface Attachment {
  device: string;
  index: number;
  /** the attached image (absolute); undefined for a FUSE-backed device without our record */
  image?: string;
  readOnly: boolean;
  via: AttachVia;
  /** where the filesystem on the device is mounted (empty when it is not) */
  mountpoints: string[];
  /** the file the loop device is bound to: the image, or the FUSE file of its flat view */
  backing: string;
  format?: string;
  fuse?: FuseRecord & { alive: boolean };
  /** false for a device attached by another tool (losetup, mount -o loop) */
  recorded: boolean;
}

export interface AttachOptions {
  readOnly?: boolean;
  /** FUSE page cache mode for children (default 'direct'; see fuse-server.ts) */
  cache?: FuseCache;
  /**
   * LO_FLAGS_DIRECT_IO on the loop device. Default: false for a raw image (as losetup), true
   * for the FUSE view — the loop driver then hands each request to FUSE whole and
   * asynchronously, instead of one write per bio segment through a second page cache
   * (bench/loop.ts: child reads about 3x, writes up to 2x faster).
   */
  directIo?: boolean;
  /** how long to wait for the FUSE server to come up (default 30 s) */
  timeoutMs?: number;
  /** 'fuse': serve even a raw image through the FUSE view (tests, benchmarks); default by format */
  via?: 'auto' | 'fuse';
}

export interface DetachResult {
  device: string;
  image?: string;
  via: AttachVia;
  /** the FUSE server had died before detach (its child needs `diff check --repair`) */
  serverWasDead?: boolean;
  /** with serverWasDead: the dead server's log, kept for diagnosis */
  log?: string;
  /** only a stale record (device no longer bound to the image) was cleaned up */
  staleOnly?: boolean;
}

interface Identity {
  path: string;
  dev: number;
  ino: string;
  mode: number;
}

function identify(imagePath: string): Identity {
  let real: string;
  let st: fs.BigIntStats;
  try {
    real = fs.realpathSync(imagePath);
    st = fs.statSync(real, { bigint: true });
  } catch (e) {
    throw fromNodeError(e, imagePath);
  }
  if (!st.isFile()) throw invalid(`${imagePath} is not a regular file (attach takes an image file)`, imagePath);
  return { path: real, dev: Number(st.dev), ino: st.ino.toString(), mode: Number(st.mode) };
}

function tryIdentify(imagePath: string): Identity | undefined {
  try {
    return identify(imagePath);
  } catch {
    return undefined; // gone, or not a regular file: no loop device can be bound to it, so no attachments
  }
}

function describe(k: KernelLoop, rec: AttachmentRecord | undefined, allMounts = mounts()): Attachment {
  const mountpoints = mountpointsOf(k.majorMinor, allMounts);
  if (rec) {
    return {
      device: k.device,
      index: k.index,
      image: rec.image,
      readOnly: k.readOnly,
      via: rec.via,
      mountpoints,
      backing: rec.backing,
      format: rec.format,
      fuse: rec.fuse ? { ...rec.fuse, alive: fuseServerAlive(rec.fuse) } : undefined,
      recorded: true,
    };
  }
  const backing = k.backingFile.replace(/ \(deleted\)$/, '');
  const isFuse = backing.startsWith(fuseDir() + path.sep);
  return {
    device: k.device,
    index: k.index,
    image: isFuse ? undefined : backing,
    readOnly: k.readOnly,
    via: isFuse ? 'fuse+loop' : 'loop',
    mountpoints,
    backing,
    recorded: false,
  };
}

/** Every attached loop device, ours (with their image) and other tools' (backing file). */
export function listAttachments(): Attachment[] {
  const records = new Map(readRecords().map((r) => [r.index, r]));
  const all = mounts();
  return kernelLoops().map((k) => {
    const rec = records.get(k.index);
    return describe(k, rec && recordMatchesKernel(rec, k) ? rec : undefined, all);
  });
}

/**
 * Every current attachment of an image: a raw image bound to a loop device directly (by
 * disksnap or any other tool), or a child served through FUSE by disksnap. Writable ones first.
 */
export function attachmentsOf(imagePath: string): Attachment[] {
  const id = tryIdentify(imagePath);
  if (!id) return [];
  // (the records and the mount table only where they can matter: every raw snapshot asks)
  const loops = kernelLoops();
  if (!loops.length) return [];
  const records = new Map(readRecords().map((r) => [r.index, r]));
  let all: ReturnType<typeof mounts> | undefined;
  const out: Attachment[] = [];
  for (const k of loops) {
    const rec = records.get(k.index);
    const valid = rec && recordMatchesKernel(rec, k) ? rec : undefined;
    if (valid) {
      if (valid.imageDev === id.dev && valid.imageIno === id.ino) out.push(describe(k, valid, (all ??= mounts())));
    } else if (k.status.backingDev === id.dev && k.status.backingIno.toString() === id.ino) {
      out.push(describe(k, undefined, (all ??= mounts())));
    }
  }
  return out.sort((a, b) => Number(a.readOnly) - Number(b.readOnly) || a.index - b.index);
}

/** The image's attachment (the writable one if there is one), or undefined. For `info`. */
export function attachmentOf(imagePath: string): Attachment | undefined {
  return attachmentsOf(imagePath)[0];
}

/**
 * Throws EBUSY if the image is attached to a loop device. For in-place restore, `diff
 * rollback`/`commit`/`reset` and anything else that must not change an image under a kernel
 * that has it attached. `action` names the refused operation ("restore in place", ...).
 */
export function assertNotAttached(imagePath: string, action: string): void {
  const a = attachmentOf(imagePath);
  if (!a) return;
  const where = a.mountpoints.length ? ` (mounted on ${a.mountpoints.join(', ')})` : '';
  const steps = a.mountpoints.length ? `unmount it and run \`disksnap detach ${a.device}\`` : `run \`disksnap detach ${a.device}\``;
  throw busy(`${imagePath} is attached to ${a.device}${where}; ${steps} first, then ${action}`, imagePath);
}

/** Attaches an image; returns the device. See the module note for what is refused. */
export async function attach(imagePath: string, opts: AttachOptions = {}): Promise<Attachment> {
  const readOnly = !!opts.readOnly;
  const id = identify(imagePath);
  await reapStale();

  const existing = attachmentsOf(id.path);
  const writer = existing.find((a) => !a.readOnly);
  if (writer) {
    throw busy(`${imagePath} is already attached for writing to ${writer.device}; run \`disksnap detach ${writer.device}\` first`, imagePath);
  }
  if (!readOnly && existing.length) {
    throw busy(
      `${imagePath} is already attached read-only to ${existing.map((a) => a.device).join(', ')}; ` +
        'attach it read-only too (--read-only), or detach it first',
      imagePath,
    );
  }
  if (!readOnly) {
    const children = childrenOf(id.path);
    if (children.length) {
      throw busy(
        `${imagePath} is the parent of ${children.join(', ')}: it must not change while it has children. ` +
          'Attach a child instead, or attach it with --read-only',
        imagePath,
      );
    }
    if ((id.mode & 0o222) === 0) {
      throw busy(
        `${imagePath} is read-only (mode ${(id.mode & 0o777).toString(8)}; a differencing parent keeps that mode while it has children). ` +
          'Attach a child instead, or attach it with --read-only',
        imagePath,
      );
    }
  }

  const format = detectFormat(id.path);
  return format === 'raw' && opts.via !== 'fuse' ? attachRaw(id, readOnly, !!opts.directIo) : attachViaFuse(id, format, readOnly, opts);
}

function attachRaw(id: Identity, readOnly: boolean, directIo: boolean): Attachment {
  // Exclusive first: nobody else may have it open for writing (QEMU, disksnap), nor, for a
  // writable attachment, for reading. Then the shared lock that the loop device keeps.
  const f = BlockFile.open(id.path, { write: !readOnly, lock: readOnly ? 'shared' : 'exclusive' });
  if (!readOnly) f.setLock('shared');
  return bindLoop(f, id, { format: 'raw', readOnly, directIo, via: 'loop', backing: id.path, backingDev: id.dev, backingIno: id.ino });
}

/**
 * Hands the open file `f` to a free loop device (closing f: the device keeps its own
 * reference, lock included), then records the attachment and describes it.
 */
function bindLoop(
  f: BlockFile,
  id: Identity,
  a: { format: string; readOnly: boolean; directIo: boolean; via: AttachVia; backing: string; backingDev: number; backingIno: string; fuse?: FuseRecord },
): Attachment {
  let r: { device: string; index: number };
  try {
    r = native().loopAttach(f.fd, a.readOnly, a.directIo, id.path);
  } finally {
    f.close();
  }
  const k = kernelLoop(r.index);
  const rec: AttachmentRecord = {
    version: 1,
    device: r.device,
    index: r.index,
    image: id.path,
    imageDev: id.dev,
    imageIno: id.ino,
    format: a.format,
    readOnly: a.readOnly,
    via: a.via,
    backing: a.backing,
    backingDev: k?.status.backingDev ?? a.backingDev,
    backingIno: k?.status.backingIno.toString() ?? a.backingIno,
    ...(a.fuse ? { fuse: a.fuse } : {}),
    attachedAt: new Date().toISOString(),
  };
  writeRecord(rec);
  if (k) return describe(k, rec);
  return {
    device: r.device,
    index: r.index,
    image: id.path,
    readOnly: a.readOnly,
    via: a.via,
    mountpoints: [],
    backing: a.backing,
    format: a.format,
    ...(a.fuse ? { fuse: { ...a.fuse, alive: true } } : {}),
    recorded: true,
  };
}

/** The compiled server script (tests may run this module from the TypeScript sources). */
function serverScript(): string {
  const here = path.join(__dirname, 'fuse-server.js');
  if (fs.existsSync(here)) return here;
  const compiled = path.join(PACKAGE_ROOT, 'dist', 'src', 'host', 'fuse-server.js');
  if (fs.existsSync(compiled)) return compiled;
  throw new DisksnapError(`the FUSE server is not compiled (${compiled} is missing); run \`npm run build\``, 'ENOTBUILT');
}

interface ServerReady {
  ok: boolean;
  file?: string;
  pid?: number;
  error?: { message: string; code: string; errno?: number; path?: string };
}

function tail(file: string, lines = 5): string {
  try {
    return fs.readFileSync(file, 'utf8').trimEnd().split('\n').slice(-lines).join('\n');
  } catch {
    return ''; // only decorates an error message that is already being built
  }
}

async function startServer(
  image: string,
  mountpoint: string,
  log: string,
  readOnly: boolean,
  cache: FuseCache,
  timeoutMs: number,
): Promise<{ pid: number; file: string }> {
  const logFd = fs.openSync(log, 'a', 0o644);
  const args = [serverScript(), '--image', image, '--mountpoint', mountpoint, '--cache', cache, '--ready-fd', '3'];
  if (readOnly) args.push('--read-only');
  // without NODE_EXTRA_CA_CERTS, which node parses as it starts (../engine/extra-ca.ts): the server opens no TLS connection
  const env = { ...process.env, NODE_EXTRA_CA_CERTS: undefined };
  const child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', logFd, logFd, 'pipe'], env });
  fs.closeSync(logFd);
  const ready = await new Promise<ServerReady>((resolve) => {
    let text = '';
    const done = (r: ServerReady) => {
      clearTimeout(timer);
      child.removeAllListeners('exit');
      resolve(r);
    };
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      done({ ok: false, error: { message: `the FUSE server did not come up within ${timeoutMs} ms (log: ${log})`, code: 'ETIMEDOUT' } });
    }, timeoutMs);
    const pipe = child.stdio[3] as NodeJS.ReadableStream;
    pipe.setEncoding('utf8');
    pipe.on('data', (chunk: string) => {
      text += chunk;
      const nl = text.indexOf('\n');
      if (nl >= 0) {
        try {
          done(JSON.parse(text.slice(0, nl)) as ServerReady);
        } catch {
          // not JSON: reported as such, with the line
          done({ ok: false, error: { message: `the FUSE server said something unexpected: ${text.slice(0, nl)}`, code: 'EIO' } });
        }
      }
    });
    pipe.on('error', () => undefined);
    child.on('exit', (code, signal) => {
      done({ ok: false, error: { message: `the FUSE server exited (${signal ?? `status ${code}`}) before it was ready:\n${tail(log)}`, code: 'EIO' } });
    });
  });
  (child.stdio[3] as NodeJS.ReadableStream & { destroy(): void }).destroy();
  child.unref();
  if (!ready.ok || !ready.file || !child.pid) {
    const e = ready.error ?? { message: 'the FUSE server failed', code: 'EIO' };
    throw new DisksnapError(e.message, e.code, e.errno, e.path ?? image);
  }
  return { pid: child.pid, file: ready.file };
}

async function attachViaFuse(id: Identity, format: string, readOnly: boolean, opts: AttachOptions): Promise<Attachment> {
  // Open it here first so that a failed parent guard, a lock held elsewhere or an unsupported
  // feature is reported by this process with the image layer's own message.
  openImage(id.path, { write: !readOnly }).close();

  const sessionId = randomBytes(6).toString('hex');
  const mountpoint = path.join(fuseDir(), sessionId);
  const log = path.join(fuseDir(), `${sessionId}.log`);
  fs.mkdirSync(mountpoint, { recursive: true, mode: 0o700 });
  let server: { pid: number; file: string } | undefined;
  try {
    server = await startServer(id.path, mountpoint, log, readOnly, opts.cache ?? 'direct', opts.timeoutMs ?? 30_000);
    const startTime = processStartTime(server.pid) ?? '';
    const fuse: FuseRecord = { pid: server.pid, startTime, mountpoint, file: server.file, log };
    const f = BlockFile.open(server.file, { write: !readOnly, lock: 'none' });
    return bindLoop(f, id, { format, readOnly, directIo: opts.directIo ?? true, via: 'fuse+loop', backing: server.file, backingDev: 0, backingIno: '0', fuse });
  } catch (e) {
    if (server) await stopFuse({ pid: server.pid, startTime: processStartTime(server.pid) ?? '', mountpoint, file: server.file, log }).catch(() => undefined);
    else fs.rmSync(mountpoint, { recursive: false, force: true });
    fs.rmSync(log, { force: true }); // what it says is in the error
    throw e;
  }
}

// ---------------------------------------------------------------------------------------------
// Detach

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function isMounted(mountpoint: string): boolean {
  return mounts().some((m) => m.mountpoint === mountpoint);
}

/** Unmounts a FUSE view and waits for its server to flush and exit. Returns whether it was already dead. */
async function stopFuse(f: FuseRecord, timeoutMs = 120_000): Promise<boolean> {
  const wasDead = !fuseServerAlive(f);
  for (let i = 0; isMounted(f.mountpoint); i++) {
    try {
      // A dead server's mount can only be detached lazily if something still holds it; a live
      // one is unmounted normally so that the server sees ENODEV and flushes.
      native().unmount(f.mountpoint, i >= 20);
    } catch (e) {
      if (!(e instanceof DisksnapError) || (e.code !== 'EBUSY' && e.code !== 'EINVAL')) throw e;
      if (e.code === 'EINVAL') break; // not a mountpoint any more
      await sleep(50);
    }
  }
  const deadline = Date.now() + timeoutMs;
  while (fuseServerAlive(f)) {
    if (Date.now() > deadline) {
      throw new DisksnapError(
        `the FUSE server (pid ${f.pid}) has not exited ${timeoutMs / 1000} s after unmount; it may still be flushing (log: ${f.log})`,
        'ETIMEDOUT',
      );
    }
    await sleep(20);
  }
  try {
    fs.rmdirSync(f.mountpoint);
  } catch {
    // removed by the server on its way out, or still busy: an empty directory holds nothing
  }
  // a clean session's log says nothing worth keeping; a dead server's log is kept for diagnosis
  if (!wasDead && process.env.DISKSNAP_FUSE_STATS !== '1') fs.rmSync(f.log, { force: true });
  return wasDead;
}

/** How old an unreferenced FUSE view must be before it counts as orphaned (attach in progress otherwise). */
const ORPHAN_AGE_MS = 60_000;

/**
 * Removes records whose device is no longer bound to their file, stopping their FUSE servers;
 * and unmounts orphaned FUSE views (an attach interrupted between starting the server and
 * writing the record), i.e. views under <run>/fuse that no record names, no loop device is
 * bound to, and that are older than a minute.
 */
export async function reapStale(): Promise<number> {
  let n = 0;
  const records = readRecords();
  for (const rec of records) {
    if (recordMatchesKernel(rec, kernelLoop(rec.index))) continue;
    if (rec.fuse) await stopFuse(rec.fuse).catch(() => undefined);
    removeRecord(rec.index);
    n++;
  }
  const views = mounts().filter((m) => m.fstype === 'fuse.disksnap' && path.dirname(m.mountpoint) === fuseDir());
  if (views.length) {
    const named = new Set(readRecords().flatMap((r) => (r.fuse ? [r.fuse.mountpoint] : [])));
    const bound = kernelLoops().map((k) => k.backingFile);
    for (const v of views) {
      if (named.has(v.mountpoint) || bound.some((b) => b.startsWith(v.mountpoint + path.sep))) continue;
      let age = 0;
      try {
        age = Date.now() - fs.statSync(`${v.mountpoint}.log`).mtimeMs;
      } catch {
        continue; // no log: not one of ours, or being set up
      }
      if (age < ORPHAN_AGE_MS) continue;
      try {
        // the server sees ENODEV, flushes its image and exits
        native().unmount(v.mountpoint, true);
        n++;
        fs.rmdirSync(v.mountpoint);
        fs.rmSync(`${v.mountpoint}.log`, { force: true });
      } catch {
        // someone else got there first
      }
    }
  }
  return n;
}

async function detachDevice(index: number, explicitDevice: boolean): Promise<DetachResult> {
  const device = `/dev/loop${index}`;
  const rec = readRecord(index);
  const k = kernelLoop(index);
  const valid = rec && recordMatchesKernel(rec, k) ? rec : undefined;
  if (!k && !rec) throw new DisksnapError(`${device} is not attached`, 'ENXIO', 6, device);
  if (k && (valid || explicitDevice)) {
    const mps = mountpointsOf(k.majorMinor);
    if (mps.length) {
      throw busy(`${device} is mounted on ${mps.join(', ')}; unmount it first (\`umount ${mps[0]}\`), then detach`, device);
    }
    try {
      native().loopDetach(device);
    } catch (e) {
      if (!(e instanceof DisksnapError && e.code === 'ENXIO')) throw e;
    }
    // LOOP_CLR_FD completes when the last opener closes the device; udev or blkid may hold it
    // for a moment. An opener that stays makes the detach deferred (autoclear): report it.
    const deadline = Date.now() + 5000;
    while (kernelLoop(index)) {
      if (Date.now() > deadline) {
        throw busy(`${device} is still open by another process; it will be detached when that process closes it`, device);
      }
      await sleep(20);
    }
  }
  let serverWasDead: boolean | undefined;
  if (rec?.fuse) serverWasDead = await stopFuse(rec.fuse);
  if (rec) removeRecord(index);
  const res: DetachResult = { device, image: rec?.image ?? k?.backingFile, via: rec?.via ?? 'loop' };
  if (serverWasDead) {
    res.serverWasDead = true;
    res.log = rec?.fuse?.log;
  }
  if (!k || (rec && !valid && !explicitDevice)) res.staleOnly = true;
  return res;
}

/**
 * Detaches a loop device (DEVICE) or every attachment of an image (FILE). A mounted device is
 * refused (EBUSY): unmount first. A FUSE-backed device also has its FUSE view unmounted and its
 * server waited for (it flushes the child and releases its lock); a server that had died is
 * reported in `serverWasDead`, its mount removed all the same.
 */
export async function detach(target: string): Promise<DetachResult[]> {
  const index = loopIndexOf(target);
  if (index !== undefined) {
    const res = await detachDevice(index, true);
    await reapStale();
    return [res];
  }
  let st: fs.Stats;
  try {
    st = fs.statSync(target);
  } catch (e) {
    throw fromNodeError(e, target);
  }
  if (st.isBlockDevice()) throw invalid(`${target} is not a loop device`, target);
  const id = identify(target);
  const results: DetachResult[] = [];
  for (const a of attachmentsOf(id.path)) results.push(await detachDevice(a.index, true));
  // stale records of this image (the device was detached behind our back, or reused)
  for (const rec of readRecords()) {
    if (rec.imageDev !== id.dev || rec.imageIno !== id.ino) continue;
    if (results.some((r) => r.device === rec.device)) continue;
    results.push(await detachDevice(rec.index, false));
  }
  if (!results.length) throw new DisksnapError(`${target} is not attached to any loop device`, 'ENXIO', 6, target);
  await reapStale();
  return results;
}
