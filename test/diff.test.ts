/**
 * The differencing-disk life cycle through the library (src/differencing/): create, rollback,
 * reset, commit (and its refusals), flatten, chains of three, the parent guard and the
 * locks. qemu-img is the oracle after every phase.
 */
import t from 'tap';
import { BlockFile } from '../src/engine/file';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { randomFillSync } from 'node:crypto';
import { CLI } from './helpers/cli';
import * as diff from '../src/differencing';
import { Qcow2Image } from '../src/image/qcow2/image';
import { openImage } from '../src/image';
import { commitMarkerPath, childrenRegistryPath, writeJsonAtomic } from '../src/image/sidecars';
import {
  assertClean,
  assertShows,
  assertUnchanged,
  makeParent,
  needQemu,
  pattern,
  qemuImgOk,
  qemuInfo,
  qemuIo,
  snapshotOf,
} from './helpers/qemu';

const KiB = 1024;
const MiB = 2 ** 20;
const skip = needQemu();

function writeChild(child: string, expected: Buffer, writes: [number, Buffer][]): void {
  const img = Qcow2Image.open(child, { write: true });
  try {
    for (const [off, data] of writes) {
      img.writeSync(data, off);
      data.copy(expected, off);
    }
  } finally {
    img.close();
  }
}

function readAll(file: string): Buffer {
  const img = openImage(file);
  try {
    const b = Buffer.alloc(img.virtualSize);
    img.readSync(b, 0);
    return b;
  } finally {
    img.close();
  }
}

const mode = (f: string) => fs.statSync(f).mode & 0o777;

t.test('create makes the parent read-only, registers the child and records a guard; rollback undoes all of it', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, 2 * MiB);
  fs.chmodSync(parent.file, 0o640);
  const child = path.join(dir, 'child.qcow2');
  const r = await diff.createChild(parent.file, child);
  t.equal(r.backingName, 'parent.raw', 'backing name is relative to the child directory');
  t.equal(mode(parent.file), 0o440, 'parent is read-only');
  t.same(diff.childrenOf(parent.file), [child]);
  const before = snapshotOf(parent.file);
  const info = qemuInfo(child);
  t.equal(info['backing-filename'], 'parent.raw');
  t.equal(info['backing-filename-format'], 'raw');
  t.equal((info['format-specific'] as { data: { compat: string } }).data.compat, '1.1');
  assertClean(t, child, 'fresh child');

  await t.rejects(diff.createChild(parent.file, child), { code: 'EEXIST' }, 'an existing child is not overwritten');

  const expected = Buffer.from(parent.bytes);
  writeChild(child, expected, [[12345, pattern(100 * KiB, 2)]]);
  assertClean(t, child, 'after writes');
  assertShows(t, child, expected, 'after writes');
  assertUnchanged(t, parent.file, before, 'after writes');

  const rb = diff.rollback(child);
  t.same(rb.removed, [child]);
  t.same(rb.remaining, []);
  t.notOk(fs.existsSync(child), 'child deleted');
  t.notOk(fs.existsSync(childrenRegistryPath(parent.file)), 'registry removed with the last child');
  t.equal(mode(parent.file), 0o640, 'parent mode restored');
  assertUnchanged(t, parent.file, before, 'after rollback');
});

t.test('two children: the parent stays read-only until both are rolled back', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, MiB);
  const a = path.join(dir, 'a.qcow2');
  fs.mkdirSync(path.join(dir, 'sub'));
  const b = path.join(dir, 'sub', 'b.qcow2');
  await diff.createChild(parent.file, a);
  const rb = await diff.createChild(parent.file, b, { clusterSize: 4096 });
  t.equal(rb.backingName, path.join('..', 'parent.raw'));
  t.same(diff.childrenOf(parent.file).sort(), [a, b].sort());
  t.same(diff.rollback(a).remaining, [b]);
  t.equal(mode(parent.file) & 0o222, 0, 'still read-only');
  t.same(diff.rollback(b).remaining, []);
  t.equal(mode(parent.file), 0o644);
});

