/**
 * Copy-before-write (CBW) inside the FUSE server (fuse-server.ts): the frozen moment of a raw
 * image kept readable after the thaw, so that a snapshot freezes the filesystem for
 * milliseconds instead of for its whole read (point-in-time.ts: 'frozen-cbw').
 *
 *   snapshot process                         FUSE server (one request at a time)
 *   open <view>/ctl (held for the session)
 *   FIFREEZE the mounted filesystem
 *   write "start LIMIT" to ctl  ──────────▶  session starts: from now on, before a WRITE or a
 *   FITHAW (frozen for ms)                   discard of `disk` overwrites a chunk that is
 *                                            neither preserved nor read yet, its old bytes are
 *                                            copied into the preserve file
 *   read <view>/snap at leisure  ─────────▶  each chunk: preserved bytes where preserved,
 *                                            else the image's (unchanged since the start)
 *   read ctl (status), write "end", close ─▶ session ends, the preserve file is closed
 *
 * Why it is exact: the server answers requests one at a time, so a READ of `snap` and a WRITE
 * of `disk` never interleave (the check "preserved?" and the read are one step); FIFREEZE
 * returns only when every write of the filesystem has completed, i.e. been answered by this
 * server, and no new one comes before FITHAW — so "start", handled while frozen, sits exactly
 * at the frozen moment in the order of requests. The chunk (CBW_CHUNK, 64 KiB) is the unit of
 * preservation: a chunk the snapshot has read whole needs no copy any more ('read'); a chunk
 * read and then overwritten cannot be read again ('gone': such a read fails, never returns
 * later bytes). Writes to the device that bypass the filesystem are not frozen at all.
 *
 * The preserve file is created beside the image (`.<image>.disksnap-cbw-<server pid>-<hex>`)
 * and unlinked at once: the server holds it open, so it disappears with the session, with the
 * server, or with a crash of either. (A server SIGKILLed in the microseconds between create and
 * unlink leaves the name; the next point-in-time view of the volume removes it: its pid is dead.)
 * The session belongs to the ctl file handle that started it: when the snapshot process exits
 * or dies, the kernel releases that handle and the server ends the session.
 *
 * The limit: a session whose preserved bytes would exceed LIMIT stops preserving (the VM's
 * write goes ahead, untouched), frees the preserve file and is 'overflowed': every later READ
 * of `snap` fails (EIO) and the status says why, so that the snapshot fails with a clear error
 * (point-in-time.ts) and the volume never does.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { constants as osConstants } from 'node:os';
import { DisksnapError } from '../engine/errors';
import { formatSize } from '../engine/size';
import type { DiskImage } from '../image';

/** The unit of preservation. */
export const CBW_CHUNK = 64 * 1024;
/** The control node and the frozen-moment node beside `disk` on the FUSE view. */
export const CTL_NAME = 'ctl';
export const SNAP_NAME = 'snap';
/** What reading `ctl` returns: JSON, at most this many bytes (the node's size). */
export const CTL_SIZE = 4096;

export interface CbwStatus {
  /** 'none' before the first session and after `end` */
  session: 'none' | 'active' | 'overflowed';
  /** bytes copied into the preserve file so far (the session's last figure after `end`) */
  preservedBytes: number;
  limit: number;
  chunk: number;
  /** snap READs refused: after an overflow, or of a chunk read before and overwritten since */
  refusedReads: number;
  /** why the session overflowed */
  overflow?: string;
  /** the last command's failure, for the client (a WRITE can only return an errno) */
  lastError?: string;
}

const UNTOUCHED = 0;
const PRESERVED = 1;
const READ = 2;
const GONE = 3;

/** The errno a failed command or read is answered with (the FUSE server passes it on). */
const errno = (name: 'EIO' | 'EINVAL' | 'EBUSY' | 'EPERM'): number => osConstants.errno[name];

/** One session: the chunk states, the preserve file and its index. */
class Session {
  readonly state: Uint8Array;
  /** chunk -> offset of its old bytes in the preserve file */
  readonly where = new Map<number, number>();
  fd: number;
  preservedBytes = 0;
  refusedReads = 0;
  overflow?: string;

  constructor(
    readonly owner: bigint,
    readonly limit: number,
    size: number,
    fd: number,
  ) {
    this.state = new Uint8Array(Math.ceil(size / CBW_CHUNK));
    this.fd = fd;
  }
}

