/**
 * Snapshot encryption (issue 5): an encrypted volume's snapshots leave no plaintext in the
 * store (block data, names, descriptions, tags), restore byte-exact with the key, and every
 * way of getting it wrong — no key, a wrong key or passphrase, a flipped byte in an object or
 * manifest, an object swapped for another — is a clear error, exit 1, with no output left.
 * Tests that touch a store run on a directory store and on a store in a bucket
 * (test/helpers/backends.ts); the sealing tests that need no store run once.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import * as snap from '../src/storage';
import { KiB, MiB, Write, allocated, applyWrites, ds, makeImage, sha, touched } from '../fixtures/store/helpers';
import { Backend, closeInspector, forEachBackend } from './helpers/backends';
import { logicalSizes } from './helpers/packs';

t.teardown(closeInspector);

const BS = 64 * KiB;
const MARKER = 'DISKSNAP-TEST-MARKER-7c1e';

/** Writes with the marker inside random data, one at the very end (a short last block). */
function markedImage(file: string, size: number, writes: Write[]): void {
  makeImage(file, size, writes);
  const fd = fs.openSync(file, 'r+');
  try {
    for (const w of writes) fs.writeSync(fd, Buffer.from(MARKER.repeat(3)), 0, MARKER.length * 3, w.offset + 100);
    fs.writeSync(fd, Buffer.from(MARKER), 0, MARKER.length, size - MARKER.length);
  } finally {
    fs.closeSync(fd);
  }
}

/** Every object of a store whose bytes contain the marker (or its UTF-16 / base64 forms). */
async function objectsWithMarker(b: Backend, store: string, marker = MARKER): Promise<string[]> {
  const needles = [Buffer.from(marker), Buffer.from(marker, 'utf16le'), Buffer.from(Buffer.from(marker).toString('base64').slice(0, 16))];
  const keys = await b.keys(store);
  if (keys.length === 0) throw new Error(`${store} holds no objects: nothing to search`);
  const hits: string[] = [];
  for (const k of keys) {
    const bytes = await b.read(store, k);
    if (needles.some((n) => bytes.includes(n))) hits.push(k);
  }
  return hits;
}

function keyFile(dir: string, name: string): string {
  const p = path.join(dir, name);
  fs.writeFileSync(p, randomBytes(32), { mode: 0o600 });
  return p;
}

/** Names in `dir` other than those listed: what a failed command left behind. */
function leftovers(dir: string, except: string[]): string[] {
  return fs.readdirSync(dir).filter((n) => !except.includes(n));
}

const SIZE = 40 * MiB + 777; // not a multiple of the block size: the last object is short
const base: Write[] = [
  { offset: 0, length: 2 * MiB, seed: 1 },
  { offset: 9 * MiB + 5000, length: 3 * MiB + 17, seed: 2 },
  { offset: 30 * MiB, length: 1 * MiB, seed: 3 },
];
const change: Write[] = [
  { offset: 64 * KiB - 10, length: 20, seed: 20 },
  { offset: 33 * MiB, length: 5000, seed: 21 },
  { offset: 30 * MiB, length: BS, seed: 22 }, // a whole block: its old object is garbage once s1 goes
];

