/**
 * What QEMU (and a careless writer) can do to a chain outside disksnap, and what disksnap then
 * says and does: odd-sized parents sized as qemu-img sizes them, a child made standalone by
 * `qemu-img rebase -b ''` releasing its parent, guard messages that name what happened
 * (a commit into the parent, a different backing file), and a parent written with its mtime
 * set back caught by its ctime. qemu-img and qemu-io are the oracle.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as diff from '../src/differencing';
import { openImage } from '../src/image';
import { Qcow2Image } from '../src/image/qcow2/image';
import { childrenRegistryPath } from '../src/image/sidecars';
import { assertClean, makeParent, needQemu, pattern, qemuImgOk, qemuInfo, qemuIo, run } from './helpers/qemu';
import { missing } from './helpers/tools';

const MiB = 2 ** 20;
const skip = needQemu();
const mode = (f: string) => fs.statSync(f).mode & 0o777;

function virtualSize(file: string): number {
  return qemuInfo(file)['virtual-size'];
}

t.test('diff create on an odd-sized raw parent sizes the child as qemu-img create -b does; the tail is visible to QEMU', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, 1_000_000);
  const child = path.join(dir, 'child.qcow2');
  const info = await diff.createChild(parent.file, child);
  const oracle = path.join(dir, 'oracle.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-b', 'parent.raw', '-F', 'raw', oracle);
  t.equal(virtualSize(oracle), 1_000_448, 'qemu-img rounds the size up to 512 bytes');
  t.equal(info.virtualSize, virtualSize(oracle), 'diff create reports the same size');
  t.equal(virtualSize(child), virtualSize(oracle), 'qemu-img info sees the same size');
  // the last bytes, written by disksnap, read back by qemu-io
  const img = Qcow2Image.open(child, { write: true });
  img.writeSync(Buffer.alloc(548, 0xab), 999_900);
  img.close();
  qemuIo(child, ['read -P 0xab 999900 548']);
  t.pass('qemu-io reads the bytes disksnap wrote up to the end of the child');
  // the parent's last bytes still show through, and past its end the child reads zeros
  const tailOfParent = Buffer.alloc(900 - 64);
  const view = openImage(child);
  try {
    view.readSync(tailOfParent, 999_000);
    const past = Buffer.alloc(16);
    view.readSync(past, 1_000_448 - 16);
    t.ok(past.equals(Buffer.alloc(16, 0xab)), 'the written tail past the parent reads back');
  } finally {
    view.close();
  }
  t.ok(tailOfParent.equals(parent.bytes.subarray(999_000, 999_836)), 'the parent shows through below the write');
  assertClean(t, child, 'after the tail write');
});

t.test('after qemu-img rebase -b "" the former child is no child: diff children and rollback release the parent', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, MiB);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent.file, child);
  qemuIo(child, ['write -P 0x21 4096 4096']);
  t.equal(mode(parent.file), 0o444, 'read-only while it has a child');
  qemuImgOk('rebase', '-q', '-f', 'qcow2', '-b', '', child);
  t.throws(() => diff.rollback(child), { code: 'EINVALID', message: /no backing file.*standalone/ }, 'rollback refuses to delete a standalone image');
  t.ok(fs.existsSync(child), 'the standalone image is kept');
  t.same(diff.childrenOf(parent.file), [], 'diff children: none');
  t.equal(mode(parent.file), 0o644, 'the parent got its mode back');
  t.notOk(fs.existsSync(childrenRegistryPath(parent.file)), 'and the registry is gone');

  // two children, one made standalone: rolling back the other releases the parent
  const a = path.join(dir, 'a.qcow2');
  const b = path.join(dir, 'b.qcow2');
  await diff.createChild(parent.file, a);
  await diff.createChild(parent.file, b);
  qemuImgOk('rebase', '-q', '-f', 'qcow2', '-b', '', a);
  const r = diff.rollback(b);
  t.same(r.remaining, [], 'no children remain');
  t.equal(mode(parent.file), 0o644, 'the parent got its mode back');
});

t.test('the guard says what QEMU did: a commit wrote the parent, a rebase made it a different file, and what accept-parent would do', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, MiB);
  const mid = path.join(dir, 'mid.qcow2');
  await diff.createChild(parent.file, mid);
  qemuIo(mid, ['write -P 0x31 0 65536']);
  // qemu-img commit writes mid into the parent (root: the a-w mode does not stop it)
  qemuImgOk('commit', '-q', '-d', mid);
  const committed = t.throws(() => Qcow2Image.open(mid).close()) as Error;
  t.match(committed, { code: 'EPARENTCHANGED' });
  t.match(committed.message, /was written/, 'says the backing file was written');
  t.match(committed.message, /qemu-img commit/, 'names a commit as what writes a parent');
  t.match(committed.message, /accept-parent .*records/, 'says what accept-parent would do');
  t.notMatch(committed.message, /would show corrupt data/);

  const other = path.join(dir, 'other.raw');
  fs.writeFileSync(other, pattern(MiB, 9));
  qemuImgOk('rebase', '-q', '-f', 'qcow2', '-b', 'other.raw', '-F', 'raw', mid);
  const rebased = t.throws(() => Qcow2Image.open(mid).close()) as Error;
  t.match(rebased, { code: 'EPARENTCHANGED' });
  t.match(rebased.message, /different file/, 'says the backing file is a different file');
  t.match(rebased.message, /other\.raw/, 'names it');
  t.match(rebased.message, /accept-parent .*records/, 'says what accept-parent would do');
});

t.test('a parent written outside the sampled blocks with its mtime set back is caught by its ctime', { skip: skip || missing({ root: true }) }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, 4 * MiB);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent.file, child);
  const before = fs.statSync(parent.file, { bigint: true });
  // 100,000 lies between the first 64 KiB and the first sample (at 240 KiB): not fingerprinted
  const fd = fs.openSync(parent.file, 'r+');
  fs.writeSync(fd, Buffer.alloc(4096, 0xee), 0, 4096, 100_000);
  fs.closeSync(fd);
  const sec = before.mtimeNs / 1_000_000_000n;
  const nsec = (before.mtimeNs % 1_000_000_000n).toString().padStart(9, '0');
  const touch = run('touch', ['-m', '-d', `@${sec}.${nsec}`, parent.file]);
  t.equal(touch.status, 0, touch.stderr);
  t.equal(fs.statSync(parent.file, { bigint: true }).mtimeNs, before.mtimeNs, 'the mtime is back where it was');
  t.throws(() => Qcow2Image.open(child).close(), { code: 'EPARENTCHANGED', message: /ctime|status change/ }, 'the child refuses its changed parent');
  diff.acceptParent(child);
  Qcow2Image.open(child).close();
  t.pass('accept-parent records it as it is now');
});
