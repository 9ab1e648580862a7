#include "error.h"

#include <errno.h>
#include <string.h>

namespace disksnap {

SysError SysError::Errno(int errnum, const char* syscall, const std::string& path) {
  SysError e;
  e.errnum = errnum;
  e.syscall = syscall;
  e.path = path;
  return e;
}

SysError SysError::Custom(const char* code, int errnum, const std::string& message,
                          const std::string& path) {
  SysError e;
  e.errnum = errnum;
  e.code = code;
  e.message = message;
  e.path = path;
  return e;
}

std::string ErrnoName(int errnum) {
  switch (errnum) {
#define DISKSNAP_ERRNO(name) \
  case name:                 \
    return #name;
    DISKSNAP_ERRNO(EPERM)
    DISKSNAP_ERRNO(ENOENT)
    DISKSNAP_ERRNO(ESRCH)
    DISKSNAP_ERRNO(EINTR)
    DISKSNAP_ERRNO(EIO)
    DISKSNAP_ERRNO(ENXIO)
    DISKSNAP_ERRNO(E2BIG)
    DISKSNAP_ERRNO(ENOEXEC)
    DISKSNAP_ERRNO(EBADF)
    DISKSNAP_ERRNO(ECHILD)
    DISKSNAP_ERRNO(EAGAIN)
    DISKSNAP_ERRNO(ENOMEM)
    DISKSNAP_ERRNO(EACCES)
    DISKSNAP_ERRNO(EFAULT)
    DISKSNAP_ERRNO(ENOTBLK)
    DISKSNAP_ERRNO(EBUSY)
    DISKSNAP_ERRNO(EEXIST)
    DISKSNAP_ERRNO(EXDEV)
    DISKSNAP_ERRNO(ENODEV)
    DISKSNAP_ERRNO(ENOTDIR)
    DISKSNAP_ERRNO(EISDIR)
    DISKSNAP_ERRNO(EINVAL)
    DISKSNAP_ERRNO(ENFILE)
    DISKSNAP_ERRNO(EMFILE)
    DISKSNAP_ERRNO(ENOTTY)
    DISKSNAP_ERRNO(ETXTBSY)
    DISKSNAP_ERRNO(EFBIG)
    DISKSNAP_ERRNO(ENOSPC)
    DISKSNAP_ERRNO(ESPIPE)
    DISKSNAP_ERRNO(EROFS)
    DISKSNAP_ERRNO(EMLINK)
    DISKSNAP_ERRNO(EPIPE)
    DISKSNAP_ERRNO(ERANGE)
    DISKSNAP_ERRNO(EDEADLK)
    DISKSNAP_ERRNO(ENAMETOOLONG)
    DISKSNAP_ERRNO(ENOLCK)
    DISKSNAP_ERRNO(ENOSYS)
    DISKSNAP_ERRNO(ENOTEMPTY)
    DISKSNAP_ERRNO(ELOOP)
    DISKSNAP_ERRNO(ENODATA)
    DISKSNAP_ERRNO(EOVERFLOW)
    DISKSNAP_ERRNO(EOPNOTSUPP)
    DISKSNAP_ERRNO(ETIMEDOUT)
    DISKSNAP_ERRNO(ESTALE)
    DISKSNAP_ERRNO(EDQUOT)
    DISKSNAP_ERRNO(ECANCELED)
    DISKSNAP_ERRNO(EUCLEAN)
    DISKSNAP_ERRNO(EREMOTEIO)
    DISKSNAP_ERRNO(ENOMEDIUM)
    DISKSNAP_ERRNO(EMEDIUMTYPE)
#undef DISKSNAP_ERRNO
    default:
      return "E" + std::to_string(errnum);
  }
}

static std::string DefaultMessage(const SysError& err, const std::string& code) {
  std::string msg = code;
  if (err.errnum != 0) {
    char buf[128];
    // GNU strerror_r: returns a pointer to the text (thread-safe, unlike strerror).
    msg += ": ";
    msg += strerror_r(err.errnum, buf, sizeof buf);
  }
  if (!err.syscall.empty()) msg += ", " + err.syscall;
  if (!err.path.empty()) msg += " '" + err.path + "'";
  return msg;
}

Napi::Value MakeError(Napi::Env env, const SysError& err) {
  const std::string code = err.code.empty() ? ErrnoName(err.errnum) : err.code;
  const std::string message = err.message.empty() ? DefaultMessage(err, code) : err.message;

  Napi::Value jsErrno = err.errnum != 0 ? Napi::Value(Napi::Number::New(env, err.errnum))
                                        : Napi::Value(env.Undefined());
  Napi::Value jsPath = err.path.empty() ? Napi::Value(env.Undefined())
                                        : Napi::Value(Napi::String::New(env, err.path));

  AddonData* data = env.GetInstanceData<AddonData>();
  if (data != nullptr && !data->errorClass.IsEmpty()) {
    Napi::Object obj = data->errorClass.New(
        {Napi::String::New(env, message), Napi::String::New(env, code), jsErrno, jsPath});
    if (env.IsExceptionPending()) return Napi::Value();
    return obj;
  }
  // setErrorClass() has not been called (only possible when the .node file is loaded
  // directly): a plain Error with the same properties.
  Napi::Object obj = Napi::Error::New(env, message).Value();
  obj.Set("code", Napi::String::New(env, code));
  obj.Set("errno", jsErrno);
  obj.Set("path", jsPath);
  return obj;
}

void Throw(Napi::Env env, const SysError& err) {
  if (env.IsExceptionPending()) return;
  Napi::Value value = MakeError(env, err);
  if (value.IsEmpty() || env.IsExceptionPending()) return;
  Napi::Error(env, value).ThrowAsJavaScriptException();
}

void ThrowInvalid(Napi::Env env, const std::string& message) {
  Throw(env, SysError::Custom("EINVAL", EINVAL, message));
}

void AdoptStack(Napi::Env env, Napi::Value error, Napi::Object captured) {
  if (!error.IsObject() || env.IsExceptionPending()) return;
  Napi::Object err = error.As<Napi::Object>();
  Napi::Value stack = captured.Get("stack");
  if (env.IsExceptionPending() || !stack.IsString()) return;
  std::string frames = stack.As<Napi::String>().Utf8Value();
  size_t nl = frames.find('\n');
  frames = nl == std::string::npos ? std::string() : frames.substr(nl);
  Napi::Value name = err.Get("name");
  Napi::Value message = err.Get("message");
  if (env.IsExceptionPending()) return;
  std::string head = (name.IsString() ? name.As<Napi::String>().Utf8Value() : "Error") + ": " +
                     (message.IsString() ? message.As<Napi::String>().Utf8Value() : "");
  err.Set("stack", Napi::String::New(env, head + frames));
}

}  // namespace disksnap
