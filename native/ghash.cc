// See ghash.h. Only the functions marked DISKSNAP_CLMUL use the instructions; the addon is
// built for the baseline CPU and calls them only where FastGhash::Available() says so.
#include "ghash.h"

#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#define DISKSNAP_CLMUL __attribute__((target("pclmul,ssse3,sse4.1,avx2,vpclmulqdq")))
#define DISKSNAP_ZMM __attribute__((target("pclmul,ssse3,sse4.1,avx2,vpclmulqdq,avx512f,avx512bw")))

namespace disksnap {

namespace {

// How far ahead of the bytes being hashed the loops ask for the next ones (prefetcht0): the CPU's
// own prefetchers stop at each 4 KiB page, and a tag scan reads the page cache (or a big buffer)
// once, from memory. Measured on the Xeon VMs (one thread, 1 GiB of memory, best of 3): 8.0 GB/s
// without, 8.7 at 512 bytes ahead, 10.7 at 1 KiB, 12.0 at 2 KiB, 9.7 at 4 KiB. A prefetch of an
// address past the data (or unmapped) is a hint the CPU drops: it never faults.
constexpr size_t kPrefetch = 2048;

DISKSNAP_CLMUL inline __m128i Reverse(__m128i x) {
  return _mm_shuffle_epi8(x, _mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

// The same in each 128-bit lane of a 256-bit register (two blocks).
DISKSNAP_CLMUL inline __m256i Reverse2(__m256i x) {
  const __m256i r = _mm256_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,  //
                                    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return _mm256_shuffle_epi8(x, r);
}

// The 256-bit carry-less product [hi:lo] of two byte-reversed field elements, reduced modulo
// x^128 + x^7 + x^2 + x + 1: the bit-reflected product is one bit short, so shift left by one,
// then fold the low half in two phases.
DISKSNAP_CLMUL inline __m128i Reduce(__m128i lo, __m128i hi) {
  __m128i c0 = _mm_srli_epi32(lo, 31);
  __m128i c1 = _mm_srli_epi32(hi, 31);
  lo = _mm_slli_epi32(lo, 1);
  hi = _mm_slli_epi32(hi, 1);
  const __m128i carry = _mm_srli_si128(c0, 12);
  c1 = _mm_slli_si128(c1, 4);
  c0 = _mm_slli_si128(c0, 4);
  lo = _mm_or_si128(lo, c0);
  hi = _mm_or_si128(_mm_or_si128(hi, c1), carry);

  __m128i a = _mm_xor_si128(_mm_xor_si128(_mm_slli_epi32(lo, 31), _mm_slli_epi32(lo, 30)), _mm_slli_epi32(lo, 25));
  const __m128i b = _mm_srli_si128(a, 4);
  a = _mm_slli_si128(a, 12);
  lo = _mm_xor_si128(lo, a);

  __m128i d = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi32(lo, 1), _mm_srli_epi32(lo, 2)), _mm_srli_epi32(lo, 7));
  d = _mm_xor_si128(d, b);
  lo = _mm_xor_si128(lo, d);
  return _mm_xor_si128(hi, lo);
}

DISKSNAP_CLMUL inline __m128i Multiply(__m128i a, __m128i b) {
  __m128i lo = _mm_clmulepi64_si128(a, b, 0x00);
  __m128i hi = _mm_clmulepi64_si128(a, b, 0x11);
  const __m128i mid = _mm_xor_si128(_mm_clmulepi64_si128(a, b, 0x01), _mm_clmulepi64_si128(a, b, 0x10));
  lo = _mm_xor_si128(lo, _mm_slli_si128(mid, 8));
  hi = _mm_xor_si128(hi, _mm_srli_si128(mid, 8));
  return Reduce(lo, hi);
}

DISKSNAP_CLMUL void Powers(const uint8_t h[16], uint8_t out[][16], int count) {
  const __m128i h1 = Reverse(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h)));
  __m128i p = h1;
  for (int j = 0; j < count; j++) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out[j]), p);
    p = Multiply(p, h1);
  }
}

