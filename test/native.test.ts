/**
 * The native block engine (build/Release/disksnap.node) through its typed contract in
 * src/engine/native.ts: I/O round trips at awkward offsets, batched I/O, sparse-file extents,
 * fallocate modes, OFD locks between processes (and against QEMU), block hashing against
 * node:crypto, copy/clone, and every error path (code, errno, path, class).
 */
import t, { Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { spawn, spawnSync, ChildProcess } from 'node:child_process';
import {
  native,
  OPEN_READ,
  OPEN_WRITE,
  OPEN_CREATE,
  OPEN_EXCL,
  OPEN_TRUNC,
  LOCK_NONE,
  LOCK_SHARED,
  LOCK_EXCLUSIVE,
  FALLOC_ALLOCATE,
  FALLOC_PUNCH_HOLE,
  FALLOC_ZERO_RANGE,
} from '../src/engine/native';
import { DisksnapError } from '../src/engine/errors';
import { DirectoryBackend } from '../src/storage/store/dir';
import { missing } from './helpers/tools';
import { withHashImpl } from './helpers/hash-impl';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

const KiB = 1024;
const MiB = 1024 * KiB;
const ADDON = path.resolve(__dirname, '..', 'build', 'Release', 'disksnap.node');
const THP = '/sys/kernel/mm/transparent_hugepage/enabled';
const n = native();

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed * 7 + (i >> 8) + 1) & 0xff;
  return b;
}

/** The test's own temporary directory (t.testdir() empties it on every call, so call it once). */
const dirs = new WeakMap<object, string>();
function dirOf(t: Tap): string {
  let d = dirs.get(t);
  if (!d) {
    d = t.testdir();
    dirs.set(t, d);
  }
  return d;
}

/** A new file of `size` bytes (sparse), opened read-write; closed when the test ends. */
function tempFile(t: Tap, name = 'f.img', size = 0): { file: string; fd: number } {
  const file = path.join(dirOf(t), name);
  const fd = n.open(file, OPEN_WRITE | OPEN_CREATE | OPEN_EXCL, 0o644);
  if (size) n.ftruncate(fd, size);
  t.teardown(() => {
    try {
      n.close(fd);
    } catch {
      /* closed by the test */
    }
  });
  return { file, fd };
}
type Tap = Test;

/** Asserts that `fn` throws (or rejects with) a DisksnapError with these fields. */
async function rejectsWith(
  t: Tap,
  fn: () => unknown,
  want: { code: string; errno?: number; path?: string; message?: RegExp },
  what: string,
): Promise<DisksnapError | undefined> {
  let err: unknown;
  try {
    await fn();
  } catch (e) {
    err = e;
  }
  if (!(err instanceof DisksnapError)) {
    t.fail(`${what}: expected a DisksnapError, got ${String(err)}`);
    return undefined;
  }
  t.equal(err.code, want.code, `${what}: code`);
  if ('errno' in want) t.equal(err.errno, want.errno, `${what}: errno`);
  if ('path' in want) t.equal(err.path, want.path, `${what}: path`);
  if (want.message) t.match(err.message, want.message, `${what}: message`);
  return err;
}

const ENOENT = 2;
const EBADF = 9;
const EEXIST = 17;
const EINVAL = 22;

t.test('the addon loads through src/engine/native.ts with a version', async (t) => {
  t.equal(typeof n.version, 'string');
  t.match(n.version, /^\d+\.\d+\.\d+/);
});

t.test('open errors carry code, errno and path as DisksnapError', async (t) => {
  const dir = dirOf(t);
  const file = path.join(dir, 'nope', 'x.img');
  const err = await rejectsWith(t, () => n.open(file, OPEN_READ, 0), { code: 'ENOENT', errno: ENOENT, path: file }, 'open missing');
  t.match(err?.message, /ENOENT.*open.*nope\/x\.img/);
  t.equal(err?.name, 'DisksnapError');

  const existing = path.join(dir, 'e.img');
  fs.writeFileSync(existing, 'x');
  await rejectsWith(t, () => n.open(existing, OPEN_WRITE | OPEN_CREATE | OPEN_EXCL, 0o644), { code: 'EEXIST', errno: EEXIST, path: existing }, 'open excl');

  const fd = n.open(existing, OPEN_WRITE | OPEN_TRUNC, 0);
  t.equal(n.fstat(fd).size, 0, 'OPEN_TRUNC truncates');
  n.close(fd);
  await rejectsWith(t, () => n.open(existing, 1 << 10, 0), { code: 'EINVAL' }, 'unknown flag bits');
});

t.test('lstatDir gives what lstat gives for every entry, follows no link, and names what failed', async (t) => {
  const dir = dirOf(t);
  fs.writeFileSync(path.join(dir, 'file'), 'x');
  fs.chmodSync(path.join(dir, 'file'), 0o606);
  fs.mkdirSync(path.join(dir, 'sub'));
  fs.symlinkSync('file', path.join(dir, 'link'));
  fs.symlinkSync('nowhere', path.join(dir, 'dangling'));
  const r = n.lstatDir(dir);
  t.same([...r.names].sort(), ['dangling', 'file', 'link', 'sub'], 'every entry but . and ..');
  r.names.forEach((name, i) => {
    const st = fs.lstatSync(path.join(dir, name));
    t.same({ mode: r.modes[i], uid: r.uids[i] }, { mode: st.mode, uid: st.uid }, `${name}: mode and uid as lstat gives them`);
  });
  t.same(n.lstatDir(path.join(dir, 'sub')), { names: [], modes: [], uids: [] }, 'an empty directory');
  fs.symlinkSync('sub', path.join(dir, 'sublink'));
  await rejectsWith(t, () => n.lstatDir(path.join(dir, 'sublink')), { code: 'ENOTDIR', path: path.join(dir, 'sublink') }, 'a link to a directory is not followed (O_NOFOLLOW with O_DIRECTORY)');
  await rejectsWith(t, () => n.lstatDir(path.join(dir, 'gone')), { code: 'ENOENT', path: path.join(dir, 'gone') }, 'a missing directory');
  await rejectsWith(t, () => n.lstatDir(path.join(dir, 'file')), { code: 'ENOTDIR' }, 'a file');
});

t.test('timestampTickNs is the tick file times are stamped with: a write one tick or more after another gets a later mtime', async (t) => {
  const tick = n.timestampTickNs();
  t.ok([1e6, 1e9 / 300, 4e6, 1e7].some((ns) => Math.abs(tick - ns) < 1000), `${tick} ns: the tick of a 1000, 300, 250 or 100 Hz kernel`);
  const { file, fd } = tempFile(t);
  let later = 0;
  for (let i = 0; i < 20; i++) {
    n.pwrite(fd, Buffer.from([i]), 0);
    const a = fs.statSync(file, { bigint: true }).mtimeNs;
    await new Promise((r) => setTimeout(r, Math.ceil((2 * tick) / 1e6)));
    n.pwrite(fd, Buffer.from([i + 1]), 0);
    if (fs.statSync(file, { bigint: true }).mtimeNs > a) later++;
  }
  t.equal(later, 20, 'two ticks apart: every second write moved the mtime');
});

t.test('O_CLOEXEC is always set (a child process does not inherit the descriptor)', async (t) => {
  const { fd } = tempFile(t);
  const r = spawnSync('sh', ['-c', `test -e /proc/self/fd/${fd} && echo inherited || echo closed`], { encoding: 'utf8' });
  t.equal(r.stdout.trim(), 'closed');
});

t.test('pread/pwrite round trip 2 KiB at 63 KiB, short only at EOF', async (t) => {
  const { file, fd } = tempFile(t);
  const data = pattern(2 * KiB, 1);
  n.pwrite(fd, data, 63 * KiB);
  t.equal(n.fstat(fd).size, 65 * KiB);
  const back = Buffer.alloc(2 * KiB);
  t.equal(n.pread(fd, back, 63 * KiB), 2 * KiB);
  t.same(back, data);
  const onDisk = fs.readFileSync(file);
  t.same(onDisk.subarray(63 * KiB), data, 'node:fs sees the same bytes');
  t.ok(onDisk.subarray(0, 63 * KiB).every((b) => b === 0), 'bytes before it are zero');

  // A read crossing EOF is short and fills only what it read.
  const big = Buffer.alloc(4 * KiB, 0xee);
  t.equal(n.pread(fd, big, 64 * KiB), KiB);
  t.same(big.subarray(0, KiB), data.subarray(KiB));
  t.ok(big.subarray(KiB).every((b) => b === 0xee), 'the rest of the buffer is untouched');
  t.equal(n.pread(fd, big, 1 * MiB), 0, 'a read past EOF reads nothing');

  // Views use their own offset and length.
  const backing = Buffer.alloc(100, 0x11);
  const view = new Uint8Array(backing.buffer, backing.byteOffset + 10, 20);
  n.pwrite(fd, pattern(20, 9), 0);
  t.equal(n.pread(fd, view, 0), 20);
  t.same(backing.subarray(10, 30), pattern(20, 9));
  t.equal(backing[9], 0x11);
  t.equal(backing[30], 0x11);
});

t.test('async pread/pwrite round trip and reject with the caller stack', async (t) => {
  const { fd } = tempFile(t);
  const data = pattern(3 * KiB + 7, 2);
  await n.pwriteAsync(fd, data, 63 * KiB + 1);
  const back = Buffer.alloc(data.length);
  t.equal(await n.preadAsync(fd, back, 63 * KiB + 1), data.length);
  t.same(back, data);
  t.equal(await n.preadAsync(fd, Buffer.alloc(10), 10 * MiB), 0);

  const closed = n.open(path.join(dirOf(t), 'c'), OPEN_WRITE | OPEN_CREATE, 0o644);
  n.close(closed);
  const err = await rejectsWith(t, () => n.preadAsync(closed, Buffer.alloc(1), 0), { code: 'EBADF', errno: EBADF }, 'preadAsync closed');
  t.match(err?.stack, /^DisksnapError: EBADF/);
  t.match(err?.stack, /native\.test\.ts/, 'the rejection carries the stack of the call');
  await rejectsWith(t, () => n.pwriteAsync(closed, Buffer.alloc(1), 0), { code: 'EBADF', errno: EBADF }, 'pwriteAsync closed');
  // Argument errors reject too (a Promise-returning call never throws synchronously).
  const p = n.preadAsync(-1, Buffer.alloc(1), 0);
  t.type(p, Promise);
  await rejectsWith(t, () => p, { code: 'EINVAL' }, 'preadAsync bad fd');
});

