// File handles, OFD locks, (batched) pread/pwrite, fsync, fallocate, fstat, ftruncate,
// extents, copy_file_range and reflinks.
//
// Each operation is a small "job" struct: Run() does the syscalls (no JS), Result() builds the
// JS value. The synchronous binding runs the job in place; the async one hands the same job to
// a JobWorker on libuv's pool. Inputs are validated before the job exists.
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/falloc.h>
#include <linux/fiemap.h>
#include <string.h>
#include <sys/ioctl.h>
#include <dirent.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <vector>

#include "addon.h"
#include "args.h"
#include "error.h"
#include "io.h"
#include "worker.h"

namespace disksnap {

namespace {

// ---------------------------------------------------------------------------------------------
// Jobs and their two ways to run

template <class Job>
class JobWorker : public PromiseWorker {
 public:
  JobWorker(Napi::Env env, const char* name, Job job)
      : PromiseWorker(env, name), job_(std::move(job)) {}

 protected:
  void Execute() override { error_ = job_.Run(); }
  Napi::Value Result(Napi::Env env) override { return job_.Result(env); }

 private:
  Job job_;
};

template <class Job>
Napi::Value RunSync(Napi::Env env, Job& job) {
  SysError err = job.Run();
  if (err.failed()) {
    Throw(env, err);
    return Napi::Value();
  }
  return job.Result(env);
}

// `keep` are the JS buffers the job points into; they stay alive until the promise settles.
template <class Job>
Napi::Value RunAsync(Napi::Env env, const char* name, Job job,
                     std::initializer_list<Napi::Value> keep) {
  auto* worker = new JobWorker<Job>(env, name, std::move(job));
  for (const Napi::Value& v : keep) worker->Keep(v);
  return worker->Start();
}

struct PreadJob {
  int fd;
  Bytes buf;
  uint64_t offset;
  size_t got = 0;
  SysError Run() { return PreadFull(fd, buf.data, buf.length, offset, &got); }
  Napi::Value Result(Napi::Env env) { return Napi::Number::New(env, static_cast<double>(got)); }
};

struct PwriteJob {
  int fd;
  Bytes buf;
  uint64_t offset;
  SysError Run() { return PwriteFull(fd, buf.data, buf.length, offset); }
  Napi::Value Result(Napi::Env env) { return env.Undefined(); }
};

struct PreadBatchJob {
  int fd;
  Bytes buf;
  std::vector<IoRequest> requests;
  uint64_t total = 0;
  SysError Run() { return PreadBatch(fd, buf.data, requests.data(), requests.size(), &total); }
  Napi::Value Result(Napi::Env env) { return Napi::Number::New(env, static_cast<double>(total)); }
};

struct PwriteBatchJob {
  int fd;
  Bytes buf;
  std::vector<IoRequest> requests;
  SysError Run() { return PwriteBatch(fd, buf.data, requests.data(), requests.size()); }
  Napi::Value Result(Napi::Env env) { return env.Undefined(); }
};

struct FsyncJob {
  int fd;
  bool dataOnly;
  SysError Run() { return Fsync(fd, dataOnly); }
  Napi::Value Result(Napi::Env env) { return env.Undefined(); }
};

// FIEMAP of [offset, offset + length): extents as quads (logical, physical, length, flags).
// The file's dirty pages are written back first (FIEMAP_FLAG_SYNC, on the first call) so that
// delayed allocations have their blocks. The ioctl returns at most kFiemapBatch extents per
// call; it is called again from the end of the last one until an extent carries
// FIEMAP_EXTENT_LAST, none is returned, or the range is covered. A physical address beyond
// 2^53 cannot cross as a double: that extent is reported with FIEMAP_EXTENT_UNKNOWN, which
// callers treat as "cannot tell" (never as "unchanged").
constexpr uint32_t kFiemapBatch = 256;

SysError Fiemap(int fd, uint64_t offset, uint64_t length, std::vector<double>* out) {
  if (length == 0) return {};
  const uint64_t end = offset + length;
  std::vector<uint8_t> mem(sizeof(struct fiemap) + kFiemapBatch * sizeof(struct fiemap_extent));
  auto* fm = reinterpret_cast<struct fiemap*>(mem.data());
  uint64_t pos = offset;
  bool first = true;
  while (pos < end) {
    memset(mem.data(), 0, mem.size());
    fm->fm_start = pos;
    fm->fm_length = end - pos;
    fm->fm_flags = first ? FIEMAP_FLAG_SYNC : 0;
    fm->fm_extent_count = kFiemapBatch;
    first = false;
    int r;
    do {
      r = ::ioctl(fd, FS_IOC_FIEMAP, fm);
    } while (r < 0 && errno == EINTR);
    if (r < 0) return SysError::Errno(errno, "ioctl(FS_IOC_FIEMAP)");
    if (fm->fm_mapped_extents == 0) break;
    bool last = false;
    uint64_t next = pos;
    for (uint32_t i = 0; i < fm->fm_mapped_extents; i++) {
      const struct fiemap_extent& e = fm->fm_extents[i];
      uint32_t flags = e.fe_flags;
      double physical = static_cast<double>(e.fe_physical);
      if (e.fe_physical + e.fe_length > static_cast<uint64_t>(kMaxSafe)) {
        flags |= FIEMAP_EXTENT_UNKNOWN;
        physical = 0;
      }
      out->push_back(static_cast<double>(e.fe_logical));
      out->push_back(physical);
      out->push_back(static_cast<double>(e.fe_length));
      out->push_back(static_cast<double>(flags));
      if (e.fe_logical + e.fe_length > next) next = e.fe_logical + e.fe_length;
      if (e.fe_flags & FIEMAP_EXTENT_LAST) last = true;
    }
    if (last || next <= pos) break;  // the end, or no progress: never loop forever
    pos = next;
  }
  return {};
}

struct FiemapJob {
  int fd;
  uint64_t offset;
  uint64_t length;
  std::vector<double> quads;
  SysError Run() { return Fiemap(fd, offset, length, &quads); }
  Napi::Value Result(Napi::Env env) {
    Napi::Float64Array arr = Napi::Float64Array::New(env, quads.size());
    if (env.IsExceptionPending()) return Napi::Value();
    if (!quads.empty()) memcpy(arr.Data(), quads.data(), quads.size() * sizeof(double));
    return arr;
  }
};

struct CopyRangeJob {
  int fdIn;
  uint64_t offIn;
  int fdOut;
  uint64_t offOut;
  uint64_t length;
  uint64_t copied = 0;
  SysError Run() { return CopyRange(fdIn, offIn, fdOut, offOut, length, &copied); }
  Napi::Value Result(Napi::Env env) { return Napi::Number::New(env, static_cast<double>(copied)); }
};

// ---------------------------------------------------------------------------------------------
// Argument parsing shared by the sync and async forms

bool ParsePread(const Napi::CallbackInfo& info, PreadJob* job) {
  return ArgFd(info, 0, "fd", &job->fd) && ArgBytes(info, 1, "buf", &job->buf) &&
         ArgU64(info, 2, "offset", &job->offset);
}

bool ParsePwrite(const Napi::CallbackInfo& info, PwriteJob* job) {
  return ArgFd(info, 0, "fd", &job->fd) && ArgBytes(info, 1, "buf", &job->buf) &&
         ArgU64(info, 2, "offset", &job->offset);
}

template <class Job>
bool ParseBatch(const Napi::CallbackInfo& info, Job* job) {
  return ArgFd(info, 0, "fd", &job->fd) && ArgBytes(info, 1, "buf", &job->buf) &&
         ArgRequests(info, 2, job->buf.length, &job->requests);
}

bool ParseFiemap(const Napi::CallbackInfo& info, FiemapJob* job) {
  if (!ArgFd(info, 0, "fd", &job->fd) || !ArgU64(info, 1, "offset", &job->offset) ||
      !ArgU64(info, 2, "length", &job->length))
    return false;
  if (job->offset + job->length > static_cast<uint64_t>(kMaxSafe)) {
    ThrowInvalid(info.Env(), "fiemap: offset + length is beyond 2^53");
    return false;
  }
  return true;
}

bool ParseCopyRange(const Napi::CallbackInfo& info, CopyRangeJob* job) {
  return ArgFd(info, 0, "fdIn", &job->fdIn) && ArgU64(info, 1, "offIn", &job->offIn) &&
         ArgFd(info, 2, "fdOut", &job->fdOut) && ArgU64(info, 3, "offOut", &job->offOut) &&
         ArgU64(info, 4, "length", &job->length);
}

// ---------------------------------------------------------------------------------------------
// open / close

constexpr int32_t kOpenWrite = 1, kOpenCreate = 2, kOpenExcl = 4, kOpenDirect = 8, kOpenTrunc = 16;

Napi::Value Open(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path;
  int32_t flags, mode;
  if (!ArgString(info, 0, "path", &path) || !ArgI32(info, 1, "flags", &flags) ||
      !ArgI32(info, 2, "mode", &mode))
    return Napi::Value();
  if (flags & ~(kOpenWrite | kOpenCreate | kOpenExcl | kOpenDirect | kOpenTrunc)) {
    ThrowInvalid(env, "open: unknown flag bits " + std::to_string(flags));
    return Napi::Value();
  }
  int oflags = O_CLOEXEC | ((flags & kOpenWrite) ? O_RDWR : O_RDONLY);
  if (flags & kOpenCreate) oflags |= O_CREAT;
  if (flags & kOpenExcl) oflags |= O_EXCL;
  if (flags & kOpenDirect) oflags |= O_DIRECT;
  if (flags & kOpenTrunc) oflags |= O_TRUNC;
  int fd;
  do {
    fd = ::open(path.c_str(), oflags, static_cast<mode_t>(mode));
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    Throw(env, SysError::Errno(errno, "open", path));
    return Napi::Value();
  }
  return Napi::Number::New(env, fd);
}

Napi::Value Close(const Napi::CallbackInfo& info) {
  int fd;
  if (!ArgFd(info, 0, "fd", &fd)) return Napi::Value();
  // On Linux the descriptor is released even when close() reports EINTR: never retry.
  if (::close(fd) < 0 && errno != EINTR) Throw(info.Env(), SysError::Errno(errno, "close"));
  return info.Env().Undefined();
}

// ---------------------------------------------------------------------------------------------
// Locks: open file description locks on QEMU's lock bytes.
//
// QEMU (block/file-posix.c) takes F_RDLCK on byte 100+bit for each permission it holds and on
// byte 200+bit for each permission it does not share (bit 0 consistent read, bit 1 write,
// ...), then tests with F_OFD_GETLK whether anyone else holds the opposite bytes.
//   LOCK_EXCLUSIVE  F_WRLCK on [100, 300): conflicts with every QEMU user and every disksnap lock.
//   LOCK_SHARED     F_RDLCK on 100 (consistent read held) and 201 (write not shared): readers
//                   coexist; a QEMU writer, which tests 201, and an exclusive lock are refused.
//                   Like QEMU we then test byte 101, so that a QEMU writer that got there first
//                   (it holds 101 with a read lock, which our read locks do not conflict with)
//                   is refused too.
//   LOCK_NONE       unlock [100, 300).
// A failed lock() leaves the descriptor without any lock on those bytes.

constexpr off_t kLockFirst = 100, kLockEnd = 300;
constexpr off_t kPermConsistentRead = 100, kPermWrite = 101, kSharedWrite = 201;

int OfdLock(int fd, short type, off_t start, off_t len) {
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_type = type;
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = len;
  int r;
  do {
    r = ::fcntl(fd, F_OFD_SETLK, &fl);
  } while (r < 0 && errno == EINTR);
  return r < 0 ? errno : 0;
}

// 0 and *held=true when another open file description holds a lock that conflicts with a
// write lock on [start, start+len).
int OfdTest(int fd, off_t start, off_t len, bool* held) {
  struct flock fl;
  memset(&fl, 0, sizeof fl);
  fl.l_type = F_WRLCK;
  fl.l_whence = SEEK_SET;
  fl.l_start = start;
  fl.l_len = len;
  int r;
  do {
    r = ::fcntl(fd, F_OFD_GETLK, &fl);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return errno;
  *held = fl.l_type != F_UNLCK;
  return 0;
}

SysError LockConflict(int errnum, const std::string& path, const char* wanted) {
  return SysError::Custom(
      "ELOCKED", errnum,
      "cannot take " + std::string(wanted) + " lock on '" + path +
          "': another process (disksnap or QEMU) holds a conflicting lock on it",
      path);
}

bool IsConflict(int e) { return e == EAGAIN || e == EACCES; }

SysError DoLock(int fd, int32_t mode, const std::string& path) {
  if (mode == 0) {
    int e = OfdLock(fd, F_UNLCK, kLockFirst, kLockEnd - kLockFirst);
    return e ? SysError::Errno(e, "fcntl(F_OFD_SETLK)", path) : SysError();
  }
  if (mode == 2) {
    int e = OfdLock(fd, F_WRLCK, kLockFirst, kLockEnd - kLockFirst);
    if (e == 0) return {};
    if (IsConflict(e)) return LockConflict(e, path, "an exclusive");
    if (e == EBADF && ::fcntl(fd, F_GETFL) >= 0)
      return SysError::Custom("EBADF", EBADF,
                              "cannot take an exclusive lock on '" + path +
                                  "': it is not open for writing",
                              path);
    return SysError::Errno(e, "fcntl(F_OFD_SETLK)", path);
  }
  // Shared. Setting read locks on bytes we hold with a write lock converts them, so this also
  // downgrades an exclusive lock.
  int e = OfdLock(fd, F_RDLCK, kPermConsistentRead, 1);
  if (e == 0) e = OfdLock(fd, F_RDLCK, kSharedWrite, 1);
  if (e == 0) e = OfdLock(fd, F_UNLCK, kPermConsistentRead + 1, kSharedWrite - kPermConsistentRead - 1);
  if (e == 0) e = OfdLock(fd, F_UNLCK, kSharedWrite + 1, kLockEnd - kSharedWrite - 1);
  bool writer = false;
  if (e == 0) e = OfdTest(fd, kPermWrite, 1, &writer);
  if (e == 0 && !writer) return {};
  OfdLock(fd, F_UNLCK, kLockFirst, kLockEnd - kLockFirst);
  if (writer) return LockConflict(EAGAIN, path, "a shared");
  if (IsConflict(e)) return LockConflict(e, path, "a shared");
  return SysError::Errno(e, "fcntl(F_OFD_SETLK)", path);
}

Napi::Value Lock(const Napi::CallbackInfo& info) {
  int fd;
  int32_t mode;
  std::string path;
  if (!ArgFd(info, 0, "fd", &fd) || !ArgI32(info, 1, "mode", &mode) ||
      !ArgString(info, 2, "path", &path))
    return Napi::Value();
  if (mode < 0 || mode > 2) {
    ThrowInvalid(info.Env(), "lock: unknown mode " + std::to_string(mode));
    return Napi::Value();
  }
  SysError err = DoLock(fd, mode, path);
  if (err.failed()) Throw(info.Env(), err);
  return info.Env().Undefined();
}

// ---------------------------------------------------------------------------------------------
// pread / pwrite, single and batched, sync and async

Napi::Value Pread(const Napi::CallbackInfo& info) {
  PreadJob job{};
  if (!ParsePread(info, &job)) return Napi::Value();
  return RunSync(info.Env(), job);
}

Napi::Value PreadAsync(const Napi::CallbackInfo& info) {
  PreadJob job{};
  if (!ParsePread(info, &job)) return RejectPending(info.Env());
  return RunAsync(info.Env(), "disksnap.pread", std::move(job), {info[1]});
}

Napi::Value Pwrite(const Napi::CallbackInfo& info) {
  PwriteJob job{};
  if (!ParsePwrite(info, &job)) return Napi::Value();
  return RunSync(info.Env(), job);
}

Napi::Value PwriteAsync(const Napi::CallbackInfo& info) {
  PwriteJob job{};
  if (!ParsePwrite(info, &job)) return RejectPending(info.Env());
  return RunAsync(info.Env(), "disksnap.pwrite", std::move(job), {info[1]});
}

Napi::Value PreadBatchSync(const Napi::CallbackInfo& info) {
  PreadBatchJob job{};
  if (!ParseBatch(info, &job)) return Napi::Value();
  return RunSync(info.Env(), job);
}

Napi::Value PreadBatchAsync(const Napi::CallbackInfo& info) {
  PreadBatchJob job{};
  if (!ParseBatch(info, &job)) return RejectPending(info.Env());
  return RunAsync(info.Env(), "disksnap.preadBatch", std::move(job), {info[1]});
}

Napi::Value PwriteBatchSync(const Napi::CallbackInfo& info) {
  PwriteBatchJob job{};
  if (!ParseBatch(info, &job)) return Napi::Value();
  return RunSync(info.Env(), job);
}

Napi::Value PwriteBatchAsync(const Napi::CallbackInfo& info) {
  PwriteBatchJob job{};
  if (!ParseBatch(info, &job)) return RejectPending(info.Env());
  return RunAsync(info.Env(), "disksnap.pwriteBatch", std::move(job), {info[1]});
}

// ---------------------------------------------------------------------------------------------
// fsync, fallocate, fstat, ftruncate

Napi::Value FsyncSync(const Napi::CallbackInfo& info) {
  FsyncJob job{};
  if (!ArgFd(info, 0, "fd", &job.fd) || !ArgBool(info, 1, "dataOnly", &job.dataOnly)) return Napi::Value();
  return RunSync(info.Env(), job);
}

Napi::Value FsyncAsync(const Napi::CallbackInfo& info) {
  FsyncJob job{};
  if (!ArgFd(info, 0, "fd", &job.fd) || !ArgBool(info, 1, "dataOnly", &job.dataOnly)) return RejectPending(info.Env());
  return RunAsync(info.Env(), "disksnap.fsync", std::move(job), {});
}

int Fallocate(int fd, int mode, uint64_t offset, uint64_t length) {
  int r;
  do {
    r = ::fallocate(fd, mode, static_cast<off_t>(offset), static_cast<off_t>(length));
  } while (r < 0 && errno == EINTR);
  return r < 0 ? errno : 0;
}

// Last resort of ZERO_RANGE where the filesystem can neither zero nor punch: write zeros.
SysError WriteZeros(int fd, uint64_t offset, uint64_t length) {
  constexpr size_t kChunk = size_t{1} << 20;
  std::unique_ptr<uint8_t, decltype(&free)> zeros(static_cast<uint8_t*>(calloc(1, kChunk)), &free);
  if (!zeros) return SysError::Errno(ENOMEM, "fallocate");
  for (uint64_t done = 0; done < length;) {
    size_t n = length - done < kChunk ? static_cast<size_t>(length - done) : kChunk;
    SysError err = PwriteFull(fd, zeros.get(), n, offset + done);
    if (err.failed()) return err;
    done += n;
  }
  return {};
}

constexpr int32_t kFallocAllocate = 0, kFallocPunchHole = 1, kFallocZeroRange = 2;

SysError DoFallocate(int fd, int32_t mode, uint64_t offset, uint64_t length) {
  if (mode == kFallocAllocate) {
    int e = Fallocate(fd, 0, offset, length);
    return e ? SysError::Errno(e, "fallocate") : SysError();
  }
  if (mode == kFallocPunchHole) {
    int e = Fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    return e ? SysError::Errno(e, "fallocate(PUNCH_HOLE)") : SysError();
  }
  // ZERO_RANGE. Block devices accept it only with KEEP_SIZE (and never plain allocation).
  struct stat st;
  if (::fstat(fd, &st) < 0) return SysError::Errno(errno, "fstat");
  bool blk = S_ISBLK(st.st_mode);
  int e = Fallocate(fd, FALLOC_FL_ZERO_RANGE | (blk ? FALLOC_FL_KEEP_SIZE : 0), offset, length);
  if (e == 0) return {};
  if (e != EOPNOTSUPP) return SysError::Errno(e, "fallocate(ZERO_RANGE)");
  e = Fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
  if (e == EOPNOTSUPP) return WriteZeros(fd, offset, length);
  if (e != 0) return SysError::Errno(e, "fallocate(PUNCH_HOLE)");
  if (blk) return {};
  // Punching left a hole; ZERO_RANGE semantics are "allocated and zero" (and the file grows
  // to cover the range, as ZERO_RANGE without KEEP_SIZE does).
  e = Fallocate(fd, 0, offset, length);
  if (e == 0 || e == EOPNOTSUPP) return {};
  return SysError::Errno(e, "fallocate");
}

Napi::Value FallocateSync(const Napi::CallbackInfo& info) {
  int fd;
  int32_t mode;
  uint64_t offset, length;
  if (!ArgFd(info, 0, "fd", &fd) || !ArgI32(info, 1, "mode", &mode) ||
      !ArgU64(info, 2, "offset", &offset) || !ArgU64(info, 3, "length", &length))
    return Napi::Value();
  if (mode < kFallocAllocate || mode > kFallocZeroRange) {
    ThrowInvalid(info.Env(), "fallocate: unknown mode " + std::to_string(mode));
    return Napi::Value();
  }
  if (length == 0) return info.Env().Undefined();  // the kernel says EINVAL; nothing to do
  SysError err = DoFallocate(fd, mode, offset, length);
  if (err.failed()) Throw(info.Env(), err);
  return info.Env().Undefined();
}

int64_t Nanos(const struct timespec& ts) {
  return static_cast<int64_t>(ts.tv_sec) * 1000000000LL + ts.tv_nsec;
}

// For a block device st_size is 0; its size comes from BLKGETSIZE64.
Napi::Value FstatSync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, "fd", &fd)) return Napi::Value();
  struct stat st;
  if (::fstat(fd, &st) < 0) {
    Throw(env, SysError::Errno(errno, "fstat"));
    return Napi::Value();
  }
  double size = static_cast<double>(st.st_size);
  if (S_ISBLK(st.st_mode)) {
    uint64_t bytes = 0;
    if (::ioctl(fd, BLKGETSIZE64, &bytes) < 0) {
      Throw(env, SysError::Errno(errno, "ioctl(BLKGETSIZE64)"));
      return Napi::Value();
    }
    size = static_cast<double>(bytes);
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("size", Napi::Number::New(env, size));
  o.Set("allocated", Napi::Number::New(env, static_cast<double>(st.st_blocks) * 512.0));
  o.Set("mtimeNs", Napi::BigInt::New(env, Nanos(st.st_mtim)));
  o.Set("ctimeNs", Napi::BigInt::New(env, Nanos(st.st_ctim)));
  o.Set("dev", Napi::Number::New(env, static_cast<double>(st.st_dev)));
  o.Set("ino", Napi::BigInt::New(env, static_cast<uint64_t>(st.st_ino)));
  o.Set("mode", Napi::Number::New(env, st.st_mode));
  o.Set("blockSize", Napi::Number::New(env, static_cast<double>(st.st_blksize)));
  o.Set("isBlockDevice", Napi::Boolean::New(env, S_ISBLK(st.st_mode)));
  o.Set("isRegular", Napi::Boolean::New(env, S_ISREG(st.st_mode)));
  return o;
}

Napi::Value FtruncateSync(const Napi::CallbackInfo& info) {
  int fd;
  uint64_t size;
  if (!ArgFd(info, 0, "fd", &fd) || !ArgU64(info, 1, "size", &size)) return Napi::Value();
  int r;
  do {
    r = ::ftruncate(fd, static_cast<off_t>(size));
  } while (r < 0 && errno == EINTR);
  if (r < 0) Throw(info.Env(), SysError::Errno(errno, "ftruncate"));
  return info.Env().Undefined();
}

// ---------------------------------------------------------------------------------------------
// extents: data ranges by SEEK_DATA / SEEK_HOLE, clipped to [offset, offset + length)

SysError Extents(int fd, uint64_t offset, uint64_t length, std::vector<double>* out) {
  const uint64_t end = offset + length;
  if (length == 0) return {};
  struct stat st;
  if (::fstat(fd, &st) < 0) return SysError::Errno(errno, "fstat");
  auto whole = [&](uint64_t limit) {
    uint64_t e = end < limit ? end : limit;
    if (e > offset) {
      out->push_back(static_cast<double>(offset));
      out->push_back(static_cast<double>(e - offset));
    }
  };
  if (!S_ISREG(st.st_mode)) {  // block devices (and anything else): all data
    whole(UINT64_MAX);
    return {};
  }
  uint64_t pos = offset;
  while (pos < end) {
    off_t data = ::lseek(fd, static_cast<off_t>(pos), SEEK_DATA);
    if (data < 0) {
      if (errno == ENXIO) break;  // no data at or after pos
      if (errno == EINVAL && pos == offset && out->empty()) {  // SEEK_DATA unsupported
        whole(static_cast<uint64_t>(st.st_size));
        return {};
      }
      return SysError::Errno(errno, "lseek(SEEK_DATA)");
    }
    if (static_cast<uint64_t>(data) >= end) break;
    off_t hole = ::lseek(fd, data, SEEK_HOLE);
    if (hole < 0) {
      if (errno == ENXIO) break;  // truncated under us
      return SysError::Errno(errno, "lseek(SEEK_HOLE)");
    }
    uint64_t s = static_cast<uint64_t>(data);
    uint64_t e = static_cast<uint64_t>(hole) < end ? static_cast<uint64_t>(hole) : end;
    if (e > s) {
      // SEEK_DATA may return a position before pos only on a broken filesystem; clip anyway.
      if (s < pos) s = pos;
      out->push_back(static_cast<double>(s));
      out->push_back(static_cast<double>(e - s));
    }
    if (static_cast<uint64_t>(hole) <= pos) break;  // no progress: never loop forever
    pos = static_cast<uint64_t>(hole);
  }
  return {};
}

Napi::Value ExtentsSync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  uint64_t offset, length;
  if (!ArgFd(info, 0, "fd", &fd) || !ArgU64(info, 1, "offset", &offset) ||
      !ArgU64(info, 2, "length", &length))
    return Napi::Value();
  if (offset + length > static_cast<uint64_t>(kMaxSafe)) {
    ThrowInvalid(env, "extents: offset + length is beyond 2^53");
    return Napi::Value();
  }
  std::vector<double> pairs;
  SysError err = Extents(fd, offset, length, &pairs);
  if (err.failed()) {
    Throw(env, err);
    return Napi::Value();
  }
  Napi::Float64Array arr = Napi::Float64Array::New(env, pairs.size());
  if (env.IsExceptionPending()) return Napi::Value();
  if (!pairs.empty()) memcpy(arr.Data(), pairs.data(), pairs.size() * sizeof(double));
  return arr;
}

