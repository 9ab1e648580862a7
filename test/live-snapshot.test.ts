/**
 * Live storage snapshots (src/storage/live.ts) against a QEMU without a guest (`-machine none`,
 * the image as a drive without a device), writes made through QEMU's own `qemu-io` monitor
 * command: the snapshot holds exactly the guest view at the switch, however QEMU writes
 * during the copy; QEMU ends on IMAGE with no temporary overlay in its graph; a merge back
 * that QEMU refuses leaves the VM on a valid chain, and the next run merges it. Without an agent
 * (or with one that never answers) the snapshot is 'crash-consistent'; a stand-in speaking the
 * agent's protocol shows the order freeze, switch, thaw, copy, and the thaw when QEMU refuses
 * the switch (the real qemu-ga in a real guest is in vm-live-snapshot.test.ts).
 */
import t from 'tap';
import type { Test } from 'tap';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as diff from '../src/differencing';
import { createLiveSnapshot, liveOverlaysOf } from '../src/storage/live';
import { restoreSnapshot, showSnapshot } from '../src/storage';
import { withFaults } from '../src/storage/faults';
import { isDisksnapError } from '../src/engine/errors';
import { namedNodes, QmpClient } from '../src/host/qmp';
import { makeParent, needQemu, qemuCheck, qemuImgOk, qemuIo, sha256, viewSha256 } from './helpers/qemu';
import { cli } from './helpers/cli';
import { missing } from './helpers/tools';
import { connectQmp, socketPath, startBareQemu, stopQemu } from './helpers/guest';

const skip = needQemu() || missing({ commands: ['qemu-system-x86_64'] });
const MiB = 2 ** 20;

function view(file: string): string {
  return viewSha256(file, { shared: true });
}

async function hmp(qmp: QmpClient, line: string): Promise<string> {
  return qmp.execute<string>('human-monitor-command', { 'command-line': line });
}

/** QEMU with the image as drive drv0; one QMP socket for the test, one (`sock`) for disksnap. */
async function qemuOn(t: Test, image: string): Promise<{ sock: string; qmp: QmpClient; stop: () => Promise<void> }> {
  const mine = socketPath(t);
  const sock = socketPath(t, 'disksnap.sock');
  const qemu = await startBareQemu(mine, ['-drive', `file=${image},if=none,id=drv0,format=qcow2`, '-qmp', `unix:${sock},server=on,wait=off`]);
  t.teardown(() => stopQemu(qemu));
  const qmp = await connectQmp(mine);
  t.teardown(() => qmp.close());
  return { sock, qmp, stop: () => stopQemu(qemu) };
}

/** The file a QEMU filename names (json:{...} when QEMU finds its backing names stale). */
function fileOf(name: string): string {
  return name.startsWith('json:') ? ((JSON.parse(name.slice(5)) as { file?: { filename?: string } }).file?.filename ?? name) : name;
}

/** The file drv0 runs, and every file a block node of QEMU has open. */
async function qemuFiles(qmp: QmpClient): Promise<{ active: string; nodes: string[] }> {
  const devs = await qmp.execute<{ device: string; inserted?: { file: string } }[]>('query-block');
  const nodes = await namedNodes<{ file: string }>(qmp);
  return { active: fileOf(devs.find((d) => d.device === 'drv0')!.inserted!.file), nodes: nodes.map((n) => fileOf(n.file)) };
}

/** A qcow2 child over a raw base (a chain: the guest view is what is stored), with known data. */
async function vmImage(dir: string): Promise<string> {
  const { file: base } = makeParent(dir, 8 * MiB, 'base.raw');
  const image = path.join(dir, 'vm.qcow2');
  await diff.createChild(base, image);
  qemuIo(image, ['write -P 0x11 0 2M', 'write -P 0x12 5M 1M']);
  return image;
}

function restoredView(dir: string, id: string, store: string): Promise<string> {
  const out = path.join(dir, `restored-${id}.raw`);
  return restoreSnapshot(id, { store, to: out }).then(() => sha256(out));
}

