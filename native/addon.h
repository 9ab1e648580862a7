// Registration of the addon's parts (one Init per source file).
#pragma once

#include <napi.h>

namespace disksnap {

void InitFile(Napi::Env env, Napi::Object exports);
void InitHash(Napi::Env env, Napi::Object exports);
void InitGcm(Napi::Env env, Napi::Object exports);   // native/gcm.cc
void InitObject(Napi::Env env, Napi::Object exports);  // native/object.cc
void InitLoop(Napi::Env env, Napi::Object exports);  // native/loop.cc
void InitFuse(Napi::Env env, Napi::Object exports);  // native/fuse.cc
void InitQcow2(Napi::Env env, Napi::Object exports);  // native/qcow2.cc
void InitSorted(Napi::Env env, Napi::Object exports);  // native/sorted.cc
void InitRecords(Napi::Env env, Napi::Object exports);  // native/records.cc
void InitManifest(Napi::Env env, Napi::Object exports);  // native/manifest.cc

}  // namespace disksnap