Napi::Value FiemapSync(const Napi::CallbackInfo& info) {
  FiemapJob job{};
  if (!ParseFiemap(info, &job)) return Napi::Value();
  return RunSync(info.Env(), job);
}

Napi::Value FiemapAsync(const Napi::CallbackInfo& info) {
  FiemapJob job{};
  if (!ParseFiemap(info, &job)) return RejectPending(info.Env());
  return RunAsync(info.Env(), "disksnap.fiemap", std::move(job), {});
}

// ---------------------------------------------------------------------------------------------
// copy_file_range and reflinks

Napi::Value CopyRangeSync(const Napi::CallbackInfo& info) {
  CopyRangeJob job{};
  if (!ParseCopyRange(info, &job)) return Napi::Value();
  return RunSync(info.Env(), job);
}

Napi::Value CopyRangeAsync(const Napi::CallbackInfo& info) {
  CopyRangeJob job{};
  if (!ParseCopyRange(info, &job)) return RejectPending(info.Env());
  return RunAsync(info.Env(), "disksnap.copyRange", std::move(job), {});
}

// Whether a FICLONE/FICLONERANGE failure means "this filesystem (or this alignment) cannot
// share extents" rather than a real error. EBADF is also what some filesystems report for
// "no reflink support", so it counts only when both descriptors are open with usable modes.
bool CloneUnsupported(int e, int src, int dst) {
  if (e == EOPNOTSUPP || e == EXDEV || e == EINVAL || e == ENOTTY || e == ENOSYS) return true;
  if (e != EBADF) return false;
  int fs = ::fcntl(src, F_GETFL), fd = ::fcntl(dst, F_GETFL);
  if (fs < 0 || fd < 0) return false;
  if ((fs & O_ACCMODE) == O_WRONLY) return false;
  if ((fd & O_ACCMODE) == O_RDONLY || (fd & O_APPEND)) return false;
  return true;
}

