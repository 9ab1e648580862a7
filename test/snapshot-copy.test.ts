/**
 * `snapshot copy` (issue 5): copies to another store keep metadata (unless overridden), are
 * incremental (a second snapshot copied to the same destination adds only its changed
 * blocks), show pending with progress then completed, and never decrypt: an encrypted
 * snapshot's copy stays encrypted (same key, or re-keyed), a plain one is encrypted with
 * --encrypt. A damaged source is never propagated. The whole flow also runs over a backend
 * that has only the core methods (get, putIfAbsent, put, list, delete). Every test but that
 * last one runs with both stores in directories and with both in buckets
 * (test/helpers/backends.ts); copies between a directory and a bucket are in
 * s3-snapshot.test.ts.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import * as snap from '../src/storage';
import { withFaults } from '../src/storage/faults';
import { setBackendFactory } from '../src/storage/store/store';
import { DirectoryBackend } from '../src/storage/store/dir';
import type { StoreBackend } from '../src/storage/store/backend';
import { KiB, MiB, Write, applyWrites, ds, makeImage, sha, touched } from '../fixtures/store/helpers';
import { Backend, closeInspector, forEachBackend } from './helpers/backends';

t.teardown(closeInspector);

const BS = 64 * KiB;
const MARKER = 'COPY-TEST-MARKER-41d9';

function keyFile(dir: string, name: string): string {
  const p = path.join(dir, name);
  fs.writeFileSync(p, randomBytes(32), { mode: 0o600 });
  return p;
}

async function objectsWithMarker(be: Backend, store: string): Promise<string[]> {
  const keys = await be.keys(store);
  if (keys.length === 0) throw new Error(`${store} holds no objects: nothing to search`);
  const hits: string[] = [];
  for (const k of keys) if ((await be.read(store, k)).includes(MARKER)) hits.push(k);
  return hits;
}

/**
 * 24 MiB with 20 MiB of data (several copy batches at 64 KiB blocks), the marker inside; or,
 * `small`, 8 MiB of data in one batch where a test needs no more (the runs on a bucket, where
 * every block is a request, stay quick).
 */
function volume(file: string, small = false): void {
  makeImage(file, 24 * MiB, [
    { offset: 0, length: small ? 6 * MiB : 12 * MiB, seed: 1 },
    { offset: 14 * MiB, length: small ? 2 * MiB : 8 * MiB, seed: 2 },
  ]);
  const fd = fs.openSync(file, 'r+');
  for (const at of [100, 5 * MiB + 7, small ? 15 * MiB : 20 * MiB]) fs.writeSync(fd, Buffer.from(MARKER), 0, MARKER.length, at);
  fs.closeSync(fd);
}

const change: Write[] = [
  { offset: 3 * MiB + 5, length: 100, seed: 30 },
  { offset: 15 * MiB, length: 200 * KiB, seed: 31 },
];

const blocksOf = async (be: Backend, store: string) => (await be.keys(store, 'blocks/')).length;

