/**
 * Secrets and stores that another user could read or change are refused, as ssh refuses
 * them: a key file or a store's tag.key readable by group or others (with the chmod to run),
 * a store or an entry of it owned by another user or writable by others, and any symbolic
 * link inside a store (lock, records, snapshots/, leases/ replaced by links).
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import * as snap from '../src/storage';
import { MiB, ds, makeImage } from '../fixtures/store/helpers';
import { isRoot } from './helpers/tools';

async function setup(dir: string): Promise<{ dir: string; store: string; vol: string; id: string }> {
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 2 * MiB, [{ offset: 0, length: MiB, seed: 9 }]);
  const s = await snap.createSnapshot(vol, { store, blockSize: 64 * 1024 });
  return { dir, store, vol, id: s.id };
}

t.test('a key file that group or others can read is refused, with the chmod to run', async (t) => {
  const { dir, store } = await setup(t.testdir());
  const vol = path.join(dir, 'new.img'); // a volume without plain snapshots yet
  makeImage(vol, MiB, [{ offset: 0, length: 4096, seed: 10 }]);
  const key = path.join(dir, 'k');
  fs.writeFileSync(key, randomBytes(32), { mode: 0o644 });
  fs.chmodSync(key, 0o644);
  await t.rejects(snap.registerVolume(vol, { store, encrypted: true, key: { keyFile: key } }), { code: 'EPERM', message: new RegExp(`can be read by group or others \\(mode 0644\\); run: chmod 600 ${key}`) });
  t.same((await snap.listVolumes({ store })).volumes.filter((v) => v.encrypted), [], 'nothing recorded');
  const r = ds(['volume', 'register', vol, '--store', store, '--encrypted', '--key-file', key]);
  t.equal(r.status, 1);
  t.match(r.stderr, /chmod 600/);
  fs.chmodSync(key, 0o600);
  t.equal((await snap.registerVolume(vol, { store, encrypted: true, key: { keyFile: key } })).encrypted, true, 'after the chmod it is taken');
});

t.test("a store's tag.key that group or others can read is refused", async (t) => {
  const { store, vol } = await setup(t.testdir());
  fs.chmodSync(path.join(store, 'tag.key'), 0o640);
  await t.rejects(snap.createSnapshot(vol, { store }), { code: 'EPERM', message: /tag\.key .*can be read by group or others \(mode 0640\); run: chmod 600/ });
  fs.chmodSync(path.join(store, 'tag.key'), 0o600);
  t.equal((await snap.createSnapshot(vol, { store })).state, 'completed');
});

t.test('a store writable by others, or with a link or a foreign entry inside, is refused', async (t) => {
  const { dir, store, vol, id } = await setup(t.testdir());
  const out = path.join(dir, 'out.img');
  const refused = async (what: string, re: RegExp) => {
    await t.rejects(snap.restoreSnapshot(id, { store, to: out }), { code: 'EPERM', message: re }, what);
    t.notOk(fs.existsSync(out), `${what}: nothing written`);
  };

  fs.chmodSync(store, 0o777);
  await refused('a store writable by others', /store is writable by others \(mode 0777\); run: chmod o-w/);
  fs.chmodSync(store, 0o755);

  const lock = path.join(store, 'lock');
  const elsewhere = path.join(dir, 'elsewhere');
  fs.writeFileSync(elsewhere, 'not a lock');
  fs.rmSync(lock);
  fs.symlinkSync(elsewhere, lock);
  await refused('lock replaced by a link', /lock is a symbolic link inside a store/);
  fs.rmSync(lock);

  const rec = path.join(store, 'snapshots', `${id}.json`);
  const moved = path.join(dir, 'rec.json');
  fs.renameSync(rec, moved);
  fs.symlinkSync(moved, rec);
  await refused('a record replaced by a link', /\.json is a symbolic link inside a store/);
  fs.rmSync(rec);
  fs.renameSync(moved, rec);

  const leases = path.join(store, 'leases');
  fs.rmSync(leases, { recursive: true });
  fs.mkdirSync(path.join(dir, 'their-leases'));
  fs.symlinkSync(path.join(dir, 'their-leases'), leases);
  await refused('leases/ replaced by a link', /leases is a symbolic link inside a store/);
  fs.rmSync(leases);
  fs.mkdirSync(leases);

  fs.chmodSync(rec, 0o666);
  await refused('a record writable by others', /\.json in the store is writable by others/);
  fs.chmodSync(rec, 0o644);

  const prefix = path.join(store, 'blocks', fs.readdirSync(path.join(store, 'blocks')).find((n) => !n.startsWith('.'))!);
  const aside = path.join(dir, 'prefix-aside');
  fs.renameSync(prefix, aside);
  fs.symlinkSync(aside, prefix);
  await refused("a prefix directory of blocks/ replaced by a link", /is a symbolic link inside a store/);
  fs.rmSync(prefix);
  fs.renameSync(aside, prefix);

  const snaps = path.join(store, 'snapshots');
  fs.chmodSync(snaps, 0o777);
  await refused('snapshots/ writable by others', /snapshots in the store is writable by others/);
  fs.chmodSync(snaps, 0o755);

  if (isRoot()) {
    fs.chownSync(rec, 65534, 65534);
    await refused("a record owned by another user", /is owned by uid 65534, not by you/);
    fs.chownSync(rec, 0, 0);
    fs.chownSync(store, 65534, 65534);
    await refused('a store owned by another user', /is owned by uid 65534, not by you/);
    fs.chownSync(store, 0, 0);
  }
  const r = await snap.restoreSnapshot(id, { store, to: out });
  t.equal(r.snapshotId, id, 'the store as it should be works again');
  t.equal((await snap.createSnapshot(vol, { store })).state, 'completed');
});

t.test('a temporary file a killed process left in blocks/ (the O_DIRECT probe) does not make the store untrusted', async (t) => {
  const { store, vol } = await setup(t.testdir());
  const left = path.join(store, 'blocks', `.tmp-99999-probe-${randomBytes(4).toString('hex')}`);
  fs.writeFileSync(left, '');
  const s = await snap.createSnapshot(vol, { store });
  t.equal(s.state, 'completed', 'the next snapshot completes');
});
