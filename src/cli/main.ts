#!/usr/bin/env node
/**
 * The `disksnap` executable. `npm run build` bundles the program (./program.ts and all it
 * loads) into one file, `disksnap.bundle.js`, and keeps V8's compiled code for that file
 * from a training run (`disksnap.bundle.cache`, written by ./code-cache.ts). This launcher
 * compiles the bundle with that code, which spares every command most of the parsing and
 * compiling of ~1 MB of JavaScript (README, "Design": ~40 ms of a 0.3 s snapshot).
 *
 * A cache is used only for the bundle bytes it was made from (its first 32 bytes are their
 * SHA-256; V8 itself only compares lengths) and only if V8 accepts it (same V8 version and
 * flags); otherwise the bundle compiles as it would without one. Without a bundle (a build
 * that stopped after tsc) the program loads as plain modules.
 */
import { createHash } from 'node:crypto';
import * as fs from 'node:fs';
import { createRequire } from 'node:module';
import * as path from 'node:path';
import * as vm from 'node:vm';

export const BUNDLE = path.join(__dirname, 'disksnap.bundle.js');
export const CODE_CACHE = path.join(__dirname, 'disksnap.bundle.cache');

/** What the bundle exports (./program.ts). */
export interface Program {
  main(argv: string[]): Promise<void>;
}

export interface LoadedBundle {
  program: Program;
  /** the compiled bundle, whose createCachedData() ./code-cache.ts keeps */
  script: vm.Script;
  /** SHA-256 of the bundle's bytes, the cache's first 32 bytes */
  digest: Buffer;
  /** what became of the cache: used, refused by V8, made for other bytes, or none */
  cache: 'accepted' | 'rejected' | 'stale' | 'absent';
}

/**
 * Loads and runs the bundle (undefined when there is none), with its code cache if it fits
 * (`cacheFile` null: compile without one).
 */
export function loadBundle(file = BUNDLE, cacheFile: string | null = CODE_CACHE): LoadedBundle | undefined {
  let bytes: Buffer;
  try {
    bytes = fs.readFileSync(file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw e;
  }
  const digest = createHash('sha256').update(bytes).digest();
  let cachedData: Buffer | undefined;
  let cache: LoadedBundle['cache'] = 'absent';
  try {
    const c = cacheFile === null ? Buffer.alloc(0) : fs.readFileSync(cacheFile);
    if (c.length > 32 && c.subarray(0, 32).equals(digest)) cachedData = c.subarray(32);
    else if (cacheFile !== null) cache = 'stale';
  } catch {
    // no cache: compile as usual
  }
  // the same wrapper as Node's own for a CommonJS file, on the bundle's first line so that
  // stack traces keep its line numbers
  const script = new vm.Script(`(function (exports, require, module, __filename, __dirname) {${bytes.toString('utf8')}\n})`, { filename: file, cachedData });
  if (cachedData) cache = script.cachedDataRejected ? 'rejected' : 'accepted';
  const mod = { exports: {} as Program, filename: file, id: file, loaded: false };
  (script.runInThisContext() as (...a: unknown[]) => void)(mod.exports, createRequire(file), mod, file, path.dirname(file));
  mod.loaded = true;
  return { program: mod.exports, script, digest, cache };
}

if (require.main === module) {
  const program: Program = loadBundle()?.program ?? (require('./program') as Program);
  void program.main(process.argv);
}
