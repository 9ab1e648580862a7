// AES-256-GCM of block objects in place, on threads of its own: gcmSealAsync / gcmOpenAsync.
//
// The object format is the one src/storage/store/crypto.ts documents (ciphertext, then a 32-byte
// trailer: 12-byte random nonce, 16-byte tag, "DSE1"; AAD "disksnap-block-v1:" || digest),
// and the cipher is node's own OpenSSL (the symbols resolve against the node binary, as for
// hashing). Why here and not node:crypto: every Cipher.update allocates its output, and on
// this project's VM the faults on that fresh memory cost more than AES itself (perf: 33% in
// the AES-NI/PCLMUL loop, the rest page faults and copies; ~1.1 GiB/s per thread), while
// EVP in place runs the same loop over the caller's buffer and nothing else.
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <string.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <vector>

#include "addon.h"
#include "args.h"
#include "error.h"
#include "hash_engine.h"
#include "worker.h"

namespace disksnap {

namespace {

constexpr size_t kKey = 32, kNonce = 12, kTag = 16, kTrailer = 32, kDigest = 32;
constexpr uint8_t kMagic[4] = {'D', 'S', 'E', '1'};
constexpr char kAadPrefix[] = "disksnap-block-v1:";
constexpr size_t kAadPrefixLength = sizeof(kAadPrefix) - 1;

// Per-item result codes of gcmOpen; src/storage/store/crypto-pool.ts words them.
enum OpenCode : uint8_t { kOpenOk = 0, kOpenShort = 1, kOpenMagic = 2, kOpenAuth = 3 };

const EVP_CIPHER* Aes256Gcm() {
  static const EVP_CIPHER* cipher = [] {
    EVP_CIPHER* fetched = EVP_CIPHER_fetch(nullptr, "AES-256-GCM", nullptr);
    return fetched != nullptr ? static_cast<const EVP_CIPHER*>(fetched) : EVP_aes_256_gcm();
  }();
  return cipher;
}

struct CipherCtx {
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  ~CipherCtx() { EVP_CIPHER_CTX_free(ctx); }
};

void MakeAad(const uint8_t* digest, uint8_t* aad) {
  memcpy(aad, kAadPrefix, kAadPrefixLength);
  memcpy(aad + kAadPrefixLength, digest, kDigest);
}

// EVP lengths are ints: feed at most 1 GiB at a time.
bool Update(EVP_CIPHER_CTX* c, bool enc, uint8_t* out, const uint8_t* in, size_t len) {
  for (size_t done = 0; done < len;) {
    int n = static_cast<int>(std::min<size_t>(len - done, size_t{1} << 30));
    int outl = 0;
    int ok = enc ? EVP_EncryptUpdate(c, out + done, &outl, in + done, n)
                 : EVP_DecryptUpdate(c, out + done, &outl, in + done, n);
    if (ok != 1 || outl != n) return false;
    done += static_cast<size_t>(n);
  }
  return true;
}

bool SealOne(EVP_CIPHER_CTX* c, const uint8_t* key, uint8_t* data, size_t len,
             const uint8_t* digest, uint8_t* trailer) {
  uint8_t aad[kAadPrefixLength + kDigest];
  MakeAad(digest, aad);
  uint8_t fin[16];
  int outl = 0;
  if (RAND_bytes(trailer, kNonce) != 1) return false;
  if (EVP_EncryptInit_ex(c, Aes256Gcm(), nullptr, key, trailer) != 1) return false;
  if (EVP_EncryptUpdate(c, nullptr, &outl, aad, sizeof aad) != 1) return false;
  if (!Update(c, true, data, data, len)) return false;
  if (EVP_EncryptFinal_ex(c, fin, &outl) != 1 || outl != 0) return false;
  if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, kTag, trailer + kNonce) != 1) return false;
  memcpy(trailer + kNonce + kTag, kMagic, sizeof kMagic);
  return true;
}

// Returns an OpenCode, or -1 when OpenSSL itself failed. Plaintext of an object that fails
// authentication is zeroed: it never stays behind in `out`.
int OpenOne(EVP_CIPHER_CTX* c, const uint8_t* key, const uint8_t* stored, size_t sLen,
            uint8_t* out, const uint8_t* digest) {
  if (sLen < kTrailer) return kOpenShort;
  const size_t n = sLen - kTrailer;
  const uint8_t* tr = stored + n;
  if (memcmp(tr + kNonce + kTag, kMagic, sizeof kMagic) != 0) return kOpenMagic;
  uint8_t aad[kAadPrefixLength + kDigest];
  MakeAad(digest, aad);
  uint8_t tag[kTag];
  memcpy(tag, tr + kNonce, kTag);
  uint8_t fin[16];
  int outl = 0;
  if (EVP_DecryptInit_ex(c, Aes256Gcm(), nullptr, key, tr) != 1) return -1;
  if (EVP_DecryptUpdate(c, nullptr, &outl, aad, sizeof aad) != 1) return -1;
  if (!Update(c, false, out, stored, n)) return -1;
  if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, kTag, tag) != 1) return -1;
  if (EVP_DecryptFinal_ex(c, fin, &outl) != 1) {
    memset(out, 0, n);
    return kOpenAuth;
  }
  return kOpenOk;
}

