// See block_tag.h. The cipher is node's own OpenSSL, as for hashing and sealing.
#include "block_tag.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <string.h>

#include <algorithm>

namespace disksnap {

namespace {

const EVP_CIPHER* Gcm() {
  static const EVP_CIPHER* cipher = [] {
    EVP_CIPHER* fetched = EVP_CIPHER_fetch(nullptr, "AES-256-GCM", nullptr);
    return fetched != nullptr ? static_cast<const EVP_CIPHER*>(fetched) : EVP_aes_256_gcm();
  }();
  return cipher;
}

constexpr uint8_t kZeroIv[kTagIvLength] = {0};

// GCM's hash key H = AES_K(0^128).
bool HashKey(const std::vector<uint8_t>& key, uint8_t h[16]) {
  EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
  if (c == nullptr) return false;
  const uint8_t zero[16] = {0};
  int outl = 0;
  const bool ok = EVP_EncryptInit_ex(c, EVP_aes_256_ecb(), nullptr, key.data(), nullptr) == 1 &&
                  EVP_CIPHER_CTX_set_padding(c, 0) == 1 && EVP_EncryptUpdate(c, h, &outl, zero, 16) == 1 &&
                  outl == 16;
  EVP_CIPHER_CTX_free(c);
  return ok;
}

}  // namespace

BlockTagger::BlockTagger(const std::vector<uint8_t>& key) {
  if (key.size() != kTagKeyLength) return;
  EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
  if (c == nullptr) return;
  ctx_ = c;
  // The key schedule once; each tag below only sets a new IV.
  if (EVP_EncryptInit_ex(c, Gcm(), nullptr, nullptr, nullptr) != 1) return;
  if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, kTagIvLength, nullptr) != 1) return;
  if (EVP_EncryptInit_ex(c, nullptr, nullptr, key.data(), nullptr) != 1) return;
  ok_ = Gmac(kZeroIv, nullptr, 0, mask0_);
  if (ok_ && FastGhash::Available()) {
    uint8_t h[16];
    if (HashKey(key, h)) fast_.reset(new FastGhash(h));
    OPENSSL_cleanse(h, sizeof h);
  }
}

BlockTagger::~BlockTagger() {
  if (ctx_ != nullptr) EVP_CIPHER_CTX_free(static_cast<EVP_CIPHER_CTX*>(ctx_));
  OPENSSL_cleanse(mask0_, sizeof mask0_);
}

bool BlockTagger::Gmac(const uint8_t* iv, const uint8_t* p, size_t n, uint8_t* out) {
  EVP_CIPHER_CTX* c = static_cast<EVP_CIPHER_CTX*>(ctx_);
  if (EVP_EncryptInit_ex(c, nullptr, nullptr, nullptr, iv) != 1) return false;
  int outl = 0;
  for (size_t done = 0; done < n;) {  // EVP lengths are ints
    int len = static_cast<int>(std::min<size_t>(n - done, size_t{1} << 30));
    if (EVP_EncryptUpdate(c, nullptr, &outl, p + done, len) != 1) return false;
    done += static_cast<size_t>(len);
  }
  uint8_t fin[16];
  if (EVP_EncryptFinal_ex(c, fin, &outl) != 1 || outl != 0) return false;
  return EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, kTagLength, out) == 1;
}

bool BlockTagger::Unmasked(const uint8_t* p, size_t n, uint8_t* out) {
  if (ok_ && fast_) {
    fast_->Tag(p, n, out);
    return true;
  }
  if (!ok_ || !Gmac(kZeroIv, p, n, out)) return false;
  for (size_t i = 0; i < kTagLength; i++) out[i] ^= mask0_[i];
  return true;
}

bool BlockTagger::Combine(const uint8_t* parts, const uint8_t* zero, const size_t* lens, size_t count, uint8_t* out) {
  if (!ok_ || !fast_) return false;
  fast_->Combine(reinterpret_cast<const uint8_t(*)[16]>(parts), zero, lens, count, out);
  return true;
}

bool BlockTagger::Mask(const uint8_t* iv, uint8_t* out) { return ok_ && Gmac(iv, nullptr, 0, out); }

}  // namespace disksnap
