// Plain syscall helpers: no JS values, so both the synchronous bindings and worker threads
// (AsyncWorker::Execute, hashing threads) use them. Each returns a SysError whose failed()
// is false on success.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

#include "args.h"
#include "error.h"

namespace disksnap {

// openat(dirfd, path, flags, mode), retried on EINTR (AT_FDCWD for a plain open); -1 with errno set.
int OpenAtRetry(int dirfd, const char* path, int flags, mode_t mode = 0);

// Reads up to `len` bytes at `off`, looping over short reads and EINTR; `*got` < len only at EOF.
SysError PreadFull(int fd, uint8_t* buf, size_t len, uint64_t off, size_t* got);
// Writes all `len` bytes at `off`, looping over short writes and EINTR.
SysError PwriteFull(int fd, const uint8_t* buf, size_t len, uint64_t off);

// Executes the requests in order. Reads: bytes past EOF are zero-filled; `*total` is the number
// of bytes actually read from the file.
SysError PreadBatch(int fd, uint8_t* buf, const IoRequest* reqs, size_t n, uint64_t* total);
SysError PwriteBatch(int fd, const uint8_t* buf, const IoRequest* reqs, size_t n);

SysError Fsync(int fd, bool dataOnly);

// copy_file_range in a loop, falling back to pread/pwrite (1 MiB buffer) where the kernel or
// the filesystem cannot (EXDEV, EINVAL, ENOSYS, EOPNOTSUPP). `*copied` < len only at EOF of fdIn.
SysError CopyRange(int fdIn, uint64_t offIn, int fdOut, uint64_t offOut, uint64_t len,
                   uint64_t* copied);

// A read-only shared mapping of bytes [offset, offset + length) of a file, for reading them in
// place instead of copying them out of the page cache with pread. On these VMs (kernel 6.18,
// ext4 with large folios) touching 1 GiB of a cached file through a mapping costs ~4 ms of
// faults, where pread copies it in ~130 ms; a scan that only reads (hashes, tags) then does
// half the memory traffic (1 GiB read and xor-summed: 135 ms through pread, 79 ms mapped).
// Empty (false) where mmap refuses (the caller preads). A page past the file's end raises
// SIGBUS: read it only through GuardedRead.
class FileMapping {
 public:
  FileMapping(int fd, uint64_t offset, uint64_t length);
  ~FileMapping();
  FileMapping(const FileMapping&) = delete;
  FileMapping& operator=(const FileMapping&) = delete;
  explicit operator bool() const { return base_ != nullptr; }
  // The byte at file offset `off` (inside the mapped range).
  const uint8_t* at(uint64_t off) const { return base_ + (off - start_); }

 private:
  uint8_t* base_ = nullptr;
  uint64_t start_ = 0;  // file offset of base_ (page aligned)
  size_t size_ = 0;
};

// Runs fn() and returns true; false where a SIGBUS interrupted it (a mapped page past the end
// of a file that shrank while it was read): fn was abandoned halfway, so it must hold no lock
// and allocate nothing, and what it wrote is incomplete. A SIGBUS outside GuardedRead goes to
// the disposition the process had before (the default: the process ends, as without this).
bool GuardedRead(const std::function<void()>& fn);

}  // namespace disksnap
