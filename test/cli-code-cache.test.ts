/**
 * The CLI's code cache (src/cli/main.ts, src/cli/code-cache.ts, src/engine/bundle.ts): the
 * build keeps one that this Node accepts, for the CLI's bundle and for the AWS SDK's, and a
 * cache that does not fit the bundle is never used, whatever it holds. Each case runs in a
 * child process with the V8 flags the CLI sets (setCliFlags), as the CLI runs.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ROOT } from './helpers/cli';

const DIST = path.join(ROOT, 'dist', 'src', 'cli');
const BUNDLE = path.join(DIST, 'disksnap.bundle.js');
const CACHE = path.join(DIST, 'disksnap.bundle.cache');
const SDK_BUNDLE = path.join(DIST, 's3-sdk.bundle.js');
const SDK_CACHE = path.join(DIST, 's3-sdk.bundle.cache');
const VERSION = (JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { version: string }).version;

/**
 * Loads `bundle` with `cache` in a child (with the CLI's V8 flags unless `cliFlags` is false),
 * runs `disksnap --version` from it; its cache state and output.
 */
function load(bundle: string, cache: string, cliFlags = true): { state: string; version: string } {
  const script = `const { loadBundle, setCliFlags } = require(${JSON.stringify(path.join(DIST, 'main.js'))});
${cliFlags ? 'setCliFlags();' : ''}
const b = loadBundle(${JSON.stringify(bundle)}, ${JSON.stringify(cache)});
process.stderr.write(b.cache + '\\n');
b.program.main(['node', 'disksnap', '--version']);`;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`child failed (${r.status}): ${r.stderr}`);
  return { state: r.stderr.trim(), version: r.stdout.trim() };
}

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-cc-'));
t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));

t.test('the build keeps a code cache for the bundle, and V8 takes it', async (t) => {
  t.ok(fs.existsSync(CACHE), 'npm run build wrote dist/src/cli/disksnap.bundle.cache');
  t.ok(fs.statSync(CACHE).size > 100_000, 'the cache holds the compiled code of the trained commands, not only the top level');
  t.same(load(BUNDLE, CACHE), { state: 'accepted', version: VERSION });
  // V8 takes a cache only under the flags it was made with: the training ran with the CLI's
  t.same(load(BUNDLE, CACHE, false), { state: 'rejected', version: VERSION }, 'refused by a process without the CLI\'s flags');
});

t.test('a cache made for other bundle bytes of the same length is not used', async (t) => {
  const src = fs.readFileSync(BUNDLE);
  // (the program's description; esbuild's --line-limit may break the string after a few words)
  const at = src.indexOf('.description("Differencing') + '.description("'.length;
  t.ok(at > 20, 'the bundle holds the program description');
  const other = Buffer.from(src);
  other.write('differencing', at, 'latin1'); // same length, other bytes: V8 alone would take the cache
  // beside the real one: the bundle finds package.json and the addon from its own directory
  const file = path.join(DIST, `same-length-${process.pid}.js`);
  t.teardown(() => fs.rmSync(file, { force: true }));
  fs.writeFileSync(file, other);
  t.same(load(file, CACHE), { state: 'stale', version: VERSION }, 'compiled from source instead');
});

t.test('the build writes each bundle as the script V8 compiles: wrapped in its first and last lines', async (t) => {
  const { WRAPPER } = require(path.join(ROOT, 'dist', 'src', 'engine', 'bundle.js')) as { WRAPPER: string };
  for (const file of [BUNDLE, SDK_BUNDLE]) {
    const text = fs.readFileSync(file, 'latin1');
    t.ok(text.startsWith(`${WRAPPER}\n`), `${path.basename(file)} starts with the wrapper, on a line of its own`);
    t.ok(/\n\}\)\n?$/.test(text), `${path.basename(file)} ends by closing it`);
  }
  // a bundle that is not wrapped (not from this build) is wrapped on loading, and runs
  const bare = fs.readFileSync(BUNDLE, 'latin1').replace(/^[^\n]*\n/, '').replace(/\n\}\)\n?$/, '\n');
  const file = path.join(DIST, `bare-${process.pid}.js`);
  t.teardown(() => fs.rmSync(file, { force: true }));
  fs.writeFileSync(file, bare, 'latin1');
  t.same(load(file, CACHE), { state: 'stale', version: VERSION }, 'an unwrapped bundle still runs (compiled without the cache, made for other bytes)');
});

