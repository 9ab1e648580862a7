/**
 * Bad input to the snapshot commands, as a user meets it: each is one clear line on stderr,
 * exit status 1, and nothing is overwritten or left half-written. The full-disk cases use a
 * 4 MiB tmpfs (root only; skipped with the reason otherwise, failed under
 * DISKSNAP_REQUIRE_TOOLS=1).
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { MiB, applyWrites, ds, files, makeImage, sha } from '../fixtures/store/helpers';
import { missing } from './helpers/tools';

/** A store with one volume (a.img) and one completed snapshot of it. */
function setup(dir: string) {
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'a.img');
  makeImage(vol, 8 * MiB, [{ offset: MiB, length: MiB, seed: 1 }]);
  const r = ds(['snapshot', 'create', vol, '--store', store, '--block-size', '64K', '--name', 'a1', '--json']);
  if (r.status !== 0) throw new Error(r.stderr);
  return { store, vol, snap: JSON.parse(r.out) as { id: string } };
}

function oneLineFailure(t: typeof import('tap').default, r: { status: number | null; stderr: string; out: string }, re: RegExp, what: string, status = 1) {
  t.equal(r.status, status, `${what}: exit ${status}`);
  t.match(r.stderr, re, `${what}: says why`);
  t.equal(r.stderr.trim().split('\n').length, 1, `${what}: one line`);
  t.equal(r.out, '', `${what}: nothing on stdout`);
}

t.test('a missing volume, snapshot or store is a clear error', async (t) => {
  const dir = t.testdir();
  const { store } = setup(dir);
  oneLineFailure(t, ds(['snapshot', 'create', path.join(dir, 'nope.img'), '--store', store]), /volume .*nope\.img does not exist/, 'missing volume');
  oneLineFailure(t, ds(['snapshot', 'create', path.join(dir, 'nope.img'), '--store', path.join(dir, 'fresh')]), /does not exist/, 'missing volume, no store yet');
  t.notOk(fs.existsSync(path.join(dir, 'fresh')), 'a mistyped volume does not create a store');
  oneLineFailure(t, ds(['snapshot', 'show', 'snap-0123456789abcdef', '--store', store]), /no snapshot snap-0123456789abcdef in store/, 'missing snapshot');
  oneLineFailure(t, ds(['snapshot', 'restore', 'nosuch', '--to', path.join(dir, 'o.img'), '--store', store]), /no snapshot 'nosuch'/, 'missing snapshot (restore)');
  oneLineFailure(t, ds(['snapshot', 'delete', 'snap-0123456789abcdef', '--store', store]), /no snapshot/, 'missing snapshot (delete)');
  oneLineFailure(t, ds(['snapshot', 'list', '--store', path.join(dir, 'nostore')]), /no snapshot store at/, 'missing store');
  t.notOk(fs.existsSync(path.join(dir, 'nostore')), 'a read-only command does not create a store');
  oneLineFailure(t, ds(['snapshot', 'restore', 'a1', '--store', store]), /exactly one of --to FILE and --in-place VOLUME/, 'no target (bad usage)', 2);
  oneLineFailure(t, ds(['snapshot', 'create', path.join(dir, 'a.img'), '--store', store, '--tag', 'novalue']), /tag 'novalue' must be KEY=VALUE/, 'bad tag');
  oneLineFailure(t, ds(['snapshot', 'create', path.join(dir, 'a.img'), '--store', store, '--block-size', '1M']), /exists with block size 65536/, 'block size of an existing store');
  const r = ds(['snapshot', 'create', '--store', store]);
  t.equal(r.status, 2, 'a missing argument is a usage error');
});

t.test('restore --to refuses an existing file without --force and replaces it with', async (t) => {
  const dir = t.testdir();
  const { store, vol } = setup(dir);
  const out = path.join(dir, 'out.img');
  fs.writeFileSync(out, 'precious');
  oneLineFailure(t, ds(['snapshot', 'restore', 'a1', '--to', out, '--store', store]), /out\.img exists; use --force/, 'existing output');
  t.equal(fs.readFileSync(out, 'utf8'), 'precious', 'untouched');
  const r = ds(['snapshot', 'restore', 'a1', '--to', out, '--store', store, '--force']);
  t.equal(r.status, 0, r.stderr);
  t.equal(sha(out), sha(vol));
  oneLineFailure(t, ds(['snapshot', 'restore', 'a1', '--to', path.join(dir, 'no', 'dir.img'), '--store', store]), /directory .* does not exist/, 'missing directory');
});

