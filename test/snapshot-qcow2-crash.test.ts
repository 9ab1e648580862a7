/**
 * SIGKILL of `snapshot create` on a bitmap-tracked qcow2 volume: every completed snapshot
 * restores exactly, and the next snapshot still sees every change made since the last
 * completed one (the parent's bitmap survives a killed attempt).
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import * as snap from '../src/storage';
import { assertClean, qemuImgOk, qemuIo, guestBytes } from './helpers/qemu';
import { needQemuNbd, qemuBitmaps } from './helpers/qemu-bitmaps';
import { ROOT } from './helpers/cli';

const KiB = 1024;
const MiB = 2 ** 20;
const BS = 512 * KiB;
const skip = needQemuNbd();

/** Runs createSnapshot in a child process that SIGKILLs itself after chunk `at` of its read. */
function killedSnapshot(vol: string, store: string, at: number): NodeJS.Signals | null {
  const script = `
    const s = require(${JSON.stringify(path.join(ROOT, 'dist', 'src', 'storage', 'index.js'))});
    s.createSnapshot(${JSON.stringify(vol)}, { store: ${JSON.stringify(store)}, faults: { afterChunk: (a, c) => { if (c >= ${at}) process.kill(process.pid, 'SIGKILL'); } } })
      .then(() => process.exit(3), (e) => { console.error(e); process.exit(4); });`;
  return spawnSync(process.execPath, ['-e', script]).signal;
}

t.test('a snapshot killed mid-read loses no change: the next one uses the last completed bitmap', { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', vol, '48M');
  qemuIo(vol, ['write -P 0x11 0 24M']);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  const want1 = guestBytes(vol);
  for (let round = 0; round < 3; round++) {
    // changes spread over several 16 MiB groups, so the kill lands mid-read
    qemuIo(vol, [`write -P ${0x20 + round} ${round * MiB} 4k`, `write -P ${0x30 + round} ${20 * MiB + round * MiB} 4k`, `write -P ${0x40 + round} ${40 * MiB + round} 1`]);
    t.equal(killedSnapshot(vol, store, 0), 'SIGKILL', `round ${round}: the snapshot process was killed`);
  }
  const want = guestBytes(vol);
  const s2 = await snap.createSnapshot(vol, { store });
  t.equal(s2.parentId, s1.id, 'the parent is the last completed snapshot');
  t.equal(s2.changeSource, 'bitmap', `the bitmap of the last completed snapshot is still trusted (${s2.changeSourceReason})`);
  const out = path.join(dir, 'r.raw');
  await snap.restoreSnapshot(s2.id, { store, to: out });
  t.ok(fs.readFileSync(out).equals(want), 'it holds every change made across the killed attempts');
  fs.rmSync(out);
  await snap.restoreSnapshot(s1.id, { store, to: out });
  t.ok(fs.readFileSync(out).equals(want1), 'the first snapshot still restores exactly');
  t.same(qemuBitmaps(vol).map((b) => [b.name, b.flags]), [[s2.changeTracking!.bitmap, ['auto']]], 'the bitmaps of the killed attempts are gone with the older one');
  assertClean(t, vol, 'after the killed snapshots');
});
