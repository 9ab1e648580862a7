/**
 * Loading an esbuild bundle with V8's code cache for it. `npm run build` makes two bundles
 * in dist/src/cli/: the CLI (`disksnap.bundle.js`, loaded by ../cli/main.ts) and the AWS SDK's
 * S3 client (`s3-sdk.bundle.js`, loaded by ../storage/store/s3.ts the first time an S3 store
 * is opened). ../cli/code-cache.ts runs each one on a training workload and keeps the code V8
 * compiled for it beside the bundle (`.cache`), which spares later processes most of parsing
 * and compiling it.
 *
 * A cache is used only for the bundle bytes it was made from (its first 32 bytes are their
 * SHA-256; V8 itself only compares lengths) and only if V8 accepts it (same V8 version and
 * flags); otherwise the bundle compiles as it would without one.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import * as vm from 'node:vm';

export interface LoadedScript<T> {
  /** what the bundle's module.exports became */
  exports: T;
  /** the compiled bundle, whose createCachedData() the build keeps */
  script: vm.Script;
  /** SHA-256 of the bundle's bytes, the cache's first 32 bytes */
  digest: Buffer;
  /** what became of the cache: used, refused by V8, made for other bytes, or none */
  cache: 'accepted' | 'rejected' | 'stale' | 'absent';
}

/**
 * The first line of a bundle as the build writes it (esbuild's `--banner`, package.json; its
 * `--footer` closes it): the same wrapper as Node's own for a CommonJS file, so that the file
 * is the script V8 compiles, byte for byte. Wrapped here instead, the source was a string
 * concatenated around the bundle's 0.9 MB, which V8 copied flat before compiling: ~270 page
 * faults (of ~1,150 in loading the bundle), and `--version` 107 -> 101 ms in 40 alternating runs.
 * A bundle without it (not from this build) is still wrapped here, on its first line, so that
 * stack traces keep its line numbers.
 */
export const WRAPPER = '(function (exports, require, module, __filename, __dirname) {';

/** The code cache file of a bundle: `x.bundle.js` -> `x.bundle.cache`. */
export function cacheFileOf(bundle: string): string {
  return bundle.replace(/\.js$/, '.cache');
}

/**
 * Loads and runs the CommonJS bundle `file` (undefined when there is none), with the code
 * cache `cacheFile` if it fits (null: compile without one).
 */
export function loadScript<T>(file: string, cacheFile: string | null): LoadedScript<T> | undefined {
  let bytes: Buffer;
  try {
    bytes = fs.readFileSync(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  const digest = createHash('sha256').update(bytes).digest();
  let cachedData: Buffer | undefined;
  let cache: LoadedScript<T>['cache'] = 'absent';
  try {
    const c = cacheFile === null ? Buffer.alloc(0) : fs.readFileSync(cacheFile);
    if (c.length > 32 && c.subarray(0, 32).equals(digest)) cachedData = c.subarray(32);
    else if (cacheFile !== null) cache = 'stale';
  } catch {
    // no cache: compile as usual
  }
  const text = bytes.toString('utf8');
  const script = new vm.Script(text.startsWith(WRAPPER) ? text : `${WRAPPER}${text}\n})`, { filename: file, cachedData });
  if (cachedData) cache = script.cachedDataRejected ? 'rejected' : 'accepted';
  const mod = { exports: {} as T, filename: file, id: file, loaded: false };
  (script.runInThisContext() as (...a: unknown[]) => void)(mod.exports, createRequire(file), mod, file, path.dirname(file));
  mod.loaded = true;
  return { exports: mod.exports, script, digest, cache };
}

/** Keeps `loaded`'s compiled code as the cache file `out` (written under a temporary name, then renamed). */
export function keepCodeCache(loaded: LoadedScript<unknown>, out: string): void {
  const tmp = `${out}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, Buffer.concat([loaded.digest, loaded.script.createCachedData()]));
  fs.renameSync(tmp, out);
}