forEachBackend(t, 'an encrypted volume: no file of the store holds the marker, not even names or tags; snapshots restore byte-exact with the key; incremental under the key; gc keeps what is live', async (t, b) => {
  const dir = t.testdir();
  const store = await b.store('store');
  const vol = path.join(dir, 'vol.img');
  const key = keyFile(dir, 'k');
  markedImage(vol, SIZE, base);
  const v1 = sha(vol);

  const reg = await snap.registerVolume(vol, { store, blockSize: BS, encrypted: true, key: { keyFile: key } });
  t.equal(reg.encrypted, true);
  t.match(reg.keyId, /^key-[0-9a-f]{32}$/);
  t.same(await snap.registerVolume(vol, { store, encrypted: true, key: { keyFile: key } }), reg, 'registering again with the same key changes nothing');

  const s1 = await snap.createSnapshot(vol, { store, key: { keyFile: key }, name: `name ${MARKER}`, description: `about ${MARKER}`, tags: { env: MARKER } });
  t.equal(s1.encrypted, true, 'a snapshot of an encrypted volume is encrypted without being asked');
  t.equal(s1.keyId, reg.keyId);
  t.equal(s1.name, `name ${MARKER}`, 'the caller sees its own metadata');
  const first = touched(base, BS).concat(Math.floor((SIZE - 1) / BS));
  t.equal(s1.stats.blocksAdded, first.length);

  applyWrites(vol, change);
  const v2 = sha(vol);
  const s2 = await snap.createSnapshot(vol, { store, key: { keyFile: key }, name: 'second' });
  t.equal(s2.parentId, s1.id, 'incremental: the parent is under the same key');
  t.equal(s2.stats.blocksAdded, touched(change, BS).length, 'only the changed blocks are added');

  t.same(await objectsWithMarker(b, store), [], 'no object of the store contains the marker (data, name, description, tags)');
  t.same(await objectsWithMarker(b, store, 'second'), [], 'names are sealed in the record');
  const keyKeys = await b.keys(store, 'keys/');
  t.equal(keyKeys.length, 1, 'one key record');
  const keyRecord = await b.read(store, keyKeys[0]);
  t.notOk(keyRecord.includes(fs.readFileSync(key).toString('hex')) || keyRecord.includes(fs.readFileSync(key)), 'the key is not in the store');
  const blockSizes = await logicalSizes(b, store); // (packs counted as their pieces)
  t.equal(blockSizes.size, s2.stats.blocksAdded + s1.stats.blocksAdded);
  for (const [f, size] of blockSizes) {
    // a whole block, or a piece (a granule of an eighth of a block: the change tags saw few move)
    t.ok(size === BS + 32 || size === (SIZE % BS) + 32 || size === BS / 8 + 32, `object ${f} is a sealed block or piece (${size} bytes)`);
  }

  // Listing: sealed without the key, open with it.
  const hidden = (await snap.listSnapshots({ store })).snapshots;
  t.same(hidden.map((s) => [s.name, s.metadataHidden]), [['', true], ['', true]], 'names are hidden without the key');
  const shown = (await snap.listSnapshots({ store, key: { keyFile: key } })).snapshots;
  t.same(shown.map((s) => s.name), [`name ${MARKER}`, 'second']);
  t.same(shown[0].tags, { env: MARKER });
  t.equal((await snap.showSnapshot('second', { store, key: { keyFile: key } })).id, s2.id, 'a name resolves with the key');
  await t.rejects(snap.showSnapshot('second', { store }), { code: 'ENOENT', message: /sealed: give their key/ });

  for (const [s, want] of [
    [s1, v1],
    [s2, v2],
  ] as const) {
    const out = path.join(dir, `${s.id}.img`);
    await snap.restoreSnapshot(s.id, { store, to: out, key: { keyFile: key } });
    t.equal(sha(out), want, `${s.id} restores byte-exact with the key`);
    t.ok(allocated(out) < 10 * MiB, 'and sparse');
    const v = await snap.verifySnapshot(s.id, { store, key: { keyFile: key } });
    t.ok(v.ok, 'verify passes');
  }

  // In place, under the key.
  await snap.restoreSnapshot(s1.id, { store, inPlace: vol, key: { keyFile: key } });
  t.equal(sha(vol), v1, 'in-place restore rolls the volume back byte-exact');

  // gc holds no key: it still keeps every block a completed encrypted snapshot needs.
  await snap.deleteSnapshot(s1.id, { store });
  const g = await snap.gc({ store });
  t.ok(g.blocksFreed > 0 && g.blocksKept > 0, `gc freed ${g.blocksFreed}, kept ${g.blocksKept}`);
  const out = path.join(dir, 'after-gc.img');
  await snap.restoreSnapshot(s2.id, { store, to: out, key: { keyFile: key } });
  t.equal(sha(out), v2, 'the remaining snapshot restores after delete + gc');
  t.same((await snap.diffSnapshots(s2.id, s2.id, { store })).changedBlocks, [], 'diff of encrypted snapshots works without the key (keyed digests)');
});