t.test('EBADF after close, for every kind of call', async (t) => {
  const file = path.join(dirOf(t), 'x');
  const fd = n.open(file, OPEN_WRITE | OPEN_CREATE, 0o644);
  n.close(fd);
  await rejectsWith(t, () => n.pread(fd, Buffer.alloc(4), 0), { code: 'EBADF', errno: EBADF }, 'pread');
  await rejectsWith(t, () => n.pwrite(fd, Buffer.alloc(4), 0), { code: 'EBADF' }, 'pwrite');
  await rejectsWith(t, () => n.fstat(fd), { code: 'EBADF' }, 'fstat');
  await rejectsWith(t, () => n.fsync(fd, true), { code: 'EBADF' }, 'fsync');
  await rejectsWith(t, () => n.fsyncAsync(fd, false), { code: 'EBADF' }, 'fsyncAsync');
  await rejectsWith(t, () => n.ftruncate(fd, 10), { code: 'EBADF' }, 'ftruncate');
  await rejectsWith(t, () => n.extents(fd, 0, 10), { code: 'EBADF' }, 'extents');
  await rejectsWith(t, () => n.fallocate(fd, FALLOC_ALLOCATE, 0, 10), { code: 'EBADF' }, 'fallocate');
  await rejectsWith(t, () => n.close(fd), { code: 'EBADF' }, 'close twice');
  await rejectsWith(t, () => n.lock(fd, LOCK_SHARED, file), { code: 'EBADF', path: file }, 'lock');
  await rejectsWith(t, () => n.hashFile(fd, 0, 10, 4, 1, undefined, undefined), { code: 'EBADF' }, 'hashFile');
  await rejectsWith(t, () => n.preadBatch(fd, Buffer.alloc(4), new Float64Array([0, 0, 4])), { code: 'EBADF' }, 'preadBatch');
});

/** Requests for `count` pieces of `len` bytes, file offsets spread with gaps, packed in the buffer. */
function scattered(count: number, len: number, stride: number, base: number): Float64Array {
  const r = new Float64Array(count * 3);
  for (let i = 0; i < count; i++) {
    r[3 * i] = base + i * stride;
    r[3 * i + 1] = i * len;
    r[3 * i + 2] = len;
  }
  return r;
}

t.test('batched write then batched read of a known pattern, sync and async', async (t) => {
  const { file, fd } = tempFile(t);
  const count = 64;
  const len = 3000; // not a multiple of anything
  const reqs = scattered(count, len, 5000, 777);
  const data = pattern(count * len, 3);
  n.pwriteBatch(fd, data, reqs);
  const onDisk = fs.readFileSync(file);
  for (let i = 0; i < count; i++) {
    const at = 777 + i * 5000;
    t.same(onDisk.subarray(at, at + len), data.subarray(i * len, (i + 1) * len), `piece ${i} on disk`) || i;
    if (i + 1 < count) t.ok(onDisk.subarray(at + len, at + 5000).every((b) => b === 0), `gap ${i} untouched`);
  }
  const back = Buffer.alloc(data.length);
  t.equal(n.preadBatch(fd, back, reqs), data.length);
  t.same(back, data);

  const data2 = pattern(count * len, 4);
  await n.pwriteBatchAsync(fd, data2, reqs);
  const back2 = Buffer.alloc(data.length);
  t.equal(await n.preadBatchAsync(fd, back2, reqs), data.length);
  t.same(back2, data2);

  // Requests in any order, overlapping buffer targets are allowed and executed in order.
  const rev = new Float64Array([777 + 5000, 0, 10, 777, 0, 10]);
  const small = Buffer.alloc(10);
  t.equal(n.preadBatch(fd, small, rev), 20);
  t.same(small, data2.subarray(0, 10), 'the later request wins');
  t.equal(n.preadBatch(fd, Buffer.alloc(0), new Float64Array(0)), 0, 'an empty batch');
});

t.test('adjacent requests (merged into one preadv/pwritev) keep buffer order and EOF semantics', async (t) => {
  const { file, fd } = tempFile(t);
  // 2000 file-contiguous requests of 3 bytes (more than IOV_MAX = 1024 in one run), whose
  // buffer slots are in reverse order, then a gap, then one more run.
  const count = 2000;
  const len = 3;
  const reqs = new Float64Array((count + 2) * 3);
  for (let i = 0; i < count; i++) reqs.set([100 + i * len, (count - 1 - i) * len, len], 3 * i);
  reqs.set([50000, count * len, 5, 50005, count * len + 5, 7], 3 * count);
  const data = pattern(count * len + 12, 11);
  n.pwriteBatch(fd, data, reqs);
  const onDisk = fs.readFileSync(file);
  t.equal(onDisk.length, 50012);
  let ok = true;
  for (let i = 0; i < count && ok; i++) {
    ok = onDisk.subarray(100 + i * len, 100 + (i + 1) * len).equals(data.subarray((count - 1 - i) * len, (count - i) * len));
  }
  t.ok(ok, 'every request landed at its file offset from its own buffer slot');
  t.ok(onDisk.subarray(50000).equals(data.subarray(count * len)), 'the second run');
  const back = Buffer.alloc(data.length);
  t.equal(n.preadBatch(fd, back, reqs), data.length);
  t.ok(back.equals(data), 'read back through the merged path');

  // A merged run that crosses EOF: [49990, 20) + [50010, 10) with EOF at 50012.
  const cross = new Float64Array([49990, 0, 20, 50010, 20, 10]);
  const buf = Buffer.alloc(30, 0xaa);
  t.equal(n.preadBatch(fd, buf, cross), 22);
  t.ok(buf.subarray(0, 22).equals(onDisk.subarray(49990, 50012)));
  t.ok(buf.subarray(22).every((b) => b === 0), 'zero-filled past EOF');
  buf.fill(0xaa);
  t.equal(await n.preadBatchAsync(fd, buf, cross), 22);
  t.ok(buf.subarray(22).every((b) => b === 0), 'async: zero-filled past EOF');
});

t.test('batched reads past EOF are zero-filled and count only bytes read', async (t) => {
  const { fd } = tempFile(t);
  const data = pattern(10 * KiB, 5);
  n.pwrite(fd, data, 0);
  const buf = Buffer.alloc(12 * KiB, 0xaa);
  // [8K, 4K) crosses EOF (2K real), [20K, 4K) is entirely past it, [0, 4K) is whole.
  const reqs = new Float64Array([8 * KiB, 0, 4 * KiB, 20 * KiB, 4 * KiB, 4 * KiB, 0, 8 * KiB, 4 * KiB]);
  t.equal(n.preadBatch(fd, buf, reqs), 2 * KiB + 4 * KiB);
  t.same(buf.subarray(0, 2 * KiB), data.subarray(8 * KiB));
  t.ok(buf.subarray(2 * KiB, 8 * KiB).every((b) => b === 0), 'past EOF reads as zero');
  t.same(buf.subarray(8 * KiB), data.subarray(0, 4 * KiB));
  buf.fill(0xaa);
  t.equal(await n.preadBatchAsync(fd, buf, reqs), 6 * KiB);
  t.ok(buf.subarray(2 * KiB, 8 * KiB).every((b) => b === 0), 'async: past EOF reads as zero');
});

t.test('an invalid batch triple is EINVAL, checked before any I/O', async (t) => {
  const { file, fd } = tempFile(t);
  const buf = Buffer.alloc(100);
  const bad: [string, Float64Array][] = [
    ['past the end of the buffer', new Float64Array([0, 0, 10, 0, 95, 6])],
    ['negative file offset', new Float64Array([-1, 0, 10])],
    ['fractional length', new Float64Array([0, 0, 1.5])],
    ['NaN', new Float64Array([NaN, 0, 1])],
    ['not a multiple of 3', new Float64Array([0, 0])],
    ['file offset beyond 2^53', new Float64Array([2 ** 53, 0, 1])],
  ];
  for (const [why, reqs] of bad) {
    await rejectsWith(t, () => n.pwriteBatch(fd, buf, reqs), { code: 'EINVAL', errno: EINVAL }, `pwriteBatch: ${why}`);
    await rejectsWith(t, () => n.preadBatch(fd, buf, reqs), { code: 'EINVAL' }, `preadBatch: ${why}`);
    await rejectsWith(t, () => n.pwriteBatchAsync(fd, buf, reqs), { code: 'EINVAL' }, `pwriteBatchAsync: ${why}`);
    await rejectsWith(t, () => n.preadBatchAsync(fd, buf, reqs), { code: 'EINVAL' }, `preadBatchAsync: ${why}`);
  }
  t.equal(fs.statSync(file).size, 0, 'the valid first triple was not written either');
  await rejectsWith(t, () => n.preadBatch(fd, buf, [0, 0, 1] as unknown as Float64Array), { code: 'EINVAL' }, 'a plain array');
});

t.test('fstat reports size, allocation, BigInt times and inode', async (t) => {
  const { file, fd } = tempFile(t, 'f.img', 5 * MiB + 3);
  n.pwrite(fd, pattern(8 * KiB, 6), 0);
  const st = n.fstat(fd);
  const ref = fs.statSync(file, { bigint: true });
  t.equal(st.size, 5 * MiB + 3);
  t.equal(st.allocated, Number(ref.blocks) * 512);
  t.ok(st.allocated >= 8 * KiB && st.allocated < MiB, `sparse: ${st.allocated}`);
  t.equal(typeof st.mtimeNs, 'bigint');
  t.equal(st.mtimeNs, ref.mtimeNs);
  t.equal(st.ctimeNs, ref.ctimeNs);
  t.equal(st.ino, ref.ino);
  t.equal(st.dev, Number(ref.dev));
  t.equal(st.mode, Number(ref.mode));
  t.equal(st.blockSize, Number(ref.blksize));
  t.equal(st.isRegular, true);
  t.equal(st.isBlockDevice, false);
  n.ftruncate(fd, 100);
  t.equal(n.fstat(fd).size, 100);
});

t.test('extents of a sparse file are exactly its data, rounded to the fs block size', async (t) => {
  const { fd } = tempFile(t, 'sparse.img', 64 * MiB);
  const bs = n.fstat(fd).blockSize;
  t.same(Array.from(n.extents(fd, 0, 64 * MiB)), [], 'a new sparse file has no data');
  n.pwrite(fd, pattern(1000, 7), 0);
  n.pwrite(fd, pattern(5000, 8), 10 * MiB);
  const roundUp = (x: number) => Math.ceil(x / bs) * bs;
  const ext = n.extents(fd, 0, 64 * MiB);
  t.type(ext, Float64Array);
  t.same(Array.from(ext), [0, roundUp(1000), 10 * MiB, roundUp(5000)]);
  // Clipped to the range asked for.
  t.same(Array.from(n.extents(fd, 10 * MiB + 100, 50)), [10 * MiB + 100, 50]);
  t.same(Array.from(n.extents(fd, 100, 20 * MiB)), [100, roundUp(1000) - 100, 10 * MiB, roundUp(5000)]);
  t.same(Array.from(n.extents(fd, MiB, MiB)), [], 'a range inside a hole');
  t.same(Array.from(n.extents(fd, 0, 0)), [], 'an empty range');
  // A range past EOF has no data, and data ends at EOF.
  n.ftruncate(fd, 10 * MiB + 2000);
  t.same(Array.from(n.extents(fd, 0, 100 * MiB)), [0, roundUp(1000), 10 * MiB, 2000]);
  t.same(Array.from(n.extents(fd, 50 * MiB, MiB)), []);
});

