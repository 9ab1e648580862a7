/**
 * Crash safety of ENCRYPTED snapshots: an encrypted volume whose data carries an ASCII marker
 * is snapshotted round after round through the real CLI, and the `snapshot create` is killed
 * with SIGKILL after a random delay (spread from process start-up to after completion); some
 * rounds also kill a `snapshot delete` or a `store gc`. Afterwards:
 *   - every `completed` snapshot restores byte-exact with the key (against the image as it was
 *     when that attempt started) and `snapshot verify` passes with the key, before and after
 *     a final `store gc`;
 *   - every create killed while its record was `pending` is `error` once later commands ran,
 *     and nothing else is `error` or `pending`;
 *   - no file anywhere in the store holds the marker, neither with the garbage of the killed
 *     runs nor after gc;
 *   - without the key, restore fails with exit 1 and leaves no output.
 * Replay the kill points with DISKSNAP_CRASH_SEED (the kills' timing still varies).
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import type { SnapshotJson } from '../src/storage';
import { Store } from '../src/storage/store/store';
import { CLI, KiB, MiB, ROOT, Write, applyWrites, ds, files, makeImage, runAndKill, sha } from '../fixtures/store/helpers';

const MARKER = 'DISKSNAP-CRASH-MARKER-41b9';
const BS = 16 * KiB;
const SIZE = 64 * MiB;
const SEED = Number(process.env.DISKSNAP_CRASH_SEED ?? Date.now() % 100000);
const rand = ((s: number) => () => (s = (s * 16807) % 2147483647) / 2147483647)((SEED % 2147483646) + 1);

/** Pattern writes with the marker stamped into every block they cover, so that each object a
 * snapshot stores of them holds the marker in its plaintext. */
function writeMarked(file: string, writes: Write[]): void {
  applyWrites(file, writes);
  const fd = fs.openSync(file, 'r+');
  try {
    for (const w of writes) for (let o = w.offset; o + MARKER.length <= w.offset + w.length; o += BS) fs.writeSync(fd, MARKER, o);
  } finally {
    fs.closeSync(fd);
  }
}

/** Store files (relative) whose bytes contain the marker. */
const holdingMarker = (dir: string) => files(dir).filter((f) => fs.readFileSync(path.join(dir, f)).includes(MARKER));

