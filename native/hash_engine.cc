#include "hash_engine.h"

#include <cpuid.h>
#include <errno.h>
#include <immintrin.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

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

// EVP_MD for SHA-256, fetched once (an explicit fetch avoids a provider lookup per init).
const EVP_MD* Sha256() {
  static const EVP_MD* md = [] {
    EVP_MD* fetched = EVP_MD_fetch(nullptr, "SHA256", nullptr);
    return fetched != nullptr ? static_cast<const EVP_MD*>(fetched) : EVP_sha256();
  }();
  return md;
}

}  // namespace

// The threads behind StartOnThread. Every parallel job (a hash or tag pass, a batch of object
// writes or directory fsyncs) ran on threads created for it and joined after it: a 1% raw
// incremental created 72 threads (16 tagFile calls of two, their chunks' SHA-256 jobs, the
// writes), a scattered qcow2 one 58, each a clone, a stack and a join on the way, and on these
// VMs with another process busy a thread took ~0.6-1 ms to create and join instead of ~0.03.
// The cache is never destroyed: at exit its idle threads are still blocked on it.
namespace {

struct ThreadCache {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> tasks;
  int waiting = 0;   // threads blocked in the wait below
  int starting = 0;  // threads created that have not reached it yet
};

ThreadCache& Cache() {
  static ThreadCache* cache = new ThreadCache();
  return *cache;
}

void* CacheThread(void*) {
  ThreadCache& c = Cache();
  std::unique_lock<std::mutex> lock(c.mu);
  c.starting--;
  for (;;) {
    c.waiting++;
    c.cv.wait(lock, [&] { return !c.tasks.empty(); });
    c.waiting--;
    std::function<void()> task = std::move(c.tasks.front());
    c.tasks.pop_front();
    lock.unlock();
    task();
    task = nullptr;  // its captures go before the thread counts as idle
    lock.lock();
  }
  return nullptr;
}

}  // namespace

bool StartOnThread(std::function<void()>& task) {
  ThreadCache& c = Cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.tasks.push_back(std::move(task));
  // Every queued task has a thread: an idle one (or one on its way to idle), else a new one.
  if (c.waiting + c.starting < static_cast<int>(c.tasks.size())) {
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    const int rc = pthread_create(&t, &attr, CacheThread, nullptr);
    pthread_attr_destroy(&attr);
    if (rc != 0) {
      task = std::move(c.tasks.back());  // ours: pushed under this lock
      c.tasks.pop_back();
      return false;
    }
    c.starting++;
  }
  c.cv.notify_one();
  return true;
}

void ParallelFor(int n, const std::function<void(int)>& fn) {
  if (n <= 1) {
    fn(0);
    return;
  }
  // Done when `left` is 0: each task's last touch of this frame is under `mu`, so once the
  // wait below sees 0 no task uses it any more.
  std::mutex mu;
  std::condition_variable cv;
  int left = 0;
  std::vector<int> inlineRuns;
  for (int i = 1; i < n; i++) {
    std::function<void()> task = [&fn, &mu, &cv, &left, i] {
      fn(i);
      std::lock_guard<std::mutex> lock(mu);
      if (--left == 0) cv.notify_all();
    };
    {
      std::lock_guard<std::mutex> lock(mu);
      left++;
    }
    if (!StartOnThread(task)) {
      std::lock_guard<std::mutex> lock(mu);
      left--;
      inlineRuns.push_back(i);
    }
  }
  fn(0);
  for (int i : inlineRuns) fn(i);
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return left == 0; });
}

// ---------------------------------------------------------------------------------------------
// SHA-256 with the x86 SHA extensions, one or two streams at a time
//
// Written from the instruction definitions (Intel SDM: SHA256RNDS2, SHA256MSG1, SHA256MSG2) and
// FIPS 180-4. Why not OpenSSL's SHA-NI code: it runs one message at a time, so every
// SHA256RNDS2 waits for the previous one (a chain of 32 per 64-byte chunk, latency-bound at
// ~1.9 GB/s here). Our blocks are independent messages, so two of them are compressed
// interleaved and the core's RNDS2 throughput becomes the limit (~2.4 GB/s per thread
// measured on this Xeon; three or four streams gain nothing more).

namespace {

#define DISKSNAP_SHANI __attribute__((target("sha,sse4.1,ssse3")))

alignas(16) const uint32_t kRoundK[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

const uint32_t kSha256Iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                               0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

// The eight state words in the two registers SHA256RNDS2 works on, dword 0 first:
// abef = {F, E, B, A}, cdgh = {H, G, D, C}.
struct Lanes {
  __m128i abef, cdgh;
};

DISKSNAP_SHANI inline Lanes LoadState(const uint32_t h[8]) {
  __m128i x = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)), 0xB1);  // B A D C
  __m128i y = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + 4)), 0x1B);  // H G F E
  return Lanes{_mm_alignr_epi8(x, y, 8), _mm_blend_epi16(y, x, 0xF0)};
}

