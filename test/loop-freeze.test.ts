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
import { attach, detach, assertNotAttached } from '../src/host/attach';
import { findMount, withFrozen, pointInTime, snapshotFreezeHook, canReflink, cloneWhileFrozen } from '../src/host';
import { createSnapshot, restoreSnapshot } from '../src/storage';
import { withFaults } from '../src/storage/faults';
import { ROOT, cli } from './helpers/cli';

const skip = needLoop(['mkfs.ext4', 'e2fsck', 'debugfs']);
const skipXfs = skip || needLoop(['mkfs.xfs']);

function writeFiles(dir: string, prefix: string, n: number): void {
  for (let i = 0; i < n; i++) fs.writeFileSync(path.join(dir, `${prefix}${i}.txt`), `${prefix} file ${i}\n`.repeat(500));
}

/** An ext4 filesystem made in `vol`, attached to a loop device and mounted on s.dir/mnt. */
async function mountedExt4(s: ReturnType<typeof scratch>, vol: string, size: string): Promise<{ a: Awaited<ReturnType<typeof attach>>; mp: string }> {
  makeExt4(vol, size);
  const a = await attach(vol);
  s.attached(a.device);
  const mp = path.join(s.dir, 'mnt');
  s.mount(a.device, mp);
  return { a, mp };
}

