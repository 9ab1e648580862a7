// JS bindings of the block hasher: hashBlocks / hashBlocksAsync (bytes in memory), hashFile
// (reads and hashes a file range off the event loop, with throttled progress) and isZero.
// Results are two flat buffers (32 digest bytes and one zero flag per block), never a JS
// object per block. With a tag key, hashBlocksAsync also returns each block's unmasked change
// tag (16 bytes, block_tag.h); tagFile reads a file range for tags and zero flags only (no
// SHA-256), and tagMasks gives the masks that turn unmasked tags into stored ones.
#include <napi.h>
#include <errno.h>
#include <openssl/crypto.h>
#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <vector>

#include "addon.h"
#include "args.h"
#include "error.h"
#include "block_tag.h"
#include "hash_engine.h"
#include "io.h"
#include "worker.h"

namespace disksnap {

namespace {

struct HashArgs {
  Bytes buf;
  uint64_t blockSize = 0;
  int32_t threads = 0;
  bool keyed = false;
  std::vector<uint8_t> key;
  bool tagged = false;
  std::vector<uint8_t> tagKey;
  uint64_t granuleSize = 0;  // hashBlocksAsync's optional 6th argument: granule tags too
  int readFd = -1;  // hashBlocksAsync's optional 7th and 8th: read `reads` into buf first
  std::vector<IoRequest> reads;
};

bool ArgBlockSize(const Napi::CallbackInfo& info, size_t i, uint64_t* out) {
  if (!ArgU64(info, i, "blockSize", out)) return false;
  if (*out == 0 || *out > (uint64_t{1} << 31)) {
    ThrowInvalid(info.Env(), "blockSize must be between 1 and 2^31 bytes");
    return false;
  }
  return true;
}

// An absent (undefined/null) key means plain SHA-256; a key, even an empty one, means HMAC.
bool ArgKey(const Napi::CallbackInfo& info, size_t i, bool* keyed, std::vector<uint8_t>* key) {
  if (info[i].IsUndefined() || info[i].IsNull()) {
    *keyed = false;
    return true;
  }
  Bytes k;
  if (!ArgBytes(info, i, "key", &k)) return false;
  *keyed = true;
  key->assign(k.data, k.data + k.length);
  return true;
}

// A tag key: absent (undefined/null) for none, else exactly 32 bytes.
bool ArgTagKey(const Napi::CallbackInfo& info, size_t i, bool* tagged, std::vector<uint8_t>* key) {
  if (info[i].IsUndefined() || info[i].IsNull()) {
    *tagged = false;
    return true;
  }
  Bytes k;
  if (!ArgBytes(info, i, "tagKey", &k)) return false;
  if (k.length != kTagKeyLength) {
    ThrowInvalid(info.Env(), "tagKey must be " + std::to_string(kTagKeyLength) + " bytes, not " + std::to_string(k.length));
    return false;
  }
  *tagged = true;
  key->assign(k.data, k.data + k.length);
  return true;
}

bool ParseHash(const Napi::CallbackInfo& info, HashArgs* a) {
  return ArgBytes(info, 0, "buf", &a->buf) && ArgBlockSize(info, 1, &a->blockSize) &&
         ArgI32(info, 2, "threads", &a->threads) && ArgKey(info, 3, &a->keyed, &a->key) &&
         ArgTagKey(info, 4, &a->tagged, &a->tagKey);
}

// hashBlocksAsync's optional granule size (argument 5): absent for none; else a divisor of
// the block size, with a tag key.
bool ArgGranuleSize(const Napi::CallbackInfo& info, size_t i, HashArgs* a) {
  if (info[i].IsUndefined() || info[i].IsNull()) return true;
  if (!ArgU64(info, i, "granuleSize", &a->granuleSize)) return false;
  if (a->granuleSize == 0 || a->blockSize % a->granuleSize != 0 || !a->tagged) {
    ThrowInvalid(info.Env(), "granuleSize must divide blockSize, and needs a tagKey");
    return false;
  }
  return true;
}

// hashBlocksAsync's optional read (arguments 6 and 7): a file descriptor and [fileOffset,
// bufferOffset, length] triples, buffer offsets within buf, read (as preadBatchAsync) by the
// same pool job before hashing. Why: a read then a hash as two jobs made the hash wait for the
// event loop between them, and an incremental's loop is busy merging the previous group then
// (session 34: 32 groups of a scattered qcow2 incremental waited ~80 ms in all).
bool ArgRead(const Napi::CallbackInfo& info, size_t i, HashArgs* a) {
  if (info[i].IsUndefined() || info[i].IsNull()) return true;
  return ArgFd(info, i, "fd", &a->readFd) && ArgRequests(info, i + 1, a->buf.length, &a->reads);
}

// The result buffers, allocated on the main thread; each one is empty when not asked for.
struct Outputs {
  Napi::Buffer<uint8_t> digests;
  Napi::Uint8Array zero;
  Napi::Buffer<uint8_t> tags;
  Napi::Uint8Array granuleZero;
  Napi::Buffer<uint8_t> granuleTags;
  uint8_t* digestsData() { return digests.IsEmpty() ? nullptr : digests.Data(); }
  uint8_t* tagsData() { return tags.IsEmpty() ? nullptr : tags.Data(); }
};

bool AllocOutputs(Napi::Env env, uint64_t nblocks, Outputs* out, bool digests = true, bool tags = false) {
  if (nblocks > (uint64_t{1} << 32) / kDigestLength) {
    ThrowInvalid(env, "too many blocks for one call: " + std::to_string(nblocks));
    return false;
  }
  if (digests) {
    out->digests = Napi::Buffer<uint8_t>::New(env, static_cast<size_t>(nblocks * kDigestLength));
    if (env.IsExceptionPending()) return false;
  }
  if (tags) {
    out->tags = Napi::Buffer<uint8_t>::New(env, static_cast<size_t>(nblocks * kTagLength));
    if (env.IsExceptionPending()) return false;
  }
  out->zero = Napi::Uint8Array::New(env, static_cast<size_t>(nblocks));
  return !env.IsExceptionPending();
}

// Persistent references to the outputs, for workers that settle later.
struct OutputRefs {
  explicit OutputRefs(Outputs& out) {
    if (!out.digests.IsEmpty()) digests = Napi::Persistent(out.digests.As<Napi::Value>());
    zero = Napi::Persistent(out.zero.As<Napi::Value>());
    if (!out.tags.IsEmpty()) tags = Napi::Persistent(out.tags.As<Napi::Value>());
    if (!out.granuleTags.IsEmpty()) {
      granuleTags = Napi::Persistent(out.granuleTags.As<Napi::Value>());
      granuleZero = Napi::Persistent(out.granuleZero.As<Napi::Value>());
    }
  }
  Napi::Object Result(Napi::Env env) {
    Napi::Object o = Napi::Object::New(env);
    if (!digests.IsEmpty()) o.Set("digests", digests.Value());
    o.Set("zero", zero.Value());
    if (!tags.IsEmpty()) o.Set("tags", tags.Value());
    if (!granuleTags.IsEmpty()) {
      Napi::Object g = Napi::Object::New(env);
      g.Set("tags", granuleTags.Value());
      g.Set("zero", granuleZero.Value());
      o.Set("granules", g);
    }
    return o;
  }
  Napi::Reference<Napi::Value> digests, zero, tags, granuleZero, granuleTags;
};

uint64_t BlockCount(uint64_t length, uint64_t blockSize) {
  return length == 0 ? 0 : (length - 1) / blockSize + 1;
}

Napi::Value HashBlocks(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  HashArgs a;
  Outputs out;
  if (!ParseHash(info, &a) ||
      !AllocOutputs(env, BlockCount(a.buf.length, a.blockSize), &out, true, a.tagged))
    return Napi::Value();
  SysError err = HashBuffer(a.buf.data, a.buf.length, a.blockSize, a.threads,
                            a.keyed ? &a.key : nullptr, out.digests.Data(), out.zero.Data(),
                            a.tagged ? &a.tagKey : nullptr, out.tagsData());
  OPENSSL_cleanse(a.tagKey.data(), a.tagKey.size());
  if (err.failed()) {
    Throw(env, err);
    return Napi::Value();
  }
  return OutputRefs(out).Result(env);
}

class HashBlocksWorker : public PromiseWorker {
 public:
  // Without a digests output (tagBlocksAsync): zero flags and tags only, no SHA-256.
  HashBlocksWorker(Napi::Env env, HashArgs args, Outputs& out, const char* name = "disksnap.hashBlocks")
      : PromiseWorker(env, name),
        args_(std::move(args)),
        digestsData_(out.digestsData()),
        zeroData_(out.zero.Data()),
        tagsData_(out.tagsData()),
        refs_(out) {
    if (!out.granuleTags.IsEmpty()) granules_ = GranuleOut{static_cast<size_t>(args_.granuleSize), out.granuleZero.Data(), out.granuleTags.Data()};
  }

