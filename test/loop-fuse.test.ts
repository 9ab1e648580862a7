/**
 * Differencing children on loop devices, through the FUSE flat view: a filesystem written
 * through an attached child leaves a clean child and an untouched parent; the refusals
 * (parent with children, changed parent); and a FUSE server killed while mounted, which
 * detach still cleans up and `diff check --repair` then repairs.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { cli } from './helpers/cli';
import { needLoop, scratch, makeExt4, sh, shOk, debugfsCat, debugfsLs, e2fsckClean } from './helpers/loop';
import { attach, attachmentOf, assertNotAttached, detach, reapStale } from '../src/host/attach';
import { fuseDir } from '../src/host/state';
import { spawn } from 'node:child_process';
import { ROOT } from './helpers/cli';
import { kernelLoop, mounts, processStartTime } from '../src/host/state';
import { BlockFile } from '../src/engine/file';

const skip = needLoop(['mkfs.ext4', 'e2fsck', 'debugfs', 'qemu-img']);

function md5(file: string): string {
  return createHash('md5').update(fs.readFileSync(file)).digest('hex');
}

function qemuCheck(file: string): { status: number | null; out: string } {
  const r = sh('qemu-img', ['check', file]);
  return { status: r.status, out: r.stdout + r.stderr };
}

function fuseMountsOf(dir: string): string[] {
  return mounts()
    .filter((m) => m.fstype === 'fuse.disksnap' && m.mountpoint.startsWith(dir))
    .map((m) => m.mountpoint);
}

/** An ext4 parent with a few files, made read-only by `diff create` of a child. */
function parentAndChild(dir: string): { parent: string; child: string } {
  const parent = path.join(dir, 'parent.img');
  const child = path.join(dir, 'child.qcow2');
  makeExt4(parent, '64M');
  shOk('debugfs', ['-w', '-R', 'mkdir /base', parent]);
  const src = path.join(dir, 'seed.txt');
  fs.writeFileSync(src, 'from the parent\n'.repeat(1000));
  shOk('debugfs', ['-w', '-R', `write ${src} /base/seed.txt`, parent]);
  const r = cli(['diff', 'create', parent, child]);
  if (r.status !== 0) throw new Error(`diff create failed: ${r.stderr}`);
  return { parent, child };
}

t.test('a raw image through the FUSE view reads and writes the same bytes as the image', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const img = path.join(s.dir, 'raw.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 16 << 20);
  const a = await attach(img, { via: 'fuse' });
  s.attached(a.device);
  t.equal(a.via, 'fuse+loop');
  t.ok(a.fuse?.alive, 'the server runs');
  t.equal(fuseMountsOf(path.dirname(a.fuse!.mountpoint)).includes(a.fuse!.mountpoint), true, 'the FUSE view is mounted');

  // 2 KiB at 63 KiB (crossing 64 KiB) and 1 MiB at 5 MiB + 512, through the block device
  const small = Buffer.alloc(2048, 0xa5);
  const big = Buffer.alloc(1 << 20);
  for (let i = 0; i < big.length; i++) big[i] = (i * 7) & 0xff;
  const fd = fs.openSync(a.device, 'r+');
  fs.writeSync(fd, small, 0, small.length, 63 * 1024);
  fs.writeSync(fd, big, 0, big.length, 5 * 1024 * 1024 + 512);
  fs.fsyncSync(fd);
  const back = Buffer.alloc(big.length);
  fs.readSync(fd, back, 0, back.length, 5 * 1024 * 1024 + 512);
  fs.closeSync(fd);
  t.ok(back.equals(big), 'read back through the device');
  const onDisk = fs.readFileSync(img);
  t.ok(onDisk.subarray(63 * 1024, 65 * 1024).equals(small), 'in the image, at the offset');
  t.ok(onDisk.subarray(5 * 1024 * 1024 + 512, 6 * 1024 * 1024 + 512).equals(big));

  t.throws(() => BlockFile.open(img, { write: true }), { code: 'ELOCKED' }, 'the server holds the image lock');
  const [res] = await detach(a.device);
  t.notOk(res.serverWasDead);
  t.same(fuseMountsOf(path.dirname(a.fuse!.mountpoint)).filter((m) => m === a.fuse!.mountpoint), [], 'view unmounted');
  t.equal(processStartTime(a.fuse!.pid), undefined, 'server exited');
  BlockFile.open(img, { write: true }).close();

  const ro = await attach(img, { via: 'fuse', readOnly: true });
  s.attached(ro.device);
  t.equal(fs.readFileSync(`/sys/block/loop${ro.index}/ro`, 'utf8').trim(), '1');
  t.throws(() => {
    const wfd = fs.openSync(ro.device, 'r+');
    try {
      fs.writeSync(wfd, Buffer.alloc(4096), 0, 4096, 0);
    } finally {
      fs.closeSync(wfd);
    }
  }, 'a read-only device refuses writes');
  await detach(img);
});

