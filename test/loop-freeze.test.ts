/**
 * Point-in-time snapshots of mounted volumes: FIFREEZE/FITHAW around the read (ext4 host),
 * a reflink clone while frozen (xfs host), and the thaw on every path — a failure in the
 * middle of the snapshot, SIGTERM, and SIGKILL (the guard process).
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { needLoop, scratch, makeExt4, sh, writeWithTimeout, debugfsCat, debugfsLs, e2fsckClean } from './helpers/loop';
import { attach, detach, assertNotAttached } from '../src/loop/attach';
import { findMount, withFrozen, pointInTime, snapshotFreezeHook, canReflink, cloneWhileFrozen } from '../src/loop/freeze';
import { createSnapshot, restoreSnapshot } from '../src/snapshot';
import { ROOT } from './helpers/cli';

const skip = needLoop(['mkfs.ext4', 'e2fsck', 'debugfs']);
const skipXfs = skip || needLoop(['mkfs.xfs']);

function writeFiles(dir: string, prefix: string, n: number): void {
  for (let i = 0; i < n; i++) fs.writeFileSync(path.join(dir, `${prefix}${i}.txt`), `${prefix} file ${i}\n`.repeat(500));
}

t.test('ext4 volume: snapshot while mounted (frozen), write more, restore in place after detach', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const vol = path.join(s.dir, 'vol.img');
  const store = path.join(s.dir, 'store');
  makeExt4(vol, '64M');
  const a = await attach(vol);
  s.attached(a.device);
  const mp = path.join(s.dir, 'mnt');
  s.mount(a.device, mp);
  writeFiles(mp, 'first', 20);
  t.equal(findMount(vol), mp);

  const frozenAt: string[] = [];
  const hook = snapshotFreezeHook();
  const snap = await createSnapshot(vol, {
    store,
    name: 'while-mounted',
    freeze: async (p) => {
      const thaw = await hook(p);
      frozenAt.push(findMount(p) ?? '');
      t.notOk(await writeWithTimeout(path.join(mp, 'probe'), 'x', 1000), 'writes block while frozen');
      return thaw;
    },
  });
  t.equal(snap.state, 'completed');
  t.same(frozenAt, [mp], 'frozen once, on the volume mountpoint');
  t.ok(await writeWithTimeout(path.join(mp, 'after-thaw'), 'x'), 'writable again after the snapshot');

  writeFiles(mp, 'later', 10);
  await t.rejects(restoreSnapshot(snap.id, { store, inPlace: vol }), { code: /EBUSY|ELOCKED/ }, 'in-place restore refused while attached');
  s.umount(mp);
  await detach(a.device);

  t.ok(debugfsCat(vol, '/later3.txt'), 'the later files are there before the restore');
  const rep = await restoreSnapshot(snap.id, { store, inPlace: vol });
  t.ok(rep.blocksWritten > 0);
  const fsck = e2fsckClean(vol);
  t.ok(fsck.ok, `e2fsck -fn clean after restore:\n${fsck.out}`);
  const names = debugfsLs(vol);
  t.ok(names.includes('first0.txt') && names.includes('first19.txt'), 'the first files are present');
  t.equal(debugfsCat(vol, '/first7.txt'), 'first file 7\n'.repeat(500));
  t.notOk(names.some((n) => n.startsWith('later')), 'the later files are gone');
});

t.test('a failure in the middle of a snapshot leaves the filesystem thawed', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const vol = path.join(s.dir, 'vol.img');
  makeExt4(vol, '32M');
  const a = await attach(vol);
  s.attached(a.device);
  const mp = path.join(s.dir, 'mnt');
  s.mount(a.device, mp);
  writeFiles(mp, 'f', 5);

  await t.rejects(
    createSnapshot(vol, {
      store: path.join(s.dir, 'store'),
      freeze: snapshotFreezeHook(),
      afterChunk: () => {
        throw new Error('disk on fire');
      },
    }),
    { message: 'disk on fire' },
  );
  t.ok(await writeWithTimeout(path.join(mp, 'w1'), 'x'), 'writable after the snapshot failed mid-read');

  await t.rejects(
    withFrozen(mp, async () => {
      await new Promise((r) => setTimeout(r, 10));
      throw new Error('inside the freeze');
    }),
    { message: 'inside the freeze' },
  );
  t.ok(await writeWithTimeout(path.join(mp, 'w2'), 'x'), 'writable after fn rejected inside withFrozen');
  await t.rejects(withFrozen(path.join(s.dir, 'nope'), () => 1), { code: 'ENOENT' }, 'a bad mountpoint is an error, nothing frozen');
});

/** A child process that freezes `mp` with the library and then waits to be killed. */
function frozenChild(mp: string): Promise<ReturnType<typeof spawn>> {
  const lib = path.join(ROOT, 'dist', 'src', 'loop', 'freeze.js');
  const child = spawn(process.execPath, ['-e', `require(${JSON.stringify(lib)}).freeze(${JSON.stringify(mp)}).then(() => { console.log('frozen'); setInterval(() => {}, 1000); })`], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  return new Promise((resolve, reject) => {
    child.stdout!.once('data', () => resolve(child));
    child.once('exit', (code) => reject(new Error(`child exited ${code} before freezing`)));
  });
}

t.test('SIGTERM and SIGKILL of a process holding a freeze leave the filesystem thawed', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const vol = path.join(s.dir, 'vol.img');
  makeExt4(vol, '32M');
  const a = await attach(vol);
  s.attached(a.device);
  const mp = path.join(s.dir, 'mnt');
  s.mount(a.device, mp);

  for (const signal of ['SIGTERM', 'SIGINT', 'SIGKILL'] as const) {
    const child = await frozenChild(mp);
    t.notOk(await writeWithTimeout(path.join(mp, 'probe'), 'x', 500), `frozen by the child (${signal})`);
    const exited = new Promise<NodeJS.Signals | null>((r) => child.once('exit', (_code, sig) => r(sig)));
    child.kill(signal);
    t.equal(await exited, signal, `the child died of ${signal} (re-raised after the thaw)`);
    t.ok(await writeWithTimeout(path.join(mp, `after-${signal}`), 'x', 5000), `thawed after ${signal}`);
  }
});

