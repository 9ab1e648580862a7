/**
 * Storage snapshots on an S3 store (a real Ceph RADOS Gateway), side by side with the
 * directory store: one suite, two backends. Full and incremental snapshots, diff, restore,
 * verify, delete and gc; encrypted volumes; copies directory -> S3, S3 -> directory and
 * S3 -> another bucket; the CLI with `--store s3://...` and DISKSNAP_STORE; one-line errors
 * for a bucket that is missing or is not a store.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import * as snap from '../src/storage';
import { Store } from '../src/storage/store/store';
import { KiB, MiB, Write, applyWrites, ds, makeImage, sha, touched } from '../fixtures/store/helpers';
import { ceph, cephMissing, newBucket } from './helpers/ceph';

const skip = cephMissing();
const BS = 64 * KiB;
const MARKER = 'S3-SUITE-MARKER-7f3a';

const base: Write[] = [
  { offset: 0, length: 3 * MiB, seed: 1 },
  { offset: 10 * MiB - 100, length: 200, seed: 2 },
  { offset: 20 * MiB + 5000, length: 2 * MiB + 333, seed: 3 },
  { offset: 32 * MiB - 4096, length: 4096, seed: 4 },
];
const change: Write[] = [
  { offset: 64 * KiB - 2048, length: 4096, seed: 10 },
  { offset: 30 * MiB, length: 1, seed: 11 },
  { offset: 21 * MiB, length: 300 * KiB, seed: 12 },
];

type Kind = 'directory' | 's3';

/** Runs `body` once with a directory store and once with a store in a fresh bucket. */
function bothBackends(name: string, body: (t: Tap.Test, store: (label: string) => Promise<string>, kind: Kind) => Promise<void>): void {
  t.test(`${name} [directory]`, async (t) => {
    const dir = t.testdir();
    await body(t, async (label) => path.join(dir, label), 'directory');
  });
  t.test(`${name} [s3]`, { skip }, async (t) => {
    await ceph();
    await body(t, (label) => newBucket(label, 'stores/' + label), 's3');
  });
}

/** Keys and sizes of every object of a store, through its backend. */
async function objects(store: string, under: string): Promise<Map<string, number>> {
  const s = await Store.open(store);
  const out = new Map<string, number>();
  for await (const o of s.backend.list(under)) if (!o.temporary) out.set(o.key, o.size);
  return out;
}

function keyFile(dir: string, name: string): string {
  const p = path.join(dir, name);
  fs.writeFileSync(p, randomBytes(32), { mode: 0o600 });
  return p;
}

bothBackends('full then incremental: only changed blocks added, diff lists them, each restores byte-exact, delete + gc frees and keeps what is live', async (t, storeFor) => {
  const dir = t.testdir();
  const store = await storeFor('inc');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 32 * MiB, base);
  const v1 = sha(vol);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS, name: 'base', tags: { env: 'ci' } });
  t.equal(s1.state, 'completed');
  t.equal(s1.stats.blocksAdded, touched(base, BS).length);
  const blocks1 = await objects(store, 'blocks/');
  t.equal(blocks1.size, touched(base, BS).length, 'the store holds exactly the data blocks');
  t.equal([...blocks1.values()].reduce((a, b) => a + b, 0), s1.stats.bytesAdded);

  applyWrites(vol, change);
  const v2 = sha(vol);
  const s2 = await snap.createSnapshot(vol, { store, name: 'second' });
  t.equal(s2.parentId, s1.id);
  const changed = touched(change, BS);
  t.equal(s2.stats.blocksAdded, changed.length, 'incremental: only the changed blocks');
  t.same((await snap.diffSnapshots(s1.id, s2.id, { store })).changedBlocks, changed);
  t.same((await snap.listSnapshots({ store })).snapshots.map((s) => s.name), ['base', 'second']);
  t.equal((await snap.showSnapshot('base', { store })).id, s1.id);
  t.ok((await snap.verifySnapshot(s1.id, { store })).ok);

  const out1 = path.join(dir, 'r1.img');
  const out2 = path.join(dir, 'r2.img');
  await snap.restoreSnapshot(s1.id, { store, to: out1 });
  await snap.restoreSnapshot(s2.id, { store, to: out2 });
  t.equal(sha(out1), v1, 'first restores byte-exact');
  t.equal(sha(out2), v2, 'second restores byte-exact');
  t.ok(fs.statSync(out2).blocks * 512 < 12 * MiB, 'restored sparse');

  // In place: back to the first moment.
  await snap.restoreSnapshot(s1.id, { store, inPlace: vol });
  t.equal(sha(vol), v1, 'in-place restore rolls the volume back');

  await snap.deleteSnapshot(s1.id, { store });
  const g = await snap.gc({ store });
  t.ok(g.blocksFreed > 0, `gc freed ${g.blocksFreed} blocks only s1 had`);
  t.equal(g.liveSnapshots, 1);
  const out3 = path.join(dir, 'r3.img');
  await snap.restoreSnapshot(s2.id, { store, to: out3 });
  t.equal(sha(out3), v2, 'the survivor restores after gc');
  t.ok((await snap.verifySnapshot(s2.id, { store })).ok);
});