t.test('punch-hole reads back zero and releases space; zero-range zeroes; allocate reserves', async (t) => {
  const { fd } = tempFile(t);
  const data = Buffer.alloc(MiB, 0xff);
  n.pwrite(fd, data, 0);
  n.fsync(fd, false);
  const before = n.fstat(fd);
  n.fallocate(fd, FALLOC_PUNCH_HOLE, 256 * KiB, 256 * KiB);
  const after = n.fstat(fd);
  t.equal(after.size, MiB, 'KEEP_SIZE');
  t.ok(before.allocated - after.allocated >= 256 * KiB, `allocated ${before.allocated} -> ${after.allocated}`);
  const back = Buffer.alloc(MiB);
  n.pread(fd, back, 0);
  t.ok(back.subarray(256 * KiB, 512 * KiB).every((b) => b === 0), 'the hole reads zero');
  t.ok(back.subarray(0, 256 * KiB).every((b) => b === 0xff), 'before the hole intact');
  t.ok(back.subarray(512 * KiB).every((b) => b === 0xff), 'after the hole intact');
  t.same(Array.from(n.extents(fd, 0, MiB)), [0, 256 * KiB, 512 * KiB, 512 * KiB], 'the hole is a hole');

  n.fallocate(fd, FALLOC_ZERO_RANGE, 4 * KiB + 100, 8 * KiB);
  n.pread(fd, back, 0);
  t.ok(back.subarray(4 * KiB + 100, 12 * KiB + 100).every((b) => b === 0), 'zero-range reads zero');
  t.equal(back[4 * KiB + 99], 0xff);
  t.equal(back[12 * KiB + 100], 0xff);
  t.equal(n.fstat(fd).size, MiB);
  // Past EOF, zero-range grows the file like writing zeros would.
  n.fallocate(fd, FALLOC_ZERO_RANGE, MiB, 64 * KiB);
  t.equal(n.fstat(fd).size, MiB + 64 * KiB);

  const { fd: fd2 } = tempFile(t, 'alloc.img');
  n.fallocate(fd2, FALLOC_ALLOCATE, 0, 2 * MiB);
  const st = n.fstat(fd2);
  t.equal(st.size, 2 * MiB);
  t.ok(st.allocated >= 2 * MiB, `allocated ${st.allocated}`);
  const z = Buffer.alloc(2 * MiB, 1);
  n.pread(fd2, z, 0);
  t.ok(n.isZero(z), 'allocated space reads zero');
  await rejectsWith(t, () => n.fallocate(fd2, 7, 0, 1), { code: 'EINVAL' }, 'unknown mode');
});

t.test('fsync and fsyncAsync succeed on a written file', async (t) => {
  const { fd } = tempFile(t);
  n.pwrite(fd, pattern(100, 1), 0);
  n.fsync(fd, true);
  n.fsync(fd, false);
  await n.fsyncAsync(fd, true);
  await n.fsyncAsync(fd, false);
  t.pass();
});

// ---------------------------------------------------------------------------------------------
// Locks between processes

/** A child process that opens `file` and takes `mode` with the compiled addon. */
class LockHolder {
  private lines: string[] = [];
  private waiters: ((line: string) => void)[] = [];
  readonly child: ChildProcess;

  constructor(file: string, mode: number) {
    const script = `
      const a = require(${JSON.stringify(ADDON)});
      a.setErrorClass(class E extends Error { constructor(m, c, e, p) { super(m); this.code = c; this.errno = e; this.path = p; } });
      const file = ${JSON.stringify(file)};
      let fd = a.open(file, ${mode === LOCK_EXCLUSIVE ? OPEN_WRITE : OPEN_READ}, 0);
      try { a.lock(fd, ${mode}, file); console.log('locked'); } catch (e) { console.log(e.code); }
      require('readline').createInterface({ input: process.stdin }).on('line', (l) => {
        if (l === 'close') { a.close(fd); console.log('closed'); }
        if (l === 'unlock') { a.lock(fd, 0, file); console.log('unlocked'); }
      }).on('close', () => process.exit(0));`;
    this.child = spawn(process.execPath, ['-e', script], { stdio: ['pipe', 'pipe', 'inherit'] });
    let buf = '';
    this.child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        const w = this.waiters.shift();
        if (w) w(line);
        else this.lines.push(line);
      }
    });
  }

  next(): Promise<string> {
    const l = this.lines.shift();
    if (l !== undefined) return Promise.resolve(l);
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  async send(cmd: string): Promise<string> {
    this.child.stdin!.write(cmd + '\n');
    return this.next();
  }

  end(): Promise<void> {
    return new Promise((resolve) => {
      if (this.child.exitCode !== null) return resolve();
      this.child.once('exit', () => resolve());
      this.child.stdin!.end();
    });
  }
}

function lockFile(t: Tap): string {
  const file = path.join(dirOf(t), 'locked.img');
  fs.writeFileSync(file, Buffer.alloc(64 * KiB));
  return file;
}

t.test('shared locks coexist across processes; exclusive conflicts both ways with ELOCKED', async (t) => {
  const file = lockFile(t);
  const other = new LockHolder(file, LOCK_SHARED);
  t.teardown(() => other.end());
  t.equal(await other.next(), 'locked', 'child takes a shared lock');

  const rd = n.open(file, OPEN_READ, 0);
  const rw = n.open(file, OPEN_WRITE, 0);
  t.teardown(() => {
    n.close(rd);
    n.close(rw);
  });
  n.lock(rd, LOCK_SHARED, file);
  t.pass('a second shared lock is granted');
  const err = await rejectsWith(t, () => n.lock(rw, LOCK_EXCLUSIVE, file), { code: 'ELOCKED', path: file }, 'exclusive vs shared');
  t.match(err?.message, /locked\.img/);
  t.match(err?.message, /another process \(disksnap or QEMU\)/);
  t.ok(err instanceof DisksnapError && err instanceof Error);

  // Once both shared holders let go, the exclusive lock is granted.
  t.equal(await other.send('unlock'), 'unlocked');
  n.lock(rd, LOCK_NONE, file);
  n.lock(rw, LOCK_EXCLUSIVE, file);
  t.pass('exclusive granted once the shared locks are released');
  const third = new LockHolder(file, LOCK_SHARED);
  t.teardown(() => third.end());
  t.equal(await third.next(), 'ELOCKED', 'a shared lock is refused while exclusive is held');
  const fourth = new LockHolder(file, LOCK_EXCLUSIVE);
  t.teardown(() => fourth.end());
  t.equal(await fourth.next(), 'ELOCKED', 'an exclusive lock is refused while exclusive is held');

  // Downgrade: exclusive -> shared lets readers in.
  n.lock(rw, LOCK_SHARED, file);
  const fifth = new LockHolder(file, LOCK_SHARED);
  t.teardown(() => fifth.end());
  t.equal(await fifth.next(), 'locked', 'after a downgrade to shared, readers get in');
});

t.test('an exclusive lock is released when its descriptor is closed', async (t) => {
  const file = lockFile(t);
  const holder = new LockHolder(file, LOCK_EXCLUSIVE);
  t.teardown(() => holder.end());
  t.equal(await holder.next(), 'locked');
  const fd = n.open(file, OPEN_READ, 0);
  t.teardown(() => n.close(fd));
  await rejectsWith(t, () => n.lock(fd, LOCK_SHARED, file), { code: 'ELOCKED', path: file }, 'shared vs exclusive');
  t.equal(await holder.send('close'), 'closed');
  n.lock(fd, LOCK_SHARED, file);
  t.pass('shared granted after the holder closed its descriptor');
});

t.test('locks are per open file: two descriptors in one process conflict', async (t) => {
  const file = lockFile(t);
  const a = n.open(file, OPEN_WRITE, 0);
  const b = n.open(file, OPEN_WRITE, 0);
  t.teardown(() => {
    n.close(a);
    n.close(b);
  });
  n.lock(a, LOCK_EXCLUSIVE, file);
  await rejectsWith(t, () => n.lock(b, LOCK_EXCLUSIVE, file), { code: 'ELOCKED' }, 'second exclusive');
  n.lock(a, LOCK_EXCLUSIVE, file);
  t.pass('re-locking the same descriptor is fine');
  n.lock(a, LOCK_NONE, file);
  n.lock(b, LOCK_EXCLUSIVE, file);
  t.pass('LOCK_NONE releases');

  const ro = n.open(file, OPEN_READ, 0);
  t.teardown(() => n.close(ro));
  n.lock(b, LOCK_NONE, file);
  await rejectsWith(t, () => n.lock(ro, LOCK_EXCLUSIVE, file), { code: 'EBADF', path: file, message: /not open for writing/ }, 'exclusive on read-only');
  await rejectsWith(t, () => n.lock(ro, 3, file), { code: 'EINVAL' }, 'unknown mode');
});

t.test('locks interoperate with QEMU image locking', { skip: missing({ commands: ['qemu-io'] }) }, async (t) => {
  const file = lockFile(t);
  const qemu = (args: string[]) => spawnSync('qemu-io', ['-f', 'raw', ...args, file], { encoding: 'utf8' });

  const fd = n.open(file, OPEN_WRITE, 0);
  t.teardown(() => n.close(fd));
  n.lock(fd, LOCK_SHARED, file);
  let r = qemu(['-c', 'write 0 512']);
  t.not(r.status, 0, 'a QEMU writer is refused while we hold a shared lock');
  t.match(r.stderr, /lock/);
  r = qemu(['-r', '-c', 'read 0 512']);
  t.equal(r.status, 0, `a QEMU reader coexists with a shared lock: ${r.stderr}`);

  n.lock(fd, LOCK_EXCLUSIVE, file);
  r = qemu(['-r', '-c', 'read 0 512']);
  t.not(r.status, 0, 'a QEMU reader is refused while we hold an exclusive lock');
  n.lock(fd, LOCK_NONE, file);

  // QEMU holding the image open for writing: both our lock modes are refused.
  const q = spawn('qemu-io', ['-f', 'raw', '-c', 'sleep 3000', file], { stdio: 'ignore' });
  t.teardown(() => q.kill());
  const deadline = Date.now() + 2000;
  let got: string | undefined;
  while (Date.now() < deadline) {
    try {
      n.lock(fd, LOCK_SHARED, file);
      n.lock(fd, LOCK_NONE, file);
      await new Promise((res) => setTimeout(res, 20)); // QEMU not there yet
    } catch (e) {
      got = (e as DisksnapError).code;
      break;
    }
  }
  t.equal(got, 'ELOCKED', 'a shared lock is refused while QEMU writes');
  await rejectsWith(t, () => n.lock(fd, LOCK_EXCLUSIVE, file), { code: 'ELOCKED' }, 'exclusive vs QEMU writer');
});

// ---------------------------------------------------------------------------------------------
// Hashing

function refDigests(buf: Uint8Array, bs: number, key?: Uint8Array): Buffer {
  const out: Buffer[] = [];
  for (let off = 0; off < buf.length; off += bs) {
    const piece = buf.subarray(off, Math.min(buf.length, off + bs));
    out.push((key ? createHmac('sha256', key) : createHash('sha256')).update(piece).digest());
  }
  return Buffer.concat(out);
}

function refZero(buf: Uint8Array, bs: number): number[] {
  const out: number[] = [];
  for (let off = 0; off < buf.length; off += bs) out.push(buf.subarray(off, Math.min(buf.length, off + bs)).every((b) => b === 0) ? 1 : 0);
  return out;
}

