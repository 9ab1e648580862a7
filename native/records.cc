// readFiles(dir, names, maxBytes): small files of one directory, each read whole, in one call:
// the record files of a directory store (src/storage/store/dir.ts, getSmallMany), which every
// listing of snapshots or volumes reads all of.
//
// Through node's fs a record cost ~15-30 us of the main thread (openSync, fstat, readSync,
// closeSync, each with its argument checks and its own path resolution) and a Buffer: 8-19 ms
// of every listing of a store of 655 snapshots (the CPU profile of a `snapshot create`: ~19
// ms). Here each is openat on the directory's descriptor, fstat, read, close, into one buffer:
// 8.5 ms for the 655 (a C loop of the same calls into a stack buffer: ~6 us a file).
//
// The result: `data`, the files one after the other; `ends`, where each one ends in it; and
// `failed`, [index, error, ...] for the files that could not be read, each error as the addon
// makes them (ENOENT for one removed since it was listed, ELOOP for a symbolic link, which is
// never followed, EISDIR for a directory, EFBIG past maxBytes). A directory that cannot be
// opened throws.
#include <napi.h>

#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "addon.h"
#include "args.h"
#include "error.h"
#include "io.h"

namespace disksnap {

namespace {

SysError TooLarge(const std::string& path, double maxBytes) {
  return SysError::Custom("EFBIG", EFBIG, path + ": larger than " + std::to_string(static_cast<uint64_t>(maxBytes)) + " bytes, too large for a record", path);
}

// The whole of `name` (under dirfd) into `out`; the failed call's SysError otherwise.
SysError ReadWhole(int dirfd, const std::string& dir, const std::string& name, double maxBytes, std::vector<uint8_t>* out) {
  const std::string path = dir + "/" + name;
  const int fd = OpenAtRetry(dirfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return SysError::Errno(errno, "open", path);
  SysError err;
  struct stat st;
  if (::fstat(fd, &st) < 0) {
    err = SysError::Errno(errno, "fstat", path);
  } else if (S_ISDIR(st.st_mode)) {
    err = SysError::Errno(EISDIR, "read", path);
  } else if (!S_ISREG(st.st_mode)) {
    err = SysError::Custom("EINVAL", EINVAL, path + ": not a regular file", path);
  } else if (static_cast<double>(st.st_size) > maxBytes) {
    err = TooLarge(path, maxBytes);
  } else {
    // the size fstat gave, plus one byte: a file that grew since is read on to its end
    out->resize(static_cast<size_t>(st.st_size) + 1);
    size_t got = 0;
    err = PreadFull(fd, out->data(), out->size(), 0, &got);
    while (!err.failed() && got == out->size()) {
      if (static_cast<double>(got) > maxBytes) {
        err = TooLarge(path, maxBytes);
        break;
      }
      const size_t had = got;
      out->resize(had * 2);
      err = PreadFull(fd, out->data() + had, had, had, &got);
      got += had;
    }
    if (err.failed()) err.path = path;
    out->resize(got);
  }
  ::close(fd);
  return err;
}

Napi::Value ReadFiles(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string dir;
  if (!ArgString(info, 0, "dir", &dir)) return Napi::Value();
  if (info.Length() < 2 || !info[1].IsArray()) {
    ThrowInvalid(env, "names must be an array of file names");
    return Napi::Value();
  }
  if (info.Length() < 3 || !info[2].IsNumber() || !(info[2].As<Napi::Number>().DoubleValue() >= 0)) {
    ThrowInvalid(env, "maxBytes must be a number >= 0");
    return Napi::Value();
  }
  const Napi::Array names = info[1].As<Napi::Array>();
  const double maxBytes = info[2].As<Napi::Number>().DoubleValue();
  std::vector<std::string> list(names.Length());
  for (uint32_t i = 0; i < names.Length(); i++) {
    const Napi::Value v = names.Get(i);
    if (!v.IsString()) {
      ThrowInvalid(env, "names must be an array of file names");
      return Napi::Value();
    }
    list[i] = v.As<Napi::String>().Utf8Value();
    if (list[i].empty() || list[i].find('/') != std::string::npos || list[i] == "." || list[i] == "..") {
      ThrowInvalid(env, "'" + list[i] + "' is not a file name (names are single path components)");
      return Napi::Value();
    }
  }
  const int dirfd = OpenAtRetry(AT_FDCWD, dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dirfd < 0) {
    Throw(env, SysError::Errno(errno, "open", dir));
    return Napi::Value();
  }
  // One buffer for all the files and the offset where each ends: a Buffer per file made
  // through napi cost ~10 us each, as much again as reading it. It is sized once, for records
  // of up to 2 KiB, and handed to JS as it is, not copied: a page fault costs ~10-15 us on
  // the VMs measured.
  auto* all = new std::vector<uint8_t>();
  all->reserve(list.size() * 2048);
  std::vector<double> ends(list.size());
  std::vector<std::pair<uint32_t, SysError>> failed;
  std::vector<uint8_t> data;
  for (size_t i = 0; i < list.size(); i++) {
    const SysError err = ReadWhole(dirfd, dir, list[i], maxBytes, &data);
    if (err.failed()) failed.emplace_back(static_cast<uint32_t>(i), err);
    else all->insert(all->end(), data.begin(), data.end());
    ends[i] = static_cast<double>(all->size());
  }
  ::close(dirfd);
  Napi::Object out = Napi::Object::New(env);
  if (all->empty()) {
    delete all;
    out.Set("data", Napi::Buffer<uint8_t>::New(env, 0));
  } else {
    out.Set("data", Napi::Buffer<uint8_t>::New(env, all->data(), all->size(), [](Napi::Env, uint8_t*, std::vector<uint8_t>* v) { delete v; }, all));
  }
  Napi::Float64Array je = Napi::Float64Array::New(env, ends.size());
  for (size_t i = 0; i < ends.size(); i++) je[i] = ends[i];
  out.Set("ends", je);
  Napi::Array jf = Napi::Array::New(env, failed.size() * 2);
  for (size_t k = 0; k < failed.size(); k++) {
    const Napi::Value e = MakeError(env, failed[k].second);
    if (e.IsEmpty()) return Napi::Value();
    jf.Set(static_cast<uint32_t>(2 * k), Napi::Number::New(env, failed[k].first));
    jf.Set(static_cast<uint32_t>(2 * k + 1), e);
  }
  out.Set("failed", jf);
  return out;
}

}  // namespace

void InitRecords(Napi::Env env, Napi::Object exports) {
  exports.Set("readFiles", Napi::Function::New(env, ReadFiles, "readFiles"));
}

}  // namespace disksnap