 protected:
  void Execute() override {
    // A hash with a read: the hashing threads read their own ranges just before hashing them
    // (ReadFill), so the read is spread over the threads and what it wrote is still in cache
    // when the hash reads it. Before, this job read every request first, on one thread: a full
    // snapshot's 16 MiB chunk took ~7-9 ms to read beside ~7 ms to hash (session 40, AMD EPYC).
    RangeFill fill;
    const bool fused = args_.readFd >= 0 && digestsData_ != nullptr &&
                       ReadFill(args_.readFd, args_.buf.data, args_.reads.data(), args_.reads.size(), &fill);
    if (args_.readFd >= 0 && !fused) {
      uint64_t total = 0;
      error_ = PreadBatch(args_.readFd, args_.buf.data, args_.reads.data(), args_.reads.size(), &total);
      if (error_.failed()) {
        OPENSSL_cleanse(args_.tagKey.data(), args_.tagKey.size());
        return;
      }
    }
    if (digestsData_ == nullptr)
      error_ = TagBuffer(args_.buf.data, args_.buf.length, args_.blockSize, args_.threads, args_.tagKey, zeroData_, tagsData_);
    else
      error_ = HashBuffer(args_.buf.data, args_.buf.length, args_.blockSize, args_.threads,
                          args_.keyed ? &args_.key : nullptr, digestsData_, zeroData_,
                          args_.tagged ? &args_.tagKey : nullptr, tagsData_,
                          granules_.tags != nullptr ? &granules_ : nullptr, fused ? &fill : nullptr);
    OPENSSL_cleanse(args_.tagKey.data(), args_.tagKey.size());
  }
  Napi::Value Result(Napi::Env env) override { return refs_.Result(env); }