/** `.<image>.disksnap-cbw-<pid>-<hex>` beside the image (reaped by point-in-time.ts when its pid is dead). */
export function preserveName(image: string, pid = process.pid): string {
  return path.join(path.dirname(image), `.${path.basename(image)}.disksnap-cbw-${pid}-${randomBytes(4).toString('hex')}`);
}

export class CbwController {
  private session?: Session;
  private last: CbwStatus;
  private scratch = Buffer.alloc(0);

  constructor(
    private readonly image: DiskImage,
    private readonly log: (message: string) => void = () => undefined,
  ) {
    this.last = { session: 'none', preservedBytes: 0, limit: 0, chunk: CBW_CHUNK, refusedReads: 0 };
  }

  get active(): boolean {
    return this.session !== undefined;
  }

  status(): CbwStatus {
    const s = this.session;
    if (!s) return this.last;
    return {
      session: s.overflow ? 'overflowed' : 'active',
      preservedBytes: s.preservedBytes,
      limit: s.limit,
      chunk: CBW_CHUNK,
      refusedReads: s.refusedReads,
      ...(s.overflow ? { overflow: s.overflow } : {}),
      ...(this.last.lastError ? { lastError: this.last.lastError } : {}),
    };
  }

  /** A command written to ctl through file handle `fh`: "start LIMIT" or "end". Throws with an errno. */
  command(text: string, fh: bigint): void {
    this.last.lastError = undefined;
    try {
      const [verb, arg, ...rest] = text.trim().split(/\s+/);
      if (verb === 'start' && arg !== undefined && /^\d+$/.test(arg) && !rest.length) return this.start(Number(arg), fh);
      if (verb === 'end' && arg === undefined) return this.endBy(fh);
      throw new DisksnapError(`unknown command ${JSON.stringify(text.trim().slice(0, 80))} (expected "start LIMIT" or "end")`, 'EINVAL', errno('EINVAL'));
    } catch (e) {
      this.last.lastError = (e as Error).message;
      throw e;
    }
  }

  private start(limit: number, fh: bigint): void {
    if (this.session) throw new DisksnapError('a copy-before-write session is already running on this volume (another snapshot?)', 'EBUSY', errno('EBUSY'));
    if (!this.image.writable) throw new DisksnapError('the volume is attached read-only: it cannot change, there is nothing to preserve', 'EPERM', errno('EPERM'));
    const name = preserveName(this.image.path);
    const fd = fs.openSync(name, 'wx+', 0o600);
    try {
      fs.unlinkSync(name); // held open: gone with the session, the server, or a crash
    } catch (e) {
      fs.closeSync(fd);
      throw e;
    }
    this.session = new Session(fh, limit, this.image.virtualSize, fd);
    this.last = { session: 'active', preservedBytes: 0, limit, chunk: CBW_CHUNK, refusedReads: 0 };
    this.log(`copy-before-write session started (limit ${limit} bytes)`);
  }

  private endBy(fh: bigint): void {
    if (!this.session) return; // nothing running: ending is idempotent
    if (this.session.owner !== fh) throw new DisksnapError('the copy-before-write session belongs to another process', 'EPERM', errno('EPERM'));
    this.end('ended');
  }

  /** The ctl file handle `fh` was released (closed, or its process died): its session ends. */
  released(fh: bigint): void {
    if (this.session?.owner === fh) this.end('ended by the release of its control file');
  }

  /** Ends the session (if any), freeing the preserve file; its figures stay in status(). */
  end(why: string): void {
    const s = this.session;
    if (!s) return;
    this.last = { ...this.status(), session: 'none' };
    this.session = undefined;
    this.closeFile(s);
    this.log(`copy-before-write session ${why}: ${s.preservedBytes} bytes preserved, ${s.refusedReads} read(s) refused${s.overflow ? `; ${s.overflow}` : ''}`);
  }

  private closeFile(s: Session): void {
    if (s.fd < 0) return;
    try {
      fs.closeSync(s.fd);
    } catch {
      // nothing more to free: the file was unlinked when it was made
    }
    s.fd = -1;
  }

  private buffer(n: number): Buffer {
    if (this.scratch.length < n) this.scratch = Buffer.allocUnsafe(n);
    return this.scratch;
  }

