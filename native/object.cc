// Whole-object file operations of the directory store backend (src/storage/store/dir.ts), each one
// trip through libuv's pool instead of one per syscall:
//
//   putObjectAsync(dir, name, head, tail?) -> 0 published, 1 the name existed already
//     An unnamed file in `dir` (O_TMPFILE; a `.tmp-` name where the filesystem has none),
//     `head` written with O_DIRECT when its address and length are 4 KiB multiples, `tail`
//     (a sealed object's 32-byte trailer) through the page cache behind it, fdatasync, then
//     linked under `name`: the name appears only for complete, durable content, and only if
//     it was free (link(2) does not replace). The directory entry itself becomes durable at
//     the backend's flush (one fsync per directory).
//   putObjectsAsync(dirs, names, heads) -> a status per object
//     The same for many objects (a chunk's blocks) in one trip, several in flight (below).
//   readObjectAsync(path, buf) -> the object's size; its bytes are in buf when they fit
//     (read with O_DIRECT, but for a short tail, when buf is aligned).
//   syncDirsAsync(dirs) -> undefined
//     Each directory fsynced (the backend's flush), several at a time, in one trip.
//
// Measured on this project's VM, 2048 objects of 512 KiB: the JS sequence (stat, open, write,
// fdatasync, close, link, unlink: seven pool round trips) kept a full snapshot's writes at
// ~1 s of a 1.7 s run; with this, a full snapshot of 1 GiB takes 1.2-1.3 s (1.7-1.9 s before).
//
// O_DIRECT only from page-aligned memory (issue 18). The kernel accepts O_DIRECT from any
// 512-byte aligned address here (virtio-blk: dma_alignment 511), and the old probe in
// src/storage/store/direct.ts took the first offset the kernel accepted: Node's large Buffers
// start 16 bytes past a page (malloc's header), so every object buffer sat 512 bytes off a page
// boundary, each 4 KiB block of a request straddled two pages, and the device served those
// requests several times slower. Measured on this VM while other sessions built and tested
// (load 6-20 on 2 vCPUs), 2048 x (O_TMPFILE, O_DIRECT write of 512 KiB, fdatasync, linkat),
// 16 threads, 256 directories, in C (/tmp experiments, same minutes):
//   buffer page-aligned                       3.0-6.0 s  (device: ~4-6 ms per write request)
//   buffer 512 bytes past a page               27.8 s     (device: 25 ms per write request,
//                                                          busy the whole run, ~1 in flight)
//   the same loop through putObjectAsync from DirectIo buffers: 26-40 s before, 4.0 s after.
// The other habits, added one at a time to the C loop, cost nothing beyond the noise: a
// buffered read of the volume beside the writes (4.4 vs 5.3 s), progress-record rewrites
// (3.4 s), a 32-byte buffered tail after the O_DIRECT head (3.7 s), 4 vs 16 threads (3.6 vs
// 3.2 s), 256 directories vs one (4.1 vs 3.6 s); two CPU-bound processes beside it: 6.4 vs 4.0 s.
// Where the waiting went before (perf sched_switch, one full snapshot, 27 s): fdatasync waiting
// for the inode-table block another thread was writing (114 s summed over threads), the O_DIRECT
// writes (77 s), that inode-table block's own writes (39 s), cache flushes (26 s) — every
// device request slow, not one step: the per-object sync is a chain through shared inode-table
// blocks, so a slower request multiplies by the 2048 objects.
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "addon.h"
#include "args.h"
#include "error.h"
#include "hash_engine.h"
#include "io.h"
#include "worker.h"

