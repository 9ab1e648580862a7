/**
 * The live paths through the CLI against a QEMU without a guest (`-machine none`, the image as
 * a drive without a device): `checkpoint create --qmp` switches QEMU to the new overlay at
 * IMAGE's path, `diff commit --qmp` pivots it onto the parent, `checkpoint delete --qmp` has
 * QEMU stream a node of its chain away (live-delete.ts), and without --qmp the QMP socket is
 * found from the QEMU holding the image (host/qmp-find.ts). QEMU's own view (query-block, its
 * block graph) and qemu-img (check, convert, compare) are the oracles; the guest versions are
 * in vm-live.test.ts and vm-live-delete.test.ts.
 */
import t from 'tap';
import type { Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as diff from '../src/differencing';
import * as cp from '../src/differencing/checkpoint';
import { namedNodes, QmpClient } from '../src/host/qmp';
import { makeParent, needQemu, qemuCheck, qemuImg, qemuImgOk, qemuIo, sha256, viewSha256 } from './helpers/qemu';
import { cli } from './helpers/cli';
import { missing } from './helpers/tools';
import { connectQmp, socketPath, startBareQemu, stopQemu } from './helpers/guest';
import * as os from 'node:os';
import { spawn, spawnSync } from 'node:child_process';
import { isDisksnapError } from '../src/engine/errors';
import { lockHolders } from '../src/host/qmp-find';

const skip = needQemu() || missing({ commands: ['qemu-system-x86_64'] });
const MiB = 2 ** 20;

function view(file: string): string {
  return viewSha256(file, { shared: true });
}

/** The file QEMU's drive drv0 runs (QEMU writes json:{...} when its backing names look stale). */
async function activeFile(qmp: QmpClient): Promise<string> {
  const devs = await qmp.execute<{ device: string; inserted?: { file: string } }[]>('query-block');
  const f = devs.find((d) => d.device === 'drv0')!.inserted!.file;
  return f.startsWith('json:') ? (JSON.parse(f.slice(5)) as { file: { filename: string } }).file.filename : f;
}

/** QEMU with the image as drive drv0, and two QMP sockets: one for the test, one (`sock`) for disksnap. */
async function qemuOn(t: Test, image: string, named = true): Promise<{ sock: string; qmp: QmpClient }> {
  const mine = socketPath(t);
  const sock = socketPath(t, 'disksnap.sock');
  // named nodes, as libvirt's -blockdev gives them (a live checkpoint refuses unnamed ones)
  const names = named ? ',node-name=disk0,file.node-name=file0' : '';
  const qemu = await startBareQemu(mine, ['-drive', `file=${image},if=none,id=drv0,format=qcow2${names}`, '-qmp', `unix:${sock},server=on,wait=off`]);
  t.teardown(() => stopQemu(qemu));
  const qmp = await connectQmp(mine);
  t.teardown(() => qmp.close());
  return { sock, qmp };
}

t.test('checkpoint create --qmp: QEMU runs the new overlay at the same path; the node keeps the old view', { skip }, async (t) => {
  const dir = t.testdir();
  const { file: base } = makeParent(dir, 4 * MiB, 'base.raw');
  const image = path.join(dir, 'vm.qcow2');
  await diff.createChild(base, image);
  qemuIo(image, ['write -P 0x5a 1M 1M']);
  const before = view(image);
  const { sock, qmp } = await qemuOn(t, image);
  // the offline create (the library without QMP; the CLI would find disksnap's socket, see
  // the discovery tests below) is refused while QEMU holds IMAGE
  let off: unknown;
  try {
    await cp.create(image, 'offline-refused');
  } catch (e) {
    off = e;
  }
  t.ok(isDisksnapError(off, 'ELOCKED'), `the offline create is refused while QEMU holds IMAGE (${String(off)})`);
  t.notOk(fs.existsSync(cp.nodePath(image, 'offline-refused')), 'and made no node');
  const r = cli(['checkpoint', 'create', image, 'n1', '--qmp', sock, '--json']);
  t.equal(r.status, 0, `checkpoint create --qmp: ${r.stderr}`);
  const node = cp.nodePath(image, 'n1');
  t.equal(await activeFile(qmp), image, 'QEMU runs IMAGE (the path)');
  t.not(fs.statSync(image).ino, fs.statSync(node).ino, '...which is a new file, the overlay');
  const nodes = await namedNodes<{ 'node-name': string; drv: string; ro: boolean }>(qmp);
  t.ok(nodes.some((n) => n.drv === 'qcow2' && n.ro), 'the old top is open read-only below it');

  t.equal(view(image), before, 'IMAGE shows what it showed');
  t.equal(view(node), before, 'the node shows the same');
  t.equal(cp.backingOf(node), base, 'the node is backed by base.raw from its new directory');
  t.equal(qemuCheck(node).status, 0, 'node clean');
  const rows = (JSON.parse(cli(['checkpoint', 'list', image, '--json']).out) as cp.TreeInfo);
  t.equal(rows.current, 'n1', 'list: IMAGE sits on n1');

  // a live commit right after: QEMU reopens the node read-write, by the name the checkpoint
  // gave it in QEMU (not IMAGE's path, which is the overlay's now); IMAGE's data goes into it
  await qmp.execute('human-monitor-command', { 'command-line': 'qemu-io drv0 "write -P 0x7c 0 64k"' });
  await qmp.execute('human-monitor-command', { 'command-line': 'qemu-io drv0 flush' });
  const afterWrite = view(image);
  t.not(afterWrite, before, 'the write reached IMAGE');
  const c = cli(['diff', 'commit', image, '--qmp', sock]);
  t.equal(c.status, 0, `diff commit --qmp right after a live checkpoint: ${c.stderr}`);
  t.notOk(fs.existsSync(image), 'IMAGE (the overlay) is gone after the pivot: QEMU runs the node');
  // QEMU keeps qcow2 metadata in memory until a flush; qemu-img reads the file
  await qmp.execute('human-monitor-command', { 'command-line': 'qemu-io drv0 flush' });
  t.equal(view(node), afterWrite, 'the node holds what IMAGE showed');
});

t.test('diff commit --qmp: QEMU pivots onto the parent, the child is deleted, the parent shows its data', { skip }, async (t) => {
  const dir = t.testdir();
  const { file: base } = makeParent(dir, 4 * MiB, 'base.raw');
  const image = path.join(dir, 'vm.qcow2');
  await diff.createChild(base, image);
  qemuIo(image, ['write -P 0x6b 0 2M', 'write -z 3M 64k']);
  const before = view(image);
  const { sock, qmp } = await qemuOn(t, image);
  const r = cli(['diff', 'commit', image, '--qmp', sock, '--json']);
  t.equal(r.status, 0, `diff commit --qmp: ${r.stderr}`);
  t.equal(await activeFile(qmp), base, 'QEMU now runs base.raw');
  t.notOk(fs.existsSync(image), 'the child is gone');
  t.equal(diff.childrenOf(base).length, 0, 'base.raw has no children');
  const out = path.join(dir, 'base-view.raw');
  qemuImgOk('convert', '-U', '-f', 'raw', '-O', 'raw', base, out);
  t.equal(sha256(out), before, 'base.raw shows what the child showed');
  const k = cli(['diff', 'commit', path.join(dir, 'absent.qcow2'), '--qmp', sock]);
  t.equal(k.status, 1, 'a child QEMU does not know: failure');
});

t.test('checkpoint create --qmp refuses a disk QEMU opened without node names, before changing anything', { skip }, async (t) => {
  const dir = t.testdir();
  const { file: base } = makeParent(dir, 1 * MiB, 'base.raw');
  const image = path.join(dir, 'vm.qcow2');
  await diff.createChild(base, image);
  const before = view(image);
  const ino = fs.statSync(image).ino;
  const { sock, qmp } = await qemuOn(t, image, false);
  const r = cli(['checkpoint', 'create', image, 'n1', '--qmp', sock]);
  t.equal(r.status, 1, 'refused');
  t.match(r.stderr, /node name/, 'saying why');
  t.equal(fs.statSync(image).ino, ino, 'IMAGE is the same file');
  t.notOk(fs.existsSync(cp.nodePath(image, 'n1')), 'no node');
  t.notOk(fs.existsSync(cp.journalPath(image)), 'no journal');
  t.equal(await activeFile(qmp), image, 'QEMU still runs IMAGE');
  t.equal(view(image), before, 'IMAGE shows what it showed');
});

t.test('a live checkpoint of a disk a block job uses is refused before anything changes; the job and the VM go on', { skip }, async (t) => {
  const dir = t.testdir();
  const { file: base } = makeParent(dir, 4 * MiB, 'base.raw');
  const image = path.join(dir, 'vm.qcow2');
  await diff.createChild(base, image);
  qemuIo(image, ['write -P 0x3c 2M 64k']);
  const before = view(image);
  const ino = fs.statSync(image).ino;
  const { sock, qmp } = await qemuOn(t, image);
  // a slow job on the disk: QEMU refuses snapshots of a node a block job uses
  await qmp.execute('block-stream', { 'job-id': 'slow', device: 'disk0', speed: 1 });
  const r = cli(['checkpoint', 'create', image, 'n1', '--qmp', sock]);
  t.equal(r.status, 1, 'the live checkpoint fails');
  t.match(r.stderr, /block job\(s\) slow .*nothing changed.*EBUSY/, `naming the job (${r.stderr.trim()})`);
  t.equal(fs.statSync(image).ino, ino, 'IMAGE is the file QEMU writes');
  t.notOk(fs.existsSync(cp.nodePath(image, 'n1')), 'no node');
  t.notOk(fs.existsSync(cp.journalPath(image)), 'no journal');
  const jobs = await qmp.execute<{ id: string; status: string }[]>('query-jobs');
  t.equal(jobs.find((j) => j.id === 'slow')?.status, 'running', 'the job runs on');
  t.equal(await activeFile(qmp), image, 'QEMU runs IMAGE');
  await qmp.execute('human-monitor-command', { 'command-line': 'qemu-io drv0 "write -P 0x3d 0 64k"' });
  await qmp.execute('human-monitor-command', { 'command-line': 'qemu-io drv0 flush' });
  t.not(view(image), before, "the VM's writes still reach IMAGE");
  const c = qemuImg('check', '-U', image);
  t.equal(c.status, 0, `qemu-img check -U IMAGE clean while QEMU runs it ${c.stdout}${c.stderr}`);
});

// ---- live checkpoint delete (live-delete.ts) and QMP socket discovery (host/qmp-find.ts) ----

/** IMAGE's view (or a node's) saved as raw, for qemu-img compare after QEMU quit. */
function saveView(file: string, out: string): string {
  qemuImgOk('convert', '-U', '-O', 'raw', file, out);
  return out;
}

function compareView(t: Test, saved: string, file: string, what: string): void {
  const r = qemuImg('compare', '-f', 'raw', saved, file);
  t.equal(r.status, 0, `qemu-img compare: ${what} shows what it showed (${r.stdout.trim()}${r.stderr.trim()})`);
}

/**
 * The files of QEMU's chain for drv0, top first (by node names: filenames can be json:{...}),
 * through namedNodes (QEMU 7.2 crashes on the query while a job that ended is not dismissed).
 */
async function chainFiles(qmp: QmpClient): Promise<string[]> {
  const named = await namedNodes<{ 'node-name': string; file: string }>(qmp);
  const g = await qmp.execute<{ nodes: { id: number; name: string }[]; edges: { parent: number; child: number; name: string }[] }>('x-debug-query-block-graph');
  const devs = await qmp.execute<{ device: string; inserted?: { 'node-name': string } }[]>('query-block');
  const out: string[] = [];
  for (let cur: string | undefined = devs.find((d) => d.device === 'drv0')!.inserted!['node-name']; cur !== undefined; ) {
    const f = named.find((n) => n['node-name'] === cur)!.file;
    out.push(fs.realpathSync(f.startsWith('json:') ? (JSON.parse(f.slice(5)) as { file: { filename: string } }).file.filename : f));
    const id = g.nodes.find((n) => n.name === cur)?.id;
    cur = g.nodes.find((n) => n.id === g.edges.find((e) => e.parent === id && e.name === 'backing')?.child)?.name;
  }
  return out;
}

async function flush(qmp: QmpClient): Promise<void> {
  await qmp.execute('human-monitor-command', { 'command-line': 'qemu-io drv0 flush' });
}

/**
 * A standalone IMAGE (no backing) with checkpoints:
 *   r (root) ── m ── u ── IMAGE          QEMU's chain
 *   r ── other                           a leaf off the chain
 *   m ── side                            a branch off the chain (a child of an inner node)
 * each layer with its own writes, overlapping the layers below.
 */
async function buildTree(dir: string): Promise<string> {
  const image = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', image, '8M');
  const ok = (r: { status: number | null; stderr: string }, what: string) => {
    if (r.status !== 0) throw new Error(`${what}: ${r.stderr}`);
  };
  qemuIo(image, ['write -P 0x11 0 2M', 'write -z 6M 64k']);
  ok(cli(['checkpoint', 'create', image, 'r']), 'create r');
  qemuIo(image, ['write -P 0x21 1M 1M']);
  ok(cli(['checkpoint', 'create', image, 'other']), 'create other');
  ok(cli(['checkpoint', 'revert', image, 'r']), 'revert r');
  qemuIo(image, ['write -P 0x22 1536k 2M', 'write -z 0 64k']);
  ok(cli(['checkpoint', 'create', image, 'm']), 'create m');
  qemuIo(image, ['write -P 0x31 3M 1M']);
  ok(cli(['checkpoint', 'create', image, 'side']), 'create side');
  ok(cli(['checkpoint', 'revert', image, 'm']), 'revert m');
  qemuIo(image, ['write -P 0x33 2M 2M']);
  ok(cli(['checkpoint', 'create', image, 'u']), 'create u');
  qemuIo(image, ['write -P 0x44 5M 64k', 'write -P 0x45 1M 64k']);
  return image;
}

t.test('checkpoint delete while QEMU runs IMAGE: a leaf off the chain offline, then an inner node, the node under IMAGE and the root by block-stream; no view changes', { skip }, async (t) => {
  const dir = t.testdir();
  const image = await buildTree(dir);
  const saved = path.join(dir, 'saved');
  fs.mkdirSync(saved);
  const imageView = saveView(image, path.join(saved, 'image.raw'));
  const sideView = saveView(cp.nodePath(image, 'side'), path.join(saved, 'side.raw'));
  const { sock, qmp } = await qemuOn(t, image);
  const node = (n: string) => fs.realpathSync(cp.nodePath(image, n));
  t.same(await chainFiles(qmp), [fs.realpathSync(image), node('u'), node('m'), node('r')], "QEMU's chain: IMAGE, u, m, r");

  // a node QEMU does not use: the plain offline delete (library, no QMP) beside the running VM
  const o = await cp.remove(image, 'other');
  t.same(o.streamed, [], 'other: nothing for QEMU to do');
  t.notOk(fs.existsSync(cp.nodePath(image, 'other')), 'other deleted while the VM runs');

  // an inner node: QEMU streams m into u (a read-only node it holds), side gets the offline merge
  const mDel = cli(['checkpoint', 'delete', image, 'm', '--qmp', sock, '--json'], { env: { ...process.env, DISKSNAP_PROGRESS_INTERVAL: '0' } });
  t.equal(mDel.status, 0, `delete m --qmp: ${mDel.stderr}`);
  const mr = JSON.parse(mDel.out) as { streamed: string[]; mergedInto: string[]; inQemuChain: boolean };
  t.same(mr.streamed, [node('u')], 'QEMU streamed m into u');
  t.equal(mr.mergedInto.length, 2, 'u and side were the children');
  t.ok(mr.inQemuChain, 'm was in QEMU\'s chain');
  t.match(mDel.stderr, /delete/, 'progress reported on stderr');
  t.notOk(fs.existsSync(cp.nodePath(image, 'm')), 'm deleted');
  t.same(await chainFiles(qmp), [fs.realpathSync(image), node('u'), node('r')], "QEMU's chain: IMAGE, u, r");
  t.equal(cp.backingOf(cp.nodePath(image, 'u')), cp.nodePath(image, 'r'), 'u is backed by r on disk');
  t.equal(cp.backingOf(cp.nodePath(image, 'side')), cp.nodePath(image, 'r'), 'side is backed by r on disk');
  t.equal(fs.statSync(cp.nodePath(image, 'u')).mode & 0o222, 0, 'u is read-only again');

  // the node under IMAGE: QEMU streams u into its active layer
  const uDel = cli(['checkpoint', 'delete', image, 'u', '--qmp', sock]);
  t.equal(uDel.status, 0, `delete u --qmp: ${uDel.stderr}`);
  t.match(uDel.out, /block-stream/, `says QEMU merged it (${uDel.out.trim()})`);
  t.notOk(fs.existsSync(cp.nodePath(image, 'u')), 'u deleted');
  t.same(await chainFiles(qmp), [fs.realpathSync(image), node('r')], "QEMU's chain: IMAGE, r");
  t.equal(cp.backingOf(image), cp.nodePath(image, 'r'), 'IMAGE is backed by r on disk');
  t.equal((await cp.list(image)).current, 'r', 'list: IMAGE sits on r');

  // the root (no backing): QEMU streams the whole chain into IMAGE; side (r's other child) offline
  const rDel = cli(['checkpoint', 'delete', image, 'r', '--qmp', sock]);
  t.equal(rDel.status, 0, `delete r --qmp: ${rDel.stderr}`);
  t.same(await chainFiles(qmp), [fs.realpathSync(image)], 'QEMU runs IMAGE alone');
  t.equal(cp.backingOf(image), undefined, 'IMAGE has no backing file');
  t.equal(cp.backingOf(cp.nodePath(image, 'side')), undefined, 'side is standalone');
  t.same((await cp.list(image)).nodes.map((n) => n.name), ['side'], 'only side is left');
  t.notOk(fs.existsSync(cp.journalPath(image)), 'no journal');
  await flush(qmp);
  await qmp.execute('quit').catch(() => undefined); // QEMU closes the socket as it quits
  await new Promise((r) => setTimeout(r, 300));

  compareView(t, imageView, image, 'IMAGE');
  compareView(t, sideView, cp.nodePath(image, 'side'), 'side');
  t.equal(qemuCheck(image).status, 0, 'qemu-img check IMAGE clean');
  t.equal(qemuCheck(cp.nodePath(image, 'side')).status, 0, 'qemu-img check side clean');
  const ls = cli(['checkpoint', 'list', image, '--json']);
  t.equal(ls.status, 0, 'list works after QEMU quit');
});

t.test('a live delete whose job fails (filesystem full) leaves the VM on a valid chain and the node in place; a re-run finishes it', { skip: skip || missing({ root: true, commands: ['mount', 'umount'] }) }, async (t) => {
  const dir = t.testdir();
  const full = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-full-'));
  t.equal(spawnSync('mount', ['-t', 'tmpfs', '-o', 'size=64m', 'tmpfs', full]).status, 0, 'tmpfs mounted');
  t.teardown(() => {
    spawnSync('umount', ['-l', full]);
    fs.rmSync(full, { recursive: true, force: true });
  });
  const image = path.join(full, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', image, '32M');
  qemuIo(image, ['write -P 0x51 0 1M']);
  t.equal(cli(['checkpoint', 'create', image, 'p']).status, 0, 'checkpoint p');
  qemuIo(image, ['write -P 0x52 1M 12M']);
  t.equal(cli(['checkpoint', 'create', image, 'n1']).status, 0, 'checkpoint n1 (12 MiB of data)');
  qemuIo(image, ['write -P 0x53 0 64k', 'write -P 0x54 4M 64k']);
  const imageView = saveView(image, path.join(dir, 'image.raw'));
  // room for IMAGE's metadata, not for n1's 12 MiB
  const st = fs.statfsSync(full);
  const size = Math.ceil(((st.blocks - st.bfree) * st.bsize + 2 * MiB) / 4096) * 4096;
  t.equal(spawnSync('mount', ['-o', `remount,size=${size}`, full]).status, 0, `filesystem shrunk to ${size} bytes`);
  const { sock, qmp } = await qemuOn(t, image);
  const n1 = fs.realpathSync(cp.nodePath(image, 'n1'));
  const p = fs.realpathSync(cp.nodePath(image, 'p'));

  const r = cli(['checkpoint', 'delete', image, 'n1', '--qmp', sock]);
  t.equal(r.status, 1, 'the live delete fails');
  t.match(r.stderr, /EJOB/, `with EJOB (${r.stderr.trim()})`);
  t.match(r.stderr, /space/i, "naming QEMU's error");
  t.equal(r.stderr.trim().split('\n').length, 1, 'in one line');
  t.ok(fs.existsSync(n1), 'n1 is still there');
  t.ok(fs.existsSync(cp.journalPath(image)), 'the journal is kept for the re-run');
  t.same(await chainFiles(qmp), [fs.realpathSync(image), n1, p], 'QEMU still runs IMAGE over n1 over p');
  const c = qemuImg('check', '-U', image);
  t.ok(c.status === 0 || c.status === 3, `qemu-img check -U IMAGE: no corruption (leaks at most) ${c.stdout}`);
  let offline: unknown;
  try {
    await cp.remove(image, 'n1');
  } catch (e) {
    offline = e;
  }
  t.ok(isDisksnapError(offline, 'ELOCKED'), `an offline re-run while QEMU runs IMAGE is refused (${String(offline)})`);
  t.ok(fs.existsSync(n1), 'and n1 is still there');

  t.equal(spawnSync('mount', ['-o', `remount,size=${size + 64 * MiB}`, full]).status, 0, 'room made');
  const again = cli(['checkpoint', 'delete', image, 'n1', '--qmp', sock, '--json']);
  t.equal(again.status, 0, `the re-run finishes the delete: ${again.stderr}`);
  t.ok((JSON.parse(again.out) as { resumed?: boolean }).resumed, 'as the interrupted one');
  t.notOk(fs.existsSync(n1), 'n1 deleted');
  t.notOk(fs.existsSync(cp.journalPath(image)), 'no journal');
  t.same(await chainFiles(qmp), [fs.realpathSync(image), p], 'QEMU runs IMAGE over p');
  await flush(qmp);
  await qmp.execute('quit').catch(() => undefined);
  await new Promise((res) => setTimeout(res, 300));
  compareView(t, imageView, image, 'IMAGE');
  const k = qemuCheck(image);
  t.ok(k.status === 0 || k.status === 3, `qemu-img check IMAGE: no corruption (${k.text})`);
  // disksnap opens IMAGE's chain (its parent guard checked): the guard QEMU carried was replaced
  const flat = path.join(dir, 'flat.raw');
  const f = cli(['diff', 'flatten', image, flat]);
  t.equal(f.status, 0, `disksnap opens IMAGE over p, guard and all: ${f.stderr}`);
  compareView(t, imageView, flat, "disksnap's read of IMAGE");
});

/** A QEMU holding `image` whose only QMP socket is a -chardev/-mon pair (plus the test's own). */
async function qemuWithChardev(t: Test, image: string): Promise<{ qmp: QmpClient; mon: string; pid: number }> {
  const mine = socketPath(t);
  const mon = socketPath(t, 'mon.sock');
  const qemu = await startBareQemu(mine, ['-drive', `file=${image},if=none,id=drv0,format=qcow2,node-name=disk0,file.node-name=file0`, '-chardev', `socket,id=mon1,path=${mon},server=on,wait=off`, '-mon', 'chardev=mon1,mode=control']);
  t.teardown(() => stopQemu(qemu));
  // the test stays connected to its own socket: discovery must skip a socket that does not greet
  const qmp = await connectQmp(mine);
  t.teardown(() => qmp.close());
  return { qmp, mon, pid: qemu.pid! };
}

t.test('discovery: without --qmp, the QMP socket of the QEMU holding IMAGE is found and named; revert is refused', { skip }, async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', image, '4M');
  qemuIo(image, ['write -P 0x61 0 1M']);
  t.equal(cli(['checkpoint', 'create', image, 'a']).status, 0, 'checkpoint a');
  qemuIo(image, ['write -P 0x62 512k 1M']);
  t.equal(cli(['checkpoint', 'create', image, 'b']).status, 0, 'checkpoint b');
  qemuIo(image, ['write -P 0x63 2M 64k']);
  const imageView = saveView(image, path.join(dir, 'image.raw'));
  const { qmp, mon, pid } = await qemuWithChardev(t, image);
  t.same(lockHolders(image), [pid], 'the lock holder is the QEMU');

  const d = cli(['checkpoint', 'delete', image, 'a']);
  t.equal(d.status, 0, `checkpoint delete without --qmp: ${d.stderr}`);
  t.ok(d.stderr.includes(mon) && d.stderr.includes(String(pid)), `names the socket it found and the QEMU (${d.stderr.trim()})`);
  t.match(d.out, /block-stream/, 'QEMU merged a into b');
  t.same(await chainFiles(qmp), [fs.realpathSync(image), fs.realpathSync(cp.nodePath(image, 'b'))], "QEMU's chain: IMAGE, b");

  const c = cli(['checkpoint', 'create', image, 'c', '--json']);
  t.equal(c.status, 0, `checkpoint create without --qmp: ${c.stderr}`);
  t.equal((JSON.parse(c.out) as { qmp: string }).qmp, mon, 'live, over the socket found');
  t.equal(await activeFile(qmp), image, 'QEMU runs the new overlay at IMAGE');

  // revert: refused in one line, nothing changed
  const ino = fs.statSync(image).ino;
  const before = (await cp.list(image)).nodes.map((n) => n.name);
  for (const args of [[], ['--keep', 'kept']]) {
    const r = cli(['checkpoint', 'revert', image, 'b', ...args]);
    t.equal(r.status, 1, `revert ${args.join(' ')} refused`);
    t.match(r.stderr, /running VM.*mounted filesystems.*Stop the VM/, `saying why and what to do (${r.stderr.trim()})`);
    t.equal(r.stderr.trim().split('\n').length, 1, 'in one line');
  }
  t.equal(fs.statSync(image).ino, ino, 'IMAGE is the same file');
  t.same((await cp.list(image)).nodes.map((n) => n.name), before, 'the same nodes (no kept branch)');
  t.notOk(fs.existsSync(cp.journalPath(image)), 'no journal');
  t.equal(await activeFile(qmp), image, 'QEMU still runs IMAGE');
  await flush(qmp);
  await qmp.execute('quit').catch(() => undefined);
  await new Promise((res) => setTimeout(res, 300));
  compareView(t, imageView, image, 'IMAGE');
  t.equal(qemuCheck(image).status, 0, 'qemu-img check IMAGE clean');
});

t.test('discovery: diff commit without --qmp finds the socket; a QEMU without a QMP socket gets ELOCKED saying to pass --qmp', { skip }, async (t) => {
  const dir = t.testdir();
  const { file: base } = makeParent(dir, 2 * MiB, 'base.raw');
  const child = path.join(dir, 'vm.qcow2');
  await diff.createChild(base, child);
  qemuIo(child, ['write -P 0x71 0 1M']);
  const childView = saveView(child, path.join(dir, 'child.raw'));
  const { qmp, mon } = await qemuWithChardev(t, child);
  const r = cli(['diff', 'commit', child]);
  t.equal(r.status, 0, `diff commit without --qmp: ${r.stderr}`);
  t.ok(r.stderr.includes(mon), 'names the socket it found');
  t.equal(await activeFile(qmp), base, 'QEMU pivoted onto base.raw');
  compareView(t, childView, base, 'base.raw');

  // a QEMU holding an image with no QMP socket at all
  const image = path.join(dir, 'solo.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', image, '1M');
  t.equal(cli(['checkpoint', 'create', image, 'x']).status, 0, 'checkpoint x');
  const q = spawn('qemu-system-x86_64', ['-machine', 'none', '-nodefaults', '-no-user-config', '-display', 'none', '-drive', `file=${image},if=none,id=drv0,format=qcow2`], { stdio: 'ignore' });
  t.teardown(() => stopQemu(q));
  for (let i = 0; i < 200 && lockHolders(image).length === 0; i++) await new Promise((res) => setTimeout(res, 50));
  t.same(lockHolders(image), [q.pid], 'QEMU holds the image');
  for (const args of [['checkpoint', 'delete', image, 'x'], ['checkpoint', 'create', image, 'y'], ['diff', 'commit', image]]) {
    const e = cli(args);
    t.equal(e.status, 1, `${args.slice(0, 2).join(' ')} refused`);
    t.match(e.stderr, /ELOCKED.*no QMP unix socket.*pass --qmp SOCKET/, `ELOCKED, saying to pass --qmp (${e.stderr.trim()})`);
  }
  t.ok(fs.existsSync(cp.nodePath(image, 'x')), 'x is still there');
  t.notOk(fs.existsSync(cp.journalPath(image)), 'no journal');
});

t.test("a live delete killed while QEMU's job runs: QEMU finishes the job, the file stays until the re-run completes the delete", { skip }, async (t) => {
  const dir = t.testdir();
  const image = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', image, '512M');
  qemuIo(image, ['write -P 0x81 0 1M']);
  t.equal(cli(['checkpoint', 'create', image, 'p']).status, 0, 'checkpoint p');
  qemuIo(image, ['write -P 0x82 1M 384M']);
  t.equal(cli(['checkpoint', 'create', image, 'n1']).status, 0, 'checkpoint n1 (384 MiB of data)');
  qemuIo(image, ['write -P 0x83 0 64k']);
  const imageView = saveView(image, path.join(dir, 'image.raw'));
  const { sock, qmp } = await qemuOn(t, image);
  const n1 = fs.realpathSync(cp.nodePath(image, 'n1'));
  const p = fs.realpathSync(cp.nodePath(image, 'p'));
  let killedInJob = false;
  for (let attempt = 0; attempt < 3 && !killedInJob; attempt++) {
    const child = spawn(process.execPath, [path.join(__dirname, '..', 'dist', 'src', 'cli', 'main.js'), 'checkpoint', 'delete', image, 'n1', '--qmp', sock], { stdio: 'ignore' });
    const exited = new Promise((res) => child.on('close', res));
    let done = false;
    void exited.then(() => (done = true));
    while (!done) {
      const jobs = await qmp.execute<{ id: string; status: string }[]>('query-jobs');
      if (jobs.some((j) => j.id.startsWith('disksnap-delete-') && j.status === 'running')) {
        child.kill('SIGKILL');
        killedInJob = true;
        break;
      }
      await new Promise((res) => setTimeout(res, 5));
    }
    await exited;
    if (!killedInJob) break; // the delete won the race: nothing left to resume
  }
  if (killedInJob) {
    t.ok(fs.existsSync(n1), "the killed run did not delete n1's file");
    t.ok(fs.existsSync(cp.journalPath(image)), 'its journal is there');
    const chain = await chainFiles(qmp);
    t.ok(chain[0] === fs.realpathSync(image) && chain[chain.length - 1] === p, `QEMU runs IMAGE on a valid chain (${chain.length} files)`);
    const r = cli(['checkpoint', 'delete', image, 'n1', '--qmp', sock, '--json']);
    t.equal(r.status, 0, `the re-run finishes the delete: ${r.stderr}`);
    t.ok((JSON.parse(r.out) as { resumed?: boolean }).resumed, 'as the interrupted one');
  } else t.comment('the delete finished before it could be killed in its job');
  t.notOk(fs.existsSync(n1), 'n1 deleted');
  t.notOk(fs.existsSync(cp.journalPath(image)), 'no journal');
  t.same(await chainFiles(qmp), [fs.realpathSync(image), p], 'QEMU runs IMAGE over p');
  t.same((await qmp.execute<{ id: string }[]>('query-jobs')).filter((j) => j.id.startsWith('disksnap-delete-')), [], 'no job of disksnap left in QEMU');
  await flush(qmp);
  await qmp.execute('quit').catch(() => undefined);
  await new Promise((res) => setTimeout(res, 300));
  compareView(t, imageView, image, 'IMAGE');
  t.equal(qemuCheck(image).status, 0, 'qemu-img check IMAGE clean');
});

// ---- issue #16: live checkpoints in a row while a client writes ----

/** `n` writes of 4k or 64k at 4k-aligned offsets in [from, from + span), from a seeded generator. */
function randomWrites(seed: number, n: number, from: number, span: number): { off: number; len: number }[] {
  let x = seed >>> 0 || 1;
  const next = () => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0), x >>> 8);
  const out: { off: number; len: number }[] = [];
  for (let i = 0; i < n; i++) {
    const off = from + (next() % (span / 4096)) * 4096;
    out.push({ off, len: Math.min(next() % 2 ? 65536 : 4096, from + span - off) });
  }
  return out;
}