/** 9 blocks of 64 KiB + a short last one, with zero blocks and near-zero blocks mixed in. */
function mixedBuffer(bs: number): Buffer {
  const buf = randomBytes(9 * bs + 1234);
  buf.fill(0, 1 * bs, 2 * bs); // all zero
  buf.fill(0, 3 * bs, 4 * bs - 1); // zero but the very last byte
  buf[4 * bs - 1] |= 1; // (random, it was 0 once in 256 runs: the block was zero and the flags below wrong)
  buf.fill(0, 5 * bs + 1, 6 * bs); // zero but the very first byte
  buf[5 * bs] |= 1;
  buf.fill(0, 6 * bs, 8 * bs); // two zero blocks in a row (reuses the cached digest)
  buf.fill(0, 9 * bs); // a short zero last block
  return buf;
}

t.test('hashBlocks equals node:crypto SHA-256 and HMAC, with zero detection', async (t) => {
  const bs = 64 * KiB;
  const buf = mixedBuffer(bs);
  const keys: (Uint8Array | undefined)[] = [undefined, randomBytes(32), randomBytes(100), new Uint8Array(0)];
  for (const key of keys) {
    const what = key ? `hmac(key ${key.length} bytes)` : 'sha256';
    const want = refDigests(buf, bs, key);
    for (const threads of [1, 2, 0, 7]) {
      const r = n.hashBlocks(buf, bs, threads, key);
      t.ok(Buffer.isBuffer(r.digests), 'digests is a Buffer');
      t.equal(r.digests.length, 10 * 32);
      t.ok(r.digests.equals(want), `${what}, ${threads} threads: digests`);
      t.same(Array.from(r.zero), [0, 1, 0, 0, 0, 0, 1, 1, 0, 1], `${what}, ${threads} threads: zero flags`);
    }
    const a = await n.hashBlocksAsync(buf, bs, 2, key);
    t.ok(a.digests.equals(want), `${what}: async digests`);
    t.same(Array.from(a.zero), refZero(buf, bs));
  }
  t.same(Array.from(refZero(buf, bs)), [0, 1, 0, 0, 0, 0, 1, 1, 0, 1], 'the reference agrees on the zero flags');

  // Block sizes that do not divide anything, tiny blocks, a single short block, nothing.
  const odd = randomBytes(10007);
  for (const b of [1, 15, 16, 17, 4096, 10006, 10007, 1 << 20]) {
    const r = n.hashBlocks(odd, b, 2);
    t.ok(r.digests.equals(refDigests(odd, b)), `block size ${b}`);
  }
  const empty = n.hashBlocks(Buffer.alloc(0), bs, 1);
  t.equal(empty.digests.length, 0);
  t.equal(empty.zero.length, 0);
  await rejectsWith(t, () => n.hashBlocks(odd, 0, 1), { code: 'EINVAL' }, 'block size 0');
  await rejectsWith(t, () => n.hashBlocksAsync(odd, 0, 1), { code: 'EINVAL' }, 'async block size 0');
});

t.test('hashBlocksAsync with reads: the same job reads the triples into buf, then hashes what it read', async (t) => {
  const bs = 64 * KiB;
  const data = randomBytes(5 * bs);
  const { file, fd } = tempFile(t, 'reads.img');
  fs.writeFileSync(file, data);
  // blocks 3, 0 and 4 of the file into slots 0, 1 and 2; slot 3 is read from 16 KiB before the
  // end of the file: its last 48 KiB read as zeros; slot 1 comes in two requests
  const reads = Float64Array.from([3 * bs, 0, bs, 0, bs, 1000, 1000, bs + 1000, bs - 1000, 4 * bs, 2 * bs, bs, 5 * bs - 16 * KiB, 3 * bs, bs]);
  const buf = Buffer.alloc(4 * bs, 0xee);
  const want = Buffer.concat([data.subarray(3 * bs, 4 * bs), data.subarray(0, bs), data.subarray(4 * bs), data.subarray(5 * bs - 16 * KiB), Buffer.alloc(48 * KiB)]);
  const tagKey = randomBytes(32);
  const r = await n.hashBlocksAsync(buf, bs, 2, undefined, tagKey, undefined, fd, reads);
  t.ok(buf.equals(want), 'buf holds what the triples name, zeros past the end of the file');
  t.ok(r.digests.equals(refDigests(want, bs)), 'digests are those of the bytes read');
  const plain = await n.hashBlocksAsync(want, bs, 1, undefined, tagKey);
  t.ok(r.tags!.equals(plain.tags!), 'tags too');
  // no triples: a hash of buf as it is
  const none = await n.hashBlocksAsync(want, bs, 1, undefined, undefined, undefined, fd, new Float64Array(0));
  t.ok(none.digests.equals(refDigests(want, bs)), 'no reads: buf hashed as it is');
  await rejectsWith(t, () => n.hashBlocksAsync(Buffer.alloc(bs), bs, 1, undefined, undefined, undefined, fd, Float64Array.from([0, 1, bs])), { code: 'EINVAL' }, 'a triple past the end of buf');
  const closed = n.open(file, OPEN_READ, 0);
  n.close(closed);
  await rejectsWith(t, () => n.hashBlocksAsync(Buffer.alloc(bs), bs, 1, undefined, undefined, undefined, closed, Float64Array.from([0, 0, bs])), { code: 'EBADF', errno: EBADF }, 'a closed descriptor');
});

t.test('hashBlocksAsync with reads over several of its threads\' ranges: each range reads its share of the triples (cut at the edges), as one read first would', async (t) => {
  // 4 KiB blocks: a hashing thread takes 1 MiB (256 blocks) at a time, so these triples cross
  // the ranges' edges and come in any order; 4 KiB of the buffer are named by none and keep
  // what they held; the last triple runs past the end of the file (zeros)
  const bs = 4 * KiB;
  const fileLen = 3 * MiB + 5000;
  const data = randomBytes(fileLen);
  data.fill(0, 2 * MiB, 2 * MiB + 8 * bs); // zero blocks in the file too
  const { file, fd } = tempFile(t, 'ranges.img');
  fs.writeFileSync(file, data);
  const len = 3 * MiB + 3 * bs + 100; // a short last block
  const triples = [
    [2 * MiB - 3 * bs, 1 * MiB - 5 * bs, 10 * bs], // crosses the 1 MiB edge of the buffer
    [0, 0, 1 * MiB - 5 * bs],
    [fileLen - 1000, 3 * MiB, 3 * bs + 100], // past the file's end
    [1 * MiB + 77, 1 * MiB + 5 * bs, 2 * MiB - 6 * bs], // unaligned in the file; leaves 4 KiB before 3 MiB unread
  ];
  const reads = Float64Array.from(triples.flat());
  const before = randomBytes(len);
  const want = Buffer.from(before);
  for (const [fo, bo, l] of triples) {
    const part = Buffer.alloc(l);
    data.copy(part, 0, fo, Math.min(fileLen, fo + l));
    part.copy(want, bo);
  }
  const tagKey = randomBytes(32);
  const key = randomBytes(32);
  for (const threads of [1, 2, 3]) {
    const buf = Buffer.from(before);
    const r = await n.hashBlocksAsync(buf, bs, threads, key, tagKey, 1024, fd, reads);
    t.ok(buf.equals(want), `${threads} threads: buf holds what the triples name, the rest as it was, zeros past the end of the file`);
    const ref = await n.hashBlocksAsync(want, bs, 1, key, tagKey, 1024);
    t.ok(r.digests.equals(ref.digests), `${threads} threads: digests of the bytes read`);
    t.same(Array.from(r.zero), Array.from(ref.zero), `${threads} threads: zero flags`);
    t.ok(r.tags!.equals(ref.tags!) && r.granules!.tags.equals(ref.granules!.tags), `${threads} threads: block and granule tags`);
  }
  t.ok(refZero(want, bs).some((z) => z === 1), 'the buffer has zero blocks (from the file)');
  // two triples that overlap in the buffer: read in their order, as before (the second wins)
  const over = Float64Array.from([0, 0, 2 * bs, 8 * bs, bs, 2 * bs]);
  const buf = Buffer.alloc(4 * bs, 0xee);
  const r = await n.hashBlocksAsync(buf, bs, 2, undefined, undefined, undefined, fd, over);
  const wantOver = Buffer.concat([data.subarray(0, bs), data.subarray(8 * bs, 10 * bs), Buffer.alloc(bs, 0xee)]);
  t.ok(buf.equals(wantOver), 'overlapping triples: the later one\'s bytes stay');
  t.ok(r.digests.equals(refDigests(wantOver, bs)), 'and the hash is of them');
  // a read that fails in one range fails the call with the read's error (not a hash failure)
  const closed = n.open(file, OPEN_READ, 0);
  n.close(closed);
  await rejectsWith(t, () => n.hashBlocksAsync(Buffer.from(before), bs, 2, key, tagKey, undefined, closed, reads), { code: 'EBADF', errno: EBADF }, 'a closed descriptor, ranges read by the threads');
});

t.test('isZero finds a single non-zero byte anywhere', async (t) => {
  for (const len of [0, 1, 15, 16, 17, 31, 32, 4096, 512 * KiB + 3]) {
    const b = Buffer.alloc(len);
    t.equal(n.isZero(b), true, `${len} zero bytes`);
    for (const at of new Set([0, len >> 1, len - 1, 15, 16].filter((i) => i >= 0 && i < len))) {
      b[at] = 0x80;
      t.equal(n.isZero(b), false, `${len} bytes, non-zero at ${at}`);
      b[at] = 0;
    }
  }
  const backing = Buffer.alloc(64, 1);
  t.equal(n.isZero(new Uint8Array(backing.buffer, backing.byteOffset + 8, 0)), true, 'an empty view');
  backing.fill(0, 8, 40);
  t.equal(n.isZero(backing.subarray(8, 40)), true, 'a zero view inside non-zero bytes');
});

t.test('hashFile equals hashBlocks of the same bytes and reports progress', async (t) => {
  const bs = 512 * KiB;
  const { file, fd } = tempFile(t, 'h.img', 24 * MiB + 5000); // holes, data, a short last block
  n.pwrite(fd, randomBytes(3 * MiB), MiB + 100);
  n.pwrite(fd, randomBytes(10), 20 * MiB - 1); // one byte in one block, one in the next
  n.pwrite(fd, randomBytes(777), 24 * MiB + 1);
  const bytes = fs.readFileSync(file);
  for (const key of [undefined, randomBytes(32)]) {
    const calls: [number, number][] = [];
    const r = await n.hashFile(fd, 0, bytes.length, bs, 2, key, (done, total) => calls.push([done, total]));
    const want = n.hashBlocks(bytes, bs, 1, key);
    t.ok(r.digests.equals(want.digests), `${key ? 'hmac' : 'sha256'}: digests equal hashBlocks`);
    t.ok(r.digests.equals(refDigests(bytes, bs, key)), 'and node:crypto');
    t.same(Array.from(r.zero), Array.from(want.zero), 'zero flags equal');
    t.ok(calls.length >= 1, `progress called (${calls.length} times)`);
    t.ok(calls.length <= 1 + 100, 'progress is throttled, not per block');
    t.same(calls[calls.length - 1], [bytes.length, bytes.length], 'the last progress says done');
    t.ok(calls.every(([d, tot], i) => tot === bytes.length && (i === 0 || d >= calls[i - 1][0])), 'progress is monotonic');
  }
  const zeroFlags = Array.from(n.hashBlocks(bytes, bs, 1).zero);
  t.same([zeroFlags[0], zeroFlags[2], zeroFlags[8], zeroFlags[10]], [1, 0, 0, 1], 'blocks in holes are zero, blocks with data are not');

  // A sub-range at an unaligned offset, no progress callback, one thread.
  const sub = await n.hashFile(fd, MiB + 12345, 5 * MiB, 64 * KiB, 1, undefined, undefined);
  t.ok(sub.digests.equals(refDigests(bytes.subarray(MiB + 12345, 6 * MiB + 12345), 64 * KiB)), 'sub-range');
  // Past EOF hashes as zeros.
  const past = await n.hashFile(fd, bytes.length - 100, 200, 64, 2, undefined, undefined);
  const padded = Buffer.concat([bytes.subarray(bytes.length - 100), Buffer.alloc(100)]);
  t.ok(past.digests.equals(refDigests(padded, 64)), 'bytes past EOF hash as zeros');
  const none = await n.hashFile(fd, 0, 0, bs, 2, undefined, () => t.fail('no progress for nothing'));
  t.equal(none.digests.length, 0);
});

