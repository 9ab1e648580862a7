#include "hash_engine.h"

#include <errno.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>

#include "io.h"

namespace disksnap {

bool IsAllZero(const uint8_t* p, size_t n) {
  if (n < 16) {
    for (size_t i = 0; i < n; i++)
      if (p[i]) return false;
    return true;
  }
  static const uint8_t kZero16[16] = {0};
  return memcmp(p, kZero16, 16) == 0 && memcmp(p, p + 16, n - 16) == 0;
}

int ResolveThreads(int threads) {
  if (threads <= 0) {
    unsigned hw = std::thread::hardware_concurrency();
    threads = hw == 0 ? 1 : static_cast<int>(hw);
  }
  return std::min(threads, 64);
}

namespace {

struct ThreadArg {
  const std::function<void(int)>* fn;
  int index;
};

void* ThreadMain(void* p) {
  ThreadArg* a = static_cast<ThreadArg*>(p);
  (*a->fn)(a->index);
  return nullptr;
}

// EVP_MD for SHA-256, fetched once (an explicit fetch avoids a provider lookup per init).
const EVP_MD* Sha256() {
  static const EVP_MD* md = [] {
    EVP_MD* fetched = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    return fetched != nullptr ? static_cast<const EVP_MD*>(fetched) : EVP_sha256();
  }();
  return md;
}

}  // namespace

void ParallelFor(int n, const std::function<void(int)>& fn) {
  if (n <= 1) {
    fn(0);
    return;
  }
  std::vector<pthread_t> tids(n);
  std::vector<ThreadArg> args(n);
  std::vector<bool> started(n, false);
  for (int i = 1; i < n; i++) {
    args[i] = ThreadArg{&fn, i};
    started[i] = pthread_create(&tids[i], nullptr, ThreadMain, &args[i]) == 0;
  }
  fn(0);
  for (int i = 1; i < n; i++) {
    if (started[i])
      pthread_join(tids[i], nullptr);
    else
      fn(i);
  }
}

// ---------------------------------------------------------------------------------------------
// BlockHasher

BlockHasher::BlockHasher(const std::vector<uint8_t>* key) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  ctx_ = ctx;
  if (ctx == nullptr) return;
  if (key == nullptr) {
    ok_ = true;
    return;
  }
  // HMAC (RFC 2104) with the two padded-key states computed once: each block then costs one
  // context copy per pass instead of re-deriving the key schedule.
  keyed_ = true;
  constexpr size_t kBlock = 64;
  uint8_t k[kBlock] = {0};
  if (key->size() > kBlock) {
    unsigned int n = 0;
    if (EVP_Digest(key->data(), key->size(), k, &n, Sha256(), nullptr) != 1) return;
  } else if (!key->empty()) {
    memcpy(k, key->data(), key->size());
  }
  uint8_t ipad[kBlock], opad[kBlock];
  for (size_t i = 0; i < kBlock; i++) {
    ipad[i] = k[i] ^ 0x36;
    opad[i] = k[i] ^ 0x5c;
  }
  EVP_MD_CTX* inner = EVP_MD_CTX_new();
  EVP_MD_CTX* outer = EVP_MD_CTX_new();
  inner_ = inner;
  outer_ = outer;
  if (inner == nullptr || outer == nullptr) return;
  ok_ = EVP_DigestInit_ex2(inner, Sha256(), nullptr) == 1 &&
        EVP_DigestUpdate(inner, ipad, kBlock) == 1 &&
        EVP_DigestInit_ex2(outer, Sha256(), nullptr) == 1 &&
        EVP_DigestUpdate(outer, opad, kBlock) == 1;
  OPENSSL_cleanse(k, sizeof k);
  OPENSSL_cleanse(ipad, sizeof ipad);
  OPENSSL_cleanse(opad, sizeof opad);
}

BlockHasher::~BlockHasher() {
  EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(ctx_));
  EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(inner_));
  EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(outer_));
}

