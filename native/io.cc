#include "io.h"

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include <cstdlib>
#include <memory>

namespace disksnap {

// Linux transfers at most 0x7ffff000 bytes per call; asking for less keeps the loop simple.
static constexpr size_t kMaxIo = size_t{1} << 30;

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

SysError PreadBatch(int fd, uint8_t* buf, const IoRequest* reqs, size_t n, uint64_t* total) {
  uint64_t sum = 0;
  for (size_t i = 0; i < n; i++) {
    const IoRequest& q = reqs[i];
    size_t got = 0;
    SysError err = PreadFull(fd, buf + q.bufferOffset, q.length, q.fileOffset, &got);
    if (err.failed()) {
      *total = sum;
      return err;
    }
    if (got < q.length) memset(buf + q.bufferOffset + got, 0, q.length - got);
    sum += got;
  }
  *total = sum;
  return {};
}

SysError PwriteBatch(int fd, const uint8_t* buf, const IoRequest* reqs, size_t n) {
  for (size_t i = 0; i < n; i++) {
    SysError err = PwriteFull(fd, buf + reqs[i].bufferOffset, reqs[i].length, reqs[i].fileOffset);
    if (err.failed()) return err;
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

}  // namespace disksnap
