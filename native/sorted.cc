// Tables of fixed-length records sorted by a key at their start: the pack indexes of
// src/storage/store/packs.ts (72-byte entries keyed by a 32-byte piece digest).
//
// An incremental's pack index lists every packed piece of its manifest, its parent's included,
// so it grows with the pieces a volume has gathered over its snapshots (~25,000 after 40
// incrementals of 1% scattered 64 KiB writes on the bench's 4 GiB of data). In TypeScript the
// lookups (a Buffer#compare call per step of a binary search), the order check of a read index
// and the sort of a new one took ~70 ms of such an incremental, growing with every snapshot
// before it; here the same work is a few milliseconds.
#include <napi.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "addon.h"
#include "args.h"
#include "error.h"

namespace disksnap {

namespace {

struct Table {
  const uint8_t* data;
  size_t count;
  size_t entry;
  size_t key;
  const uint8_t* At(size_t i) const { return data + i * entry; }
};

// Index of the entry whose key equals `key`, or -1.
int64_t Find(const Table& t, const uint8_t* key) {
  size_t lo = 0;
  size_t hi = t.count;
  while (lo < hi) {
    const size_t mid = lo + (hi - lo) / 2;
    const int c = memcmp(t.At(mid), key, t.key);
    if (c == 0) return static_cast<int64_t>(mid);
    if (c < 0) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return -1;
}

// A table argument: whole entries of `entry` bytes, keys of `key` bytes at their start.
bool ArgTable(const Napi::CallbackInfo& info, size_t i, const char* name, uint64_t entry, uint64_t key, Table* out) {
  Bytes b;
  if (!ArgBytes(info, i, name, &b)) return false;
  if (entry == 0 || key == 0 || key > entry || b.length % entry != 0) {
    ThrowInvalid(info.Env(), std::string(name) + ": the key must be 1 to entryLength bytes, and the table whole entries");
    return false;
  }
  *out = Table{b.data, b.length / entry, entry, key};
  return true;
}

// The arguments (table, entryLength, keyLength) of sortedCheck and sortRecords.
bool ArgKeyedTable(const Napi::CallbackInfo& info, Table* out) {
  uint64_t entry = 0;
  uint64_t key = 0;
  return ArgU64(info, 1, "entryLength", &entry) && ArgU64(info, 2, "keyLength", &key) && ArgTable(info, 0, "table", entry, key, out);
}

// sortedFind(table, entryLength, key) -> the index of the entry whose first key.length bytes
// equal key, or -1. The table is sorted by those bytes, each key once.
Napi::Value SortedFind(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  uint64_t entry = 0;
  Bytes key;
  Table t;
  if (!ArgU64(info, 1, "entryLength", &entry) || !ArgBytes(info, 2, "key", &key) ||
      !ArgTable(info, 0, "table", entry, key.length, &t)) {
    return env.Undefined();
  }
  return Napi::Number::New(env, static_cast<double>(Find(t, key.data)));
}

// sortedCheck(table, entryLength, keyLength) -> -1 when every entry's key is greater than the
// one before it, else the index of the first entry whose key is not.
Napi::Value SortedCheck(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Table t;
  if (!ArgKeyedTable(info, &t)) return env.Undefined();
  for (size_t i = 1; i < t.count; i++) {
    if (memcmp(t.At(i - 1), t.At(i), t.key) >= 0) return Napi::Number::New(env, static_cast<double>(i));
  }
  return Napi::Number::New(env, -1);
}

// sortRecords(table, entryLength, keyLength) -> the number of entries left: sorts the entries in
// place by key and keeps the first of each key (the rest of the buffer past them is left as is).
Napi::Value SortRecords(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Table t;
  if (!ArgKeyedTable(info, &t)) return env.Undefined();
  std::vector<uint32_t> order(t.count);
  std::iota(order.begin(), order.end(), 0);
  // stable: of equal keys, the first in the buffer stays
  std::stable_sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return memcmp(t.At(a), t.At(b), t.key) < 0; });
  std::vector<uint8_t> sorted;
  sorted.reserve(t.count * t.entry);
  for (size_t k = 0; k < order.size(); k++) {
    if (k > 0 && memcmp(t.At(order[k - 1]), t.At(order[k]), t.key) == 0) continue;
    sorted.insert(sorted.end(), t.At(order[k]), t.At(order[k]) + t.entry);
  }
  memcpy(const_cast<uint8_t*>(t.data), sorted.data(), sorted.size());
  return Napi::Number::New(env, static_cast<double>(sorted.size() / t.entry));
}

// The distinct keys of a join, in an open-addressing hash set: per key, whether it occurs among
// the later keys, and whether a table has given its entry yet.
class KeySet {
 public:
  // The keys of `first` (n1 of them) then of `later` (n2), keyLength bytes each.
  KeySet(const uint8_t* first, size_t n1, const uint8_t* later, size_t n2, size_t keyLength) : k1_(first), k2_(later), n1_(n1), key_(keyLength) {
    const size_t count = n1 + n2;
    size_t cap = 16;
    while (cap < count * 2) cap *= 2;
    slots_.assign(cap, 0);
    mask_ = cap - 1;
    flags_.assign(count, 0);
    constexpr size_t kAhead = 16;
    size_t starts[kAhead];
    for (size_t i = 0; i < count && i < kAhead; i++) starts[i] = Start(Key(i));
    for (size_t i = 0; i < count; i++) {
      const uint8_t* k = Key(i);
      size_t s = starts[i % kAhead];
      if (i + kAhead < count) starts[i % kAhead] = Start(Key(i + kAhead));
      const uint8_t mark = i >= n1 ? kLater : 0;
      for (;; s = (s + 1) & mask_) {
        const uint32_t at = slots_[s];
        if (at == 0) {
          slots_[s] = static_cast<uint32_t>(i + 1);
          flags_[i] = mark;
          break;
        }
        if (memcmp(Key(at - 1), k, key_) == 0) {
          flags_[at - 1] |= mark;
          break;
        }
      }
    }
  }