t.test('differencing child over an ext4 parent: attach, mount, write, detach; clean child, untouched parent', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const { parent, child } = parentAndChild(s.dir);
  const parentSum = md5(parent);
  const parentMtime = fs.statSync(parent).mtimeMs;

  // the parent has a child: writable attach refused, read-only allowed
  const pr = cli(['attach', parent]);
  t.equal(pr.status, 1);
  t.match(pr.stderr, /is the parent of .*child\.qcow2.*--read-only/);

  const r = cli(['attach', child, '--json']);
  t.equal(r.status, 0, r.stderr);
  const a = JSON.parse(r.out);
  s.attached(a.device);
  t.match(a, { via: 'fuse+loop', format: 'qcow2', readOnly: false });
  t.equal(attachmentOf(child)?.device, a.device);
  await t.rejects(attach(child), { code: 'EBUSY' }, 'the child cannot be attached twice');
  t.throws(() => assertNotAttached(child, 'roll it back'), { code: 'EBUSY', message: /detach/ });

  const mp = path.join(s.dir, 'mnt');
  s.mount(a.device, mp);
  // info reads a child whose FUSE server holds its write lock, and says where it is attached
  const info = cli(['info', child, '--chain', '--json']);
  t.equal(info.status, 0, info.stderr);
  t.same(JSON.parse(info.out).attached, { device: a.device, via: 'fuse+loop', readOnly: false, mountpoints: [mp] });
  t.equal(JSON.parse(info.out).chain.length, 2, 'info --chain lists the child and its parent');
  t.equal(fs.readFileSync(path.join(mp, 'base', 'seed.txt'), 'utf8'), 'from the parent\n'.repeat(1000), "the parent's files are visible");
  fs.mkdirSync(path.join(mp, 'new'));
  const payload = Buffer.alloc(3 << 20);
  for (let i = 0; i < payload.length; i += 4096) payload.write(`block ${i / 4096}\n`, i);
  fs.writeFileSync(path.join(mp, 'new', 'big.bin'), payload);
  fs.writeFileSync(path.join(mp, 'new', 'note.txt'), 'written through the child\n');
  fs.appendFileSync(path.join(mp, 'base', 'seed.txt'), 'appended in the child\n');
  s.umount(mp);
  const res = await detach(a.device);
  t.notOk(res[0].serverWasDead);
  t.notOk(kernelLoop(a.index)?.backingFile.startsWith('/run/disksnap/fuse'), 'loop device released');

  const chk = qemuCheck(child);
  t.equal(chk.status, 0, `qemu-img check clean:\n${chk.out}`);
  t.match(chk.out, /No errors were found/);
  t.equal(md5(parent), parentSum, 'parent bytes unchanged');
  t.equal(fs.statSync(parent).mtimeMs, parentMtime, 'parent mtime unchanged');

  const flat = path.join(s.dir, 'flat.img');
  const fl = cli(['diff', 'flatten', child, flat]);
  t.equal(fl.status, 0, fl.stderr);
  const fsck = e2fsckClean(flat);
  t.ok(fsck.ok, `the flattened filesystem is clean:\n${fsck.out}`);
  t.same(debugfsLs(flat, '/new').sort(), ['big.bin', 'note.txt'], 'the new files are in the flattened image');
  t.equal(debugfsCat(flat, '/new/note.txt'), 'written through the child\n');
  t.match(debugfsCat(flat, '/base/seed.txt') ?? '', /appended in the child\n$/);
  t.equal(debugfsCat(parent, '/base/seed.txt'), 'from the parent\n'.repeat(1000), 'the parent still has the old file');
  t.notOk(debugfsLs(parent).includes('new'));

  const rb = cli(['diff', 'rollback', child]);
  t.equal(rb.status, 0, rb.stderr);
  t.notOk(fs.existsSync(child), 'rolled back');
  t.equal(md5(parent), parentSum);
  const again = cli(['attach', parent]);
  t.equal(again.status, 0, `the parent, without children, attaches read-write again: ${again.stderr}`);
  s.attached(again.out.trim());
  await detach(parent);
});

t.test('attach surfaces a failed parent guard', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const { parent, child } = parentAndChild(s.dir);
  fs.chmodSync(parent, 0o644);
  const fd = fs.openSync(parent, 'r+');
  fs.writeSync(fd, Buffer.from('changed'), 0, 7, 40 << 20);
  fs.closeSync(fd);
  const r = cli(['attach', child]);
  t.equal(r.status, 1);
  t.match(r.stderr, /parent|changed/i);
  t.match(r.stderr, /EPARENTCHANGED/);
  t.equal(r.out, '');
  t.equal(attachmentOf(child), undefined, 'nothing attached');
});