// Absorbs p[0..n) (n a multiple of 256) into y, 16 blocks per step: keys[k] holds
// (H^(16-2k), H^(15-2k)) in its (low, high) lanes, the powers of the k-th pair of blocks.
DISKSNAP_CLMUL __m128i Absorb256(const uint8_t (*powers)[16], const uint8_t* p, size_t n, __m128i y) {
  __m256i keys[8], folded[8];  // folded: hi ^ lo of each key in its low quadword (Karatsuba)
  for (int k = 0; k < 8; k++) {
    const __m128i first = _mm_loadu_si128(reinterpret_cast<const __m128i*>(powers[15 - 2 * k]));
    const __m128i second = _mm_loadu_si128(reinterpret_cast<const __m128i*>(powers[14 - 2 * k]));
    keys[k] = _mm256_inserti128_si256(_mm256_castsi128_si256(first), second, 1);
    folded[k] = _mm256_xor_si256(keys[k], _mm256_shuffle_epi32(keys[k], 0x4E));
  }
  for (size_t off = 0; off < n; off += 256) {
    for (int q = 0; q < 4; q++) _mm_prefetch(reinterpret_cast<const char*>(p + off + kPrefetch + 64 * q), _MM_HINT_T0);
    __m256i lo = _mm256_setzero_si256(), hi = lo, mid = lo;
    for (int k = 0; k < 8; k++) {
      __m256i x = Reverse2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + off + 32 * k)));
      if (k == 0) x = _mm256_xor_si256(x, _mm256_inserti128_si256(_mm256_setzero_si256(), y, 0));
      lo = _mm256_xor_si256(lo, _mm256_clmulepi64_epi128(x, keys[k], 0x00));
      hi = _mm256_xor_si256(hi, _mm256_clmulepi64_epi128(x, keys[k], 0x11));
      // (x.hi ^ x.lo) * (k.hi ^ k.lo) = mid ^ lo ^ hi: three multiplies instead of four
      const __m256i xf = _mm256_xor_si256(x, _mm256_shuffle_epi32(x, 0x4E));
      mid = _mm256_xor_si256(mid, _mm256_clmulepi64_epi128(xf, folded[k], 0x00));
    }
    __m128i l = _mm_xor_si128(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
    __m128i h = _mm_xor_si128(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
    const __m128i m = _mm_xor_si128(_mm_xor_si128(_mm256_castsi256_si128(mid), _mm256_extracti128_si256(mid, 1)), _mm_xor_si128(l, h));
    l = _mm_xor_si128(l, _mm_slli_si128(m, 8));
    h = _mm_xor_si128(h, _mm_srli_si128(m, 8));
    y = Reduce(l, h);
  }
  return y;
}

// GCC 12's AVX-512 intrinsics start from _mm512_undefined_*(), which it then warns about
// (GCC bug 105593, fixed in 13): nothing here reads an undefined lane.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
DISKSNAP_ZMM inline __m128i Fold4(__m512i v) {
  const __m256i a = _mm256_xor_si256(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
  return _mm_xor_si128(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
}

// The same with 512-bit registers, 32 blocks per step (n a multiple of 512): keys[k] holds
// H^(32-4k) .. H^(29-4k) in its four lanes.
DISKSNAP_ZMM __m128i Absorb512(const uint8_t (*powers)[16], const uint8_t* p, size_t n, __m128i y) {
  __m512i keys[8], folded[8];
  for (int k = 0; k < 8; k++) {
    __m512i z = _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(powers[31 - 4 * k])));
    z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(powers[30 - 4 * k])), 1);
    z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(powers[29 - 4 * k])), 2);
    z = _mm512_inserti32x4(z, _mm_loadu_si128(reinterpret_cast<const __m128i*>(powers[28 - 4 * k])), 3);
    keys[k] = z;
    folded[k] = _mm512_xor_si512(z, _mm512_shuffle_epi32(z, static_cast<_MM_PERM_ENUM>(0x4E)));
  }
  const __m512i rev = _mm512_broadcast_i32x4(_mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  for (size_t off = 0; off < n; off += 512) {
    for (int q = 0; q < 8; q++) _mm_prefetch(reinterpret_cast<const char*>(p + off + kPrefetch + 64 * q), _MM_HINT_T0);
    __m512i lo = _mm512_setzero_si512(), hi = lo, mid = lo;
    for (int k = 0; k < 8; k++) {
      __m512i x = _mm512_shuffle_epi8(_mm512_loadu_si512(p + off + 64 * k), rev);
      if (k == 0) x = _mm512_xor_si512(x, _mm512_zextsi128_si512(y));
      lo = _mm512_xor_si512(lo, _mm512_clmulepi64_epi128(x, keys[k], 0x00));
      hi = _mm512_xor_si512(hi, _mm512_clmulepi64_epi128(x, keys[k], 0x11));
      const __m512i xf = _mm512_xor_si512(x, _mm512_shuffle_epi32(x, static_cast<_MM_PERM_ENUM>(0x4E)));
      mid = _mm512_xor_si512(mid, _mm512_clmulepi64_epi128(xf, folded[k], 0x00));
    }
    __m128i l = Fold4(lo), h = Fold4(hi);
    const __m128i m = _mm_xor_si128(Fold4(mid), _mm_xor_si128(l, h));
    l = _mm_xor_si128(l, _mm_slli_si128(m, 8));
    h = _mm_xor_si128(h, _mm_srli_si128(m, 8));
    y = Reduce(l, h);
  }
  return y;
}

#pragma GCC diagnostic pop

// The blocks after the last whole step (zero-padded), then the length block of n bytes.
DISKSNAP_CLMUL void Finish(__m128i h1, const uint8_t* p, size_t off, size_t n, __m128i y, uint8_t out[16]) {
  for (; n - off >= 16; off += 16) {
    const __m128i x = Reverse(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + off)));
    y = Multiply(_mm_xor_si128(y, x), h1);
  }
  if (off < n) {
    alignas(16) uint8_t last[16] = {0};
    memcpy(last, p + off, n - off);
    y = Multiply(_mm_xor_si128(y, Reverse(_mm_load_si128(reinterpret_cast<const __m128i*>(last)))), h1);
  }
  // The length block: [8n]_64 big-endian, then [0]_64. Byte-reversed, 8n is the high quadword.
  const __m128i len = _mm_set_epi64x(static_cast<long long>(static_cast<uint64_t>(n) * 8), 0);
  y = Multiply(_mm_xor_si128(y, len), h1);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), Reverse(y));
}

