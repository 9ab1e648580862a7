// Block hashing without JS: SHA-256 or HMAC-SHA-256 per block, all-zero detection, and the
// parallel drivers used by hashBlocks (memory) and hashFile (pread + hash).
//
// Model: a buffer (or file range) is cut into consecutive blocks of `blockSize` bytes, the last
// one possibly short. Block i gets 32 digest bytes at digests + 32*i and one byte zero[i]
// (1 when all its bytes are zero). Threads claim runs of blocks from an atomic counter, so a
// mix of cheap (zero) and expensive blocks still spreads evenly; each thread owns its
// hasher. The digest of an all-zero block of a given length is computed once per thread and
// reused. SHA-256 is our own SHA-NI code hashing two blocks at once where the CPU has the SHA
// extensions, else node's own OpenSSL 3 (see HashImplementation).
#pragma once

#include <sys/stat.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "block_tag.h"
#include "error.h"

namespace disksnap {

constexpr size_t kDigestLength = 32;

// Whether every byte of p[0..n) is zero: a 16-byte head check, then memcmp(p, p + 16, n - 16).
bool IsAllZero(const uint8_t* p, size_t n);

// threads <= 0 means "one per CPU"; capped at 64.
int ResolveThreads(int threads);

// Runs fn(0) .. fn(n-1), fn(0) on the calling thread and the others on threads of their own
// (StartOnThread); one that cannot be had runs its share inline after fn(0).
void ParallelFor(int n, const std::function<void(int)>& fn);

// Runs `task` on a thread of its own at once: a thread kept from an earlier task where one is
// idle, else a new one, kept for later tasks (for the process's life, blocked while idle).
// The same as a thread per task (every task has a thread at once, so tasks may wait for each
// other), without creating one each time. On success `task` is moved from; false (with `task`
// as it was) where no thread could be created.
bool StartOnThread(std::function<void()>& task);

// Which SHA-256 code the hashers use: "sha-ni-x2" (our own, two blocks at once with the x86
// SHA extensions) or "openssl" (node's OpenSSL, one block at a time; CPUs without SHA-NI, or
// DISKSNAP_HASH_IMPL=openssl in the environment).
const char* HashImplementation();

// One thread's hashing state. Not thread-safe; create one per thread.
class BlockHasher {
 public:
  explicit BlockHasher(const std::vector<uint8_t>* key);  // nullptr: plain SHA-256
  ~BlockHasher();
  BlockHasher(const BlockHasher&) = delete;
  BlockHasher& operator=(const BlockHasher&) = delete;

  bool ok() const { return ok_; }
  // The consecutive blocks of data[0..len) (the last possibly short): digests[32 * i] and
  // zero[i] for block i. Non-zero blocks are hashed two at a time where SHA-NI allows.
  // Returns false on an OpenSSL failure.
  bool Blocks(const uint8_t* data, size_t len, size_t blockSize, uint8_t* digests, uint8_t* zero);
  // The digest of each span of data (span i: offs[2 * i] bytes in, offs[2 * i + 1] long) at
  // digests[32 * i], with no zero check; two spans at a time where SHA-NI allows.
  bool Spans(const uint8_t* data, const size_t* offs, size_t n, uint8_t* digests);

 private:
  bool Digest(const uint8_t* p, size_t n, uint8_t* out);
  void Digest2(const uint8_t* pa, size_t na, uint8_t* outa, const uint8_t* pb, size_t nb,
               uint8_t* outb);
  void Finish(uint32_t h[8], const uint8_t* p, size_t n, size_t absorbed, uint8_t* out) const;
  // True (with the digest in out) when p[0..n) is all zero.
  bool ZeroBlock(const uint8_t* p, size_t n, uint8_t* out);

