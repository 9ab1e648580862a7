#include "io.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

namespace disksnap {

// Linux transfers at most 0x7ffff000 bytes per call; asking for less keeps the loop simple.
static constexpr size_t kMaxIo = size_t{1} << 30;

int OpenAtRetry(int dirfd, const char* path, int flags, mode_t mode) {
  int fd;
  do {
    fd = ::openat(dirfd, path, flags, mode);
  } while (fd < 0 && errno == EINTR);
  return fd;
}

SysError PreadFull(int fd, uint8_t* buf, size_t len, uint64_t off, size_t* got) {
  size_t done = 0;
  while (done < len) {
    size_t want = len - done < kMaxIo ? len - done : kMaxIo;
    ssize_t r = ::pread(fd, buf + done, want, static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      *got = done;
      return SysError::Errno(errno, "pread");
    }
    if (r == 0) break;  // EOF
    done += static_cast<size_t>(r);
  }
  *got = done;
  return {};
}

SysError PwriteFull(int fd, const uint8_t* buf, size_t len, uint64_t off) {
  size_t done = 0;
  while (done < len) {
    size_t want = len - done < kMaxIo ? len - done : kMaxIo;
    ssize_t r = ::pwrite(fd, buf + done, want, static_cast<off_t>(off + done));
    if (r < 0) {
      if (errno == EINTR) continue;
      return SysError::Errno(errno, "pwrite");
    }
    // A regular file or block device never accepts 0 bytes of a non-empty write unless it is
    // out of space; do not spin.
    if (r == 0) return SysError::Errno(ENOSPC, "pwrite");
    done += static_cast<size_t>(r);
  }
  return {};
}

// Requests whose file ranges follow one another (the next starts where the previous ended)
// are merged into one preadv/pwritev: one syscall instead of one per request. Returns how many
// requests from `i` on form such a run (at most IOV_MAX, and kMaxIo bytes in all).
static size_t RunLength(const IoRequest* reqs, size_t i, size_t n, size_t* bytes) {
  size_t sum = reqs[i].length;
  uint64_t end = reqs[i].fileOffset + reqs[i].length;
  size_t j = i + 1;
  while (j < n && j - i < IOV_MAX && reqs[j].fileOffset == end && sum + reqs[j].length <= kMaxIo) {
    sum += reqs[j].length;
    end += reqs[j].length;
    j++;
  }
  *bytes = sum;
  return j - i;
}

template <class Buf>
static void FillIov(std::vector<struct iovec>* iov, Buf* buf, const IoRequest* reqs, size_t k) {
  iov->resize(k);
  for (size_t j = 0; j < k; j++) {
    (*iov)[j].iov_base = const_cast<uint8_t*>(buf + reqs[j].bufferOffset);
    (*iov)[j].iov_len = reqs[j].length;
  }
}

static SysError PreadOne(int fd, uint8_t* buf, const IoRequest& q, uint64_t* sum) {
  size_t got = 0;
  SysError err = PreadFull(fd, buf + q.bufferOffset, q.length, q.fileOffset, &got);
  if (err.failed()) return err;
  if (got < q.length) memset(buf + q.bufferOffset + got, 0, q.length - got);
  *sum += got;
  return {};
}

SysError PreadBatch(int fd, uint8_t* buf, const IoRequest* reqs, size_t n, uint64_t* total) {
  uint64_t sum = 0;
  std::vector<struct iovec> iov;
  for (size_t i = 0; i < n;) {
    size_t bytes = 0;
    size_t k = RunLength(reqs, i, n, &bytes);
    if (k > 1) {
      FillIov(&iov, buf, reqs + i, k);
      ssize_t r;
      do {
        r = ::preadv(fd, iov.data(), static_cast<int>(k), static_cast<off_t>(reqs[i].fileOffset));
      } while (r < 0 && errno == EINTR);
      if (r < 0) {
        *total = sum;
        return SysError::Errno(errno, "preadv");
      }
      if (static_cast<size_t>(r) == bytes) {
        sum += bytes;
        i += k;
        continue;
      }
      // Short (EOF, or a partial transfer): redo this run request by request, which loops
      // and zero-fills precisely. Reading the same bytes twice is harmless.
    }
    for (size_t j = i; j < i + k; j++) {
      SysError err = PreadOne(fd, buf, reqs[j], &sum);
      if (err.failed()) {
        *total = sum;
        return err;
      }
    }
    i += k;
  }
  *total = sum;
  return {};
}

SysError PwriteBatch(int fd, const uint8_t* buf, const IoRequest* reqs, size_t n) {
  std::vector<struct iovec> iov;
  for (size_t i = 0; i < n;) {
    size_t bytes = 0;
    size_t k = RunLength(reqs, i, n, &bytes);
    size_t written = 0;  // bytes of this run already on file
    if (k > 1) {
      FillIov(&iov, buf, reqs + i, k);
      ssize_t r;
      do {
        r = ::pwritev(fd, iov.data(), static_cast<int>(k), static_cast<off_t>(reqs[i].fileOffset));
      } while (r < 0 && errno == EINTR);
      if (r < 0) return SysError::Errno(errno, "pwritev");
      written = static_cast<size_t>(r);
    }
    // The rest of the run (all of it for a single request), request by request.
    for (size_t j = i; j < i + k; j++) {
      const IoRequest& q = reqs[j];
      if (written >= q.length) {
        written -= q.length;
        continue;
      }
      SysError err = PwriteFull(fd, buf + q.bufferOffset + written, q.length - written,
                                q.fileOffset + written);
      if (err.failed()) return err;
      written = 0;
    }
    i += k;
  }
  return {};
}

SysError Fsync(int fd, bool dataOnly) {
  int r;
  do {
    r = dataOnly ? ::fdatasync(fd) : ::fsync(fd);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return SysError::Errno(errno, dataOnly ? "fdatasync" : "fsync");
  return {};
}

static SysError CopyByReadWrite(int fdIn, uint64_t offIn, int fdOut, uint64_t offOut,
                                uint64_t len, uint64_t* copied) {
  constexpr size_t kChunk = size_t{1} << 20;
  std::unique_ptr<uint8_t, decltype(&free)> buf(static_cast<uint8_t*>(malloc(kChunk)), &free);
  if (!buf) return SysError::Errno(ENOMEM, "copy_file_range");
  uint64_t done = 0;
  while (done < len) {
    size_t want = len - done < kChunk ? static_cast<size_t>(len - done) : kChunk;
    size_t got = 0;
    SysError err = PreadFull(fdIn, buf.get(), want, offIn + done, &got);
    if (err.failed()) {
      *copied = done;
      return err;
    }
    if (got > 0) {
      err = PwriteFull(fdOut, buf.get(), got, offOut + done);
      if (err.failed()) {
        *copied = done;
        return err;
      }
    }
    done += got;
    if (got < want) break;  // EOF of fdIn
  }
  *copied = done;
  return {};
}

SysError CopyRange(int fdIn, uint64_t offIn, int fdOut, uint64_t offOut, uint64_t len,
                   uint64_t* copied) {
  uint64_t done = 0;
  while (done < len) {
    loff_t in = static_cast<loff_t>(offIn + done);
    loff_t out = static_cast<loff_t>(offOut + done);
    size_t want = len - done < kMaxIo ? static_cast<size_t>(len - done) : kMaxIo;
    ssize_t r = ::copy_file_range(fdIn, &in, fdOut, &out, want, 0);
    if (r < 0) {
      int e = errno;
      if (e == EINTR) continue;
      if (e == EXDEV || e == EINVAL || e == ENOSYS || e == EOPNOTSUPP) {
        uint64_t rest = 0;
        SysError err = CopyByReadWrite(fdIn, offIn + done, fdOut, offOut + done, len - done, &rest);
        *copied = done + rest;
        return err;
      }
      *copied = done;
      return SysError::Errno(e, "copy_file_range");
    }
    if (r == 0) break;  // EOF of fdIn
    done += static_cast<uint64_t>(r);
  }
  *copied = done;
  return {};
}

FileMapping::FileMapping(int fd, uint64_t offset, uint64_t length) {
  if (fd < 0 || length == 0) return;
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  start_ = offset / page * page;
  size_ = static_cast<size_t>(offset + length - start_);
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, static_cast<off_t>(start_));
  if (p != MAP_FAILED) base_ = static_cast<uint8_t*>(p);
}

FileMapping::~FileMapping() {
  if (base_ != nullptr) ::munmap(base_, size_);
}

namespace {

thread_local sigjmp_buf* t_guard = nullptr;
struct sigaction g_before;

void OnSigbus(int, siginfo_t*, void*) {
  sigjmp_buf* g = t_guard;
  if (g != nullptr) siglongjmp(*g, 1);
  // Not a guarded read: the disposition from before takes the fault when the access repeats.
  ::sigaction(SIGBUS, &g_before, nullptr);
}

}  // namespace

bool GuardedRead(const std::function<void()>& fn) {
  static std::once_flag installed;
  std::call_once(installed, [] {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = OnSigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;  // not blocked in the handler: no mask to restore
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGBUS, &sa, &g_before);
  });
  sigjmp_buf jb;
  if (sigsetjmp(jb, 0) != 0) {
    t_guard = nullptr;
    return false;
  }
  t_guard = &jb;
  fn();
  t_guard = nullptr;
  return true;
}

}  // namespace disksnap
