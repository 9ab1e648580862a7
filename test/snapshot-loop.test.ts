/**
 * The loopback case of the storage-snapshot issue: an ext4 filesystem in a raw image file,
 * files written through a loop mount, snapshotted, changed, then restored both to a new image
 * and in place; `e2fsck -fn` must be clean and the original files present, byte for byte.
 * Needs root, mount and e2fsprogs: skipped with the reason otherwise, and failed instead
 * under DISKSNAP_REQUIRE_TOOLS=1.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { MiB, allocated, ds, pattern } from '../fixtures/store/helpers';
import { missing } from './helpers/tools';

const skip = missing({ root: true, commands: ['mkfs.ext4', 'e2fsck', 'mount', 'umount'] });

function run(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: exit ${r.status}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** Mounts `img` on a fresh directory outside the test dir, runs fn, always unmounts. */
function withMount<T>(img: string, readOnly: boolean, fn: (dir: string) => T): T {
  const mnt = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-loop-'));
  try {
    run('mount', ['-o', readOnly ? 'loop,ro' : 'loop', img, mnt]);
    try {
      return fn(mnt);
    } finally {
      run('umount', [mnt]);
    }
  } finally {
    fs.rmdirSync(mnt);
  }
}

const original = {
  'a.txt': Buffer.from('the original text file\n'.repeat(100)),
  'b.bin': pattern(3 * MiB + 123, 1),
  'dir/c.bin': pattern(700 * 1024, 2),
};

function readTree(mnt: string): Record<string, Buffer> {
  const out: Record<string, Buffer> = {};
  for (const name of Object.keys(original)) {
    const p = path.join(mnt, name);
    if (fs.existsSync(p)) out[name] = fs.readFileSync(p);
  }
  return out;
}

function fsck(img: string): { status: number | null; out: string } {
  const r = spawnSync('e2fsck', ['-fn', img], { encoding: 'utf8' });
  return { status: r.status, out: r.stdout + r.stderr };
}

t.test('ext4 in a loop-mounted raw image: snapshot, change, restore to a new image and in place; e2fsck clean with the original files', { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const img = path.join(dir, 'ext4.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 96 * MiB);
  run('mkfs.ext4', ['-q', '-F', '-E', 'lazy_itable_init=0,lazy_journal_init=0', img]);
  withMount(img, false, (mnt) => {
    fs.mkdirSync(path.join(mnt, 'dir'));
    for (const [name, data] of Object.entries(original)) fs.writeFileSync(path.join(mnt, name), data);
  });
  t.equal(fsck(img).status, 0, 'the original filesystem is clean');

  let r = ds(['snapshot', 'create', img, '--store', store, '--name', 'before', '--json']);
  t.equal(r.status, 0, r.stderr);
  const before = JSON.parse(r.out);
  t.ok(before.stats.dataBlocks < before.volumeSize / before.blockSize, 'unused parts of the filesystem are not stored');

  withMount(img, false, (mnt) => {
    fs.unlinkSync(path.join(mnt, 'a.txt'));
    fs.writeFileSync(path.join(mnt, 'b.bin'), pattern(5 * MiB, 3));
    fs.writeFileSync(path.join(mnt, 'new.bin'), pattern(2 * MiB, 4));
  });
  r = ds(['snapshot', 'create', img, '--store', store, '--name', 'after', '--json']);
  t.equal(r.status, 0, r.stderr);
  const after = JSON.parse(r.out);
  t.ok(after.stats.blocksAdded > 0 && after.stats.blocksAdded < before.stats.blocksAdded + 20, `the second snapshot added ${after.stats.blocksAdded} blocks`);
  r = ds(['snapshot', 'diff', 'before', 'after', '--store', store, '--json']);
  t.ok(JSON.parse(r.out).changedBlocks.length > 0, 'diff sees the change');

  const restored = path.join(dir, 'restored.img');
  r = ds(['snapshot', 'restore', 'before', '--to', restored, '--store', store]);
  t.equal(r.status, 0, r.stderr);
  const f1 = fsck(restored);
  t.equal(f1.status, 0, `e2fsck -fn of the restored image is clean${f1.status ? `\n${f1.out}` : ''}`);
  t.ok(allocated(restored) < fs.statSync(img).size / 2, 'the restored image is sparse');
  withMount(restored, true, (mnt) => t.same(readTree(mnt), original, 'the original files, byte for byte, in the restored image'));

  r = ds(['snapshot', 'restore', 'before', '--in-place', img, '--store', store, '--json']);
  t.equal(r.status, 0, r.stderr);
  const report = JSON.parse(r.out);
  t.ok(report.blocksWritten + report.blocksPunched > 0 && report.blocksUnchanged > 0, `in place: ${report.blocksWritten} written, ${report.blocksPunched} punched, ${report.blocksUnchanged} unchanged`);
  const f2 = fsck(img);
  t.equal(f2.status, 0, `e2fsck -fn of the volume rolled back in place is clean${f2.status ? `\n${f2.out}` : ''}`);
  withMount(img, true, (mnt) => {
    t.same(readTree(mnt), original, 'the original files are back in the volume');
    t.notOk(fs.existsSync(path.join(mnt, 'new.bin')), 'the later file is gone');
  });
  r = ds(['snapshot', 'restore', 'after', '--in-place', img, '--store', store]);
  t.equal(r.status, 0, r.stderr);
  t.equal(fsck(img).status, 0, 'rolling forward again is clean too');
  withMount(img, true, (mnt) => t.ok(fs.existsSync(path.join(mnt, 'new.bin'))));
});

const noLosetup = missing({ root: true, commands: ['losetup'] });

t.test('a loop device is a volume too: snapshot through the device, restore to a file and in place, idempotently', { skip: noLosetup }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const img = path.join(dir, 'backing.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 16 * MiB);
  const fd = fs.openSync(img, 'r+');
  fs.writeSync(fd, pattern(2 * MiB, 7), 0, 2 * MiB, 3 * MiB);
  fs.closeSync(fd);
  const dev = run('losetup', ['-f', '--show', img]).trim();
  try {
    let r = ds(['snapshot', 'create', dev, '--store', store, '--block-size', '64K', '--name', 'dev', '--json']);
    t.equal(r.status, 0, r.stderr);
    t.equal(JSON.parse(r.out).volumeSize, 16 * MiB, 'the size of a block device comes from the device');
    const out = path.join(dir, 'restored.img');
    r = ds(['snapshot', 'restore', 'dev', '--to', out, '--store', store]);
    t.equal(r.status, 0, r.stderr);
    t.ok(fs.readFileSync(out).equals(fs.readFileSync(img)), 'restored byte-exact');
    const f2 = fs.openSync(dev, 'r+');
    fs.writeSync(f2, pattern(64 * 1024, 8), 0, 64 * 1024, 10 * MiB);
    fs.fsyncSync(f2);
    fs.closeSync(f2);
    r = ds(['snapshot', 'restore', 'dev', '--in-place', dev, '--store', store, '--json']);
    t.equal(r.status, 0, r.stderr);
    t.equal(JSON.parse(r.out).blocksPunched + JSON.parse(r.out).blocksWritten, 1, 'only the changed block is rewritten');
    r = ds(['snapshot', 'restore', 'dev', '--in-place', dev, '--store', store, '--json']);
    t.equal(JSON.parse(r.out).blocksPunched + JSON.parse(r.out).blocksWritten, 0, 're-running finds nothing to do');
  } finally {
    run('losetup', ['-d', dev]);
  }
  t.ok(fs.readFileSync(path.join(dir, 'restored.img')).equals(fs.readFileSync(img)), 'the backing file is back to the snapshot');
});
