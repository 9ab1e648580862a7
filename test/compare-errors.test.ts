/**
 * Bad input to `disksnap compare`: each a clear error, exit 1, nothing left behind — a
 * missing image, an image being written by another process (locked), an attached image, a
 * qcow2 image, an unknown workload, a working directory without room, an interrupted run.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn, spawnSync, ChildProcess } from 'node:child_process';
import { cli, CLI, ROOT } from './helpers/cli';
import { missing } from './helpers/tools';

const MiB = 2 ** 20;

function makeImage(file: string, size: number): void {
  const fd = fs.openSync(file, 'w');
  fs.ftruncateSync(fd, size);
  fs.writeSync(fd, Buffer.alloc(64 * 1024, 0x5a), 0, 64 * 1024, 0);
  fs.closeSync(fd);
}

/** What a failed run left in its working directory: nothing, always. */
function leftIn(work: string): string[] {
  return fs.readdirSync(work);
}

t.test('a missing image is refused by name', async (t) => {
  const dir = t.testdir({ work: {} });
  const work = path.join(dir, 'work');
  const r = cli(['compare', path.join(dir, 'nope.img'), '--dir', work]);
  t.equal(r.status, 1);
  t.match(r.stderr, /image .*nope\.img does not exist/);
  t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  t.equal(r.out, '');
  t.same(leftIn(work), [], 'nothing left in the working directory');
});

t.test('IMAGE and --generate: exactly one of the two', async (t) => {
  const dir = t.testdir({ work: {} });
  const work = path.join(dir, 'work');
  const img = path.join(dir, 'a.img');
  makeImage(img, MiB);
  let r = cli(['compare', '--dir', work]);
  t.equal(r.status, 1);
  t.match(r.stderr, /needs an IMAGE or --generate SIZE/);
  r = cli(['compare', img, '--generate', '8M', '--dir', work]);
  t.equal(r.status, 1);
  t.match(r.stderr, /not both/);
  r = cli(['compare', '--generate', '12q', '--dir', work]);
  t.equal(r.status, 2, 'a malformed size is bad usage');
  t.match(r.stderr, /--generate size '12q' is not a size/);
  t.same(leftIn(work), [], 'nothing left in the working directory');
});