t.test('hashFile rejects with the error a progress callback throws', async (t) => {
  const { fd } = tempFile(t, 'p.img', 64 * MiB);
  n.pwrite(fd, randomBytes(MiB), 0);
  const boom = new Error('stop here');
  let calls = 0;
  await t.rejects(
    n.hashFile(fd, 0, 64 * MiB, 64 * KiB, 1, undefined, () => {
      calls++;
      throw boom;
    }),
    boom,
  );
  t.equal(calls, 1, 'no progress after the callback threw');
});

t.test('hashBlocks equals node:crypto on random lengths, block sizes and keys', async (t) => {
  // Lengths around the 64-byte chunk and the 55/56-byte padding boundary, blocks hashed in
  // pairs of equal and unequal length (the short last block pairs with a full one), odd
  // alignments, and HMAC keys shorter than, equal to and longer than the 64-byte SHA-256 block.
  const keys: (Uint8Array | undefined)[] = [undefined, new Uint8Array(0), randomBytes(1), randomBytes(32), randomBytes(64), randomBytes(65), randomBytes(200)];
  const sizes = [1, 3, 55, 56, 63, 64, 65, 119, 120, 127, 128, 129, 1000, 4097];
  let checked = 0;
  let bad = 0;
  for (let round = 0; round < 60; round++) {
    const bs = round < sizes.length ? sizes[round] : 1 + Math.floor(Math.random() * 20000);
    const len = Math.floor(Math.random() * (bs * 7 + 300));
    const backing = randomBytes(len + 16);
    const at = Math.floor(Math.random() * 16);
    const buf = backing.subarray(at, at + len);
    const key = keys[round % keys.length];
    const want = refDigests(buf, bs, key);
    for (const threads of [1, 2]) {
      const r = n.hashBlocks(buf, bs, threads, key);
      checked += want.length / 32;
      if (!r.digests.equals(want)) {
        bad++;
        t.fail(`block size ${bs}, length ${len}, offset ${at}, key ${key?.length ?? 'none'}, ${threads} threads`);
      }
    }
  }
  t.equal(bad, 0, `${checked} random blocks equal node:crypto`);
  // Large blocks: 1 MiB and 3 MiB + 5 (grabbed two at a time), and 512 KiB with a short tail.
  for (const [bs, len] of [[MiB, 6 * MiB + 77], [3 * MiB + 5, 10 * MiB], [512 * KiB, 4 * MiB + 64 * KiB + 3]]) {
    const buf = randomBytes(len);
    for (const key of [undefined, randomBytes(32)]) {
      const want = refDigests(buf, bs, key);
      t.ok(n.hashBlocks(buf, bs, 2, key).digests.equals(want), `${len} bytes in blocks of ${bs}, ${key ? 'hmac' : 'sha256'}`);
      t.ok((await n.hashBlocksAsync(buf, bs, 1, key)).digests.equals(want), `async, ${len} bytes in blocks of ${bs}`);
    }
  }
});

t.test('zero flags: an all-zero block vs one with a single non-zero byte at the end', async (t) => {
  const bs = 512 * KiB;
  // zero | zero but the last byte | zero | non-zero first byte | random | short zero tail
  const buf = Buffer.alloc(5 * bs + 1000);
  buf[2 * bs - 1] = 1;
  buf[3 * bs] = 0x80;
  randomBytes(bs).copy(buf, 4 * bs);
  for (const key of [undefined, randomBytes(32)]) {
    const what = key ? 'hmac' : 'sha256';
    const want = refDigests(buf, bs, key);
    for (const threads of [1, 2]) {
      const r = n.hashBlocks(buf, bs, threads, key);
      t.same(Array.from(r.zero), [1, 0, 1, 0, 0, 1], `${what}, ${threads} threads: zero flags`);
      t.ok(r.digests.equals(want), `${what}, ${threads} threads: digests equal node:crypto`);
      t.notOk(r.digests.subarray(0, 32).equals(r.digests.subarray(32, 64)), 'one byte changes the digest');
      t.ok(r.digests.subarray(0, 32).equals(r.digests.subarray(64, 96)), 'equal zero blocks, equal digests');
    }
  }
});

t.test('hashFile equals node:crypto for large and odd block sizes, sync and HMAC', async (t) => {
  const { file, fd } = tempFile(t, 'odd.img', 13 * MiB + 4321);
  n.pwrite(fd, randomBytes(5 * MiB + 17), 3 * MiB - 9);
  n.pwrite(fd, randomBytes(4321), 13 * MiB);
  const bytes = fs.readFileSync(file);
  for (const bs of [4 * KiB + 1, 512 * KiB, MiB, 1.5 * MiB, 5 * MiB + 3]) {
    for (const key of [undefined, randomBytes(48)]) {
      const r = await n.hashFile(fd, 0, bytes.length, bs, 2, key, undefined);
      t.ok(r.digests.equals(refDigests(bytes, bs, key)), `block size ${bs}, ${key ? 'hmac' : 'sha256'}`);
      t.same(Array.from(r.zero), refZero(bytes, bs), `block size ${bs}: zero flags`);
    }
  }
});

t.test('the OpenSSL fallback (DISKSNAP_HASH_IMPL=openssl) gives the same digests', async (t) => {
  // Hashes a seeded pattern in a child process that uses node's OpenSSL instead of SHA-NI.
  const script = `
    const a = require(${JSON.stringify(ADDON)});
    const buf = Buffer.alloc(3 * 65536 + 999);
    for (let i = 0; i < buf.length; i++) buf[i] = (i * 131 + (i >> 9)) & 0xff;
    buf.fill(0, 65536, 2 * 65536);
    const key = Buffer.from('fallback key');
    const out = [a.hashBlocks(buf, 65536, 2), a.hashBlocks(buf, 65536, 1, key), a.hashBlocks(buf, 100, 2)];
    process.stdout.write(JSON.stringify(out.map((r) => [r.digests.toString('hex'), Array.from(r.zero)])));`;
  const run = (impl: 'openssl' | undefined) => withHashImpl<[string, number[]][]>(t, script, impl);
  const fallback = run('openssl');
  const dflt = run(undefined);
  t.same(fallback, dflt, 'OpenSSL and the default implementation agree');
  const buf = Buffer.alloc(3 * 65536 + 999);
  for (let i = 0; i < buf.length; i++) buf[i] = (i * 131 + (i >> 9)) & 0xff;
  buf.fill(0, 65536, 2 * 65536);
  t.equal(fallback[0][0], refDigests(buf, 65536).toString('hex'), 'and node:crypto');
  t.equal(fallback[1][0], refDigests(buf, 65536, Buffer.from('fallback key')).toString('hex'), 'HMAC too');
  t.same(fallback[0][1], [0, 1, 0, 0]);
});

// ---------------------------------------------------------------------------------------------
// copy_file_range and reflinks

t.test('copyRange copies exact bytes at unaligned offsets and stops at EOF', async (t) => {
  const src = tempFile(t, 'src.img');
  const dst = tempFile(t, 'dst.img');
  const data = randomBytes(3 * MiB + 123);
  n.pwrite(src.fd, data, 0);
  t.equal(n.copyRange(src.fd, 5, dst.fd, 7, 2 * MiB), 2 * MiB);
  const out = fs.readFileSync(dst.file);
  t.equal(out.length, 2 * MiB + 7);
  t.ok(out.subarray(7).equals(data.subarray(5, 5 + 2 * MiB)), 'bytes equal');
  t.ok(out.subarray(0, 7).every((b) => b === 0));
  // Asking for more than there is copies up to EOF.
  t.equal(await n.copyRangeAsync(src.fd, MiB, dst.fd, 0, 10 * MiB), data.length - MiB);
  t.ok(fs.readFileSync(dst.file).subarray(0, data.length - MiB).equals(data.subarray(MiB)), 'async bytes equal');
  t.equal(n.copyRange(src.fd, data.length + 10, dst.fd, 0, 100), 0, 'nothing past EOF');
  // Within one file, non-overlapping.
  t.equal(n.copyRange(src.fd, 0, src.fd, 8 * MiB, 1000), 1000);
  const self = Buffer.alloc(1000);
  n.pread(src.fd, self, 8 * MiB);
  t.ok(self.equals(data.subarray(0, 1000)), 'same-file copy');
  const ro = n.open(dst.file, OPEN_READ, 0);
  t.teardown(() => n.close(ro));
  await rejectsWith(t, () => n.copyRange(src.fd, 0, ro, 0, 10), { code: 'EBADF' }, 'destination not writable');
});

t.test('clone and cloneRange return a boolean, and equal bytes when true', async (t) => {
  const src = tempFile(t, 'src.img');
  const dst = tempFile(t, 'dst.img');
  const data = randomBytes(256 * KiB);
  n.pwrite(src.fd, data, 0);
  n.fsync(src.fd, false);
  const whole = n.clone(src.fd, dst.fd);
  t.type(whole, 'boolean');
  if (whole) t.ok(fs.readFileSync(dst.file).equals(data), 'FICLONE copied the bytes');
  const part = n.cloneRange(src.fd, 64 * KiB, dst.fd, 0, 64 * KiB);
  t.type(part, 'boolean');
  if (part) {
    const b = Buffer.alloc(64 * KiB);
    n.pread(dst.fd, b, 0);
    t.ok(b.equals(data.subarray(64 * KiB, 128 * KiB)), 'FICLONERANGE copied the bytes');
  }
  t.comment(`reflinks on this filesystem: clone ${whole}, cloneRange ${part}`);
  const closed = n.open(path.join(dirOf(t), 'c'), OPEN_WRITE | OPEN_CREATE, 0o644);
  n.close(closed);
  await rejectsWith(t, () => n.clone(closed, dst.fd), { code: 'EBADF' }, 'clone from a closed descriptor');
});

