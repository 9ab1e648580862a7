// JS bindings of the block hasher: hashBlocks / hashBlocksAsync (bytes in memory), hashFile
// (reads and hashes a file range off the event loop, with throttled progress) and isZero.
// Results are two flat buffers (32 digest bytes and one zero flag per block), never a JS
// object per block.
#include <napi.h>

#include <vector>

#include "addon.h"
#include "args.h"
#include "error.h"
#include "hash_engine.h"
#include "worker.h"

namespace disksnap {

namespace {

struct HashArgs {
  Bytes buf;
  uint64_t blockSize = 0;
  int32_t threads = 0;
  bool keyed = false;
  std::vector<uint8_t> key;
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

bool ParseHash(const Napi::CallbackInfo& info, HashArgs* a) {
  return ArgBytes(info, 0, "buf", &a->buf) && ArgBlockSize(info, 1, &a->blockSize) &&
         ArgI32(info, 2, "threads", &a->threads) && ArgKey(info, 3, &a->keyed, &a->key);
}

// The two result buffers, allocated on the main thread.
struct Outputs {
  Napi::Buffer<uint8_t> digests;
  Napi::Uint8Array zero;
};

bool AllocOutputs(Napi::Env env, uint64_t nblocks, Outputs* out) {
  if (nblocks > (uint64_t{1} << 32) / kDigestLength) {
    ThrowInvalid(env, "too many blocks for one call: " + std::to_string(nblocks));
    return false;
  }
  out->digests = Napi::Buffer<uint8_t>::New(env, static_cast<size_t>(nblocks * kDigestLength));
  if (env.IsExceptionPending()) return false;
  out->zero = Napi::Uint8Array::New(env, static_cast<size_t>(nblocks));
  return !env.IsExceptionPending();
}

Napi::Object ResultObject(Napi::Env env, Napi::Value digests, Napi::Value zero) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("digests", digests);
  o.Set("zero", zero);
  return o;
}

uint64_t BlockCount(uint64_t length, uint64_t blockSize) {
  return length == 0 ? 0 : (length - 1) / blockSize + 1;
}

Napi::Value HashBlocks(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  HashArgs a;
  Outputs out;
  if (!ParseHash(info, &a) || !AllocOutputs(env, BlockCount(a.buf.length, a.blockSize), &out))
    return Napi::Value();
  SysError err = HashBuffer(a.buf.data, a.buf.length, a.blockSize, a.threads,
                            a.keyed ? &a.key : nullptr, out.digests.Data(), out.zero.Data());
  if (err.failed()) {
    Throw(env, err);
    return Napi::Value();
  }
  return ResultObject(env, out.digests, out.zero);
}

class HashBlocksWorker : public PromiseWorker {
 public:
  HashBlocksWorker(Napi::Env env, HashArgs args, Outputs& out)
      : PromiseWorker(env, "disksnap.hashBlocks"),
        args_(std::move(args)),
        digestsData_(out.digests.Data()),
        zeroData_(out.zero.Data()),
        digests_(Napi::Persistent(out.digests.As<Napi::Value>())),
        zero_(Napi::Persistent(out.zero.As<Napi::Value>())) {}

 protected:
  void Execute() override {
    error_ = HashBuffer(args_.buf.data, args_.buf.length, args_.blockSize, args_.threads,
                        args_.keyed ? &args_.key : nullptr, digestsData_, zeroData_);
  }
  Napi::Value Result(Napi::Env env) override {
    return ResultObject(env, digests_.Value(), zero_.Value());
  }

 private:
  HashArgs args_;
  uint8_t* digestsData_;
  uint8_t* zeroData_;
  Napi::Reference<Napi::Value> digests_;
  Napi::Reference<Napi::Value> zero_;
};

Napi::Value HashBlocksAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  HashArgs a;
  Outputs out;
  if (!ParseHash(info, &a) || !AllocOutputs(env, BlockCount(a.buf.length, a.blockSize), &out))
    return RejectPending(env);
  auto* worker = new HashBlocksWorker(env, std::move(a), out);
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
  HashFileWorker(Napi::Env env, std::vector<uint8_t> key, bool keyed, Outputs& out)
      : PromiseWorkerT(env, "disksnap.hashFile"),
        key_(std::move(key)),
        digests_(Napi::Persistent(out.digests.As<Napi::Value>())),
        zero_(Napi::Persistent(out.zero.As<Napi::Value>())) {
    job_.key = keyed ? &key_ : nullptr;
    job_.digests = out.digests.Data();
    job_.zero = out.zero.Data();
  }

  FileHashJob& job() { return job_; }
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
    return ResultObject(env, digests_.Value(), zero_.Value());
  }

 private:
  static constexpr int kTickMs = 100;  // progress at most ten times a second
  bool reportProgress_ = false;
  std::vector<uint8_t> key_;
  FileHashJob job_;
  Napi::Reference<Napi::Value> digests_;
  Napi::Reference<Napi::Value> zero_;
  Napi::FunctionReference onProgress_;
};

Napi::Value HashFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  uint64_t offset, length, blockSize;
  int32_t threads;
  bool keyed = false;
  std::vector<uint8_t> key;
  if (!ArgFd(info, 0, "fd", &fd) || !ArgU64(info, 1, "offset", &offset) ||
      !ArgU64(info, 2, "length", &length) || !ArgBlockSize(info, 3, &blockSize) ||
      !ArgI32(info, 4, "threads", &threads) || !ArgKey(info, 5, &keyed, &key))
    return RejectPending(env);
  if (!info[6].IsUndefined() && !info[6].IsNull() && !info[6].IsFunction()) {
    ThrowInvalid(env, "argument 7 (onProgress) must be a function");
    return RejectPending(env);
  }
  if (offset + length > static_cast<uint64_t>(kMaxSafe)) {
    ThrowInvalid(env, "hashFile: offset + length is beyond 2^53");
    return RejectPending(env);
  }
  Outputs out;
  if (!AllocOutputs(env, BlockCount(length, blockSize), &out)) return RejectPending(env);
  auto* worker = new HashFileWorker(env, std::move(key), keyed, out);
  FileHashJob& job = worker->job();
  job.fd = fd;
  job.offset = offset;
  job.length = length;
  job.blockSize = static_cast<size_t>(blockSize);
  job.threads = threads;
  if (info[6].IsFunction()) {
    worker->SetProgress(info[6].As<Napi::Function>());
  }
  return worker->Start();
}

Napi::Value IsZero(const Napi::CallbackInfo& info) {
  Bytes b;
  if (!ArgBytes(info, 0, "buf", &b)) return Napi::Value();
  return Napi::Boolean::New(info.Env(), IsAllZero(b.data, b.length));
}

}  // namespace

void InitHash(Napi::Env env, Napi::Object exports) {
  exports.Set("hashBlocks", Napi::Function::New(env, HashBlocks, "hashBlocks"));
  exports.Set("hashBlocksAsync", Napi::Function::New(env, HashBlocksAsync, "hashBlocksAsync"));
  exports.Set("hashFile", Napi::Function::New(env, HashFile, "hashFile"));
  exports.Set("isZero", Napi::Function::New(env, IsZero, "isZero"));
}

}  // namespace disksnap
