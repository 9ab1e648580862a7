/**
 * The flat view of any image (a qcow2 child, a chain, or a raw file) as ONE regular file on a
 * FUSE mount, so that the kernel's loop driver — which only understands files — can attach it.
 *
 *   /dev/loopN ──(loop driver: read_iter/write_iter/fsync/fallocate)──▶ <mountpoint>/disk
 *        ▲                                                                   │ (FUSE)
 *   ext4, xfs, ...                                      /dev/fuse ◀──────────┘
 *                                                           │  this process: one request at a time
 *                                                           ▼
 *                                        openImage(child, {write}) — reads fall through the
 *                                        chain, writes copy-on-write into the child
 *
 * Why the kernel protocol and not libfuse: `npm install` has to build on a fresh machine, and
 * libfuse3's headers (libfuse3-dev) are not there; linking libfuse would also put a C event
 * loop between the kernel and the TypeScript image code that has to answer every request
 * anyway. The server needs a dozen opcodes for one file, every reply is one writev(2), and
 * mount(2) with "fd=N,rootmode=..." (native/fuse.cc) is all fusermount3 would have done for
 * root. Nothing of libfuse's is needed at build time or at run time.
 *
 * Model:
 * - Node 1 is the root directory, node 2 the file `disk` (size = the image's virtual size,
 *   mode 0600, or 0400 read-only). Nodes 3 `ctl` and 4 `snap` are the copy-before-write
 *   control and the frozen-moment view of a snapshot (cbw.ts: what they do, why it is exact).
 *   Nothing else exists; create/unlink/rename get EPERM.
 * - The server is single-threaded and synchronous: read a request, answer it, repeat. The
 *   process does nothing else, so blocking is what we want: no event-loop hop per request.
 *   Requests are up to 1 MiB (INIT: max_write 1 MiB, max_pages 256, max_readahead 1 MiB);
 *   a READ reply is header + data in one writev, the data read straight into the reply buffer;
 *   WRITE data is used in place in the request buffer.
 * - Caching: the file is opened with FOPEN_DIRECT_IO and the loop device is attached with
 *   LO_FLAGS_DIRECT_IO (attach.ts), so each block request reaches this server whole (512 KiB:
 *   the loop queue's 128 segments) and the only page cache is the block device's own.
 *   Measured on one 1 GiB child (dd bs=1M iflag=direct on the device, same run):
 *     FUSE page cache, buffered loop ...... 8192 READs of 128 KiB (readahead), ~0.3 GB/s
 *     FOPEN_DIRECT_IO, buffered loop ...... 2048 READs of 512 KiB, ~0.9-2 GB/s; writes go one
 *                                            bio segment at a time
 *     FOPEN_DIRECT_IO + loop direct I/O .... 2048 READs of 512 KiB, ~2-3 GB/s, writes whole
 *   `--cache page` keeps the FUSE page cache (with loop direct I/O it behaves like direct).
 * - Durability: FSYNC and FLUSH call image.flushSync(): the loop driver turns a filesystem's
 *   REQ_PREFLUSH into vfs_fsync on the file, so a journal commit inside the guest filesystem
 *   reaches the child's disk in the same order as on a real disk.
 * - Discard: FALLOCATE with PUNCH_HOLE or ZERO_RANGE (what the loop driver sends for discard
 *   and write-zeroes) calls image.writeZeroesSync on the range.
 * - Shutdown: unmounting (detach) makes read(/dev/fuse) fail with ENODEV; the server flushes
 *   the image, closes it (releasing its lock) and exits 0. If the server is killed instead,
 *   the kernel aborts the connection (every later request fails with ENOTCONN, so the loop
 *   device sees I/O errors, never stale data) and the image is left as after a crash:
 *   `disksnap diff check --repair` cleans a child's leaked clusters.
 *
 * Deliberately not done: parallel request handling (the image layer is synchronous and one
 * request at a time already saturates a 1 MiB sequential stream), SEEK_DATA/SEEK_HOLE (LSEEK
 * answers ENOSYS), splice.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { parseArgs } from 'node:util';
import { native } from '../engine/native';
import { DisksnapError } from '../engine/errors';
import { DiskImage, openImage } from '../image';
import { RawImage } from '../image/raw';
import { CbwController, CTL_NAME, CTL_SIZE, SNAP_NAME } from './cbw';
import {
  ATTR_OUT,
  CTL_ID,
  E,
  ENTRY_OUT,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  FallocateIn,
  FATTR_SIZE,
  FILE_ID,
  FOPEN_DIRECT_IO,
  FOPEN_KEEP_CACHE,
  FUSE_KERNEL_MINOR_VERSION,
  FUSE_KERNEL_VERSION,
  IN_HEADER,
  INIT_OUT,
  InHeader,
  InitFlag,
  InitIn,
  InitOut,
  DT_DIR,
  DT_REG,
  Op,
  OPEN_OUT,
  OUT_HEADER,
  OutHeader,
  ReadIn,
  ReleaseIn,
  ROOT_ID,
  S_IFDIR,
  S_IFREG,
  SetattrIn,
  SNAP_ID,
  STATFS_OUT,
  WRITE_IN,
  WRITE_OUT,
  WriteIn,
  direntSize,
  writeAttr,
  writeDirent,
} from './fuse-protocol';

export const FILE_NAME = 'disk';
export const DEFAULT_MAX_IO = 1 << 20;

export type FuseCache = 'direct' | 'page';

export interface FuseServeOptions {
  image: DiskImage;
  mountpoint: string;
  readOnly: boolean;
  cache?: FuseCache;
  /** largest READ/WRITE request, default 1 MiB (the kernel's max_pages limit is 256 pages) */
  maxIo?: number;
  log?: (message: string) => void;
  /** called once the kernel has completed INIT: the file can be opened */
  onReady?: (file: string) => void;
}

