/**
 * A directory store does not probe for O_DIRECT (src/storage/store/direct.ts forObjects): its
 * object buffers are page-aligned, and the addon falls back to the page cache by itself where
 * the filesystem refuses O_DIRECT. ramfs refuses it at open (EINVAL), so a store there takes
 * that fallback for every object it writes and reads.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import * as snap from '../src/storage';
import { DirectoryBackend } from '../src/storage/store/dir';
import { BlockFile } from '../src/engine/file';
import { native } from '../src/engine/native';
import { MiB, applyWrites, makeImage } from '../fixtures/store/helpers';
import { missing } from './helpers/tools';

const skip = missing({ root: true, commands: ['mount', 'umount'] });

/** A ramfs outside the test directory (which tap removes), unmounted at the end. */
function ramfs(t: typeof import('tap').default): string {
  const mp = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-ramfs-'));
  const r = spawnSync('mount', ['-t', 'ramfs', 'ramfs', mp], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`mount ramfs: ${r.stderr}`);
  t.teardown(() => {
    spawnSync('umount', ['-l', mp]);
    fs.rmSync(mp, { recursive: true, force: true });
  });
  return mp;
}

t.test('a store on a filesystem that refuses O_DIRECT (ramfs): snapshots and restores go through the page cache', { skip }, async (t) => {
  const mp = ramfs(t);
  t.throws(() => BlockFile.open(path.join(mp, 'probe'), { create: true, direct: true, lock: 'none' }), { code: 'EINVAL' }, 'ramfs refuses O_DIRECT at open');
  fs.rmSync(path.join(mp, 'probe'), { force: true });
  const store = path.join(mp, 'store');
  const dir = t.testdir();
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 8 * MiB, [{ offset: 0, length: 3 * MiB, seed: 5 }]);
  const full = await snap.createSnapshot(vol, { store, blockSize: 512 * 1024 });
  t.equal(full.state, 'completed');
  t.equal(full.stats.blocksAdded, 6, 'six 512 KiB blocks stored');
  applyWrites(vol, [{ offset: MiB + 4096, length: 64 * 1024, seed: 6 }]);
  const incr = await snap.createSnapshot(vol, { store, blockSize: 512 * 1024 });
  t.equal(incr.state, 'completed');
  t.ok(incr.stats.blocksAdded >= 1, 'the rewrite stored');
  const out = path.join(dir, 'out.img');
  await snap.restoreSnapshot(incr.id, { store, to: out });
  t.ok(fs.readFileSync(out).equals(fs.readFileSync(vol)), 'the restore is the volume, byte for byte');
  const v = await snap.verifySnapshot(incr.id, { store });
  t.equal(v.ok, true, 'every object reads back and matches its name');

  const be = new DirectoryBackend(store);
  const buf = be.allocBuffer(4096 * 3);
  t.equal(native().alignOffset(buf, 4096), 0, 'object buffers are still page-aligned there (no probe decided otherwise)');
  buf.fill(7);
  fs.mkdirSync(path.join(store, 'blocks', 'zz'), { recursive: true });
  t.equal(await be.putIfAbsent('blocks/zz/aligned', buf), true, 'an aligned object is written');
  t.ok((await be.get('blocks/zz/aligned')).equals(buf), 'and read back');
});
