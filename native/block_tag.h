// Quick change tags of blocks: GMAC (AES-256-GCM with the block as additional data and
// nothing to encrypt) under a secret tag key. src/storage/store/tags.ts explains their use: an
// incremental snapshot compares a block's tag with its parent's instead of hashing it with
// SHA-256, and GHASH runs ~6x faster than SHA-256 on this project's VMs.
//
// GMAC(K, IV, A) = GHASH_H(A) ^ E_K(J0(IV)): a polynomial hash of the data, masked by one AES
// block that depends on the IV only. The tagger returns the unmasked part, u = GHASH_H(A)
// (computed as GMAC under a fixed IV, xor the same IV's mask), so that one pass over a block
// serves every IV; Mask(IV) = E_K(J0(IV)) = GMAC(K, IV, empty). A stored tag is u ^ Mask(IV)
// for an IV used with no other data; u itself must never leave the process (two u of
// different data would give away H). Where the CPU has VPCLMULQDQ, u is computed by ghash.h
// from H = AES_K(0^128) instead (same value, ~2-3x faster than OpenSSL 3.0's GMAC here).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "ghash.h"

namespace disksnap {

constexpr size_t kTagLength = 16;
constexpr size_t kTagIvLength = 16;
constexpr size_t kTagKeyLength = 32;

// One thread's tagger. Not thread-safe; create one per thread.
class BlockTagger {
 public:
  explicit BlockTagger(const std::vector<uint8_t>& key);
  ~BlockTagger();
  BlockTagger(const BlockTagger&) = delete;
  BlockTagger& operator=(const BlockTagger&) = delete;

  bool ok() const { return ok_; }
  // u = GHASH_H(p[0..n)) into out[0..16). False on an OpenSSL failure.
  bool Unmasked(const uint8_t* p, size_t n, uint8_t* out);
  // The u of `count` consecutive parts' bytes from each part's u (FastGhash::Combine: every
  // part but the last a multiple of 16 bytes; zero[i]: part i is all zeros, parts[i] unread).
  // False where there is no FastGhash (the caller then tags the whole again).
  bool Combine(const uint8_t* parts, const uint8_t* zero, const size_t* lens, size_t count, uint8_t* out);
  // E_K(J0(iv)) for a 16-byte iv into out[0..16).
  bool Mask(const uint8_t* iv, uint8_t* out);

 private:
  bool Gmac(const uint8_t* iv, const uint8_t* p, size_t n, uint8_t* out);
  void* ctx_ = nullptr;  // EVP_CIPHER_CTX* with the key set
  bool ok_ = false;
  std::unique_ptr<FastGhash> fast_;  // where the CPU has it: Unmasked without OpenSSL (ghash.h)
  uint8_t mask0_[kTagLength] = {0};  // the mask of the all-zero IV
};

}  // namespace disksnap
