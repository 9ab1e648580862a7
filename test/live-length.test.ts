/**
 * A live checkpoint moves QEMU's active node onto a protocol node opened by the checkpoint's
 * path (src/differencing/live.ts, moveNodeToPath). QEMU's file driver learns a file's length
 * when it opens it and afterwards only from its own writes, so a cluster appended through the
 * old protocol node between the new node's open and the reopen lay past the new node's idea
 * of the end: reads of it returned zeros (a guest file lost its tail in vm-live.test.ts's
 * two-checkpoints test, 1 run in 4 on a loaded machine). The guest is paused over that window;
 * a writer that is not the guest (here an NBD client of QEMU's export, which a pause does not
 * stop) is caught by the length check after the reopen and the move is redone.
 *
 * If disksnap dies while the VM is paused (SIGKILL included), its resume guard
 * (src/host/qmp-cont-guard.ts) sends the `cont`.
 *
 * The window is made deterministic by a QMP proxy between disksnap and QEMU: it appends a
 * cluster through the export right before it forwards the first blockdev-reopen, and reads
 * it back through the moved node right before it forwards the switch.
 */
import t from 'tap';
import type { Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import * as diff from '../src/differencing';
import * as cp from '../src/differencing/checkpoint';
import { createLive } from '../src/differencing/live';
import { armed } from '../src/host/qmp-cont-guard';
import { namedNodes, type QmpClient } from '../src/host/qmp';
import { makeParent, needQemu, qemuImg } from './helpers/qemu';
import { missing } from './helpers/tools';
import { CLI, cli } from './helpers/cli';
import { connectQmp, socketPath, startBareQemu, stopQemu } from './helpers/guest';
import { qmpProxy } from './helpers/qmp-proxy';

const skip = needQemu() || missing({ commands: ['qemu-system-x86_64', 'qemu-io'] });
const MiB = 2 ** 20;

/** qemu-io on QEMU's NBD export of disk0 (raw: the export shows the guest view). */
function nbdIo(nbd: string, cmd: string): { ok: boolean; text: string } {
  const r = spawnSync('qemu-io', ['-f', 'raw', '-c', cmd, `nbd+unix:///disk0?socket=${nbd}`], { encoding: 'utf8', timeout: 30_000 });
  const text = `${r.stdout ?? ''}${r.stderr ?? ''}`;
  return { ok: r.status === 0 && !/fail|error/i.test(text), text: text.trim() };
}

/**
 * vm.qcow2, a child of a raw parent of `size` bytes, run by a QEMU without a guest (the image as
 * drive drv0, named nodes disk0/file0), with two QMP sockets: `qmp` the test's, `sock` for disksnap.
 */
async function runningChild(t: Test, size: number): Promise<{ image: string; sock: string; qmp: QmpClient }> {
  const dir = t.testdir();
  const { file: base } = makeParent(dir, size, 'base.raw');
  const image = path.join(dir, 'vm.qcow2');
  await diff.createChild(base, image);
  const mine = socketPath(t);
  const sock = socketPath(t, 'disksnap.sock');
  const qemu = await startBareQemu(mine, ['-drive', `file=${image},if=none,id=drv0,format=qcow2,node-name=disk0,file.node-name=file0`, '-qmp', `unix:${sock},server=on,wait=off`]);
  t.teardown(() => stopQemu(qemu));
  const qmp = await connectQmp(mine);
  t.teardown(() => qmp.close());
  return { image, sock, qmp };
}

t.test('a live checkpoint while a cluster is appended to IMAGE during the move: the cluster reads back through the node, the guest is paused only over the move', { skip }, async (t) => {
  const { image, sock, qmp } = await runningChild(t, 16 * MiB);
  const nbd = socketPath(t, 'nbd.sock');
  await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
  await qmp.execute('block-export-add', { type: 'nbd', id: 'exp', 'node-name': 'disk0', writable: true });
  t.ok(nbdIo(nbd, 'write -P 0x11 0 64k').ok, 'a first write through the export');

  const off = 8 * MiB; // never written: QEMU allocates it at the end of vm.qcow2
  let grew: [number, number] | undefined;
  let during: { ok: boolean; text: string } | undefined;
  const proxySock = socketPath(t, 'proxy.sock');
  const proxy = qmpProxy(proxySock, sock, (cmd) => {
    // the moved node serves reads before the switch: the cluster must be there
    if (cmd.execute === 'blockdev-snapshot-sync') during = nbdIo(nbd, `read -P 0x5a ${off} 64k`);
    const o = (cmd.arguments?.options as { 'read-only'?: boolean }[] | undefined)?.[0];
    if (cmd.execute !== 'blockdev-reopen' || grew || o?.['read-only'] !== false) return;
    const before = fs.statSync(image).size;
    const w = nbdIo(nbd, `write -P 0x5a ${off} 64k`);
    if (!w.ok) throw new Error(`the injected write failed: ${w.text}`);
    grew = [before, fs.statSync(image).size];
  });
  t.teardown(() => proxy.close());

  await createLive(image, 'c1', { qmp: proxySock });
  t.ok(grew && grew[1] > grew[0], `the injected write appended to IMAGE's file between the new node's open and the reopen (${grew?.join(' -> ')} bytes)`);
  const c = proxy.commands;
  const stop = c.indexOf('stop');
  const add = c.indexOf('blockdev-add');
  const reopen = c.indexOf('blockdev-reopen');
  const cont = c.indexOf('cont');
  t.ok(stop >= 0 && stop < add && add < reopen && reopen < cont, `the VM is paused from the new node's open to the reopen (${c.join(', ')})`);
  t.equal(c.filter((x) => x === 'stop').length, c.filter((x) => x === 'cont').length, 'every pause is ended');
  t.equal((await qmp.execute<{ running: boolean }>('query-status')).running, true, 'the VM runs after the checkpoint');
  t.ok(c.filter((x) => x === 'blockdev-add').length >= 3, 'the move onto the node was redone after the short length (3+ protocol nodes added)');

  t.ok(during?.ok, `the appended cluster reads back through the moved node before the switch (${during?.text.split('\n')[0]})`);
  const r = nbdIo(nbd, `read -P 0x5a ${off} 64k`);
  t.ok(r.ok, `the appended cluster reads back through the new top and the node (${r.text.split('\n')[0]})`);
  t.ok(nbdIo(nbd, 'read -P 0x11 0 64k').ok, 'the first write reads back');
  for (const f of [image, cp.nodePath(image, 'c1')]) {
    const k = qemuImg('check', '-U', f);
    t.equal(k.status, 0, `qemu-img check ${path.basename(f)}: ${k.stdout.trim().split('\n').pop()}${k.stderr}`);
  }
});

/**
 * Runs `checkpoint create` through the CLI against a proxy that SIGKILLs it when it sends its
 * first blockdev-add; returns the commands the proxy saw.
 */
async function killedAtMove(t: Test, image: string, sock: string): Promise<string[]> {
  let killed = false;
  const proxySock = socketPath(t, 'proxy.sock');
  const proxy = qmpProxy(proxySock, sock, (cmd) => {
    if (cmd.execute === 'blockdev-add' && !killed) {
      killed = true;
      child.kill('SIGKILL');
      return false;
    }
  });
  t.teardown(() => proxy.close());
  const child = spawn(process.execPath, [CLI, 'checkpoint', 'create', image, 'c1', '--qmp', proxySock], { stdio: 'ignore' });
  const exit = await new Promise<NodeJS.Signals | null>((res) => child.once('exit', (_c, sig) => res(sig)));
  t.equal(exit, 'SIGKILL', `disksnap was killed at its first blockdev-add (${proxy.commands.join(', ')})`);
  return proxy.commands;
}

/** The CLI in a child process, this process's event loop free (for the proxy) meanwhile. */
function cliAsync(args: string[]): Promise<{ status: number | null; stderr: string }> {
  const child = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
  return new Promise((res) => child.once('close', (status) => res({ status, stderr })));
}

async function runningAfter(qmp: QmpClient, ms: number): Promise<boolean> {
  const until = Date.now() + ms;
  for (;;) {
    const running = (await qmp.execute<{ running: boolean }>('query-status')).running;
    if (running || Date.now() > until) return running;
    await new Promise((r) => setTimeout(r, 100));
  }
}

t.test('disksnap SIGKILLed while the VM is paused for the move: its guard resumes the VM, which still runs IMAGE', { skip }, async (t) => {
  const { image, sock, qmp } = await runningChild(t, 8 * MiB);
  const ino = fs.statSync(image).ino;
  const c = await killedAtMove(t, image, sock);
  t.ok(c.includes('stop'), 'the VM was paused when disksnap was killed');
  t.ok(await runningAfter(qmp, 15_000), 'the guard resumed the VM');
  const devs = await qmp.execute<{ device: string; inserted?: { file: string } }[]>('query-block');
  t.equal(devs.find((d) => d.device === 'drv0')?.inserted?.file, image, 'QEMU still runs IMAGE');
  t.equal(fs.statSync(image).ino, ino, 'IMAGE is the file QEMU runs');
});

t.test('a VM the user paused: the checkpoint does not pause or resume it, nor does its guard when disksnap is killed', { skip }, async (t) => {
  const { image, sock, qmp } = await runningChild(t, 8 * MiB);
  await qmp.execute('stop');
  const c = await killedAtMove(t, image, sock);
  t.notOk(c.includes('stop') || c.includes('cont'), 'disksnap sent neither stop nor cont');
  t.notOk(await runningAfter(qmp, 3000), 'the VM is still paused 3 s after the kill (the guard was not armed)');
  const r = cli(['checkpoint', 'create', image, 'c2', '--qmp', sock]);
  t.equal(r.status, 0, `a checkpoint of the paused VM succeeds: ${r.stderr}`);
  t.notOk(fs.existsSync(cp.nodePath(image, 'c1')), "the killed create was undone first (its link is gone: QEMU still ran IMAGE)");
  t.same((await cp.list(image)).nodes.map((n) => n.name), ['c2'], 'the tree: c2 only');
  t.equal((await qmp.execute<{ running: boolean }>('query-status')).running, false, 'and leaves it paused');
});

t.test("the resume guard acts only on a pause in force: the last of 'armed' and 'safe' said", async (t) => {
  t.notOk(armed(''), 'nothing said');
  t.ok(armed('armed\n'), 'armed');
  t.notOk(armed('armed\nsafe\n'), 'armed, then safe');
  t.ok(armed('armed\nsafe\narmed\n'), 'a second pause in force');
  t.notOk(armed('armed\nsafe\narmed\nsafe\n'), 'the second ended');
});

t.test('a switch QEMU refuses after the node was moved is undone: the VM runs IMAGE over a protocol node of its name, nothing is left behind', { skip }, async (t) => {
  const { image, sock, qmp } = await runningChild(t, 8 * MiB);
  const ino = fs.statSync(image).ino;
  const proxySock = socketPath(t, 'proxy.sock');
  // QEMU itself refuses the switch: the overlay's node name is made one it already has
  const proxy = qmpProxy(proxySock, sock, (cmd) => {
    if (cmd.execute === 'blockdev-snapshot-sync') cmd.arguments = { ...cmd.arguments, 'snapshot-node-name': 'disk0' };
  });
  t.teardown(() => proxy.close());
  const r = await cliAsync(['checkpoint', 'create', image, 'n1', '--qmp', proxySock]); // this process serves the proxy meanwhile
  t.equal(r.status, 1, 'the live checkpoint fails');
  t.match(r.stderr, /EQMP/, `with QEMU's refusal (${r.stderr.trim()})`);
  const c = proxy.commands;
  t.ok(c.indexOf('blockdev-reopen') < c.indexOf('blockdev-snapshot-sync') && c.lastIndexOf('blockdev-reopen') > c.indexOf('blockdev-snapshot-sync'), `the node had been moved, and was moved back (${c.join(', ')})`);
  t.equal(c.filter((x) => x === 'stop').length, c.filter((x) => x === 'cont').length, 'every pause is ended');
  t.equal((await qmp.execute<{ running: boolean }>('query-status')).running, true, 'the VM runs');
  t.equal(fs.statSync(image).ino, ino, 'IMAGE is again the file QEMU writes (the link was renamed back)');
  t.notOk(fs.existsSync(cp.nodePath(image, 'n1')), 'no node');
  t.notOk(fs.existsSync(cp.journalPath(image)), 'no journal');
  const g = await qmp.execute<{ nodes: { id: number; name: string }[]; edges: { parent: number; child: number; name: string }[] }>('x-debug-query-block-graph');
  const disk0 = g.nodes.find((n) => n.name === 'disk0')!.id;
  const file = g.nodes.find((n) => n.id === g.edges.find((e) => e.parent === disk0 && e.name === 'file')?.child)!.name;
  const named = await namedNodes<{ 'node-name': string; file: string }>(qmp);
  t.equal(named.find((n) => n['node-name'] === file)?.file, image, "QEMU's node for IMAGE sits on a protocol node of IMAGE's own name");
  await qmp.execute('human-monitor-command', { 'command-line': 'qemu-io drv0 "write -P 0x3d 0 64k"' });
  await qmp.execute('human-monitor-command', { 'command-line': 'qemu-io drv0 flush' });
  const k = qemuImg('check', '-U', image);
  t.equal(k.status, 0, `qemu-img check -U IMAGE clean while QEMU runs it ${k.stdout}${k.stderr}`);
  const v = spawnSync('qemu-io', ['-r', '-U', '-f', 'qcow2', '-c', 'read -P 0x3d 0 64k', image], { encoding: 'utf8' });
  t.match(v.stdout, /read 65536\/65536/, "the VM's write reached IMAGE");
});