  // The slot where a search for key k starts (Find's `from`). Asked for 16 keys ahead, so that
  // the slot is fetched into the cache meanwhile: a walk of a table then waits for memory far
  // less than once per entry (5.6 -> 2.5 ms above was 2.9 ms without).
  size_t Start(const uint8_t* k) const {
    const size_t s = Hash(k) & mask_;
    __builtin_prefetch(&slots_[s]);
    return s;
  }

  // The key's index in the set (its first occurrence among the keys), or -1.
  int64_t Find(const uint8_t* k, size_t from) const {
    for (size_t s = from;; s = (s + 1) & mask_) {
      const uint32_t at = slots_[s];
      if (at == 0) return -1;
      if (memcmp(Key(at - 1), k, key_) == 0) return static_cast<int64_t>(at - 1);
    }
  }

  uint8_t& Flags(size_t i) { return flags_[i]; }

  static constexpr uint8_t kLater = 1;
  static constexpr uint8_t kTaken = 2;

 private:
  // Every byte of the key, 8 at a time, through a 64-bit finalizer (keys need not be random).
  uint64_t Hash(const uint8_t* k) const {
    uint64_t h = key_;
    for (size_t o = 0; o < key_; o += 8) {
      uint64_t w = 0;
      memcpy(&w, k + o, key_ - o < 8 ? key_ - o : 8);
      h ^= w;
      h ^= h >> 33;
      h *= 0xff51afd7ed558ccdULL;
      h ^= h >> 33;
      h *= 0xc4ceb9fe1a85ec53ULL;
      h ^= h >> 33;
    }
    return h;
  }

  const uint8_t* Key(size_t i) const { return i < n1_ ? k1_ + i * key_ : k2_ + (i - n1_) * key_; }