namespace disksnap {

namespace {

constexpr uintptr_t kAlign = 512;  // the smallest logical block size; EINVAL falls back
// O_DIRECT only from page-aligned memory: the kernel takes 512-byte aligned buffers, but each
// 4 KiB block then straddles two pages and every request costs several times more (see the
// note at the top).
constexpr uintptr_t kMemAlign = 4096;

bool Aligned(const uint8_t* p, size_t n) {
  return n > 0 && reinterpret_cast<uintptr_t>(p) % kMemAlign == 0 && n % kAlign == 0;
}

// A descriptor's O_DIRECT flag, dropped (for good) before a part that cannot go direct.
class DirectFlag {
 public:
  DirectFlag(int fd, const std::string& path) : fd_(fd), path_(path), flags_(::fcntl(fd, F_GETFL)) {}
  bool on() const { return flags_ >= 0 && (flags_ & O_DIRECT); }
  SysError Drop() {
    if (!on()) return {};
    if (::fcntl(fd_, F_SETFL, flags_ & ~O_DIRECT) < 0) return SysError::Errno(errno, "fcntl", path_);
    flags_ &= ~O_DIRECT;
    return {};
  }

 private:
  int fd_;
  const std::string& path_;
  int flags_;
};

std::string TempName(const std::string& dir) {
  unsigned char r[6] = {0};
  if (getrandom(r, sizeof r, 0) != static_cast<ssize_t>(sizeof r)) {
    for (auto& b : r) b = static_cast<unsigned char>(::rand());
  }
  char hex[13];
  for (int i = 0; i < 6; i++) snprintf(hex + 2 * i, 3, "%02x", r[i]);
  return dir + "/.tmp-" + std::to_string(::getpid()) + "-" + hex;
}

struct PutObjectJob {
  std::string dir, name;
  Bytes head, tail;
  int result = 0;

  SysError Run() {
    const std::string final = dir + "/" + name;
    struct stat st;
    if (::stat(final.c_str(), &st) == 0) {
      result = 1;
      return {};
    }
    if (errno != ENOENT) return SysError::Errno(errno, "stat", final);

    const bool direct = Aligned(head.data, head.length);
    std::string tmp;  // empty: an O_TMPFILE file
    // An unnamed file is published through /proc/self/fd (linkat with AT_EMPTY_PATH would
    // need CAP_DAC_READ_SEARCH): without /proc, a named temporary file.
    static const bool haveProc = ::access("/proc/self/fd", F_OK) == 0;
    int fd = -1;
    errno = EOPNOTSUPP;
    if (haveProc) {
      fd = OpenAtRetry(AT_FDCWD, dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC | (direct ? O_DIRECT : 0), 0644);
      if (fd < 0 && direct && errno == EINVAL) fd = OpenAtRetry(AT_FDCWD, dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0644);
    }
    if (fd < 0 && (errno == EOPNOTSUPP || errno == EISDIR || errno == EINVAL)) {
      // no O_TMPFILE here: a named temporary file, unlinked below whatever happens
      tmp = TempName(dir);
      fd = OpenAtRetry(AT_FDCWD, tmp.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | (direct ? O_DIRECT : 0), 0644);
      if (fd < 0 && direct && errno == EINVAL) {
        fd = OpenAtRetry(AT_FDCWD, tmp.c_str(), O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
      }
    }
    if (fd < 0) return SysError::Errno(errno, "open", tmp.empty() ? dir : tmp);
    SysError err = Fill(fd);
    if (!err.failed()) err = Publish(fd, tmp, final);
    ::close(fd);
    if (!tmp.empty()) ::unlink(tmp.c_str());
    return err;
  }

  SysError Fill(int fd) {
    DirectFlag direct(fd, dir);
    if (!Aligned(head.data, head.length)) {
      SysError e = direct.Drop();
      if (e.failed()) return e;
    }
    SysError e = PwriteFull(fd, head.data, head.length, 0);
    if (e.failed() && direct.on() && e.errnum == EINVAL) {
      // the device wants another alignment: through the page cache after all
      e = direct.Drop();
      if (!e.failed()) e = PwriteFull(fd, head.data, head.length, 0);
    }
    if (e.failed()) return e;
    if (tail.length > 0) {
      e = direct.Drop();
      if (!e.failed()) e = PwriteFull(fd, tail.data, tail.length, head.length);
      if (e.failed()) return e;
    }
    return Fsync(fd, true);
  }

  SysError Publish(int fd, const std::string& tmp, const std::string& final) {
    int r;
    if (!tmp.empty()) {
      r = ::link(tmp.c_str(), final.c_str());
    } else {
      std::string self = "/proc/self/fd/" + std::to_string(fd);
      r = ::linkat(AT_FDCWD, self.c_str(), AT_FDCWD, final.c_str(), AT_SYMLINK_FOLLOW);
    }
    if (r == 0) return {};
    if (errno == EEXIST) {
      result = 1;  // another writer published the same object first
      return {};
    }
    return SysError::Errno(errno, "link", final);
  }

  Napi::Value Result(Napi::Env env) { return Napi::Number::New(env, result); }
};

struct ReadObjectJob {
  std::string path;
  Bytes buf;
  uint64_t size = 0;

