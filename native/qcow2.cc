// Two hot loops of the qcow2 code, which TypeScript ran at ~80-470 ns an element.
//
// l2Ordinary: the hot check of the qcow2 reader (src/image/qcow2/clusters.ts l2IsOrdinary): whether every
// entry of an L2 table read from a file is empty, zero, or a plain data cluster that lies
// inside the file, on a cluster boundary and on no metadata cluster. Anything else (compressed
// or reserved bits, a bad offset) answers false, and the caller walks the table entry by entry
// in TypeScript, which names the problem. In TypeScript this loop cost ~80 ns an entry (5 ms
// of a 0.33 s incremental snapshot that reads 8 tables; at that rate ~1.3 s for all 2,048
// tables of a full 1 TiB image); here it is a few ns. The constants are those of
// src/image/qcow2/format.ts.
#include <napi.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "addon.h"
#include "args.h"
#include "error.h"

namespace disksnap {

namespace {

constexpr uint32_t kHiCompressed = 0x40000000;
constexpr uint32_t kHiReservedL2 = 0x3f000000;
constexpr uint32_t kHiOffsetMask = 0x00ffffff;
constexpr uint32_t kLoOffsetMask = 0xfffffe00;
constexpr uint32_t kLoReservedL2 = 0x000001fe;

inline uint32_t Be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}

// l2Ordinary(table, clusterSize, fileSize, metaBits, metaLimit) -> boolean. metaBits: bit c set
// for each metadata cluster c below metaLimit; a data cluster at or past metaLimit answers
// false (the caller looks such clusters up itself).
Napi::Value L2Ordinary(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Bytes table;
  Bytes bits;
  uint64_t cs = 0;
  uint64_t fileSize = 0;
  uint64_t limit = 0;
  if (!ArgBytes(info, 0, "table", &table) || !ArgU64(info, 1, "clusterSize", &cs) || !ArgU64(info, 2, "fileSize", &fileSize) ||
      !ArgBytes(info, 3, "metaBits", &bits) || !ArgU64(info, 4, "metaLimit", &limit)) {
    return env.Undefined();
  }
  if (cs == 0 || table.length % 8 != 0) {
    ThrowInvalid(env, "l2Ordinary: clusterSize must be positive and the table whole 8-byte entries");
    return env.Undefined();
  }
  for (size_t at = 0; at < table.length; at += 8) {
    const uint32_t hi = Be32(table.data + at);
    const uint32_t lo = Be32(table.data + at + 4);
    if (hi == 0 && lo == 0) continue;
    if ((hi & (kHiCompressed | kHiReservedL2)) != 0 || (lo & kLoReservedL2) != 0) return Napi::Boolean::New(env, false);
    const uint64_t off = (uint64_t{hi & kHiOffsetMask} << 32) | (lo & kLoOffsetMask);
    if (off == 0) continue;
    if (off % cs != 0 || off >= fileSize) return Napi::Boolean::New(env, false);
    const uint64_t c = off / cs;
    if (c >= limit) return Napi::Boolean::New(env, false);
    const uint64_t i = c >> 3;
    if (i < bits.length && ((bits.data[i] >> (c & 7)) & 1) != 0) return Napi::Boolean::New(env, false);
  }
  return Napi::Boolean::New(env, true);
}

// bitRuns(data, limit) -> Float64Array [from0, to0, from1, to1, ...]: the runs of set bits among
// the first `limit` bits of a persistent dirty bitmap's data (bit i is bit i % 8 of byte i / 8,
// as in QEMU's docs/interop/qcow2.txt), in order, each run [from, to); test/native.test.ts
// holds it to a bit-by-bit model. The TypeScript loop it replaces (readDirtyRanges in
// src/image/qcow2/bitmaps.ts) ran in V8's interpreter (a command is too short for V8 to compile
// it) and took ~8 ms for the 16,384 words of one 64 KiB cluster; here, zero words 64 bits at a
// time, microseconds.
Napi::Value BitRuns(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Bytes data;
  uint64_t limit = 0;
  if (!ArgBytes(info, 0, "data", &data) || !ArgU64(info, 1, "limit", &limit)) return env.Undefined();
  if (limit > uint64_t{data.length} * 8) {
    ThrowInvalid(env, "bitRuns: limit is past the end of the data");
    return env.Undefined();
  }
  std::vector<double> runs;
  int64_t start = -1;
  auto bitAt = [&](uint64_t i) { return (data.data[i >> 3] >> (i & 7)) & 1; };
  uint64_t i = 0;
  while (i < limit) {
    // whole bytes of one value at once: 8 bytes, then single bytes
    if ((i & 7) == 0) {
      const uint64_t byte = i >> 3;
      const uint8_t fill = start < 0 ? 0x00 : 0xff;
      if (limit - i >= 64) {
        uint64_t w;
        memcpy(&w, data.data + byte, 8);
        if (w == (fill ? ~uint64_t{0} : uint64_t{0})) {
          i += 64;
          continue;
        }
      }
      if (limit - i >= 8 && data.data[byte] == fill) {
        i += 8;
        continue;
      }
    }
    const int set = bitAt(i);
    if (set && start < 0) {
      start = static_cast<int64_t>(i);
    } else if (!set && start >= 0) {
      runs.push_back(static_cast<double>(start));
      runs.push_back(static_cast<double>(i));
      start = -1;
    }
    i++;
  }
  if (start >= 0) {
    runs.push_back(static_cast<double>(start));
    runs.push_back(static_cast<double>(limit));
  }
  Napi::Float64Array out = Napi::Float64Array::New(env, runs.size());
  for (size_t k = 0; k < runs.size(); k++) out[k] = runs[k];
  return out;
}

}  // namespace

void InitQcow2(Napi::Env env, Napi::Object exports) {
  exports.Set("l2Ordinary", Napi::Function::New(env, L2Ordinary, "l2Ordinary"));
  exports.Set("bitRuns", Napi::Function::New(env, BitRuns, "bitRuns"));
}

}  // namespace disksnap
