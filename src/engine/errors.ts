/**
 * The one error class of disksnap. Native code throws it too: `src/engine/native.ts` hands this
 * constructor to the addon once at load, and C++ builds `new DisksnapError(message, code,
 * errno, path)` instead of a plain Error.
 *
 * `code` is a stable string that scripts and tests may rely on:
 *   - errno names from the kernel (`ENOENT`, `EACCES`, `ENOSPC`, `EEXIST`, ...)
 *   - `ELOCKED`        the image is locked by another process (disksnap or QEMU)
 *   - `ECORRUPT`       an on-disk structure is invalid; the message names the field
 *   - `EUNSUPPORTED`   a format feature disksnap refuses to handle; the message names it
 *   - `EPARENTCHANGED` a differencing child's parent is not the one it was made on
 *   - `EINVALID`       a bad argument (size, offset, range) detected before any I/O
 *   - `EBUSY`          the image is attached, has children, or is otherwise in use
 *   - `ENOTBUILT`      a compiled part (the FUSE server script) is missing: run `npm run build`
 */
export class DisksnapError extends Error {
  readonly code: string;
  readonly errno: number | undefined;
  readonly path: string | undefined;

  constructor(message: string, code: string, errno?: number, path?: string) {
    super(message);
    this.name = 'DisksnapError';
    this.code = code;
    this.errno = errno === undefined || errno === null || errno === 0 ? undefined : errno;
    this.path = path === undefined || path === null || path === '' ? undefined : path;
  }
}

export function isDisksnapError(e: unknown, code?: string): e is DisksnapError {
  return e instanceof DisksnapError && (code === undefined || e.code === code);
}

/** An argument error detected in TypeScript before anything touches a file. */
export function invalid(message: string, path?: string): DisksnapError {
  return new DisksnapError(message, 'EINVALID', undefined, path);
}

/** The image or store is in use (attached, has children, being committed, locked by a run). */
export function busy(message: string, path?: string): DisksnapError {
  return new DisksnapError(message, 'EBUSY', 16, path);
}

/** A structure on disk that is not what the format allows; names the field and the file. */
export function corrupt(path: string, message: string): DisksnapError {
  return new DisksnapError(`${path}: ${message}`, 'ECORRUPT', undefined, path);
}

/** Wraps an error thrown by node:fs (which has .code/.errno/.path) into a DisksnapError. */
export function fromNodeError(e: unknown, path?: string): DisksnapError {
  if (e instanceof DisksnapError) return e;
  const err = e as NodeJS.ErrnoException;
  const code = typeof err?.code === 'string' ? err.code : 'EIO';
  const p = path ?? err?.path;
  const errno = typeof err?.errno === 'number' ? Math.abs(err.errno) : undefined;
  const msg = err?.message ?? String(e);
  return new DisksnapError(msg, code, errno, p);
}