forEachBackend(t, 'plain copies: metadata kept or overridden, the second copy adds only its changed blocks, the copy restores after the source store is gone', async (t, be) => {
  const dir = t.testdir();
  const a = await be.store('a');
  const b = await be.store('b');
  const vol = path.join(dir, 'vol.img');
  volume(vol, be.kind === 's3');
  const v1 = sha(vol);
  const s1 = await snap.createSnapshot(vol, { store: a, blockSize: BS, name: 'one', description: 'first', tags: { env: 'ci', team: 'x' } });
  const c1 = await snap.copySnapshot(s1.id, { store: a, toStore: b });
  t.not(c1.id, s1.id, 'a copy is a new snapshot');
  t.equal(c1.volumeId, s1.volumeId, 'of the same volume');
  t.match(c1, { state: 'completed', progress: 100, name: 'one', description: 'first', tags: { env: 'ci', team: 'x' }, encrypted: false, parentId: null });
  t.same(c1.copiedFrom, { storeId: JSON.parse((await be.read(a, 'store.json')).toString('utf8')).id, snapshotId: s1.id, startTime: s1.startTime });
  t.equal(c1.stats.blocksAdded, s1.stats.blocksAdded, 'the first copy adds every block');
  t.equal(await blocksOf(be, b), await blocksOf(be, a));
  t.equal(JSON.parse(ds(['volume', 'list', '--store', b, '--json']).out).volumes[0].id, s1.volumeId, 'the destination knows the volume');

  applyWrites(vol, change);
  const v2 = sha(vol);
  const s2 = await snap.createSnapshot(vol, { store: a, name: 'two' });
  const before = await be.bytes(b, 'blocks/');
  const r = ds(['snapshot', 'copy', s2.id, '--store', a, '--to-store', b, '--name', 'two-copy', '--tag', 'env=prod', '--json']);
  t.equal(r.status, 0, r.stderr);
  const c2 = JSON.parse(r.out);
  const changed = touched(change, BS).length;
  t.equal(c2.parentId, c1.id, 'the previous copy is its parent');
  t.equal(c2.stats.blocksAdded, changed, 'the second copy adds only the changed blocks');
  t.equal(c2.stats.changedBlocks, changed);
  t.equal(c2.stats.bytesScanned, changed * BS, 'and reads only those from the source (the rest maps through the previous copy)');
  t.equal((await be.bytes(b, 'blocks/')) - before, changed * BS, 'the destination grew by the changed blocks');
  t.match(c2, { name: 'two-copy', tags: { env: 'prod' } }, 'name and tags overridden');
  t.same(ds(['snapshot', 'diff', c1.id, c2.id, '--store', b, '--json']).out, ds(['snapshot', 'diff', s1.id, s2.id, '--store', a, '--json']).out, 'the copies differ where the originals do');

  await be.removeAll(a);
  t.notOk(await be.exists(a), 'the source store is gone');
  for (const [c, want] of [
    [c1, v1],
    [c2, v2],
  ] as const) {
    const out = path.join(dir, `${c.id}.img`);
    const rr = ds(['snapshot', 'restore', c.id, '--store', b, '--to', out]);
    t.equal(rr.status, 0, rr.stderr);
    t.equal(sha(out), want, `copy ${c.id} restores byte-exact without its source store`);
  }
  t.ok(ds(['snapshot', 'verify', c2.id, '--store', b]).status === 0);
});

forEachBackend(t, 'plain -> --encrypt: no file of the destination holds the marker; restores only with the key; the second encrypted copy adds only changed blocks', async (t, be) => {
  const dir = t.testdir();
  const a = await be.store('a');
  const b = await be.store('b');
  const vol = path.join(dir, 'vol.img');
  const key = keyFile(dir, 'k');
  volume(vol, be.kind === 's3');
  const s1 = await snap.createSnapshot(vol, { store: a, blockSize: BS, name: `n-${MARKER}`, tags: { t: MARKER } });
  let r = ds(['snapshot', 'copy', s1.id, '--store', a, '--to-store', b, '--key-file', key]);
  t.equal(r.status, 1, 'a key without --encrypt for a plain snapshot is refused');
  t.match(r.stderr, /add --encrypt/);
  t.notOk(await be.exists(b), 'nothing was created');
  r = ds(['snapshot', 'copy', s1.id, '--store', a, '--to-store', b, '--encrypt']);
  t.equal(r.status, 1);
  t.match(r.stderr, /needs a key.*ENOKEY/);

  r = ds(['snapshot', 'copy', s1.id, '--store', a, '--to-store', b, '--encrypt', '--key-file', key, '--json']);
  t.equal(r.status, 0, r.stderr);
  const c1 = JSON.parse(r.out);
  t.match(c1, { encrypted: true, name: `n-${MARKER}`, keyId: /^key-/ });
  t.same(await objectsWithMarker(be, b), [], 'no object of the destination store contains the marker');
  t.ok((await objectsWithMarker(be, a)).length > 0, '(the plain source does)');

  applyWrites(vol, change);
  const v2 = sha(vol);
  const s2 = await snap.createSnapshot(vol, { store: a });
  const before = await blocksOf(be, b);
  const c2 = await snap.copySnapshot(s2.id, { store: a, toStore: b, encrypt: true, key: { keyFile: key } });
  t.equal(c2.parentId, c1.id);
  t.equal(c2.stats.blocksAdded, touched(change, BS).length, 'the second encrypted copy adds only the changed blocks');
  t.equal((await blocksOf(be, b)) - before, touched(change, BS).length);
  t.equal(c2.stats.bytesScanned, touched(change, BS).length * BS, 'unchanged blocks are not even read');
  t.same(await objectsWithMarker(be, b), []);

  const out = path.join(dir, 'out.img');
  r = ds(['snapshot', 'restore', c2.id, '--store', b, '--to', out]);
  t.equal(r.status, 1, 'no key: refused');
  t.notOk(fs.existsSync(out));
  r = ds(['snapshot', 'restore', c2.id, '--store', b, '--to', out, '--key-file', key]);
  t.equal(r.status, 0, r.stderr);
  t.equal(sha(out), v2, 'the encrypted copy restores byte-exact with the key');
  t.equal(JSON.parse(ds(['volume', 'list', '--store', b, '--json']).out).volumes[0].encrypted, true, 'the destination records the volume as encrypted');
});

