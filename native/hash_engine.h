// Block hashing without JS: SHA-256 or HMAC-SHA-256 per block, all-zero detection, and the
// parallel drivers used by hashBlocks (memory) and hashFile (pread + hash).
//
// Model: a buffer (or file range) is cut into consecutive blocks of `blockSize` bytes, the last
// one possibly short. Block i gets 32 digest bytes at digests + 32*i and one byte zero[i]
// (1 when all its bytes are zero). Threads claim runs of blocks from an atomic counter, so a
// mix of cheap (zero) and expensive blocks still spreads evenly; each thread owns its OpenSSL
// context. The digest of an all-zero block of a given length is computed once per thread and
// reused. SHA-256 comes from node's own OpenSSL 3 (SHA-NI / AVX2 code paths included).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "error.h"

namespace disksnap {

constexpr size_t kDigestLength = 32;

// Whether every byte of p[0..n) is zero: a 16-byte head check, then memcmp(p, p + 16, n - 16).
bool IsAllZero(const uint8_t* p, size_t n);

// threads <= 0 means "one per CPU"; capped at 64.
int ResolveThreads(int threads);

// Runs fn(0) .. fn(n-1), fn(0) on the calling thread and the others on new threads; a thread
// that cannot be created runs its share inline after fn(0).
void ParallelFor(int n, const std::function<void(int)>& fn);

// One thread's hashing state. Not thread-safe; create one per thread.
class BlockHasher {
 public:
  explicit BlockHasher(const std::vector<uint8_t>* key);  // nullptr: plain SHA-256
  ~BlockHasher();
  BlockHasher(const BlockHasher&) = delete;
  BlockHasher& operator=(const BlockHasher&) = delete;

  bool ok() const { return ok_; }
  // Digest of p[0..n) into out[32]; sets *zero. Returns false on an OpenSSL failure.
  bool Block(const uint8_t* p, size_t n, uint8_t* out, uint8_t* zero);

 private:
  bool Digest(const uint8_t* p, size_t n, uint8_t* out);

  bool ok_ = false;
  bool keyed_ = false;
  void* ctx_ = nullptr;    // EVP_MD_CTX*
  void* inner_ = nullptr;  // HMAC: state after absorbing key ^ ipad
  void* outer_ = nullptr;  // HMAC: state after absorbing key ^ opad
  size_t zeroLen_ = SIZE_MAX;
  uint8_t zeroDigest_[kDigestLength];
};

// Hashes the blocks of data[0..len) on `threads` threads.
SysError HashBuffer(const uint8_t* data, size_t len, size_t blockSize, int threads,
                    const std::vector<uint8_t>* key, uint8_t* digests, uint8_t* zero);

// Reads [offset, offset+length) of fd in chunks of several MiB and hashes them on `threads`
// threads; bytes past EOF hash as zeros, and chunks that SEEK_DATA reports as holes are not
// read at all. `done` counts bytes hashed; setting `cancel` stops the workers early.
struct FileHashJob {
  int fd = -1;
  uint64_t offset = 0;
  uint64_t length = 0;
  size_t blockSize = 0;
  int threads = 1;
  const std::vector<uint8_t>* key = nullptr;
  uint8_t* digests = nullptr;
  uint8_t* zero = nullptr;
  std::atomic<uint64_t> done{0};
  std::atomic<bool> cancel{false};
};
// `tick` is called on the calling thread about every `tickMs` milliseconds while the worker
// threads run (the caller reports progress from it).
SysError HashFileRange(FileHashJob* job, int tickMs, const std::function<void()>& tick);

}  // namespace disksnap