t.test("in-place restore refuses another volume's snapshot and a size mismatch, touching nothing", async (t) => {
  const dir = t.testdir();
  const { store, vol } = setup(dir);
  const other = path.join(dir, 'b.img');
  makeImage(other, 8 * MiB, [{ offset: 0, length: MiB, seed: 2 }]);
  const otherSha = sha(other);
  oneLineFailure(t, ds(['snapshot', 'restore', 'a1', '--in-place', other, '--store', store]), /not of .*b\.img.*not registered.*refusing/, 'unregistered other volume');
  t.equal(ds(['volume', 'register', other, '--store', store]).status, 0);
  oneLineFailure(t, ds(['snapshot', 'restore', 'a1', '--in-place', other, '--store', store]), /is of volume vol-.*not of .*b\.img \(vol-/, 'registered other volume');
  t.equal(sha(other), otherSha, 'the other volume is untouched');

  fs.truncateSync(vol, 9 * MiB);
  const grown = sha(vol);
  oneLineFailure(t, ds(['snapshot', 'restore', 'a1', '--in-place', vol, '--store', store]), /is 9437184 bytes, snapshot .* is of 8388608 bytes/, 'size mismatch');
  t.equal(sha(vol), grown, 'untouched');
  oneLineFailure(t, ds(['snapshot', 'restore', 'a1', '--in-place', path.join(dir, 'gone.img'), '--store', store]), /does not exist/, 'missing volume');
});

t.test('a damaged record or manifest is a clear error naming the file; list still shows the rest', async (t) => {
  const dir = t.testdir();
  const { store, vol, snap } = setup(dir);
  applyWrites(vol, [{ offset: 0, length: 10, seed: 3 }]);
  const second = JSON.parse(ds(['snapshot', 'create', vol, '--store', store, '--json']).out) as { id: string };
  fs.writeFileSync(path.join(store, 'snapshots', `${snap.id}.json`), '{"id": "snap-');
  oneLineFailure(t, ds(['snapshot', 'show', snap.id, '--store', store]), new RegExp(`${snap.id}\\.json: not valid JSON`), 'damaged record');
  oneLineFailure(t, ds(['snapshot', 'restore', snap.id, '--to', path.join(dir, 'o.img'), '--store', store]), /not valid JSON/, 'restore of a damaged record');
  t.notOk(fs.existsSync(path.join(dir, 'o.img')));
  const l = ds(['snapshot', 'list', '--store', store, '--json']);
  t.equal(l.status, 1, 'list exits 1 when a record is unreadable');
  t.same(JSON.parse(l.out).snapshots.map((s: { id: string }) => s.id), [second.id], 'and still lists the readable ones');
  t.match(l.stderr, /snapshot record .* is unreadable/);
  // A damaged record can be deleted by its exact id.
  t.equal(ds(['snapshot', 'delete', snap.id, '--store', store]).status, 0);

  const map = path.join(store, 'snapshots', `${second.id}.map`);
  const bytes = fs.readFileSync(map);
  bytes[3] ^= 0xff;
  fs.writeFileSync(map, bytes);
  oneLineFailure(t, ds(['snapshot', 'restore', second.id, '--to', path.join(dir, 'o.img'), '--store', store]), /\.map: manifest magic/, 'damaged manifest');
  t.notOk(fs.existsSync(path.join(dir, 'o.img')));
  const v = ds(['snapshot', 'verify', second.id, '--store', store]);
  t.equal(v.status, 1);
  t.match(v.stderr, /manifest magic/);
  t.match(v.stderr, /is damaged/);
  fs.unlinkSync(map);
  oneLineFailure(t, ds(['snapshot', 'restore', second.id, '--to', path.join(dir, 'o.img'), '--store', store]), /manifest .* of completed snapshot .* is missing/, 'missing manifest');
});

t.test('a flipped byte in a block object fails verify (naming the block) and restore (leaving nothing)', async (t) => {
  const dir = t.testdir();
  const { store } = setup(dir);
  const obj = files(path.join(store, 'blocks'))[0];
  const p = path.join(store, 'blocks', obj);
  const b = fs.readFileSync(p);
  b[b.length - 1] ^= 1;
  fs.writeFileSync(p, b);
  const v = ds(['snapshot', 'verify', 'a1', '--store', store]);
  t.equal(v.status, 1);
  t.match(v.stderr, new RegExp(`block \\d+: object .*${path.basename(obj)} does not match its digest`));
  const vj = ds(['snapshot', 'verify', 'a1', '--store', store, '--json']);
  t.equal(vj.status, 1);
  t.equal(JSON.parse(vj.out).badBlocks.length, 1);
  oneLineFailure(t, ds(['snapshot', 'restore', 'a1', '--to', path.join(dir, 'o.img'), '--store', store]), /block \d+ .*does not match its digest/, 'damaged object');
  t.same(fs.readdirSync(dir).sort(), ['a.img', 'store']);
});

t.test('bad keys and key options are one-line failures (encryption: test/encrypt.test.ts)', async (t) => {
  const dir = t.testdir();
  const { store, vol } = setup(dir);
  const noKey = { ...process.env, DISKSNAP_PASSPHRASE: '' };
  oneLineFailure(t, ds(['volume', 'register', vol, '--store', store, '--encrypted', '--key-file', '/dev/null']), /holds 0 bytes; a key file is exactly 32 random bytes/, 'empty key file');
  oneLineFailure(t, ds(['volume', 'register', vol, '--store', store, '--encrypted', '--key-file', path.join(dir, 'nope')]), /ENOENT/, 'missing key file');
  oneLineFailure(t, ds(['volume', 'register', vol, '--store', store, '--encrypted'], noKey), /needs a key: pass --key-file/, 'no key');
  fs.writeFileSync(path.join(dir, 'k'), Buffer.alloc(32, 7), { mode: 0o600 }); // a private key file: the point here is the missing --encrypted
  oneLineFailure(t, ds(['volume', 'register', vol, '--store', store, '--key-file', path.join(dir, 'k')]), /add --encrypted/, 'a key without --encrypted');
  oneLineFailure(t, ds(['snapshot', 'copy', 'a1', '--store', store, '--to-store', path.join(dir, 'b'), '--encrypt'], noKey), /needs a key/, 'copy --encrypt without a key');
  t.notOk(fs.existsSync(path.join(dir, 'b')), 'and no destination store was made');
});

const noTmpfs = missing({ root: true, commands: ['mount', 'umount'] });

t.test('a full disk: snapshot create and restore fail with ENOSPC, leave no partial output, and earlier snapshots stay good', { skip: noTmpfs }, async (t) => {
  const dir = t.testdir();
  // The mount point lives outside the test directory: tap removes that before teardowns run.
  const small = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-enospc-'));
  const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', small], { encoding: 'utf8' });
  if (m.status !== 0) {
    fs.rmdirSync(small);
    if (process.env.DISKSNAP_REQUIRE_TOOLS === '1') t.fail(`mount tmpfs: ${m.stderr}`);
    else t.skip(`cannot mount tmpfs: ${m.stderr.trim()}`);
    return;
  }
  t.teardown(() => {
    spawnSync('umount', [small]);
    fs.rmdirSync(small);
  });
  // A store on the small filesystem: one snapshot fits, a bigger one does not.
  const store = path.join(small, 'store');
  const vol = path.join(dir, 'v.img');
  makeImage(vol, 16 * MiB, [{ offset: 0, length: MiB, seed: 4 }]);
  let r = ds(['snapshot', 'create', vol, '--store', store, '--block-size', '64K', '--name', 'fits', '--json']);
  t.equal(r.status, 0, r.stderr);
  const fits = JSON.parse(r.out);
  applyWrites(vol, [{ offset: 2 * MiB, length: 6 * MiB, seed: 5 }]);
  r = ds(['snapshot', 'create', vol, '--store', store]);
  t.equal(r.status, 1);
  t.match(r.stderr, /no space left on device/);
  t.equal(r.stderr.trim().split('\n').length, 1);
  const list = JSON.parse(ds(['snapshot', 'list', '--store', store, '--json']).out).snapshots;
  t.same(
    list.filter((s: { state: string }) => s.state === 'completed').map((s: { id: string }) => s.id),
    [fits.id],
    'no completed snapshot came out of the full disk',
  );
  t.notOk(files(store).some((f) => f.endsWith('.map') && !f.includes(fits.id)), 'no manifest of the failed snapshot');
  r = ds(['store', 'gc', '--store', store]);
  t.equal(r.status, 0, r.stderr);
  t.same(files(store).filter((f) => path.basename(f).startsWith('.tmp-')), [], 'no temporary files after gc');
  r = ds(['snapshot', 'verify', 'fits', '--store', store]);
  t.equal(r.status, 0, r.stderr);

  // Restoring a bigger image onto the small filesystem: ENOSPC, and no partial file.
  const bigStore = path.join(dir, 'bigstore');
  r = ds(['snapshot', 'create', vol, '--store', bigStore, '--block-size', '64K', '--name', 'big']);
  t.equal(r.status, 0, r.stderr);
  const out = path.join(small, 'restored.img');
  r = ds(['snapshot', 'restore', 'big', '--to', out, '--store', bigStore]);
  t.equal(r.status, 1);
  t.match(r.stderr, /(no space left|ENOSPC)/i);
  t.notOk(fs.existsSync(out), 'no output');
  t.same(fs.readdirSync(small).filter((f) => f.includes('restored')), [], 'no temporary file either');
});