 private:
  HashArgs args_;
  uint8_t* digestsData_;
  uint8_t* zeroData_;
  uint8_t* tagsData_;
  GranuleOut granules_;
  OutputRefs refs_;
};

Napi::Value HashBlocksAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  HashArgs a;
  Outputs out;
  if (!ParseHash(info, &a) || !ArgGranuleSize(info, 5, &a) || !ArgRead(info, 6, &a) ||
      !AllocOutputs(env, BlockCount(a.buf.length, a.blockSize), &out, true, a.tagged))
    return RejectPending(env);
  if (a.granuleSize) {
    const size_t n = static_cast<size_t>(BlockCount(a.buf.length, a.blockSize) * (a.blockSize / a.granuleSize));
    out.granuleTags = Napi::Buffer<uint8_t>::New(env, n * kTagLength);
    out.granuleZero = Napi::Uint8Array::New(env, n);
    if (env.IsExceptionPending()) return RejectPending(env);
  }
  auto* worker = new HashBlocksWorker(env, std::move(a), out);
  worker->Keep(info[0]);
  return worker->Start();
}

// ---------------------------------------------------------------------------------------------
// hashSpansAsync(buf, spans, threads, key?): the digest of each [offset, length] pair of
// `spans` (a Float64Array) within buf, 32 bytes each in that order. For objects scattered in a
// buffer (a tag scan's pieces and whole blocks): one pool job, the spans split between the
// threads and hashed two at a time where SHA-NI allows, where node's createHash on the main
// thread had taken ~11 ms of a 1 GiB raw incremental's ~130 (session 42, 164 pieces of 64 KiB).

class HashSpansWorker : public PromiseWorker {
 public:
  HashSpansWorker(Napi::Env env, Bytes buf, std::vector<size_t> offs, int threads, bool keyed,
                  std::vector<uint8_t> key, Napi::Buffer<uint8_t> out)
      : PromiseWorker(env, "disksnap.hashSpans"), buf_(buf), offs_(std::move(offs)), threads_(threads),
        keyed_(keyed), key_(std::move(key)), out_(out.Data()), ref_(Napi::Persistent(out)) {}
  ~HashSpansWorker() override { OPENSSL_cleanse(key_.data(), key_.size()); }

