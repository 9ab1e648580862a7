// FUSE mount plumbing: the two things node cannot do by itself. The protocol (reading
// requests from /dev/fuse and writing replies) is plain read/writev on a descriptor, which the
// server in src/host/fuse-server.ts does with node's fs; only mount(2) and umount2(2) need C.
//
// We speak the kernel protocol directly instead of linking libfuse: `npm install` must build
// on a fresh machine without libfuse3-dev, and the server has one regular file to serve, which
// needs a dozen opcodes, not a library. As root, mount(2) with "fd=N,rootmode=..." is all that
// fusermount3 would do for us.
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <string>

#include "args.h"
#include "error.h"
#include "addon.h"

namespace disksnap {

namespace {

// fuseMount(mountpoint, fsname, readOnly, extraOptions) -> fd of /dev/fuse, mounted.
// extraOptions is appended to the kernel's mount data ("max_read=...,allow_other", or "").
Napi::Value FuseMount(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string mountpoint, fsname, extra;
  bool readOnly;
  if (!ArgString(info, 0, "mountpoint", &mountpoint) || !ArgString(info, 1, "fsname", &fsname) ||
      !ArgBool(info, 2, "readOnly", &readOnly) || !ArgString(info, 3, "extraOptions", &extra))
    return Napi::Value();
  int fd;
  do {
    fd = ::open("/dev/fuse", O_RDWR | O_CLOEXEC);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) {
    Throw(env, SysError::Errno(errno, "open", "/dev/fuse"));
    return Napi::Value();
  }
  struct stat st;
  if (::stat(mountpoint.c_str(), &st) < 0) {
    int e = errno;
    ::close(fd);
    Throw(env, SysError::Errno(e, "stat", mountpoint));
    return Napi::Value();
  }
  char data[256];
  snprintf(data, sizeof data, "fd=%d,rootmode=%o,user_id=%u,group_id=%u", fd, S_IFDIR | 0755,
           static_cast<unsigned>(::getuid()), static_cast<unsigned>(::getgid()));
  std::string opts = data;
  if (!extra.empty()) opts += "," + extra;
  unsigned long flags = MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME | (readOnly ? MS_RDONLY : 0);
  if (::mount(fsname.c_str(), mountpoint.c_str(), "fuse.disksnap", flags, opts.c_str()) < 0) {
    int e = errno;
    ::close(fd);
    Throw(env, SysError::Errno(e, "mount(fuse)", mountpoint));
    return Napi::Value();
  }
  return Napi::Number::New(env, fd);
}

// unmount(path, lazy): umount2 with MNT_DETACH when lazy.
Napi::Value Unmount(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path;
  bool lazy;
  if (!ArgString(info, 0, "path", &path) || !ArgBool(info, 1, "lazy", &lazy)) return Napi::Value();
  if (::umount2(path.c_str(), (lazy ? MNT_DETACH : 0) | UMOUNT_NOFOLLOW) < 0) {
    Throw(env, SysError::Errno(errno, "umount2", path));
    return Napi::Value();
  }
  return env.Undefined();
}

}  // namespace

void InitFuse(Napi::Env env, Napi::Object exports) {
  exports.Set("fuseMount", Napi::Function::New(env, FuseMount, "fuseMount"));
  exports.Set("unmount", Napi::Function::New(env, Unmount, "unmount"));
}

}  // namespace disksnap