/** Attribute validity we give the kernel: nothing changes behind its back. */
const VALID_SECONDS = 24 * 3600;

export class FuseServer {
  readonly file: string;
  private fd = -1;
  private readonly image: DiskImage;
  private readonly readOnly: boolean;
  private readonly cache: FuseCache;
  private readonly maxIo: number;
  private readonly log: (message: string) => void;
  private readonly startSec = Math.floor(Date.now() / 1000);
  private readonly inBuf: Buffer;
  private outBuf: Buffer;
  private destroyed = false;
  private ready = false;
  /** requests answered with an error, for the shutdown log */
  private errors = 0;
  /** per-opcode count, bytes and milliseconds, logged at shutdown (DISKSNAP_FUSE_STATS=1) */
  private readonly stats = process.env.DISKSNAP_FUSE_STATS === '1' ? new Map<number, { n: number; bytes: number; ms: number }>() : undefined;
  /** copy-before-write sessions of snapshots (cbw.ts) */
  private readonly cbw: CbwController;
  /** file handles of `ctl` opens: a session belongs to one */
  private nextFh = 1n;

  constructor(private readonly opts: FuseServeOptions) {
    this.image = opts.image;
    this.readOnly = opts.readOnly;
    this.cache = opts.cache ?? 'direct';
    this.maxIo = opts.maxIo ?? DEFAULT_MAX_IO;
    this.log = opts.log ?? (() => undefined);
    this.file = path.join(opts.mountpoint, FILE_NAME);
    // The kernel refuses a read(2) on /dev/fuse with a buffer smaller than the largest request.
    this.inBuf = Buffer.allocUnsafe(this.maxIo + 64 * 1024);
    this.outBuf = Buffer.allocUnsafe(OUT_HEADER + this.maxIo);
    this.cbw = new CbwController(this.image, this.log);
  }

