/**
 * A live storage snapshot of a running guest (src/storage/live.ts) with qemu-guest-agent in the
 * guest (on its second serial port, ttyS1): the guest writes files continuously, each with its
 * md5 in /data/sums; the snapshot freezes it through the agent for the switch ('guest-frozen'),
 * the guest writes on, and its later writes land in IMAGE. The snapshot, restored to a new raw
 * file, is a clean ext4 filesystem (e2fsck -fn from the host: the freeze flushed the journal)
 * and boots, and every file it lists checks out. Then a process that froze the guest is
 * SIGKILLed while it is frozen: the thaw guard thaws it. Two boots in all (TCG is slow).
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import type { Test } from 'tap';
import * as diff from '../src/differencing';
import { createLiveSnapshot, liveOverlaysOf } from '../src/storage/live';
import { restoreSnapshot, showSnapshot } from '../src/storage';
import { qemuCheck, qemuImgOk } from './helpers/qemu';
import { cli, ROOT } from './helpers/cli';
import { bootGuest, Guest, guestAgentArgs, guestAgentFiles, jobOk, makeRootfs, needGuest, needGuestAgent, readGuestFile, socketPath } from './helpers/guest';

const skip = needGuest() || needGuestAgent();
const MAX_FILES = 1000;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Writes files (each with its md5 in /data/sums, then a sync) until the test types a line. */
const writerJob = `qemu-ga -m isa-serial -p /dev/ttyS1 -f /tmp/qga.pid -t /tmp -l /tmp/qga.log &
(read x </dev/console; touch /tmp/stop) &
i=0
while [ ! -f /tmp/stop ] && [ $i -lt ${MAX_FILES} ]; do
  dd if=/dev/urandom of=/data/f$i bs=64k count=2 2>/dev/null
  md5sum /data/f$i >> /data/sums
  sync
  echo "W $i"
  sleep 0.2
  i=$((i+1))
done
echo "WROTE $i"
`;

const checkJob = `cd /data && echo "SUMS $(wc -l < sums) OK $(md5sum -c sums 2>/dev/null | grep -c ': OK$') FILES $(ls | grep -c '^f')"\n`;

function lines(buf: Buffer | undefined): number {
  return buf ? buf.toString().split('\n').filter((l) => l !== '').length : 0;
}

const written = (g: Guest) => (g.output.match(/^W \d+$/gm) ?? []).length;

/**
 * A process that froze the guest through the agent is SIGKILLed while it is frozen: the guest's
 * writer (write, sync, print) stops while frozen and goes on once the guard process has thawed.
 */