t.test('ext4 volume: snapshot while mounted (frozen), write more, restore in place after detach', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const vol = path.join(s.dir, 'vol.img');
  const store = path.join(s.dir, 'store');
  const { a, mp } = await mountedExt4(s, vol, '64M');
  writeFiles(mp, 'first', 20);
  t.equal(findMount(vol), mp);

  const frozenAt: string[] = [];
  const hook = snapshotFreezeHook();
  const snap = await createSnapshot(vol, withFaults({ store, name: 'while-mounted' }, {
    freeze: async (p) => {
      const thaw = await hook(p);
      frozenAt.push(findMount(p) ?? '');
      t.notOk(await writeWithTimeout(path.join(mp, 'probe'), 'x', 1000), 'writes block while frozen');
      return thaw;
    },
  }));
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
  const { a, mp } = await mountedExt4(s, vol, '32M');
  writeFiles(mp, 'f', 5);

  await t.rejects(
    createSnapshot(vol, withFaults({ store: path.join(s.dir, 'store') }, {
      freeze: snapshotFreezeHook(),
      afterChunk: () => {
        throw new Error('disk on fire');
      },
    })),
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
  const lib = path.join(ROOT, 'dist', 'src', 'index.js');
  const child = spawn(process.execPath, ['-e', `require(${JSON.stringify(lib)}).loop.freeze(${JSON.stringify(mp)}).then(() => { console.log('frozen'); setInterval(() => {}, 1000); })`], {
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
  const { a, mp } = await mountedExt4(s, vol, '32M');

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

// ---------------------------------------------------------------------------------------------
// `snapshot create` picks the point-in-time view by itself (src/host/point-in-time.ts): no hook.

function hostFs(dir: string): string {
  return sh('findmnt', ['-n', '-o', 'FSTYPE', '--target', dir]).stdout.trim();
}

t.test('snapshot create of a mounted ext4 volume freezes it by itself for the read; consistency recorded; restores clean', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const vol = path.join(s.dir, 'vol.img');
  const store = path.join(s.dir, 'store');
  const { a, mp } = await mountedExt4(s, vol, '64M');
  writeFiles(mp, 'first', 20);
  const reflinks = ['xfs', 'btrfs'].includes(hostFs(s.dir));

  let blockedWhileReading: boolean | undefined;
  const snap = await createSnapshot(vol, withFaults({ store, name: 'auto' }, {
    afterChunk: async (_attempt, chunk) => {
      if (chunk === 0) blockedWhileReading = !(await writeWithTimeout(path.join(mp, 'probe'), 'x', 500));
    },
  }));
  t.equal(snap.state, 'completed');
  t.equal(snap.volumePath, vol, 'the snapshot is of the volume');
  if (reflinks) {
    t.equal(snap.consistency, 'frozen-clone', `the host is ${hostFs(s.dir)}: a clone was read`);
  } else {
    t.equal(snap.consistency, 'frozen', `no reflink on ${hostFs(s.dir)}: frozen while it was read`);
    t.equal(blockedWhileReading, true, 'writes to the volume wait while it is read');
    t.ok(snap.frozenMs !== null && snap.frozenMs > 0, `frozen for ${snap.frozenMs} ms`);
  }
  t.ok(await writeWithTimeout(path.join(mp, 'after'), 'x'), 'thawed when the snapshot is done');
  writeFiles(mp, 'later', 5);

  // The CLI: JSON and `snapshot show` carry the consistency; --no-freeze is crash-consistent.
  const shown = cli(['snapshot', 'show', snap.id, '--store', store, '--json']);
  t.equal(JSON.parse(shown.out).consistency, snap.consistency);
  t.match(cli(['snapshot', 'show', snap.id, '--store', store]).out, new RegExp(`consistency\\s+${snap.consistency}`));
  // The files just written are flushed first: a live read that the kernel's writeback of
  // them (a journal commit comes every 5 s) moves twice ends EBUSY by design, which is not
  // what this checks (seen once in a full run on a loaded machine).
  sh('sync', ['-f', mp]);
  const nf = cli(['snapshot', 'create', vol, '--store', store, '--no-freeze', '--json']);
  t.equal(nf.status, 0, nf.stderr);
  t.equal(JSON.parse(nf.out).consistency, 'crash-consistent', '--no-freeze on a mounted volume');
  t.equal(JSON.parse(nf.out).frozenMs, null);
  const viaCli = cli(['snapshot', 'create', vol, '--store', store, '--json']);
  t.equal(viaCli.status, 0, viaCli.stderr);
  t.equal(JSON.parse(viaCli.out).consistency, reflinks ? 'frozen-clone' : 'frozen', 'the CLI freezes too');

  // A store inside the volume's own filesystem would deadlock on the freeze: refused first.
  const inside = cli(['snapshot', 'create', vol, '--store', path.join(mp, 'store')]);
  t.equal(inside.status, 1);
  t.match(inside.stderr, /inside the filesystem .* which the snapshot would freeze/);
  t.ok(await writeWithTimeout(path.join(mp, 'after-refusal'), 'x'), 'nothing was left frozen by the refusal');

  // The frozen snapshot restores to a clean filesystem holding the files written before it.
  const restored = path.join(s.dir, 'restored.img');
  await restoreSnapshot(snap.id, { store, to: restored });
  const fsck = e2fsckClean(restored);
  t.ok(fsck.ok, `e2fsck -fn of the restored image is clean:\n${fsck.out}`);
  const names = debugfsLs(restored);
  t.ok(names.includes('first0.txt') && names.includes('first19.txt'), 'the files written before the snapshot');
  t.equal(debugfsCat(restored, '/first11.txt'), 'first file 11\n'.repeat(500));
  t.notOk(names.some((n) => n.startsWith('later')), 'and none written after it');

  // The loop device itself as the volume: frozen through the device's mountpoint.
  const dev = await createSnapshot(a.device, { store: path.join(s.dir, 'store-dev') });
  t.equal(dev.consistency, 'frozen', 'a /dev/loopN with a mounted filesystem is frozen for the read');
  t.equal(dev.volumePath, a.device);
  t.ok(await writeWithTimeout(path.join(mp, 'after-dev'), 'x'), 'and thawed');
  s.umount(mp);
  const idle = await createSnapshot(vol, { store });
  t.equal(idle.consistency, 'not-mounted', 'attached but not mounted: read as it is');
});

t.test('a failure in the middle of an automatic snapshot (frozen, or a clone) thaws and leaves no clone', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const vol = path.join(s.dir, 'vol.img');
  const { a, mp } = await mountedExt4(s, vol, '32M');
  writeFiles(mp, 'f', 5);
  const store = path.join(s.dir, 'store');
  await t.rejects(
    createSnapshot(vol, withFaults({ store }, {
      afterChunk: () => {
        throw new Error('disk on fire');
      },
    })),
    { message: 'disk on fire' },
  );
  t.ok(await writeWithTimeout(path.join(mp, 'w1'), 'x'), 'writable after the snapshot failed mid-read');
  const clones = fs.readdirSync(s.dir).filter((n) => n.includes('disksnap-pit'));
  t.same(clones, [], 'no clone left beside the volume');
  const listed = JSON.parse(cli(['snapshot', 'list', '--store', store, '--json']).out).snapshots;
  t.equal(listed[0].state, 'error', 'the snapshot is marked error');
});

/** An xfs filesystem in a 300 MiB image file, loop-mounted: the volume's host, with reflinks. */
function xfsHost(s: ReturnType<typeof scratch>): string {
  const host = path.join(s.dir, 'xfs.img');
  fs.writeFileSync(host, '');
  fs.truncateSync(host, 300 << 20);
  const mk = sh('mkfs.xfs', ['-q', '-m', 'reflink=1', host]);
  if (mk.status !== 0) throw new Error(`mkfs.xfs: ${mk.stderr}`);
  const hostMp = path.join(s.dir, 'xfs');
  s.mount(host, hostMp, ['-o', 'loop']);
  return hostMp;
}

/** A child process that snapshots `vol` through the library and stops after its first chunk. */
function stuckSnapshot(vol: string, store: string): Promise<ReturnType<typeof spawn>> {
  const lib = path.join(ROOT, 'dist', 'src', 'storage', 'index.js');
  const script = `require(${JSON.stringify(lib)}).createSnapshot(${JSON.stringify(vol)}, { store: ${JSON.stringify(store)},
    faults: { afterChunk: () => { console.log('reading'); return new Promise(() => setInterval(() => {}, 1000)); } } })`;
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    child.stdout!.once('data', () => resolve(child));
    child.once('exit', (code) => reject(new Error(`child exited ${code} before reading`)));
  });
}