 protected:
  void Execute() override {
    // Threads claim two spans at a time (one SHA-NI pair), so pieces and whole blocks mixed in
    // one call still spread evenly.
    const size_t n = offs_.size() / 2;
    const int t = static_cast<int>(std::min<size_t>((n + 1) / 2, static_cast<size_t>(ResolveThreads(threads_))));
    std::atomic<size_t> next{0};
    std::atomic<bool> failed{false};
    ParallelFor(std::max(t, 1), [&](int) {
      BlockHasher h(keyed_ ? &key_ : nullptr);
      if (!h.ok()) {
        failed = true;
        return;
      }
      for (size_t i; !failed && (i = next.fetch_add(2)) < n;)
        if (!h.Spans(buf_.data, offs_.data() + 2 * i, std::min<size_t>(2, n - i), out_ + i * kDigestLength)) failed = true;
    });
    if (failed) error_ = SysError::Custom("ECRYPTO", 0, "SHA-256 failed inside OpenSSL");
  }
  Napi::Value Result(Napi::Env) override { return ref_.Value(); }

 private:
  Bytes buf_;
  std::vector<size_t> offs_;
  int threads_;
  bool keyed_;
  std::vector<uint8_t> key_;
  uint8_t* out_;
  Napi::Reference<Napi::Buffer<uint8_t>> ref_;
};

Napi::Value HashSpansAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Bytes buf;
  int32_t threads = 0;
  bool keyed = false;
  std::vector<uint8_t> key;
  std::vector<size_t> offs;
  if (!ArgBytes(info, 0, "buf", &buf) || !ArgSpans(info, 1, buf.length, &offs)) return RejectPending(env);
  if (!ArgI32(info, 2, "threads", &threads) || !ArgKey(info, 3, &keyed, &key)) return RejectPending(env);
  Napi::Buffer<uint8_t> out = Napi::Buffer<uint8_t>::New(env, offs.size() / 2 * kDigestLength);
  if (env.IsExceptionPending()) return RejectPending(env);
  auto* worker = new HashSpansWorker(env, buf, std::move(offs), threads, keyed, std::move(key), out);
  worker->Keep(info[0]);
  return worker->Start();
}

// ---------------------------------------------------------------------------------------------
// hashFile

struct Progress {
  double done;
  double total;
};

class HashFileWorker : public PromiseWorkerT<Napi::AsyncProgressWorker<Progress>> {
 public:
  HashFileWorker(Napi::Env env, const char* name, std::vector<uint8_t> key, bool keyed,
                 std::vector<uint8_t> tagKey, Outputs& out)
      : PromiseWorkerT(env, name),
        key_(std::move(key)),
        tagKey_(std::move(tagKey)),
        refs_(out) {
    job_.key = keyed ? &key_ : nullptr;
    job_.digests = out.digestsData();
    job_.zero = out.zero.Data();
    job_.tags = out.tagsData();
    job_.tagKey = job_.tags != nullptr ? &tagKey_ : nullptr;
  }
  ~HashFileWorker() {
    OPENSSL_cleanse(tagKey_.data(), tagKey_.size());
  }

  FileHashJob& job() { return job_; }
  // tagFile's collect mode: the inputs kept alive, the slot output allocated here.
  bool SetCollect(Napi::Env env, const Napi::CallbackInfo& info, const Bytes& expect, const Bytes& known,
                  const Bytes& buf, uint64_t nblocks, uint64_t blockSize, size_t granuleSize) {
    const size_t cap = static_cast<size_t>(buf.length / blockSize);
    Napi::Int32Array slot = Napi::Int32Array::New(env, static_cast<size_t>(nblocks));
    if (env.IsExceptionPending()) return false;
    if (granuleSize != 0) {
      const size_t n = cap * static_cast<size_t>(blockSize / granuleSize);
      Napi::Buffer<uint8_t> gt = Napi::Buffer<uint8_t>::New(env, n * kTagLength);
      Napi::Uint8Array gz = Napi::Uint8Array::New(env, n);
      if (env.IsExceptionPending()) return false;
      job_.collectGranules = GranuleOut{granuleSize, gz.Data(), gt.Data()};
      granuleTags_ = Napi::Persistent(gt.As<Napi::Value>());
      granuleZero_ = Napi::Persistent(gz.As<Napi::Value>());
    }
    for (size_t b = 0; b < nblocks; b++) slot[b] = -1;
    for (size_t i = 6; i <= 8; i++) Keep(info[i]);
    job_.expect = expect.data;
    job_.known = known.data;
    job_.collectBuf = buf.data;
    job_.collectCap = cap;
    job_.slotOf = slot.Data();
    slot_ = Napi::Persistent(slot.As<Napi::Value>());
    return true;
  }
  void SetProgress(Napi::Function fn) {
    onProgress_ = Napi::Persistent(fn);
    reportProgress_ = true;
  }