  SysError Run() {
    // O_DIRECT when the buffer is aligned: one request of the object's size goes to the
    // device (measured here, 2048 cold objects of 512 KiB on 16 threads: 0.47-0.53 s, against
    // 0.80-0.90 s through the page cache, read-ahead or not).
    const bool aligned = reinterpret_cast<uintptr_t>(buf.data) % kMemAlign == 0;
    int fd = OpenAtRetry(AT_FDCWD, path.c_str(), O_RDONLY | O_CLOEXEC | (aligned ? O_DIRECT : 0), 0);
    if (fd < 0 && aligned && errno == EINVAL) fd = OpenAtRetry(AT_FDCWD, path.c_str(), O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0) return SysError::Errno(errno, "open", path);
    SysError err = Read(fd);
    if (err.failed() && err.path.empty()) err.path = path;
    ::close(fd);
    return err;
  }

  SysError Read(int fd) {
    struct stat st;
    if (::fstat(fd, &st) < 0) return SysError::Errno(errno, "fstat", path);
    size = static_cast<uint64_t>(st.st_size);
    if (size > buf.length) return {};  // the caller comes back with a buffer that fits
    DirectFlag direct(fd, path);
    size_t done = 0;
    const size_t body = direct.on() ? static_cast<size_t>(size / kAlign * kAlign) : 0;
    if (body > 0) {
      SysError e = PreadFull(fd, buf.data, body, 0, &done);
      if (e.failed() && e.errnum != EINVAL) return e;
      if (e.failed()) done = 0;  // the device wants another alignment: through the cache
    }
    if (done < size) {
      SysError e = direct.Drop();
      if (e.failed()) return e;
      size_t got = 0;
      e = PreadFull(fd, buf.data + done, static_cast<size_t>(size) - done, done, &got);
      if (e.failed()) return e;
      done += got;
    }
    size = done;  // shrank meanwhile: what was there
    return {};
  }