t.test('volume on a loop-mounted xfs: snapshot create clones while frozen, reads the clone, removes it on every path', { skip: skipXfs }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const hostMp = xfsHost(s);
  const vol = path.join(hostMp, 'vol.img');
  const { a, mp } = await mountedExt4(s, vol, '64M');
  writeFiles(mp, 'first', 10);
  const store = path.join(s.dir, 'store');
  const clonesLeft = () => fs.readdirSync(hostMp).filter((n) => n.includes('disksnap-pit'));

  let writableWhileReading: boolean | undefined;
  const snap = await createSnapshot(vol, withFaults({ store }, {
    afterChunk: async (_a, chunk) => {
      if (chunk === 0) {
        t.equal(clonesLeft().length, 1, 'a clone beside the volume while it is read');
        writableWhileReading = await writeWithTimeout(path.join(mp, 'during.txt'), 'during', 5000);
      }
    },
  }));
  t.equal(snap.consistency, 'frozen-clone');
  t.ok(snap.frozenMs !== null && snap.frozenMs < 2000, `frozen only for the clone (${snap.frozenMs} ms)`);
  t.equal(writableWhileReading, true, 'the volume is writable while the clone is read');
  t.equal(snap.volumePath, vol, 'the snapshot belongs to the volume, not to the clone');
  const vols = JSON.parse(cli(['volume', 'list', '--store', store, '--json']).out).volumes;
  t.same(vols.map((v: { path: string }) => v.path), [vol], 'one volume record: the volume');
  t.same(clonesLeft(), [], 'the clone is removed afterwards');
  t.equal(JSON.parse(cli(['snapshot', 'show', snap.id, '--store', store, '--json']).out).consistency, 'frozen-clone');

  const restored = path.join(s.dir, 'restored.img');
  await restoreSnapshot(snap.id, { store, to: restored });
  t.ok(e2fsckClean(restored).ok, 'the restored image is a clean filesystem');
  const names = debugfsLs(restored);
  t.ok(names.includes('first9.txt'), 'with the files written before the snapshot');
  t.notOk(names.includes('during.txt'), 'and not the one written while the clone was read');

  // A failure mid-read: thawed and the clone removed.
  await t.rejects(createSnapshot(vol, withFaults({ store }, { afterChunk: () => Promise.reject(new Error('boom')) })), { message: 'boom' });
  t.same(clonesLeft(), [], 'no clone after a failure');
  t.ok(await writeWithTimeout(path.join(mp, 'after-fail'), 'x'), 'writable after the failure');

  // SIGTERM while the clone is read: the clone goes with the process.
  const child = await stuckSnapshot(vol, store);
  t.equal(clonesLeft().length, 1, 'the child is reading its clone');
  const gone = new Promise((r) => child.once('exit', (_c, sig) => r(sig)));
  child.kill('SIGTERM');
  t.equal(await gone, 'SIGTERM', 'the child died of SIGTERM');
  t.same(clonesLeft(), [], 'SIGTERM removed the clone');

  // SIGKILL cannot be caught: the next snapshot of the volume removes the dead process's clone.
  const killed = await stuckSnapshot(vol, store);
  const died = new Promise((r) => killed.once('exit', r));
  killed.kill('SIGKILL');
  await died;
  t.equal(clonesLeft().length, 1, 'SIGKILL leaves the clone');
  const next = await createSnapshot(vol, { store });
  t.equal(next.consistency, 'frozen-clone');
  t.same(clonesLeft(), [], 'the next snapshot removed the dead process\'s clone');
  t.ok(await writeWithTimeout(path.join(mp, 'end'), 'x'), 'thawed at the end');
});