  bool ok_ = false;
  bool keyed_ = false;
  bool shani_ = false;
  bool zeroFailed_ = false;
  // SHA-NI: the state each block starts from (the IV, or HMAC's state after key ^ ipad), the
  // HMAC outer state after key ^ opad, and the bytes absorbed before the block (0 or 64).
  uint32_t init_[8];
  uint32_t outerState_[8] = {0};
  size_t prefix_ = 0;
  // OpenSSL fallback.
  void* ctx_ = nullptr;    // EVP_MD_CTX*
  void* inner_ = nullptr;  // HMAC: state after absorbing key ^ ipad
  void* outer_ = nullptr;  // HMAC: state after absorbing key ^ opad
  size_t zeroLen_ = SIZE_MAX;
  uint8_t zeroDigest_[kDigestLength];
};

// Hashes the blocks of data[0..len) on `threads` threads. With a tag key, also the unmasked
// change tag of each non-zero block (block_tag.h) at tags[16 * i]; zero blocks get 16 zeros.
// With `granules` too (granuleSize dividing blockSize): the zero flag and unmasked tag of each
// granule (granule j: bytes [j * granuleSize, ...) of data), and each block's tag combined
// from its granules' (FastGhash::Combine: one GHASH pass for both; two without VPCLMULQDQ).
struct GranuleOut {
  size_t granuleSize = 0;
  uint8_t* zero = nullptr;
  uint8_t* tags = nullptr;
};
//
// With `fill`, the bytes are not there yet: each thread calls fill(off, end) for the range
// [off, end) of data it is about to hash, and hashes it once it returns (a read into the
// buffer, run by the hashing threads: see ReadFill). Its first failure is the call's.
struct IoRequest;  // args.h
using RangeFill = std::function<SysError(size_t off, size_t end)>;
SysError HashBuffer(const uint8_t* data, size_t len, size_t blockSize, int threads,
                    const std::vector<uint8_t>* key, uint8_t* digests, uint8_t* zero,
                    const std::vector<uint8_t>* tagKey = nullptr, uint8_t* tags = nullptr,
                    const GranuleOut* granules = nullptr, const RangeFill* fill = nullptr);

// A RangeFill that reads requests `reqs` (file offset, buffer offset, length) of fd into buf,
// as PreadBatch does (zeros past the end of the file), each range's share when it is asked
// for: a request that crosses a range's edge is read in two parts. False (and no fill) where
// two requests overlap in the buffer: PreadBatch's order then decides which bytes stay, so
// the caller reads them all first, as before.
bool ReadFill(int fd, uint8_t* buf, const IoRequest* reqs, size_t n, RangeFill* out);

// The zero flag and unmasked change tag of each block of data[0..len) (no SHA-256): the
// tags of a buffer's 64 KiB granules, beside its blocks' (src/storage/store/tags.ts).
SysError TagBuffer(const uint8_t* data, size_t len, size_t blockSize, int threads,
                   const std::vector<uint8_t>& tagKey, uint8_t* zero, uint8_t* tags);

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
  uint8_t* digests = nullptr;  // nullptr: no SHA-256, tags only
  uint8_t* zero = nullptr;
  const std::vector<uint8_t>* tagKey = nullptr;  // with tags: unmasked change tags (block_tag.h)
  uint8_t* tags = nullptr;
  // tagFile's collect mode (with tags): each non-zero block whose tag is not expect[16 b] (or
  // whose known[b] is 0) is copied into collectBuf at slot * blockSize; slots are claimed in any
  // order, at most collectCap. slotOf[b] is the block's slot: -1 for a zero or unchanged block,
  // -2 for a changed block past the capacity (the caller reads it again). One read serves both
  // passes. The copies are not hashed here: the caller stores most changed blocks as pieces
  // (their granules' tags decide), so it hashes only the blocks it stores whole.
  const uint8_t* expect = nullptr;
  const uint8_t* known = nullptr;
  uint8_t* collectBuf = nullptr;
  size_t collectCap = 0;
  int32_t* slotOf = nullptr;
  // With a granuleSize: the zero flag and unmasked tag of each granule of each copy (granule s
  // of slot k at k * blockSize / granuleSize + s), taken from the copy, and its block's tag
  // combined from them; granules past a short block's end are zero.
  GranuleOut collectGranules;
  std::atomic<size_t> collected{0};
  std::atomic<uint64_t> done{0};
  std::atomic<bool> cancel{false};
};
// `tick` is called on the calling thread about every `tickMs` milliseconds while the worker
// threads run (the caller reports progress from it).
SysError HashFileRange(FileHashJob* job, int tickMs, const std::function<void()>& tick);

// What tagFile measured reading the file `st` names, in ns of CPU per MiB: mapped, then by
// pread (-1 each where not measured in this process). See ChooseReadWay in hash_engine.cc.
std::pair<int64_t, int64_t> TagReadCostsOf(const struct stat& st);

}  // namespace disksnap