t.test('putObject publishes complete objects under free names only, and leaves no temporary file', async (t) => {
  const dir = t.testdir();
  const n = native();
  const head = randomBytes(64 * KiB + 512);
  const tail = randomBytes(32);
  t.equal(await n.putObjectAsync(dir, 'a', head, tail), 0, 'published');
  t.ok(fs.readFileSync(path.join(dir, 'a')).equals(Buffer.concat([head, tail])), 'head then tail');
  t.equal(await n.putObjectAsync(dir, 'a', randomBytes(100)), 1, 'an existing name is not replaced');
  t.ok(fs.readFileSync(path.join(dir, 'a')).equals(Buffer.concat([head, tail])), 'the first content stays');
  // a whole number of sectors (written with O_DIRECT when its address is aligned too) and a
  // tiny object
  const view = randomBytes(256 * KiB);
  t.equal(await n.putObjectAsync(dir, 'b', view), 0);
  t.ok(fs.readFileSync(path.join(dir, 'b')).equals(view));
  t.equal(await n.putObjectAsync(dir, 'c', Buffer.from('x')), 0);
  t.equal(fs.readFileSync(path.join(dir, 'c'), 'utf8'), 'x');
  t.same(fs.readdirSync(dir).sort(), ['a', 'b', 'c'], 'nothing else in the directory');
  await t.rejects(n.putObjectAsync(path.join(dir, 'missing'), 'd', head), { code: 'ENOENT' });
  await t.rejects(n.putObjectAsync(dir, 'x/y', head), { code: 'EINVAL' });
});

t.test('putObjects: many objects as putObject writes each, in one call; a missing directory is made, one whose parent is missing too reported; other failures reject once all are done', async (t) => {
  const root = t.testdir();
  const n = native();
  const dirs = ['d0', 'd1', 'd2'].map((d) => path.join(root, d));
  for (const d of dirs) fs.mkdirSync(d);
  fs.writeFileSync(path.join(dirs[1], 'old'), 'kept');
  const missingDir = path.join(root, 'missing');
  const items = Array.from({ length: 40 }, (_, i) => ({ dir: dirs[i % 3], name: `o${i}`, head: randomBytes(i % 2 ? 512 * KiB : 1000 + i) }));
  const deeper = path.join(root, 'gone', 'sub');
  items.push({ dir: dirs[1], name: 'old', head: Buffer.from('new') }, { dir: missingDir, name: 'm', head: Buffer.from('x') }, { dir: missingDir, name: 'm2', head: Buffer.from('y') }, { dir: deeper, name: 'z', head: Buffer.from('z') });
  const status = await n.putObjectsAsync(items.map((i) => i.dir), items.map((i) => i.name), items.map((i) => i.head));
  t.ok(status instanceof Int32Array && status.length === items.length, 'a status per object');
  t.same(Array.from(status.subarray(0, 40)), new Array(40).fill(0), 'every new object published');
  t.equal(status[40], 1, 'an existing name is not replaced');
  t.equal(fs.readFileSync(path.join(dirs[1], 'old'), 'utf8'), 'kept', 'and keeps its content');
  t.same([status[41] & 1, status[42] & 1], [0, 0], 'objects in a missing directory published');
  t.equal((status[41] | status[42]) & 2, 2, 'the call says it made their directory (one of them did)');
  t.equal(status[41] & status[42] & 2, 0, 'only once');
  t.same(fs.readdirSync(missingDir).sort(), ['m', 'm2']);
  t.equal(status[43], -2, 'a directory whose parent is missing too: -ENOENT for that object alone');
  t.notOk(fs.existsSync(path.join(root, 'gone')), 'and nothing made for it');
  t.ok(items.slice(0, 40).every((i) => fs.readFileSync(path.join(i.dir, i.name)).equals(i.head)), 'each file holds its bytes');
  t.same(dirs.map((d) => fs.readdirSync(d).length), [14, 14, 13], 'nothing else in the directories (no temporary files)');
  t.same(Array.from(await n.putObjectsAsync([], [], [])), [], 'none');
  // a failure other than a missing directory: the call rejects with it, after the others are written
  const file = path.join(root, 'file');
  fs.writeFileSync(file, 'x');
  const late = path.join(dirs[0], 'late');
  await rejectsWith(t, () => n.putObjectsAsync([file, dirs[0]], ['a', 'late'], [Buffer.from('a'), Buffer.from('late')]), { code: 'ENOTDIR' }, 'a file where a directory should be');
  t.equal(fs.readFileSync(late, 'utf8'), 'late', 'the other object was still written');
  await rejectsWith(t, () => n.putObjectsAsync([dirs[0]], ['x/y'], [Buffer.from('a')]), { code: 'EINVAL' }, 'a name of two components');
  await rejectsWith(t, () => n.putObjectsAsync([dirs[0]], ['a', 'b'], [Buffer.from('a')]), { code: 'EINVAL' }, 'arrays of different lengths');
  await rejectsWith(t, () => n.putObjectsAsync([dirs[0]], ['a'], ['a' as unknown as Buffer]), { code: 'EINVAL' }, 'a head that is not a Buffer');
});

t.test('syncDirs opens and fsyncs every directory it is given, and names the first it could not', async (t) => {
  const root = t.testdir();
  const n = native();
  const dirs = Array.from({ length: 40 }, (_, i) => path.join(root, `d${i}`));
  for (const d of dirs) fs.mkdirSync(d);
  t.equal(await n.syncDirsAsync(dirs), undefined, 'forty directories');
  t.equal(await n.syncDirsAsync([]), undefined, 'none');
  const gone = path.join(root, 'gone');
  await rejectsWith(t, () => n.syncDirsAsync([...dirs.slice(0, 20), gone, ...dirs.slice(20)]), { code: 'ENOENT', path: gone }, 'a missing directory among others');
  const file = path.join(root, 'file');
  fs.writeFileSync(file, 'x');
  await rejectsWith(t, () => n.syncDirsAsync([file]), { code: 'ENOTDIR', path: file }, 'a file is not a directory');
  await rejectsWith(t, () => n.syncDirsAsync('dir' as unknown as string[]), { code: 'EINVAL' }, 'not an array');
  await rejectsWith(t, () => n.syncDirsAsync([root, 7 as unknown as string]), { code: 'EINVAL' }, 'not a path');
  await rejectsWith(t, () => n.syncDirsAsync(['']), { code: 'EINVAL' }, 'an empty path');
});

t.test('syncDirs: strace sees one fsync of each directory', { skip: missing({ commands: ['strace'] }) }, async (t) => {
  // what makes a store's new links durable (./store/dir.ts flush): checked where it happens
  const root = t.testdir();
  const dirs = Array.from({ length: 24 }, (_, i) => path.join(root, `d${i}`));
  for (const d of dirs) fs.mkdirSync(d);
  const script = `require(${JSON.stringify(ADDON)}).syncDirsAsync(${JSON.stringify(dirs)}).then(() => process.stdout.write('done'))`;
  // (one trace file per thread: a call in one thread then reads as one line)
  const out = path.join(root, 'trace');
  const r = spawnSync('strace', ['-ff', '-qq', '-y', '-e', 'trace=fsync', '-o', out, process.execPath, '-e', script], { encoding: 'utf8' });
  t.equal(r.status, 0, r.stderr.slice(-2000));
  t.equal(r.stdout, 'done');
  const traced = fs.readdirSync(root).filter((f) => f.startsWith('trace.')).map((f) => fs.readFileSync(path.join(root, f), 'utf8')).join('\n');
  const synced = [...traced.matchAll(/fsync\(\d+<([^>]*)>\)\s*=\s*0/g)].map((m) => m[1]);
  t.same(synced.sort(), [...dirs].sort(), 'each directory fsynced once, successfully');
});

t.test('a directory store\'s flush names a directory it could not sync and keeps it for the next flush', async (t) => {
  const root = t.testdir();
  const d = new DirectoryBackend(root);
  t.equal(await d.putIfAbsent('blocks/ab/one', Buffer.from('1')), true);
  t.equal(await d.putIfAbsent('blocks/cd/two', Buffer.from('2')), true);
  fs.renameSync(path.join(root, 'blocks', 'ab'), path.join(root, 'away'));
  await rejectsWith(t, () => d.flush(), { code: 'ENOENT', path: path.join(root, 'blocks', 'ab') }, 'the directory that went away');
  fs.renameSync(path.join(root, 'away'), path.join(root, 'blocks', 'ab'));
  fs.rmSync(path.join(root, 'blocks', 'cd'), { recursive: true });
  await rejectsWith(t, () => d.flush(), { code: 'ENOENT', path: path.join(root, 'blocks', 'cd') }, 'kept: tried again at the next flush');
  fs.mkdirSync(path.join(root, 'blocks', 'cd'));
  await d.flush();
  t.pass('synced once all are there');
});

t.test('readObject reads a whole file when it fits and tells its size either way', async (t) => {
  const dir = t.testdir();
  const n = native();
  const data = randomBytes(10000);
  fs.writeFileSync(path.join(dir, 'o'), data);
  const big = Buffer.alloc(20000);
  t.equal(await n.readObjectAsync(path.join(dir, 'o'), big), 10000);
  t.ok(big.subarray(0, 10000).equals(data));
  const small = Buffer.alloc(100, 7);
  t.equal(await n.readObjectAsync(path.join(dir, 'o'), small), 10000, 'the size, though it did not fit');
  t.ok(small.every((b) => b === 7), 'nothing read into a buffer too small');
  await t.rejects(n.readObjectAsync(path.join(dir, 'none'), big), { code: 'ENOENT', path: path.join(dir, 'none') });
});

t.test('alignOffset: the distance to the next boundary moves by one per byte of view offset', async (t) => {
  const n = native();
  const buf = Buffer.alloc(3 * 4096);
  const base = n.alignOffset(buf, 4096);
  t.ok(base >= 0 && base < 4096, 'within one page');
  for (const k of [0, 1, 15, 16, 511, 512, 4095, 4096, 5000]) {
    const want = (((base - k) % 4096) + 4096) % 4096;
    t.equal(n.alignOffset(buf.subarray(k), 4096), want, `view at ${k}`);
  }
  t.equal(n.alignOffset(buf.subarray(base), 4096), 0, 'the view it points to is aligned');
  t.equal(n.alignOffset(buf.subarray(base), 512), 0, 'and so aligned to every smaller power of two');
  t.equal(n.alignOffset(buf.subarray(base + 512), 4096), 4096 - 512);
  t.equal(n.alignOffset(buf, 1), 0);
  t.throws(() => n.alignOffset(buf, 3000), { code: 'EINVAL' });
  t.throws(() => n.alignOffset(buf, 0), { code: 'EINVAL' });
});

/**
 * The child of the page-size tests: allocates two 18 MiB buffers through the addon, writes
 * them, and prints what it chose (bufferPages) and, for the mappings that appeared, the MiB
 * marked for huge pages (VmFlags hg), for small ones (nh), and backed by huge pages.
 */
