/**
 * One suite, two backends: `forEachBackend` runs a test once on a directory store and once
 * on a store in a fresh bucket of the test gateway (test/helpers/ceph.ts), and hands it a
 * way to look at the store's objects that works for both.
 *
 *   forEachBackend(t, 'full then incremental ...', async (t, b) => {
 *     const store = await b.store('a');                 // a directory path or s3://bucket/prefix
 *     await b.keys(store, 'blocks/');                   // object keys, relative to the store
 *     await b.flip(store, key, 1234);                   // damage an object in place
 *   });
 *
 * The inspector does not go through the backend under test: a directory store is read with
 * node:fs, a bucket with its own S3 client (plain ListObjectsV2 / GetObject / PutObject), so
 * a backend that hid or mangled an object would not fool the assertions. A directory store's
 * temporary files are listed too (its `.tmp-*` names); a bucket has none.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import type { Readable } from 'node:stream';
import { DeleteObjectCommand, GetObjectCommand, ListObjectsV2Command, PutObjectCommand, S3Client } from '@aws-sdk/client-s3';
import { ceph, cephMissing, newBucket } from './ceph';

export type BackendKind = 'directory' | 's3';

export interface StoreInspector {
  /** Keys of every object under `under` ('' for all), relative to the store, sorted. */
  keys(store: string, under?: string): Promise<string[]>;
  read(store: string, key: string): Promise<Buffer>;
  write(store: string, key: string, data: Buffer | string): Promise<void>;
  remove(store: string, key: string): Promise<void>;
  /** XORs one byte of an object (a bit flip on disk, or in the bucket). */
  flip(store: string, key: string, offset: number): Promise<void>;
  /** Sizes in bytes of the objects under `under`, by key. */
  sizes(store: string, under?: string): Promise<Map<string, number>>;
  /** Sum of the sizes of the objects under `under`. */
  bytes(store: string, under?: string): Promise<number>;
  /** Whether anything at all exists at the store's location. */
  exists(store: string): Promise<boolean>;
  /** Removes the whole store (the directory; every object under the prefix). */
  removeAll(store: string): Promise<void>;
}

export interface Backend extends StoreInspector {
  kind: BackendKind;
  /** A new, not yet created store location; `label` names it (unique within a test). */
  store(label: string): Promise<string>;
}

// ---- directory ----

function walk(root: string): string[] {
  if (!fs.existsSync(root)) return [];
  return fs
    .readdirSync(root, { withFileTypes: true, recursive: true })
    .filter((e) => e.isFile())
    .map((e) => path.relative(root, path.join(e.parentPath ?? (e as unknown as { path: string }).path, e.name)).split(path.sep).join('/'));
}

function directoryBackend(dir: string): Backend {
  const keys = async (store: string, under = '') => walk(store).filter((k) => k.startsWith(under)).sort();
  return {
    kind: 'directory',
    store: async (label) => path.join(dir, label),
    keys,
    read: async (store, key) => fs.readFileSync(path.join(store, key)),
    write: async (store, key, data) => {
      fs.mkdirSync(path.dirname(path.join(store, key)), { recursive: true });
      fs.writeFileSync(path.join(store, key), data);
    },
    remove: async (store, key) => fs.unlinkSync(path.join(store, key)),
    flip: async (store, key, offset) => {
      const fd = fs.openSync(path.join(store, key), 'r+');
      try {
        const b = Buffer.alloc(1);
        if (fs.readSync(fd, b, 0, 1, offset) !== 1) throw new Error(`${key} has no byte at ${offset}`);
        b[0] ^= 0x5a;
        fs.writeSync(fd, b, 0, 1, offset);
      } finally {
        fs.closeSync(fd);
      }
    },
    sizes: async (store, under = '') => new Map((await keys(store, under)).map((k) => [k, fs.statSync(path.join(store, k)).size])),
    bytes: async (store, under = '') => (await keys(store, under)).reduce((n, k) => n + fs.statSync(path.join(store, k)).size, 0),
    exists: async (store) => fs.existsSync(store),
    removeAll: async (store) => fs.rmSync(store, { recursive: true, force: true }),
  };
}

// ---- S3 ----

let client: S3Client | undefined;