  Napi::Value Result(Napi::Env env) { return Napi::Number::New(env, static_cast<double>(size)); }
};

// syncDirsAsync(dirs) -> undefined: each directory opened, fsynced and closed, on up to
// kSyncThreads threads of one job (this pool thread and threads of its own), the first failure
// reported with its directory. The directory store's flush (src/storage/store/dir.ts) makes the
// links of a snapshot's new objects durable with it: one fsync per directory that got one.
// Before, each directory cost three trips through libuv's pool (open, fsync, close of a
// FileHandle): the main thread's promise work for ~70 directories of a 1 MiB-pattern qcow2
// incremental, 256 of a full snapshot. The fsyncs still run side by side, 16 at a time as
// the pool's threads did: 256 freshly linked directories took 5.9 ms with 16 threads,
// 7.8-10.5 ms with 8 and 9.2-11.6 ms with 4 (medians of 9 rounds); 70 of them, 2.7-3.4 ms with
// any of the three, against 5-6.6 ms through fs.promises.
constexpr size_t kSyncThreads = 16;

SysError SyncDir(const std::string& dir) {
  const int fd = OpenAtRetry(AT_FDCWD, dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
  if (fd < 0) return SysError::Errno(errno, "open", dir);
  SysError e = Fsync(fd, false);
  if (e.failed() && e.path.empty()) e.path = dir;
  ::close(fd);
  return e;
}

struct SyncDirsJob {
  std::vector<std::string> dirs;

  SysError Run() {
    std::atomic<size_t> next{0};
    std::mutex mu;
    SysError first;
    // this thread and up to kSyncThreads - 1 more (ParallelFor, hash_engine.h)
    ParallelFor(static_cast<int>(std::min(dirs.size(), kSyncThreads)), [&](int) {
      for (size_t i; (i = next.fetch_add(1)) < dirs.size();) {
        SysError e = SyncDir(dirs[i]);
        if (!e.failed()) continue;
        std::lock_guard<std::mutex> lock(mu);
        if (!first.failed()) first = std::move(e);
      }
    });
    return first;
  }

  Napi::Value Result(Napi::Env env) { return env.Undefined(); }
};

template <class Job>
class ObjectWorker : public PromiseWorker {
 public:
  ObjectWorker(Napi::Env env, const char* name, Job job) : PromiseWorker(env, name), job_(std::move(job)) {}

 protected:
  void Execute() override { error_ = job_.Run(); }
  Napi::Value Result(Napi::Env env) override { return job_.Result(env); }

 private:
  Job job_;
};

Napi::Value PutObjectAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  PutObjectJob job;
  if (!ArgString(info, 0, "dir", &job.dir) || !ArgString(info, 1, "name", &job.name) ||
      !ArgBytes(info, 2, "head", &job.head))
    return RejectPending(env);
  if (!info[3].IsUndefined() && !ArgBytes(info, 3, "tail", &job.tail)) return RejectPending(env);
  if (job.name.empty() || job.name.find('/') != std::string::npos) {
    ThrowInvalid(env, "putObject: name must be one path component");
    return RejectPending(env);
  }
  auto* w = new ObjectWorker<PutObjectJob>(env, "disksnap.putObject", std::move(job));
  w->Keep(info[2]);
  if (!info[3].IsUndefined()) w->Keep(info[3]);
  return w->Start();
}

// putObjectsAsync(dirs, names, heads) -> Int32Array: putObjectAsync for each object (no
// tails: plain objects), in one pool job that keeps up to kPutThreads of them in flight on
// threads of its own. Per object 0 published, 1 the name existed already, plus 2 where this
// call made the object's directory (a store's blocks/<xx>: the caller makes its name
// durable), or -ENOENT where the directory's parent is missing too; any other
// failure rejects the call with the first one, once every object's thread is done (objects
// already published stay: each is whole and durable, as a single put's). Why: a full snapshot
// of 1 GiB puts 2,048 objects, and each put on its own was a promise, a pool job and their
// wake-ups on the event loop that the hashing needs too (session 40).
constexpr size_t kPutThreads = 8;

struct PutObjectsJob {
  std::vector<PutObjectJob> items;
  std::vector<int32_t> status;

  SysError Run() {
    status.assign(items.size(), 0);
    std::atomic<size_t> next{0};
    std::mutex mu;
    SysError first;
    ParallelFor(static_cast<int>(std::min(items.size(), kPutThreads)), [&](int) {
      for (size_t i; (i = next.fetch_add(1)) < items.size();) {
        SysError e = items[i].Run();
        int made = 0;
        if (e.failed() && e.errnum == ENOENT && e.path == items[i].dir) {
          // the prefix directory's first object: made here (another thread may make it first),
          // its name durable at the caller's flush, as a single put's
          if (::mkdir(items[i].dir.c_str(), 0777) == 0) made = 2;
          if (made || errno == EEXIST) e = items[i].Run();
        }
        if (!e.failed()) {
          status[i] = items[i].result + made;
          continue;
        }
        if (e.errnum == ENOENT && e.path == items[i].dir) {
          status[i] = -ENOENT;  // its parent is missing too: the caller's to make
          continue;
        }
        std::lock_guard<std::mutex> lock(mu);
        if (!first.failed()) first = std::move(e);
      }
    });
    return first;
  }

