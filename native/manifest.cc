// scanEntries(chunk, pos, limit, state) -> count: the consecutive manifest entries of `chunk`
// from byte `pos` whose block index is below `limit`, checked as ManifestReader.take checks
// each one (src/storage/store/manifest.ts): ascending by (block, slot), inside the volume, a
// slot only where the manifest has pieces and the piece lies inside its block. It stops before
// the first entry at or past `limit`, before the first one that fails a check (the caller's
// own take() then reads it, and names what is wrong), or at the chunk's end.
//
// `state` is a Float64Array: [lastIndex, lastSlot, slots, blocks, volumeSize, blockSize,
// pieceSize] read, then [0] and [1] set to the last entry consumed, [7] to how many of the
// consumed entries start a block other than the one before them, [8] to 1 when any of them is a
// piece (0 otherwise).
//
// Why: a dirty-range scan carries the parent's entries between its dirty blocks over in runs
// (ManifestCursor.runNow), ~8,000 of them in a scattered incremental of a 16 GiB qcow2 volume
// with 4 GiB of data. Entry by entry in TypeScript (two readUInt32LE calls and the checks, in
// code V8 leaves to its baseline compiler in so short a command) that was ~10% of the event
// loop's work in the scan (a perf profile); here it is a loop over the chunk.
#include <napi.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "addon.h"
#include "args.h"
#include "error.h"

namespace disksnap {

namespace {

constexpr size_t kEntryLength = 40;
constexpr size_t kDigestLength = 32;
constexpr size_t kStateLength = 9;

uint32_t U32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;  // (x86 and arm64 Linux: little-endian, as the manifest)
}

Napi::Value ScanEntries(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Bytes chunk;
  uint64_t pos = 0;
  double limit = 0;
  if (!ArgBytes(info, 0, "chunk", &chunk) || !ArgU64(info, 1, "pos", &pos)) return env.Undefined();
  if (!info[2].IsNumber()) {
    ThrowInvalid(env, "scanEntries: limit must be a number");
    return env.Undefined();
  }
  limit = info[2].As<Napi::Number>().DoubleValue();
  if (!info[3].IsTypedArray() || info[3].As<Napi::TypedArray>().TypedArrayType() != napi_float64_array ||
      info[3].As<Napi::Float64Array>().ElementLength() < kStateLength) {
    ThrowInvalid(env, "scanEntries: state must be a Float64Array of 9 numbers");
    return env.Undefined();
  }
  if (pos % kEntryLength != 0 || pos > chunk.length) {
    ThrowInvalid(env, "scanEntries: pos must be an entry boundary inside the chunk");
    return env.Undefined();
  }
  double* st = info[3].As<Napi::Float64Array>().Data();
  double lastIndex = st[0];
  double lastSlot = st[1];
  const double slots = st[2];
  const double blocks = st[3];
  const double volumeSize = st[4];
  const double blockSize = st[5];
  const double pieceSize = st[6];
  double newBlocks = 0;
  bool pieces = false;
  size_t n = 0;
  for (size_t o = pos; o + kEntryLength <= chunk.length; o += kEntryLength, n++) {
    const uint32_t lo = U32(chunk.data + o);
    const uint32_t hi = U32(chunk.data + o + 4);
    const double slot = slots != 0 ? static_cast<double>(hi >> 24) : 0;
    const double index = static_cast<double>(lo) + static_cast<double>(slots != 0 ? (hi & 0xffffff) : hi) * 4294967296.0;
    if (index >= limit) break;
    if (!(index > lastIndex || (index == lastIndex && slot > lastSlot)) || index >= blocks) break;
    if (slot > slots) break;
    if (slot != 0) {
      // the piece's bytes start inside its block (the last block of a volume may be short)
      const double blockLen = std::min(blockSize, volumeSize - index * blockSize);
      if (blockLen - (slot - 1) * pieceSize <= 0) break;
      pieces = true;
    }
    if (index != lastIndex) newBlocks++;
    lastIndex = index;
    lastSlot = slot;
  }
  st[0] = lastIndex;
  st[1] = lastSlot;
  st[7] = newBlocks;
  st[8] = pieces ? 1 : 0;
  return Napi::Number::New(env, static_cast<double>(n));
}

// entryDigests(chunk, end, pieces, out, outOffset) -> count: copies the 32-byte digest of
// every entry in bytes [0, end) of `chunk` (entries of a manifest with pieces) that is a piece
// (slot byte, 7, not 0; `pieces` true) or a whole block (slot 0; false) into `out` from
// `outOffset` on, one after the other, and returns how many it copied. `out` must have room
// for one digest per entry of the range.
//
// Why: a packed manifest's writer lists the digests its pack index must look up
// (ManifestWriter, src/storage/store/manifest.ts): every piece, its parent's kept ones too. One
// `Buffer#set` of a `subarray` per entry was ~4 ms of the event loop (and garbage for the
// collector) in an incremental whose manifest kept ~19,000 pieces, growing with the chain; here
// it is one call per 1 MiB chunk of entries, as the writer emits it.
Napi::Value EntryDigests(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Bytes chunk;
  Bytes out;
  uint64_t end = 0;
  uint64_t at = 0;
  bool pieces = false;
  if (!ArgBytes(info, 0, "chunk", &chunk) || !ArgU64(info, 1, "end", &end) || !ArgBool(info, 2, "pieces", &pieces) ||
      !ArgBytes(info, 3, "out", &out) || !ArgU64(info, 4, "outOffset", &at)) {
    return env.Undefined();
  }
  if (end % kEntryLength != 0 || end > chunk.length) {
    ThrowInvalid(env, "entryDigests: end must be an entry boundary inside the chunk");
    return env.Undefined();
  }
  if (at > out.length || (out.length - at) / kDigestLength < end / kEntryLength) {
    ThrowInvalid(env, "entryDigests: out has no room for a digest per entry from outOffset");
    return env.Undefined();
  }
  uint8_t* dst = out.data + at;
  size_t n = 0;
  for (size_t o = 0; o < end; o += kEntryLength) {
    if ((chunk.data[o + 7] != 0) != pieces) continue;
    std::memcpy(dst + n * kDigestLength, chunk.data + o + 8, kDigestLength);
    n++;
  }
  return Napi::Number::New(env, static_cast<double>(n));
}

}  // namespace

void InitManifest(Napi::Env env, Napi::Object exports) {
  exports.Set("scanEntries", Napi::Function::New(env, ScanEntries, "scanEntries"));
  exports.Set("entryDigests", Napi::Function::New(env, EntryDigests, "entryDigests"));
}

}  // namespace disksnap
