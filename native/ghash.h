// GHASH with the CPU's carry-less multiply instructions, 16 or 32 blocks per step, for the change
// tags of block_tag.h (which otherwise get it from OpenSSL's GMAC).
//
// Why: the tag of every block is the bulk of an incremental snapshot's CPU. On this project's
// VMs (AMD EPYC with VPCLMULQDQ) node's OpenSSL 3.0 computes GMAC with its 128-bit PCLMUL
// code at ~6-8 GB/s per core; perf put it at 19% of an incremental snapshot's CPU, above the
// read itself. VPCLMULQDQ multiplies two blocks per instruction (256-bit registers), each
// pair with three multiplies (Karatsuba), and 16 blocks per step make one reduction per 256
// bytes: 12-15 GB/s per core beside OpenSSL's 6-8 in the same runs (best of 9 x 1 GiB from
// L2-sized buffers). 512-bit registers (AVX-512) measured the same on the Zen 4 cores of the
// earlier VMs; the Zen 5 cores of today's (CPU family 26) run them at full width: 32 blocks per
// step in 512-bit registers hashed 16.8 GB/s against 9.5-10.5 for the 256-bit code (one core,
// 512 KiB from L2, 3 rounds), and native tagFile over 1 GiB of page cache on two threads took
// 87-90 ms against 110-112 (DISKSNAP_HASH_IMPL=avx2, the same build; 2 alternating rounds of 5
// calls); the 1% incremental of a 1 GiB raw volume, 0.417 -> 0.384 s (8 alternating pairs).
// So Tag() takes the 512-bit steps where the CPU has AVX-512 (Wide()), the 256-bit ones
// elsewhere; the tags are the same bytes either way.
//
// Arithmetic (the GCM specification, SP 800-38D): X_1..X_m are the data's 16-byte blocks, the
// last one zero-padded, then the length block [8n]_64 || [0]_64; Y_0 = 0 and
// Y_i = (Y_{i-1} ^ X_i) * H in GF(2^128), H = AES_K(0^128). Over 16 blocks at a time,
// Y' = (Y ^ X_1) * H^16 ^ X_2 * H^15 ^ ... ^ X_16 * H: the products are summed unreduced
// and reduced once (reduction is linear). Blocks are byte-reversed on load, so that the
// field's bit order becomes the integers' (the method of Gueron and Kounavis's white paper on
// carry-less multiplication and GCM); the result is reversed back.
#pragma once

#include <cstddef>
#include <cstdint>

namespace disksnap {

class FastGhash {
 public:
  // True where the CPU has PCLMULQDQ, AVX2 and VPCLMULQDQ, unless DISKSNAP_HASH_IMPL=openssl
  // (as for SHA-256, hash_engine.h: node's OpenSSL for everything; how tests reach the fallback).
  static bool Available();
  // True where the CPU has AVX-512 (F, BW) too, unless DISKSNAP_HASH_IMPL=avx2: Tag() then takes
  // 32 blocks per step in 512-bit registers.
  static bool Wide();
  // "vpclmulqdq-512", "vpclmulqdq-256" or "openssl": what Tag() uses in this process.
  static const char* Implementation();
  // h: H = AES_K(0^128), as the 16 bytes the cipher gives. Construct only where Available().
  explicit FastGhash(const uint8_t h[16]);
  ~FastGhash();  // clears the powers of H (H is as secret as the tag key)
  FastGhash(const FastGhash&) = delete;
  FastGhash& operator=(const FastGhash&) = delete;
  // GHASH_H of p[0..n) zero-padded, then the length block for n bytes of additional data and
  // nothing encrypted: the unmasked GMAC tag of block_tag.h.
  void Tag(const uint8_t* p, size_t n, uint8_t out[16]) const;
  // The Tag() of the concatenation of `count` consecutive parts from the Tag() of each part
  // (no second pass over the bytes): parts[i] of lens[i] bytes, every part but the last a
  // multiple of 16 bytes long; a part whose zero[i] is set is all zero bytes (its parts[i] is
  // not read). With X the parts' GHASH sums before their length blocks and L(n) the length
  // block of n bytes, Tag(part) = (X ^ L(len)) * H, so X * H = Tag(part) ^ L(len) * H, and the
  // whole's X is sum of part i's X times H^(blocks after part i): Horner over the parts, then
  // the whole's length block. src/storage/store/tags.ts: a block's tag from its granules'.
  void Combine(const uint8_t (*parts)[16], const uint8_t* zero, const size_t* lens, size_t count, uint8_t out[16]) const;

 private:
  static constexpr int kPowers = 32;
  // powers_[j] = H^(j+1), byte-reversed (the form the multiply takes): 16 of them for the
  // 256-bit steps, 32 for the 512-bit ones
  alignas(32) uint8_t powers_[kPowers][16];
  // H^cachedBlocks_ (byte-reversed), the step of Combine over equal parts (granules)
  mutable size_t cachedBlocks_ = 0;
  alignas(16) mutable uint8_t cachedPower_[16] = {0};
};

}  // namespace disksnap