t.test('reset gives an empty child of the same parent in one step', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, MiB);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent.file, child, { clusterSize: 8192 });
  const before = snapshotOf(parent.file);
  writeChild(child, Buffer.from(parent.bytes), [[0, pattern(300 * KiB, 3)]]);
  const r = await diff.reset(child);
  t.equal(r.clusterSize, 8192, 'same cluster size');
  assertClean(t, child, 'after reset');
  assertShows(t, child, parent.bytes, 'after reset: the child shows the parent again');
  assertUnchanged(t, parent.file, before, 'after reset');
  t.same(diff.childrenOf(parent.file), [child], 'still registered');
  t.equal(mode(parent.file) & 0o222, 0, 'parent still read-only');
});

t.test('commit writes the child into a raw parent and removes the child', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, 3 * MiB + 512);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent.file, child, { clusterSize: 4096 });
  const expected = Buffer.from(parent.bytes);
  writeChild(child, expected, [
    [63 * KiB, pattern(2 * KiB, 4)],
    [MiB - 7, pattern(MiB, 5)],
    [3 * MiB + 100, pattern(412, 6)],
  ]);
  const img = Qcow2Image.open(child, { write: true });
  img.writeZeroesSync(2.5 * MiB, 64 * KiB); // zero clusters are committed as zeros
  expected.fill(0, 2.5 * MiB, 2.5 * MiB + 64 * KiB);
  img.close();
  assertClean(t, child, 'before commit');
  const r = await diff.commit(child);
  t.equal(r.resumed, false);
  t.notOk(fs.existsSync(child), 'child removed');
  t.ok(fs.readFileSync(parent.file).equals(expected), 'parent holds exactly what the child showed');
  t.equal(mode(parent.file), 0o644, 'parent writable again');
  t.notOk(fs.existsSync(commitMarkerPath(child)), 'no marker left');
});

t.test('commit is refused while the parent has another child, and --force makes the sibling see the change', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, MiB);
  const a = path.join(dir, 'a.qcow2');
  const b = path.join(dir, 'b.qcow2');
  await diff.createChild(parent.file, a);
  await diff.createChild(parent.file, b);
  const before = snapshotOf(parent.file);
  const expected = Buffer.from(parent.bytes);
  writeChild(a, expected, [[1000, pattern(5000, 7)]]);
  await t.rejects(diff.commit(a), { code: 'EBUSY', message: /other children.*b\.qcow2/ });
  assertUnchanged(t, parent.file, before, 'after the refused commit');
  t.ok(fs.existsSync(a), 'child kept');
  assertClean(t, a, 'after the refused commit');

  const r = await diff.commit(a, { force: true });
  t.same(r.siblings, [b]);
  t.ok(fs.readFileSync(parent.file).equals(expected));
  t.equal(mode(parent.file) & 0o222, 0, 'parent still read-only: b remains');
  t.throws(() => Qcow2Image.open(b), { code: 'EPARENTCHANGED' }, 'the sibling notices that its parent changed');
});

t.test('commit --keep-child leaves an empty child of the updated parent', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, MiB);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent.file, child);
  const expected = Buffer.from(parent.bytes);
  writeChild(child, expected, [[0, pattern(70 * KiB, 8)]]);
  const r = await diff.commit(child, { keepChild: true });
  t.ok(r.keptChild);
  t.ok(fs.readFileSync(parent.file).equals(expected));
  assertClean(t, child, 'kept child');
  assertShows(t, child, expected, 'kept child shows the committed parent');
  const kept = Qcow2Image.open(child);
  t.equal(kept.info().parentGuard, 'ok', 'guard records the new parent');
  kept.close();
  t.equal(mode(parent.file) & 0o222, 0, 'parent read-only: it still has the child');
  const m = JSON.parse(qemuImgOk('map', '--output=json', child)) as { depth: number }[];
  t.ok(m.every((e) => e.depth === 1), 'the kept child is empty');
});