 protected:
  void Execute(const ExecutionProgress& progress) override {
    const bool report = reportProgress_ && job_.length > 0;
    const double total = static_cast<double>(job_.length);
    double last = -1;
    auto send = [&] {
      double done = static_cast<double>(job_.done.load());
      if (done == last) return;
      last = done;
      Progress p{done, total};
      progress.Send(&p, 1);
    };
    error_ = HashFileRange(&job_, kTickMs, report ? std::function<void()>(send) : nullptr);
    // The last report says "all done"; it reaches JS before the promise settles.
    if (report && !error_.failed() && !job_.cancel) send();
  }

  void OnProgress(const Progress* data, size_t count) override {
    if (data == nullptr || count == 0 || onProgress_.IsEmpty() || HasJsError()) return;
    Napi::Env env = Env();
    onProgress_.Call({Napi::Number::New(env, data[count - 1].done),
                      Napi::Number::New(env, data[count - 1].total)});
    if (env.IsExceptionPending()) {
      // A throwing progress callback stops the work and becomes the rejection.
      RejectWith(env.GetAndClearPendingException().Value());
      job_.cancel = true;
    }
  }

  Napi::Value Result(Napi::Env env) override {
    Napi::Object o = refs_.Result(env);
    if (!slot_.IsEmpty()) {
      o.Set("slot", slot_.Value());
      o.Set("collected", Napi::Number::New(env, static_cast<double>(std::min(job_.collected.load(), job_.collectCap))));
    }
    if (!granuleTags_.IsEmpty()) {
      o.Set("granuleTags", granuleTags_.Value());
      o.Set("granuleZero", granuleZero_.Value());
    }
    return o;
  }

 private:
  static constexpr int kTickMs = 100;  // progress at most ten times a second
  Napi::Reference<Napi::Value> slot_;
  Napi::Reference<Napi::Value> granuleTags_;
  Napi::Reference<Napi::Value> granuleZero_;
  bool reportProgress_ = false;
  std::vector<uint8_t> key_;
  std::vector<uint8_t> tagKey_;
  FileHashJob job_;
  OutputRefs refs_;
  Napi::FunctionReference onProgress_;
};

// The file range arguments shared by hashFile and tagFile: fd, offset, length, blockSize,
// threads (arguments 0-4).
struct FileRange {
  int fd;
  uint64_t offset, length, blockSize;
  int32_t threads;
};

bool ParseFileRange(const Napi::CallbackInfo& info, const char* fn, FileRange* r) {
  if (!ArgFd(info, 0, "fd", &r->fd) || !ArgU64(info, 1, "offset", &r->offset) ||
      !ArgU64(info, 2, "length", &r->length) || !ArgBlockSize(info, 3, &r->blockSize) ||
      !ArgI32(info, 4, "threads", &r->threads))
    return false;
  if (r->offset + r->length > static_cast<uint64_t>(kMaxSafe)) {
    ThrowInvalid(info.Env(), std::string(fn) + ": offset + length is beyond 2^53");
    return false;
  }
  return true;
}

// Allocates the outputs and starts a worker over the range: SHA-256 digests when `digests`
// (HMAC with a key), unmasked change tags with a tag key.
Napi::Value StartFileWorker(Napi::Env env, const char* name, const FileRange& r, bool digests,
                            std::vector<uint8_t> key, bool keyed, std::vector<uint8_t> tagKey,
                            bool tagged, Napi::Value onProgress,
                            const std::function<bool(HashFileWorker*)>& setup = nullptr) {
  Outputs out;
  if (!AllocOutputs(env, BlockCount(r.length, r.blockSize), &out, digests, tagged))
    return RejectPending(env);
  auto* worker = new HashFileWorker(env, name, std::move(key), keyed, std::move(tagKey), out);
  FileHashJob& job = worker->job();
  job.fd = r.fd;
  job.offset = r.offset;
  job.length = r.length;
  job.blockSize = static_cast<size_t>(r.blockSize);
  job.threads = r.threads;
  if (onProgress.IsFunction()) worker->SetProgress(onProgress.As<Napi::Function>());
  if (setup && !setup(worker)) {
    delete worker;
    return RejectPending(env);
  }
  return worker->Start();
}

