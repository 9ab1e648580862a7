/**
 * `disksnap diff ...` and the image commands on children, as a user runs them: exit codes
 * (0, 1 with one line on stderr, check's 2 and 3), --json shapes, --force, and the foundation
 * commands (read, write, map, info --chain, bench) working through a chain.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { cli } from './helpers/cli';
import { assertClean, assertShows, needQemu, pattern, qemuInfo } from './helpers/qemu';

const MiB = 2 ** 20;
const skip = needQemu();
const FIXTURES = path.resolve(__dirname, '..', 'fixtures', 'qcow2');

function parent(dir: string, size = 2 * MiB): { file: string; bytes: Buffer } {
  const file = path.join(dir, 'base.raw');
  const bytes = pattern(size, 3);
  fs.writeFileSync(file, bytes);
  return { file, bytes };
}

t.test('diff create / write / read / map / info --chain / bench on a chain, then rollback', { skip }, async (t) => {
  const dir = t.testdir();
  const p = parent(dir);
  const child = path.join(dir, 'child.qcow2');
  let r = cli(['diff', 'create', p.file, child, '--cluster-size', '4k', '--json']);
  t.equal(r.status, 0, r.stderr);
  const created = JSON.parse(r.out) as { clusterSize: number; parentFormat: string; backingName: string };
  t.equal(created.clusterSize, 4096);
  t.equal(created.parentFormat, 'raw');
  t.equal(created.backingName, 'base.raw');

  r = cli(['diff', 'create', p.file, child]);
  t.equal(r.status, 1, 'an existing child is refused');
  t.match(r.stderr, /already exists.*--force/);
  t.equal(r.stderr.trim().split('\n').length, 1, 'one line on stderr');

  const data = pattern(70000, 4);
  r = cli(['write', child, '65000'], { input: data });
  t.equal(r.status, 0, r.stderr);
  const expected = Buffer.from(p.bytes);
  data.copy(expected, 65000);
  r = cli(['read', child, '60000', '80000']);
  t.equal(r.status, 0, r.stderr);
  t.ok(r.stdout.equals(expected.subarray(60000, 140000)), 'read shows the write over the parent');

  const gc = path.join(dir, 'gc.qcow2');
  t.equal(cli(['diff', 'create', child, gc]).status, 0);
  r = cli(['info', '--chain', '--json', gc]);
  t.equal(r.status, 0, r.stderr);
  const info = JSON.parse(r.out) as { format: string; backing: string; chain: { format: string; parentGuard?: string; allocatedBytes: number }[] };
  t.equal(info.format, 'qcow2');
  t.same(info.chain.map((l) => l.format), ['qcow2', 'qcow2', 'raw']);
  t.same(info.chain.map((l) => l.parentGuard), ['ok', 'ok', undefined]);

  r = cli(['map', '--json', gc]);
  t.equal(r.status, 0, r.stderr);
  const map = JSON.parse(r.out) as { extents: { start: number; length: number; depth: number; kind: string }[] };
  const at = (off: number) => map.extents.find((e) => e.start <= off && off < e.start + e.length)!;
  t.equal(at(70000).depth, 1, 'the written range comes from the middle layer');
  t.equal(at(MiB).depth, 2, 'the rest from the raw base');

  r = cli(['bench', gc, '-w', '-c', '2000', '-d', '4', '--json']);
  t.equal(r.status, 0, r.stderr);
  t.equal((JSON.parse(r.out) as { format: string }).format, 'qcow2');
  pattern(4096 * 2000, 0).fill(0).copy(expected, 0); // bench writes zeros (pattern 0)
  assertClean(t, gc, 'after bench');
  assertShows(t, gc, expected, 'after bench');

  r = cli(['diff', 'rollback', child]);
  t.equal(r.status, 1);
  t.match(r.stderr, /children of its own.*--recursive/);
  const filesBefore = fs.readdirSync(dir).sort();
  r = cli(['diff', 'rollback', '--recursive', '--dry-run', '--json', child]);
  t.equal(r.status, 0, r.stderr);
  const dry = JSON.parse(r.out) as { removed: string[]; remaining: string[]; dryRun: boolean };
  t.equal(dry.dryRun, true);
  t.same(dry.removed.map((f) => path.basename(f)), ['gc.qcow2', 'child.qcow2'], 'the dry run names what would go');
  t.same(dry.remaining, [], 'and that the base would have no children left');
  t.same(fs.readdirSync(dir).sort(), filesBefore, 'a dry run removes nothing');
  t.equal(fs.statSync(p.file).mode & 0o222, 0, 'the base stays read-only');
  r = cli(['diff', 'rollback', '--dry-run', child]);
  t.equal(r.status, 1, 'a dry run makes the same checks');
  t.match(r.stderr, /children of its own.*--recursive/);
  r = cli(['diff', 'rollback', '--recursive', '--json', child]);
  t.equal(r.status, 0, r.stderr);
  t.same((JSON.parse(r.out) as { removed: string[] }).removed.map((f) => path.basename(f)), ['gc.qcow2', 'child.qcow2']);
  t.equal(fs.statSync(p.file).mode & 0o777, 0o644, 'base writable again');
});

t.test('diff commit refuses with a sibling (exit 1), commits with --allow-sibling-change, reset and flatten', { skip }, async (t) => {
  const dir = t.testdir();
  const p = parent(dir);
  const a = path.join(dir, 'a.qcow2');
  const b = path.join(dir, 'b.qcow2');
  t.equal(cli(['diff', 'create', p.file, a]).status, 0);
  t.equal(cli(['diff', 'create', p.file, b]).status, 0);
  t.equal(cli(['write', a, '0'], { input: Buffer.alloc(5000, 0xee) }).status, 0);
  let r = cli(['diff', 'commit', a]);
  t.equal(r.status, 1);
  t.match(r.stderr, /other children .*b\.qcow2.*--allow-sibling-change/);

  const flat = path.join(dir, 'flat.raw');
  fs.writeFileSync(flat, 'keep');
  r = cli(['diff', 'flatten', a, flat]);
  t.equal(r.status, 1, 'flatten refuses an existing output');
  t.equal(fs.readFileSync(flat, 'utf8'), 'keep');
  r = cli(['diff', 'flatten', a, flat, '--force', '--json']);
  t.equal(r.status, 0, r.stderr);
  const expected = Buffer.from(p.bytes);
  expected.fill(0xee, 0, 5000);
  t.ok(fs.readFileSync(flat).equals(expected), 'flatten output');
  t.equal((JSON.parse(r.out) as { format: string }).format, 'raw', 'the JSON names the format');

  // qcow2 output: by --format, or by an OUT named *.qcow2; --format raw wins over the name.
  const flatQ = path.join(dir, 'flat.qcow2');
  r = cli(['diff', 'flatten', a, flatQ]);
  t.equal(r.status, 0, r.stderr);
  t.match(r.out, /: qcow2, /, 'the report says qcow2');
  const info = qemuInfo(flatQ);
  t.equal(info.format, 'qcow2', 'an OUT named *.qcow2 is a qcow2 image');
  t.equal(info['backing-filename'], undefined, 'standalone: no backing file');
  assertClean(t, flatQ, 'the flattened qcow2');
  assertShows(t, flatQ, expected, 'the flattened qcow2');
  const flatF = path.join(dir, 'flat-by-flag.img');
  t.equal(cli(['diff', 'flatten', a, flatF, '--format', 'qcow2']).status, 0);
  t.equal(qemuInfo(flatF).format, 'qcow2', '--format qcow2 with any name');
  const flatR = path.join(dir, 'flat-raw.qcow2');
  t.equal(cli(['diff', 'flatten', a, flatR, '--format', 'raw']).status, 0);
  t.ok(fs.readFileSync(flatR).equals(expected), '--format raw wins over a .qcow2 name');
  r = cli(['diff', 'flatten', a, path.join(dir, 'x.vmdk'), '--format', 'vmdk']);
  t.equal(r.status, 2, 'an unknown format is bad usage');
  t.notOk(fs.existsSync(path.join(dir, 'x.vmdk')), 'and writes nothing');
  t.same(fs.readdirSync(dir).filter((f) => f.includes('disksnap-tmp')), [], 'no temporary file left behind');

  r = cli(['diff', 'reset', a]);
  t.equal(r.status, 0, r.stderr);
  assertShows(t, a, p.bytes, 'after reset');

  t.equal(cli(['write', a, '100'], { input: Buffer.alloc(10, 0xdd) }).status, 0);
  r = cli(['diff', 'commit', a, '--force', '--json']);
  t.equal(r.status, 2, 'the old name is bad usage now');
  t.match(r.stderr, /diff commit --force is now --allow-sibling-change/);
  r = cli(['diff', 'commit', a, '--allow-sibling-change', '--json']);
  t.equal(r.status, 0, r.stderr);
  const res = JSON.parse(r.out) as { siblings: string[]; bytesCopied: number };
  t.same(res.siblings.map((f) => path.basename(f)), ['b.qcow2']);
  r = cli(['read', b, '0', '10']);
  t.equal(r.status, 1, 'the sibling refuses to read through its changed parent');
  t.match(r.stderr, /base\.raw changed since the child was made.*accept-parent/);
  t.equal(cli(['diff', 'accept-parent', b]).status, 0);
  r = cli(['read', b, '100', '10']);
  t.equal(r.status, 0, r.stderr);
  t.ok(r.stdout.equals(Buffer.alloc(10, 0xdd)));
});

t.test('diff check: exit 0 clean, 3 leaks (repaired with --repair), 2 corruption; --json', async (t) => {
  const dir = t.testdir();
  for (const f of ['good.qcow2', 'leaked-cluster.qcow2', 'refcount-zero-in-use.qcow2']) fs.copyFileSync(path.join(FIXTURES, f), path.join(dir, f));
  let r = cli(['diff', 'check', path.join(dir, 'good.qcow2')]);
  t.equal(r.status, 0, r.stderr);
  t.match(r.out, /No errors were found/);
  r = cli(['diff', 'check', '--json', path.join(dir, 'leaked-cluster.qcow2')]);
  t.equal(r.status, 3);
  t.equal((JSON.parse(r.out) as { leaks: number }).leaks, 1);
  r = cli(['diff', 'check', '--repair', path.join(dir, 'leaked-cluster.qcow2')]);
  t.equal(r.status, 0, 'repaired');
  t.match(r.out, /Repaired 1 leaked cluster/);
  r = cli(['diff', 'check', path.join(dir, 'refcount-zero-in-use.qcow2')]);
  t.equal(r.status, 2);
  t.match(r.out, /ERROR cluster 3/);
  r = cli(['diff', 'check', path.join(dir, 'missing.qcow2')]);
  t.equal(r.status, 1, 'a missing file is a failure (exit 1)');
});

t.test('a child made by the CLI is what qemu-img expects', { skip }, async (t) => {
  const dir = t.testdir();
  const p = parent(dir, MiB);
  const child = path.join(dir, 'c.qcow2');
  t.equal(cli(['diff', 'create', p.file, child]).status, 0);
  const info = qemuInfo(child);
  t.equal(info['cluster-size'], 65536);
  t.equal(info['virtual-size'], MiB);
  t.equal(info['backing-filename-format'], 'raw');
  assertClean(t, child, 'fresh');
});