// Feeds p[0..n) to the digest in slices, prefetching the slice after next: data that is not
// in cache (a large buffer hashed once) otherwise stalls SHA-NI on every cache line, because
// the hash reads too slowly for the hardware prefetcher to run ahead (measured on a 64 MiB
// buffer: 1.15 GB/s without, 1.5 GB/s with; in-cache data is unaffected, ~1.8 GB/s).
static bool Update(EVP_MD_CTX* ctx, const uint8_t* p, size_t n) {
  constexpr size_t kSlice = 16 * 1024;
  constexpr size_t kAhead = 2 * kSlice;
  for (size_t off = 0; off < n; off += kSlice) {
    size_t from = off + kAhead, to = std::min(n, from + kSlice);
    // Locality 2 (into L2): measured best; the non-temporal hint (0) slowed in-cache data.
    for (size_t q = from; q < to; q += 64) __builtin_prefetch(p + q, 0, 2);
    if (EVP_DigestUpdate(ctx, p + off, std::min(kSlice, n - off)) != 1) return false;
  }
  return true;
}

bool BlockHasher::Digest(const uint8_t* p, size_t n, uint8_t* out) {
  EVP_MD_CTX* ctx = static_cast<EVP_MD_CTX*>(ctx_);
  unsigned int len = 0;
  if (!keyed_) {
    return EVP_DigestInit_ex2(ctx, Sha256(), nullptr) == 1 && Update(ctx, p, n) &&
           EVP_DigestFinal_ex(ctx, out, &len) == 1;
  }
  uint8_t inner[kDigestLength];
  return EVP_MD_CTX_copy_ex(ctx, static_cast<EVP_MD_CTX*>(inner_)) == 1 &&
         Update(ctx, p, n) && EVP_DigestFinal_ex(ctx, inner, &len) == 1 &&
         EVP_MD_CTX_copy_ex(ctx, static_cast<EVP_MD_CTX*>(outer_)) == 1 &&
         EVP_DigestUpdate(ctx, inner, kDigestLength) == 1 &&
         EVP_DigestFinal_ex(ctx, out, &len) == 1;
}

bool BlockHasher::Block(const uint8_t* p, size_t n, uint8_t* out, uint8_t* zero) {
  bool z = IsAllZero(p, n);
  *zero = z ? 1 : 0;
  if (z && n == zeroLen_) {
    memcpy(out, zeroDigest_, kDigestLength);
    return true;
  }
  if (!Digest(p, n, out)) return false;
  if (z) {
    zeroLen_ = n;
    memcpy(zeroDigest_, out, kDigestLength);
  }
  return true;
}

// ---------------------------------------------------------------------------------------------
// Drivers

static SysError CryptoFailure() {
  return SysError::Custom("ECRYPTO", 0, "SHA-256 failed inside OpenSSL");
}

SysError HashBuffer(const uint8_t* data, size_t len, size_t blockSize, int threads,
                    const std::vector<uint8_t>* key, uint8_t* digests, uint8_t* zero) {
  const size_t nblocks = len == 0 ? 0 : (len - 1) / blockSize + 1;
  if (nblocks == 0) return {};
  // Claim about 1 MiB per grab, and start no more threads than there are grabs.
  const size_t run = std::max<size_t>(1, (size_t{1} << 20) / blockSize);
  const size_t runs = (nblocks + run - 1) / run;
  int nthreads = static_cast<int>(std::min<size_t>(ResolveThreads(threads), runs));

  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  ParallelFor(nthreads, [&](int) {
    BlockHasher hasher(key);
    if (!hasher.ok()) {
      failed = true;
      return;
    }
    for (;;) {
      size_t first = next.fetch_add(run, std::memory_order_relaxed);
      if (first >= nblocks || failed.load(std::memory_order_relaxed)) return;
      size_t last = std::min(nblocks, first + run);
      for (size_t b = first; b < last; b++) {
        size_t off = b * blockSize;
        size_t n = std::min(blockSize, len - off);
        if (!hasher.Block(data + off, n, digests + b * kDigestLength, zero + b)) {
          failed = true;
          return;
        }
      }
    }
  });
  return failed ? CryptoFailure() : SysError();
}

