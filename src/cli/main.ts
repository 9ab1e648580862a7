#!/usr/bin/env node
/**
 * The `disksnap` executable. `npm run build` bundles the program (./program.ts and all it
 * loads) into one file, `disksnap.bundle.js`, and keeps V8's compiled code for that file
 * from a training run (`disksnap.bundle.cache`, written by ./code-cache.ts). This launcher
 * compiles the bundle with that code, which spares every command most of the parsing and
 * compiling of ~0.9 MB of JavaScript (README, "Design": ~40 ms of a 0.3 s snapshot). When the
 * cache is used: ../engine/bundle.ts. Without a bundle (a build that stopped after tsc) the
 * program loads as plain modules.
 *
 * The bundle is built with esbuild's `--minify-whitespace --charset=ascii`: without comments it
 * is 0.9 MB instead of 1.3 MB, and with no byte above 0x7f V8 holds its source as a one-byte
 * string (three comments with a dash made it two-byte before). Reading, decoding and
 * compiling it with its cache went from ~35 to ~22 ms, and `--version` from 219 to 197 ms
 * (medians of 40 alternating runs, `node -e 0` 100 ms). `--line-limit=160` keeps its lines
 * short, so that the source line Node prints above an uncaught exception's stack stays
 * readable (without it, lines of ~30 KB). Without `--keep-names`: that option wraps every
 * function and class of the bundle in a call that sets its name (5 ms of a command's CPU
 * profile, and 1.2 MB of heap); the names are the source's anyway, where esbuild renamed none
 * (identifiers are not minified), and nothing here reads a function's name. `--version` 209 ->
 * 196 ms, a "nothing changed" snapshot 280 -> 274 ms (40 and 20 alternating runs).
 *
 * The build puts two lines of shell in place of this file's #! line (./executable.ts): they
 * start node without NODE_EXTRA_CA_CERTS, which node 20 parses at start (~40 ms with Debian's
 * bundle), and pass the value on; `deferExtraCa` puts it back for child processes, and an S3
 * store over https trusts it at its first connection (../engine/extra-ca.ts). Run as `node
 * main.js`, the variable is node's own as before.
 */
import * as path from 'node:path';
import { LoadedScript, cacheFileOf, loadScript } from '../engine/bundle';
import { deferExtraCa } from '../engine/extra-ca';

export const BUNDLE = path.join(__dirname, 'disksnap.bundle.js');
export const CODE_CACHE = cacheFileOf(BUNDLE);

/** What the bundle exports (./program.ts). */
export interface Program {
  main(argv: string[]): Promise<void>;
}

export interface LoadedBundle extends Omit<LoadedScript<Program>, 'exports'> {
  program: Program;
}

/**
 * Loads and runs the bundle (undefined when there is none), with its code cache if it fits
 * (`cacheFile` null: compile without one).
 */
export function loadBundle(file = BUNDLE, cacheFile: string | null = CODE_CACHE): LoadedBundle | undefined {
  const b = loadScript<Program>(file, cacheFile);
  return b && { program: b.exports, script: b.script, digest: b.digest, cache: b.cache };
}

/** The V8 flag every disksnap process runs with (setCliFlags). */
export const V8_FLAG = `--interrupt-budget=${8 * 132 * 1024}`;

/**
 * Node's modules that most commands load, loaded before setCliFlags: node keeps V8's compiled
 * code for its own modules, and V8 takes compiled code only from a process with the same flags,
 * so a node module loaded after the flag is set is compiled from its source. Measured with
 * `node -e` loading crypto, fs/promises, stream, net, zlib and http: 35.8 ms, 45.7 with the flag
 * set first from JavaScript (as every command did before session 36) and 53.6 with it on
 * node's command line (medians of 15). (`node:v8`, which sets it, is loaded just before.)
 */
const PRELOAD = ['node:fs/promises', 'node:os', 'node:process'];

/**
 * V8 optimizes a function (TurboFan, on a second thread) once it has run about 132 KB of its
 * bytecode; a command lasts a fraction of a second, and those compilations were ~10% of an
 * incremental snapshot's CPU (a `perf` profile: the compiler's own work and the memory it
 * touches, at ~11 us per first-touched page on these VMs). Eight times the budget leaves the
 * short commands' functions to the baseline compiler and still optimizes what a long command
 * runs hot. 8 alternating runs of a 1% incremental, the build before and after: 0.61 -> 0.55 s,
 * CPU 0.90 -> 0.75 s; full snapshots no slower; `--version` ~12 ms slower (loading node:v8
 * costs more than such a command saves) (README, Design). V8 takes a code cache only from a
 * process with the same flags, so ./code-cache.ts trains with this too, and node's own
 * modules are loaded first (PRELOAD).
 */
export function setCliFlags(): void {
  for (const m of PRELOAD) require(m);
  (require('node:v8') as typeof import('node:v8')).setFlagsFromString(V8_FLAG);
}

if (require.main === module) {
  deferExtraCa();
  setCliFlags();
  const program: Program = loadBundle()?.program ?? (require('./program') as Program);
  void program.main(process.argv);
}