  /** mount(2) the FUSE filesystem; the kernel then queues INIT for serve(). */
  mount(): void {
    const fsname = `disksnap:${this.image.path}`.replace(/[,\s]/g, '_');
    this.fd = native().fuseMount(this.opts.mountpoint, fsname, this.readOnly, 'default_permissions,allow_other');
  }

  /** Answers requests until the filesystem is unmounted (or the connection is aborted). */
  serve(): void {
    for (;;) {
      let n: number;
      try {
        n = fs.readSync(this.fd, this.inBuf, 0, this.inBuf.length, null);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EINTR' || code === 'EAGAIN' || code === 'ENOENT') continue; // ENOENT: request interrupted
        if (code === 'ENODEV') break; // unmounted
        throw e;
      }
      if (n < IN_HEADER) continue;
      if (this.stats) {
        const t0 = performance.now();
        this.dispatch(n);
        const op = this.inBuf.readUInt32LE(InHeader.opcode);
        const st = this.stats.get(op) ?? { n: 0, bytes: 0, ms: 0 };
        st.n++;
        st.bytes += n;
        st.ms += performance.now() - t0;
        this.stats.set(op, st);
      } else {
        this.dispatch(n);
      }
    }
    if (this.stats) {
      for (const [op, st] of this.stats) this.log(`opcode ${op}: ${st.n} requests, ${st.bytes} bytes in, ${st.ms.toFixed(1)} ms`);
    }
    this.log(`unmounted (${this.errors} request(s) failed during the session)`);
  }

  /** Flushes and closes the image and the /dev/fuse descriptor. */
  close(): void {
    this.cbw.end('ended by the shutdown of the server');
    try {
      if (this.image.writable) this.image.flushSync();
    } finally {
      this.image.close();
      if (this.fd >= 0) fs.closeSync(this.fd);
      this.fd = -1;
    }
  }

  // -------------------------------------------------------------------------------------------

  private dispatch(n: number): void {
    const b = this.inBuf;
    const opcode = b.readUInt32LE(InHeader.opcode);
    const nodeid = b.readUInt32LE(InHeader.nodeid); // node ids are 1 and 2: the low word suffices
    const arg = IN_HEADER + b.readUInt16LE(InHeader.totalExtlen) * 8;
    try {
      switch (opcode) {
        case Op.INIT:
          return this.init(arg);
        case Op.LOOKUP:
          return this.lookup(nodeid, b.toString('utf8', arg, b.indexOf(0, arg) < 0 ? n : Math.min(n, b.indexOf(0, arg))));
        case Op.GETATTR:
          return this.replyAttr(nodeid);
        case Op.SETATTR:
          return this.setattr(nodeid, arg);
        case Op.OPEN:
          return this.open(nodeid);
        case Op.OPENDIR:
          return nodeid === ROOT_ID ? this.replyOpen(0) : this.error(E.ENOTDIR);
        case Op.READ:
          return this.read(nodeid, arg);
        case Op.WRITE:
          return this.write(nodeid, arg, n);
        case Op.READDIR:
          return this.readdir(nodeid, arg);
        case Op.STATFS:
          return this.statfs();
        case Op.FLUSH:
        case Op.FSYNC:
          if (this.image.writable) this.image.flushSync();
          return this.ok();
        case Op.RELEASE:
          if (nodeid === CTL_ID) this.cbw.released(b.readBigUInt64LE(arg + ReleaseIn.fh));
          return this.ok();
        case Op.RELEASEDIR:
        case Op.FSYNCDIR:
        case Op.ACCESS:
          return this.ok();
        case Op.FALLOCATE:
          return this.fallocate(nodeid, arg);
        case Op.FORGET:
        case Op.BATCH_FORGET:
        case Op.INTERRUPT:
          return; // no reply
        case Op.DESTROY:
          this.destroyed = true;
          return this.ok();
        case Op.MKNOD:
        case Op.MKDIR:
        case Op.CREATE:
        case Op.UNLINK:
        case Op.RMDIR:
        case Op.RENAME:
        case Op.LINK:
        case Op.SYMLINK:
          return this.error(this.readOnly ? E.EROFS : E.EPERM);
        default:
          // GETXATTR, LISTXATTR, LSEEK, IOCTL, POLL, READDIRPLUS...: the kernel stops asking.
          return this.error(E.ENOSYS);
      }
    } catch (e) {
      this.errors++;
      const errno = e instanceof DisksnapError && e.errno ? e.errno : E.EIO;
      this.log(`opcode ${opcode} failed: ${(e as Error).message} -> errno ${errno}`);
      this.error(errno);
    }
  }