t.test('live checkpoints in a row while a client writes through QEMU: no write is lost, every file checks clean (issue #16)', { skip }, async (t) => {
  // Before the fix, QEMU reopened the old top's file BY NAME during blockdev-snapshot-sync,
  // when IMAGE already named the new overlay: the old top then read its L2 tables from the
  // overlay, and the new top's copy-on-write read clusters the client had written as
  // unallocated (the base's bytes). 6 checkpoints in a row, each while an NBD client of
  // QEMU's export writes; before the fix this lost writes in most runs.
  const dir = t.testdir();
  const size = 32 * MiB;
  const { file: base, bytes } = makeParent(dir, size, 'base.raw');
  const image = path.join(dir, 'vm.qcow2');
  await diff.createChild(base, image);
  const ref = Buffer.from(bytes);
  const { sock, qmp } = await qemuOn(t, image);
  const nbd = socketPath(t, 'nbd.sock');
  await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
  // the export's BlockBackend follows the active layer, as a guest's device does
  await qmp.execute('block-export-add', { type: 'nbd', id: 'exp16', 'node-name': 'disk0', writable: true });
  const rounds = 6;
  let stillWriting = 0;
  for (let i = 0; i < rounds; i++) {
    const writes = randomWrites(1600 + i, 800, 0, size);
    const pat = 0x40 + i;
    const errFile = path.join(dir, `writer${i}.err`);
    const errFd = fs.openSync(errFile, 'w');
    const writer = spawn('qemu-io', ['-f', 'raw', `nbd+unix:///disk0?socket=${nbd}`, ...writes.flatMap((w) => ['-c', `write -P ${pat} ${w.off} ${w.len}`])], { stdio: ['ignore', 'ignore', errFd] });
    fs.closeSync(errFd);
    const exited = new Promise<number | null>((res) => writer.once('exit', (code) => res(code)));
    await new Promise((r) => setTimeout(r, 100)); // the writer connected and writing
    const r = cli(['checkpoint', 'create', image, `c${i}`, '--qmp', sock]); // blocks this process; the writer goes on
    if (writer.exitCode === null) stillWriting++;
    t.equal(r.status, 0, `checkpoint c${i} while the client writes: ${r.stderr}`);
    t.equal(await exited, 0, `writer ${i} exits 0`);
    t.equal(fs.readFileSync(errFile, 'utf8'), '', `writer ${i}: no write failed`);
    for (const w of writes) ref.fill(pat, w.off, w.off + w.len);
  }
  t.ok(stillWriting >= rounds - 1, `the client was still writing when the checkpoint finished (${stillWriting} of ${rounds} rounds)`);
  await flush(qmp);
  const out = saveView(image, path.join(dir, 'view.raw'));
  const got = fs.readFileSync(out);
  const bad: number[] = [];
  for (let o = 0; o < size; o += 65536) if (!got.subarray(o, o + 65536).equals(ref.subarray(o, o + 65536))) bad.push(o);
  t.same(bad, [], `IMAGE's view is every write the client made (64k blocks that differ: ${bad.length})`);
  for (const f of [image, ...Array.from({ length: rounds }, (_, i) => cp.nodePath(image, `c${i}`))]) {
    const c = qemuImg('check', '-U', f);
    t.equal(c.status, 0, `qemu-img check ${path.basename(f)}: ${c.stdout.trim().split('\n').pop()}${c.stderr}`);
  }
});