SysError HashFileRange(FileHashJob* job, int tickMs, const std::function<void()>& tick) {
  const uint64_t length = job->length;
  const size_t bs = job->blockSize;
  const uint64_t nblocks = length == 0 ? 0 : (length - 1) / bs + 1;
  if (nblocks == 0) return {};
  // Chunks of whole blocks, about 4 MiB: big enough that pread cost is amortised, small
  // enough that every thread has work and progress moves.
  const size_t chunkBlocks = std::max<size_t>(1, (size_t{4} << 20) / bs);
  const uint64_t chunk = static_cast<uint64_t>(chunkBlocks) * bs;
  const uint64_t nchunks = (length + chunk - 1) / chunk;
  const int nthreads = static_cast<int>(std::min<uint64_t>(ResolveThreads(job->threads), nchunks));

  struct stat st;
  if (::fstat(job->fd, &st) < 0) return SysError::Errno(errno, "fstat");
  std::atomic<bool> seekData{S_ISREG(st.st_mode)};

  std::atomic<uint64_t> next{0};
  std::mutex mu;
  std::condition_variable cv;
  int running = nthreads;
  SysError firstError;

  auto fail = [&](SysError e) {
    std::lock_guard<std::mutex> lock(mu);
    if (!firstError.failed()) firstError = std::move(e);
    job->cancel = true;
  };

  auto worker = [&](int) {
    std::unique_ptr<uint8_t, decltype(&free)> buf(static_cast<uint8_t*>(malloc(chunk)), &free);
    BlockHasher hasher(job->key);
    if (!buf) {
      fail(SysError::Errno(ENOMEM, "hashFile"));
    } else if (!hasher.ok()) {
      fail(CryptoFailure());
    } else {
      for (;;) {
        uint64_t c = next.fetch_add(1, std::memory_order_relaxed);
        if (c >= nchunks || job->cancel.load(std::memory_order_relaxed)) break;
        uint64_t rel = c * chunk;
        size_t want = static_cast<size_t>(std::min<uint64_t>(chunk, length - rel));
        uint64_t at = job->offset + rel;
        bool hole = false;
        if (seekData.load(std::memory_order_relaxed)) {
          // A chunk with no data in it reads as zeros: skip the read.
          off_t d = ::lseek(job->fd, static_cast<off_t>(at), SEEK_DATA);
          if (d < 0 && errno == ENXIO)
            hole = true;
          else if (d < 0)
            seekData = false;
          else
            hole = static_cast<uint64_t>(d) >= at + want;
        }
        size_t got = 0;
        if (!hole) {
          SysError err = PreadFull(job->fd, buf.get(), want, at, &got);
          if (err.failed()) {
            fail(std::move(err));
            break;
          }
        }
        if (got < want) memset(buf.get() + got, 0, want - got);
        uint64_t firstBlock = rel / bs;
        bool ok = true;
        for (size_t off = 0; off < want && ok; off += bs) {
          uint64_t b = firstBlock + off / bs;
          size_t n = std::min(bs, want - off);
          ok = hasher.Block(buf.get() + off, n, job->digests + b * kDigestLength, job->zero + b);
        }
        if (!ok) {
          fail(CryptoFailure());
          break;
        }
        job->done.fetch_add(want, std::memory_order_relaxed);
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    if (--running == 0) cv.notify_all();
  };

  // The calling thread only coordinates: it reports progress while the workers run.
  std::vector<pthread_t> tids;
  std::function<void(int)> fn = worker;
  std::vector<ThreadArg> args(nthreads);
  int inlineRuns = 0;
  for (int i = 0; i < nthreads; i++) {
    pthread_t t;
    args[i] = ThreadArg{&fn, i};
    if (pthread_create(&t, nullptr, ThreadMain, &args[i]) == 0)
      tids.push_back(t);
    else
      inlineRuns++;
  }
  if (tids.empty()) {
    for (int i = 0; i < inlineRuns; i++) worker(i);
  } else {
    {
      std::lock_guard<std::mutex> lock(mu);
      running -= inlineRuns;  // threads that could not start; the others cover their chunks
    }
    std::unique_lock<std::mutex> lock(mu);
    while (running > 0) {
      cv.wait_for(lock, std::chrono::milliseconds(tickMs));
      if (running > 0 && tick) {
        lock.unlock();
        tick();
        lock.lock();
      }
    }
  }
  for (pthread_t t : tids) pthread_join(t, nullptr);
  return firstError;
}

}  // namespace disksnap
