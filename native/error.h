// Errors of the native boundary.
//
// Every failure is first captured as a plain `SysError` (no JS values), so that worker threads
// can record one; it becomes a JS `DisksnapError(message, code, errno, path)` on the main
// thread, through the constructor that src/engine/native.ts hands over once with setErrorClass().
// Nothing here throws a C++ exception (the addon is built with -fno-exceptions), and nothing
// throws into JS while another exception is already pending.
#pragma once

#include <napi.h>

#include <string>

namespace disksnap {

struct SysError {
  int errnum = 0;        // kernel errno, 0 when there is none
  std::string code;      // stable string code; empty means "the errno name"
  std::string syscall;   // "open", "pread", ... (only used to build the default message)
  std::string path;      // the file concerned, when known
  std::string message;   // empty means "<CODE>: <strerror>, <syscall> '<path>'"

  bool failed() const { return errnum != 0 || !code.empty(); }

  static SysError Errno(int errnum, const char* syscall, const std::string& path = {});
  static SysError Custom(const char* code, int errnum, const std::string& message,
                         const std::string& path = {});
};

// "ENOENT" for ENOENT, ...; "E<number>" for an errno we do not know by name.
std::string ErrnoName(int errnum);

// Per-environment state (napi instance data).
struct AddonData {
  Napi::FunctionReference errorClass;
};

// Builds the DisksnapError (or, before setErrorClass, an Error with the same properties).
// Returns an empty value if building it raised a JS exception.
Napi::Value MakeError(Napi::Env env, const SysError& err);

// Throws `err` into JS unless an exception is already pending.
void Throw(Napi::Env env, const SysError& err);

// Throws DisksnapError(code EINVAL, errno EINVAL) for a bad argument.
void ThrowInvalid(Napi::Env env, const std::string& message);

// Replaces the stack of `error` by "<name>: <message>" followed by the frames captured in
// `captured` (an Error created when the async call was made), so that a rejection points at
// the JS code that started the operation rather than at nothing.
void AdoptStack(Napi::Env env, Napi::Value error, Napi::Object captured);

}  // namespace disksnap
