// Entry point of disksnap.node. The contract it implements is `NativeAddon` in src/engine/native.ts;
// src/engine/native.ts is the only module that loads it, and it calls setErrorClass(DisksnapError)
// once so that every failure here is thrown (or rejected) as that class.
#include <napi.h>

#include "addon.h"
#include "error.h"

#ifndef DISKSNAP_VERSION
#define DISKSNAP_VERSION "0.0.0"
#endif

namespace disksnap {

namespace {

Napi::Value SetErrorClass(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsFunction()) {
    Napi::TypeError::New(env, "setErrorClass: argument 1 must be a constructor")
        .ThrowAsJavaScriptException();
    return Napi::Value();
  }
  AddonData* data = env.GetInstanceData<AddonData>();
  data->errorClass = Napi::Persistent(info[0].As<Napi::Function>());
  return env.Undefined();
}

}  // namespace

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData(new AddonData());  // deleted by napi when the environment goes away
  exports.Set("version", Napi::String::New(env, DISKSNAP_VERSION));
  exports.Set("setErrorClass", Napi::Function::New(env, SetErrorClass, "setErrorClass"));
  InitFile(env, exports);
  InitHash(env, exports);
  InitGcm(env, exports);
  InitObject(env, exports);
  InitLoop(env, exports);
  InitFuse(env, exports);
  InitQcow2(env, exports);
  InitSorted(env, exports);
  InitRecords(env, exports);
  InitManifest(env, exports);
  return exports;
}

}  // namespace disksnap

static Napi::Object InitDisksnap(Napi::Env env, Napi::Object exports) {
  return disksnap::Init(env, exports);
}

NODE_API_MODULE(disksnap, InitDisksnap)