  private header(len: number, error: number): Buffer {
    const o = this.outBuf;
    o.writeUInt32LE(len, OutHeader.len);
    o.writeInt32LE(-error, OutHeader.error);
    this.inBuf.copy(o, OutHeader.unique, InHeader.unique, InHeader.unique + 8);
    return o;
  }

  private send(len: number): void {
    try {
      fs.writeSync(this.fd, this.outBuf, 0, len);
    } catch (e) {
      // ENOENT: the request was interrupted and the kernel no longer waits for it.
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw e;
    }
  }

  private ok(): void {
    this.header(OUT_HEADER, 0);
    this.send(OUT_HEADER);
  }

  private error(errno: number): void {
    this.header(OUT_HEADER, errno);
    this.send(OUT_HEADER);
  }

  private init(arg: number): void {
    const b = this.inBuf;
    const major = b.readUInt32LE(arg + InitIn.major);
    const minor = b.readUInt32LE(arg + InitIn.minor);
    const kernelFlags = b.readUInt32LE(arg + InitIn.flags);
    if (major !== FUSE_KERNEL_VERSION) {
      this.log(`kernel speaks FUSE ${major}.${minor}; this server needs ${FUSE_KERNEL_VERSION}.x`);
      return this.error(E.EPROTO);
    }
    const want = InitFlag.ASYNC_READ | InitFlag.BIG_WRITES | InitFlag.MAX_PAGES | InitFlag.ASYNC_DIO;
    const flags = kernelFlags & want;
    const o = this.header(OUT_HEADER + INIT_OUT, 0);
    const at = OUT_HEADER;
    o.fill(0, at, at + INIT_OUT);
    o.writeUInt32LE(FUSE_KERNEL_VERSION, at + InitOut.major);
    o.writeUInt32LE(Math.min(minor, FUSE_KERNEL_MINOR_VERSION), at + InitOut.minor);
    o.writeUInt32LE(this.maxIo, at + InitOut.maxReadahead);
    o.writeUInt32LE(flags, at + InitOut.flags);
    o.writeUInt16LE(16, at + InitOut.maxBackground);
    o.writeUInt16LE(12, at + InitOut.congestionThreshold);
    o.writeUInt32LE(this.maxIo, at + InitOut.maxWrite);
    o.writeUInt32LE(1, at + InitOut.timeGran);
    o.writeUInt16LE(Math.ceil(this.maxIo / 4096), at + InitOut.maxPages);
    this.send(OUT_HEADER + INIT_OUT);
    this.log(`INIT: kernel FUSE ${major}.${minor}, flags ${kernelFlags.toString(16)} -> ${flags.toString(16)}, max I/O ${this.maxIo}, cache ${this.cache}`);
    if (!this.ready) {
      this.ready = true;
      this.opts.onReady?.(this.file);
    }
  }

  private attr(nodeid: number, at: number): boolean {
    if (nodeid === ROOT_ID) {
      writeAttr(this.outBuf, at, { ino: ROOT_ID, size: 0, mode: S_IFDIR | 0o755, nlink: 2, uid: 0, gid: 0, timeSec: this.startSec, blksize: 4096 });
      return true;
    }
    if (nodeid === FILE_ID || nodeid === SNAP_ID || nodeid === CTL_ID) {
      const mode = S_IFREG | (nodeid === SNAP_ID || this.readOnly ? 0o400 : 0o600);
      const size = nodeid === CTL_ID ? CTL_SIZE : this.image.virtualSize;
      writeAttr(this.outBuf, at, { ino: nodeid, size, mode, nlink: 1, uid: 0, gid: 0, timeSec: this.startSec, blksize: 4096 });
      return true;
    }
    return false;
  }