Napi::Value HashFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  FileRange r;
  bool keyed = false, tagged = false;
  std::vector<uint8_t> key, tagKey;
  if (!ParseFileRange(info, "hashFile", &r) || !ArgKey(info, 5, &keyed, &key)) return RejectPending(env);
  if (!info[6].IsUndefined() && !info[6].IsNull() && !info[6].IsFunction()) {
    ThrowInvalid(env, "argument 7 (onProgress) must be a function");
    return RejectPending(env);
  }
  if (!ArgTagKey(info, 7, &tagged, &tagKey)) return RejectPending(env);
  return StartFileWorker(env, "disksnap.hashFile", r, true, std::move(key), keyed, std::move(tagKey),
                         tagged, info[6]);
}

// tagFile(fd, offset, length, blockSize, threads, tagKey[, expect, known, buf[, granuleSize]])
//   -> Promise<{ tags, zero[, slot, collected[, granuleTags, granuleZero]] }>: reads the range
// like hashFile, but computes only zero flags and unmasked change tags. With expect (16 bytes
// per block), known (1 byte per block) and buf, the blocks that changed are also copied into
// buf (FileHashJob's collect mode), for the caller to hash those it stores whole; with a
// granuleSize (dividing blockSize), also each copy's granule tags and zero flags.
Napi::Value TagFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  FileRange r;
  bool tagged = false;
  std::vector<uint8_t> tagKey;
  if (!ParseFileRange(info, "tagFile", &r) || !ArgTagKey(info, 5, &tagged, &tagKey)) return RejectPending(env);
  if (!tagged) {
    ThrowInvalid(env, "tagFile: argument 6 (tagKey) is required");
    return RejectPending(env);
  }
  if (info[6].IsUndefined() || info[6].IsNull())
    return StartFileWorker(env, "disksnap.tagFile", r, false, {}, false, std::move(tagKey), true,
                           env.Undefined());
  Bytes expect, known, buf;
  if (!ArgBytes(info, 6, "expect", &expect) || !ArgBytes(info, 7, "known", &known) ||
      !ArgBytes(info, 8, "buf", &buf))
    return RejectPending(env);
  const uint64_t nblocks = BlockCount(r.length, r.blockSize);
  if (expect.length != nblocks * kTagLength || known.length != nblocks) {
    ThrowInvalid(env, "tagFile: expect must hold 16 bytes and known 1 byte per block of the range");
    return RejectPending(env);
  }
  size_t granuleSize = 0;
  if (!info[9].IsUndefined() && !info[9].IsNull()) {
    uint64_t gs = 0;
    if (!ArgU64(info, 9, "granuleSize", &gs)) return RejectPending(env);
    if (gs == 0 || r.blockSize % gs != 0) {
      ThrowInvalid(env, "tagFile: granuleSize must divide blockSize");
      return RejectPending(env);
    }
    granuleSize = static_cast<size_t>(gs);
  }
  return StartFileWorker(env, "disksnap.tagFile", r, false, {}, false, std::move(tagKey), true,
                         env.Undefined(), [&](HashFileWorker* w) {
                           return w->SetCollect(env, info, expect, known, buf, nblocks, r.blockSize, granuleSize);
                         });
}

// tagBlocksAsync(buf, blockSize, threads, tagKey) -> Promise<{ tags, zero }>: the zero flag
// and unmasked change tag of each block of buf, no SHA-256 (the 64 KiB granules' tags of
// blocks already in memory: src/storage/store/tags.ts).
Napi::Value TagBlocksAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  HashArgs a;
  Outputs out;
  if (!ArgBytes(info, 0, "buf", &a.buf) || !ArgBlockSize(info, 1, &a.blockSize) ||
      !ArgI32(info, 2, "threads", &a.threads) || !ArgTagKey(info, 3, &a.tagged, &a.tagKey))
    return RejectPending(env);
  if (!a.tagged) {
    ThrowInvalid(env, "tagBlocksAsync: argument 4 (tagKey) is required");
    return RejectPending(env);
  }
  if (!AllocOutputs(env, BlockCount(a.buf.length, a.blockSize), &out, false, true)) return RejectPending(env);
  auto* worker = new HashBlocksWorker(env, std::move(a), out, "disksnap.tagBlocks");
  worker->Keep(info[0]);
  return worker->Start();
}