forEachBackend(t, 'encrypted -> copy without --encrypt stays encrypted under its key; re-keying needs the old key and makes the old one useless; nothing decrypts', async (t, be) => {
  const dir = t.testdir();
  const a = await be.store('a');
  const b = await be.store('b');
  const c = await be.store('c');
  const vol = path.join(dir, 'vol.img');
  const k1 = keyFile(dir, 'k1');
  const k2 = keyFile(dir, 'k2');
  volume(vol, be.kind === 's3');
  await snap.registerVolume(vol, { store: a, blockSize: BS, encrypted: true, key: { keyFile: k1 } });
  const s1 = await snap.createSnapshot(vol, { store: a, key: { keyFile: k1 }, name: 'enc' });

  let r = ds(['snapshot', 'copy', s1.id, '--store', a, '--to-store', b]);
  t.equal(r.status, 1, 'the source key is needed to copy (objects are verified on the way)');
  t.match(r.stderr, /ENOKEY/);
  t.notOk(await be.exists(b), 'refused before the destination was created');
  r = ds(['snapshot', 'copy', s1.id, '--store', a, '--to-store', b, '--key-file', k2]);
  t.equal(r.status, 1);
  t.match(r.stderr, /another one; to re-key the copy, pass the snapshot's key with --source-key-file/);

  r = ds(['snapshot', 'copy', 'enc', '--store', a, '--to-store', b, '--key-file', k1, '--json']);
  t.equal(r.status, 0, r.stderr);
  const same = JSON.parse(r.out);
  t.match(same, { encrypted: true, keyId: s1.keyId, name: 'enc' }, 'copied without --encrypt: still encrypted, same key');
  t.same(await objectsWithMarker(be, b), []);
  t.same(
    await be.keys(b, 'blocks/'),
    await be.keys(a, 'blocks/'),
    'under the same key the objects have the same names',
  );

  // A second snapshot under the same key: copied by digest, only what b lacks.
  applyWrites(vol, change);
  const s2 = await snap.createSnapshot(vol, { store: a, key: { keyFile: k1 } });
  const c2 = await snap.copySnapshot(s2.id, { store: a, toStore: b, key: { keyFile: k1 } });
  t.equal(c2.stats.blocksAdded, touched(change, BS).length, 'same key: only the changed blocks are added');

  // Re-key into c.
  r = ds(['snapshot', 'copy', s2.id, '--store', a, '--to-store', c, '--source-key-file', k1, '--key-file', k2, '--json']);
  t.equal(r.status, 0, r.stderr);
  const rekeyed = JSON.parse(r.out);
  t.equal(rekeyed.encrypted, true);
  t.not(rekeyed.keyId, s1.keyId, 'a new key id');
  t.same(await objectsWithMarker(be, c), []);
  const out = path.join(dir, 'out.img');
  r = ds(['snapshot', 'restore', rekeyed.id, '--store', c, '--to', out, '--key-file', k1]);
  t.equal(r.status, 1, 'the old key does not open the re-keyed copy');
  t.match(r.stderr, /wrong key/);
  r = ds(['snapshot', 'restore', rekeyed.id, '--store', c, '--to', out, '--key-file', k2]);
  t.equal(r.status, 0, r.stderr);
  t.equal(sha(out), sha(vol), 'the re-keyed copy restores with the new key');
  const d = await be.store('d');
  r = ds(['snapshot', 'copy', s2.id, '--store', a, '--to-store', d, '--source-key-file', k1]);
  t.equal(r.status, 0, 'a copy with only the source key: encrypted under that key');
  t.equal(JSON.parse(ds(['snapshot', 'list', '--store', d, '--json']).out).snapshots[0].encrypted, true);
  t.notOk(ds(['snapshot', 'copy', '--help']).out.match(/decrypt/), 'there is no option to decrypt');
});

forEachBackend(t, 'a copy shows pending with progress, then completed; a damaged source object fails the copy (error, not completed)', async (t, be) => {
  const dir = t.testdir();
  const a = await be.store('a');
  const b = await be.store('b');
  const vol = path.join(dir, 'vol.img');
  volume(vol);
  const s1 = await snap.createSnapshot(vol, { store: a, blockSize: BS });
  const seen: { state: string; progress: number }[] = [];
  const c = await snap.copySnapshot(s1.id, withFaults({ store: a, toStore: b }, {
    afterBatch: async () => {
      await new Promise((r) => setTimeout(r, 600)); // past the progress write throttle
      const listed = JSON.parse(ds(['snapshot', 'list', '--store', b, '--json']).out).snapshots;
      seen.push({ state: listed[0].state, progress: listed[0].progress });
    },
  }));
  t.ok(seen.length >= 2, `${seen.length} batches`);
  t.ok(seen.every((s) => s.state === 'pending'), 'pending while it runs (seen from another process)');
  t.ok(seen.some((s) => s.progress > 0 && s.progress < 100), `with progress: ${seen.map((s) => s.progress).join(', ')}`);
  t.equal(c.state, 'completed');

  // Damage one object of the source: the copy stops, the destination's copy is `error`.
  const obj = (await be.keys(a, 'blocks/'))[7];
  await be.flip(a, obj, 12345);
  const e = await be.store('e');
  const r = ds(['snapshot', 'copy', s1.id, '--store', a, '--to-store', e, '--json']);
  t.equal(r.status, 1, 'a damaged source is an error');
  t.match(r.stderr, /does not match its digest.*ECORRUPT/);
  const listed = JSON.parse(ds(['snapshot', 'list', '--store', e, '--json']).out).snapshots;
  t.same(listed.map((s: { state: string }) => s.state), ['error'], 'the copy is marked error, never completed');
  t.equal(ds(['store', 'gc', '--store', e]).status, 0, 'gc clears what it had written');
  t.equal(await blocksOf(be, e), 0);

  const other = await be.store('other');
  ds(['store', 'init', '--store', other, '--block-size', '128K']);
  const bad = ds(['snapshot', 'copy', c.id, '--store', b, '--to-store', other]);
  t.equal(bad.status, 1);
  t.match(bad.stderr, /block size 131072, snapshot .* has 65536/);
});

/** A backend with only the core methods: what an S3 backend must implement at least. */
function coreOnly(root: string): StoreBackend {
  const d = new DirectoryBackend(root);
  return {
    location: d.location,
    describe: (k) => d.describe(k),
    get: (k, into) => d.get(k, into),
    putIfAbsent: (k, data) => d.putIfAbsent(k, data),
    put: (k, data) => d.put(k, data),
    list: (p) => d.list(p),
    delete: (k) => d.delete(k),
  };
}

// Directory-only: the core-only backend wraps the directory backend (setBackendFactory
// replaces whatever a store URL names), and the S3 backend is itself a core backend plus
// stat and open, which the [s3] runs above exercise.
t.test('snapshot logic needs only the core backend: create, incremental, copy (encrypting), restore, verify, delete, gc', async (t) => {
  setBackendFactory(coreOnly);
  t.teardown(() => setBackendFactory(undefined));
  const dir = t.testdir();
  const a = path.join(dir, 'a');
  const b = path.join(dir, 'b');
  const vol = path.join(dir, 'vol.img');
  const key = keyFile(dir, 'k');
  volume(vol);
  const s1 = await snap.createSnapshot(vol, { store: a, blockSize: BS });
  applyWrites(vol, change);
  const s2 = await snap.createSnapshot(vol, { store: a });
  t.equal(s2.stats.blocksAdded, touched(change, BS).length);
  const c1 = await snap.copySnapshot(s1.id, { store: a, toStore: b, encrypt: true, key: { keyFile: key } });
  const c2 = await snap.copySnapshot(s2.id, { store: a, toStore: b, encrypt: true, key: { keyFile: key } });
  t.equal(c2.stats.blocksAdded, touched(change, BS).length);
  const out = path.join(dir, 'out.img');
  await snap.restoreSnapshot(c2.id, { store: b, to: out, key: { keyFile: key } });
  t.equal(sha(out), sha(vol));
  t.ok((await snap.verifySnapshot(c1.id, { store: b, key: { keyFile: key } })).ok);
  await snap.deleteSnapshot(c1.id, { store: b });
  const g = await snap.gc({ store: b });
  t.ok(g.blocksFreed > 0);
  t.ok((await snap.verifySnapshot(c2.id, { store: b, key: { keyFile: key } })).ok, 'still whole after gc');
});
