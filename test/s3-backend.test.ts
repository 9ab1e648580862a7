/**
 * The S3 backend against a real Ceph RADOS Gateway (test/helpers/ceph.ts): the core object
 * operations, list pagination, putIfAbsent semantics under concurrency, one-line errors
 * (missing bucket, wrong credentials, not a store), leases and the store lock built on them,
 * and retries through a proxy that resets connections and answers 503 at random without
 * ever yielding a wrong byte.
 */
import t, { Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { CLI, cli } from './helpers/cli';
import { createHash, randomBytes } from 'node:crypto';
import { OPEN_PREFETCH, S3Backend, parseS3Url } from '../src/storage/store/s3';
import { S3Client } from '@aws-sdk/client-s3';
import { S3Wire, type WireRequest } from '../src/storage/store/s3-wire';
import { S3Lease, S3StoreLock, leaseIsLive } from '../src/storage/store/s3-lease';
import { isDisksnapError } from '../src/engine/errors';
import { ceph, cephMissing, newBucket } from './helpers/ceph';
import { startFaultProxy } from './helpers/s3-fault-proxy';

const skip = cephMissing();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** How a request reads in the records below: its command, Range, If-Match form. */
function describeSend(command: string, range: string | undefined, ifMatch: string | undefined): string {
  return `${command}${range ? ` ${range}` : ''}${ifMatch ? ` If-Match ${ifMatch.startsWith('"') ? 'quoted' : 'bare'}` : ''}`;
}

/**
 * The requests sent from now until the test ends, as command, Range and If-Match form: through
 * the SDK's client only (`sdk`), or on either path (`any`: ./s3-wire.ts's too, named by the S3
 * operation they are).
 */
function recordSends(t: Test, which: 'any' | 'sdk' = 'any'): string[] {
  const sent: string[] = [];
  const send = S3Client.prototype.send;
  S3Client.prototype.send = function (this: S3Client, cmd: { constructor: { name: string }; input: { Range?: string; IfMatch?: string } }, ...rest: unknown[]) {
    sent.push(describeSend(cmd.constructor.name.replace('Command', ''), cmd.input.Range, cmd.input.IfMatch));
    return (send as (...a: unknown[]) => unknown).call(this, cmd, ...rest);
  } as typeof send;
  t.teardown(() => void (S3Client.prototype.send = send));
  if (which === 'sdk') return sent;
  // every request the wire sends is signed once, on node:http and on raw sockets alike
  type Signed = { signed(r: WireRequest): Promise<unknown> };
  const proto = S3Wire.prototype as unknown as Signed;
  const wire = proto.signed;
  proto.signed = function (this: Signed, r: WireRequest) {
    const h = r.headers ?? {};
    const command = r.method === 'GET' ? (r.key === undefined ? 'ListObjectsV2' : 'GetObject') : r.method === 'HEAD' ? (r.key === undefined ? 'HeadBucket' : 'HeadObject') : r.method === 'PUT' ? 'PutObject' : 'DeleteObject';
    sent.push(describeSend(command, h.range, h['if-match']));
    return wire.call(this, r);
  };
  t.teardown(() => void (proto.signed = wire));
  return sent;
}

t.test('s3:// URLs: bucket and prefix are parsed, bad ones refused with the reason', async (t) => {
  t.same(parseS3Url('s3://bkt'), { bucket: 'bkt', prefix: '' });
  t.same(parseS3Url('s3://bkt/'), { bucket: 'bkt', prefix: '' });
  t.same(parseS3Url('s3://my.bkt-1/a/b/'), { bucket: 'my.bkt-1', prefix: 'a/b' });
  t.throws(() => parseS3Url('s3://Upper'), { code: 'EINVALID', message: /bucket name 'Upper'/ });
  t.throws(() => parseS3Url('s3://ab'), { code: 'EINVALID' });
  t.throws(() => parseS3Url('s3://bkt/a/../b'), { code: 'EINVALID', message: /prefix/ });
  t.throws(() => parseS3Url('/some/dir'), { code: 'EINVALID', message: /not an S3 store URL/ });
});

t.test('against the gateway', { skip }, async (t) => {
  await ceph();

  t.test('put, get (into a buffer or not), stat, ranged open, delete; a prefix keeps stores apart', async (t) => {
    const url = await newBucket('core', 'stores/one');
    const b = new S3Backend(url);
    const other = new S3Backend(url.replace('/stores/one', '/stores/two'));
    t.teardown(() => (b.destroy(), other.destroy()));
    const data = randomBytes(700 * 1024 + 3);
    await b.put('snapshots/x.json', data);
    await other.put('snapshots/x.json', Buffer.from('other store'));
    t.same(await b.get('snapshots/x.json'), data, 'whole object back');
    const into = Buffer.alloc(1024 * 1024);
    const got = await b.get('snapshots/x.json', into);
    t.equal(got.buffer, into.buffer, 'read into the caller\'s buffer when it fits');
    t.same(got, data);
    const small = Buffer.alloc(10);
    t.same(await b.get('snapshots/x.json', small), data, 'a buffer too small: allocated instead');
    t.equal(await b.stat('snapshots/x.json'), data.length);
    t.equal(await b.stat('snapshots/none'), undefined);
    const r = await b.open('snapshots/x.json');
    t.equal(r.size, data.length);
    t.same(await r.read(1000, 5000), data.subarray(1000, 6000));
    t.same(await r.read(data.length - 10, 100), data.subarray(data.length - 10), 'short only at the end');
    t.same((await r.read(data.length + 5, 10)).length, 0);
    await r.close();
    await t.rejects(b.get('snapshots/none'), { code: 'ENOENT', message: new RegExp(`${url}/snapshots/none: no such object`) });
    await t.rejects(b.open('snapshots/none'), { code: 'ENOENT' });
    t.same((await other.get('snapshots/x.json')).toString(), 'other store', 'the other prefix is another store');
    t.equal(await b.delete('snapshots/x.json'), true);
    t.equal(await b.delete('snapshots/x.json'), false, 'false when it was not there');
    await t.rejects(b.get('snapshots/x.json'), { code: 'ENOENT' });
    t.equal(await other.stat('snapshots/x.json'), 11);
  });

  t.test('open: a small object is read in one request; past the prefetch, ranged GETs that refuse a replaced object', async (t) => {
    const b = new S3Backend(await newBucket('open'));
    t.teardown(() => b.destroy());
    const sent = recordSends(t);

    const small = randomBytes(82_088);
    await b.put('snapshots/s.map', small);
    sent.length = 0;
    const rs = await b.open('snapshots/s.map');
    t.equal(rs.size, small.length);
    t.same(await rs.read(0, 40), small.subarray(0, 40));
    t.same(await rs.read(40, 65_536), small.subarray(40, 65_576));
    t.same(await rs.read(small.length - 24, 24), small.subarray(small.length - 24));
    t.same(sent, [`GetObject bytes=0-${OPEN_PREFETCH - 1}`], 'open and three reads: one GET, no HEAD');

    const big = randomBytes(OPEN_PREFETCH * 2 + 12_345);
    await b.put('snapshots/b.map', big);
    sent.length = 0;
    const rb = await b.open('snapshots/b.map');
    t.equal(rb.size, big.length);
    t.same(await rb.read(1000, 5000), big.subarray(1000, 6000), 'inside the prefetch');
    t.equal(sent.length, 1);
    t.same(await rb.read(OPEN_PREFETCH - 10, 100), big.subarray(OPEN_PREFETCH - 10, OPEN_PREFETCH + 90), 'across its end: a ranged GET');
    t.same(await rb.read(big.length - 5, 100), big.subarray(big.length - 5), 'short only at the end');
    t.same(sent.slice(1), [`GetObject bytes=${OPEN_PREFETCH - 10}-${OPEN_PREFETCH + 89} If-Match quoted`, `GetObject bytes=${big.length - 5}-${big.length - 1} If-Match quoted`], 'on the ETag of the first answer');
    await b.put('snapshots/b.map', randomBytes(big.length));
    t.same(await rb.read(0, 10), big.subarray(0, 10), 'the prefetched bytes are those of the object opened');
    await t.rejects(rb.read(OPEN_PREFETCH, 10), 'a read past the prefetch of a replaced object fails (If-Match)');

    await b.put('snapshots/empty', Buffer.alloc(0));
    const re = await b.open('snapshots/empty');
    t.equal(re.size, 0, 'an empty object (416 to the ranged GET) opens with size 0');
    t.same((await re.read(0, 10)).length, 0);
    await t.rejects(b.open('snapshots/none'), { code: 'ENOENT', message: /snapshots\/none: no such object/ });
  });

  t.test('list walks every page, recursively, only under its prefix, with store-relative keys', async (t) => {
    const url = await newBucket('list', 'p');
    const b = new S3Backend(url, { listPageSize: 3 });
    t.teardown(() => b.destroy());
    const want = new Map<string, number>();
    for (let i = 0; i < 17; i++) {
      const key = `blocks/${(i % 4).toString(16).padStart(2, '0')}/${createHash('sha256').update(String(i)).digest('hex')}`;
      want.set(key, i + 1);
    }
    await Promise.all([...want].map(([k, n]) => b.put(k, Buffer.alloc(n, 7))));
    await b.put('blockstore.json', Buffer.from('{}')); // shares the prefix string, not the directory
    await b.put('snapshots/a.json', Buffer.from('{}'));
    const seen = new Map<string, number>();
    for await (const o of b.list('blocks/')) {
      t.equal(o.temporary, false);
      seen.set(o.key, o.size);
    }
    t.same([...seen].sort(), [...want].sort(), '17 objects over 6 pages, sizes right, nothing else');
    const empty: string[] = [];
    for await (const o of b.list('volumes/')) empty.push(o.key);
    t.same(empty, []);
  });

  t.test('putIfAbsent writes once: a second writer gets false and the first bytes stay; of 8 racing writers exactly one wins', async (t) => {
    const b = new S3Backend(await newBucket('pia'));
    t.teardown(() => b.destroy());
    const first = randomBytes(512 * 1024);
    t.equal(await b.putIfAbsent('blocks/aa/one', [first.subarray(0, 100), first.subarray(100)]), true, 'parts are concatenated');
    t.equal(await b.putIfAbsent('blocks/aa/one', randomBytes(512 * 1024)), false);
    t.same(await b.get('blocks/aa/one'), first);
    const bodies = Array.from({ length: 8 }, () => randomBytes(64 * 1024));
    const won = await Promise.all(bodies.map((d) => b.putIfAbsent('blocks/bb/race', d)));
    t.equal(won.filter((w) => w).length, 1, 'one winner');
    t.same(await b.get('blocks/bb/race'), bodies[won.indexOf(true)], 'and its bytes are the object');
  });

  t.test('putIfAbsent with the caller\'s SHA-256 (a plain block\'s digest): signed as the payload hash, and the gateway refuses a body that does not match it', async (t) => {
    const b = new S3Backend(await newBucket('sha'));
    t.teardown(() => b.destroy());
    const data = randomBytes(512 * 1024);
    const sha = createHash('sha256').update(data).digest();
    t.equal(await b.putIfAbsent('blocks/aa/right', data, sha), true, 'the right hash: written');
    t.same(await b.get('blocks/aa/right'), data);
    t.equal(await b.putIfAbsent('blocks/aa/right', data, sha), false, 'and written once');
    const parts = [data.subarray(0, 1000), data.subarray(1000)];
    t.equal(await b.putIfAbsent('blocks/aa/parts', parts, sha), true, 'parts: the hash is of their concatenation');
    const other = createHash('sha256').update(randomBytes(16)).digest();
    await t.rejects(b.putIfAbsent('blocks/aa/wrong', data, other), { code: 'EIO', message: /PUT s3:\/\/.*blocks\/aa\/wrong: HTTP 400 XAmzContentSHA256Mismatch/ }, 'a wrong hash: refused at once (a 4xx is not retried)');
    t.equal(await b.stat('blocks/aa/wrong'), undefined, 'and nothing is there');
    const flipped = Buffer.from(data);
    flipped[12345] ^= 1;
    await t.rejects(b.putIfAbsent('blocks/aa/flipped', flipped, sha), { message: /XAmzContentSHA256Mismatch/ }, 'one bit off in the body: refused');
    t.equal(await b.stat('blocks/aa/flipped'), undefined);
  });

  t.test('every request goes without the SDK where an endpoint is set (s3-wire.ts); the SDK path reads and writes the same objects', async (t) => {
    const url = await newBucket('wire');
    const lean = new S3Backend(url, { listPageSize: 2 });
    const sdkOnly = new S3Backend(url, { wire: false, listPageSize: 2 });
    t.teardown(() => (lean.destroy(), sdkOnly.destroy()));
    const viaSdk = recordSends(t, 'sdk');
    const a = randomBytes(64 * 1024);
    const b = randomBytes(300 * 1024 + 5);
    await lean.checkBucket();
    t.equal(await lean.hasAnyObject(), false, 'an empty bucket: nothing under the prefix');
    t.equal(await lean.putIfAbsent('blocks/aa/a', a, createHash('sha256').update(a).digest()), true);
    t.equal(await lean.putIfAbsent('blocks/bb/b', [b.subarray(0, 7), b.subarray(7)]), true, 'parts, hashed here');
    t.equal(await lean.putIfAbsent('blocks/aa/a', a), false, 'If-None-Match: * answered 412 -> false');
    t.same(await lean.get('blocks/bb/b'), b);
    const into = Buffer.alloc(1024 * 1024);
    t.equal((await lean.get('blocks/aa/a', into)).buffer, into.buffer, 'into the caller\'s buffer');
    await t.rejects(lean.get('blocks/cc/none'), { code: 'ENOENT', message: /blocks\/cc\/none: no such object/ });
    await lean.put('snapshots/odd name+&=%.json', Buffer.from('{"a":1}'));
    t.same((await lean.get('snapshots/odd name+&=%.json')).toString(), '{"a":1}', 'a key with characters that need escaping');
    t.equal(await lean.stat('blocks/aa/a'), a.length, 'HEAD: the size');
    t.equal(await lean.stat('blocks/aa/none'), undefined, 'HEAD of nothing: undefined');
    const keys: string[] = [];
    for await (const o of lean.list('blocks/')) keys.push(`${o.key}:${o.size}`);
    t.same(keys.sort(), [`blocks/aa/a:${a.length}`, `blocks/bb/b:${b.length}`], 'LIST');
    for (let i = 0; i < 5; i++) await lean.put(`volumes/v${i}.json`, Buffer.from(String(i)));
    const vols: string[] = [];
    for await (const o of lean.list('volumes')) vols.push(o.key);
    t.same(vols, [0, 1, 2, 3, 4].map((i) => `volumes/v${i}.json`), 'LIST over three pages of two');
    t.equal(await lean.hasAnyObject(), true);
    const r = await lean.open('blocks/bb/b');
    t.same(await r.read(100, 50), b.subarray(100, 150), 'open and read');
    const etag = await lean.putConditional('locks/x', Buffer.from('1'), undefined);
    t.ok(etag, 'conditional PUT (If-None-Match): an ETag');
    t.equal(await lean.putConditional('locks/x', Buffer.from('2'), undefined), undefined, 'taken: 412');
    t.ok(await lean.putConditional('locks/x', Buffer.from('3'), etag), 'If-Match on its ETag');
    t.same((await lean.getWithEtag('locks/x'))?.data.toString(), '3');
    t.equal(await lean.delete('blocks/aa/a'), true, 'DELETE (after a HEAD)');
    t.equal(await lean.delete('blocks/aa/a'), false, 'and it is gone');
    await lean.remove('locks/x');
    t.same(viaSdk, [], 'no SDK command for any of them');
    t.same(await sdkOnly.get('blocks/bb/b'), b, 'the SDK path reads what the short one wrote');
    const c = randomBytes(1000);
    t.equal(await sdkOnly.putIfAbsent('blocks/dd/c', c), true);
    t.same(await lean.get('blocks/dd/c'), c, 'and the short path what the SDK wrote');
    const sdkKeys: string[] = [];
    for await (const o of sdkOnly.list('volumes')) sdkKeys.push(o.key);
    t.same(sdkKeys, vols, 'the SDK lists the same keys');
    t.same(viaSdk, ['GetObject', 'PutObject', 'ListObjectsV2', 'ListObjectsV2', 'ListObjectsV2'], 'wire: false sends them through the SDK');
  });

  t.test('the CLI on an S3 store: no AWS SDK loaded when the environment has the credentials; the SDK\'s chain (a profile) when it has not', async (t) => {
    const s3 = await ceph();
    const dir = t.testdir({
      'probe.js': `const M = require('module'); const fs = require('fs'); const seen = new Set();
const load = M._load; M._load = function (r, ...a) { if (/^@aws-sdk\\/client-s3|^@smithy\\//.test(r)) seen.add(r); return load.call(this, r, ...a); };
const read = fs.readFileSync; fs.readFileSync = function (f, ...a) { if (String(f).endsWith('s3-sdk.bundle.js')) seen.add('s3-sdk.bundle.js'); return read.call(this, f, ...a); };
process.on('exit', () => fs.writeFileSync(process.env.PROBE_OUT, JSON.stringify([...seen])));`,
      credentials: `[other]\naws_access_key_id = ${s3.accessKeyId}\naws_secret_access_key = ${s3.secretAccessKey}\n`,
      config: `[profile other]\nregion = ${s3.region}\n`,
    });
    const vol = path.join(dir, 'vol.img');
    fs.writeFileSync(vol, randomBytes(2 * 1024 * 1024));
    const store = `${await newBucket('nosdk')}/store`;
    const probe = (name: string) => ({ NODE_OPTIONS: `-r ${path.join(dir, 'probe.js')}`, PROBE_OUT: path.join(dir, name) });
    const made = cli(['snapshot', 'create', vol, '--store', store, '--json'], { env: probe('env.json') });
    t.equal(made.status, 0, made.stderr);
    t.same(JSON.parse(fs.readFileSync(path.join(dir, 'env.json'), 'utf8')), [], 'credentials in the environment: the SDK is never loaded');
    // the environment without the keys and the region: a profile names them
    const profile = (name: string, extra: Record<string, string> = {}) => {
      const env: NodeJS.ProcessEnv = { ...process.env, AWS_PROFILE: name, AWS_SHARED_CREDENTIALS_FILE: path.join(dir, 'credentials'), AWS_CONFIG_FILE: path.join(dir, 'config'), ...extra };
      for (const k of ['AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_REGION', 'AWS_DEFAULT_REGION']) delete env[k];
      return env;
    };
    const listed = spawnSync(process.execPath, [CLI, 'snapshot', 'list', '--store', store, '--json'], { env: profile('other', probe('profile.json')), encoding: 'utf8' });
    t.equal(listed.status, 0, listed.stderr);
    t.equal(JSON.parse(listed.stdout).snapshots.length, 1, 'a profile: the snapshot is listed');
    t.ok(JSON.parse(fs.readFileSync(path.join(dir, 'profile.json'), 'utf8')).length > 0, 'through the SDK\'s credential chain, loaded for it');
    const wrong = spawnSync(process.execPath, [CLI, 'snapshot', 'list', '--store', store], { env: profile('nosuch'), encoding: 'utf8' });
    t.not(wrong.status, 0, 'a profile that does not exist: an error');
    t.match(wrong.stderr, /nosuch|credential|region/i, wrong.stderr);
  });

  t.test('errors are one line naming the problem: missing bucket, wrong credentials; a store URL that holds other things is visible', async (t) => {
    const s3 = await ceph();
    const missingBucket = new S3Backend(`s3://nosuch-${randomBytes(4).toString('hex')}`);
    t.teardown(() => missingBucket.destroy());
    await t.rejects(missingBucket.checkBucket(), { code: 'ENOENT', message: /S3 bucket 'nosuch-[0-9a-f]+' does not exist at http:\/\/127\.0\.0\.1/ });
    await t.rejects(missingBucket.get('store.json'), { code: 'ENOENT', message: /S3 bucket 'nosuch-[0-9a-f]+' does not exist/ });
    const url = await newBucket('creds');
    let retries = 0;
    const wrong = new S3Backend(url, { credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: 'not-the-secret' }, onRetry: () => retries++ });
    const unknown = new S3Backend(url, { credentials: { accessKeyId: 'NOSUCHKEY0000000', secretAccessKey: 'x' }, onRetry: () => retries++ });
    t.teardown(() => (wrong.destroy(), unknown.destroy()));
    await t.rejects(wrong.get('store.json'), { code: 'EACCES', message: /rejected the credentials \(SignatureDoesNotMatch\)/ });
    await t.rejects(unknown.put('x', Buffer.from('x')), { code: 'EACCES', message: /rejected the credentials \(InvalidAccessKeyId\)/ });
    await t.rejects(wrong.checkBucket(), { code: 'EACCES', message: /HTTP 403/ });
    t.equal(retries, 0, 'a 4xx is never retried');
    const b = new S3Backend(url);
    t.teardown(() => b.destroy());
    t.equal(await b.hasAnyObject(), false);
    await b.put('photos/cat.jpg', Buffer.from('meow'));
    t.equal(await b.hasAnyObject(), true, 'something is there that is not a store.json');
    t.equal(await new S3Backend(url + '/photos/cat.jpg/x').hasAnyObject(), false);
  });

  t.test('leases: take, conflict naming the holder, renew, expiry lets another take it and tells the old holder, release', async (t) => {
    const b = new S3Backend(await newBucket('lease'));
    t.teardown(() => b.destroy());
    t.equal(await b.conditionalWriteProblem(), undefined, 'RGW honours If-None-Match: * and If-Match');
    const a = await S3Lease.take(b, 'leases/one', { purpose: 'test A', ttlMs: 1500 });
    await t.rejects(S3Lease.take(b, 'leases/one', { purpose: 'test B', ttlMs: 1500 }), { code: 'ELOCKED', message: /is held \(test A by pid \d+ on / });
    await sleep(900);
    await a.renew();
    await sleep(900);
    await t.rejects(S3Lease.take(b, 'leases/one', { purpose: 'test B' }), { code: 'ELOCKED' }, 'renewed: still held after the first ttl');
    const seen = await S3Lease.inspect(b, 'leases/one');
    t.ok(leaseIsLive(seen?.body));
    await sleep(1700);
    const bLease = await S3Lease.take(b, 'leases/one', { purpose: 'test B', ttlMs: 5000 });
    t.pass('expired: another holder takes it');
    await t.rejects(a.renew(), { code: 'ELOCKED', message: /lost the lease .*leases\/one \(test A\)/ });
    t.throws(() => a.assertHeld(), { code: 'ELOCKED' });
    await a.release(); // a lost lease is not ours to release: must not disturb B's
    await t.rejects(S3Lease.take(b, 'leases/one', { purpose: 'test C' }), { code: 'ELOCKED', message: /test B/ });
    await bLease.release();
    const c = await S3Lease.take(b, 'leases/one', { purpose: 'test C' });
    t.pass('released: taken at once');
    await c.release({ remove: true });
    t.equal(await b.stat('leases/one'), undefined, 'removed');
    const h = 'holder-fixed-id';
    const d1 = await S3Lease.take(b, 'leases/two', { purpose: 'D', holder: h });
    const d2 = await S3Lease.take(b, 'leases/two', { purpose: 'D', holder: h });
    t.pass('a take retried after its answer was lost adopts the lease');
    await d2.renew();
    await t.rejects(d1.renew(), { code: 'ELOCKED' }, 'only one handle holds the current ETag');
  });

  t.test('lease requests: the first If-Match sends both ETag forms at once, later ones the form the server took; a holder\'s own lease goes with one DELETE', async (t) => {
    const b = new S3Backend(await newBucket('lease-req'));
    t.teardown(() => b.destroy());
    const sent = recordSends(t);
    const l = await S3Lease.take(b, 'locks/shared/h1', { purpose: 'test', holder: 'h1' });
    t.same(sent, ['PutObject'], 'taken with one PUT (If-None-Match)');
    sent.length = 0;
    await l.renew();
    t.same([...sent].sort(), ['PutObject If-Match bare', 'PutObject If-Match quoted'], 'the first renewal: both forms, one round trip');
    sent.length = 0;
    await l.renew();
    await l.renew();
    t.same(sent, ['PutObject If-Match bare', 'PutObject If-Match bare'], 'then only the form RGW matches');
    t.ok(leaseIsLive((await S3Lease.inspect(b, 'locks/shared/h1'))?.body), 'and the lease is live');
    sent.length = 0;
    await l.release({ remove: true });
    t.same(sent, ['DeleteObject'], 'released by removing it: one request');
    t.equal(await b.stat('locks/shared/h1'), undefined);
    const m = await S3Lease.take(b, 'locks/gc', { purpose: 'test' });
    await m.release();
    t.notOk(leaseIsLive((await S3Lease.inspect(b, 'locks/gc'))?.body), 'a shared key is marked released, not removed');
  });

  t.test('store lock: writers share, gc is exclusive both ways, gc waits for writers, a crashed writer\'s lease runs out', async (t) => {
    const b = new S3Backend(await newBucket('lock'));
    t.teardown(() => b.destroy());
    const w1 = await S3StoreLock.acquire(b, 'shared', { ttlMs: 3000, purpose: 'snapshot create' });
    const w2 = await S3StoreLock.acquire(b, 'shared', { ttlMs: 3000 });
    await t.rejects(S3StoreLock.acquire(b, 'exclusive'), { code: 'ELOCKED', message: /is in use \(2 operation\(s\): .*snapshot create by pid/ });
    await w2.release();
    let waited = false;
    const gcP = S3StoreLock.acquire(b, 'exclusive', { waitMs: 20_000, ttlMs: 3000, onWait: () => (waited = true) });
    await sleep(4000); // longer than the ttl: the heartbeat keeps w1's lease alive
    let gcHas = false;
    void gcP.then(() => (gcHas = true));
    await sleep(100);
    t.equal(gcHas, false, 'gc still waiting while the writer renews');
    await w1.release();
    const gc = await gcP;
    t.ok(waited, 'gc waited');
    await t.rejects(S3StoreLock.acquire(b, 'shared'), { code: 'ELOCKED', message: /locked by a running gc \(gc by pid/ });
    await t.rejects(S3StoreLock.acquire(b, 'exclusive'), { code: 'ELOCKED', message: /another gc/ });
    await gc.release();
    // A writer that crashed: its lease is there, nobody renews it.
    await S3Lease.take(b, 'locks/shared/crashed-host-1-abc', { purpose: 'snapshot create', ttlMs: 800 });
    await t.rejects(S3StoreLock.acquire(b, 'exclusive'), { code: 'ELOCKED' });
    await sleep(1000);
    const gc2 = await S3StoreLock.acquire(b, 'exclusive');
    t.equal(await b.stat('locks/shared/crashed-host-1-abc'), undefined, 'gc removed the run-out lease');
    await gc2.release();
  });

  t.test('a server without conditional writes (501) is refused for gc, saying why; 501 is not retried', async (t) => {
    const s3 = await ceph();
    const proxy = await startFaultProxy(s3.endpoint, { notImplementedConditional: true });
    let retries = 0;
    const b = new S3Backend(await newBucket('swiftlike'), { endpoint: proxy.endpoint, onRetry: () => retries++ });
    t.teardown(async () => (b.destroy(), await proxy.close()));
    t.match(await b.conditionalWriteProblem(), /If-None-Match: \* with HTTP 501 NotImplemented/);
    await t.rejects(S3StoreLock.acquire(b, 'exclusive'), {
      code: 'EUNSUPPORTED',
      message: /gc refused on s3:\/\/swiftlike-[0-9a-f]+: the S3 server at http:\/\/127\.0\.0\.1:\d+ does not support conditional writes/,
    });
    t.equal(retries, 0);
    t.ok(proxy.counts.notImpl >= 1);
  });

  t.test('through a proxy that resets connections, cuts bodies and answers 503 at random: every byte right, retries seen', async (t) => {
    const s3 = await ceph();
    let seed = 12345;
    const rnd = () => ((seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
    const proxy = await startFaultProxy(s3.endpoint, { reset: 0.08, cut: 0.08, err503: 0.1 }, rnd);
    const url = await newBucket('faults');
    let retries = 0;
    const b = new S3Backend(url, { endpoint: proxy.endpoint, retry: { attempts: 30, baseMs: 5, capMs: 100 }, listPageSize: 7, onRetry: () => retries++ });
    const direct = new S3Backend(url);
    t.teardown(async () => (b.destroy(), direct.destroy(), await proxy.close()));
    const objects = new Map<string, Buffer>();
    for (let i = 0; i < 60; i++) objects.set(`blocks/${String(i).padStart(2, '0')}/obj`, randomBytes(1 + ((i * 37_911) % (600 * 1024))));
    const wrote = await Promise.all([...objects].map(([k, d]) => b.putIfAbsent(k, d)));
    t.ok(wrote.every((w) => typeof w === 'boolean'));
    await b.put('snapshots/rec.json', Buffer.from('{"state":"completed"}'));
    for (const [k, d] of objects) t.same(await direct.get(k), d, `${k} stored whole (checked without the proxy)`);
    const got = await Promise.all([...objects.keys()].map((k) => b.get(k)));
    t.ok(got.every((g, i) => g.equals([...objects.values()][i])), 'every GET through the proxy byte-exact');
    const listed: string[] = [];
    for await (const o of b.list('blocks/')) listed.push(o.key);
    t.same(listed.sort(), [...objects.keys()].sort(), 'list through faults: every page, once');
    const big = [...objects.values()].reduce((x, y) => (y.length > x.length ? y : x));
    const bigKey = [...objects].find(([, d]) => d === big)![0];
    const r = await b.open(bigKey);
    for (let off = 0; off < big.length; off += 100_000) t.same(await r.read(off, 100_000), big.subarray(off, off + 100_000));
    // past what open fetches first: ranged GETs through the faults too
    const large = randomBytes(OPEN_PREFETCH * 3 + 777);
    await direct.put('snapshots/large', large);
    const rl = await b.open('snapshots/large');
    t.equal(rl.size, large.length);
    for (let off = 0; off < large.length; off += 700_000) t.same(await rl.read(off, 700_000), large.subarray(off, off + 700_000));
    t.ok(proxy.counts.reset > 0 && proxy.counts.cut > 0 && proxy.counts.err503 > 0, `faults happened: ${JSON.stringify(proxy.counts)}`);
    t.ok(retries > 0, `${retries} retries`);
  });

  t.test('a server that keeps failing: a clear error after the attempts, not a hang', async (t) => {
    const s3 = await ceph();
    const proxy = await startFaultProxy(s3.endpoint, { err503: 1 });
    const b = new S3Backend(await newBucket('down'), { endpoint: proxy.endpoint, retry: { attempts: 4, baseMs: 5, capMs: 20 } });
    t.teardown(async () => (b.destroy(), await proxy.close()));
    await t.rejects(b.get('store.json'), { code: 'EIO', message: /GET s3:\/\/down-[0-9a-f]+\/store\.json failed after 4 attempt\(s\): HTTP 503 SlowDown/ });
    t.equal(proxy.counts.err503, 4);
    const refused = new S3Backend('s3://any-bucket', { endpoint: 'http://127.0.0.1:9', retry: { attempts: 3, baseMs: 5, capMs: 10 } });
    t.teardown(() => refused.destroy());
    const e = await refused.get('store.json').catch((x) => x);
    t.ok(isDisksnapError(e, 'EIO'), 'EIO');
    t.match(e.message, /failed after 3 attempt\(s\): .*ECONNREFUSED/);
  });
});