  Napi::Value Result(Napi::Env env) {
    Napi::Int32Array out = Napi::Int32Array::New(env, status.size());
    for (size_t i = 0; i < status.size(); i++) out[i] = status[i];
    return out;
  }
};

Napi::Value PutObjectsAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsArray() || !info[1].IsArray() || !info[2].IsArray()) {
    ThrowInvalid(env, "putObjects: dirs, names and heads must be arrays");
    return RejectPending(env);
  }
  const Napi::Array dirs = info[0].As<Napi::Array>(), names = info[1].As<Napi::Array>(), heads = info[2].As<Napi::Array>();
  if (dirs.Length() != names.Length() || dirs.Length() != heads.Length()) {
    ThrowInvalid(env, "putObjects: dirs, names and heads must be of one length");
    return RejectPending(env);
  }
  PutObjectsJob job;
  job.items.resize(dirs.Length());
  for (uint32_t i = 0; i < dirs.Length(); i++) {
    PutObjectJob& it = job.items[i];
    const Napi::Value d = dirs[i], nm = names[i], h = heads[i];
    if (!d.IsString() || !nm.IsString() || !h.IsTypedArray() || h.As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
      ThrowInvalid(env, "putObjects: object " + std::to_string(i) + " needs a dir and a name (strings) and a head (a Buffer)");
      return RejectPending(env);
    }
    it.dir = d.As<Napi::String>().Utf8Value();
    it.name = nm.As<Napi::String>().Utf8Value();
    const Napi::Uint8Array b = h.As<Napi::Uint8Array>();
    it.head = Bytes{const_cast<uint8_t*>(b.Data()), b.ByteLength()};
    if (it.name.empty() || it.name.find('/') != std::string::npos) {
      ThrowInvalid(env, "putObjects: a name must be one path component");
      return RejectPending(env);
    }
  }
  auto* w = new ObjectWorker<PutObjectsJob>(env, "disksnap.putObjects", std::move(job));
  for (uint32_t i = 0; i < heads.Length(); i++) w->Keep(heads[i]);
  return w->Start();
}

Napi::Value SyncDirsAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  SyncDirsJob job;
  if (!info[0].IsArray()) {
    ThrowInvalid(env, "syncDirs: dirs must be an array of paths");
    return RejectPending(env);
  }
  const Napi::Array a = info[0].As<Napi::Array>();
  for (uint32_t i = 0; i < a.Length(); i++) {
    const Napi::Value v = a.Get(i);
    std::string dir = v.IsString() ? v.As<Napi::String>().Utf8Value() : std::string();
    if (dir.empty()) {
      ThrowInvalid(env, "syncDirs: dirs must be an array of paths");
      return RejectPending(env);
    }
    job.dirs.push_back(std::move(dir));
  }
  return (new ObjectWorker<SyncDirsJob>(env, "disksnap.syncDirs", std::move(job)))->Start();
}

// alignOffset(buf, align) -> bytes from buf's start to the first address that is a multiple of
// `align` (a power of two): JS cannot see a Buffer's address, and O_DIRECT wants page-aligned
// memory (see the note at the top).
Napi::Value AlignOffset(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Bytes buf;
  if (!ArgBytes(info, 0, "buf", &buf)) return env.Undefined();
  if (!info[1].IsNumber()) {
    ThrowInvalid(env, "alignOffset: align must be a number");
    return env.Undefined();
  }
  const double a = info[1].As<Napi::Number>().DoubleValue();
  if (!(a >= 1 && a <= 1 << 21) || (static_cast<uint32_t>(a) & (static_cast<uint32_t>(a) - 1)) != 0) {
    ThrowInvalid(env, "alignOffset: align must be a power of two up to 2 MiB");
    return env.Undefined();
  }
  const uintptr_t align = static_cast<uintptr_t>(a);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(buf.data);
  return Napi::Number::New(env, static_cast<double>((align - addr % align) % align));
}