// tagMasks(tagKey, ivs) -> Buffer: E_K(J0(iv)) for each 16-byte iv, 16 bytes each (sync; one
// AES block and a GHASH of the iv per tag).
Napi::Value TagMasks(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  bool tagged = false;
  std::vector<uint8_t> tagKey;
  Bytes ivs;
  if (!ArgTagKey(info, 0, &tagged, &tagKey) || !ArgBytes(info, 1, "ivs", &ivs)) return Napi::Value();
  if (!tagged || ivs.length % kTagIvLength != 0) {
    ThrowInvalid(env, "tagMasks: a 32-byte tag key and a multiple of 16 bytes of IVs are required");
    return Napi::Value();
  }
  Napi::Buffer<uint8_t> out = Napi::Buffer<uint8_t>::New(env, ivs.length / kTagIvLength * kTagLength);
  if (env.IsExceptionPending()) return Napi::Value();
  BlockTagger tagger(tagKey);
  OPENSSL_cleanse(tagKey.data(), tagKey.size());
  bool ok = tagger.ok();
  for (size_t i = 0; ok && i < ivs.length / kTagIvLength; i++)
    ok = tagger.Mask(ivs.data + i * kTagIvLength, out.Data() + i * kTagLength);
  if (!ok) {
    Throw(env, SysError::Custom("ECRYPTO", 0, "GMAC failed inside OpenSSL"));
    return Napi::Value();
  }
  return out;
}

Napi::Value IsZero(const Napi::CallbackInfo& info) {
  Bytes b;
  if (!ArgBytes(info, 0, "buf", &b)) return Napi::Value();
  return Napi::Boolean::New(info.Env(), IsAllZero(b.data, b.length));
}

// What this process hashes with: {sha256: HashImplementation(), ghash: FastGhash::Implementation()}.
Napi::Value HashImplementations(const Napi::CallbackInfo& info) {
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("sha256", HashImplementation());
  o.Set("ghash", FastGhash::Implementation());
  return o;
}

// tagReadCosts(fd) -> { mapped, pread }: what tagFile measured reading this file in this
// process, ns of CPU per MiB read (-1 where not measured): which way its later calls read.
Napi::Value TagReadCosts(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) {
    ThrowInvalid(env, "tagReadCosts: fd must be a number");
    return Napi::Value();
  }
  struct stat st;
  if (::fstat(info[0].As<Napi::Number>().Int32Value(), &st) < 0) {
    Throw(env, SysError::Errno(errno, "fstat"));
    return Napi::Value();
  }
  const auto costs = TagReadCostsOf(st);
  Napi::Object o = Napi::Object::New(env);
  o.Set("mapped", Napi::Number::New(env, static_cast<double>(costs.first)));
  o.Set("pread", Napi::Number::New(env, static_cast<double>(costs.second)));
  return o;
}

}  // namespace

void InitHash(Napi::Env env, Napi::Object exports) {
  exports.Set("tagReadCosts", Napi::Function::New(env, TagReadCosts, "tagReadCosts"));
  exports.Set("hashImplementations", Napi::Function::New(env, HashImplementations, "hashImplementations"));
  exports.Set("hashBlocks", Napi::Function::New(env, HashBlocks, "hashBlocks"));
  exports.Set("hashBlocksAsync", Napi::Function::New(env, HashBlocksAsync, "hashBlocksAsync"));
  exports.Set("hashSpansAsync", Napi::Function::New(env, HashSpansAsync, "hashSpansAsync"));
  exports.Set("hashFile", Napi::Function::New(env, HashFile, "hashFile"));
  exports.Set("isZero", Napi::Function::New(env, IsZero, "isZero"));
  exports.Set("tagFile", Napi::Function::New(env, TagFile, "tagFile"));
  exports.Set("tagBlocksAsync", Napi::Function::New(env, TagBlocksAsync, "tagBlocksAsync"));
  exports.Set("tagMasks", Napi::Function::New(env, TagMasks, "tagMasks"));
}

}  // namespace disksnap