DISKSNAP_SHANI inline void StoreState(const Lanes& s, uint32_t h[8]) {
  __m128i x = _mm_shuffle_epi32(s.abef, 0x1B);  // A B E F
  __m128i y = _mm_shuffle_epi32(s.cdgh, 0xB1);  // G H C D
  _mm_storeu_si128(reinterpret_cast<__m128i*>(h), _mm_blend_epi16(x, y, 0xF0));  // A B C D
  _mm_storeu_si128(reinterpret_cast<__m128i*>(h + 4), _mm_alignr_epi8(y, x, 8));  // E F G H
}

// Message words 4 at a time, big-endian.
DISKSNAP_SHANI inline __m128i LoadWords(const uint8_t* p) {
  const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
  return _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), bswap);
}

// W[4q .. 4q+3] (q >= 4) from the four previous quads W[4q-16 ..], W[4q-12 ..], W[4q-8 ..],
// W[4q-4 ..]: MSG1 adds sigma0(W[t-15]) to W[t-16], the align supplies W[t-7], MSG2 adds
// sigma1(W[t-2]) (including the words it produces itself).
DISKSNAP_SHANI inline __m128i Schedule(__m128i m0, __m128i m1, __m128i m2, __m128i m3) {
  __m128i t = _mm_add_epi32(_mm_sha256msg1_epu32(m0, m1), _mm_alignr_epi8(m3, m2, 4));
  return _mm_sha256msg2_epu32(t, m3);
}

// Rounds 4q .. 4q+3 with message words w. RNDS2 takes CDGH and ABEF and returns the new ABEF;
// after two rounds the old ABEF is the new CDGH, so the two registers swap roles twice.
DISKSNAP_SHANI inline void Rounds4(Lanes& s, __m128i w, int q) {
  __m128i wk = _mm_add_epi32(w, _mm_load_si128(reinterpret_cast<const __m128i*>(kRoundK + 4 * q)));
  s.cdgh = _mm_sha256rnds2_epu32(s.cdgh, s.abef, wk);
  s.abef = _mm_sha256rnds2_epu32(s.abef, s.cdgh, _mm_shuffle_epi32(wk, 0x0E));
}

// `chunks` 64-byte chunks of each of the N streams p[i] into the states h[i], interleaved.
template <int N>
DISKSNAP_SHANI void CompressN(uint32_t* const h[N], const uint8_t* const p[N], size_t chunks) {
  Lanes s[N];
  const uint8_t* at[N];
  for (int i = 0; i < N; i++) {
    s[i] = LoadState(h[i]);
    at[i] = p[i];
  }
  for (; chunks > 0; chunks--) {
    // One cache line per stream per chunk, 2 KiB ahead: keeps out-of-cache input streaming
    // (64 MiB buffer, per CPU-second: 2.1 GB/s without, 2.2-2.3 with; in-cache data is
    // unaffected). A prefetch past the end of the buffer is harmless.
    for (int i = 0; i < N; i++) _mm_prefetch(reinterpret_cast<const char*>(at[i]) + 2048, _MM_HINT_T0);
    Lanes saved[N];
    __m128i m[N][4];
    for (int i = 0; i < N; i++) saved[i] = s[i];
#pragma GCC unroll 16
    for (int q = 0; q < 16; q++) {
      for (int i = 0; i < N; i++) {
        __m128i w = q < 4 ? LoadWords(at[i] + 16 * q)
                          : Schedule(m[i][q & 3], m[i][(q + 1) & 3], m[i][(q + 2) & 3], m[i][(q + 3) & 3]);
        m[i][q & 3] = w;
        Rounds4(s[i], w, q);
      }
    }
    for (int i = 0; i < N; i++) {
      s[i].abef = _mm_add_epi32(s[i].abef, saved[i].abef);
      s[i].cdgh = _mm_add_epi32(s[i].cdgh, saved[i].cdgh);
      at[i] += 64;
    }
  }
  for (int i = 0; i < N; i++) StoreState(s[i], h[i]);
}

DISKSNAP_SHANI void Compress1(uint32_t h[8], const uint8_t* p, size_t chunks) {
  uint32_t* const hs[1] = {h};
  const uint8_t* const ps[1] = {p};
  CompressN<1>(hs, ps, chunks);
}

DISKSNAP_SHANI void Compress2(uint32_t ha[8], const uint8_t* pa, uint32_t hb[8], const uint8_t* pb,
                              size_t chunks) {
  uint32_t* const hs[2] = {ha, hb};
  const uint8_t* const ps[2] = {pa, pb};
  CompressN<2>(hs, ps, chunks);
}

// Absorbs the last n bytes of a message of `total` bytes (state h has absorbed the first
// total - n, a multiple of 64), pads, and writes the big-endian digest.
void FinishSha256(uint32_t h[8], const uint8_t* p, size_t n, uint64_t total, uint8_t out[32]) {
  size_t full = n / 64;
  if (full > 0) Compress1(h, p, full);
  size_t rest = n - full * 64;
  uint8_t tail[128] = {0};
  memcpy(tail, p + full * 64, rest);
  tail[rest] = 0x80;
  size_t tailLen = rest + 9 <= 64 ? 64 : 128;
  uint64_t bits = total * 8;
  for (int i = 0; i < 8; i++) tail[tailLen - 1 - i] = static_cast<uint8_t>(bits >> (8 * i));
  Compress1(h, tail, tailLen / 64);
  for (int i = 0; i < 8; i++) {
    out[4 * i] = static_cast<uint8_t>(h[i] >> 24);
    out[4 * i + 1] = static_cast<uint8_t>(h[i] >> 16);
    out[4 * i + 2] = static_cast<uint8_t>(h[i] >> 8);
    out[4 * i + 3] = static_cast<uint8_t>(h[i]);
  }
}