// Runs body(ctx, i) for i in [0, n) on up to `threads` threads (this one included), each
// with a cipher context of its own; stops at the first body that returns false (or a context
// that cannot be made) and then returns false.
template <class Body>
bool ForEachItem(size_t n, int threads, Body body) {
  std::atomic<size_t> next{0};
  std::atomic<bool> failed{false};
  auto run = [&] {
    thread_local CipherCtx c;
    for (size_t i; !failed.load() && (i = next.fetch_add(1)) < n;) {
      if (c.ctx == nullptr || !body(c.ctx, i)) failed = true;
    }
  };
  const size_t t = std::max<size_t>(1, std::min<size_t>(static_cast<size_t>(threads > 0 ? threads : 1), n));
  ParallelFor(static_cast<int>(t), [&](int) { run(); });
  return !failed;
}

SysError CryptoError(const char* what) {
  return SysError::Custom("ECRYPTO", 0, std::string("AES-256-GCM failed in OpenSSL (") + what + ")");
}

bool ArgKey32(const Napi::CallbackInfo& info, size_t i, std::vector<uint8_t>* key) {
  Bytes k;
  if (!ArgBytes(info, i, "key", &k)) return false;
  if (k.length != kKey) {
    ThrowInvalid(info.Env(), "key must be 32 bytes");
    return false;
  }
  key->assign(k.data, k.data + k.length);
  return true;
}

// A Float64Array of `width`-tuples of non-negative integers below 2^53.
bool ArgTuples(const Napi::CallbackInfo& info, size_t i, const char* name, size_t width,
               std::vector<uint64_t>* out) {
  if (!info[i].IsTypedArray() || info[i].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array) {
    ThrowInvalid(info.Env(), std::string(name) + " must be a Float64Array");
    return false;
  }
  Napi::Float64Array a = info[i].As<Napi::Float64Array>();
  if (a.ElementLength() % width != 0) {
    ThrowInvalid(info.Env(), std::string(name) + " must hold groups of " + std::to_string(width));
    return false;
  }
  out->resize(a.ElementLength());
  for (size_t k = 0; k < a.ElementLength(); k++) {
    double v = a[k];
    if (!(v >= 0 && v < kMaxSafe) || v != static_cast<double>(static_cast<uint64_t>(v))) {
      ThrowInvalid(info.Env(), std::string(name) + " holds a value that is not a non-negative integer");
      return false;
    }
    (*out)[k] = static_cast<uint64_t>(v);
  }
  return true;
}

class SealWorker : public PromiseWorker {
 public:
  SealWorker(Napi::Env env, std::vector<uint8_t> key, Bytes buf, std::vector<uint64_t> items,
             const uint8_t* digests, int threads, Napi::Buffer<uint8_t> trailers)
      : PromiseWorker(env, "disksnap.gcmSeal"), key_(std::move(key)), buf_(buf),
        items_(std::move(items)), digests_(digests), threads_(threads),
        trailers_(trailers.Data()), trailersRef_(Napi::Persistent(trailers.As<Napi::Value>())) {}
  ~SealWorker() override { OPENSSL_cleanse(key_.data(), key_.size()); }

 protected:
  void Execute() override {
    bool ok = ForEachItem(items_.size() / 2, threads_, [&](EVP_CIPHER_CTX* c, size_t i) {
      return SealOne(c, key_.data(), buf_.data + items_[2 * i], items_[2 * i + 1], digests_ + i * kDigest,
                     trailers_ + i * kTrailer);
    });
    if (!ok) error_ = CryptoError("seal");
  }
  Napi::Value Result(Napi::Env env) override { return trailersRef_.Value(); }

 private:
  std::vector<uint8_t> key_;
  Bytes buf_;
  std::vector<uint64_t> items_;
  const uint8_t* digests_;
  int threads_;
  uint8_t* trailers_;
  Napi::Reference<Napi::Value> trailersRef_;
};

class OpenWorker : public PromiseWorker {
 public:
  OpenWorker(Napi::Env env, std::vector<uint8_t> key, Bytes staging, Bytes out,
             std::vector<uint64_t> items, const uint8_t* digests, int threads, Napi::Uint8Array codes)
      : PromiseWorker(env, "disksnap.gcmOpen"), key_(std::move(key)), staging_(staging), out_(out),
        items_(std::move(items)), digests_(digests), threads_(threads), codes_(codes.Data()),
        codesRef_(Napi::Persistent(codes.As<Napi::Value>())) {}
  ~OpenWorker() override { OPENSSL_cleanse(key_.data(), key_.size()); }

