/**
 * A build step (`npm run build`, after the bundle): runs the commands users run most, in
 * one process, from the bundle, on a small generated image and store in a temporary
 * directory, then keeps V8's code for everything they compiled as the bundle's code cache
 * (./main.ts). A training that fails leaves no cache and fails nothing: the CLI then
 * compiles at start as it would without one, and the build says so on stderr.
 *
 * The AWS SDK's bundle (../storage/store/s3-sdk.ts) gets a cache of its own the same way:
 * the S3 requests disksnap makes, sent by that bundle's client to a local HTTP server that
 * answers each in S3's form (no S3 server is needed at build time).
 */
import { SpawnSyncReturns, spawnSync } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import * as os from 'node:os';
import * as path from 'node:path';
import type { Readable } from 'node:stream';
import { cacheFileOf, keepCodeCache, loadScript } from '../engine/bundle';
import { BUNDLE, CODE_CACHE, loadBundle, setCliFlags } from './main';

/** The SDK's bundle, beside the CLI's (package.json "build"). */
const SDK_BUNDLE = path.join(path.dirname(BUNDLE), 's3-sdk.bundle.js');
const SDK_CACHE = cacheFileOf(SDK_BUNDLE);

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
  // A qcow2 volume (a child over a raw parent) snapshotted twice with a write between: the
  // image layer, the persistent bitmap, the dirty-block scan and --json. Without this, those
  // paths were compiled from source in every qcow2 incremental (issue 13).
  const child = path.join(dir, 'vol.qcow2');
  const bytes = path.join(dir, 'bytes');
  fs.writeFileSync(bytes, randomFillSync(Buffer.alloc(128 * 1024)));
  await run('diff', 'create', img, child);
  await run('snapshot', 'create', child, '--store', store, '--quiet', '--json');
  await run('write', child, String(3 * MiB), '--input', bytes);
  await run('snapshot', 'create', child, '--store', store, '--quiet', '--json');
  keepCodeCache({ ...loaded, exports: loaded.program }, out);
}

/** A local HTTP server that answers every request as S3 would in form: bucket, object, list, delete. */
function formalS3(): http.Server {
  const body = Buffer.alloc(16);
  return http.createServer((req, res) => {
    req.resume();
    req.on('end', () => {
      const h = { ETag: '"0"', 'Last-Modified': new Date(0).toUTCString() };
      if (req.method === 'DELETE') res.writeHead(204).end();
      else if (req.method === 'PUT') res.writeHead(200, h).end();
      else if (req.url?.includes('list-type=2')) {
        res.writeHead(200, { 'Content-Type': 'application/xml' });
        res.end('<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name><KeyCount>1</KeyCount><IsTruncated>false</IsTruncated><Contents><Key>p/k</Key><Size>16</Size><ETag>"0"</ETag></Contents></ListBucketResult>');
      } else res.writeHead(200, { ...h, 'Content-Length': String(body.length) }).end(req.method === 'HEAD' ? undefined : body);
    });
  });
}

/** The SDK's bundle trained on the requests ../storage/store/s3.ts makes, and its code kept. */
async function trainSdk(): Promise<void> {
  type Sdk = typeof import('@aws-sdk/client-s3');
  const loaded = loadScript<Sdk>(SDK_BUNDLE, null);
  if (!loaded) throw new Error(`no bundle at ${SDK_BUNDLE}`);
  const sdk = loaded.exports;
  const server = formalS3();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const agent = new http.Agent({ keepAlive: true });
  const client = new sdk.S3Client({
    endpoint: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    region: 'train',
    credentials: { accessKeyId: 'train', secretAccessKey: 'train' },
    forcePathStyle: true,
    maxAttempts: 1,
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
    requestHandler: { httpAgent: agent, connectionTimeout: 10_000, socketTimeout: 10_000 },
  });
  const drain = async (b: unknown) => {
    for await (const chunk of b as Readable) void chunk;
  };
  try {
    const Bucket = 'b';
    const Key = 'p/k';
    await client.send(new sdk.HeadBucketCommand({ Bucket }));
    await client.send(new sdk.PutObjectCommand({ Bucket, Key, Body: Buffer.alloc(16), ContentLength: 16, IfNoneMatch: '*' }));
    await client.send(new sdk.PutObjectCommand({ Bucket, Key, Body: Buffer.alloc(16), ContentLength: 16, IfMatch: '"0"' }));
    await drain((await client.send(new sdk.GetObjectCommand({ Bucket, Key }))).Body);
    await drain((await client.send(new sdk.GetObjectCommand({ Bucket, Key, Range: 'bytes=0-15', IfMatch: '"0"' }))).Body);
    await client.send(new sdk.HeadObjectCommand({ Bucket, Key }));
    await client.send(new sdk.ListObjectsV2Command({ Bucket, Prefix: 'p/', MaxKeys: 1000 }));
    await client.send(new sdk.DeleteObjectCommand({ Bucket, Key }));
  } finally {
    client.destroy();
    agent.destroy();
    server.close();
  }
  keepCodeCache(loaded, SDK_CACHE);
}

/**
 * Runs a training (`mode` of this script) in a child, in a directory removed however it ends;
 * on failure removes any old `cache` and says why.
 */
function buildCache(cache: string, mode: string, missing: string): void {
  fs.rmSync(cache, { force: true });
  let why: string;
  try {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-code-cache-'));
    let r: SpawnSyncReturns<string>;
    try {
      // (a training that hangs, say on a lock, must not hang `npm install`: 2 minutes, then none)
      r = spawnSync(process.execPath, [__filename, mode, cache, dir], { stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8', timeout: 120_000 });
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
    if (r.status === 0 && fs.existsSync(cache)) return;
    why = (r.stderr || r.error?.message || `exit ${r.status ?? r.signal}`).trim().split('\n').slice(-3).join(' / ');
  } catch (e) {
    why = (e as Error).message;
  }
  fs.rmSync(cache, { force: true });
  process.stderr.write(`disksnap build: no code cache for ${missing}: ${why}\n`);
}

if (require.main === module) {
  const mode = process.argv[2];
  if (mode === 'train' || mode === 'train-sdk') {
    setCliFlags(); // the CLI's flags: V8 refuses a cache made under others
    (mode === 'train' ? train(process.argv[3], process.argv[4]) : trainSdk()).catch((e: Error) => {
      process.stderr.write(`${e.stack ?? e}\n`);
      process.exit(1);
    });
  } else {
    buildCache(CODE_CACHE, 'train', 'the CLI (it still works, starting ~40 ms slower)');
    buildCache(SDK_CACHE, 'train-sdk', 'the S3 client (it still works, ~60 ms slower on an S3 store)');
  }
}