  private replyAttr(nodeid: number): void {
    const o = this.header(OUT_HEADER + ATTR_OUT, 0);
    o.fill(0, OUT_HEADER, OUT_HEADER + 16);
    o.writeBigUInt64LE(BigInt(VALID_SECONDS), OUT_HEADER);
    if (!this.attr(nodeid, OUT_HEADER + 16)) return this.error(E.ENOENT);
    this.send(OUT_HEADER + ATTR_OUT);
  }

  private lookup(parent: number, name: string): void {
    if (parent !== ROOT_ID) return this.error(E.ENOTDIR);
    const id = { [FILE_NAME]: FILE_ID, [CTL_NAME]: CTL_ID, [SNAP_NAME]: SNAP_ID }[name];
    if (id === undefined) return this.error(E.ENOENT);
    const o = this.header(OUT_HEADER + ENTRY_OUT, 0);
    const at = OUT_HEADER;
    o.fill(0, at, at + 40);
    o.writeBigUInt64LE(BigInt(id), at);
    o.writeBigUInt64LE(BigInt(VALID_SECONDS), at + 16);
    o.writeBigUInt64LE(BigInt(VALID_SECONDS), at + 24);
    this.attr(id, at + 40);
    this.send(OUT_HEADER + ENTRY_OUT);
  }

  private setattr(nodeid: number, arg: number): void {
    const valid = this.inBuf.readUInt32LE(arg + SetattrIn.valid);
    if (valid & FATTR_SIZE) {
      const size = Number(this.inBuf.readBigUInt64LE(arg + SetattrIn.size));
      if (size !== (nodeid === CTL_ID ? CTL_SIZE : this.image.virtualSize)) return this.error(this.readOnly ? E.EROFS : E.EPERM);
    }
    // mode, owner and times are not stored anywhere: accepted and ignored
    this.replyAttr(nodeid);
  }

  private open(nodeid: number): void {
    if (nodeid === FILE_ID) return this.replyOpen(this.cache === 'direct' ? FOPEN_DIRECT_IO : FOPEN_KEEP_CACHE);
    // never cached: every read of `snap` and of `ctl` must reach the server
    if (nodeid === SNAP_ID) return this.replyOpen(FOPEN_DIRECT_IO);
    if (nodeid === CTL_ID) return this.replyOpen(FOPEN_DIRECT_IO, this.nextFh++);
    this.error(E.EISDIR);
  }

  private replyOpen(openFlags: number, fh = 0n): void {
    const o = this.header(OUT_HEADER + OPEN_OUT, 0);
    o.fill(0, OUT_HEADER, OUT_HEADER + OPEN_OUT);
    o.writeBigUInt64LE(fh, OUT_HEADER);
    o.writeUInt32LE(openFlags, OUT_HEADER + 8);
    this.send(OUT_HEADER + OPEN_OUT);
  }

  private read(nodeid: number, arg: number): void {
    if (nodeid !== FILE_ID && nodeid !== SNAP_ID && nodeid !== CTL_ID) return this.error(E.EISDIR);
    const offset = Number(this.inBuf.readBigUInt64LE(arg + ReadIn.offset));
    const size = this.inBuf.readUInt32LE(arg + ReadIn.size);
    const status = nodeid === CTL_ID ? Buffer.from(JSON.stringify(this.cbw.status()) + '\n').subarray(offset) : undefined;
    const len = Math.max(0, Math.min(size, status ? status.length : this.image.virtualSize - offset));
    if (OUT_HEADER + len > this.outBuf.length) this.outBuf = Buffer.allocUnsafe(OUT_HEADER + len);
    const data = this.outBuf.subarray(OUT_HEADER, OUT_HEADER + len);
    if (status) status.copy(data, 0, 0, len);
    else if (len > 0 && nodeid === SNAP_ID) this.cbw.readSnap(data, offset);
    else if (len > 0) this.image.readSync(data, offset);
    this.header(OUT_HEADER + len, 0);
    this.send(OUT_HEADER + len);
  }