t.test('a live snapshot while QEMU writes: exactly the view at the switch; QEMU ends on IMAGE, the writes in it', { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const image = await vmImage(dir);
  const atSwitch = view(image);
  const { sock, qmp, stop } = await qemuOn(t, image);
  t.equal(cli(['snapshot', 'create', image, '--store', store]).status, 1, 'without --qmp: refused while QEMU holds IMAGE');

  let writes = 0;
  let halt = false;
  let writer: Promise<void> = Promise.resolve();
  let overlaySeen = '';
  const opts = withFaults(
    { store, qmp: sock },
    {
      afterSwitch: async () => {
        overlaySeen = (await qemuFiles(qmp)).active;
        // QEMU writes all through the copy: a different pattern each time, over the data and beyond
        writer = (async () => {
          for (let i = 0; !halt && i < 200; i++) {
            await hmp(qmp, `qemu-io drv0 "write -P ${0x40 + (i % 64)} ${(i % 7) * MiB} 512k"`);
            writes++;
          }
        })();
        await hmp(qmp, 'qemu-io drv0 "write -P 0x99 0 1M"');
      },
      beforeCommitBack: async () => {
        halt = true;
        await writer;
      },
    },
  );
  const { snapshot, live } = await createLiveSnapshot(image, opts);
  t.ok(writes > 0, `QEMU wrote during the copy (${writes} writes)`);
  t.match(overlaySeen, /vm\.qcow2\.live-snapshot-[0-9a-f]{8}\.qcow2$/, 'during the copy QEMU ran on the temporary overlay beside IMAGE');
  t.equal(snapshot.state, 'completed');
  t.equal(snapshot.consistency, 'crash-consistent', 'no agent: crash-consistent');
  t.equal(snapshot.frozenMs, null, 'nothing was frozen');
  t.match(live.reason ?? '', /no guest agent/, 'the report says why');
  t.equal(await restoredView(dir, snapshot.id, store), atSwitch, 'the snapshot restores to exactly the view at the switch');

  const after = await qemuFiles(qmp);
  t.equal(after.active, image, 'QEMU runs IMAGE again');
  t.notOk(after.nodes.some((f) => path.basename(f).includes('.live-snapshot-')), 'no temporary overlay left in its graph', { nodes: after.nodes });
  t.same(liveOverlaysOf(image), [], 'nor beside IMAGE');
  await hmp(qmp, 'qemu-io drv0 flush');
  const out = await hmp(qmp, 'qemu-io drv0 "read -P 0x99 0 1M"');
  t.notMatch(out, /Pattern verification failed/, 'the writes made during the copy are in IMAGE');
  t.not(view(image), atSwitch, '...so IMAGE moved on from the snapshot');

  // an incremental: the parent is the live snapshot, every block compared (no bitmap trusted)
  const now = view(image);
  const second = await createLiveSnapshot(image, { store, qmp: sock });
  t.equal(second.snapshot.parentId, snapshot.id, 'the next live snapshot is an incremental of the first');
  t.match(second.snapshot.changeSourceReason ?? '', /no bitmap is trusted/, 'its change source says why every block was compared');
  t.equal(await restoredView(dir, second.snapshot.id, store), now, 'and restores to the view at its own switch');
  await stop();
  t.equal(qemuCheck(image).status, 0, 'IMAGE is qemu-img check clean once QEMU is gone', { text: qemuCheck(image).text });
});

