/**
 * The filesystem workload of `compare`: files written into ext4 through a loop mount (root),
 * the blocks ext4 changed replayed into both strategies, every state checked byte-exact;
 * afterwards no loop device, mount or working file is left.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { cli, CLI } from './helpers/cli';
import { missing } from './helpers/tools';
import type { CompareReport } from '../src/compare/types';

const MiB = 2 ** 20;

function loopsOf(dir: string): string[] {
  const r = spawnSync('losetup', ['-a'], { encoding: 'utf8' });
  return (r.stdout ?? '').split('\n').filter((l) => l.includes(dir));
}

function mountsUnder(dir: string): string[] {
  return fs.readFileSync('/proc/mounts', 'utf8').split('\n').filter((l) => l.includes(dir));
}

t.test('fs workload: ext4 files through a loop mount, replayed into both strategies', { skip: missing({ root: true, commands: ['mkfs.ext4', 'mount', 'umount', 'losetup'] }) }, async (t) => {
  const dir = t.testdir({ work: {} });
  const work = path.join(dir, 'work');
  const json = path.join(dir, 'fs.json');
  const r = cli(['compare', '--generate', '64M', '--workload', 'fs:6M', '--growth', '1,4', '--dir', work, '--json', json]);
  t.equal(r.status, 0, r.stderr);
  const rep = JSON.parse(fs.readFileSync(json, 'utf8')) as CompareReport;
  t.equal(rep.workload.kind, 'fs');
  t.equal(rep.workload.spec, 'fs:6m');
  t.ok(rep.workload.fs, 'what was done in the filesystem is reported');
  t.ok(rep.workload.fs!.files > 0, `${rep.workload.fs!.files} files`);
  t.equal(rep.workload.fs!.fileBytes, 6 * MiB);
  t.equal(rep.workload.fs!.formatted, true, 'the generated image was formatted first');
  t.match(rep.workload.fs!.mountedWith, /disksnap attach \(\/dev\/loop\d+\) \+ mount/);
  // ext4 writes the file data plus its own metadata
  t.ok(rep.workload.bytes >= 6 * MiB, `replayed ${rep.workload.bytes} bytes >= the file data`);
  t.ok(rep.workload.bytes < 6 * MiB + 8 * MiB, 'and not wildly more');
  t.ok(rep.image.allocatedBytes > 0, 'the formatted volume has allocated blocks');
  t.ok(rep.checks.some((c) => c.name === 'fs-replay' && c.ok), 'the replayed writes give exactly what ext4 wrote');
  t.ok(rep.checks.every((c) => c.ok), 'every check passed');
  t.same(rep.strategies.map((s) => s.metrics.growth.map((g) => g.snapshots)), [[1, 4], [1, 4]]);

  t.same(fs.readdirSync(work), [], 'the working directory is removed');
  t.same(loopsOf(dir), [], 'no loop device left');
  t.same(mountsUnder(dir), [], 'nothing left mounted');
});

t.test('fs workload on an image that already holds ext4: used as it is, not formatted', { skip: missing({ root: true, commands: ['mkfs.ext4', 'mount', 'umount', 'losetup', 'e2fsck'] }) }, async (t) => {
  const dir = t.testdir({ work: {} });
  const work = path.join(dir, 'work');
  const img = path.join(dir, 'ext4.img');
  const fd = fs.openSync(img, 'w');
  fs.ftruncateSync(fd, 48 * MiB);
  fs.closeSync(fd);
  t.equal(spawnSync('mkfs.ext4', ['-q', '-F', img]).status, 0);
  const before = fs.readFileSync(img);
  const r = cli(['compare', img, '--workload', 'fs:4M', '--growth', '1', '--dir', work, '--json', '-']);
  t.equal(r.status, 0, r.stderr);
  const rep = JSON.parse(r.out) as CompareReport;
  t.equal(rep.workload.fs!.formatted, false, 'the existing filesystem was used');
  t.ok(rep.checks.every((c) => c.ok));
  t.ok(fs.readFileSync(img).equals(before), "the user's image is unchanged");
  t.equal(spawnSync('e2fsck', ['-fn', img]).status, 0, "the user's filesystem is still clean");
  t.same(fs.readdirSync(work), []);
  t.same(loopsOf(dir), []);
});

t.test('fs workload larger than the filesystem is refused, and cleaned up', { skip: missing({ root: true, commands: ['mkfs.ext4', 'mount', 'umount', 'losetup'] }) }, async (t) => {
  const dir = t.testdir({ work: {} });
  const work = path.join(dir, 'work');
  const r = cli(['compare', '--generate', '16M', '--workload', 'fs:15M', '--dir', work]);
  t.equal(r.status, 1);
  t.match(r.stderr, /the fs workload writes 15\.0 MiB of files, but the filesystem in the image has only [\d.]+ MiB free/);
  t.same(fs.readdirSync(work), []);
  t.same(loopsOf(dir), [], 'the loop device was detached');
  t.same(mountsUnder(dir), [], 'and unmounted');
});

t.test('an interrupt while the image is mounted unmounts, detaches and removes everything', { skip: missing({ root: true, commands: ['mkfs.ext4', 'mount', 'umount', 'losetup'] }) }, async (t) => {
  const dir = t.testdir({ work: {} });
  const work = path.join(dir, 'work');
  const p = spawn(process.execPath, [CLI, 'compare', '--generate', '512M', '--workload', 'fs:300M', '--dir', work], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  p.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => p.once('exit', (code, signal) => resolve({ code, signal })));
  // wait until the scratch copy is mounted (or the run ends, which would be a failure below)
  let mounted = false;
  for (let i = 0; i < 600 && p.exitCode === null; i++) {
    if (mountsUnder(work).length) {
      mounted = true;
      break;
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  t.ok(mounted, 'the run mounted its scratch copy');
  const attachedRecords = () =>
    fs.existsSync('/run/disksnap/attachments')
      ? fs.readdirSync('/run/disksnap/attachments').filter((n) => fs.readFileSync(path.join('/run/disksnap/attachments', n), 'utf8').includes(work))
      : [];
  p.kill('SIGINT');
  const { code, signal } = await exited;
  t.ok(signal === 'SIGINT' || code === 130, `ended by the interrupt (code ${code}, signal ${signal})`);
  t.match(stderr, /compare interrupted \(SIGINT\)/);
  t.same(mountsUnder(work), [], 'unmounted');
  t.same(loopsOf(work), [], 'loop device detached');
  t.same(attachedRecords(), [], "no stale record in the loopback library's state");
  t.same(fs.readdirSync(work), [], 'the working directory is removed');
});
