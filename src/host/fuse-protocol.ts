/**
 * The part of the Linux FUSE kernel protocol (include/uapi/linux/fuse.h, version 7.x) that the
 * flat-view server speaks: one directory (node 1) holding one regular file (node 2).
 *
 * Every request read from /dev/fuse starts with fuse_in_header; every reply written back
 * starts with fuse_out_header and goes out in ONE write(2)/writev(2). All fields are in host
 * byte order (little-endian on every machine we build for). Offsets below are byte offsets
 * in the structs, so that the encoders read like the header file.
 */
import { constants as osConstants } from 'node:os';

export const FUSE_KERNEL_VERSION = 7;
/** The minor we implement against; the kernel speaks down to ours if it is newer. */
export const FUSE_KERNEL_MINOR_VERSION = 31;

export const ROOT_ID = 1;
export const FILE_ID = 2;
/** the copy-before-write control node and the frozen-moment view (cbw.ts) */
export const CTL_ID = 3;
export const SNAP_ID = 4;

/** Opcodes (enum fuse_opcode). */
export const Op = {
  LOOKUP: 1,
  FORGET: 2, // no reply
  GETATTR: 3,
  SETATTR: 4,
  READLINK: 5,
  SYMLINK: 6,
  MKNOD: 8,
  MKDIR: 9,
  UNLINK: 10,
  RMDIR: 11,
  RENAME: 12,
  LINK: 13,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  SETXATTR: 21,
  GETXATTR: 22,
  LISTXATTR: 23,
  REMOVEXATTR: 24,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  ACCESS: 34,
  CREATE: 35,
  INTERRUPT: 36, // no reply
  DESTROY: 38,
  BATCH_FORGET: 42, // no reply
  FALLOCATE: 43,
  READDIRPLUS: 44,
  LSEEK: 46,
} as const;

/** INIT flags (fuse_init_in/out.flags) we ask for, each only if the kernel offers it. */
export const InitFlag = {
  /** the kernel may send several READs at once (readahead) */
  ASYNC_READ: 1 << 0,
  /** WRITE requests larger than one page */
  BIG_WRITES: 1 << 5,
  /** the kernel may issue parallel direct I/O (async DIO) */
  ASYNC_DIO: 1 << 15,
  /** page-cache writeback: the kernel batches writes (off by default; see fuse-server.ts) */
  WRITEBACK_CACHE: 1 << 16,
  /** max_pages in the reply is honoured: requests up to max_pages * 4 KiB */
  MAX_PAGES: 1 << 22,
} as const;

/** fuse_open_out.open_flags */
export const FOPEN_DIRECT_IO = 1 << 0;
export const FOPEN_KEEP_CACHE = 1 << 1;

/** fuse_setattr_in.valid */
export const FATTR_MODE = 1 << 0;
export const FATTR_UID = 1 << 1;
export const FATTR_GID = 1 << 2;
export const FATTR_SIZE = 1 << 3;

/** fallocate(2) modes carried by FALLOCATE */
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;

export const S_IFDIR = 0o040000;
export const S_IFREG = 0o100000;
export const DT_DIR = 4;
export const DT_REG = 8;

/**
 * errno values we reply with (negated in fuse_out_header.error): the host's own, since the
 * FUSE protocol passes them through to the kernel unchanged.
 */
export const E = osConstants.errno;

/** struct fuse_in_header: 40 bytes. */
export const IN_HEADER = 40;
export const InHeader = { len: 0, opcode: 4, unique: 8, nodeid: 16, uid: 24, gid: 28, pid: 32, totalExtlen: 36 } as const;

/** struct fuse_out_header: 16 bytes. */
export const OUT_HEADER = 16;
export const OutHeader = { len: 0, error: 4, unique: 8 } as const;

/** struct fuse_init_in: major 0, minor 4, max_readahead 8, flags 12 (flags2 16 from 7.36). */
export const InitIn = { major: 0, minor: 4, maxReadahead: 8, flags: 12 } as const;

/**
 * struct fuse_init_out: 64 bytes. major 0, minor 4, max_readahead 8, flags 12,
 * max_background 16 (u16), congestion_threshold 18 (u16), max_write 20, time_gran 24,
 * max_pages 28 (u16), map_alignment 30 (u16), flags2 32, unused to 64.
 */
