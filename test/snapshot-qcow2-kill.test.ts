/**
 * `disksnap snapshot create` on a bitmap-tracked qcow2 volume, SIGKILLed after a random delay
 * (seeded: DISKSNAP_CRASH_SEED replays a run). The delays spread the kills over the whole
 * command: start-up, the store and lease, adding this snapshot's bitmap to the image, the
 * read, completion, and removing the parent's bitmap. ./snapshot-qcow2-crash.test.ts kills
 * at set points of the read; this one does not choose. Between kills qemu-io writes into the
 * image. After every kill:
 *   - the image is sound: `qemu-img check` finds no corruption (leaked clusters, counted as
 *     used but referenced by nothing, which a kill between two steps of a bitmap's update can
 *     leave as QEMU's own crashes do, are allowed; `diff check --repair` frees them at the end);
 *   - now and then a snapshot that is not killed runs: it still uses a bitmap (no killed
 *     attempt lost the tracking) and holds exactly the guest's bytes.
 * At the end every completed snapshot, killed ones that got to complete included, restores
 * exactly what the guest showed when it was taken.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as snap from '../src/storage';
import { CLI, MiB, runAndKill, sha } from '../fixtures/store/helpers';
import { cli } from './helpers/cli';
import { qemuCheck, qemuImgOk, qemuIo } from './helpers/qemu';
import { needQemuNbd } from './helpers/qemu-bitmaps';

const skip = needQemuNbd();
const SEED = Number(process.env.DISKSNAP_CRASH_SEED ?? Date.now() % 100000);
let state = SEED || 1;
function rand(): number {
  state = (state * 48271) % 2147483647;
  return state / 2147483647;
}

t.test(`SIGKILL of snapshot create at random moments on a bitmap-tracked qcow2 volume (seed ${SEED})`, { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vm.qcow2');
  const view = path.join(dir, 'view.raw');
  qemuImgOk('create', '-q', '-f', 'qcow2', vol, '48M');
  qemuIo(vol, ['write -P 0x11 0 20M']);
  /** sha of what the guest shows now */
  const guest = () => {
    qemuImgOk('convert', '-O', 'raw', vol, view);
    return sha(view);
  };
  const expected = new Map<string, string>(); // round tag -> the guest's sha then
  const create = (round: number) => [CLI, 'snapshot', 'create', vol, '--store', store, '--tag', `round=${round}`];
  let round = 0;
  const newRound = () => {
    round++;
    const writes = [0, 1, 2].map((w) => `write -P ${0x20 + ((round * 3 + w) % 200)} ${Math.floor(rand() * 46) * MiB + Math.floor(rand() * 16) * 65536} ${[512, 4096, 65536, 300_000][Math.floor(rand() * 4)]}`);
    qemuIo(vol, writes);
    expected.set(String(round), guest());
  };
  let finished = 0; // runs that exited 0: each left a completed snapshot
  /** runs one snapshot that is not killed; returns how long the command alone took */
  const clean = async (why: string) => {
    newRound();
    const t0 = Date.now();
    const r = await runAndKill(process.execPath, [...create(round), '--json'], 120_000);
    const ms = Date.now() - t0;
    t.equal(r.status, 0, `${why}: the snapshot completed ${r.stderr}`);
    if (r.status === 0) finished++;
    return ms;
  };

  // The first snapshot adds the bitmap; the second's run (the command alone, not the guest's
  // writes before it) sets the window of the kills. Timing the writes too made the window
  // twice the command, so half the kills landed after the exit and 10 in 30 tries failed.
  await clean('first');
  const createMs = await clean('second');

  // Until 10 were killed mid-way (a kill can land after the exit, and then the snapshot
  // completed: that is checked too).
  let kills = 0;
  let leaks = 0;
  for (let k = 0; kills < 10 && k < 40; k++) {
    newRound();
    const delay = 20 + rand() * createMs;
    const r = await runAndKill(process.execPath, create(round), delay);
    if (r.killed) kills++;
    else if (t.equal(r.status, 0, `round ${round}: not killed, so it completed ${r.stderr}`)) finished++;
    const c = qemuCheck(vol);
    t.ok(c.status === 0 || c.status === 3, `round ${round} (killed after ${Math.round(delay)} ms: ${r.killed}): qemu-img check finds no corruption${c.status === 0 || c.status === 3 ? '' : `: ${c.text}`}`);
    t.equal(c.result?.corruptions ?? 0, 0, `round ${round}: no corrupt cluster`);
    if (c.status === 3) leaks++;
    if (k % 4 === 3) {
      await clean(`round ${round + 1}`);
      const last = (await snap.listSnapshots({ store })).snapshots.find((s) => s.tags.round === String(round));
      t.equal(last?.changeSource, 'bitmap', `round ${round}: after the kills the next snapshot still reads a bitmap (${last?.changeSourceReason ?? ''})`);
    }
  }
  t.equal(kills, 10, `10 snapshot processes killed mid-way (${leaks} rounds left leaked clusters)`);

  const { snapshots, damaged } = await snap.listSnapshots({ store });
  t.same(damaged, [], 'no damaged records');
  const good = snapshots.filter((s) => s.state === 'completed');
  // A kill that lands after the record is completed but before the exit adds one more.
  t.ok(good.length >= finished && good.length >= 4, `${good.length} completed snapshots to restore (${finished} runs exited 0)`);
  for (const s of good) {
    const out = path.join(dir, `check-${s.id}.raw`);
    await snap.restoreSnapshot(s.id, { store, to: out });
    t.equal(sha(out), expected.get(s.tags.round), `${s.id} (round ${s.tags.round}, ${s.changeSource}) restores exactly the guest of its moment`);
    fs.unlinkSync(out);
  }

  // disksnap's own check frees what the kills leaked, and keeps the bitmap
  const repair = cli(['diff', 'check', '--repair', vol]);
  t.equal(repair.status, 0, `diff check --repair: ${repair.out}${repair.stderr}`);
  t.equal(qemuCheck(vol).status, 0, 'qemu-img check is clean after the repair');
  await clean('after the repair');
  const after = (await snap.listSnapshots({ store })).snapshots.find((s) => s.tags.round === String(round));
  t.equal(after?.changeSource, 'bitmap', 'the snapshot after the repair still reads the bitmap');
  const out = path.join(dir, 'last.raw');
  await snap.restoreSnapshot(after!.id, { store, to: out });
  t.equal(sha(out), expected.get(String(round)), 'and restores exactly');
});