  const uint8_t* k1_;
  const uint8_t* k2_;
  size_t n1_;
  size_t key_;
  size_t mask_ = 0;
  std::vector<uint32_t> slots_;
  std::vector<uint8_t> flags_;
};

// sortedJoin(keys, keyLength, tables, entryLength[, laterKeys[, before[, after]]]) -> { entries,
// later }: for each distinct key of `keys` and `laterKeys` (keyLength bytes each, in any order,
// repeats allowed) that a table holds, in ascending order, the entry of the first of `tables`
// (each sorted by key, each key once, as sortedCheck accepts) that holds it; keys in no table
// are left out. `later`: how many of those entries are for keys among `laterKeys`. `entries`
// has `before` zero bytes ahead of them and `after` behind them (room for a header and a
// trailer). A pack index (src/storage/store/packs.ts) joins its pieces (keys) and whole blocks
// (laterKeys) at once, framed where it is joined, and is version 2 when it lists a whole block:
// when `later` is not 0.
//
// The distinct keys go into a hash set; each table is walked once from its start, taking the
// entries whose key is in the set and not taken from an earlier table (already ascending); the
// tables' takings are then merged. The cost is that of the keys plus the tables' entries, with
// no sort: the keys of an index are nearly all in its parent's index, and a chain's indexes
// grow with the pieces its volume gathered (48,000 after ~120 scattered incrementals of a 16
// GiB qcow2 volume). Before, the keys were sorted by their first 8 bytes and each table galloped
// through, and a second join, of the whole blocks, was concatenated with the first and sorted
// again, and the result copied into its frame: at 48,000 pieces, 5.6 ms then, 2.5 ms now (a
// join of the same keys and tables in one process, medians of 30), and 7 MB less memory
// touched for the first time (~1.6 us a page on these VMs).
Napi::Value SortedJoin(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Bytes keys;
  uint64_t key = 0;
  uint64_t entry = 0;
  if (!ArgBytes(info, 0, "keys", &keys) || !ArgU64(info, 1, "keyLength", &key) || !ArgU64(info, 3, "entryLength", &entry)) {
    return env.Undefined();
  }
  if (key == 0 || key > entry || keys.length % key != 0) {
    ThrowInvalid(env, "sortedJoin: the key must be 1 to entryLength bytes, and keys whole keys");
    return env.Undefined();
  }
  Bytes laterKeys;
  if (info.Length() > 4 && !info[4].IsUndefined() && !ArgBytes(info, 4, "laterKeys", &laterKeys)) return env.Undefined();
  if (laterKeys.length % key != 0) {
    ThrowInvalid(env, "sortedJoin: laterKeys must be whole keys");
    return env.Undefined();
  }
  uint64_t before = 0;
  uint64_t after = 0;
  if (info.Length() > 5 && !info[5].IsUndefined() && !ArgU64(info, 5, "before", &before)) return env.Undefined();
  if (info.Length() > 6 && !info[6].IsUndefined() && !ArgU64(info, 6, "after", &after)) return env.Undefined();
  const size_t n1 = keys.length / key;
  const size_t n2 = laterKeys.length / key;
  const size_t n = n1 + n2;
  if (n >= UINT32_MAX || before > (1u << 20) || after > (1u << 20)) {
    ThrowInvalid(env, "sortedJoin: too many keys, or room of more than 1 MiB");
    return env.Undefined();
  }
  if (!info[2].IsArray()) {
    ThrowInvalid(env, "sortedJoin: argument 3 (tables) must be an array of buffers");
    return env.Undefined();
  }
  Napi::Array list = info[2].As<Napi::Array>();
  std::vector<Table> tables(list.Length());
  for (uint32_t i = 0; i < list.Length(); i++) {
    Napi::Value v = list.Get(i);
    if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
      ThrowInvalid(env, "sortedJoin: argument 3 (tables) must be an array of buffers");
      return env.Undefined();
    }
    Napi::Uint8Array a = v.As<Napi::Uint8Array>();
    if (a.ByteLength() % entry != 0) {
      ThrowInvalid(env, "sortedJoin: a table is not whole entries");
      return env.Undefined();
    }
    tables[i] = Table{a.Data(), a.ByteLength() / entry, entry, key};
  }
  KeySet set(keys.data, n1, laterKeys.data, n2, key);
  // each table's takings, ascending (the table is)
  std::vector<std::vector<uint32_t>> taken(tables.size());
  size_t total = 0;
  size_t later = 0;
  for (size_t ti = 0; ti < tables.size() && n > 0; ti++) {
    const Table& t = tables[ti];
    constexpr size_t kAhead = 16;
    size_t starts[kAhead];
    for (size_t e = 0; e < t.count && e < kAhead; e++) starts[e] = set.Start(t.At(e));
    for (size_t e = 0; e < t.count; e++) {
      const size_t from = starts[e % kAhead];
      if (e + kAhead < t.count) starts[e % kAhead] = set.Start(t.At(e + kAhead));
      const int64_t k = set.Find(t.At(e), from);
      if (k < 0) continue;
      uint8_t& f = set.Flags(static_cast<size_t>(k));
      if (f & KeySet::kTaken) continue;
      f |= KeySet::kTaken;
      if (f & KeySet::kLater) later++;
      taken[ti].push_back(static_cast<uint32_t>(e));
    }
    total += taken[ti].size();
  }
  Napi::Buffer<uint8_t> out = Napi::Buffer<uint8_t>::New(env, before + total * entry + after);
  memset(out.Data(), 0, before);
  memset(out.Data() + before + total * entry, 0, after);
  uint8_t* w = out.Data() + before;
  std::vector<size_t> at(tables.size(), 0);
  for (size_t done = 0; done < total; done++) {
    // the least head among the tables' takings (keys are distinct across them)
    size_t best = tables.size();
    for (size_t ti = 0; ti < tables.size(); ti++) {
      if (at[ti] == taken[ti].size()) continue;
      if (best == tables.size() || memcmp(tables[ti].At(taken[ti][at[ti]]), tables[best].At(taken[best][at[best]]), key) < 0) best = ti;
    }
    memcpy(w, tables[best].At(taken[best][at[best]]), entry);
    w += entry;
    at[best]++;
  }
  Napi::Object result = Napi::Object::New(env);
  result.Set("entries", out);
  result.Set("later", Napi::Number::New(env, static_cast<double>(later)));
  return result;
}

}  // namespace

void InitSorted(Napi::Env env, Napi::Object exports) {
  exports.Set("sortedFind", Napi::Function::New(env, SortedFind, "sortedFind"));
  exports.Set("sortedCheck", Napi::Function::New(env, SortedCheck, "sortedCheck"));
  exports.Set("sortRecords", Napi::Function::New(env, SortRecords, "sortRecords"));
  exports.Set("sortedJoin", Napi::Function::New(env, SortedJoin, "sortedJoin"));
}

}  // namespace disksnap
