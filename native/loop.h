// Loop devices, filesystem freeze and block-device size (native/loop.cc), and the FUSE mount
// plumbing (native/fuse.cc). The typed contract is `LoopAddon` in src/loop/native.ts (merged
// into `NativeAddon` in src/native.ts); the policy (which image may be attached, state
// records, freeze lifetimes) lives in src/loop/.
#pragma once

#include <napi.h>

namespace disksnap {

void InitLoop(Napi::Env env, Napi::Object exports);
void InitFuse(Napi::Env env, Napi::Object exports);

}  // namespace disksnap