t.test('a cache V8 refuses (damaged) is ignored and the program still runs', async (t) => {
  const good = fs.readFileSync(CACHE);
  const bad = Buffer.concat([good.subarray(0, 32), Buffer.alloc(good.length - 32, 0x5a)]);
  const file = path.join(dir, 'bad.cache');
  fs.writeFileSync(file, bad);
  t.same(load(BUNDLE, file), { state: 'rejected', version: VERSION });
});

t.test('no cache, or a cache too short to hold a digest: compiled as usual', async (t) => {
  t.same(load(BUNDLE, path.join(dir, 'absent.cache')), { state: 'absent', version: VERSION });
  const short = path.join(dir, 'short.cache');
  fs.writeFileSync(short, Buffer.alloc(16));
  t.same(load(BUNDLE, short), { state: 'stale', version: VERSION });
});

/** Loads the SDK's bundle with `cache` in a child: its cache state and whether it gave an S3 client. */
function loadSdk(cache: string): string {
  const script = `require(${JSON.stringify(path.join(DIST, 'main.js'))}).setCliFlags();
const { loadScript } = require(${JSON.stringify(path.join(ROOT, 'dist', 'src', 'engine', 'bundle.js'))});
const b = loadScript(${JSON.stringify(SDK_BUNDLE)}, ${JSON.stringify(cache)});
const c = new b.exports.S3Client({ region: 'x', endpoint: 'http://127.0.0.1:9', credentials: { accessKeyId: 'a', secretAccessKey: 'b' } });
process.stdout.write(b.cache + ' ' + typeof c.send);`;
  const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`child failed (${r.status}): ${r.stderr}`);
  return r.stdout.trim();
}

t.test('the build keeps a code cache for the S3 client bundle too, and V8 takes it', async (t) => {
  t.ok(fs.existsSync(SDK_CACHE), 'npm run build wrote dist/src/cli/s3-sdk.bundle.cache');
  t.equal(loadSdk(SDK_CACHE), 'accepted function');
  const short = path.join(dir, 'sdk-short.cache');
  fs.writeFileSync(short, Buffer.alloc(16));
  t.equal(loadSdk(short), 'stale function', 'a cache of other bytes is not used');
});

t.test('a build whose training cannot run keeps no cache, says why, and does not fail', async (t) => {
  const kept = fs.readFileSync(CACHE);
  const keptSdk = fs.readFileSync(SDK_CACHE);
  t.teardown(() => {
    // the build's own caches, for the tests after this one
    fs.writeFileSync(CACHE, kept);
    fs.writeFileSync(SDK_CACHE, keptSdk);
  });
  const r = spawnSync(process.execPath, [path.join(DIST, 'code-cache.js')], { encoding: 'utf8', env: { ...process.env, TMPDIR: path.join(dir, 'no-such-dir') } });
  t.equal(r.status, 0, 'the build goes on');
  t.match(r.stderr, /disksnap build: no code cache for the CLI \(it still works, starting ~40 ms slower\): .*no-such-dir/);
  t.match(r.stderr, /disksnap build: no code cache for the S3 client \(it still works, ~60 ms slower on an S3 store\): .*no-such-dir/);
  t.notOk(fs.existsSync(CACHE), 'no cache is left, not even the previous one');
  t.notOk(fs.existsSync(SDK_CACHE), 'nor of the S3 client');
  t.same(load(BUNDLE, CACHE), { state: 'absent', version: VERSION }, 'and the CLI still runs');
});