t.test('an interrupted commit is finished by running commit again', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, MiB);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent.file, child);
  const expected = Buffer.from(parent.bytes);
  writeChild(child, expected, [[4096, pattern(200 * KiB, 9)], [900 * KiB, pattern(10, 10)]]);
  // What a commit killed half-way leaves: the marker, and part of the data in the parent.
  writeJsonAtomic(commitMarkerPath(child), {
    version: 1,
    parent: path.resolve(parent.file),
    keepChild: false,
    startedAt: new Date().toISOString(),
    parentMode: 0o444,
  });
  fs.chmodSync(parent.file, 0o644);
  const fd = fs.openSync(parent.file, 'r+');
  fs.writeSync(fd, expected, 4096, 50 * KiB, 4096);
  fs.closeSync(fd);
  t.throws(() => Qcow2Image.open(child), { code: 'EBUSY', message: /commit.*interrupted/ }, 'the child refuses to open meanwhile');
  t.throws(() => diff.rollback(child), { code: 'EBUSY' }, 'rollback refuses: it would leave the parent half-committed');
  const r = await diff.commit(child);
  t.ok(r.resumed, 'the commit says it resumed');
  t.ok(fs.readFileSync(parent.file).equals(expected), 'parent complete');
  t.notOk(fs.existsSync(child));
  t.notOk(fs.existsSync(commitMarkerPath(child)));
  t.equal(mode(parent.file), 0o644);
});

t.test('a chain of three: writes at every level, commit of the middle layer into the top of the chain below', { skip }, async (t) => {
  const dir = t.testdir();
  const base = makeParent(dir, 2 * MiB, 'base.raw');
  const mid = path.join(dir, 'mid.qcow2');
  const top = path.join(dir, 'top.qcow2');
  await diff.createChild(base.file, mid, { clusterSize: 4096 });
  const baseBefore = snapshotOf(base.file);
  const midExpected = Buffer.from(base.bytes);
  writeChild(mid, midExpected, [[10000, pattern(70000, 11)], [700000, pattern(70000, 14)]]);
  await diff.createChild(mid, top, { clusterSize: 65536 });
  const midBefore = snapshotOf(mid);
  const topExpected = Buffer.from(midExpected);
  writeChild(top, topExpected, [[63 * KiB, pattern(2 * KiB, 12)], [1.5 * MiB, pattern(300 * KiB, 13)]]);
  assertClean(t, mid, 'chain: mid');
  assertClean(t, top, 'chain: top');
  assertShows(t, mid, midExpected, 'chain: mid');
  assertShows(t, top, topExpected, 'chain: top');
  assertUnchanged(t, base.file, baseBefore, 'chain: base');
  assertUnchanged(t, mid, midBefore, 'chain: mid untouched by writes to top');
  t.ok(readAll(top).equals(topExpected), 'disksnap reads through three layers');
  const opened = Qcow2Image.open(top);
  const info = opened.info(true);
  opened.close();
  t.same(info.chain?.map((l) => [path.basename(l.path), l.format, l.parentGuard]), [
    ['top.qcow2', 'qcow2', 'ok'],
    ['mid.qcow2', 'qcow2', 'ok'],
    ['base.raw', 'raw', undefined],
  ]);
  const img = Qcow2Image.open(top);
  const depths = new Set(img.map().map((e) => e.depth));
  img.close();
  t.ok(depths.has(0) && depths.has(1) && depths.has(2), 'map reports extents from all three layers');

  t.throws(() => diff.rollback(mid), { code: 'EBUSY', message: /children of its own/ }, 'the middle layer has a child');
  t.throws(() => Qcow2Image.open(mid, { write: true }), { code: 'EBUSY', message: /read-only while it has children/ }, 'a parent with children is not opened for writing, even by root');
  const r = await diff.commit(top);
  t.equal(path.resolve(r.parent), path.resolve(mid));
  assertClean(t, mid, 'after committing top into mid');
  assertShows(t, mid, topExpected, 'after committing top into mid');
  assertUnchanged(t, base.file, baseBefore, 'base after the commit into mid');
  t.equal(mode(mid) & 0o222, 0o200, 'mid is writable again (its child is gone)');
  const rb = diff.rollback(mid);
  t.same(rb.remaining, []);
  t.equal(mode(base.file), 0o644);
});

