// Cheap re-checks of arguments that src/engine/native.ts has already validated. A failed check
// throws DisksnapError EINVAL (naming the argument) and returns false; the caller returns
// immediately.
#pragma once

#include <napi.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace disksnap {

// The largest offset or length a JS number carries exactly (2^53).
constexpr double kMaxSafe = 9007199254740992.0;

struct Bytes {
  uint8_t* data = nullptr;
  size_t length = 0;
};

// One entry of a batched read or write: [fileOffset, bufferOffset, length].
struct IoRequest {
  uint64_t fileOffset;
  size_t bufferOffset;
  size_t length;
};

bool ArgFd(const Napi::CallbackInfo& info, size_t i, const char* name, int* out);
// A non-negative integer below 2^53.
bool ArgU64(const Napi::CallbackInfo& info, size_t i, const char* name, uint64_t* out);
// Any integer-valued number that fits in int32 (flags, modes, thread counts).
bool ArgI32(const Napi::CallbackInfo& info, size_t i, const char* name, int32_t* out);
bool ArgBool(const Napi::CallbackInfo& info, size_t i, const char* name, bool* out);
bool ArgString(const Napi::CallbackInfo& info, size_t i, const char* name, std::string* out);
// A Uint8Array/Buffer (or any TypedArray or DataView): the view's own bytes.
bool ArgBytes(const Napi::CallbackInfo& info, size_t i, const char* name, Bytes* out);
// A Float64Array of triples, each checked against a buffer of `bufferLength` bytes.
bool ArgRequests(const Napi::CallbackInfo& info, size_t i, size_t bufferLength,
                 std::vector<IoRequest>* out);
// A Float64Array of [offset, length] pairs, each inside a buffer of `bufferLength` bytes, as
// offset, length, offset, ... in `out`.
bool ArgSpans(const Napi::CallbackInfo& info, size_t i, size_t bufferLength, std::vector<size_t>* out);

}  // namespace disksnap