bothBackends('an encrypted volume: no object holds the marker, restores with the key, refused without it', async (t, storeFor) => {
  const dir = t.testdir();
  const store = await storeFor('enc');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 8 * MiB, [{ offset: 0, length: 2 * MiB, seed: 5 }]);
  const fd = fs.openSync(vol, 'r+');
  fs.writeSync(fd, Buffer.from(MARKER), 0, MARKER.length, 4096);
  fs.closeSync(fd);
  const key = keyFile(dir, 'k');
  await snap.registerVolume(vol, { store, blockSize: BS, encrypted: true, key: { keyFile: key } });
  const s1 = await snap.createSnapshot(vol, { store, key: { keyFile: key }, name: `n ${MARKER}`, tags: { t: MARKER } });
  t.equal(s1.encrypted, true);
  const s = await Store.open(store);
  let scanned = 0;
  for (const under of ['blocks/', 'snapshots/', 'volumes/', 'keys/']) {
    for (const k of (await objects(store, under)).keys()) {
      scanned++;
      t.notOk((await s.backend.get(k)).includes(MARKER), `${k} does not hold the marker`);
    }
  }
  t.ok(scanned > 5);
  const out = path.join(dir, 'out.img');
  await snap.restoreSnapshot(s1.id, { store, to: out, key: { keyFile: key } });
  t.equal(sha(out), sha(vol));
  await t.rejects(snap.restoreSnapshot(s1.id, { store, to: path.join(dir, 'nokey.img') }), { code: 'ENOKEY' });
  await t.rejects(snap.restoreSnapshot(s1.id, { store, to: path.join(dir, 'wrong.img'), key: { keyFile: keyFile(dir, 'k2') } }));
  t.notOk(fs.existsSync(path.join(dir, 'wrong.img')), 'no partial output');
});