t.test('a merge back QEMU refuses: the VM keeps running on overlay -> IMAGE; the next run merges it first', { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const image = await vmImage(dir);
  const atSwitch = view(image);
  const { sock, qmp, stop } = await qemuOn(t, image);
  let overlay = '';
  const opts = withFaults(
    { store, qmp: sock },
    {
      afterSwitch: async () => {
        await hmp(qmp, 'qemu-io drv0 "write -P 0x77 1M 1M"');
      },
      // a slow backup job on the overlay node: QEMU refuses the commit job on a node in use
      beforeCommitBack: async () => {
        const devs = await qmp.execute<{ device: string; inserted: { 'node-name': string; file: string } }[]>('query-block');
        const top = devs.find((d) => d.device === 'drv0')!.inserted;
        overlay = fileOf(top.file);
        await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'sink', size: 8 * MiB });
        await qmp.execute('blockdev-backup', { 'job-id': 'blocker', device: top['node-name'], target: 'sink', sync: 'full', speed: 1 });
      },
    },
  );
  const err = await createLiveSnapshot(image, opts).then(
    () => undefined,
    (e: unknown) => e,
  );
  t.ok(isDisksnapError(err, 'EJOB'), `the merge failure is reported: ${String(err)}`);
  t.match(String(err), /completed, but the VM still runs on the temporary overlay/, 'saying the snapshot completed and where the VM runs');
  const id = /snapshot (snap-[0-9a-f]+) completed/.exec(String(err))?.[1] ?? '';
  t.equal((await showSnapshot(id, { store })).state, 'completed', 'the snapshot itself is complete');
  t.equal(await restoredView(dir, id, store), atSwitch, '...and holds the view at the switch');
  t.equal((await qemuFiles(qmp)).active, overlay, 'QEMU still runs the overlay');
  t.ok(fs.existsSync(overlay), 'which is kept (it holds the guest writes)');
  await hmp(qmp, 'qemu-io drv0 "write -P 0x78 3M 64k"');
  t.notMatch(await hmp(qmp, 'qemu-io drv0 "read -P 0x77 1M 1M"'), /failed/, 'the VM reads and writes on: overlay -> IMAGE is a valid chain');

  await qmp.execute('block-job-cancel', { device: 'blocker', force: true });
  await qmp.waitEvent((e) => e.event === 'BLOCK_JOB_CANCELLED' || e.event === 'BLOCK_JOB_COMPLETED', { timeoutMs: 10_000 });
  const logs: string[] = [];
  const again = await createLiveSnapshot(image, { store, qmp: sock, onLog: (m) => logs.push(m) });
  t.same(again.live.settled, [overlay], 'the next run settled the leftover overlay first');
  t.match(logs.join('\n'), /merging it back/, 'and said so');
  const files = await qemuFiles(qmp);
  t.equal(files.active, image, 'QEMU runs IMAGE again');
  t.notOk(files.nodes.some((f) => path.basename(f).includes('.live-snapshot-')), 'no overlay left in its graph');
  t.same(liveOverlaysOf(image), [], 'nor on disk');
  await hmp(qmp, 'qemu-io drv0 flush');
  t.notMatch(await hmp(qmp, 'qemu-io drv0 "read -P 0x78 3M 64k"'), /failed/, 'the writes made on the overlay reached IMAGE');
  t.notMatch(await hmp(qmp, 'qemu-io drv0 "read -P 0x77 1M 1M"'), /failed/, 'all of them');
  t.equal(await restoredView(dir, again.snapshot.id, store), view(image), 'the second snapshot holds IMAGE as merged');
  await stop();
  t.equal(qemuCheck(image).status, 0, 'IMAGE is qemu-img check clean once QEMU is gone', { text: qemuCheck(image).text });
});

t.test('leftover overlays QEMU does not run: an empty one is removed, one with data is kept and the snapshot refused', { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const image = await vmImage(dir);
  // an overlay with data, made before QEMU locks IMAGE (qemu-io opens the backing file)
  const spare = path.join(dir, 'spare.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', 'vm.qcow2', spare);
  qemuIo(spare, ['write -P 0x5e 0 64k']);
  const { sock } = await qemuOn(t, image);
  const empty = `${image}.live-snapshot-0000aaaa.qcow2`;
  qemuImgOk('create', '-q', '-f', 'qcow2', '-F', 'qcow2', '-b', 'vm.qcow2', empty);
  const r = await createLiveSnapshot(image, { store, qmp: sock });
  t.same(r.live.settled, [empty], 'the empty leftover was settled');
  t.notOk(fs.existsSync(empty), '...by removing it');
  const full = `${image}.live-snapshot-0000bbbb.qcow2`;
  fs.renameSync(spare, full);
  const before = sha256(full);
  const e = await createLiveSnapshot(image, { store, qmp: sock }).then(
    () => undefined,
    (x: unknown) => x,
  );
  t.ok(isDisksnapError(e, 'EBUSY'), `refused: ${String(e)}`);
  t.match(String(e), /holds guest writes.*diff commit/, 'naming the file and the way out');
  t.equal(sha256(full), before, 'the leftover with data is untouched');
});