  /** Before [offset, offset+length) of the image is overwritten or zeroed: preserve what the snapshot still needs. */
  beforeWrite(offset: number, length: number): void {
    const s = this.session;
    if (!s || s.overflow || length <= 0) return;
    const size = this.image.virtualSize;
    const first = Math.floor(offset / CBW_CHUNK);
    const end = Math.min(s.state.length, Math.ceil(Math.min(size, offset + length) / CBW_CHUNK));
    let needed = 0;
    for (let c = first; c < end; c++) {
      if (s.state[c] === UNTOUCHED) needed += Math.min(CBW_CHUNK, size - c * CBW_CHUNK);
      else if (s.state[c] === READ) s.state[c] = GONE;
    }
    if (!needed) return;
    if (s.preservedBytes + needed > s.limit) {
      return this.overflow(s, `the writes since the freeze needed more than the copy-before-write limit of ${formatSize(s.limit)} (${formatSize(s.preservedBytes)} preserved, ${formatSize(needed)} more asked for)`);
    }
    try {
      this.preserve(s, first, end);
    } catch (e) {
      // the preserve file's filesystem is full, or failing: the snapshot fails, never the write
      this.overflow(s, `the old bytes could not be preserved: ${(e as Error).message}`);
    }
  }

  /** Stops preserving: the session's snapshot will fail; the volume's writes go on untouched. */
  private overflow(s: Session, why: string): void {
    s.overflow = why;
    s.where.clear();
    this.closeFile(s);
    this.log(`copy-before-write session overflowed: ${why}`);
  }

  /** Copies the untouched chunks of [first, end) into the preserve file: one read and one write per run. */
  private preserve(s: Session, first: number, end: number): void {
    const size = this.image.virtualSize;
    for (let c = first; c < end; ) {
      if (s.state[c] !== UNTOUCHED) {
        c++;
        continue;
      }
      let e = c;
      while (e < end && s.state[e] === UNTOUCHED) e++;
      const from = c * CBW_CHUNK;
      const len = Math.min(e * CBW_CHUNK, size) - from;
      const buf = this.buffer(len);
      this.image.readSync(buf.subarray(0, len), from);
      let done = 0;
      while (done < len) done += fs.writeSync(s.fd, buf, done, len - done, s.preservedBytes + done);
      for (let k = c; k < e; k++) {
        s.where.set(k, s.preservedBytes + (k - c) * CBW_CHUNK);
        s.state[k] = PRESERVED;
      }
      s.preservedBytes += len;
      c = e;
    }
  }

  /** A READ of `snap`: the image as it was at the start of the session. Throws EIO where that is no longer known. */
  readSnap(buf: Buffer, offset: number): void {
    const s = this.session;
    const refuse = (why: string): never => {
      if (s) s.refusedReads++;
      throw new DisksnapError(why, 'EIO', errno('EIO'));
    };
    if (!s) return refuse('no copy-before-write session is running: the frozen moment is not kept');
    if (s.overflow) return refuse(s.overflow);
    const end = offset + buf.length;
    const first = Math.floor(offset / CBW_CHUNK);
    const last = Math.ceil(end / CBW_CHUNK);
    for (let c = first; c < last; c++) {
      if (s.state[c] === GONE) return refuse(`chunk ${c} was read before and overwritten since: it cannot be read twice`);
    }
    for (let c = first; c < last; ) {
      const a = Math.max(offset, c * CBW_CHUNK);
      if (s.state[c] === PRESERVED) {
        const b = Math.min(end, (c + 1) * CBW_CHUNK);
        const at = s.where.get(c)! + (a - c * CBW_CHUNK);
        fs.readSync(s.fd, buf, a - offset, b - a, at);
        c++;
        continue;
      }
      let e = c;
      while (e < last && s.state[e] !== PRESERVED) e++;
      const b = Math.min(end, e * CBW_CHUNK);
      this.image.readSync(buf.subarray(a - offset, b - offset), a);
      c = e;
    }
    // chunks read whole need no copy any more
    const size = this.image.virtualSize;
    for (let c = Math.ceil(offset / CBW_CHUNK); c < last && Math.min((c + 1) * CBW_CHUNK, size) <= end; c++) {
      if (s.state[c] === UNTOUCHED) s.state[c] = READ;
    }
  }
}