t.test('copies in every direction: directory -> S3 -> another bucket -> directory, incremental, byte-exact', { skip }, async (t) => {
  await ceph();
  const dir = t.testdir();
  const local = path.join(dir, 'local');
  const b1 = await newBucket('copy-a');
  const b2 = await newBucket('copy-b', 'dr/site');
  const back = path.join(dir, 'back');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 16 * MiB, [{ offset: 0, length: 6 * MiB, seed: 21 }, { offset: 9 * MiB, length: 1 * MiB, seed: 22 }]);
  const v1 = sha(vol);
  const s1 = await snap.createSnapshot(vol, { store: local, blockSize: BS });
  const c1 = await snap.copySnapshot(s1.id, { store: local, toStore: b1 });
  const d1 = await snap.copySnapshot(c1.id, { store: b1, toStore: b2 });
  const e1 = await snap.copySnapshot(d1.id, { store: b2, toStore: back });
  t.equal(c1.stats.blocksAdded, s1.stats.dataBlocks);
  for (const [st, id] of [[b1, c1.id], [b2, d1.id], [back, e1.id]] as const) {
    const out = path.join(dir, `r-${id}.img`);
    await snap.restoreSnapshot(id, { store: st, to: out });
    t.equal(sha(out), v1, `${st}: byte-exact`);
  }
  applyWrites(vol, [{ offset: 100, length: 10, seed: 23 }]);
  const v2 = sha(vol);
  const s2 = await snap.createSnapshot(vol, { store: local });
  const c2 = await snap.copySnapshot(s2.id, { store: local, toStore: b1 });
  const d2 = await snap.copySnapshot(c2.id, { store: b1, toStore: b2 });
  const e2 = await snap.copySnapshot(d2.id, { store: b2, toStore: back });
  for (const c of [c2, d2, e2]) t.equal(c.stats.blocksAdded, 1, 'incremental copy: one changed block');
  const out = path.join(dir, 'r2.img');
  await snap.restoreSnapshot(e2.id, { store: back, to: out });
  t.equal(sha(out), v2);
  const key = keyFile(dir, 'ck');
  const enc = await snap.copySnapshot(s2.id, { store: local, toStore: b1, encrypt: true, key: { keyFile: key } });
  t.equal(enc.encrypted, true);
  const out4 = path.join(dir, 'r4.img');
  await snap.restoreSnapshot(enc.id, { store: b1, to: out4, key: { keyFile: key } });
  t.equal(sha(out4), v2, 'encrypted by copying into S3');
});

t.test('CLI: --store s3://... and DISKSNAP_STORE; errors name the problem in one line', { skip }, async (t) => {
  const s3 = await ceph();
  const dir = t.testdir();
  const url = await newBucket('cli', 'team/store');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 4 * MiB, [{ offset: 0, length: 1 * MiB, seed: 31 }]);
  const env = { ...s3.env };
  const c = ds(['snapshot', 'create', vol, '--store', url, '--block-size', '64K', '--json'], env);
  t.equal(c.status, 0, c.stderr);
  const rec = JSON.parse(c.out);
  t.equal(rec.state, 'completed');
  const l = ds(['snapshot', 'list', '--json'], { ...env, DISKSNAP_STORE: url });
  t.equal(l.status, 0, l.stderr);
  t.same(JSON.parse(l.out).snapshots.map((s: { id: string }) => s.id), [rec.id]);
  const out = path.join(dir, 'out.img');
  const r = ds(['snapshot', 'restore', rec.id, '--to', out], { ...env, DISKSNAP_STORE: url });
  t.equal(r.status, 0, r.stderr);
  t.equal(sha(out), sha(vol));
  const gc = ds(['store', 'gc', '--json'], { ...env, DISKSNAP_STORE: url });
  t.equal(gc.status, 0, gc.stderr);

  const missing = ds(['snapshot', 'list', '--store', `s3://nosuch-${randomBytes(4).toString('hex')}`], env);
  t.equal(missing.status, 1);
  t.match(missing.stderr, /S3 bucket 'nosuch-[0-9a-f]+' does not exist at http:\/\/127\.0\.0\.1:\d+/);
  t.equal(missing.stderr.trim().split('\n').length, 1, 'one line');
  const foreign = await newBucket('foreign');
  const { S3Backend } = await import('../src/storage/store/s3');
  const fb = new S3Backend(foreign);
  await fb.put('holiday/photo.jpg', Buffer.from('not a store'));
  fb.destroy();
  const nf = ds(['snapshot', 'create', vol, '--store', foreign], env);
  t.equal(nf.status, 1);
  t.match(nf.stderr, /s3:\/\/foreign-[0-9a-f]+ is not a disksnap store: it holds objects but no store\.json/);
  const empty = ds(['snapshot', 'list', '--store', await newBucket('empty')], env);
  t.equal(empty.status, 1);
  t.match(empty.stderr, /no snapshot store at s3:\/\/empty-/);
  const creds = ds(['snapshot', 'list', '--store', url], { ...env, AWS_SECRET_ACCESS_KEY: 'wrong' });
  t.equal(creds.status, 1);
  t.match(creds.stderr, /rejected the credentials \(SignatureDoesNotMatch\)|refused access to bucket/);
  t.equal(creds.stderr.trim().split('\n').length, 1, 'one line');
});