 protected:
  void Execute() override {
    bool ok = ForEachItem(items_.size() / 3, threads_, [&](EVP_CIPHER_CTX* c, size_t i) {
      int r = OpenOne(c, key_.data(), staging_.data + items_[3 * i], items_[3 * i + 1], out_.data + items_[3 * i + 2],
                      digests_ + i * kDigest);
      if (r >= 0) codes_[i] = static_cast<uint8_t>(r);
      return r >= 0;
    });
    if (!ok) error_ = CryptoError("open");
  }
  Napi::Value Result(Napi::Env env) override { return codesRef_.Value(); }

 private:
  std::vector<uint8_t> key_;
  Bytes staging_, out_;
  std::vector<uint64_t> items_;
  const uint8_t* digests_;
  int threads_;
  uint8_t* codes_;
  Napi::Reference<Napi::Value> codesRef_;
};

// gcmSealAsync(key, buf, items: Float64Array [off, len]*, digests: 32 bytes per item, threads)
//   -> Promise<Buffer> of one 32-byte trailer per item; buf's ranges are encrypted in place.
Napi::Value GcmSealAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<uint8_t> key;
  Bytes buf, digests;
  std::vector<uint64_t> items;
  int32_t threads;
  if (!ArgKey32(info, 0, &key) || !ArgBytes(info, 1, "buf", &buf) ||
      !ArgTuples(info, 2, "items", 2, &items) || !ArgBytes(info, 3, "digests", &digests) ||
      !ArgI32(info, 4, "threads", &threads))
    return RejectPending(env);
  const size_t n = items.size() / 2;
  if (digests.length != n * kDigest) {
    ThrowInvalid(env, "digests must hold 32 bytes per item");
    return RejectPending(env);
  }
  for (size_t i = 0; i < n; i++) {
    if (items[2 * i] > buf.length || items[2 * i + 1] > buf.length - items[2 * i]) {
      ThrowInvalid(env, "item " + std::to_string(i) + " lies outside the buffer");
      return RejectPending(env);
    }
  }
  Napi::Buffer<uint8_t> trailers = Napi::Buffer<uint8_t>::New(env, std::max<size_t>(1, n * kTrailer));
  auto* w = new SealWorker(env, std::move(key), buf, std::move(items), digests.data, threads, trailers);
  w->Keep(info[1]);
  w->Keep(info[3]);
  return w->Start();
}

// gcmOpenAsync(key, staging, out, items: Float64Array [sOff, sLen, oOff]*, digests, threads)
//   -> Promise<Uint8Array> of one code per item (0 ok, 1 short, 2 no trailer, 3 failed
//   authentication); each object's plaintext (sLen - 32 bytes) goes to out at oOff.
Napi::Value GcmOpenAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::vector<uint8_t> key;
  Bytes staging, out, digests;
  std::vector<uint64_t> items;
  int32_t threads;
  if (!ArgKey32(info, 0, &key) || !ArgBytes(info, 1, "staging", &staging) ||
      !ArgBytes(info, 2, "out", &out) || !ArgTuples(info, 3, "items", 3, &items) ||
      !ArgBytes(info, 4, "digests", &digests) || !ArgI32(info, 5, "threads", &threads))
    return RejectPending(env);
  const size_t n = items.size() / 3;
  if (digests.length != n * kDigest) {
    ThrowInvalid(env, "digests must hold 32 bytes per item");
    return RejectPending(env);
  }
  for (size_t i = 0; i < n; i++) {
    uint64_t sOff = items[3 * i], sLen = items[3 * i + 1], oOff = items[3 * i + 2];
    uint64_t plain = sLen >= kTrailer ? sLen - kTrailer : 0;
    if (sOff > staging.length || sLen > staging.length - sOff || oOff > out.length ||
        plain > out.length - oOff) {
      ThrowInvalid(env, "item " + std::to_string(i) + " lies outside its buffers");
      return RejectPending(env);
    }
  }
  Napi::Uint8Array codes = Napi::Uint8Array::New(env, n);
  auto* w = new OpenWorker(env, std::move(key), staging, out, std::move(items), digests.data, threads, codes);
  w->Keep(info[1]);
  w->Keep(info[2]);
  w->Keep(info[4]);
  return w->Start();
}

}  // namespace

void InitGcm(Napi::Env env, Napi::Object exports) {
  exports.Set("gcmSealAsync", Napi::Function::New(env, GcmSealAsync, "gcmSealAsync"));
  exports.Set("gcmOpenAsync", Napi::Function::New(env, GcmOpenAsync, "gcmOpenAsync"));
}

}  // namespace disksnap