export const INIT_OUT = 64;
export const InitOut = {
  major: 0,
  minor: 4,
  maxReadahead: 8,
  flags: 12,
  maxBackground: 16,
  congestionThreshold: 18,
  maxWrite: 20,
  timeGran: 24,
  maxPages: 28,
} as const;

/**
 * struct fuse_attr: 88 bytes. ino 0, size 8, blocks 16, atime 24, mtime 32, ctime 40,
 * atimensec 48, mtimensec 52, ctimensec 56, mode 60, nlink 64, uid 68, gid 72, rdev 76,
 * blksize 80, flags 84.
 */
export const ATTR = 88;

/** struct fuse_entry_out: nodeid 0, generation 8, entry_valid 16, attr_valid 24, entry_valid_nsec 32, attr_valid_nsec 36, attr 40. */
export const ENTRY_OUT = 40 + ATTR;
/** struct fuse_attr_out: attr_valid 0, attr_valid_nsec 8, dummy 12, attr 16. */
export const ATTR_OUT = 16 + ATTR;
/** struct fuse_open_out: fh 0, open_flags 8, backing_id 12. */
export const OPEN_OUT = 16;
/** struct fuse_release_in: fh 0, flags 8, release_flags 12, lock_owner 16. */
export const ReleaseIn = { fh: 0 } as const;
/** struct fuse_read_in (also READDIR): fh 0, offset 8, size 16, read_flags 20, lock_owner 24, flags 32. */
export const ReadIn = { fh: 0, offset: 8, size: 16 } as const;
/** struct fuse_write_in: fh 0, offset 8, size 16, write_flags 20, lock_owner 24, flags 32; 40 bytes, data follows. */
export const WRITE_IN = 40;
export const WriteIn = { fh: 0, offset: 8, size: 16 } as const;
/** struct fuse_write_out: size 0, padding 4. */
export const WRITE_OUT = 8;
/** struct fuse_statfs_out (struct fuse_kstatfs): blocks 0, bfree 8, bavail 16, files 24, ffree 32, bsize 40, namelen 44, frsize 48; 80 bytes. */
export const STATFS_OUT = 80;
/** struct fuse_setattr_in: valid 0, fh 8, size 16, ... ; we only read valid and size. */
export const SetattrIn = { valid: 0, size: 16 } as const;
/** struct fuse_fallocate_in: fh 0, offset 8, length 16, mode 24. */
export const FallocateIn = { offset: 8, length: 16, mode: 24 } as const;

/** Writes struct fuse_attr at `at`. Times are whole seconds. */
export function writeAttr(
  buf: Buffer,
  at: number,
  a: { ino: number; size: number; mode: number; nlink: number; uid: number; gid: number; timeSec: number; blksize: number },
): void {
  buf.fill(0, at, at + ATTR);
  buf.writeBigUInt64LE(BigInt(a.ino), at + 0);
  buf.writeBigUInt64LE(BigInt(a.size), at + 8);
  buf.writeBigUInt64LE(BigInt(Math.ceil(a.size / 512)), at + 16);
  buf.writeBigUInt64LE(BigInt(a.timeSec), at + 24);
  buf.writeBigUInt64LE(BigInt(a.timeSec), at + 32);
  buf.writeBigUInt64LE(BigInt(a.timeSec), at + 40);
  buf.writeUInt32LE(a.mode, at + 60);
  buf.writeUInt32LE(a.nlink, at + 64);
  buf.writeUInt32LE(a.uid, at + 68);
  buf.writeUInt32LE(a.gid, at + 72);
  buf.writeUInt32LE(a.blksize, at + 80);
}

/** Size of one struct fuse_dirent with a name of `nameLen` bytes (padded to 8). */
export function direntSize(nameLen: number): number {
  return (24 + nameLen + 7) & ~7;
}

/** Writes struct fuse_dirent { ino, off, namelen, type, name } at `at`; returns its size. */
export function writeDirent(buf: Buffer, at: number, ino: number, off: number, type: number, name: string): number {
  const n = Buffer.byteLength(name);
  const size = direntSize(n);
  buf.fill(0, at, at + size);
  buf.writeBigUInt64LE(BigInt(ino), at);
  buf.writeBigUInt64LE(BigInt(off), at + 8);
  buf.writeUInt32LE(n, at + 16);
  buf.writeUInt32LE(type, at + 20);
  buf.write(name, at + 24);
  return size;
}
