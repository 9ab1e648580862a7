// Loop devices (attach, detach, status), FIFREEZE/FITHAW and BLKGETSIZE64. The typed contract
// is in src/engine/native.ts (`loopAttach`, ...); the policy (which image may be attached, state
// records, freeze lifetimes) lives in src/host/.
//
// Attach is the sequence util-linux's losetup uses, without its policy:
//   1. the caller opens the backing file (O_RDWR, or O_RDONLY for a read-only device) and
//      locks it; the device keeps that open file description, and so the lock, while bound;
//   2. LOOP_CTL_GET_FREE on /dev/loop-control -> N (the kernel creates loopN if needed; where
//      no udev makes /dev/loopN, we mknod it from /sys/block/loopN/dev);
//   3. LOOP_CONFIGURE (5.8+: fd, flags and file name in one atomic ioctl), or on kernels that
//      do not know it (EINVAL/ENOTTY) LOOP_SET_FD then LOOP_SET_STATUS64;
//   4. EBUSY from 3 means another process took loopN between 2 and 3: ask again (bounded).
// No LO_FLAGS_AUTOCLEAR: the device must outlive the attaching process (autoclear would detach
// it as soon as we close our descriptor). Detach is LOOP_CLR_FD; the kernel turns it into a
// deferred detach (autoclear) when the device is still open, e.g. mounted — src/host refuses
// that case before asking.
//
// Everything here is a handful of ioctls and returns in well under a millisecond, except
// FIFREEZE (it syncs the filesystem first), which also has an async form.
#include "addon.h"
#include "io.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <string>

#include "args.h"
#include "error.h"
#include "worker.h"

