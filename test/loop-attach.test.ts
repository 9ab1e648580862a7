/**
 * Raw images on loop devices: attach/detach through the addon's ioctls, the state records and
 * their cross-check with the kernel, the refusals, and the helpers other commands call
 * (attachmentOf for `info`, assertNotAttached for restore/rollback/commit).
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { cli, CLI } from './helpers/cli';
import { needLoop, scratch, makeExt4, sh, shOk } from './helpers/loop';
import { attach, attachmentOf, attachmentsOf, assertNotAttached, detach, listAttachments } from '../src/host/attach';
import { kernelLoop, readRecord } from '../src/host/state';
import { BlockFile } from '../src/engine/file';
import { native } from '../src/engine/native';
import { DisksnapError } from '../src/engine/errors';

const skip = needLoop(['mkfs.ext4', 'losetup']);

t.test('attach prints the device and detach releases it, record and lock included', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const img = path.join(s.dir, 'vol.img');
  fs.writeFileSync(img, Buffer.alloc(0));
  fs.truncateSync(img, 8 << 20);
  fs.writeFileSync(img, Buffer.from('hello loop'), { flag: 'r+' });

  const r = cli(['attach', img]);
  t.equal(r.status, 0, r.stderr);
  const device = r.out.trim();
  t.match(device, /^\/dev\/loop\d+$/, 'stdout is the device and nothing else');
  s.attached(device);

  const index = Number(device.replace('/dev/loop', ''));
  const k = kernelLoop(index)!;
  t.ok(k, 'the kernel has it bound');
  t.equal(k.backingFile, fs.realpathSync(img), 'to the image');
  t.notOk(k.readOnly);
  const st = fs.statSync(img, { bigint: true });
  t.equal(k.status.backingIno, st.ino);
  t.equal(readRecord(index)?.image, fs.realpathSync(img), 'the state record names the image');

  // the bytes are the image's
  const fd = fs.openSync(device, 'r');
  const head = Buffer.alloc(10);
  fs.readSync(fd, head, 0, 10, 0);
  t.equal(native().blockDeviceSize(fd), 8 << 20, 'BLKGETSIZE64 is the image size');
  fs.closeSync(fd);
  t.equal(head.toString(), 'hello loop');

  const a = attachmentOf(img)!;
  t.match(a, { device, via: 'loop', readOnly: false, mountpoints: [], recorded: true });
  t.ok(listAttachments().some((x) => x.device === device));

  // the loop device holds the image's shared lock: writers (disksnap, QEMU) are refused,
  // readers are not
  t.throws(() => BlockFile.open(img, { write: true }), { code: 'ELOCKED' }, 'a writer is refused while attached');
  BlockFile.open(img).close();

  const d = cli(['detach', device, '--json']);
  t.equal(d.status, 0, d.stderr);
  t.match(JSON.parse(d.out), { detached: [{ device, via: 'loop' }] });
  t.notOk(kernelLoop(index) && kernelLoop(index)!.backingFile === fs.realpathSync(img), 'unbound');
  t.equal(readRecord(index), undefined, 'record removed');
  t.equal(attachmentOf(img), undefined);
  BlockFile.open(img, { write: true }).close(); // the lock went with the device
});

t.test('attach refuses a second writer, and write access beside a read-only attachment', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const img = path.join(s.dir, 'vol.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 4 << 20);

  const a = await attach(img);
  s.attached(a.device);
  await t.rejects(attach(img), { code: 'EBUSY', message: /already attached for writing to \/dev\/loop\d+/ });
  await t.rejects(attach(img, { readOnly: true }), { code: 'EBUSY' }, 'not even read-only beside a writer');
  const r = cli(['attach', img]);
  t.equal(r.status, 1);
  t.match(r.stderr, /already attached for writing to \/dev\/loop\d+; run `disksnap detach \/dev\/loop\d+` first/);
  t.equal(r.out, '', 'nothing on stdout');
  await detach(img);

  const ro1 = await attach(img, { readOnly: true });
  s.attached(ro1.device);
  const ro2 = await attach(img, { readOnly: true });
  s.attached(ro2.device);
  t.ok(ro1.readOnly && ro2.readOnly);
  t.not(ro1.device, ro2.device, 'two read-only attachments coexist');
  t.equal(fs.readFileSync(`/sys/block/loop${ro1.index}/ro`, 'utf8').trim(), '1', 'the kernel device is read-only');
  await t.rejects(attach(img), { code: 'EBUSY', message: /already attached read-only/ });
  const res = await detach(img);
  t.equal(res.length, 2, 'detach FILE releases every attachment of the image');
  t.same(attachmentsOf(img), []);
});

t.test('attach refuses a read-only parent unless --read-only', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const img = path.join(s.dir, 'parent.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 4 << 20);
  fs.chmodSync(img, 0o444);
  const r = cli(['attach', img]);
  t.equal(r.status, 1);
  t.match(r.stderr, /is read-only .*differencing parent.*--read-only/);
  const ok = cli(['attach', '--read-only', img]);
  t.equal(ok.status, 0, ok.stderr);
  s.attached(ok.out.trim());
  t.equal(cli(['detach', img]).status, 0);
});

t.test('a mounted device is not detached; attachmentOf shows the mount; assertNotAttached refuses', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const img = path.join(s.dir, 'fs.img');
  makeExt4(img, '32M');
  const a = await attach(img);
  s.attached(a.device);
  const mp = path.join(s.dir, 'mnt');
  s.mount(a.device, mp);
  fs.writeFileSync(path.join(mp, 'f'), 'x');

  t.same(attachmentOf(img)?.mountpoints, [mp]);
  const info = cli(['info', img, '--json']);
  t.equal(info.status, 0, info.stderr);
  t.same(JSON.parse(info.out).attached, { device: a.device, via: 'loop', readOnly: false, mountpoints: [mp] }, 'info --json shows the attachment');
  t.match(cli(['info', img]).out, new RegExp(`attached: ${a.device} \\(loop\\), mounted on ${mp}`));
  t.throws(() => assertNotAttached(img, 'restore it in place'), {
    code: 'EBUSY',
    message: new RegExp(`is attached to ${a.device} \\(mounted on ${mp}\\); unmount it and run \`disksnap detach ${a.device}\` first, then restore it in place`),
  });
  const d = cli(['detach', a.device]);
  t.equal(d.status, 1);
  t.match(d.stderr, /is mounted on .*; unmount it first/);
  t.ok(kernelLoop(a.index), 'still attached');

  s.umount(mp);
  // Seen once in CI: right after umount the attachment was briefly not found (cause not yet
  // understood); wait up to 3 s for the kernel's view to settle before asserting.
  for (let i = 0; i < 30 && !attachmentOf(img); i++) await new Promise((r) => setTimeout(r, 100));
  t.match(cli(['info', img]).out, /attached: .*not mounted/);
  t.throws(() => assertNotAttached(img, 'roll it back'), { message: /run `disksnap detach \/dev\/loop\d+` first, then roll it back/ });
  t.equal(cli(['detach', img]).status, 0);
  t.doesNotThrow(() => assertNotAttached(img, 'roll it back'));
  t.equal(JSON.parse(cli(['info', img, '--json']).out).attached, undefined, 'info shows no attachment after detach');
  t.equal(sh('e2fsck', ['-fn', img]).status, 0, 'filesystem clean after unmount and detach');
});

t.test('a record whose device was detached behind disksnap is ignored and cleaned', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const img = path.join(s.dir, 'vol.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 4 << 20);
  const a = await attach(img);
  s.attached(a.device);
  native().loopDetach(a.device); // as `losetup -d` would
  for (let i = 0; i < 100 && kernelLoop(a.index); i++) await new Promise((r) => setTimeout(r, 10));
  t.ok(readRecord(a.index), 'the record is still there');
  t.equal(attachmentOf(img), undefined, 'but it does not count');
  t.doesNotThrow(() => assertNotAttached(img, 'commit it'));
  const again = await attach(img); // and it does not block a new attachment
  s.attached(again.device);
  await detach(again.device);
  t.equal(readRecord(a.index)?.image === fs.realpathSync(img), false, 'stale record reaped');
});

t.test('images attached by other tools (losetup) are seen and can be detached', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const img = path.join(s.dir, 'vol.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 4 << 20);
  const dev = shOk('losetup', ['--find', '--show', img]).trim();
  s.attached(dev);
  const a = attachmentOf(img)!;
  t.match(a, { device: dev, via: 'loop', recorded: false });
  await t.rejects(attach(img), { code: 'EBUSY' }, 'attach sees the foreign attachment');
  t.throws(() => assertNotAttached(img, 'restore it'), { code: 'EBUSY' });
  const res = await detach(dev);
  t.equal(res[0].device, dev);
  t.equal(attachmentOf(img), undefined);
});

t.test('detach of something not attached is a clear failure', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const img = path.join(s.dir, 'vol.img');
  fs.writeFileSync(img, '');
  const r = cli(['detach', img]);
  t.equal(r.status, 1);
  t.match(r.stderr, /is not attached to any loop device/);
  await t.rejects(detach(path.join(s.dir, 'missing.img')), DisksnapError);
  const dir = cli(['attach', s.dir]);
  t.equal(dir.status, 1);
  t.match(dir.stderr, /not a regular file/);
});

t.test('info tells a user without root where an image is attached (from sysfs)', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const img = path.join(s.dir, 'vol.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 4 << 20);
  fs.chmodSync(s.dir, 0o755);
  const a = await attach(img);
  s.attached(a.device);
  // uid 65534 (nobody) cannot open /dev/loopN; the attachment must still be found
  const r = spawnSync(process.execPath, [CLI, 'info', img, '--json'], { uid: 65534, gid: 65534 });
  t.equal(r.status, 0, r.stderr.toString());
  t.same(JSON.parse(r.stdout.toString()).attached, { device: a.device, via: 'loop', readOnly: false, mountpoints: [] });
  await detach(img);
});

t.test('in-place restore refuses an attached image and says to detach it', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const img = path.join(s.dir, 'vol.img');
  const store = path.join(s.dir, 'store');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 4 << 20);
  fs.writeFileSync(img, Buffer.from('before'), { flag: 'r+' });
  const snap = cli(['snapshot', 'create', img, '--store', store, '--json']);
  t.equal(snap.status, 0, snap.stderr);
  const id = JSON.parse(snap.out).id;
  fs.writeFileSync(img, Buffer.from('after!'), { flag: 'r+' });
  const a = await attach(img);
  s.attached(a.device);
  const r = cli(['snapshot', 'restore', id, '--store', store, '--in-place', img]);
  t.equal(r.status, 1);
  t.match(r.stderr, new RegExp(`is attached to ${a.device}; run \`disksnap detach ${a.device}\` first, then restore it in place`));
  t.equal(fs.readFileSync(img).subarray(0, 6).toString(), 'after!', 'the volume is untouched');
  await detach(img);
  const ok = cli(['snapshot', 'restore', id, '--store', store, '--in-place', img]);
  t.equal(ok.status, 0, ok.stderr);
  t.equal(fs.readFileSync(img).subarray(0, 6).toString(), 'before', 'rolled back once detached');
});

