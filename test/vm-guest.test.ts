/**
 * Differencing disks under a real Linux guest (QEMU, TCG): the guest boots from disksnap's
 * children, writes files through its own ext4, and reads them back on the next boot. The
 * guest's reads and qemu-img are the oracles; the parent's bytes and mtime must never move.
 *
 * Each boot takes ~10 s under TCG: the tests keep to the boots that prove something.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as diff from '../src/differencing';
import { isDisksnapError } from '../src/engine/errors';
import { assertClean, assertUnchanged, qemuImgOk, snapshotOf } from './helpers/qemu';
import { bootGuest, Guest, jobOk, makeRootfs, needGuest, readGuestFile } from './helpers/guest';

const skip = needGuest();

/** A job that writes `name` with `content` into /data and syncs. */
const writeJob = (name: string, content: string) => `echo '${content}' > /data/${name} && sync && echo "WROTE ${name}"\n`;

/** A job that reports the content of each /data file (or MISSING). */
const readJob = (names: string[]) =>
  names.map((n) => `if [ -f /data/${n} ]; then echo "FILE ${n}=$(cat /data/${n})"; else echo "FILE ${n} MISSING"; fi`).join('\n') + '\n';

function filesSeen(output: string): Record<string, string> {
  const seen: Record<string, string> = {};
  for (const m of output.matchAll(/^FILE (\S+?)(?:=(.*)| MISSING)$/gm)) seen[m[1]] = m[2] ?? 'MISSING';
  return seen;
}

/** The guest view of an image as a raw file (for debugfs). */
function flat(image: string, out: string): string {
  qemuImgOk('convert', '-O', 'raw', image, out);
  return out;
}

t.test('a guest boots from a child and writes into it; the parent does not change; rollback forgets the write', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = path.join(dir, 'root.raw');
  makeRootfs(parent, { files: { 'data/base': 'from the parent\n' } });
  const before = snapshotOf(parent);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent, child);

  const r1 = await bootGuest({ disk: child, job: readJob(['base']) + writeJob('note', 'written by the guest') });
  jobOk(t, r1, `first boot ran its job`);
  t.match(r1.output, /^FILE base=from the parent$/m, 'the guest reads the parent through the child');
  t.match(r1.output, /^WROTE note$/m, 'the guest wrote its file');
  assertClean(t, child, 'after the guest wrote');
  assertUnchanged(t, parent, before, 'after the guest wrote');
  t.equal(readGuestFile(flat(child, path.join(dir, 'child.flat')), '/data/note')?.toString(), 'written by the guest\n', 'the host sees the guest file in the child');
  t.equal(readGuestFile(parent, '/data/note'), undefined, 'the parent has no such file');

  diff.rollback(child);
  t.notOk(fs.existsSync(child), 'rollback removed the child');
  assertUnchanged(t, parent, before, 'after rollback');
  await diff.createChild(parent, child);
  const r2 = await bootGuest({ disk: child, job: readJob(['base', 'note']) });
  jobOk(t, r2, `second boot ran its job`);
  t.same(filesSeen(r2.output), { base: 'from the parent', note: 'MISSING' }, 'after rollback the guest sees the parent again and no note');
  assertClean(t, child, 'after the second boot');
  assertUnchanged(t, parent, before, 'after the second boot');
});

t.test('while QEMU runs a child, rollback, reset and commit are refused and the guest keeps running', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = path.join(dir, 'root.raw');
  makeRootfs(parent);
  const before = snapshotOf(parent);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent, child);
  const g = new Guest({ disk: child, job: `echo hold-on > /data/held && sync && echo READY\nread go\n${readJob(['held'])}` });
  try {
    await g.waitFor(/^READY$/m);
    const refusals: [string, () => unknown][] = [
      ['rollback', () => diff.rollback(child)],
      ['reset', () => diff.reset(child)],
      ['commit', () => diff.commit(child)],
    ];
    for (const [name, op] of refusals) {
      let err: unknown;
      try {
        await op();
      } catch (e) {
        err = e;
      }
      t.ok(isDisksnapError(err, 'ELOCKED'), `${name} is refused with ELOCKED while QEMU holds the child (got ${String(err)})`);
    }
    t.ok(fs.existsSync(child), 'the child is still there');
    g.send('go');
    const r = await g.result;
    jobOk(t, r, `the guest finished its job`);
    t.same(filesSeen(r.output), { held: 'hold-on' }, 'the guest still reads what it wrote');
  } finally {
    g.kill();
  }
  assertClean(t, child, 'after the guest');
  assertUnchanged(t, parent, before, 'after the refusals');
});

t.test('a three-deep chain under the guest; commits fold it into the parent, which boots with every file', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = path.join(dir, 'root.raw');
  makeRootfs(parent);
  const chain = ['c1.qcow2', 'c2.qcow2', 'c3.qcow2'].map((n) => path.join(dir, n));
  let below = parent;
  for (const [i, c] of chain.entries()) {
    await diff.createChild(below, c);
    const r = await bootGuest({ disk: c, job: writeJob(`layer${i + 1}`, `in layer ${i + 1}`) + readJob(chain.slice(0, i + 1).map((_, j) => `layer${j + 1}`)) });
    jobOk(t, r, `boot on ${path.basename(c)}`);
    for (let j = 0; j <= i; j++) t.match(r.output, new RegExp(`^FILE layer${j + 1}=in layer ${j + 1}$`, 'm'), `on ${path.basename(c)} the guest sees layer${j + 1}`);
    assertClean(t, c, `after the boot on ${path.basename(c)}`);
    below = c;
  }
  const c3Before = flat(chain[2], path.join(dir, 'c3-before.raw'));
  for (const c of [...chain].reverse()) {
    await diff.commit(c);
    t.notOk(fs.existsSync(c), `commit removed ${path.basename(c)}`);
  }
  qemuImgOk('compare', '-f', 'raw', '-F', 'raw', c3Before, parent);
  t.pass('the parent now shows byte for byte what the top of the chain showed');
  const r = await bootGuest({ disk: parent, format: 'raw', job: readJob(['layer1', 'layer2', 'layer3']) });
  jobOk(t, r, `boot on the parent`);
  t.same(filesSeen(r.output), { layer1: 'in layer 1', layer2: 'in layer 2', layer3: 'in layer 3' }, 'the parent boots with all three layers');
});