Napi::Value Clone(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int src, dst;
  if (!ArgFd(info, 0, "fdSrc", &src) || !ArgFd(info, 1, "fdDst", &dst)) return Napi::Value();
  if (::ioctl(dst, FICLONE, src) == 0) return Napi::Boolean::New(env, true);
  int e = errno;
  if (CloneUnsupported(e, src, dst)) return Napi::Boolean::New(env, false);
  Throw(env, SysError::Errno(e, "ioctl(FICLONE)"));
  return Napi::Value();
}

Napi::Value CloneRange(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int src, dst;
  uint64_t srcOffset, dstOffset, length;
  if (!ArgFd(info, 0, "fdSrc", &src) || !ArgU64(info, 1, "srcOffset", &srcOffset) ||
      !ArgFd(info, 2, "fdDst", &dst) || !ArgU64(info, 3, "dstOffset", &dstOffset) ||
      !ArgU64(info, 4, "length", &length))
    return Napi::Value();
  struct file_clone_range range;
  range.src_fd = src;
  range.src_offset = srcOffset;
  range.src_length = length;
  range.dest_offset = dstOffset;
  if (::ioctl(dst, FICLONERANGE, &range) == 0) return Napi::Boolean::New(env, true);
  int e = errno;
  if (CloneUnsupported(e, src, dst)) return Napi::Boolean::New(env, false);
  Throw(env, SysError::Errno(e, "ioctl(FICLONERANGE)"));
  return Napi::Value();
}