async function killedWhileFrozen(t: Test, g: Guest, qga: string): Promise<void> {
  const script = `const q = require(${JSON.stringify(path.join(ROOT, 'dist/src/host/qga.js'))});
(async () => { const c = await q.QgaClient.connect(${JSON.stringify(qga)}, 10000); const f = await q.guestFreeze(c, 30000); console.log('FROZEN ' + f.filesystems); setInterval(() => {}, 1000); })().catch((e) => { console.log('ERR ' + e.message); process.exit(1); });`;
  const child = spawn(process.execPath, ['-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout!.on('data', (b: Buffer) => (out += b.toString()));
  for (let i = 0; i < 300 && !/FROZEN|ERR/.test(out); i++) await sleep(100);
  t.match(out, /^FROZEN [1-9]/, `a second process froze the guest (${out.trim()})`);
  await sleep(1500); // a write loop already past its sync may still print once
  const atKill = written(g);
  await sleep(2000);
  t.equal(written(g), atKill, `the guest's writer stands still while frozen (at ${atKill} files)`);
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGKILL');
  await gone;
  let moved = false;
  for (let i = 0; i < 200 && !moved; i++) {
    await sleep(100);
    moved = written(g) > atKill;
  }
  t.ok(moved, 'after the SIGKILL the guard thawed the guest: its writer goes on');
}

function e2fsck(raw: string): { status: number | null; text: string } {
  const r = spawnSync('e2fsck', ['-fn', raw], { encoding: 'utf8', env: { ...process.env, PATH: `${process.env.PATH}:/sbin:/usr/sbin` } });
  return { status: r.status, text: r.stdout + r.stderr };
}

t.test('a live snapshot with the guest agent: guest-frozen, the VM writes on into IMAGE, the snapshot boots clean', { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const base = path.join(dir, 'base.raw');
  makeRootfs(base, { executables: guestAgentFiles() });
  const image = path.join(dir, 'vm.qcow2');
  await diff.createChild(base, image);
  const qmp = socketPath(t);
  const qga = socketPath(t, 'qga.sock');
  const g = new Guest({ disk: image, job: writerJob, qmp, extraArgs: guestAgentArgs(qga), log: path.join(dir, 'console.log') });
  let id = '';
  let total = 0;
  try {
    await g.waitFor(/^W 3$/m);
    // no --qga: the agent's chardev (id qga0) is found through QMP
    const r = cli(['snapshot', 'create', image, '--store', store, '--qmp', qmp, '--json']);
    t.equal(r.status, 0, `snapshot create --qmp while the guest writes: ${r.stderr}`);
    const rec = JSON.parse(r.out || '{}') as { id: string; consistency: string; frozenMs: number | null; live: { agent?: string; switchMs: number; commitMs: number } };
    id = rec.id;
    t.equal(rec.consistency, 'guest-frozen', 'the agent froze the guest for the switch');
    t.equal(rec.live.agent, qga, 'through the socket found on QEMU');
    t.ok(rec.frozenMs !== null && rec.frozenMs > 0 && rec.frozenMs < 10_000, `the freeze was bounded: ${rec.frozenMs} ms (switch ${rec.live.switchMs.toFixed(1)} ms, merge ${rec.live.commitMs.toFixed(0)} ms)`);
    const show = cli(['snapshot', 'show', id, '--store', store]);
    t.match(show.out, /consistency\s+guest-frozen \(the guest's filesystems frozen through qemu-guest-agent for [\d.]+ ms/, 'snapshot show prints it with the freeze time');
    await killedWhileFrozen(t, g, qga);
    g.send('stop');
    const res = await g.result;
    jobOk(t, res, 'the guest wrote its files, without stopping');
    total = Number(/^WROTE (\d+)$/m.exec(res.output)?.[1]);
    t.ok(total > 0 && total < MAX_FILES, `the writer stopped when told (${total} files)`);
  } finally {
    g.kill();
  }
  t.same(liveOverlaysOf(image), [], 'no temporary overlay left beside IMAGE');
  t.equal(qemuCheck(image).status, 0, 'IMAGE is qemu-img check clean');
  const now = path.join(dir, 'now.raw');
  qemuImgOk('convert', '-O', 'raw', image, now);
  t.equal(lines(readGuestFile(now, '/data/sums')), total, 'the writes after the snapshot landed in IMAGE');

  const restored = path.join(dir, 'restored.raw');
  await restoreSnapshot(id, { store, to: restored });
  const fsck = e2fsck(restored);
  t.equal(fsck.status, 0, 'the restored filesystem is clean (e2fsck -fn)', { text: fsck.text });
  const atSnap = lines(readGuestFile(restored, '/data/sums'));
  t.ok(atSnap >= 4 && atSnap < total, `the snapshot holds the files as of the switch (${atSnap} of ${total})`);
  const boot = await bootGuest({ disk: restored, format: 'raw', job: checkJob });
  jobOk(t, boot, 'the restored snapshot boots');
  const m = /^SUMS (\d+) OK (\d+) FILES (\d+)$/m.exec(boot.output);
  t.ok(m, 'the guest checked its files');
  t.equal(Number(m?.[1]), atSnap, 'its list of files is the one the snapshot holds');
  t.equal(Number(m?.[2]), atSnap, 'every listed file has its md5');
  t.ok(Number(m?.[3]) >= atSnap, 'and is there');
  t.equal((await showSnapshot(id, { store })).consistency, 'guest-frozen', 'the record says guest-frozen');
});