forEachBackend(t, 'no key, a wrong key or passphrase, a flipped byte, a swapped object: each a clear error, exit 1, and no output left', async (t, b) => {
  const dir = t.testdir();
  const store = await b.store('store');
  const vol = path.join(dir, 'vol.img');
  const key = keyFile(dir, 'k');
  const other = keyFile(dir, 'other');
  const out = path.join(dir, 'out');
  fs.mkdirSync(out);
  markedImage(vol, 8 * MiB, [
    { offset: 0, length: 1 * MiB, seed: 5 },
    { offset: 4 * MiB, length: 1 * MiB, seed: 6 },
  ]);
  let r = ds(['volume', 'register', vol, '--store', store, '--block-size', '64K', '--encrypted', '--key-file', key, '--json']);
  t.equal(r.status, 0, r.stderr);

  // Snapshot: no key, wrong key — refused before anything is written.
  r = ds(['snapshot', 'create', vol, '--store', store]);
  t.equal(r.status, 1);
  t.match(r.stderr, /is encrypted \(key key-[0-9a-f]+\): pass --key-file.*\(ENOKEY\)/);
  r = ds(['snapshot', 'create', vol, '--store', store, '--key-file', other]);
  t.equal(r.status, 1);
  t.match(r.stderr, /wrong key \(EKEYREJECTED\)/);
  t.same(await b.keys(store, 'snapshots/'), [], 'no snapshot record was written for either');
  r = ds(['snapshot', 'create', vol, '--store', store, '--key-file', key, '--name', 'good', '--json']);
  t.equal(r.status, 0, r.stderr);
  const id = JSON.parse(r.out).id as string;
  t.equal(JSON.parse(r.out).encrypted, true);

  const target = path.join(out, 'restored.img');
  const noOutput = (what: string) => t.same(fs.readdirSync(out), [], `${what}: no output file, no temporary file`);
  r = ds(['snapshot', 'restore', id, '--store', store, '--to', target]);
  t.equal(r.status, 1, 'no key: exit 1');
  t.match(r.stderr, /ENOKEY/);
  noOutput('no key');
  r = ds(['snapshot', 'restore', id, '--store', store, '--to', target, '--key-file', other]);
  t.equal(r.status, 1, 'wrong key: exit 1');
  t.match(r.stderr, /is key key-[0-9a-f]+, not the key of snapshot .*wrong key/);
  noOutput('wrong key');
  const pp = path.join(dir, 'pp');
  fs.writeFileSync(pp, 'not the key\n');
  r = ds(['snapshot', 'restore', id, '--store', store, '--to', target, '--passphrase-file', pp]);
  t.equal(r.status, 1, 'a passphrase for a key-file key: exit 1');
  t.match(r.stderr, /EKEYREJECTED/);
  r = ds(['snapshot', 'verify', id, '--store', store]);
  t.equal(r.status, 1, 'verify without the key: exit 1');
  t.match(r.stderr, /ENOKEY/);
  const short = path.join(dir, 'short');
  fs.writeFileSync(short, randomBytes(31));
  r = ds(['snapshot', 'restore', id, '--store', store, '--to', target, '--key-file', short]);
  t.equal(r.status, 1);
  t.match(r.stderr, /holds 31 bytes; a key file is exactly 32 random bytes/);
  noOutput('a short key file');

  const objects = await b.keys(store, 'blocks/');
  t.equal(objects.length, 33, 'two MiB of data in 64 KiB blocks, and the marker in the last block');
  const damage = async (name: string, fn: () => Promise<void>, undo: () => Promise<void>) => {
    await fn();
    const rr = ds(['snapshot', 'restore', id, '--store', store, '--to', target, '--key-file', key]);
    t.equal(rr.status, 1, `${name}: restore exits 1`);
    t.match(rr.stderr, /ECORRUPT/, `${name}: ${rr.stderr.trim()}`);
    noOutput(name);
    const v = ds(['snapshot', 'verify', id, '--store', store, '--key-file', key, '--json']);
    t.equal(v.status, 1, `${name}: verify exits 1`);
    await undo();
    return JSON.parse(v.out);
  };
  // One flipped byte in the ciphertext, then in the trailer (nonce / tag).
  const victim = objects[3];
  const original = await b.read(store, victim);
  const restoreVictim = () => b.write(store, victim, original);
  let report = await damage('a flipped byte in an object', () => b.flip(store, victim, 1000), restoreVictim);
  t.equal(report.badBlocks.length, 1, 'verify names exactly one bad block');
  t.match(report.badBlocks[0].reason, /failed authentication/);
  report = await damage('a flipped byte in an object\'s tag', () => b.flip(store, victim, BS + 20), restoreVictim);
  t.equal(report.badBlocks.length, 1);
  t.match(report.badBlocks[0].reason, /failed authentication/);
  report = await damage('a flipped byte in an object\'s trailer magic', () => b.flip(store, victim, original.length - 2), restoreVictim);
  t.match(report.badBlocks[0].reason, /trailer/);
  // An object swapped for another (both authentic on their own).
  const aBytes = await b.read(store, objects[1]);
  const bBytes = await b.read(store, objects[2]);
  report = await damage('a swapped object', () => b.write(store, objects[2], aBytes), () => b.write(store, objects[2], bBytes));
  t.equal(report.badBlocks.length, 1, 'the swapped object is named');
  // The manifest: its keyed trailer catches a changed entry.
  const manifest = `snapshots/${id}.map`;
  const mBytes = await b.read(store, manifest);
  report = await damage('a flipped byte in the manifest', () => b.flip(store, manifest, 128 + 40 + 20), () => b.write(store, manifest, mBytes));
  t.match(report.manifestError, /authentication \(HMAC\)/);

  r = ds(['snapshot', 'restore', id, '--store', store, '--to', target, '--key-file', key]);
  t.equal(r.status, 0, `undamaged again, it restores: ${r.stderr}`);
  t.equal(sha(target), sha(vol));
  t.same(leftovers(dir, ['stores', 'vol.img', 'k', 'other', 'out', 'pp', 'short']), [], 'nothing else was left anywhere');
});