t.test('FUSE server SIGKILLed while mounted: detach cleans up, diff check --repair restores the child', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const { parent, child } = parentAndChild(s.dir);
  const parentSum = md5(parent);
  const a = await attach(child);
  s.attached(a.device);
  const mp = path.join(s.dir, 'mnt');
  s.mount(a.device, mp);
  fs.writeFileSync(path.join(mp, 'before-kill.txt'), 'synced before the kill\n');
  shOk('sync', ['-f', path.join(mp, 'before-kill.txt')]);
  // something in flight when the server dies
  fs.writeFileSync(path.join(mp, 'in-flight.bin'), Buffer.alloc(2 << 20, 1));

  process.kill(a.fuse!.pid, 'SIGKILL');
  for (let i = 0; i < 200 && processStartTime(a.fuse!.pid) !== undefined; i++) await new Promise((r) => setTimeout(r, 10));
  t.equal(processStartTime(a.fuse!.pid), undefined, 'server is dead');
  t.equal(attachmentOf(child)?.fuse?.alive, false, 'attachmentOf reports the dead server');

  const busy = cli(['detach', a.device]);
  t.equal(busy.status, 1, 'still mounted: refused');
  t.match(busy.stderr, /mounted on/);
  if (sh('umount', [mp]).status !== 0) shOk('umount', ['-l', mp]);

  const d = cli(['detach', child]);
  t.equal(d.status, 0, d.stderr);
  t.match(d.stderr, /had died \(its log: .*\.log\).*diff check --repair/);
  fs.rmSync(a.fuse!.log, { force: true });
  t.notOk(kernelLoop(a.index)?.backingFile.startsWith('/run/disksnap/fuse'), 'no loop device left on the view');
  t.same(fuseMountsOf(a.fuse!.mountpoint), [], 'no FUSE mount left');
  t.notOk(fs.existsSync(a.fuse!.mountpoint), 'mountpoint removed');
  t.equal(attachmentOf(child), undefined);
  BlockFile.open(child, { write: true }).close(); // no lock left

  const rep = cli(['diff', 'check', '--repair', child]);
  t.ok(rep.status === 0 || rep.status === 3, `diff check --repair: ${rep.status} ${rep.stdout}${rep.stderr}`);
  const chk = qemuCheck(child);
  t.equal(chk.status, 0, `qemu-img check clean after repair:\n${chk.out}`);
  t.equal(md5(parent), parentSum, 'parent unchanged');

  // the child is usable again: attach, and the journal replays what was synced
  const again = await attach(child);
  s.attached(again.device);
  const mp2 = path.join(s.dir, 'mnt2');
  s.mount(again.device, mp2);
  t.equal(fs.readFileSync(path.join(mp2, 'before-kill.txt'), 'utf8'), 'synced before the kill\n', 'synced data survived');
  s.umount(mp2);
  await detach(again.device);
  t.equal(qemuCheck(child).status, 0);
});

t.test('a FUSE view left by an interrupted attach (no record, no loop device) is reaped', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const img = path.join(s.dir, 'raw.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 4 << 20);
  const mp = path.join(fuseDir(), `orphan-${process.pid}`);
  fs.mkdirSync(mp, { recursive: true });
  const log = `${mp}.log`;
  const logFd = fs.openSync(log, 'a');
  const server = spawn(process.execPath, [path.join(ROOT, 'dist', 'src', 'host', 'fuse-server.js'), '--image', img, '--mountpoint', mp], {
    stdio: ['ignore', logFd, logFd],
  });
  fs.closeSync(logFd);
  t.teardown(() => {
    if (fuseMountsOf(mp).length) sh('umount', ['-l', mp]);
    server.kill('SIGKILL');
    fs.rmSync(log, { force: true });
    fs.rmSync(mp, { recursive: true, force: true });
  });
  for (let i = 0; i < 200 && !fs.existsSync(path.join(mp, 'disk')); i++) await new Promise((r) => setTimeout(r, 20));
  t.ok(fs.existsSync(path.join(mp, 'disk')), 'the orphan view is up');
  await reapStale();
  t.same(fuseMountsOf(mp), [mp], 'a young view is left alone (an attach may be in progress)');
  const old = new Date(Date.now() - 5 * 60_000);
  fs.utimesSync(log, old, old);
  const exited = new Promise((r) => server.once('exit', r));
  t.ok((await reapStale()) >= 1);
  t.same(fuseMountsOf(mp), [], 'unmounted');
  await exited;
  t.pass('its server saw the unmount and exited');
  BlockFile.open(img, { write: true }).close();
});
