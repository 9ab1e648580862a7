/**
 * A build step (`npm run build`, after the bundle): runs the commands users run most, in
 * one process, from the bundle, on a small generated image and store in a temporary
 * directory, then keeps V8's code for everything they compiled as the bundle's code cache
 * (./main.ts). A training that fails leaves no cache and fails nothing: the CLI then
 * compiles at start as it would without one, and the build says so on stderr.
 */
import { SpawnSyncReturns, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { BUNDLE, CODE_CACHE, loadBundle } from './main';

const MiB = 2 ** 20;

/** Writes `len` random bytes at `at` of `file`. */
function scribble(file: string, at: number, len: number): void {
  const fd = fs.openSync(file, 'r+');
  try {
    fs.writeSync(fd, randomFillSync(Buffer.alloc(len)), 0, len, at);
  } finally {
    fs.closeSync(fd);
  }
}

/** The training itself, in `dir` (in a child process: the commands' output is not wanted). */
async function train(out: string, dir: string): Promise<void> {
  const loaded = loadBundle(BUNDLE, null);
  if (!loaded) throw new Error(`no bundle at ${BUNDLE}`);
  const img = path.join(dir, 'vol.img');
  const store = path.join(dir, 'store');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 16 * MiB);
  scribble(img, 0, 4 * MiB);
  scribble(img, 9 * MiB, 1 * MiB);
  const run = async (...args: string[]): Promise<void> => {
    await loaded.program.main([process.execPath, 'disksnap', ...args]);
    if (process.exitCode) throw new Error(`disksnap ${args.join(' ')} failed`);
  };
  await run('snapshot', 'create', img, '--store', store, '--name', 'first', '--quiet');
  scribble(img, 2 * MiB, 64 * 1024);
  await run('snapshot', 'create', img, '--store', store, '--name', 'second', '--quiet');
  await run('snapshot', 'create', img, '--store', store, '--name', 'third', '--quiet');
  await run('snapshot', 'list', '--store', store);
  await run('snapshot', 'restore', 'second', '--to', path.join(dir, 'restored.img'), '--store', store, '--quiet');
  const tmp = `${out}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, Buffer.concat([loaded.digest, loaded.script.createCachedData()]));
  fs.renameSync(tmp, out);
}

/** Runs the training in a child, in a directory removed however it ends; on failure removes any old cache and says why. */
function build(): void {
  fs.rmSync(CODE_CACHE, { force: true });
  let why: string;
  try {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-code-cache-'));
    let r: SpawnSyncReturns<string>;
    try {
      // (a training that hangs, say on a lock, must not hang `npm install`: 2 minutes, then none)
      r = spawnSync(process.execPath, [__filename, 'train', CODE_CACHE, dir], { stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8', timeout: 120_000 });
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    if (r.status === 0 && fs.existsSync(CODE_CACHE)) return;
    why = (r.stderr || r.error?.message || `exit ${r.status ?? r.signal}`).trim().split('\n').slice(-3).join(' / ');
  } catch (e) {
    why = (e as Error).message;
  }
  fs.rmSync(CODE_CACHE, { force: true });
  process.stderr.write(`disksnap build: no code cache for the CLI (it still works, starting ~40 ms slower): ${why}\n`);
}

if (require.main === module) {
  if (process.argv[2] === 'train') {
    train(process.argv[3], process.argv[4]).catch((e: Error) => {
      process.stderr.write(`${e.stack ?? e}\n`);
      process.exit(1);
    });
  } else build();
}
