/**
 * `diff commit` against what QEMU lets a user do to a chain: a child grown past its qcow2
 * parent is committed as `qemu-img commit` commits it (the parent grows), and a commit that
 * must be refused is refused before it changes anything — no marker, the parent's bytes,
 * mtime and mode as they were, the child still usable. qemu-img is the oracle.
 */
import t, { Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as diff from '../src/differencing';
import { openImage } from '../src/image';
import { commitMarkerPath } from '../src/image/sidecars';
import { assertClean, makeParent, needQemu, pattern, qemuImgOk, qemuInfo, qemuIo, snapshotOf, assertUnchanged, Snapshot } from './helpers/qemu';

const MiB = 2 ** 20;
const skip = needQemu();
const mode = (f: string) => fs.statSync(f).mode & 0o777;

function virtualSize(file: string): number {
  return qemuInfo(file)['virtual-size'];
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

/** A qcow2 parent written by qemu-io (a pattern over its first `size` bytes). */
function qcow2Parent(dir: string, size: number, clusterSize = 65536): string {
  const parent = path.join(dir, 'parent.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusterSize}`, parent, String(size));
  qemuIo(parent, [`write -P 0x5a 0 ${size}`]);
  return parent;
}

/** Everything a refused commit must leave as it was. */
interface Before {
  parent: Snapshot;
  parentMode: number;
  child: Snapshot;
  shows: Buffer;
}

function before(parent: string, child: string): Before {
  return { parent: snapshotOf(parent), parentMode: mode(parent), child: snapshotOf(child), shows: readAll(child) };
}

function assertNothingChanged(t: Test, parent: string, child: string, b: Before, phase: string): void {
  t.notOk(fs.existsSync(commitMarkerPath(child)), `${phase}: no commit marker`);
  assertUnchanged(t, parent, b.parent, phase);
  t.equal(mode(parent), b.parentMode, `${phase}: the parent's mode is as it was`);
  t.equal(snapshotOf(child).sha, b.child.sha, `${phase}: the child's bytes are as they were`);
  t.ok(readAll(child).equals(b.shows), `${phase}: the child still reads, and shows what it showed`);
}

// 64 KiB clusters: the size alone changes; 4 KiB clusters (2 MiB per L1 entry): the L1 table
// grows from 1 to 3 entries inside its cluster
for (const clusterSize of [65536, 4096]) {
  t.test(`a child grown past its qcow2 parent (${clusterSize}-byte clusters) is committed as qemu-img commit does: the parent grows`, { skip }, async (t) => {
    const dir = t.testdir();
    const oracle = path.join(dir, 'oracle');
    fs.mkdirSync(oracle);
    const parent = qcow2Parent(dir, MiB, clusterSize);
    const child = path.join(dir, 'child.qcow2');
    await diff.createChild(parent, child);
    qemuImgOk('resize', '-q', child, String(5 * MiB));
    qemuIo(child, ['write -P 0x11 4096 8192', `write -P 0x22 ${2 * MiB} ${MiB}`, `write -P 0x33 ${MiB - 512} 1024`, `write -P 0x44 ${5 * MiB - 4096} 4096`]);
    const shows = readAll(child);
    t.equal(shows.length, 5 * MiB);
    // the oracle: qemu-img commit of the same chain, copied
    for (const f of [parent, child]) fs.copyFileSync(f, path.join(oracle, path.basename(f)));
    qemuImgOk('commit', '-q', path.join(oracle, 'child.qcow2'));

    const r = await diff.commit(child);
    t.equal(r.resumed, false);
    t.notOk(fs.existsSync(child), 'child removed');
    t.notOk(fs.existsSync(commitMarkerPath(child)), 'no marker left');
    t.equal(virtualSize(parent), 5 * MiB, 'the parent grew to the child size');
    assertClean(t, parent, 'after commit');
    qemuImgOk('compare', '-q', parent, path.join(oracle, 'parent.qcow2'));
    t.pass('qemu-img compare: the parent equals what qemu-img commit made');
    t.ok(readAll(parent).equals(shows), 'the parent shows what the child showed');
    t.equal(mode(parent), 0o644, 'parent writable again');
  });
}

t.test('a child grown past what the parent L1 table can map is refused before anything is written', { skip }, async (t) => {
  const dir = t.testdir();
  // 512-byte clusters: one L1 cluster (64 entries of 32 KiB each) maps 2 MiB
  const parent = qcow2Parent(dir, MiB, 512);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent, child);
  qemuImgOk('resize', '-q', child, String(4 * MiB));
  qemuIo(child, [`write -P 0x44 0 4096`, `write -P 0x55 ${3 * MiB} 4096`]);
  const b = before(parent, child);
  await t.rejects(diff.commit(child), { code: 'EUNSUPPORTED', message: /L1 table.*qemu-img resize/ });
  assertNothingChanged(t, parent, child, b, 'refused');
  diff.rollback(child);
  t.equal(mode(parent), 0o644, 'rollback still works and releases the parent');
});

t.test('commit of a child with internal snapshots is refused and changes nothing', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = makeParent(dir, MiB).file;
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent, child);
  qemuIo(child, ['write -P 0x66 0 65536']);
  qemuImgOk('snapshot', '-c', 's1', child);
  const b = before(parent, child);
  await t.rejects(diff.commit(child), { code: 'EUNSUPPORTED', message: /internal snapshots/ });
  assertNothingChanged(t, parent, child, b, 'refused');
  await t.rejects(diff.commit(child), { code: 'EUNSUPPORTED' }, 'refused again the same way (no marker left behind)');
  diff.rollback(child);
  t.notOk(fs.existsSync(child), 'rollback works');
});

t.test('commit into a qcow2 parent with internal snapshots is refused and changes nothing', { skip }, async (t) => {
  const dir = t.testdir();
  const parent = qcow2Parent(dir, MiB);
  qemuImgOk('snapshot', '-c', 'base', parent);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent, child);
  qemuIo(child, ['write -P 0x77 65536 65536']);
  const b = before(parent, child);
  await t.rejects(diff.commit(child), { code: 'EUNSUPPORTED', message: /internal snapshots/ });
  assertNothingChanged(t, parent, child, b, 'refused');
  assertClean(t, parent, 'refused');
  diff.rollback(child);
  t.equal(mode(parent), 0o644, 'rollback still works and releases the parent');
});