namespace disksnap {

namespace {

int OpenRetry(const char* path, int flags) { return OpenAtRetry(AT_FDCWD, path, flags | O_CLOEXEC); }

class Fd {
 public:
  explicit Fd(int fd = -1) : fd_(fd) {}
  ~Fd() { reset(); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_;
};

// The kernel's dev_t encoding in loop_info64.lo_device (huge_encode_dev) -> glibc's dev_t,
// which is what stat(2) (and so node's fs.stat and our fstat) reports.
uint64_t KernelDevToUser(uint64_t dev) {
  unsigned major = static_cast<unsigned>((dev & 0xfff00) >> 8);
  unsigned minor = static_cast<unsigned>((dev & 0xff) | ((dev >> 12) & 0xfff00));
  return makedev(major, minor);
}

// Opens /dev/loopN, creating the node from sysfs where nothing else did (containers, no udev).
int OpenLoopDevice(int index, int flags, std::string* path, SysError* err) {
  *path = "/dev/loop" + std::to_string(index);
  int fd = OpenRetry(path->c_str(), flags);
  if (fd >= 0 || errno != ENOENT) {
    if (fd < 0) *err = SysError::Errno(errno, "open", *path);
    return fd;
  }
  std::string sys = "/sys/block/loop" + std::to_string(index) + "/dev";
  FILE* f = fopen(sys.c_str(), "re");
  unsigned major = 0, minor = 0;
  bool ok = f != nullptr && fscanf(f, "%u:%u", &major, &minor) == 2;
  if (f != nullptr) fclose(f);
  if (!ok) {
    *err = SysError::Errno(ENOENT, "open", *path);
    return -1;
  }
  if (::mknod(path->c_str(), S_IFBLK | 0660, makedev(major, minor)) < 0 && errno != EEXIST) {
    *err = SysError::Errno(errno, "mknod", *path);
    return -1;
  }
  fd = OpenRetry(path->c_str(), flags);
  if (fd < 0) *err = SysError::Errno(errno, "open", *path);
  return fd;
}

void SetFileName(loop_info64* info, const std::string& backing) {
  // lo_file_name is informational (64 bytes, NUL-terminated); sysfs has the full path.
  snprintf(reinterpret_cast<char*>(info->lo_file_name), LO_NAME_SIZE, "%s", backing.c_str());
}

struct AttachResult {
  int index = -1;
  std::string device;
  const char* method = "";
};

SysError Attach(int fileFd, const std::string& backing, bool readOnly, bool directIo,
                AttachResult* out) {
  Fd control(OpenRetry("/dev/loop-control", O_RDWR));
  if (control.get() < 0) return SysError::Errno(errno, "open", "/dev/loop-control");

  for (int attempt = 0; attempt < 64; attempt++) {
    int index = ::ioctl(control.get(), LOOP_CTL_GET_FREE);
    if (index < 0) return SysError::Errno(errno, "ioctl(LOOP_CTL_GET_FREE)", "/dev/loop-control");
    std::string device;
    SysError err;
    Fd dev(OpenLoopDevice(index, readOnly ? O_RDONLY : O_RDWR, &device, &err));
    if (dev.get() < 0) return err;

    loop_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.fd = static_cast<uint32_t>(fileFd);
    cfg.info.lo_flags = (readOnly ? LO_FLAGS_READ_ONLY : 0) | (directIo ? LO_FLAGS_DIRECT_IO : 0);
    SetFileName(&cfg.info, backing);
    if (::ioctl(dev.get(), LOOP_CONFIGURE, &cfg) == 0) {
      out->index = index;
      out->device = device;
      out->method = "LOOP_CONFIGURE";
      return SysError();
    }
    int e = errno;
    if (e == EBUSY) continue;  // taken by someone else since GET_FREE
    if (e != EINVAL && e != ENOTTY) return SysError::Errno(e, "ioctl(LOOP_CONFIGURE)", device);

    // Kernels before 5.8: two steps. Read-only follows the backing descriptor's mode.
    if (::ioctl(dev.get(), LOOP_SET_FD, fileFd) < 0) {
      e = errno;
      if (e == EBUSY) continue;
      return SysError::Errno(e, "ioctl(LOOP_SET_FD)", device);
    }
    loop_info64 info;
    memset(&info, 0, sizeof info);
    info.lo_flags = directIo ? LO_FLAGS_DIRECT_IO : 0;
    SetFileName(&info, backing);
    if (::ioctl(dev.get(), LOOP_SET_STATUS64, &info) < 0) {
      e = errno;
      ::ioctl(dev.get(), LOOP_CLR_FD, 0);
      return SysError::Errno(e, "ioctl(LOOP_SET_STATUS64)", device);
    }
    out->index = index;
    out->device = device;
    out->method = "LOOP_SET_FD";
    return SysError();
  }
  return SysError::Custom("EBUSY", EBUSY,
                          "no free loop device: every one offered by /dev/loop-control was taken "
                          "by another process first (64 attempts)");
}

// loopAttach(fd, readOnly, directIo, name) -> {device, index, method}
// `fd` is the caller's open backing file (O_RDWR unless readOnly); the loop device takes its own
// reference to that open file description, so the caller may close it afterwards — and any OFD
// lock on it stays held until the device is detached.
Napi::Value LoopAttach(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  std::string name;
  bool readOnly, directIo;
  if (!ArgFd(info, 0, "fd", &fd) || !ArgBool(info, 1, "readOnly", &readOnly) ||
      !ArgBool(info, 2, "directIo", &directIo) || !ArgString(info, 3, "name", &name))
    return Napi::Value();
  AttachResult r;
  SysError err = Attach(fd, name, readOnly, directIo, &r);
  if (err.failed()) {
    Throw(env, err);
    return Napi::Value();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("device", Napi::String::New(env, r.device));
  o.Set("index", Napi::Number::New(env, r.index));
  o.Set("method", Napi::String::New(env, r.method));
  return o;
}

// Argument 0 names a loop device; opens it read-only. False (with a JS exception pending)
// when the argument is not a string or the device cannot be opened.
bool OpenDeviceArg(const Napi::CallbackInfo& info, std::string* device, Fd* dev) {
  if (!ArgString(info, 0, "device", device)) return false;
  dev->reset(OpenRetry(device->c_str(), O_RDONLY));
  if (dev->get() >= 0) return true;
  Throw(info.Env(), SysError::Errno(errno, "open", *device));
  return false;
}

// loopDetach(device): LOOP_CLR_FD. ENXIO when nothing is attached.
Napi::Value LoopDetach(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string device;
  Fd dev;
  if (!OpenDeviceArg(info, &device, &dev)) return Napi::Value();
  int rc;
  do {
    rc = ::ioctl(dev.get(), LOOP_CLR_FD, 0);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    Throw(env, SysError::Errno(errno, "ioctl(LOOP_CLR_FD)", device));
    return Napi::Value();
  }
  return env.Undefined();
}

// loopStatus(device) -> {backingDev, backingIno, offset, sizeLimit, flags, fileName} | null
// null when the device exists but nothing is attached (ENXIO).
Napi::Value LoopStatus(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string device;
  Fd dev;
  if (!OpenDeviceArg(info, &device, &dev)) return Napi::Value();
  loop_info64 li;
  memset(&li, 0, sizeof li);
  if (::ioctl(dev.get(), LOOP_GET_STATUS64, &li) < 0) {
    if (errno == ENXIO) return env.Null();
    Throw(env, SysError::Errno(errno, "ioctl(LOOP_GET_STATUS64)", device));
    return Napi::Value();
  }
  Napi::Object o = Napi::Object::New(env);
  o.Set("number", Napi::Number::New(env, li.lo_number));
  o.Set("backingDev", Napi::Number::New(env, static_cast<double>(KernelDevToUser(li.lo_device))));
  o.Set("backingIno", Napi::BigInt::New(env, static_cast<uint64_t>(li.lo_inode)));
  o.Set("offset", Napi::Number::New(env, static_cast<double>(li.lo_offset)));
  o.Set("sizeLimit", Napi::Number::New(env, static_cast<double>(li.lo_sizelimit)));
  o.Set("flags", Napi::Number::New(env, li.lo_flags));
  li.lo_file_name[LO_NAME_SIZE - 1] = 0;
  o.Set("fileName", Napi::String::New(env, reinterpret_cast<const char*>(li.lo_file_name)));
  return o;
}

// ---------------------------------------------------------------------------------------------
// FIFREEZE / FITHAW on a mountpoint (any file or directory of the filesystem works).

SysError FreezeOrThaw(const std::string& path, bool freeze) {
  Fd fd(OpenRetry(path.c_str(), O_RDONLY));
  if (fd.get() < 0) return SysError::Errno(errno, "open", path);
  int rc;
  do {
    rc = ::ioctl(fd.get(), freeze ? FIFREEZE : FITHAW, 0);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) return SysError::Errno(errno, freeze ? "ioctl(FIFREEZE)" : "ioctl(FITHAW)", path);
  return SysError();
}

Napi::Value FsFreeze(const Napi::CallbackInfo& info) {
  std::string path;
  if (!ArgString(info, 0, "mountpoint", &path)) return Napi::Value();
  SysError err = FreezeOrThaw(path, true);
  if (err.failed()) Throw(info.Env(), err);
  return info.Env().Undefined();
}

Napi::Value FsThaw(const Napi::CallbackInfo& info) {
  std::string path;
  if (!ArgString(info, 0, "mountpoint", &path)) return Napi::Value();
  SysError err = FreezeOrThaw(path, false);
  if (err.failed()) Throw(info.Env(), err);
  return info.Env().Undefined();
}

class FreezeWorker : public PromiseWorker {
 public:
  FreezeWorker(Napi::Env env, std::string path)
      : PromiseWorker(env, "disksnap.fsFreeze"), path_(std::move(path)) {}

 protected:
  void Execute() override { error_ = FreezeOrThaw(path_, true); }

 private:
  std::string path_;
};

Napi::Value FsFreezeAsync(const Napi::CallbackInfo& info) {
  std::string path;
  if (!ArgString(info, 0, "mountpoint", &path)) return Napi::Value();
  return (new FreezeWorker(info.Env(), path))->Start();
}

// blockDeviceSize(fd) -> bytes (BLKGETSIZE64)
Napi::Value BlockDeviceSize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, "fd", &fd)) return Napi::Value();
  uint64_t size = 0;
  if (::ioctl(fd, BLKGETSIZE64, &size) < 0) {
    Throw(env, SysError::Errno(errno, "ioctl(BLKGETSIZE64)"));
    return Napi::Value();
  }
  return Napi::Number::New(env, static_cast<double>(size));
}

}  // namespace

void InitLoop(Napi::Env env, Napi::Object exports) {
  auto fn = [&](const char* name, Napi::Function::Callback cb) {
    exports.Set(name, Napi::Function::New(env, cb, name));
  };
  fn("loopAttach", LoopAttach);
  fn("loopDetach", LoopDetach);
  fn("loopStatus", LoopStatus);
  fn("fsFreeze", FsFreeze);
  fn("fsFreezeAsync", FsFreezeAsync);
  fn("fsThaw", FsThaw);
  fn("blockDeviceSize", BlockDeviceSize);
}

}  // namespace disksnap
