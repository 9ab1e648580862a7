#include "args.h"

#include <cmath>
#include <cstdio>

#include "error.h"

namespace disksnap {

static bool Fail(const Napi::CallbackInfo& info, size_t i, const char* name, const char* what) {
  ThrowInvalid(info.Env(), std::string("argument ") + std::to_string(i + 1) + " (" + name +
                               ") must be " + what);
  return false;
}

static bool IsWholeNumber(double v) { return std::isfinite(v) && std::floor(v) == v; }

static std::string Num(double v) {
  char buf[40];
  snprintf(buf, sizeof buf, IsWholeNumber(v) && std::fabs(v) < 1e18 ? "%.0f" : "%g", v);
  return buf;
}

bool ArgFd(const Napi::CallbackInfo& info, size_t i, const char* name, int* out) {
  if (!info[i].IsNumber()) return Fail(info, i, name, "a file descriptor");
  double v = info[i].As<Napi::Number>().DoubleValue();
  if (!IsWholeNumber(v) || v < 0 || v > 2147483647.0) return Fail(info, i, name, "a file descriptor");
  *out = static_cast<int>(v);
  return true;
}

bool ArgU64(const Napi::CallbackInfo& info, size_t i, const char* name, uint64_t* out) {
  if (!info[i].IsNumber()) return Fail(info, i, name, "a non-negative integer");
  double v = info[i].As<Napi::Number>().DoubleValue();
  if (!IsWholeNumber(v) || v < 0 || v > kMaxSafe) return Fail(info, i, name, "a non-negative integer below 2^53");
  *out = static_cast<uint64_t>(v);
  return true;
}

bool ArgI32(const Napi::CallbackInfo& info, size_t i, const char* name, int32_t* out) {
  if (!info[i].IsNumber()) return Fail(info, i, name, "an integer");
  double v = info[i].As<Napi::Number>().DoubleValue();
  if (!IsWholeNumber(v) || v < -2147483648.0 || v > 2147483647.0) return Fail(info, i, name, "a 32-bit integer");
  *out = static_cast<int32_t>(v);
  return true;
}

bool ArgBool(const Napi::CallbackInfo& info, size_t i, const char* name, bool* out) {
  if (!info[i].IsBoolean()) return Fail(info, i, name, "a boolean");
  *out = info[i].As<Napi::Boolean>().Value();
  return true;
}

bool ArgString(const Napi::CallbackInfo& info, size_t i, const char* name, std::string* out) {
  if (!info[i].IsString()) return Fail(info, i, name, "a string");
  *out = info[i].As<Napi::String>().Utf8Value();
  if (out->find('\0') != std::string::npos) return Fail(info, i, name, "a string without NUL bytes");
  return true;
}

bool ArgBytes(const Napi::CallbackInfo& info, size_t i, const char* name, Bytes* out) {
  Napi::Value v = info[i];
  if (v.IsTypedArray()) {
    Napi::TypedArray ta = v.As<Napi::TypedArray>();
    Napi::ArrayBuffer ab = ta.ArrayBuffer();
    out->data = static_cast<uint8_t*>(ab.Data()) + ta.ByteOffset();
    out->length = ta.ByteLength();
    return true;
  }
  if (v.IsDataView()) {
    Napi::DataView dv = v.As<Napi::DataView>();
    out->data = static_cast<uint8_t*>(dv.ArrayBuffer().Data()) + dv.ByteOffset();
    out->length = dv.ByteLength();
    return true;
  }
  return Fail(info, i, name, "a Uint8Array");
}

bool ArgRequests(const Napi::CallbackInfo& info, size_t i, size_t bufferLength,
                 std::vector<IoRequest>* out) {
  Napi::Value v = info[i];
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float64_array)
    return Fail(info, i, "requests", "a Float64Array of [fileOffset, bufferOffset, length] triples");
  Napi::Float64Array arr = v.As<Napi::Float64Array>();
  size_t n = arr.ElementLength();
  if (n % 3 != 0) return Fail(info, i, "requests", "a Float64Array whose length is a multiple of 3");
  const double* d = arr.Data();
  out->resize(n / 3);
  for (size_t k = 0; k < n / 3; k++) {
    double fo = d[3 * k], bo = d[3 * k + 1], len = d[3 * k + 2];
    if (!IsWholeNumber(fo) || !IsWholeNumber(bo) || !IsWholeNumber(len) || fo < 0 || bo < 0 ||
        len < 0 || fo > kMaxSafe - len || bo + len > static_cast<double>(bufferLength)) {
      ThrowInvalid(info.Env(), "request " + std::to_string(k) + " [" + Num(fo) + ", " + Num(bo) + ", " +
                                   Num(len) +
                                   "] is not inside the buffer of " + std::to_string(bufferLength) +
                                   " bytes (or is not a non-negative integer triple)");
      return false;
    }
    (*out)[k] = IoRequest{static_cast<uint64_t>(fo), static_cast<size_t>(bo), static_cast<size_t>(len)};
  }
  return true;
}

bool ArgSpans(const Napi::CallbackInfo& info, size_t i, size_t bufferLength, std::vector<size_t>* out) {
  Napi::Value v = info[i];
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float64_array ||
      v.As<Napi::Float64Array>().ElementLength() % 2 != 0)
    return Fail(info, i, "spans", "a Float64Array of [offset, length] pairs");
  Napi::Float64Array arr = v.As<Napi::Float64Array>();
  const double* d = arr.Data();
  out->resize(arr.ElementLength());
  for (size_t k = 0; k < out->size(); k += 2) {
    double off = d[k], len = d[k + 1];
    if (!IsWholeNumber(off) || !IsWholeNumber(len) || off < 0 || len < 0 || off + len > static_cast<double>(bufferLength)) {
      ThrowInvalid(info.Env(), "span " + std::to_string(k / 2) + " is not inside the buffer of " +
                                   std::to_string(bufferLength) + " bytes (or is not a pair of non-negative integers)");
      return false;
    }
    (*out)[k] = static_cast<size_t>(off);
    (*out)[k + 1] = static_cast<size_t>(len);
  }
  return true;
}

}  // namespace disksnap