forEachBackend(t, 'passphrases: DISKSNAP_PASSPHRASE or --passphrase-file, scrypt salt in the store; one passphrase is one key per store; a plain volume refuses a key', async (t, b) => {
  const dir = t.testdir();
  const store = await b.store('store');
  const v1 = path.join(dir, 'a.img');
  const v2 = path.join(dir, 'b.img');
  makeImage(v1, 4 * MiB, [{ offset: 0, length: 1 * MiB, seed: 9 }]);
  makeImage(v2, 4 * MiB, [{ offset: 0, length: 1 * MiB, seed: 9 }]); // the same content
  const env = { DISKSNAP_PASSPHRASE: 'correct horse battery staple' };
  let r = ds(['volume', 'register', v1, '--store', store, '--block-size', '64K', '--encrypted', '--json'], env);
  t.equal(r.status, 0, r.stderr);
  const k1 = JSON.parse(r.out).keyId;
  r = ds(['volume', 'register', v2, '--store', store, '--encrypted', '--json'], env);
  const k2 = JSON.parse(r.out).keyId;
  t.equal(k2, k1, 'the same passphrase in one store is the same key (its salt is reused)');
  const rec = JSON.parse((await b.read(store, `keys/${k1}.json`)).toString('utf8'));
  t.equal(rec.kdf, 'scrypt');
  t.same(Object.keys(rec.scrypt).sort(), ['N', 'p', 'r', 'salt']);

  r = ds(['snapshot', 'create', v1, '--store', store, '--json'], env);
  t.equal(r.status, 0, r.stderr);
  t.equal(JSON.parse(r.out).stats.blocksAdded, 16);
  r = ds(['snapshot', 'create', v2, '--store', store, '--json'], env);
  t.equal(JSON.parse(r.out).stats.blocksAdded, 0, 'volumes under one key share blocks');
  const id = JSON.parse(r.out).id;

  const pf = path.join(dir, 'pass.txt');
  fs.writeFileSync(pf, `${env.DISKSNAP_PASSPHRASE}\n`);
  const out = path.join(dir, 'out.img');
  r = ds(['snapshot', 'restore', id, '--store', store, '--to', out, '--passphrase-file', pf]);
  t.equal(r.status, 0, `--passphrase-file (its trailing newline is not part of it): ${r.stderr}`);
  t.equal(sha(out), sha(v2));
  r = ds(['snapshot', 'restore', id, '--store', store, '--to', path.join(dir, 'x.img')], { DISKSNAP_PASSPHRASE: 'Correct horse battery staple' });
  t.equal(r.status, 1);
  t.match(r.stderr, /is not the passphrase of snapshot .*wrong passphrase \(EKEYREJECTED\)/);
  t.notOk(fs.existsSync(path.join(dir, 'x.img')));

  // A plain volume: an explicit key is a mistake, the environment's passphrase is ignored.
  const plain = path.join(dir, 'plain.img');
  makeImage(plain, 1 * MiB, [{ offset: 0, length: 4096, seed: 1 }]);
  r = ds(['snapshot', 'create', plain, '--store', store, '--passphrase-file', pf]);
  t.equal(r.status, 1);
  t.match(r.stderr, /is not an encrypted volume.*volume register .* --encrypted/);
  r = ds(['snapshot', 'create', plain, '--store', store, '--json'], env);
  t.equal(r.status, 0, r.stderr);
  t.equal(JSON.parse(r.out).encrypted, false, 'a plain volume stays plain with DISKSNAP_PASSPHRASE set');
  r = ds(['volume', 'register', plain, '--store', store, '--encrypted'], env);
  t.equal(r.status, 1, 'a volume with plain snapshots does not become encrypted');
  t.match(r.stderr, /already has 1 unencrypted snapshot.*--encrypt/);
  r = ds(['volume', 'register', plain, '--store', store, '--encrypted']);
  t.equal(r.status, 1);
  t.match(r.stderr, /--encrypted .* needs a key: pass --key-file.*ENOKEY/);
});