bool CpuHasShaNi() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool ssse3 = c & (1u << 9), sse41 = c & (1u << 19);
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  return ssse3 && sse41 && (b & (1u << 29));
}

// SHA-NI unless the CPU lacks it or DISKSNAP_HASH_IMPL=openssl asks for node's OpenSSL (tests
// use that to cover the fallback; it is read once per process).
bool UseShaNi() {
  static const bool use = [] {
    const char* impl = getenv("DISKSNAP_HASH_IMPL");
    return CpuHasShaNi() && !(impl != nullptr && strcmp(impl, "openssl") == 0);
  }();
  return use;
}

}  // namespace

const char* HashImplementation() { return UseShaNi() ? "sha-ni-x2" : "openssl"; }

// ---------------------------------------------------------------------------------------------
// BlockHasher

BlockHasher::BlockHasher(const std::vector<uint8_t>* key) {
  shani_ = UseShaNi();
  EVP_MD_CTX* ctx = nullptr;
  if (!shani_) {
    ctx = EVP_MD_CTX_new();
    ctx_ = ctx;
    if (ctx == nullptr) return;
  }
  memcpy(init_, kSha256Iv, sizeof init_);
  if (key == nullptr) {
    ok_ = true;
    return;
  }
  // HMAC (RFC 2104) with the two padded-key states computed once: each block then starts from
  // the inner state and ends with one compression (SHA-NI) or one context copy (EVP) for the
  // outer hash instead of re-deriving the key schedule.
  keyed_ = true;
  constexpr size_t kBlock = 64;
  uint8_t k[kBlock] = {0};
  if (key->size() > kBlock) {
    if (shani_) {
      uint32_t h[8];
      memcpy(h, kSha256Iv, sizeof h);
      FinishSha256(h, key->data(), key->size(), key->size(), k);
    } else {
      unsigned int n = 0;
      if (EVP_Digest(key->data(), key->size(), k, &n, Sha256(), nullptr) != 1) return;
    }
  } else if (!key->empty()) {
    memcpy(k, key->data(), key->size());
  }
  uint8_t ipad[kBlock], opad[kBlock];
  for (size_t i = 0; i < kBlock; i++) {
    ipad[i] = k[i] ^ 0x36;
    opad[i] = k[i] ^ 0x5c;
  }
  if (shani_) {
    memcpy(outerState_, kSha256Iv, sizeof outerState_);
    Compress1(init_, ipad, 1);
    Compress1(outerState_, opad, 1);
    prefix_ = kBlock;
    ok_ = true;
  } else {
    EVP_MD_CTX* inner = EVP_MD_CTX_new();
    EVP_MD_CTX* outer = EVP_MD_CTX_new();
    inner_ = inner;
    outer_ = outer;
    ok_ = inner != nullptr && outer != nullptr &&
          EVP_DigestInit_ex2(inner, Sha256(), nullptr) == 1 &&
          EVP_DigestUpdate(inner, ipad, kBlock) == 1 &&
          EVP_DigestInit_ex2(outer, Sha256(), nullptr) == 1 &&
          EVP_DigestUpdate(outer, opad, kBlock) == 1;
  }
  OPENSSL_cleanse(k, sizeof k);
  OPENSSL_cleanse(ipad, sizeof ipad);
  OPENSSL_cleanse(opad, sizeof opad);
}

BlockHasher::~BlockHasher() {
  EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(ctx_));
  EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(inner_));
  EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(outer_));
  OPENSSL_cleanse(init_, sizeof init_);
  OPENSSL_cleanse(outerState_, sizeof outerState_);
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

// The SHA-NI digest of a message whose first (n / 64) * 64 bytes the state h has absorbed
// (after the HMAC inner prefix, if any): the tail, padding and the HMAC outer hash.
void BlockHasher::Finish(uint32_t h[8], const uint8_t* p, size_t n, size_t absorbed,
                         uint8_t* out) const {
  FinishSha256(h, p + absorbed, n - absorbed, prefix_ + n, out);
  if (!keyed_) return;
  // Outer hash: opad state, then the 32-byte inner digest padded to one 64-byte chunk.
  uint32_t o[8];
  memcpy(o, outerState_, sizeof o);
  FinishSha256(o, out, kDigestLength, 64 + kDigestLength, out);
}