t.test('xfs-backed volume: reflink clone while frozen, snapshot read from the clone', { skip: skipXfs }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  // the volume's own filesystem: xfs (reflink is on by default in mkfs.xfs >= 5.1)
  const host = path.join(s.dir, 'host.img');
  fs.writeFileSync(host, '');
  fs.truncateSync(host, 512 << 20);
  const mk = sh('mkfs.xfs', ['-q', '-m', 'reflink=1', host]);
  t.equal(mk.status, 0, mk.stderr);
  const h = await attach(host);
  s.attached(h.device);
  const hostMp = path.join(s.dir, 'xfs');
  s.mount(h.device, hostMp);

  const vol = path.join(hostMp, 'vol.img');
  makeExt4(vol, '64M');
  t.ok(canReflink(vol), 'xfs shares extents');
  const a = await attach(vol);
  s.attached(a.device);
  const mp = path.join(s.dir, 'mnt');
  s.mount(a.device, mp);
  writeFiles(mp, 'first', 10);

  const view = await pointInTime(vol);
  t.equal(view.consistency, 'frozen-clone');
  t.not(view.path, vol, 'a clone beside the volume');
  t.equal(path.dirname(view.path), hostMp);
  t.ok(view.frozenMs !== undefined && view.frozenMs < 2000, `frozen only for the clone (${view.frozenMs?.toFixed(1)} ms)`);
  t.ok(await writeWithTimeout(path.join(mp, 'later.txt'), 'later'), 'thawed as soon as the clone exists');
  writeFiles(mp, 'later', 3);

  // the clone is the volume at the moment of the freeze: a clean filesystem with the first files
  const fsck = e2fsckClean(view.path);
  t.ok(fsck.ok, `the clone is a clean filesystem:\n${fsck.out}`);
  t.equal(debugfsCat(view.path, '/first4.txt'), 'first file 4\n'.repeat(500));
  t.notOk(debugfsLs(view.path).includes('later.txt'), 'and nothing written after it');

  // a storage snapshot of the clone restores to that moment
  const store = path.join(s.dir, 'store');
  const snap = await createSnapshot(view.path, { store });
  await view.release();
  t.notOk(fs.existsSync(view.path), 'release removes the clone');
  const restored = path.join(s.dir, 'restored.img');
  await restoreSnapshot(snap.id, { store, to: restored });
  t.ok(e2fsckClean(restored).ok, 'the restored volume is clean');
  t.ok(debugfsLs(restored).includes('first9.txt'));

  const noFreeze = await pointInTime(vol, { noFreeze: true });
  t.equal(noFreeze.consistency, 'crash-consistent', '--no-freeze: a crash-consistent clone');
  await noFreeze.release();

  const direct = await cloneWhileFrozen(vol, path.join(hostMp, 'copy.img'));
  t.ok(direct.cloned);
  t.throws(() => assertNotAttached(vol, 'restore it in place'), { code: 'EBUSY' });
});

t.test('pointInTime: an unmounted volume is read as is; ext4 without reflink stays frozen until release', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const vol = path.join(s.dir, 'vol.img');
  makeExt4(vol, '32M');
  const idle = await pointInTime(vol);
  t.match(idle, { path: vol, consistency: 'not-mounted' });
  await idle.release();

  const a = await attach(vol);
  s.attached(a.device);
  const mp = path.join(s.dir, 'mnt');
  s.mount(a.device, mp);
  const root = sh('findmnt', ['-n', '-o', 'FSTYPE', '--target', s.dir]).stdout.trim();
  const view = await pointInTime(vol);
  if (root === 'xfs' || root === 'btrfs') {
    t.equal(view.consistency, 'frozen-clone');
  } else {
    t.equal(view.consistency, 'frozen', `no reflink on ${root || 'this filesystem'}: read while frozen`);
    t.equal(view.path, vol);
    t.notOk(await writeWithTimeout(path.join(mp, 'probe'), 'x', 500), 'frozen until release');
  }
  await view.release();
  await view.release(); // idempotent
  t.ok(await writeWithTimeout(path.join(mp, 'after'), 'x'), 'thawed by release');
  const nf = await pointInTime(vol, { noFreeze: true });
  t.equal(nf.consistency, 'crash-consistent');
  await nf.release();
});