t.test('rollback --recursive discards the grandchildren too', { skip }, async (t) => {
  const dir = t.testdir();
  const base = makeParent(dir, MiB, 'base.raw');
  const mid = path.join(dir, 'mid.qcow2');
  const top = path.join(dir, 'top.qcow2');
  await diff.createChild(base.file, mid);
  await diff.createChild(mid, top);
  const r = diff.rollback(mid, { recursive: true });
  t.same(r.removed, [top, mid]);
  t.notOk(fs.existsSync(top));
  t.notOk(fs.existsSync(mid));
  t.equal(mode(base.file), 0o644);
});

t.test('flatten writes a sparse raw image of what a chain shows', { skip }, async (t) => {
  const dir = t.testdir();
  const base = path.join(dir, 'base.raw');
  fs.writeFileSync(base, Buffer.alloc(0));
  fs.truncateSync(base, 8 * MiB);
  const fd = fs.openSync(base, 'r+');
  fs.writeSync(fd, pattern(64 * KiB, 1), 0, 64 * KiB, 0);
  fs.closeSync(fd);
  const expected = fs.readFileSync(base);
  const mid = path.join(dir, 'mid.qcow2');
  const top = path.join(dir, 'top.qcow2');
  await diff.createChild(base, mid, { clusterSize: 4096 });
  writeChild(mid, expected, [[MiB, pattern(100 * KiB, 2)]]);
  await diff.createChild(mid, top);
  writeChild(top, expected, [[MiB + 50 * KiB, pattern(200 * KiB, 3)], [5 * MiB, pattern(10, 4)]]);
  const out = path.join(dir, 'flat.raw');
  const r = await diff.flatten(top, out);
  t.equal(r.virtualSize, 8 * MiB);
  t.ok(fs.readFileSync(out).equals(expected), 'flat image equals the chain');
  t.ok(fs.statSync(out).blocks * 512 < 2 * MiB, `sparse: ${fs.statSync(out).blocks * 512} bytes allocated of 8 MiB`);
  await t.rejects(diff.flatten(top, out), { code: 'EEXIST' }, 'an existing output is kept without force');
  await diff.flatten(top, out, { force: true });
  t.ok(fs.readFileSync(out).equals(expected));
});

t.test('a modified parent is detected, named, and can be accepted deliberately', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, MiB);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent.file, child);
  fs.chmodSync(parent.file, 0o644);
  const fd = fs.openSync(parent.file, 'r+');
  fs.writeSync(fd, Buffer.from('changed'), 0, 7, 500 * KiB);
  fs.closeSync(fd);
  t.throws(() => openImage(child), { code: 'EPARENTCHANGED', message: /parent\.raw changed.*modification time/ });
  t.throws(() => openImage(child, { write: true }), { code: 'EPARENTCHANGED' });
  const img = openImage(child, { ignoreParentGuard: true });
  t.match(img.info().parentGuard, /^changed: /, 'info reports the change');
  img.close();

  // same mtime, different content (mtime restored): the fingerprint catches the first 64 KiB
  const st = fs.statSync(parent.file);
  const fd2 = fs.openSync(parent.file, 'r+');
  fs.writeSync(fd2, Buffer.from('boot sector changed'), 0, 19, 0);
  fs.closeSync(fd2);
  fs.utimesSync(parent.file, st.atime, st.mtime);

  const r = diff.acceptParent(child);
  t.match(r.before, /^changed: /);
  const ok = openImage(child);
  t.equal(ok.info().parentGuard, 'ok', 'accepted');
  ok.close();
  assertClean(t, child, 'after accept-parent');
  t.equal(mode(parent.file) & 0o222, 0, 'accept-parent made the parent read-only again');
});