  private write(nodeid: number, arg: number, n: number): void {
    if (nodeid !== FILE_ID && nodeid !== CTL_ID) return this.error(nodeid === SNAP_ID ? E.EROFS : E.EISDIR);
    if (this.readOnly && nodeid === FILE_ID) return this.error(E.EROFS);
    const offset = Number(this.inBuf.readBigUInt64LE(arg + WriteIn.offset));
    const size = this.inBuf.readUInt32LE(arg + WriteIn.size);
    const data = arg + WRITE_IN;
    if (data + size > n) return this.error(E.EINVAL);
    if (nodeid === CTL_ID) {
      this.cbw.command(this.inBuf.toString('utf8', data, data + size), this.inBuf.readBigUInt64LE(arg + WriteIn.fh));
    } else {
      if (offset + size > this.image.virtualSize) return this.error(E.EFBIG);
      this.cbw.beforeWrite(offset, size);
      this.image.writeSync(this.inBuf.subarray(data, data + size), offset);
    }
    const o = this.header(OUT_HEADER + WRITE_OUT, 0);
    o.writeUInt32LE(size, OUT_HEADER);
    o.writeUInt32LE(0, OUT_HEADER + 4);
    this.send(OUT_HEADER + WRITE_OUT);
  }

  private readdir(nodeid: number, arg: number): void {
    if (nodeid !== ROOT_ID) return this.error(E.ENOTDIR);
    const start = Number(this.inBuf.readBigUInt64LE(arg + ReadIn.offset));
    const size = this.inBuf.readUInt32LE(arg + ReadIn.size);
    const entries: Array<[number, number, string]> = [
      [ROOT_ID, DT_DIR, '.'],
      [ROOT_ID, DT_DIR, '..'],
      [FILE_ID, DT_REG, FILE_NAME],
      [CTL_ID, DT_REG, CTL_NAME],
      [SNAP_ID, DT_REG, SNAP_NAME],
    ];
    this.header(0, 0);
    let at = OUT_HEADER;
    for (let i = start; i < entries.length; i++) {
      const [ino, type, name] = entries[i];
      if (at - OUT_HEADER + direntSize(Buffer.byteLength(name)) > size) break;
      at += writeDirent(this.outBuf, at, ino, i + 1, type, name);
    }
    this.header(at, 0);
    this.send(at);
  }

  private statfs(): void {
    const o = this.header(OUT_HEADER + STATFS_OUT, 0);
    const at = OUT_HEADER;
    o.fill(0, at, at + STATFS_OUT);
    o.writeBigUInt64LE(BigInt(Math.ceil(this.image.virtualSize / 4096)), at); // blocks
    o.writeBigUInt64LE(1n, at + 24); // files
    o.writeUInt32LE(4096, at + 40); // bsize
    o.writeUInt32LE(255, at + 44); // namelen
    o.writeUInt32LE(4096, at + 48); // frsize
    this.send(OUT_HEADER + STATFS_OUT);
  }

  private fallocate(nodeid: number, arg: number): void {
    if (nodeid !== FILE_ID) return this.error(E.EISDIR);
    if (this.readOnly) return this.error(E.EROFS);
    const b = this.inBuf;
    const offset = Number(b.readBigUInt64LE(arg + FallocateIn.offset));
    const length = Number(b.readBigUInt64LE(arg + FallocateIn.length));
    const mode = b.readUInt32LE(arg + FallocateIn.mode);
    const end = Math.min(offset + length, this.image.virtualSize);
    if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
      if (end > offset) this.cbw.beforeWrite(offset, end - offset);
      if (end > offset) this.image.writeZeroesSync(offset, end - offset);
      return this.ok();
    }
    if (mode & ~FALLOC_FL_KEEP_SIZE) return this.error(E.EOPNOTSUPP);
    // plain preallocation: fine inside the image, impossible past its end
    return offset + length > this.image.virtualSize && !(mode & FALLOC_FL_KEEP_SIZE) ? this.error(E.EFBIG) : this.ok();
  }

  get wasDestroyed(): boolean {
    return this.destroyed;
  }
}