bool BlockHasher::Digest(const uint8_t* p, size_t n, uint8_t* out) {
  if (shani_) {
    uint32_t h[8];
    memcpy(h, init_, sizeof h);
    Finish(h, p, n, 0, out);
    return true;
  }
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

void BlockHasher::Digest2(const uint8_t* pa, size_t na, uint8_t* outa, const uint8_t* pb,
                          size_t nb, uint8_t* outb) {
  uint32_t ha[8], hb[8];
  memcpy(ha, init_, sizeof ha);
  memcpy(hb, init_, sizeof hb);
  const size_t both = std::min(na, nb) / 64;
  Compress2(ha, pa, hb, pb, both);
  Finish(ha, pa, na, both * 64, outa);
  Finish(hb, pb, nb, both * 64, outb);
}

// Zero check, with the digest of an all-zero block of the last length seen cached.
bool BlockHasher::ZeroBlock(const uint8_t* p, size_t n, uint8_t* out) {
  if (!IsAllZero(p, n)) return false;
  if (n != zeroLen_) {
    if (!Digest(p, n, zeroDigest_)) {
      zeroLen_ = SIZE_MAX;
      zeroFailed_ = true;
      return true;
    }
    zeroLen_ = n;
  }
  memcpy(out, zeroDigest_, kDigestLength);
  return true;
}

bool BlockHasher::Blocks(const uint8_t* data, size_t len, size_t blockSize, uint8_t* digests,
                         uint8_t* zero) {
  const uint8_t* held = nullptr;  // a non-zero block waiting for a partner (SHA-NI)
  size_t heldLen = 0;
  uint8_t* heldOut = nullptr;
  for (size_t off = 0, b = 0; off < len; off += blockSize, b++) {
    const uint8_t* p = data + off;
    const size_t n = std::min(blockSize, len - off);
    uint8_t* out = digests + b * kDigestLength;
    if (ZeroBlock(p, n, out)) {
      zero[b] = 1;
      if (zeroFailed_) return false;
      continue;
    }
    zero[b] = 0;
    if (!shani_) {
      if (!Digest(p, n, out)) return false;
    } else if (held == nullptr) {
      held = p;
      heldLen = n;
      heldOut = out;
    } else {
      Digest2(held, heldLen, heldOut, p, n, out);
      held = nullptr;
    }
  }
  return held == nullptr || Digest(held, heldLen, heldOut);
}

bool BlockHasher::Spans(const uint8_t* data, const size_t* offs, size_t n, uint8_t* digests) {
  size_t i = 0;
  if (shani_)
    for (; i + 1 < n; i += 2)
      Digest2(data + offs[2 * i], offs[2 * i + 1], digests + i * kDigestLength, data + offs[2 * i + 2],
              offs[2 * i + 3], digests + (i + 1) * kDigestLength);
  for (; i < n; i++)
    if (!Digest(data + offs[2 * i], offs[2 * i + 1], digests + i * kDigestLength)) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Drivers

static SysError CryptoFailure() {
  return SysError::Custom("ECRYPTO", 0, "SHA-256 or GMAC failed inside OpenSSL");
}

// The unmasked tags of the non-zero blocks among the consecutive blocks of data[0..len).
static bool TagBlocks(BlockTagger* tagger, const uint8_t* data, size_t len, size_t blockSize,
                      const uint8_t* zero, uint8_t* tags) {
  for (size_t off = 0, b = 0; off < len; off += blockSize, b++) {
    uint8_t* out = tags + b * kTagLength;
    if (zero[b]) {
      memset(out, 0, kTagLength);
    } else if (!tagger->Unmasked(data + off, std::min(blockSize, len - off), out)) {
      return false;
    }
  }
  return true;
}

// Zero flags only (no digests), for tag-only passes.
static void ZeroFlags(const uint8_t* data, size_t len, size_t blockSize, uint8_t* zero) {
  for (size_t off = 0, b = 0; off < len; off += blockSize, b++)
    zero[b] = IsAllZero(data + off, std::min(blockSize, len - off)) ? 1 : 0;
}

// Runs work(state, first, last) over blocks [0, nblocks) in runs of `run` blocks that
// `nthreads` threads claim from a shared counter; each thread first makes its own state with
// make() (nullptr: it could not, and the whole call fails). False when any part failed.
template <typename Make, typename Work>
static bool ForEachRun(size_t nblocks, size_t run, int nthreads, Make make, Work work) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  ParallelFor(nthreads, [&](int) {
    auto state = make();
    if (!state) {
      failed = true;
      return;
    }
    for (;;) {
      size_t first = next.fetch_add(run, std::memory_order_relaxed);
      if (first >= nblocks || failed.load(std::memory_order_relaxed)) return;
      if (!work(*state, first, std::min(nblocks, first + run))) {
        failed = true;
        return;
      }
    }
  });
  return !failed;
}

// Granule tags and zero flags of the blocks of data[0..len) (block `first` onwards: granule
// indexes count from the caller's buffer start), and each block's tag from them.
static bool TagGranules(BlockTagger* tagger, const uint8_t* data, size_t len, size_t blockSize, size_t first,
                        const uint8_t* zero, uint8_t* tags, const GranuleOut& g) {
  const size_t gs = g.granuleSize, per = blockSize / gs;
  std::vector<size_t> lens(per);
  for (size_t off = 0, b = 0; off < len; off += blockSize, b++) {
    const size_t blen = std::min(blockSize, len - off), count = (blen + gs - 1) / gs;
    const size_t g0 = (first + b) * per;
    uint8_t* gz = g.zero + g0;
    uint8_t* gt = g.tags + g0 * kTagLength;
    for (size_t s = 0; s < count; s++) {
      lens[s] = std::min(gs, blen - s * gs);
      gz[s] = zero[b] || IsAllZero(data + off + s * gs, lens[s]) ? 1 : 0;
      if (gz[s]) memset(gt + s * kTagLength, 0, kTagLength);
      else if (!tagger->Unmasked(data + off + s * gs, lens[s], gt + s * kTagLength)) return false;
    }
    for (size_t s = count; s < per; s++) {  // past a short last block: none there
      gz[s] = 1;
      memset(gt + s * kTagLength, 0, kTagLength);
    }
    uint8_t* out = tags + b * kTagLength;
    if (zero[b]) memset(out, 0, kTagLength);
    else if (!tagger->Combine(gt, gz, lens.data(), count, out) && !tagger->Unmasked(data + off, blen, out)) return false;
  }
  return true;
}

SysError HashBuffer(const uint8_t* data, size_t len, size_t blockSize, int threads,
                    const std::vector<uint8_t>* key, uint8_t* digests, uint8_t* zero,
                    const std::vector<uint8_t>* tagKey, uint8_t* tags, const GranuleOut* granules,
                    const RangeFill* fill) {
  const size_t nblocks = len == 0 ? 0 : (len - 1) / blockSize + 1;
  if (nblocks == 0) return {};
  std::mutex mu;
  SysError fillError;
  // Claim about 1 MiB per grab, and start no more threads than there are grabs.
  // Blocks of 1 MiB or more go two per grab when there are enough of them for every thread, so
  // that they can be hashed as a pair.
  const int want = ResolveThreads(threads);
  size_t run = std::max<size_t>(1, (size_t{1} << 20) / blockSize);
  if (run == 1 && nblocks >= 2 * static_cast<size_t>(want)) run = 2;
  const size_t runs = (nblocks + run - 1) / run;
  int nthreads = static_cast<int>(std::min<size_t>(want, runs));

  struct State {
    BlockHasher hasher;
    std::unique_ptr<BlockTagger> tagger;
    explicit State(const std::vector<uint8_t>* key) : hasher(key) {}
  };
  const bool ok = ForEachRun(
      nblocks, run, nthreads,
      [&]() -> std::unique_ptr<State> {
        std::unique_ptr<State> st(new State(key));
        if (tags != nullptr) st->tagger.reset(new BlockTagger(*tagKey));
        if (!st->hasher.ok() || (st->tagger && !st->tagger->ok())) return nullptr;
        return st;
      },
      [&](State& st, size_t first, size_t last) {
        size_t off = first * blockSize, end = std::min(len, last * blockSize);
        if (fill != nullptr) {
          SysError err = (*fill)(off, end);
          if (err.failed()) {
            std::lock_guard<std::mutex> lock(mu);
            if (!fillError.failed()) fillError = std::move(err);
            return false;
          }
        }
        if (!st.hasher.Blocks(data + off, end - off, blockSize, digests + first * kDigestLength, zero + first)) return false;
        if (!st.tagger) return true;
        if (granules) return TagGranules(st.tagger.get(), data + off, end - off, blockSize, first, zero + first, tags + first * kTagLength, *granules);
        return TagBlocks(st.tagger.get(), data + off, end - off, blockSize, zero + first, tags + first * kTagLength);
      });
  if (fillError.failed()) return fillError;
  return ok ? SysError() : CryptoFailure();
}

bool ReadFill(int fd, uint8_t* buf, const IoRequest* reqs, size_t n, RangeFill* out) {
  // The requests by buffer offset; a range's share is found by binary search.
  std::vector<IoRequest> sorted(reqs, reqs + n);
  std::stable_sort(sorted.begin(), sorted.end(), [](const IoRequest& a, const IoRequest& b) { return a.bufferOffset < b.bufferOffset; });
  for (size_t i = 1; i < n; i++)
    if (sorted[i - 1].bufferOffset + sorted[i - 1].length > sorted[i].bufferOffset) return false;
  *out = [fd, buf, sorted = std::move(sorted)](size_t off, size_t end) -> SysError {
    // the first request that ends after `off`
    auto it = std::upper_bound(sorted.begin(), sorted.end(), off, [](size_t o, const IoRequest& q) { return o < q.bufferOffset + q.length; });
    std::vector<IoRequest> part;
    for (; it != sorted.end() && it->bufferOffset < end; ++it) {
      const size_t a = std::max(off, it->bufferOffset), b = std::min(end, it->bufferOffset + it->length);
      if (a < b) part.push_back(IoRequest{it->fileOffset + (a - it->bufferOffset), a, b - a});
    }
    // back in file order within the range, so that PreadBatch joins neighbours into one preadv
    std::sort(part.begin(), part.end(), [](const IoRequest& x, const IoRequest& y) { return x.fileOffset < y.fileOffset; });
    uint64_t total = 0;
    return PreadBatch(fd, buf, part.data(), part.size(), &total);
  };
  return true;
}

SysError TagBuffer(const uint8_t* data, size_t len, size_t blockSize, int threads,
                   const std::vector<uint8_t>& tagKey, uint8_t* zero, uint8_t* tags) {
  const size_t nblocks = len == 0 ? 0 : (len - 1) / blockSize + 1;
  if (nblocks == 0) return {};
  // About 1 MiB per grab, as HashBuffer.
  const size_t run = std::max<size_t>(1, (size_t{1} << 20) / blockSize);
  const size_t runs = (nblocks + run - 1) / run;
  const int nthreads = static_cast<int>(std::min<size_t>(ResolveThreads(threads), runs));
  const bool ok = ForEachRun(
      nblocks, run, nthreads,
      [&]() -> std::unique_ptr<BlockTagger> {
        std::unique_ptr<BlockTagger> t(new BlockTagger(tagKey));
        return t->ok() ? std::move(t) : nullptr;
      },
      [&](BlockTagger& tagger, size_t first, size_t last) {
        size_t off = first * blockSize, end = std::min(len, last * blockSize);
        ZeroFlags(data + off, end - off, blockSize, zero + first);
        return TagBlocks(&tagger, data + off, end - off, blockSize, zero + first, tags + first * kTagLength);
      });
  return ok ? SysError() : CryptoFailure();
}

// A read buffer of HashFileRange's threads, kept in a process-wide list for the next call: the
// threads are new each call, and memory a process touches for the first time costs a page fault
// per 4 KiB (~12 us each on the bench's VM). An incremental snapshot of 1 GiB took ~2,700 of its
// ~14,600 faults in fresh 1 MiB buffers; kept, 8 alternating runs went 0.645 -> 0.615 s and
// 0.865 -> 0.80 s of CPU. Buffers over 4 MiB (blocks that large) are not kept.
class PieceBuffer {
 public:
  explicit PieceBuffer(size_t size) : size_(size) {
    {
      Kept& k = kept();
      std::lock_guard<std::mutex> lock(k.mu);
      for (auto it = k.list.begin(); it != k.list.end(); ++it) {
        if (it->second != size) continue;
        p_ = it->first;
        k.list.erase(it);
        return;
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, 4096, size) == 0) p_ = static_cast<uint8_t*>(p);
  }
  ~PieceBuffer() {
    if (p_ == nullptr) return;
    {
      Kept& k = kept();
      std::lock_guard<std::mutex> lock(k.mu);
      if (size_ <= kKeepSize && k.list.size() < kKeep) {
        k.list.emplace_back(p_, size_);
        return;
      }
    }
    free(p_);
  }
  PieceBuffer(const PieceBuffer&) = delete;
  PieceBuffer& operator=(const PieceBuffer&) = delete;
  uint8_t* get() const { return p_; }
  explicit operator bool() const { return p_ != nullptr; }

 private:
  static constexpr size_t kKeep = 16;  // one per thread of a 16-thread scan
  static constexpr size_t kKeepSize = size_t{4} << 20;
  struct Kept {
    std::mutex mu;
    std::vector<std::pair<uint8_t*, size_t>> list;
  };
  // Never destroyed: a worker may still hand its buffer back while the process exits.
  static Kept& kept() {
    static Kept* k = new Kept();
    return *k;
  }
  uint8_t* p_ = nullptr;
  size_t size_;
};

// Collect mode (FileHashJob): the changed blocks among data[0..len), block `first` onwards.
// Where `shared` (data is a mapping others may write), each copy's tag is computed again from
// the copy, so that the tag the caller records is of the bytes it stores. With collectGranules,
// every copy's granule tags are computed from it, and its block tag combined from them: one
// GHASH pass over the copy gives both, where the caller's tagBlocksAsync over the copies had
// been a second (session 33).
static bool CollectChanged(FileHashJob* job, const uint8_t* data, size_t len, size_t bs, uint64_t first, BlockTagger* tagger,
                           bool shared) {
  static const uint8_t kNotZero = 0;
  for (size_t off = 0, j = 0; off < len; off += bs, j++) {
    const uint64_t b = first + j;
    if (job->zero[b] ||
        (job->known[b] && memcmp(job->tags + b * kTagLength, job->expect + b * kTagLength, kTagLength) == 0)) {
      job->slotOf[b] = -1;
      continue;
    }
    const size_t slot = job->collected.fetch_add(1, std::memory_order_relaxed);
    if (slot >= job->collectCap) {
      job->slotOf[b] = -2;
      continue;
    }
    const size_t n = std::min(bs, len - off);
    uint8_t* copy = job->collectBuf + slot * bs;
    memcpy(copy, data + off, n);
    job->slotOf[b] = static_cast<int32_t>(slot);
    if (job->collectGranules.granuleSize != 0) {
      if (!TagGranules(tagger, copy, n, bs, slot, &kNotZero, job->tags + b * kTagLength, job->collectGranules)) return false;
    } else if (shared && !tagger->Unmasked(copy, n, job->tags + b * kTagLength)) {
      return false;
    }
  }
  return true;
}

namespace {

int64_t ThreadCpuNs() {
  struct timespec ts;
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

// How tagFile reads a regular file: mapped, or by pread into each thread's buffer. Which is
// cheaper depends on how the file's pages are held in the page cache, and that changes (session
// 46, 1 GiB cached, 2 threads, the 16 calls of a raw incremental's scan): pages that readahead
// brought in (large folios) tag in 37 ms mapped against 42-52 ms by pread; pages that small
// writes left (a guest's, a copy in 4 KiB writes) or that reclaim split under memory pressure
// (4 KiB folios: the state after a CI run here) take 94 ms mapped against 60 by pread, and a
// whole raw incremental 211 against 181 ms. Neither way wins both, and no system call says
// which state a file is in, so a process measures: its first call over a file reads its 4 MiB
// chunks mapped and by pread in turn (even chunks mapped, odd ones by pread, so both ways see
// the same conditions), times each chunk in its thread's CPU time (faults and copies are both
// CPU), and once each way has read kMeasureBytes, every later call takes the cheaper way.
// Knowing costs at most half of one call's difference. (Until session 47 the first call mapped
// and the second preaded, each whole: while a test suite ran beside it, the second call of a
// raw incremental took 20-22 ms where its neighbours took 4-9.) Kept per file (device, inode)
// for the process.
enum class ReadWay { kMeasure, kMapped, kPread };

constexpr uint64_t kMeasureBytes = uint64_t{8} << 20;

struct WaysSeen {
  std::mutex mu;
  // per file: ns of CPU per MiB read mapped, and by pread (-1: not measured yet)
  std::map<std::pair<dev_t, ino_t>, std::pair<int64_t, int64_t>> costs;
};

WaysSeen& Ways() {
  static WaysSeen* w = new WaysSeen();
  return *w;
}

}  // namespace

std::pair<int64_t, int64_t> TagReadCostsOf(const struct stat& st) {
  WaysSeen& w = Ways();
  std::lock_guard<std::mutex> lock(w.mu);
  auto it = w.costs.find({st.st_dev, st.st_ino});
  return it == w.costs.end() ? std::make_pair(int64_t{-1}, int64_t{-1}) : it->second;
}

namespace {

ReadWay ChooseReadWay(const struct stat& st) {
  const auto [mapped, pread] = TagReadCostsOf(st);
  if (mapped < 0 || pread < 0) return ReadWay::kMeasure;
  return mapped <= pread ? ReadWay::kMapped : ReadWay::kPread;
}

// What one call spent reading each way: CPU ns and bytes, mapped ([0]) and by pread ([1]).
struct WaySpent {
  std::atomic<int64_t> ns[2] = {{0}, {0}};
  std::atomic<uint64_t> bytes[2] = {{0}, {0}};
};

int64_t PerMiB(int64_t ns, uint64_t bytes) {
  return static_cast<int64_t>(static_cast<double>(ns) * (1 << 20) / static_cast<double>(bytes));
}

void RecordReadWays(const struct stat& st, const WaySpent& spent) {
  const uint64_t mappedBytes = spent.bytes[0].load(), preadBytes = spent.bytes[1].load();
  if (mappedBytes < kMeasureBytes || preadBytes < kMeasureBytes) return;  // too little read to say
  WaysSeen& w = Ways();
  std::lock_guard<std::mutex> lock(w.mu);
  w.costs[{st.st_dev, st.st_ino}] = {PerMiB(spent.ns[0].load(), mappedBytes), PerMiB(spent.ns[1].load(), preadBytes)};
}

}  // namespace

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
  // Each chunk is read and hashed in pieces of about 1 MiB (at least two blocks, for the
  // two-stream hash), into one buffer per thread that stays in L2 between pread and hash.
  const size_t piece = std::min<size_t>(chunkBlocks, std::max<size_t>(2, (size_t{1} << 20) / bs)) * bs;
  const int nthreads = static_cast<int>(std::min<uint64_t>(ResolveThreads(job->threads), nchunks));

  struct stat st;
  if (::fstat(job->fd, &st) < 0) return SysError::Errno(errno, "fstat");
  std::atomic<bool> seekData{S_ISREG(st.st_mode)};
  // tagFile over a regular file reads it in place through a mapping of each chunk (FileMapping,
  // io.h: no copy out of the page cache), piece by piece as below, each piece under
  // GuardedRead; the pieces past the file's size at the start, and every piece of a thread
  // after a SIGBUS (the file shrank meanwhile), are pread as before. A chunk's mapping goes
  // when it is done: mapped pages count in the process's RSS, and one mapping of the whole
  // 64 MiB range took a 1% incremental's peak RSS from 89 to 146 MiB. Only tags: one
  // pass over each block, and a collected block's tag is taken again from its copy
  // (CollectChanged), so every tag is of the bytes it is recorded with. hashFile, whose digest
  // and tag of a block are two passes that must see the same bytes, preads into its own buffer.
  // DISKSNAP_NO_MMAP=1 preads everything (a diagnostic, for comparing the two).
  // What the mapping costs depends on how the file's pages came into the page cache (session
  // 42, kernel 6.18, ext4, 1 GiB cached, 2 threads): pages read in by readahead (large folios)
  // tag in 29-30 ms; the same bytes cached by a writer's small writes (4 KiB folios: what a
  // guest's writes leave) take 61-63 ms, ~30 ms more of kernel time to fault and map them.
  // pread into this L2-sized buffer takes 40 ms and 50-56 ms there: better in the second case
  // only, and with more CPU (the copy), so a whole raw incremental in that state was no faster
  // with it (0.155 / 0.157 s in 8 alternating runs). Since session 46 each file is read the
  // way that measured cheaper for it (ChooseReadWay, above: measured within the first call since
  // session 47); DISKSNAP_NO_MMAP=1 always preads,
  // DISKSNAP_NO_MMAP=0 always maps (diagnostics).
  const char* noMap = ::getenv("DISKSNAP_NO_MMAP");
  const bool canMap = job->digests == nullptr && job->tags != nullptr && S_ISREG(st.st_mode) &&
                      !(noMap != nullptr && strcmp(noMap, "1") == 0);
  const bool measure = canMap && !(noMap != nullptr && strcmp(noMap, "0") == 0);
  const ReadWay way = measure ? ChooseReadWay(st) : ReadWay::kMapped;
  const bool mapIt = canMap && way != ReadWay::kPread;
  const bool measuring = measure && way == ReadWay::kMeasure;
  const uint64_t mappedEnd = static_cast<uint64_t>(st.st_size);
  WaySpent spent;  // while measuring: each way's chunks, in their threads' CPU time

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

  // One worker's share; its buffer, hasher and tagger are gone when it returns (below, before
  // it counts as done: the caller's frame may go right after).
  auto work = [&]() {
    PieceBuffer buf(piece);
    BlockHasher hasher(job->key);
    std::unique_ptr<BlockTagger> tagger;
    if (job->tags != nullptr) tagger.reset(new BlockTagger(*job->tagKey));
    bool mapped = mapIt;
    // One piece of n bytes at data, block b onwards: digests or zero flags, tags, the copies.
    auto piecework = [&](const uint8_t* data, size_t n, uint64_t b, bool shared) {
      bool good;
      if (job->digests != nullptr) {
        good = hasher.Blocks(data, n, bs, job->digests + b * kDigestLength, job->zero + b);
      } else {
        ZeroFlags(data, n, bs, job->zero + b);
        good = true;
      }
      if (good && tagger) good = TagBlocks(tagger.get(), data, n, bs, job->zero + b, job->tags + b * kTagLength);
      if (good && tagger && job->slotOf != nullptr) good = CollectChanged(job, data, n, bs, b, tagger.get(), shared);
      return good;
    };
    if (!buf) {
      fail(SysError::Errno(ENOMEM, "hashFile"));
    } else if (!hasher.ok() || (tagger && !tagger->ok())) {
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
        // Read and hash piece by piece, so that what pread just wrote is still in L2 when the
        // hash reads it.
        const uint64_t firstBlock = rel / bs;
        bool ok = true;
        // while measuring, odd chunks are pread (ChooseReadWay, above)
        const bool mapThis = mapped && !(measuring && c % 2 == 1);
        const int64_t chunkStartNs = measuring ? ThreadCpuNs() : 0;
        const bool mappedBefore = mapped;
        const FileMapping map(mapThis && !hole && at + want <= mappedEnd ? job->fd : -1, at, want);
        const int readWay = map ? 0 : 1;  // (a chunk past the file's end, or not mapped, is pread)
        for (size_t p = 0; p < want && ok; p += piece) {
          const size_t n = std::min(piece, want - p);
          const uint64_t b = firstBlock + p / bs;
          if (map && mapped) {  // (not after a SIGBUS in this chunk)
            if (GuardedRead([&] { ok = piecework(map.at(at + p), n, b, true); })) {
              if (!ok) fail(CryptoFailure());
              continue;
            }
            // SIGBUS: the file shrank under the mapping. This piece and the rest are pread (they
            // read short: zeros), and the move is the caller's to see (its size, its times); the
            // tagger was left halfway, so it starts afresh (only tags are read mapped).
            mapped = false;
            tagger.reset(new BlockTagger(*job->tagKey));
            ok = tagger->ok();
            if (!ok) {
              fail(CryptoFailure());
              break;
            }
          }
          size_t got = 0;
          if (!hole) {
            SysError err = PreadFull(job->fd, buf.get(), n, at + p, &got);
            if (err.failed()) {
              fail(std::move(err));
              ok = false;
              break;
            }
          }
          if (got < n) memset(buf.get() + got, 0, n - got);
          ok = piecework(buf.get(), n, b, false);
          if (!ok) fail(CryptoFailure());
        }
        if (!ok) break;
        // a chunk that was all hole read nothing, and one cut by a SIGBUS was read both ways
        if (measuring && !hole && mapped == mappedBefore) {
          spent.ns[readWay].fetch_add(ThreadCpuNs() - chunkStartNs, std::memory_order_relaxed);
          spent.bytes[readWay].fetch_add(want, std::memory_order_relaxed);
        }
        job->done.fetch_add(want, std::memory_order_relaxed);
      }
    }
  };
  auto worker = [&]() {
    work();
    std::lock_guard<std::mutex> lock(mu);
    if (--running == 0) cv.notify_all();
  };

  // The calling thread only coordinates: it reports progress while the workers run.
  int started = 0;
  int inlineRuns = 0;
  for (int i = 0; i < nthreads; i++) {
    std::function<void()> task = worker;
    if (StartOnThread(task))
      started++;
    else
      inlineRuns++;
  }
  if (started == 0) {
    for (int i = 0; i < inlineRuns; i++) worker();
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
  if (measuring && !firstError.failed()) RecordReadWays(st, spent);
  return firstError;
}

}  // namespace disksnap