// Whether the big buffers get 2 MiB pages or 4 KiB ones: decided once per process (PickPages),
// or forced by DISKSNAP_BUFFER_PAGES=huge|small (for comparing the two, and for tests).
enum class Pages { kUndecided, kHuge, kSmall };
struct PageChoice {
  Pages pages = Pages::kUndecided;
  const char* reason = "";
};
PageChoice g_pages;

// Whether this kernel hands free memory back to a hypervisor: a virtio balloon device that
// negotiated free page reporting (VIRTIO_BALLOON_F_REPORTING, feature bit 5; sysfs prints a
// device's features as a string of 0s and 1s, bit 0 first).
bool ReportsFreePages() {
  const char* dir = "/sys/bus/virtio/drivers/virtio_balloon";
  DIR* d = ::opendir(dir);
  if (d == nullptr) return false;
  bool reports = false;
  while (dirent* e = ::readdir(d)) {
    if (strncmp(e->d_name, "virtio", 6) != 0) continue;
    const std::string path = std::string(dir) + "/" + e->d_name + "/features";
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) continue;
    char bits[8] = {0};
    const ssize_t n = ::read(fd, bits, sizeof bits);
    ::close(fd);
    if (n > 5 && bits[5] == '1') reports = true;
  }
  ::closedir(d);
  return reports;
}

// The first touch of fresh memory is a page fault per page, and where a guest reports its free
// memory to the host, the host has to fault it in again too. The kernel reports free blocks from
// page_reporting_order up (2 MiB on the Firecracker VMs since session 32), and a huge page is
// carved out of such a block: its first touch is a host fault over 2 MiB. 4 KiB pages come from
// the kernel's per-CPU lists and small free blocks, which are not reported. Measured there,
// 2 MiB at a time over 32 MiB, 3 s after the last run (3 rounds): 4 KiB pages 0.9-1.4 ms per
// 2 MiB, steadily; huge pages 0.3-0.4 ms where the block had not been reported yet, 3.8-5.7 ms
// where it had, and most runs had several of those. Alternating fixed-state runs, huge pages
// against 4 KiB ones: the scattered qcow2 incremental 0.205 -> 0.170 s (8 pairs; 0.180 -> 0.170
// s in 12 more), its 1 MiB pattern 0.160 -> 0.140 s (8 pairs), the raw 1% incremental 0.280 ->
// 0.265 s and 0.405 -> 0.350 s (10 pairs twice); the full snapshot and the restore unchanged. Elsewhere (the VMs of sessions 24-31: a 4 KiB fault
// ~12 us, a huge page ~0.15 ms) huge pages, as before. A one-page probe of each size was tried
// first and dropped: the first huge page of a process was usually one not yet reported (0.14-0.6
// ms per MiB in 5 of 6 runs), so it chose huge pages where most of them were slow.
void PickPages() {
  const char* v = ::getenv("DISKSNAP_BUFFER_PAGES");
  if (v != nullptr && strcmp(v, "huge") == 0) {
    g_pages = {Pages::kHuge, "forced"};
  } else if (v != nullptr && strcmp(v, "small") == 0) {
    g_pages = {Pages::kSmall, "forced"};
  } else if (ReportsFreePages()) {
    g_pages = {Pages::kSmall, "free page reporting"};
  } else {
    g_pages = {Pages::kHuge, "default"};
  }
}