const PAGES_CHILD = `
const fs = require('node:fs');
const n = require(process.argv[1]).native();
const vmas = () => {
  const out = new Map();
  let cur;
  for (const line of fs.readFileSync('/proc/self/smaps', 'utf8').split('\\n')) {
    const h = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (h) { cur = { start: h[1], size: (parseInt(h[2], 16) - parseInt(h[1], 16)) / 2 ** 20, huge: 0, flags: '' }; out.set(h[1], cur); continue; }
    const a = /^AnonHugePages:\\s+(\\d+) kB/.exec(line);
    if (a && cur) cur.huge = Number(a[1]) / 1024;
    const f = /^VmFlags:(.*)$/.exec(line);
    if (f && cur) cur.flags = f[1];
  }
  return out;
};
const before = vmas();
const faults = process.resourceUsage().minorPageFault;
const bulk = process.env.PAGES_BULK === '1';
const bufs = [n.allocBig(18 * 2 ** 20, bulk), n.allocBig(18 * 2 ** 20, bulk)];
for (const b of bufs) b.fill(0xa5);
const took = process.resourceUsage().minorPageFault - faults;
const r = { ...n.bufferPages(), hg: 0, nh: 0, huge: 0, took, intact: bufs.every((b) => b.indexOf(0) === -1) };
for (const [start, v] of vmas()) {
  if (before.has(start) && before.get(start).size === v.size) continue;
  if (/ hg\\b/.test(v.flags)) r.hg += v.size;
  if (/ nh\\b/.test(v.flags)) r.nh += v.size;
  r.huge += v.huge;
}
process.stdout.write(JSON.stringify(r));
`;

function pagesChild(t: Test, forced?: string, bulk = false): { pages: string; reason: string; hg: number; nh: number; huge: number; took: number; intact: boolean } {
  const lib = path.resolve(__dirname, '..', 'dist', 'src', 'engine', 'native.js');
  const env = { ...process.env };
  delete env.DISKSNAP_BUFFER_PAGES;
  if (forced) env.DISKSNAP_BUFFER_PAGES = forced;
  env.PAGES_BULK = bulk ? '1' : '0';
  const r = spawnSync(process.execPath, ['-e', PAGES_CHILD, lib], { encoding: 'utf8', env });
  t.equal(r.status, 0, `the child ran ${r.stderr}`);
  return JSON.parse(r.stdout);
}

t.test('bigBuffer pages: DISKSNAP_BUFFER_PAGES=huge gives 2 MiB pages, =small 4 KiB ones', async (t) => {
  const mode = fs.existsSync(THP) ? fs.readFileSync(THP, 'utf8') : '';
  if (!/\[(always|madvise)\]/.test(mode)) {
    t.skip(`transparent huge pages are off on this kernel (${THP}: ${mode.trim() || 'missing'})`);
    return;
  }
  const huge = pagesChild(t, 'huge');
  t.match(huge, { pages: 'huge', reason: 'forced', intact: true });
  t.equal(huge.hg, 36, 'both buffers marked for huge pages');
  t.equal(huge.nh, 0);
  t.ok(huge.huge >= 16, `backed by ${huge.huge} MiB of huge pages once written (at least 16 of 36 expected)`);
  t.ok(huge.took < 4096, `${huge.took} page faults to write 36 MiB (9,216 with 4 KiB pages)`);
  const small = pagesChild(t, 'small');
  t.match(small, { pages: 'small', reason: 'forced', intact: true });
  t.equal(small.nh, 36, 'both buffers marked for 4 KiB pages');
  t.equal(small.hg, 0);
  t.equal(small.huge, 0, 'no huge page behind them');
  t.ok(small.took >= 9216, `${small.took} page faults to write 36 MiB: one per 4 KiB page`);
});

t.test('populateAsync faults a buffer in ahead, on the thread pool, and leaves its bytes as they were', async (t) => {
  const lib = path.resolve(__dirname, '..', 'dist', 'src', 'engine', 'native.js');
  const child = `
const n = require(process.argv[1]).native();
(async () => {
  const a = n.allocBig(8 * 2 ** 20), b = n.allocBig(8 * 2 ** 20);
  a.fill(0x5a, 0, 5000);
  const populated = await n.populateAsync(a);
  const kept = a.subarray(0, 5000).every((x) => x === 0x5a) && a.subarray(5000).every((x) => x === 0);
  const fill = (buf) => { const f = process.resourceUsage().minorPageFault; buf.fill(0xa5); return process.resourceUsage().minorPageFault - f; };
  process.stdout.write(JSON.stringify({ populated, kept, ahead: fill(a), control: fill(b), empty: await n.populateAsync(a.subarray(1, 100)) }));
})();`;
  const r = spawnSync(process.execPath, ['-e', child, lib], { encoding: 'utf8', env: { ...process.env, DISKSNAP_BUFFER_PAGES: 'small' } });
  t.equal(r.status, 0, `the child ran ${r.stderr}`);
  const got = JSON.parse(r.stdout) as { populated: boolean; kept: boolean; ahead: number; control: number; empty: boolean };
  t.ok(got.kept, 'the bytes written before are still there, the rest still zero');
  t.equal(got.empty, false, 'a range without a whole page: nothing to do');
  t.ok(got.control >= 2048, `${got.control} faults to fill 8 MiB of 4 KiB pages not faulted in ahead`);
  const [major, minor] = fs.readFileSync('/proc/sys/kernel/osrelease', 'utf8').split('.').map(Number);
  if (major < 5 || (major === 5 && minor < 14)) {
    t.equal(got.populated, false, 'before Linux 5.14 the kernel cannot: false');
    return;
  }
  t.equal(got.populated, true, 'Linux 5.14 and later: done');
  t.ok(got.ahead < 64, `${got.ahead} faults to fill it after populateAsync (2,048 pages)`);
});

/** Whether a virtio balloon device here negotiated free page reporting (feature bit 5), read as a user would. */
function reportsFreePages(): boolean {
  const dir = '/sys/bus/virtio/drivers/virtio_balloon';
  if (!fs.existsSync(dir)) return false;
  return fs
    .readdirSync(dir)
    .filter((d) => d.startsWith('virtio'))
    .some((d) => fs.readFileSync(path.join(dir, d, 'features'), 'utf8')[5] === '1');
}

t.test('bigBuffer pages: unforced, 4 KiB pages where the guest reports free memory to its host, huge ones elsewhere', async (t) => {
  const mode = fs.existsSync(THP) ? fs.readFileSync(THP, 'utf8') : '';
  if (!/\[(always|madvise)\]/.test(mode)) {
    t.skip(`transparent huge pages are off on this kernel (${THP}: ${mode.trim() || 'missing'})`);
    return;
  }
  const r = pagesChild(t);
  const reports = reportsFreePages();
  t.match(r, reports ? { pages: 'small', reason: 'free page reporting' } : { pages: 'huge', reason: 'default' }, `free page reporting: ${reports}`);
  t.ok(r.intact, 'every byte holds what was written');
  t.equal(r.hg, reports ? 0 : 36, 'MiB marked for huge pages');
  t.equal(r.nh, reports ? 36 : 0, 'MiB marked for 4 KiB pages');
});

t.test('allocBig(size, true), buffers for bulk O_DIRECT traffic: 2 MiB pages whatever the host does with free memory, unless DISKSNAP_BUFFER_PAGES=small', async (t) => {
  const mode = fs.existsSync(THP) ? fs.readFileSync(THP, 'utf8') : '';
  if (!/\[(always|madvise)\]/.test(mode)) {
    t.skip(`transparent huge pages are off on this kernel (${THP}: ${mode.trim() || 'missing'})`);
    return;
  }
  const unforced = pagesChild(t, undefined, true);
  t.match(unforced, { reason: reportsFreePages() ? 'free page reporting' : 'default', intact: true }, 'the process\'s own choice is as before');
  t.equal(unforced.hg, 36, 'both buffers marked for huge pages');
  t.equal(unforced.nh, 0);
  t.ok(unforced.huge >= 16, `backed by ${unforced.huge} MiB of huge pages once written (at least 16 of 36 expected)`);
  t.match(pagesChild(t, 'huge', true), { hg: 36, nh: 0 }, 'forced huge: huge');
  t.match(pagesChild(t, 'small', true), { hg: 0, nh: 36, huge: 0 }, 'forced small: small, bulk or not');
});

t.test('allocBig: exact size, zero, on a 2 MiB boundary, unmapped once collected; bad sizes refused', async (t) => {
  const n = native();
  for (const bad of [0, -1, 1.5, 2 ** 41, NaN, '4096' as unknown as number]) t.throws(() => n.allocBig(bad), { code: 'EINVAL' }, `size ${String(bad)}`);
  const size = 5 * 2 ** 20 + 123;
  const b = n.allocBig(size);
  t.equal(b.length, size);
  t.equal(n.alignOffset(b, 2 * 2 ** 20), 0, 'starts on a 2 MiB boundary');
  t.ok(b.every((x) => x === 0), 'fresh memory is zero');
  b.fill(0x5a);
  t.equal(b[size - 1], 0x5a, 'its last byte is writable');
  // its mapping goes when the Buffer is collected: 256 MiB of address space (never touched,
  // so it costs no memory) is far more than anything else here maps or unmaps meanwhile
  const vmKb = () => Number(/^VmSize:\s+(\d+) kB/m.exec(fs.readFileSync('/proc/self/status', 'utf8'))?.[1]);
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  const before = vmKb();
  let during = 0;
  (() => {
    const c = n.allocBig(256 * 2 ** 20);
    c[c.length - 1] = 1;
    during = vmKb();
  })();
  t.ok(during - before >= 256 << 10, `mapped while in use (+${during - before} kB)`);
  for (let i = 0; i < 5 && during - vmKb() < 256 << 10; i++) {
    gc();
    await new Promise((r) => setImmediate(r));
  }
  t.ok(during - vmKb() >= 256 << 10, `unmapped after a collection (-${during - vmKb()} kB)`);
});

t.test('l2Ordinary: plain qcow2 L2 tables pass; compressed, reserved, unaligned, outside or metadata entries do not', async (t) => {
  const n = native();
  const cs = 65536;
  const fileSize = 1000 * cs;
  const meta = new Uint8Array(16); // clusters 0-127; 3 and 100 hold metadata
  meta[0] = 1 << 3;
  meta[12] = 1 << 4;
  const entry = (hi: number, lo: number) => {
    const e = Buffer.alloc(8);
    e.writeUInt32BE(hi >>> 0, 0);
    e.writeUInt32BE(lo >>> 0, 4);
    return e;
  };
  const at = (c: number, copied = true, zero = false) => entry((copied ? 0x80000000 : 0) + Math.floor((c * cs) / 2 ** 32), ((c * cs) % 2 ** 32) + (zero ? 1 : 0));
  const table = (...es: Buffer[]) => Buffer.concat([...es, Buffer.alloc(8 * (8192 - es.length))]);
  const ok = (tb: Buffer) => n.l2Ordinary(tb, cs, fileSize, meta, 2 ** 27);
  t.equal(ok(table()), true, 'an empty table');
  t.equal(ok(table(at(5), at(6, false), entry(0, 1), at(7, true, true), at(999), at(200))), true, 'data clusters (copied or not), zero entries, a preallocated zero cluster');
  t.equal(ok(table(at(5), at(3))), false, 'a cluster that holds metadata (bit 3)');
  t.equal(ok(table(at(100))), false, 'a cluster that holds metadata (bit 100)');
  t.equal(ok(table(at(1000))), false, 'a cluster at the end of the file');
  t.equal(ok(table(entry(0x80000000, cs + 512))), false, 'an offset not on a cluster boundary');
  t.equal(ok(table(entry(0x40000000, 0))), false, 'a compressed entry');
  t.equal(ok(table(entry(0x01000000, 0))), false, 'a reserved bit of the high word');
  t.equal(ok(table(at(5).fill(0x02, 7, 8))), false, 'a reserved bit of the low word');
  t.equal(n.l2Ordinary(table(at(600)), cs, fileSize, meta, 500), false, 'a cluster at or past the bit array\'s limit');
  t.equal(n.l2Ordinary(table(at(600)), cs, fileSize, new Uint8Array(0), 2 ** 27), true, 'clusters past a short bit array are not metadata');
  t.throws(() => n.l2Ordinary(Buffer.alloc(12), cs, fileSize, meta, 2 ** 27), { code: 'EINVAL' });
  t.throws(() => n.l2Ordinary(table(), 0, fileSize, meta, 2 ** 27), { code: 'EINVAL' });
});