t.test('native sealing and node:crypto on the event loop make the same objects: each opens the other\'s, and both refuse a damaged one', async (t) => {
  const { deriveKeys, sealBlock, unsealBlock, TRAILER_BYTES } = await import('../src/storage/store/crypto');
  const { sealChunk, openChunk, nativeCrypto } = await import('../src/storage/store/crypto-pool');
  t.ok(nativeCrypto(), 'chunks are sealed natively by default');
  const keys = deriveKeys(randomBytes(32));
  const bs = 512 * KiB;
  const plain = randomBytes(8 * bs - 1000); // the last block is short
  const lens = Array.from({ length: 8 }, (_, k) => Math.min(bs, plain.length - k * bs));
  const digests = lens.map((_, k) => randomBytes(32).fill(k, 0, 1));

  // Sealed natively -> opened by node:crypto.
  const buf = Buffer.allocUnsafeSlow(plain.length);
  plain.copy(buf);
  const sealed = await sealChunk(keys, buf, lens.map((len, k) => ({ off: k * bs, len, digest: digests[k] })));
  t.equal(sealed.buf, buf, 'sealed in place');
  t.notOk(buf.subarray(0, 4096).equals(plain.subarray(0, 4096)), 'the buffer now holds ciphertext');
  for (let k = 0; k < 8; k++) {
    const obj = Buffer.concat([sealed.buf.subarray(k * bs, k * bs + lens[k]), sealed.trailers[k]]);
    t.ok(unsealBlock(keys, digests[k], obj, `o${k}`).equals(plain.subarray(k * bs, k * bs + lens[k])), `block ${k} opens with node:crypto`);
  }

  // Sealed by node:crypto -> opened natively; one object damaged, one swapped, one truncated.
  const stride = bs + TRAILER_BYTES;
  const staging = Buffer.allocUnsafeSlow(8 * stride);
  for (let k = 0; k < 8; k++) {
    const [ct, trailer] = sealBlock(keys, digests[k], Buffer.from(plain.subarray(k * bs, k * bs + lens[k])));
    ct.copy(staging, k * stride);
    trailer.copy(staging, k * stride + lens[k]);
  }
  staging[3 * stride + 100] ^= 1;
  staging.write('DSE0', 7 * stride + lens[7] + 28, 'latin1'); // not a sealed object's trailer
  const items = lens.map((len, k) => ({ sOff: k * stride, sLen: len + TRAILER_BYTES, oOff: k * bs, digest: digests[k === 5 ? 6 : k], where: `o${k}` }));
  items[2] = { ...items[2], sLen: 20 }; // shorter than a trailer
  const out = Buffer.alloc(8 * bs, 0xee);
  const opened = await openChunk(keys, staging, out, items);
  t.same(
    opened.errors.map((e) => e !== null),
    [false, false, true, true, false, true, false, true],
    'the short object, the flipped byte, the object under another digest and the broken trailer are refused',
  );
  t.match(opened.errors[3], /object o3 failed authentication/);
  t.match(opened.errors[5], /object o5 failed authentication/);
  t.match(opened.errors[2], /object o2 shorter than/);
  t.match(opened.errors[7], /object o7 does not end in a sealed object's trailer/);
  for (const k of [0, 1, 4, 6]) t.ok(opened.out.subarray(k * bs, k * bs + lens[k]).equals(plain.subarray(k * bs, k * bs + lens[k])), `block ${k} opens natively`);
  t.ok(opened.out.subarray(3 * bs, 4 * bs).every((b) => b === 0), 'no unauthenticated plaintext was written');
});

forEachBackend(t, 'an encrypted snapshot sealed natively restores with node:crypto, and the other way round', async (t, b) => {
  const dir = t.testdir();
  const store = await b.store('store');
  const vol = path.join(dir, 'vol.img');
  const key = keyFile(dir, 'k');
  markedImage(vol, 12 * MiB, [{ offset: 0, length: 6 * MiB, seed: 40 }]);
  let r = ds(['volume', 'register', vol, '--store', store, '--encrypted', '--key-file', key]);
  t.equal(r.status, 0, r.stderr);
  for (const [create, restore] of [
    ['0', '2'],
    ['2', '0'],
  ]) {
    fs.writeFileSync(vol, Buffer.from(`round ${create}`), { flag: 'r+' });
    r = ds(['snapshot', 'create', vol, '--store', store, '--key-file', key, '--json'], { DISKSNAP_CRYPTO_THREADS: create });
    t.equal(r.status, 0, r.stderr);
    const out = path.join(dir, `out-${create}.img`);
    r = ds(['snapshot', 'restore', JSON.parse(r.out).id, '--store', store, '--to', out, '--key-file', key], { DISKSNAP_CRYPTO_THREADS: restore });
    t.equal(r.status, 0, r.stderr);
    t.equal(sha(out), sha(vol), `sealed with ${create} native threads, opened with ${restore}`);
  }
  t.same(await objectsWithMarker(b, store), []);
});

forEachBackend(t, 'a killed writer\'s pending encrypted snapshot is marked error by a process without the key, its sealed metadata intact', async (t, b) => {
  const { spawn } = await import('node:child_process');
  const { ROOT } = await import('../fixtures/store/helpers');
  const dir = t.testdir();
  const store = await b.store('store');
  const vol = path.join(dir, 'vol.img');
  const key = keyFile(dir, 'k');
  markedImage(vol, 8 * MiB, [{ offset: 0, length: 4 * MiB, seed: 50 }]);
  await snap.registerVolume(vol, { store, blockSize: BS, encrypted: true, key: { keyFile: key } });
  const lib = path.join(ROOT, 'dist', 'src', 'storage', 'index.js');
  const script = `require(${JSON.stringify(lib)}).createSnapshot(${JSON.stringify(vol)}, { store: ${JSON.stringify(store)}, key: { keyFile: ${JSON.stringify(key)} },
    name: ${JSON.stringify(`killed ${MARKER}`)}, faults: { afterChunk: () => { console.log('reading'); return new Promise(() => setInterval(() => {}, 1000)); } } })`;
  // In a bucket a dead writer is known by its lease running out (no pid to probe): the
  // child's leases last 1.5 s instead of a minute.
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'], env: { ...process.env, DISKSNAP_S3_LEASE_TTL_MS: '1500' } });
  await new Promise<void>((resolve, reject) => {
    child.stdout!.once('data', () => resolve());
    child.once('exit', (code) => reject(new Error(`child exited ${code} before reading`)));
  });
  const died = new Promise((r) => child.once('exit', r));
  child.kill('SIGKILL');
  await died;

  if (b.kind === 's3') await new Promise((r) => setTimeout(r, 2000)); // its leases run out
  const listed = (await snap.listSnapshots({ store })).snapshots; // no key: reaps on the way
  t.equal(listed.length, 1);
  t.match(listed[0], { state: 'error', encrypted: true, metadataHidden: true, error: /ended before it completed/ });
  const shown = await snap.showSnapshot(listed[0].id, { store, key: { keyFile: key } });
  t.equal(shown.name, `killed ${MARKER}`, 'the sealed name survived the keyless rewrite');
  t.same(await objectsWithMarker(b, store), []);
  const g = await snap.gc({ store });
  t.equal(g.blocksKept, 0, 'gc removes what the killed writer had stored');
});

forEachBackend(t, 'small blocks (16 KiB) and a short last block: sealed objects are block + 32 bytes, and restore byte-exact', async (t, b) => {
  const dir = t.testdir();
  const store = await b.store('store');
  const vol = path.join(dir, 'vol.img');
  const key = keyFile(dir, 'k');
  markedImage(vol, 3 * MiB + 1000, [{ offset: 0, length: 2 * MiB, seed: 60 }]);
  await snap.registerVolume(vol, { store, blockSize: 16 * KiB, encrypted: true, key: { keyFile: key } });
  const s = await snap.createSnapshot(vol, { store, key: { keyFile: key } });
  const sizes = new Set((await b.sizes(store, 'blocks/')).values());
  t.same([...sizes].sort((a, b) => a - b), [1000 + 32, 16 * KiB + 32], 'objects are block + 32 bytes');
  const out = path.join(dir, 'out.img');
  await snap.restoreSnapshot(s.id, { store, to: out, key: { keyFile: key } });
  t.equal(sha(out), sha(vol));
  t.ok((await snap.verifySnapshot(s.id, { store, key: { keyFile: key } })).ok);
  t.same(await objectsWithMarker(b, store), []);
});

forEachBackend(t, 'key generate writes a private 32-byte key that encrypts and restores, and never replaces a key without --force', async (t, b) => {
  const dir = t.testdir();
  const key = path.join(dir, 'vol.key');
  let r = ds(['key', 'generate', key, '--json']);
  t.equal(r.status, 0, r.stderr);
  const { keyId } = JSON.parse(r.out) as { keyId: string };
  t.match(keyId, /^key-[0-9a-f]{32}$/);
  const first = fs.readFileSync(key);
  t.equal(first.length, 32);
  t.equal(fs.statSync(key).mode & 0o777, 0o600, 'readable by its owner only');
  t.same(leftovers(dir, ['vol.key']), [], 'no temporary file left');

  r = ds(['key', 'generate', key]);
  t.equal(r.status, 1, 'an existing key file is refused');
  t.match(r.stderr, /already exists.*--force.*EEXIST/);
  t.ok(fs.readFileSync(key).equals(first), 'and left as it was');

  r = ds(['key', 'generate', path.join(dir, 'missing', 'k')]);
  t.equal(r.status, 1);
  t.match(r.stderr, /directory .*missing does not exist \(ENOENT\)/);

  // the key works, and the store records the id key generate printed
  const vol = path.join(dir, 'vol.img');
  markedImage(vol, 4 * MiB, [{ offset: 0, length: MiB, seed: 7 }]);
  const store = await b.store('store');
  r = ds(['volume', 'register', vol, '--store', store, '--encrypted', '--key-file', key, '--json']);
  t.equal(r.status, 0, r.stderr);
  t.equal(JSON.parse(r.out).keyId, keyId, 'the store knows the key by the id key generate printed');
  r = ds(['snapshot', 'create', vol, '--store', store, '--key-file', key, '--json']);
  t.equal(r.status, 0, r.stderr);
  const out = path.join(dir, 'out.img');
  r = ds(['snapshot', 'restore', JSON.parse(r.out).id, '--store', store, '--to', out, '--key-file', key]);
  t.equal(r.status, 0, r.stderr);
  t.equal(sha(out), sha(vol));
  t.same(await objectsWithMarker(b, store), []);

  r = ds(['key', 'generate', key, '--force', '--json']);
  t.equal(r.status, 0, r.stderr);
  t.notOk(fs.readFileSync(key).equals(first), '--force replaces it with a new key');
  t.not(JSON.parse(r.out).keyId, keyId);
});