// allocBig(size) -> Buffer: `size` bytes of fresh zero memory (an anonymous mapping of their
// own) starting on a 2 MiB boundary, unmapped when the Buffer is collected. For the pipeline's
// large buffers (src/storage/store/direct.ts bigBuffer). The first touch of fresh memory is a
// page fault per page, and what a page costs depends on the machine (PickPages): the whole
// 2 MiB ranges are marked MADV_HUGEPAGE (one fault per 2 MiB) or, where the guest hands free
// memory back to its host, MADV_NOHUGEPAGE (4 KiB pages, also where THP is `always`). The default
// THP mode here is `madvise`: only marked ranges get huge pages; where the kernel has no THP,
// madvise fails and nothing changes. (Before, a Buffer from V8's allocator was aligned in
// JavaScript with 2 MiB of slack, which V8 counted as external memory too, and external memory
// sets off its collections: "external memory pressure" in --trace-gc.) Here each buffer counts
// its own size only, and zero memory costs nothing whatever malloc's settings are. Throws
// ENOMEM when the mapping fails.
//
// allocBig(size, true): a buffer for bulk O_DIRECT traffic (a pipeline that moves many times
// its own size through it: a full snapshot, a restore) gets 2 MiB pages even where the guest
// reports free memory (only DISKSNAP_BUFFER_PAGES=small overrides). An O_DIRECT request from
// 4 KiB pages is up to 128 segments, one per page, and the host's block device serves each;
// from a huge page it is one. Measured on the 2-core AMD EPYC VM of session 40 (free page
// reporting on; a first touch of fresh memory 0.65 ms per 2 MiB in 4 KiB pages, 2.5 ms as a
// huge page): a full snapshot of 1 GiB 0.659 -> 0.567 s (7 alternating pairs), its pwrite64
// CPU halved; a restore 0.97 -> 0.80 s. The fault costs more once and the requests cost less
// every time, so only buffers that are reused many times are asked for this way.
Napi::Value AllocBig(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsNumber()) {
    ThrowInvalid(env, "allocBig: size must be a number");
    return env.Undefined();
  }
  const double n = info[0].As<Napi::Number>().DoubleValue();
  constexpr size_t kHuge = size_t{2} << 20;
  if (!(n >= 1 && n <= double{1ull << 40}) || n != static_cast<double>(static_cast<size_t>(n))) {
    ThrowInvalid(env, "allocBig: size must be a whole number of bytes from 1 to 1 TiB");
    return env.Undefined();
  }
  const size_t len = static_cast<size_t>(n);
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t mapped = (len + page - 1) / page * page;
  // map 2 MiB more than needed, then unmap what lies before the first 2 MiB boundary and after
  // the buffer's last page
  const size_t span = mapped + kHuge;
  void* p = ::mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    Throw(env, SysError::Errno(errno, "mmap"));
    return env.Undefined();
  }
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  const uintptr_t b = (a + kHuge - 1) & ~(uintptr_t{kHuge} - 1);
  if (b > a) ::munmap(p, b - a);
  if (a + span > b + mapped) ::munmap(reinterpret_cast<void*>(b + mapped), a + span - (b + mapped));
  uint8_t* const base = reinterpret_cast<uint8_t*>(b);
  if (g_pages.pages == Pages::kUndecided) PickPages();
  const bool bulk = info.Length() > 1 && info[1].ToBoolean().Value();
  const bool forcedSmall = g_pages.pages == Pages::kSmall && strcmp(g_pages.reason, "forced") == 0;
  const bool huge = g_pages.pages == Pages::kHuge || (bulk && !forcedSmall);
  // MADV_NOHUGEPAGE too, not just no advice: where THP is `always`, unmarked memory gets them
  if (mapped >= kHuge) ::madvise(base, mapped & ~(kHuge - 1), huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
  return Napi::Buffer<uint8_t>::New(env, base, len, [mapped](Napi::Env, uint8_t* data) { ::munmap(data, mapped); });
}

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // Linux 5.14
#endif