t.test('CLI: snapshot create --qmp prints the consistency and why; an agent socket that never answers -> crash-consistent', { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const image = await vmImage(dir);
  const { sock } = await qemuOn(t, image);
  const r = cli(['snapshot', 'create', image, '--store', store, '--qmp', sock]);
  t.equal(r.status, 0, `snapshot create --qmp: ${r.stderr}`);
  t.match(r.out, /crash-consistent/, 'the consistency');
  t.match(r.out, /live: QEMU switched to vm\.qcow2\.live-snapshot-[0-9a-f]+\.qcow2 in [\d.]+ ms and merged it back/, 'the switch and merge');
  t.match(r.stderr, /no guest agent channel.*crash-consistent/, 'why it is not guest-frozen');

  // an agent socket that accepts and stays silent, like a guest whose agent is not running
  const qga = socketPath(t, 'qga.sock');
  const conns: net.Socket[] = [];
  const silent = net.createServer((c) => conns.push(c)).listen(qga);
  t.teardown(() => {
    for (const c of conns) c.destroy();
    silent.close();
  });
  const j = cli(['snapshot', 'create', image, '--store', store, '--qmp', sock, '--qga', qga, '--json']);
  t.equal(j.status, 0, `with a silent agent: ${j.stderr}`);
  const rec = JSON.parse(j.out) as { id: string; consistency: string; live: { reason: string; frozenMs: number | null } };
  t.equal(rec.consistency, 'crash-consistent', 'crash-consistent');
  t.match(rec.live.reason, /did not answer guest-ping/, 'the agent did not answer');
  const show = cli(['snapshot', 'show', rec.id, '--store', store]);
  t.match(show.out, /consistency\s+crash-consistent/, 'snapshot show prints it');
  t.equal(cli(['snapshot', 'create', image, '--store', store, '--qga', qga]).status, 2, '--qga without --qmp: usage error');
  const n = cli(['snapshot', 'create', image, '--store', store, '--qmp', sock, '--qga', qga, '--no-agent']);
  t.equal(n.status, 0, '--no-agent');
  t.match(n.stderr, /not used \(noAgent\).*crash-consistent/, '--no-agent: the agent is not asked, and the output says so');
});

/**
 * A stand-in for qemu-guest-agent speaking its protocol on a unix socket (the real agent in a
 * real guest is in vm-live-snapshot.test.ts): it records each command and when it came.
 */
function fakeAgent(t: Test): { sock: string; log: string[] } {
  const sock = socketPath(t, 'qga.sock');
  const log: string[] = [];
  const server = net.createServer((c) => {
    let buf = '';
    c.on('data', (b: Buffer) => {
      buf += b.toString('latin1').replace(/\xff/g, '');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const m = JSON.parse(buf.slice(0, nl)) as { execute: string; arguments?: { id?: number } };
        buf = buf.slice(nl + 1);
        log.push(m.execute);
        const ret = m.execute === 'guest-sync-delimited' ? m.arguments?.id : m.execute === 'guest-fsfreeze-freeze' || m.execute === 'guest-fsfreeze-thaw' ? 1 : {};
        c.write((m.execute === 'guest-sync-delimited' ? '\xff' : '') + JSON.stringify({ return: ret }) + '\n', 'latin1');
      }
    });
  }).listen(sock);
  t.teardown(() => server.close());
  return { sock, log };
}

t.test('with an agent: freeze, switch, thaw before the copy; a switch QEMU refuses is thawed too and changes nothing', { skip }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const image = await vmImage(dir);
  const { sock, qmp } = await qemuOn(t, image);
  const agent = fakeAgent(t);
  let atCopy: string[] = [];
  const ok = await createLiveSnapshot(image, withFaults({ store, qmp: sock, qga: agent.sock }, { afterSwitch: () => void (atCopy = [...agent.log]) }));
  t.equal(ok.snapshot.consistency, 'guest-frozen', 'guest-frozen');
  t.ok(ok.snapshot.frozenMs !== null && ok.snapshot.frozenMs >= 0, `the freeze time is recorded (${ok.snapshot.frozenMs} ms)`);
  t.same(atCopy.filter((c) => c.startsWith('guest-fsfreeze')), ['guest-fsfreeze-freeze', 'guest-fsfreeze-thaw'], 'frozen, then thawed before the copy began');

  // QEMU refuses the switch: the drive's node is in use by a job
  agent.log.length = 0;
  await qmp.execute('blockdev-add', { driver: 'null-co', 'node-name': 'sink', size: 8 * MiB });
  await qmp.execute('blockdev-backup', { 'job-id': 'blocker', device: 'drv0', target: 'sink', sync: 'full', speed: 1 });
  const before = await qemuFiles(qmp);
  const e = await createLiveSnapshot(image, { store, qmp: sock, qga: agent.sock }).then(
    () => undefined,
    (x: unknown) => x,
  );
  t.ok(isDisksnapError(e, 'EQMP'), `the switch failed: ${String(e)}`);
  t.same(agent.log.filter((c) => c.startsWith('guest-fsfreeze')), ['guest-fsfreeze-freeze', 'guest-fsfreeze-thaw'], 'the guest was thawed anyway');
  t.same(liveOverlaysOf(image), [], 'the unused overlay was removed');
  t.same((await qemuFiles(qmp)).active, before.active, 'QEMU still runs what it ran');
  await qmp.execute('block-job-cancel', { device: 'blocker', force: true });
});