async function s3Client(): Promise<S3Client> {
  const s3 = await ceph();
  return (client ??= new S3Client({
    endpoint: s3.endpoint,
    region: s3.region,
    forcePathStyle: true,
    credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey },
    requestChecksumCalculation: 'WHEN_REQUIRED',
    responseChecksumValidation: 'WHEN_REQUIRED',
  }));
}

function split(store: string): { Bucket: string; prefix: string } {
  const m = /^s3:\/\/([^/]+)\/?(.*)$/.exec(store);
  if (!m) throw new Error(`not an S3 store URL: ${store}`);
  const p = m[2].replace(/\/+$/, '');
  return { Bucket: m[1], prefix: p ? p + '/' : '' };
}

async function s3List(store: string, under = ''): Promise<Map<string, number>> {
  const c = await s3Client();
  const { Bucket, prefix } = split(store);
  const out = new Map<string, number>();
  let token: string | undefined;
  do {
    const r = await c.send(new ListObjectsV2Command({ Bucket, Prefix: prefix + under, ContinuationToken: token }));
    for (const o of r.Contents ?? []) if (o.Key) out.set(o.Key.slice(prefix.length), o.Size ?? 0);
    token = r.IsTruncated ? r.NextContinuationToken : undefined;
  } while (token);
  return new Map([...out].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

async function s3Read(store: string, key: string): Promise<Buffer> {
  const c = await s3Client();
  const { Bucket, prefix } = split(store);
  const r = await c.send(new GetObjectCommand({ Bucket, Key: prefix + key }));
  const parts: Buffer[] = [];
  for await (const chunk of r.Body as Readable) parts.push(chunk as Buffer);
  return Buffer.concat(parts);
}

async function s3Write(store: string, key: string, data: Buffer | string): Promise<void> {
  const c = await s3Client();
  const { Bucket, prefix } = split(store);
  const body = Buffer.from(data);
  await c.send(new PutObjectCommand({ Bucket, Key: prefix + key, Body: body, ContentLength: body.length }));
}

async function s3Remove(store: string, key: string): Promise<void> {
  const c = await s3Client();
  const { Bucket, prefix } = split(store);
  await c.send(new DeleteObjectCommand({ Bucket, Key: prefix + key }));
}

export const s3Inspector: StoreInspector = {
  keys: async (store, under = '') => [...(await s3List(store, under)).keys()],
  read: s3Read,
  write: s3Write,
  remove: s3Remove,
  flip: async (store, key, offset) => {
    const b = await s3Read(store, key);
    if (offset >= b.length) throw new Error(`${key} has no byte at ${offset}`);
    b[offset] ^= 0x5a;
    await s3Write(store, key, b);
  },
  sizes: s3List,
  bytes: async (store, under = '') => [...(await s3List(store, under)).values()].reduce((a, b) => a + b, 0),
  exists: async (store) => (await s3List(store)).size > 0,
  removeAll: async (store) => {
    for (const k of (await s3List(store)).keys()) await s3Remove(store, k);
  },
};

function s3Backend(label: string): Backend {
  return {
    kind: 's3',
    // a store under a prefix, so that keys are really relative to it
    store: async (l) => newBucket(`${label}-${l}`, `stores/${l}`),
    ...s3Inspector,
  };
}

/** Closes the inspector's S3 connections (tap waits for open sockets otherwise). */
export function closeInspector(): void {
  client?.destroy();
  client = undefined;
}

/**
 * Registers `name [directory]` and `name [s3]` as two subtests of `t`, each with a fresh
 * temporary directory. The S3 one skips where Ceph is missing (fails under
 * DISKSNAP_REQUIRE_TOOLS=1, as every tool-dependent test does).
 */
export function forEachBackend(t: Tap.Test, name: string, fn: (t: Tap.Test, b: Backend) => Promise<void>): void {
  t.test(`${name} [directory]`, async (t) => {
    const dir = t.testdir();
    await fn(t, directoryBackend(path.join(dir, 'stores')));
  });
  const skip = cephMissing();
  t.test(`${name} [s3]`, { skip }, async (t) => {
    await ceph();
    await fn(t, s3Backend('suite'));
  });
}
