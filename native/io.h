// Plain syscall helpers: no JS values, so both the synchronous bindings and worker threads
// (AsyncWorker::Execute, hashing threads) use them. Each returns a SysError whose failed()
// is false on success.
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
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

}  // namespace disksnap