// lstatDir(dir): the entries of a directory (not . or ..) with each one's st_mode and st_uid
// as lstat gives them (symbolic links are not followed): { names, modes, uids }. One call for
// what a readdir and an lstat per entry cost from JS (the store's trust check stats every
// record file: ~1,200 of them in a store of 300 snapshots). An entry removed between the
// readdir and its stat is left out; `dir` itself must not be a symbolic link (ENOTDIR).
Napi::Value LstatDir(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string dir;
  if (!ArgString(info, 0, "dir", &dir)) return Napi::Value();
  int fd;
  do {
    fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    Throw(env, SysError::Errno(errno, "open", dir));
    return Napi::Value();
  }
  DIR* d = ::fdopendir(fd);
  if (d == nullptr) {
    int e = errno;
    ::close(fd);
    Throw(env, SysError::Errno(e, "fdopendir", dir));
    return Napi::Value();
  }
  std::vector<std::string> names;
  std::vector<uint32_t> modes, uids;
  SysError err;
  for (;;) {
    errno = 0;
    struct dirent* e = ::readdir(d);
    if (e == nullptr) {
      if (errno != 0) err = SysError::Errno(errno, "readdir", dir);
      break;
    }
    if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
    struct stat st;
    if (::fstatat(fd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
      if (errno == ENOENT) continue;
      err = SysError::Errno(errno, "lstat", dir + "/" + e->d_name);
      break;
    }
    names.emplace_back(e->d_name);
    modes.push_back(st.st_mode);
    uids.push_back(st.st_uid);
  }
  ::closedir(d);  // closes fd
  if (err.failed()) {
    Throw(env, err);
    return Napi::Value();
  }
  Napi::Array jn = Napi::Array::New(env, names.size());
  Napi::Array jm = Napi::Array::New(env, names.size());
  Napi::Array ju = Napi::Array::New(env, names.size());
  for (size_t i = 0; i < names.size(); i++) {
    jn.Set(static_cast<uint32_t>(i), Napi::String::New(env, names[i]));
    jm.Set(static_cast<uint32_t>(i), Napi::Number::New(env, modes[i]));
    ju.Set(static_cast<uint32_t>(i), Napi::Number::New(env, uids[i]));
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("names", jn);
  o.Set("modes", jm);
  o.Set("uids", ju);
  return o;
}

// timestampTickNs() -> the resolution of CLOCK_REALTIME_COARSE in ns: the kernel stamps a
// file's mtime from that clock, so two writes one tick apart always differ in mtime (4 ms on a
// 250 Hz kernel, 10 ms at 100 Hz). 0 when the clock cannot be asked.
Napi::Value TimestampTickNs(const Napi::CallbackInfo& info) {
  struct timespec ts {};
  if (clock_getres(CLOCK_REALTIME_COARSE, &ts) != 0) return Napi::Number::New(info.Env(), 0);
  return Napi::Number::New(info.Env(), static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec));
}

// mtimeProbe(dir) -> how writes move a file's mtime on `dir`'s filesystem, probed on an unnamed
// O_TMPFILE there (nothing is left behind), or null where no such file can be made (no
// O_TMPFILE, no write permission): { dev: its st_dev, fine, wholeSeconds }.
//   fine: a write made right after an fstat always moved the mtime past what the fstat saw.
//     Linux 6.13 and later stamp such a write with a fine-grained time once the old one was
//     looked at ("multigrain" timestamps: ext4, xfs, btrfs, tmpfs); elsewhere writes within one
//     coarse tick share a time. Four fstat, 1-byte write, fstat rounds back to back,
//     microseconds apart: a coarse-clock filesystem leaves the mtime unmoved in at least one
//     of them (in all but ~1 in 10^9 probes on a 4 ms tick).
//   wholeSeconds: every mtime seen had no nanoseconds: the filesystem keeps times in seconds
//     (ext4 with 128-byte inodes, ext3, vfat), so a write up to a second or two after another
//     can get the same time.
Napi::Value MtimeProbe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string dir;
  if (!ArgString(info, 0, "dir", &dir)) return Napi::Value();
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd < 0) return env.Null();
  bool fine = true, whole = true, ok = true;
  struct stat a {}, b {};
  for (int i = 0; i < 4 && ok; i++) {
    const char byte = 0;
    ok = ::fstat(fd, &a) == 0 && ::pwrite(fd, &byte, 1, i) == 1 && ::fstat(fd, &b) == 0;
    fine = fine && ok && (a.st_mtim.tv_sec != b.st_mtim.tv_sec || a.st_mtim.tv_nsec != b.st_mtim.tv_nsec);
    whole = whole && a.st_mtim.tv_nsec == 0 && b.st_mtim.tv_nsec == 0;
  }
  ::close(fd);
  if (!ok) return env.Null();
  Napi::Object o = Napi::Object::New(env);
  o.Set("dev", Napi::Number::New(env, static_cast<double>(b.st_dev)));
  o.Set("fine", Napi::Boolean::New(env, fine));
  o.Set("wholeSeconds", Napi::Boolean::New(env, whole));
  return o;
}

}  // namespace