t.test('a parent replaced by other content with the same size and mtime is detected by the fingerprint', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, MiB);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent.file, child);
  const st = fs.statSync(parent.file, { bigint: true });
  fs.chmodSync(parent.file, 0o644);
  fs.writeFileSync(parent.file, pattern(MiB, 99));
  fs.utimesSync(parent.file, st.atime, new Date(Number(st.mtimeNs / 1000000n)));
  // utimes has microsecond resolution at best: set mtime exactly via the recorded value is not
  // possible from node, so accept either finding as long as content is among them.
  t.throws(() => openImage(child), { code: 'EPARENTCHANGED', message: /content/ });
});

t.test('a child made by qemu-img is adopted by accept-parent', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, MiB);
  const child = path.join(dir, 'q.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-b', 'parent.raw', '-F', 'raw', child);
  const guardOf = (f: string) => {
    const img = openImage(f);
    try {
      return img.info().parentGuard;
    } finally {
      img.close();
    }
  };
  t.equal(guardOf(child), 'unrecorded');
  const r = diff.acceptParent(child);
  t.equal(r.before, 'unrecorded');
  t.equal(guardOf(child), 'ok');
  t.same(diff.childrenOf(parent.file), [child]);
  assertClean(t, child, 'after adoption');
  assertShows(t, child, parent.bytes, 'after adoption');
  const info = qemuInfo(child);
  t.equal(info['backing-filename'], 'parent.raw', 'qemu still finds the backing file');
  // and once more, now in place
  diff.acceptParent(child);
  assertClean(t, child, 'after a second accept');
});

t.test('a second writer is refused by the lock, from disksnap and from a running qemu-io', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, MiB);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent.file, child);
  const a = Qcow2Image.open(child, { write: true });
  t.throws(() => Qcow2Image.open(child, { write: true }), { code: 'ELOCKED' }, 'second disksnap writer');
  t.throws(() => Qcow2Image.open(child), { code: 'ELOCKED' }, 'a reader while a writer is active');
  t.throws(() => diff.rollback(child), { code: 'ELOCKED' }, 'rollback of a child in use');
  t.ok(fs.existsSync(child));
  a.close();

  // qemu-io holding the image open (interactive, until we send quit)
  const q = spawn('qemu-io', ['-f', 'qcow2', child], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  q.stdout.on('data', (d: Buffer) => (out += d.toString()));
  q.stdin.write('write -P 0x11 0 4k\n');
  const deadline = Date.now() + 10000;
  while (!/wrote 4096/.test(out) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  t.match(out, /wrote 4096/, 'qemu-io has the image open and wrote to it');
  t.throws(() => Qcow2Image.open(child, { write: true }), { code: 'ELOCKED' }, 'disksnap refuses to write while qemu-io holds it');
  q.stdin.end('quit\n');
  await new Promise((r) => q.on('close', r));
  const img = Qcow2Image.open(child, { write: true });
  const b = Buffer.alloc(4096);
  img.readSync(b, 0);
  t.ok(b.every((x) => x === 0x11), 'after qemu-io quits, disksnap opens it and reads its write');
  img.close();
  // the parent is locked shared while a child is open: no writer on it
  const reader = Qcow2Image.open(child);
  t.throws(() => openImage(parent.file, { write: true }), { code: 'EBUSY' }, 'a parent with children refuses writable opens');
  t.throws(() => BlockFile.open(parent.file, { write: true }), { code: 'ELOCKED' }, 'and its file is locked against writers while a child is open');
  reader.close();
  qemuIo(child, ['read -P 0x11 0 4k']);
});

t.test('missing and looping backing files are clear errors', { skip }, async (t) => {
  const dir = t.testdir();
  const a = path.join(dir, 'a.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-u', '-b', 'nowhere.raw', '-F', 'raw', a, '1M');
  t.throws(() => openImage(a), { code: 'ENOENT', message: /backing file .*nowhere\.raw does not exist/ });
  const x = path.join(dir, 'x.qcow2');
  const y = path.join(dir, 'y.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-u', '-b', 'y.qcow2', '-F', 'qcow2', x, '1M');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-u', '-b', 'x.qcow2', '-F', 'qcow2', y, '1M');
  t.throws(() => openImage(x), { code: 'ECORRUPT', message: /loops/ });
});