// populateAsync(buf) -> Promise<boolean>: faults in the whole pages of `buf` for writing, on the
// thread pool (madvise MADV_POPULATE_WRITE), so that whoever fills it later does not take the
// faults; false where the kernel cannot (before Linux 5.14). The contents do not change. For
// buffers that are certain to be filled soon, allocated ahead (src/storage/store/packs.ts).
struct PopulateJob {
  Bytes buf;
  bool done = false;
  SysError Run() {
    const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const uintptr_t a = (reinterpret_cast<uintptr_t>(buf.data) + page - 1) & ~(page - 1);
    const uintptr_t b = (reinterpret_cast<uintptr_t>(buf.data) + buf.length) & ~(page - 1);
    if (b <= a) return {};
    if (::madvise(reinterpret_cast<void*>(a), b - a, MADV_POPULATE_WRITE) == 0) {
      done = true;
      return {};
    }
    if (errno == EINVAL) return {};  // an older kernel: the faults stay where they were
    return SysError::Errno(errno, "madvise");
  }
  Napi::Value Result(Napi::Env env) { return Napi::Boolean::New(env, done); }
};

Napi::Value PopulateAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  PopulateJob job;
  if (!ArgBytes(info, 0, "buf", &job.buf)) return RejectPending(env);
  auto* w = new ObjectWorker<PopulateJob>(env, "disksnap.populate", std::move(job));
  w->Keep(info[0]);
  return w->Start();
}

// bufferPages() -> { pages: 'huge' | 'small', reason: 'forced' | 'free page reporting' |
// 'default' }: what allocBig uses in this process, and why.
Napi::Value BufferPages(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (g_pages.pages == Pages::kUndecided) PickPages();
  Napi::Object o = Napi::Object::New(env);
  o.Set("pages", g_pages.pages == Pages::kHuge ? "huge" : "small");
  o.Set("reason", g_pages.reason);
  return o;
}

// tuneMalloc(): glibc's malloc keeps up to 64 MiB of freed memory for reuse instead of giving
// it back to the kernel at once, and serves allocations under 1 MiB from its heap. Node
// allocates every HTTP body chunk (64 KiB) and socket read anew; with glibc's defaults the
// heap top was trimmed and faulted in again over and over (a restore of 1 GiB from S3: 50,000
// to 78,000 page faults at ~12 us each on the bench's VM). Allocations from 1 MiB on stay
// mmaps of their own (the big pipeline buffers are mappings of their own anyway: allocBig
// above). Process-wide: the CLI
// calls it (src/engine/native.ts, tuneProcessMemory); a program that loads the addon as a
// library keeps its own settings.
Napi::Value TuneMalloc(const Napi::CallbackInfo& info) {
  bool ok = ::mallopt(M_MMAP_THRESHOLD, 1 << 20) == 1;
  ok = ::mallopt(M_TRIM_THRESHOLD, 64 << 20) == 1 && ok;
  return Napi::Boolean::New(info.Env(), ok);
}

Napi::Value ReadObjectAsync(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  ReadObjectJob job;
  if (!ArgString(info, 0, "path", &job.path) || !ArgBytes(info, 1, "buf", &job.buf)) return RejectPending(env);
  auto* w = new ObjectWorker<ReadObjectJob>(env, "disksnap.readObject", std::move(job));
  w->Keep(info[1]);
  return w->Start();
}

}  // namespace

void InitObject(Napi::Env env, Napi::Object exports) {
  exports.Set("putObjectAsync", Napi::Function::New(env, PutObjectAsync, "putObjectAsync"));
  exports.Set("readObjectAsync", Napi::Function::New(env, ReadObjectAsync, "readObjectAsync"));
  exports.Set("putObjectsAsync", Napi::Function::New(env, PutObjectsAsync, "putObjectsAsync"));
  exports.Set("syncDirsAsync", Napi::Function::New(env, SyncDirsAsync, "syncDirsAsync"));
  exports.Set("alignOffset", Napi::Function::New(env, AlignOffset, "alignOffset"));
  exports.Set("tuneMalloc", Napi::Function::New(env, TuneMalloc, "tuneMalloc"));
  exports.Set("allocBig", Napi::Function::New(env, AllocBig, "allocBig"));
  exports.Set("bufferPages", Napi::Function::New(env, BufferPages, "bufferPages"));
  exports.Set("populateAsync", Napi::Function::New(env, PopulateAsync, "populateAsync"));
}

}  // namespace disksnap