DISKSNAP_CLMUL void TagClmul(const uint8_t (*powers)[16], const uint8_t* p, size_t n, uint8_t out[16]) {
  const size_t whole = n & ~size_t{255};
  Finish(_mm_loadu_si128(reinterpret_cast<const __m128i*>(powers[0])), p, whole, n, Absorb256(powers, p, whole, _mm_setzero_si128()), out);
}

DISKSNAP_ZMM void TagZmm(const uint8_t (*powers)[16], const uint8_t* p, size_t n, uint8_t out[16]) {
  const size_t wide = n & ~size_t{511}, whole = n & ~size_t{255};
  const __m128i y = Absorb512(powers, p, wide, _mm_setzero_si128());
  Finish(_mm_loadu_si128(reinterpret_cast<const __m128i*>(powers[0])), p, whole, n, Absorb256(powers, p + wide, whole - wide, y), out);
}

// H^m (byte-reversed) from h1 = H: square and multiply.
DISKSNAP_CLMUL __m128i Power(__m128i h1, size_t m) {
  __m128i result = h1, base = h1;
  bool have = false;
  for (; m > 0; m >>= 1) {
    if (m & 1) {
      result = have ? Multiply(result, base) : base;
      have = true;
    }
    if (m > 1) base = Multiply(base, base);
  }
  return result;
}

// The length block of n bytes of additional data, byte-reversed: [8n]_64 is the high quadword.
DISKSNAP_CLMUL inline __m128i LengthBlock(size_t n) {
  return _mm_set_epi64x(static_cast<long long>(static_cast<uint64_t>(n) * 8), 0);
}

DISKSNAP_CLMUL void CombineClmul(const uint8_t (*powers)[16], const uint8_t (*parts)[16], const uint8_t* zero,
                                 const size_t* lens, size_t count, size_t* cachedBlocks, uint8_t* cachedPower,
                                 uint8_t out[16]) {
  const __m128i h1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(powers[0]));
  __m128i acc = _mm_setzero_si128();
  size_t total = 0;
  for (size_t i = 0; i < count; i++) {
    const size_t blocks = (lens[i] + 15) / 16;
    if (i > 0) {
      if (*cachedBlocks != blocks) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(cachedPower), Power(h1, blocks));
        *cachedBlocks = blocks;
      }
      acc = Multiply(acc, _mm_loadu_si128(reinterpret_cast<const __m128i*>(cachedPower)));
    }
    // an all-zero part adds nothing: its X is 0
    if (!zero[i]) {
      const __m128i tag = Reverse(_mm_loadu_si128(reinterpret_cast<const __m128i*>(parts[i])));
      acc = _mm_xor_si128(acc, _mm_xor_si128(tag, Multiply(LengthBlock(lens[i]), h1)));
    }
    total += lens[i];
  }
  acc = _mm_xor_si128(acc, Multiply(LengthBlock(total), h1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), Reverse(acc));
}

bool CpuHasClmul() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("vpclmulqdq");
}

// AVX-512 as well (libgcc sets these only where the OS saves the 512-bit registers).
bool CpuHasZmm() {
  __builtin_cpu_init();
  return CpuHasClmul() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}

const char* Impl() { return getenv("DISKSNAP_HASH_IMPL"); }

}  // namespace

bool FastGhash::Available() {
  static const bool available = [] {
    const char* v = Impl();
    if (v != nullptr && strcmp(v, "openssl") == 0) return false;
    return CpuHasClmul();
  }();
  return available;
}

bool FastGhash::Wide() {
  static const bool wide = [] {
    const char* v = Impl();
    if (v != nullptr && strcmp(v, "avx2") == 0) return false;
    return Available() && CpuHasZmm();
  }();
  return wide;
}

const char* FastGhash::Implementation() {
  return Wide() ? "vpclmulqdq-512" : Available() ? "vpclmulqdq-256" : "openssl";
}

FastGhash::FastGhash(const uint8_t h[16]) {
  if (Available()) Powers(h, powers_, Wide() ? kPowers : kPowers / 2);
}

FastGhash::~FastGhash() { explicit_bzero(powers_, sizeof powers_); }

void FastGhash::Tag(const uint8_t* p, size_t n, uint8_t out[16]) const {
  if (Wide())
    TagZmm(powers_, p, n, out);
  else
    TagClmul(powers_, p, n, out);
}

void FastGhash::Combine(const uint8_t (*parts)[16], const uint8_t* zero, const size_t* lens, size_t count,
                        uint8_t out[16]) const {
  CombineClmul(powers_, parts, zero, lens, count, &cachedBlocks_, cachedPower_, out);
}

}  // namespace disksnap
