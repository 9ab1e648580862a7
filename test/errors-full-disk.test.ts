/**
 * A full filesystem: every command that runs out of space says so in one line that names the
 * file it was writing, and leaves nothing half-written under a final name.
 * The filesystem is a small tmpfs of the test's own (root).
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { cli } from './helpers/cli';
import { missing } from './helpers/tools';

const skip = missing({ root: true, commands: ['mount', 'umount'] });

/** A tmpfs of `size` outside the test directory (which tap removes), unmounted at the end. */
function smallFs(t: typeof import('tap').default, size: string): string {
  const mp = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-full-'));
  const r = spawnSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', mp], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`mount tmpfs: ${r.stderr}`);
  t.teardown(() => {
    spawnSync('umount', ['-l', mp]);
    fs.rmdirSync(mp);
  });
  return mp;
}

function oneLineNaming(t: typeof import('tap').default, r: { status: number | null; stderr: string }, file: RegExp, what: string): void {
  t.equal(r.status, 1, `${what}: exit 1`);
  t.equal(r.stderr.trim().split('\n').length, 1, `${what}: one line`);
  t.match(r.stderr, /ENOSPC/, `${what}: says the disk is full`);
  t.match(r.stderr, file, `${what}: names the file`);
  t.notMatch(r.stderr, /internal error/, `${what}: not an internal error`);
}

t.test('ENOSPC names the file: write, write into a child, restore --to, diff commit', { skip }, async (t) => {
  const dir = t.testdir();
  const mp = smallFs(t, '2m');
  const data = path.join(dir, 'data.bin');
  fs.writeFileSync(data, randomBytes(4 << 20));

  const raw = path.join(mp, 'a.img');
  t.equal(cli(['create', raw, '8M']).status, 0);
  oneLineNaming(t, cli(['write', raw, '0', '-i', data]), /a\.img/, 'write into a raw image');

  // a child on the small filesystem over a parent outside it
  const parent = path.join(dir, 'parent.img');
  t.equal(cli(['create', parent, '8M']).status, 0);
  const child = path.join(mp, 'c.qcow2');
  fs.rmSync(raw);
  t.equal(cli(['diff', 'create', parent, child]).status, 0);
  oneLineNaming(t, cli(['write', child, '0', '-i', data]), /c\.qcow2/, 'write into a child');

  // restore --to onto the full filesystem: nothing left under the final name
  const vol = path.join(dir, 'vol.img');
  fs.copyFileSync(data, vol);
  const store = path.join(dir, 'store');
  const snap = cli(['snapshot', 'create', vol, '--store', store, '--json']);
  t.equal(snap.status, 0, snap.stderr);
  const id = (JSON.parse(snap.out) as { id: string }).id;
  const out = path.join(mp, 'restored.img');
  oneLineNaming(t, cli(['snapshot', 'restore', id, '--store', store, '--to', out]), /restored\.img/, 'restore --to');
  t.notOk(fs.existsSync(out), 'no output under the final name');

  // commit of a child outside into a parent on the full filesystem
  fs.rmSync(child);
  fs.rmSync(parent + '.disksnap-children.json', { force: true });
  fs.chmodSync(parent, 0o644);
  const smallParent = path.join(mp, 'p.img');
  t.equal(cli(['create', smallParent, '8M']).status, 0);
  const outerChild = path.join(dir, 'outer.qcow2');
  t.equal(cli(['diff', 'create', smallParent, outerChild]).status, 0);
  t.equal(cli(['write', outerChild, '0', '-i', data]).status, 0);
  oneLineNaming(t, cli(['diff', 'commit', outerChild]), /p\.img/, 'diff commit');
});

t.test('ENOSPC in diff flatten to qcow2 (its raw stage fits, the qcow2 does not): no output, no temporary file', { skip }, async (t) => {
  const dir = t.testdir();
  const mp = smallFs(t, '6m');
  const data = path.join(dir, 'data.bin');
  fs.writeFileSync(data, randomBytes(4 << 20));
  const parent = path.join(dir, 'parent.img');
  t.equal(cli(['create', parent, '8M']).status, 0);
  const child = path.join(dir, 'c.qcow2');
  t.equal(cli(['diff', 'create', parent, child]).status, 0);
  t.equal(cli(['write', child, '0', '-i', data]).status, 0);
  const out = path.join(mp, 'flat.qcow2');
  oneLineNaming(t, cli(['diff', 'flatten', child, out]), /flat\.qcow2/, 'flatten to qcow2');
  t.same(fs.readdirSync(mp), [], 'nothing left on the filesystem: no output, no raw or qcow2 temporary file');
  // the same with room for both stages: the flatten goes through
  fs.rmSync(data);
  const roomy = path.join(dir, 'flat.qcow2');
  const r = cli(['diff', 'flatten', child, roomy]);
  t.equal(r.status, 0, r.stderr);
  t.same(fs.readdirSync(dir).filter((f) => f.includes('disksnap-tmp')), [], 'and leaves no temporary file');
});