t.test(`SIGKILL of create, delete and gc on an encrypted volume: completed snapshots restore with the key, no plaintext in the store (seed ${SEED})`, async (t) => {
  const dir = t.testdir();
  const [store, vol, key, out] = ['store', 'vol.img', 'key', 'out'].map((n) => path.join(dir, n));
  fs.writeFileSync(key, randomBytes(32), { mode: 0o600 });
  makeImage(vol, SIZE);
  writeMarked(vol, [{ offset: 0, length: 24 * MiB, seed: 7 }]);
  t.ok(fs.readFileSync(vol).includes(MARKER), 'the image holds the marker (the search below can find it)');
  const reg = ds(['volume', 'register', vol, '--store', store, '--block-size', '16K', '--encrypted', '--key-file', key]);
  t.equal(reg.status, 0, reg.stderr);

  const expected = new Map<string, string>(); // round -> sha of the image when its create started
  let round = 0;
  const nextRound = () => {
    round++;
    writeMarked(vol, [
      { offset: Math.floor(rand() * 40) * MiB + Math.floor(rand() * 64) * KiB, length: MiB + Math.floor(rand() * 2 * MiB), seed: 300 + round },
      { offset: Math.floor(rand() * 63) * MiB, length: 4 * KiB, seed: 600 + round },
    ]);
    expected.set(String(round), sha(vol));
    return [CLI, 'snapshot', 'create', vol, '--store', store, '--key-file', key, '--tag', `round=${round}`];
  };
  // Records as they are on disk (Store.listSnapshots does not reap, unlike snap.listSnapshots).
  const raw = async () => (await (await Store.open(store)).listSnapshots()).snapshots;
  const completed = async () => (await raw()).filter((s) => s.state === 'completed');

  /** Runs to the end: exit status, stderr and wall time. */
  const timed = async (args: string[]) => {
    const t0 = Date.now();
    const r = await runAndKill(process.execPath, args, 60_000);
    return { ...r, ms: Date.now() - t0 };
  };

  // Two snapshots that are never killed: delete and gc have work from the start, and the
  // second one's wall time (start-up included) sets the spread of the kills.
  let createMs = 0;
  for (let i = 0; i < 2; i++) {
    const r = await timed(nextRound());
    createMs = r.ms;
    t.equal(r.status, 0, `round ${round}: create exits 0 ${r.stderr}`);
  }

  // Delete and gc through the compiled library with short pauses between their steps (its
  // test hooks), so that a kill lands inside them rather than only in start-up.
  const lib = JSON.stringify(path.join(ROOT, 'dist', 'src', 'storage', 'index.js'));
  const nap = '() => new Promise((r) => setTimeout(r, Math.random() * 40))';
  const hooked = (call: string) => ['-e', `const s = require(${lib}); const nap = ${nap}; ${call};`];
  const st = JSON.stringify(store);
  // Kills from late in start-up (loading the library) on: through the command, or after it.
  const load = await timed(hooked('0'));
  t.equal(load.status, 0, `the runner loads the library ${load.stderr}`);
  const loadMs = load.ms;
  const killAt = (spreadMs: number) => loadMs * 0.8 + rand() * spreadMs;
  const outcome = { early: 0, midway: 0, after: 0, deletesKilled: 0, gcsKilled: 0 };
  const interrupted = new Set<string>(); // creates killed while their record was pending

  // Where a create's record is pending, as the rounds so far tell: after the latest kill that
  // found no record, before the earliest that found it completed (or a whole unkilled run). Most
  // of a create is start-up, so that window is ~0.1 s of ~0.5 s: delays spread blindly missed it
  // in all 18 rounds of one CI run.
  let pendingFrom = 0;
  let pendingTo = 2 * createMs;
  for (let k = 0; k < 18 && (k < 12 || outcome.midway < 3); k++) {
    const before = new Set((await raw()).map((s) => s.id));
    // Stratified delays from 0 to 1.5x a create's time (early, mid-way, after completion), and
    // every fourth inside the window above.
    const delay = k % 4 === 3 ? pendingFrom + rand() * Math.max(0, pendingTo - pendingFrom) : (((k % 4) + rand()) / 4) * 2 * createMs;
    const t0 = Date.now();
    const r = await runAndKill(process.execPath, nextRound(), delay);
    const ran = Date.now() - t0;
    const mine = (await raw()).filter((s) => !before.has(s.id));
    t.ok(mine.length <= 1, `round ${round}: at most one new record`);
    if (!r.killed) t.equal(r.status, 0, `round ${round}: a create that was not killed exits 0 ${r.stderr}`);
    if (!r.killed || mine[0]?.state === 'completed') {
      t.equal(mine[0]?.state, 'completed', `round ${round}: a create that exited is completed`);
      outcome.after++;
      pendingTo = Math.min(pendingTo, r.killed ? delay : ran);
    } else if (mine.length === 0) {
      outcome.early++;
      pendingFrom = Math.max(pendingFrom, delay);
    } else {
      t.equal(mine[0].state, 'pending', `round ${round}: killed mid-way, the record is pending`);
      interrupted.add(mine[0].id);
      outcome.midway++;
    }

    const live = await completed();
    if (k % 3 === 0 && live.length >= 3) {
      const victim = live[Math.floor(rand() * live.length)].id;
      const d = await runAndKill(process.execPath, hooked(`s.deleteSnapshot(${JSON.stringify(victim)}, { store: ${st}, faults: { betweenSteps: nap } })`), killAt(100));
      if (d.killed) outcome.deletesKilled++;
      else t.equal(d.status, 0, `round ${round}: delete of ${victim} exits 0 ${d.stderr}`);
    } else if (k % 3 === 1) {
      const g = await runAndKill(process.execPath, hooked(`s.gc({ store: ${st}, faults: { beforeDelete: nap } })`), killAt(300));
      if (g.killed) outcome.gcsKilled++;
      else t.equal(g.status, 0, `round ${round}: gc exits 0 ${g.stderr}`);
    }
  }
  t.comment(`create ${createMs} ms, runner start-up ${loadMs} ms; outcomes ${JSON.stringify(outcome)}`);
  t.ok(outcome.midway >= 1, `${outcome.midway} creates were killed with their record pending`);
  t.ok(outcome.deletesKilled + outcome.gcsKilled >= 2, `${outcome.deletesKilled} deletes and ${outcome.gcsKilled} gcs were killed before they exited`);

  // Later commands mark them error (each create that gets going reaps stale records; gc and
  // this listing do too).
  const list = ds(['snapshot', 'list', '--store', store, '--key-file', key, '--json']);
  t.equal(list.status, 0, `snapshot list exits 0: no damaged records ${list.stderr}`);
  const listed: SnapshotJson[] = list.status === 0 ? JSON.parse(list.out).snapshots : [];
  const states = (want: string) => listed.filter((s) => s.state === want);
  t.same(states('pending').map((s) => s.id), [], 'no snapshot is left pending');
  t.same(states('error').map((s) => s.id).sort(), [...interrupted].sort(), 'exactly the creates killed mid-way are error');
  for (const s of states('error')) t.match(s.error, /ended before it completed \(crashed or killed\)/, `${s.id}: error says its writer died`);
  const good = states('completed');
  t.ok(good.length >= 2, `${good.length} completed snapshots`);
  t.ok(good.every((s) => s.encrypted && expected.has(s.tags.round)), 'every completed snapshot is encrypted and its round is readable with the key');
  t.same(holdingMarker(store), [], 'with the garbage of the killed runs, no file of the store holds the marker');

  fs.mkdirSync(out);
  const restoresWithKey = (when: string) => {
    for (const s of good) {
      const target = path.join(out, `${s.id}.img`);
      const r = ds(['snapshot', 'restore', s.id, '--store', store, '--to', target, '--key-file', key]);
      t.equal(r.status, 0, `${when}: restore ${s.id} exits 0 ${r.stderr}`);
      t.equal(fs.existsSync(target) && sha(target), expected.get(s.tags.round), `${when}: ${s.id} (round ${s.tags.round}) restores byte-exact`);
      fs.rmSync(target, { force: true });
      const v = ds(['snapshot', 'verify', s.id, '--store', store, '--key-file', key]);
      t.equal(v.status, 0, `${when}: ${s.id} verifies with the key ${v.stderr}`);
    }
  };
  restoresWithKey('after the kills');

  const last = good[good.length - 1];
  const nokey = ds(['snapshot', 'restore', last.id, '--store', store, '--to', path.join(out, 'nokey.img')], { DISKSNAP_PASSPHRASE: '' });
  t.equal(nokey.status, 1, 'without the key, restore exits 1');
  t.match(nokey.stderr, /ENOKEY/, 'and says a key is needed');
  t.same(fs.readdirSync(out), [], 'and leaves no output file, no temporary file');

  const g = ds(['store', 'gc', '--store', store, '--json']);
  t.equal(g.status, 0, `store gc exits 0 ${g.stderr}`);
  if (g.status === 0) t.equal(JSON.parse(g.out).liveSnapshots, good.length, 'gc keeps the blocks of every completed snapshot');
  t.same(files(store).filter((f) => path.basename(f).startsWith('.tmp-')), [], 'after gc, no temporary files remain');
  t.same(holdingMarker(store), [], 'after gc, no file of the store holds the marker');
  restoresWithKey('after gc');
});
