// Promise-returning async work on libuv's pool.
//
// A worker is a plain C++ "baton": the binding copies every input on the main thread into the
// worker (numbers, the raw pointer of a buffer plus a reference that keeps the buffer alive),
// Execute() runs on a pool thread and touches no JS value, recording a failure in `error_`;
// OnOK() on the main thread resolves with Result() or rejects with a DisksnapError whose stack
// is the one captured when the call was made.
#pragma once

#include <napi.h>

#include <vector>

#include "error.h"

namespace disksnap {

template <class Base>
class PromiseWorkerT : public Base {
 public:
  PromiseWorkerT(Napi::Env env, const char* name)
      : Base(env, name), deferred_(Napi::Promise::Deferred::New(env)) {
    // Only the structured frames are captured here; V8 formats them if a rejection needs them.
    caller_ = Napi::Persistent(Napi::Error::New(env, "").Value());
  }

  Napi::Promise Promise() { return deferred_.Promise(); }

  // Keeps `value` (typically a buffer the worker reads or writes) alive until completion.
  void Keep(Napi::Value value) { kept_.push_back(Napi::Persistent(value)); }

  // Queues the work and returns the promise.
  Napi::Value Start() {
    Napi::Promise p = Promise();
    this->Queue();
    return p;
  }

 protected:
  // Called on the main thread when Execute() succeeded.
  virtual Napi::Value Result(Napi::Env env) { return env.Undefined(); }

  // Rejects with a JS value raised on the main thread (e.g. by a progress callback), which
  // takes precedence over error_.
  void RejectWith(Napi::Value value) {
    if (jsError_.IsEmpty()) jsError_ = Napi::Persistent(value);
  }
  bool HasJsError() const { return !jsError_.IsEmpty(); }

  SysError error_;

 private:
  void OnOK() override {
    Napi::Env env = this->Env();
    if (!jsError_.IsEmpty()) {
      deferred_.Reject(jsError_.Value());
      return;
    }
    if (error_.failed()) {
      RejectSys(env);
      return;
    }
    Napi::Value result = Result(env);
    if (env.IsExceptionPending()) {
      deferred_.Reject(env.GetAndClearPendingException().Value());
      return;
    }
    deferred_.Resolve(result);
  }

  void OnError(const Napi::Error& e) override { deferred_.Reject(e.Value()); }

  void RejectSys(Napi::Env env) {
    Napi::Value err = MakeError(env, error_);
    if (env.IsExceptionPending()) {
      deferred_.Reject(env.GetAndClearPendingException().Value());
      return;
    }
    AdoptStack(env, err, caller_.Value());
    if (env.IsExceptionPending()) env.GetAndClearPendingException();
    deferred_.Reject(err);
  }

  Napi::Promise::Deferred deferred_;
  Napi::ObjectReference caller_;
  Napi::Reference<Napi::Value> jsError_;
  std::vector<Napi::Reference<Napi::Value>> kept_;
};

using PromiseWorker = PromiseWorkerT<Napi::AsyncWorker>;

// For the async entry points: turns an exception raised while checking arguments into a
// rejected promise, so that a Promise-returning function never throws synchronously.
inline Napi::Value RejectPending(Napi::Env env) {
  // The exception must be cleared first: napi refuses to create a promise while it is pending.
  Napi::Value reason = env.IsExceptionPending()
                           ? env.GetAndClearPendingException().Value()
                           : Napi::Error::New(env, "disksnap: argument check failed").Value();
  Napi::Promise::Deferred d = Napi::Promise::Deferred::New(env);
  d.Reject(reason);
  return d.Promise();
}

}  // namespace disksnap