// ---------------------------------------------------------------------------------------------
// The background process: `node dist/src/host/fuse-server.js --image P --mountpoint M
// [--read-only] [--cache direct|page] [--ready-fd 3]`. Started by attach (src/host/attach.ts),
// which reads one JSON line from the ready descriptor: {"ok":true,"file":...,"pid":...} once
// the kernel has completed INIT, or {"ok":false,"error":{message,code,errno,path}}.

function stamp(message: string): void {
  process.stdout.write(`${new Date().toISOString()} [${process.pid}] ${message}\n`);
}

function report(readyFd: number | undefined, value: unknown): void {
  if (readyFd === undefined) return;
  try {
    fs.writeSync(readyFd, JSON.stringify(value) + '\n');
    fs.closeSync(readyFd);
  } catch {
    // the attaching process went away; the log has the same information
  }
}

export function main(argv: string[]): number {
  const { values } = parseArgs({
    args: argv,
    options: {
      image: { type: 'string' },
      mountpoint: { type: 'string' },
      'read-only': { type: 'boolean', default: false },
      cache: { type: 'string', default: 'direct' },
      'max-io': { type: 'string' },
      'ready-fd': { type: 'string' },
    },
  });
  const readyFd = values['ready-fd'] !== undefined ? Number(values['ready-fd']) : undefined;
  const imagePath = values.image;
  const mountpoint = values.mountpoint;
  let server: FuseServer | undefined;
  try {
    if (!imagePath || !mountpoint) throw new DisksnapError('fuse-server: --image and --mountpoint are required', 'EINVALID');
    const cache = values.cache === 'page' ? 'page' : 'direct';
    const readOnly = !!values['read-only'];
    stamp(`opening ${imagePath} (${readOnly ? 'read-only' : 'read-write'})`);
    const image = openImage(imagePath, { write: !readOnly });
    // a raw image keeps the shared lock a plain loop attachment keeps (attach.ts): snapshots read it
    if (image instanceof RawImage && image.writable) image.file.setLock('shared');
    server = new FuseServer({
      image,
      mountpoint,
      readOnly,
      cache,
      maxIo: values['max-io'] ? Number(values['max-io']) : undefined,
      log: stamp,
      onReady: (file) => report(readyFd, { ok: true, file, pid: process.pid, virtualSize: image.virtualSize, format: image.format }),
    });
    try {
      server.mount();
    } catch (e) {
      image.close();
      throw e;
    }
    stamp(`mounted on ${mountpoint}: ${image.format}, ${image.virtualSize} bytes`);
  } catch (e) {
    const err = e as DisksnapError;
    stamp(`failed to start: ${err.message}`);
    report(readyFd, { ok: false, error: { message: err.message, code: err.code ?? 'EIO', errno: err.errno, path: err.path } });
    return 1;
  }
  try {
    server.serve();
  } catch (e) {
    stamp(`fatal: ${(e as Error).stack ?? String(e)}`);
    try {
      server.close();
    } catch (e2) {
      stamp(`closing after the failure: ${(e2 as Error).message}`); // the exit status is 1 either way
    }
    return 1;
  }
  server.close();
  stamp('image flushed and closed; exiting');
  try {
    fs.rmdirSync(mountpoint);
  } catch {
    // still busy (a lazy unmount) or gone: detach removes an empty one, and it holds nothing
  }
  return 0;
}

if (require.main === module) process.exitCode = main(process.argv.slice(2));