t.test('a commit killed while it writes into the parent is finished by a re-run', { skip: skip || (fs.existsSync(CLI) ? false : 'needs the compiled CLI (npx tsc -p .)') }, async (t) => {
  const dir = t.testdir();
  const size = 192 * MiB;
  const parentFile = path.join(dir, 'parent.raw');
  fs.writeFileSync(parentFile, Buffer.alloc(0));
  fs.truncateSync(parentFile, size);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parentFile, child);
  const data = Buffer.alloc(size);
  randomFillSync(data);
  const img = Qcow2Image.open(child, { write: true });
  for (let pos = 0; pos < size; pos += 16 * MiB) img.writeSync(data.subarray(pos, pos + 16 * MiB), pos);
  img.close();
  const marker = commitMarkerPath(child);
  const untouched = fs.statSync(parentFile).mtimeMs;
  let killedWithProgress = false;
  for (let attempt = 0; attempt < 5 && !killedWithProgress; attempt++) {
    const p = spawn(process.execPath, [CLI, 'diff', 'commit', child], { stdio: 'ignore' });
    const exited = new Promise((r) => p.on('close', r));
    let done = false;
    void exited.then(() => (done = true));
    while (!done) {
      // the marker exists and the copy has begun changing the parent
      if (fs.existsSync(marker) && fs.statSync(parentFile).mtimeMs !== untouched) {
        p.kill('SIGKILL');
        killedWithProgress = true;
        break;
      }
      await new Promise((r) => setTimeout(r, 2));
    }
    await exited;
    if (!killedWithProgress) {
      // the commit won the race: start over with a fresh child holding the same data
      t.comment(`attempt ${attempt}: the commit finished before it could be killed`);
      await diff.createChild(parentFile, child, { force: true });
      fs.chmodSync(parentFile, 0o644);
      fs.writeFileSync(parentFile, Buffer.alloc(0));
      fs.truncateSync(parentFile, size);
      await diff.createChild(parentFile, child, { force: true });
      const again = Qcow2Image.open(child, { write: true });
      for (let pos = 0; pos < size; pos += 16 * MiB) again.writeSync(data.subarray(pos, pos + 16 * MiB), pos);
      again.close();
    }
  }
  if (!killedWithProgress) {
    t.skip('could not kill the commit in the middle on this machine (it is too fast)');
    return;
  }
  t.notOk(fs.readFileSync(parentFile).equals(data), 'killed before the parent held all of the child');
  t.throws(() => Qcow2Image.open(child), { code: 'EBUSY' }, 'the child refuses to open until the commit is finished');
  const r = await diff.commit(child);
  t.ok(r.resumed, 'resumed');
  t.equal(r.bytesCopied, size, 'the child was whole: everything is copied again');
  t.ok(fs.readFileSync(parentFile).equals(data), 'the parent holds every byte of the child');
  t.notOk(fs.existsSync(child));
  t.notOk(fs.existsSync(marker));
  t.equal(mode(parentFile), 0o644);
});

t.test('a commit marker of an earlier version: what it records as durable is not copied again', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, 4 * MiB);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent.file, child);
  const expected = Buffer.from(parent.bytes);
  writeChild(child, expected, [[0, pattern(4 * MiB, 21)]]);
  // as if an earlier version's commit had made the first 1 MiB durable (and then given the
  // child's clusters back)
  writeJsonAtomic(commitMarkerPath(child), {
    version: 1,
    parent: path.resolve(parent.file),
    keepChild: false,
    startedAt: new Date().toISOString(),
    parentMode: 0o444,
    durableBelow: MiB,
  });
  const r = await diff.commit(child);
  t.equal(r.bytesCopied, 3 * MiB, 'only the part above the durable prefix is copied');
  const now = fs.readFileSync(parent.file);
  t.ok(now.subarray(0, MiB).equals(parent.bytes.subarray(0, MiB)), 'the prefix was left alone');
  t.ok(now.subarray(MiB).equals(expected.subarray(MiB)), 'the rest is committed');
});