void InitFile(Napi::Env env, Napi::Object exports) {
  auto fn = [&](const char* name, Napi::Function::Callback cb) {
    exports.Set(name, Napi::Function::New(env, cb, name));
  };
  fn("open", Open);
  fn("close", Close);
  fn("lock", Lock);
  fn("pread", Pread);
  fn("pwrite", Pwrite);
  fn("preadAsync", PreadAsync);
  fn("pwriteAsync", PwriteAsync);
  fn("preadBatch", PreadBatchSync);
  fn("pwriteBatch", PwriteBatchSync);
  fn("preadBatchAsync", PreadBatchAsync);
  fn("pwriteBatchAsync", PwriteBatchAsync);
  fn("fsync", FsyncSync);
  fn("fsyncAsync", FsyncAsync);
  fn("fallocate", FallocateSync);
  fn("fstat", FstatSync);
  fn("lstatDir", LstatDir);
  fn("timestampTickNs", TimestampTickNs);
  fn("mtimeProbe", MtimeProbe);
  fn("ftruncate", FtruncateSync);
  fn("extents", ExtentsSync);
  fn("fiemap", FiemapSync);
  fn("fiemapAsync", FiemapAsync);
  fn("copyRange", CopyRangeSync);
  fn("copyRangeAsync", CopyRangeAsync);
  fn("clone", Clone);
  fn("cloneRange", CloneRange);
}

}  // namespace disksnap