t.test('an unknown or impossible workload is refused before any work', async (t) => {
  const dir = t.testdir({ work: {} });
  const work = path.join(dir, 'work');
  const cases: [string, RegExp][] = [
    ['bogus', /unknown workload 'bogus': expected KIND\[:AMOUNT\]\[:MIN-MAX\] with KIND random/],
    ['random:0%', /must be more than 0%/],
    ['random:150%', /at most 100%/],
    ['random:3%:1k-1m', /multiples of 4 KiB/],
    ['random:3%:1m-4k', /smallest request size is larger/],
    ['sequential:x', /is not a size/],
    ['random:1:2:3', /too many parts/],
    ['random:64M', /writes 64\.0 MiB, more than the image's 8\.00 MiB/],
  ];
  for (const [spec, re] of cases) {
    const r = cli(['compare', '--generate', '8M', '--workload', spec, '--dir', work]);
    t.equal(r.status, 1, spec);
    t.match(r.stderr, re, spec);
    t.notMatch(r.stderr, /compare: \[1\//, `${spec}: refused before any step`);
  }
  t.same(leftIn(work), [], 'nothing left in the working directory');
});

t.test('a qcow2 image is refused with what to do instead', async (t) => {
  const dir = t.testdir({ work: {} });
  const work = path.join(dir, 'work');
  const parent = path.join(dir, 'parent.img');
  const child = path.join(dir, 'child.qcow2');
  makeImage(parent, 4 * MiB);
  t.equal(cli(['diff', 'create', parent, child]).status, 0);
  const r = cli(['compare', child, '--dir', work]);
  t.equal(r.status, 1);
  t.match(r.stderr, /is a qcow2 image; compare works on a raw volume .*diff flatten/);
  t.same(leftIn(work), [], 'nothing left in the working directory');
  t.equal(cli(['diff', 'rollback', child]).status, 0);
});

/** Holds an exclusive (writer's) lock on a file until killed. */
function holdLock(file: string): Promise<ChildProcess> {
  const script = `
    const { BlockFile } = require(${JSON.stringify(path.join(ROOT, 'dist', 'src', 'engine', 'file.js'))});
    const f = BlockFile.open(${JSON.stringify(file)}, { write: true });
    process.stdout.write('locked\\n');
    setInterval(() => {}, 1000);`;
  const p = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    p.stdout!.once('data', () => resolve(p));
    p.once('exit', (code) => reject(new Error(`lock holder exited ${code}`)));
  });
}

t.test('an image another process is writing (locked) is refused', async (t) => {
  const dir = t.testdir({ work: {} });
  const work = path.join(dir, 'work');
  const img = path.join(dir, 'busy.img');
  makeImage(img, 8 * MiB);
  const before = fs.readFileSync(img);
  const holder = await holdLock(img);
  try {
    const r = cli(['compare', img, '--dir', work]);
    t.equal(r.status, 1);
    t.match(r.stderr, /busy\.img is in use: another process holds a write lock/);
    t.match(r.stderr, /ELOCKED/);
  } finally {
    holder.kill();
  }
  t.same(leftIn(work), [], 'nothing left in the working directory');
  t.ok(fs.readFileSync(img).equals(before), 'image unchanged');
});

t.test('an image attached to a loop device is refused', { skip: missing({ root: true, commands: ['losetup'] }) }, async (t) => {
  const dir = t.testdir({ work: {} });
  const work = path.join(dir, 'work');
  const img = path.join(dir, 'attached.img');
  makeImage(img, 8 * MiB);
  const a = spawnSync('losetup', ['-f', '--show', img], { encoding: 'utf8' });
  if (a.status !== 0) {
    t.fail(`losetup could not attach: ${a.stderr}`);
    return;
  }
  const dev = a.stdout.trim();
  try {
    const r = cli(['compare', img, '--dir', work]);
    t.equal(r.status, 1);
    t.match(r.stderr, new RegExp(`attached\\.img is attached to ${dev}`));
    t.match(r.stderr, /EBUSY/);
  } finally {
    spawnSync('losetup', ['-d', dev]);
  }
  t.same(leftIn(work), [], 'nothing left in the working directory');
});

t.test('a working directory without room is refused before anything is copied', { skip: missing({ root: true, commands: ['mount', 'umount'] }) }, async (t) => {
  const dir = t.testdir({ small: {} });
  const small = path.join(dir, 'small');
  const m = spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', small], { encoding: 'utf8' });
  if (m.status !== 0) {
    t.fail(`cannot mount a tmpfs: ${m.stderr}`);
    return;
  }
  try {
    const r = cli(['compare', '--generate', '32M', '--dir', small]);
    t.equal(r.status, 1);
    t.match(r.stderr, /not enough room in .*small\/disksnap-compare-\w+: this comparison needs about [\d.]+ MiB, the filesystem has [\d.]+ (MiB|KiB) available/);
    t.match(r.stderr, /ENOSPC/);
    t.same(fs.readdirSync(small), [], 'nothing left on the full filesystem');

    // an existing image too (the same check, from its allocation)
    const img = path.join(dir, 'data.img');
    const fd = fs.openSync(img, 'w');
    fs.writeSync(fd, Buffer.alloc(4 * MiB, 1));
    fs.closeSync(fd);
    const r2 = cli(['compare', img, '--dir', small]);
    t.equal(r2.status, 1);
    t.match(r2.stderr, /not enough room/);
    t.same(fs.readdirSync(small), []);
  } finally {
    spawnSync('umount', [small]);
  }
});

t.test('a missing working directory is a clear error', async (t) => {
  const dir = t.testdir();
  const r = cli(['compare', '--generate', '8M', '--dir', path.join(dir, 'nowhere')]);
  t.equal(r.status, 1);
  t.match(r.stderr, /nowhere/);
  t.match(r.stderr, /ENOENT|no such file/);
});

t.test('an interrupted run (SIGINT) removes its working directory', async (t) => {
  const dir = t.testdir({ work: {} });
  const work = path.join(dir, 'work');
  const p = spawn(process.execPath, [CLI, 'compare', '--generate', '96M', '--dir', work], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  let stdout = '';
  p.stdout.on('data', (d) => (stdout += d));
  // interrupt in the middle: once the first strategy has started
  const started = new Promise<void>((resolve) => {
    p.stderr.on('data', (d) => {
      stderr += d;
      if (/differencing-disk: (write|read back)/.test(stderr)) resolve();
    });
  });
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => p.once('exit', (code, signal) => resolve({ code, signal })));
  await Promise.race([started, exited]);
  t.equal(fs.readdirSync(work).length, 1, 'the run has a working directory');
  p.kill('SIGINT');
  const { code, signal } = await exited;
  t.ok(signal === 'SIGINT' || code === 130, `ended by the interrupt (code ${code}, signal ${signal})`);
  t.match(stderr, /compare interrupted \(SIGINT\); removing/);
  t.equal(stdout, '', 'no report of an interrupted run');
  t.same(leftIn(work), [], 'nothing left in the working directory');
});