/** The runs of set bits among the first `limit` bits, one bit at a time: the model of bitRuns. */
function bitRunsModel(data: Uint8Array, limit: number): number[] {
  const out: number[] = [];
  let start = -1;
  for (let i = 0; i < limit; i++) {
    const set = (data[i >> 3] >> (i & 7)) & 1;
    if (set && start < 0) start = i;
    else if (!set && start >= 0) out.push(start, i), (start = -1);
  }
  if (start >= 0) out.push(start, limit);
  return out;
}

t.test('bitRuns: the runs of set bits of a qcow2 bitmap cluster, as the bit-by-bit model finds them', async (t) => {
  const n = native();
  const runs = (d: Uint8Array, limit = d.length * 8) => [...n.bitRuns(d, limit)];
  t.same(runs(new Uint8Array(4096)), [], 'all clear');
  t.same(runs(new Uint8Array(4096).fill(0xff)), [0, 32768], 'all set: one run');
  const b = new Uint8Array(64);
  b[0] = 0b1000_0001; // bits 0 and 7
  b[7] = 0x80; // bit 63 runs on into byte 8
  b[8] = 0xff;
  b[9] = 0x01; // ... to bit 72
  b[63] = 0x80; // the last bit
  t.same(runs(b), [0, 1, 7, 8, 63, 73, 511, 512]);
  t.same(runs(b, 68), [0, 1, 7, 8, 63, 68], 'a run cut at the limit, inside a byte');
  t.same(runs(b, 0), []);
  for (const density of [0.001, 0.02, 0.5, 0.98]) {
    const d = new Uint8Array(65536 + 5);
    let x = Math.round(density * 1e6) + 7;
    for (let i = 0; i < d.length * 8; i++) {
      x = (x * 1103515245 + 12345) % 2147483648;
      // runs of a few bits to a few hundred, so both the 8-byte and the byte steps are taken
      if (x / 2147483648 < density / 50) for (let k = 0; k < (x % 400) + 1 && i + k < d.length * 8; k++) d[(i + k) >> 3] |= 1 << ((i + k) & 7);
    }
    for (const limit of [d.length * 8, d.length * 8 - 3, 300_001]) t.same(runs(d, limit), bitRunsModel(d, limit), `density ${density}, limit ${limit}`);
  }
  t.throws(() => n.bitRuns(new Uint8Array(8), 65), { code: 'EINVAL', message: /past the end/ });
});

t.test('tuneMalloc: glibc takes the settings', async (t) => {
  t.equal(native().tuneMalloc(), true);
  const b = Buffer.allocUnsafeSlow(256 << 10);
  b.fill(1);
  t.equal(b.readUInt32LE(1000), 0x01010101, 'allocation works after it');
});

t.test('gcmSeal/gcmOpen refuse bad arguments before touching memory', async (t) => {
  const n = native();
  const key = randomBytes(32);
  const buf = Buffer.alloc(1024);
  await t.rejects(n.gcmSealAsync(randomBytes(16), buf, new Float64Array([0, 512]), randomBytes(32), 1), { code: 'EINVAL', message: /32 bytes/ });
  await t.rejects(n.gcmSealAsync(key, buf, new Float64Array([768, 512]), randomBytes(32), 1), { code: 'EINVAL', message: /outside/ });
  await t.rejects(n.gcmSealAsync(key, buf, new Float64Array([0, 512]), randomBytes(31), 1), { code: 'EINVAL', message: /32 bytes per item/ });
  await t.rejects(n.gcmSealAsync(key, buf, new Float64Array([0]), Buffer.alloc(0), 1), { code: 'EINVAL', message: /groups of 2/ });
  await t.rejects(n.gcmSealAsync(key, buf, [0, 512] as unknown as Float64Array, randomBytes(32), 1), { code: 'EINVAL', message: /Float64Array/ });
  await t.rejects(n.gcmOpenAsync(key, buf, Buffer.alloc(100), new Float64Array([0, 544, 0]), randomBytes(32), 1), { code: 'EINVAL', message: /outside/ });
  // and a round trip of an empty object (the tag alone authenticates it)
  const empty = Buffer.alloc(0);
  const tr = await n.gcmSealAsync(key, empty, new Float64Array([0, 0]), Buffer.alloc(32, 1), 1);
  const codes = await n.gcmOpenAsync(key, tr, Buffer.alloc(0), new Float64Array([0, 32, 0]), Buffer.alloc(32, 1), 1);
  t.same(Array.from(codes), [0]);
  const wrong = await n.gcmOpenAsync(key, tr, Buffer.alloc(0), new Float64Array([0, 32, 0]), Buffer.alloc(32, 2), 1);
  t.same(Array.from(wrong), [3], 'another digest fails authentication');
});

t.test('scanEntries: consumes checked manifest entries below a limit, and stops before any it cannot take', async (t) => {
  const n = native();
  // entries: [block index (u32 lo, u24 hi), slot (top byte)], 32 digest bytes each
  const entry = (index: number, slot = 0) => {
    const e = Buffer.alloc(40, 0xab);
    e.writeUInt32LE(index % 2 ** 32, 0);
    e.writeUInt32LE(Math.floor(index / 2 ** 32) | (slot << 24), 4);
    return e;
  };
  const chunk = (...es: Array<[number, number?]>) => Buffer.concat(es.map(([i, s]) => entry(i, s)));
  // a volume of 10 blocks of 512 KiB, the last one 100 KiB (so only its slots 1 and 2 exist), pieces of 64 KiB
  const state = (last = -1, lastSlot = 0) => Float64Array.from([last, lastSlot, 8, 10, 9 * 2 ** 19 + 100 * 1024, 2 ** 19, 2 ** 16, -7, -7]);
  const c = chunk([0], [1], [1, 3], [4], [5, 2], [9, 1], [9, 2]);
  let st = state();
  t.equal(n.scanEntries(c, 0, 100, st), 7, 'every entry, to the chunk end');
  t.same([...st], [9, 2, 8, 10, 9 * 2 ** 19 + 100 * 1024, 2 ** 19, 2 ** 16, 5, 1], 'last entry, blocks started, pieces seen');
  st = state();
  t.equal(n.scanEntries(c, 0, 4, st), 3, 'stops before the first entry at the limit');
  t.same([st[0], st[1], st[7], st[8]], [1, 3, 2, 1]);
  st = state(1, 3);
  t.equal(n.scanEntries(c, 120, 5, st), 1, 'from a later entry, after the one before it');
  t.same([st[0], st[1], st[7], st[8]], [4, 0, 1, 0], 'no piece among them');
  t.equal(n.scanEntries(c, 0, 100, state(0)), 0, 'an entry not after the last one is left to the caller');
  t.equal(n.scanEntries(chunk([0], [2], [2]), 0, 100, state()), 2, 'the same block and slot twice: stops at the second');
  t.equal(n.scanEntries(chunk([0], [1, 3], [1, 2]), 0, 100, state()), 2, 'slots out of order: stops');
  t.equal(n.scanEntries(chunk([0], [9, 3]), 0, 100, state()), 1, 'a slot past the short last block: stops');
  t.equal(n.scanEntries(chunk([0], [3, 9]), 0, 100, state()), 1, 'a slot past the pieces a block has: stops');
  t.equal(n.scanEntries(chunk([0], [10]), 0, 100, state()), 1, 'a block past the volume: stops');
  const v1 = Float64Array.from([-1, 0, 0, 2 ** 33, 2 ** 52, 2 ** 19, 0, 0, 0]);
  t.equal(n.scanEntries(chunk([1], [2 ** 32 + 5]), 0, 2 ** 40, v1), 2, 'without pieces the top bytes are index bits');
  t.equal(v1[0], 2 ** 32 + 5);
  t.equal(n.scanEntries(c, c.length, 100, state()), 0, 'nothing after the chunk end');
  t.throws(() => n.scanEntries(c, 20, 100, state()), /entry boundary/, 'pos inside an entry');
  t.throws(() => n.scanEntries(c, c.length + 40, 100, state()), /entry boundary/, 'pos past the chunk');
  t.throws(() => n.scanEntries(c, 0, 100, new Float64Array(3)), /Float64Array of 9/, 'a short state');
});

t.test('entryDigests: copies the digests of the piece entries, or of the whole-block ones, of a chunk of manifest entries', async (t) => {
  const n = native();
  // entries: block index (u32 lo, u24 hi), slot (top byte), then a 32-byte digest
  const entry = (index: number, slot: number, fill: number) => {
    const e = Buffer.alloc(40, fill);
    e.writeUInt32LE(index, 0);
    e.writeUInt32LE(slot << 24, 4);
    return e;
  };
  const c = Buffer.concat([entry(0, 0, 1), entry(1, 2, 2), entry(1, 5, 3), entry(2, 0, 4), entry(3, 8, 5)]);
  const out = Buffer.alloc(8 + 5 * 32, 0xee);
  t.equal(n.entryDigests(c, c.length, true, out, 8), 3, 'three pieces');
  t.same([...out.subarray(8, 8 + 96)], [...Buffer.alloc(32, 2), ...Buffer.alloc(32, 3), ...Buffer.alloc(32, 5)], 'their digests, in order, from outOffset');
  t.same([...out.subarray(0, 8)], [...Buffer.alloc(8, 0xee)], 'nothing before outOffset');
  t.same([...out.subarray(104)], [...Buffer.alloc(64, 0xee)], 'nothing past them');
  t.equal(n.entryDigests(c, c.length, false, out, 0), 2, 'two whole blocks');
  t.same([...out.subarray(0, 64)], [...Buffer.alloc(32, 1), ...Buffer.alloc(32, 4)]);
  t.equal(n.entryDigests(c, 80, true, out, 0), 1, 'only the entries before end');
  t.equal(n.entryDigests(c, 0, true, out, out.length), 0, 'an empty range, at the end of out');
  t.throws(() => n.entryDigests(c, 60, true, out, 0), /entry boundary/, 'end inside an entry');
  t.throws(() => n.entryDigests(c, c.length + 40, true, out, 0), /entry boundary/, 'end past the chunk');
  t.throws(() => n.entryDigests(c, c.length, true, Buffer.alloc(4 * 32), 0), /no room/, 'out with less room than an entry each');
  t.throws(() => n.entryDigests(c, c.length, true, out, 40), /no room/, 'room counted from outOffset');
  t.throws(() => n.entryDigests(c, c.length, 1 as unknown as boolean, out, 0), /boolean/, 'pieces must be a boolean');
});
