/**
 * The QMP client (src/host/qmp.ts) against a real QEMU with no machine (`-machine none`):
 * greeting and capabilities, commands with ids, QEMU's errors as EQMP with their class,
 * events (including ones that arrived before the wait), timeouts, and a QEMU that goes away.
 */
import t from 'tap';
import type { Test } from 'tap';
import * as net from 'node:net';
import * as path from 'node:path';
import { CONNECT_ATTEMPTS, QmpClient, isQmpError, namedNodes } from '../src/host/qmp';
import { isDisksnapError } from '../src/engine/errors';
import * as diff from '../src/differencing';
import { makeParent, needQemu, qemuImgOk, qemuIo } from './helpers/qemu';
import { missing } from './helpers/tools';
import { connectQmp, socketPath, startBareQemu, stopQemu } from './helpers/guest';

const skip = needQemu() || missing({ commands: ['qemu-system-x86_64'] });

async function codeOf(p: Promise<unknown>): Promise<string | undefined> {
  try {
    await p;
  } catch (e) {
    return isDisksnapError(e) ? e.code : `not a DisksnapError: ${String(e)}`;
  }
  return undefined;
}

t.test('connects, runs commands in parallel, and reports QEMU errors as EQMP with their class', { skip }, async (t) => {
  const dir = t.testdir();
  const sock = socketPath(t);
  const qemu = await startBareQemu(sock);
  t.teardown(() => stopQemu(qemu));
  const qmp = await connectQmp(sock);
  t.teardown(() => qmp.close());
  t.ok(qmp.version.major >= 4, `the greeting gave QEMU's version (${JSON.stringify(qmp.version)})`);
  const [v, status] = await Promise.all([
    qmp.execute<{ qemu: { major: number } }>('query-version'),
    qmp.execute<{ status: string }>('query-status'),
  ]);
  t.equal(v.qemu.major, qmp.version.major, 'query-version answers');
  t.type(status.status, 'string', 'query-status answers beside it');
  let err: unknown;
  try {
    await qmp.execute('no-such-command');
  } catch (e) {
    err = e;
  }
  t.ok(isQmpError(err, 'CommandNotFound'), `an unknown command is EQMP/CommandNotFound (${String(err)})`);
  t.equal((err as { code?: string }).code, 'EQMP', 'code EQMP');
  t.equal(await codeOf(qmp.execute('blockdev-add', { driver: 'file', filename: path.join(dir, 'absent'), 'node-name': 'x' })), 'EQMP', 'a blockdev-add of a missing file fails with EQMP');
  t.same(await qmp.execute('query-name'), {}, 'the connection still works after errors');
});

t.test('opens a disksnap child with its backing chain as QEMU block nodes', { skip }, async (t) => {
  const dir = t.testdir();
  const { file: parent } = makeParent(dir, 1 << 20);
  const child = path.join(dir, 'child.qcow2');
  await diff.createChild(parent, child);
  const sock = socketPath(t);
  const qemu = await startBareQemu(sock);
  t.teardown(() => stopQemu(qemu));
  const qmp = await connectQmp(sock);
  t.teardown(() => qmp.close());
  await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: child } });
  const nodes = await qmp.execute<{ 'node-name': string; file: string; drv: string; ro: boolean; 'backing_file'?: string }[]>('query-named-block-nodes', { flat: true });
  const top = nodes.find((n) => n['node-name'] === 'top');
  t.ok(top, 'the node exists');
  const below = nodes.find((n) => n.drv === 'raw' && n.file === parent);
  t.ok(below, `QEMU opened the parent below the child (${JSON.stringify(nodes.map((n) => [n['node-name'], n.drv, n.file]))})`);
  t.equal(below?.ro, true, 'read-only, as a backing file');
  t.equal(path.resolve(dir, top?.backing_file ?? ''), parent, 'through the backing name disksnap stored');
});

t.test('events: a wait sees events that arrived before it; waits and commands time out with ETIMEDOUT', { skip }, async (t) => {
  const dir = t.testdir();
  const sock = socketPath(t);
  const qemu = await startBareQemu(sock);
  t.teardown(() => stopQemu(qemu));
  const qmp = await connectQmp(sock);
  t.teardown(() => qmp.close());
  const seq = qmp.eventSeq;
  await qmp.execute('stop');
  await new Promise((r) => setTimeout(r, 200));
  const stop = await qmp.waitEvent((e) => e.event === 'STOP', { after: seq, timeoutMs: 5000 });
  t.ok(stop.seq > seq, 'the STOP event that came before the wait is found');
  const after = qmp.eventSeq;
  const resumed = qmp.waitEvent((e) => e.event === 'RESUME', { after, timeoutMs: 5000 });
  await qmp.execute('cont');
  t.equal((await resumed).event, 'RESUME', 'a wait started before the command sees its event');
  t.equal(await codeOf(qmp.waitEvent((e) => e.event === 'NEVER', { timeoutMs: 100 })), 'ETIMEDOUT', 'an event that never comes: ETIMEDOUT');
});

t.test('a QEMU that exits fails outstanding waits with ECONNRESET; a missing socket is ENOENT; a non-QMP peer is EPROTO', { skip }, async (t) => {
  const dir = t.testdir();
  const sock = socketPath(t);
  const qemu = await startBareQemu(sock);
  t.teardown(() => stopQemu(qemu));
  const qmp = await connectQmp(sock);
  const waiting = qmp.waitEvent((e) => e.event === 'NEVER', { timeoutMs: 10_000 });
  const killed = stopQemu(qemu);
  t.equal(await codeOf(waiting), 'ECONNRESET', 'the wait fails when QEMU goes away');
  await killed;
  t.equal(await codeOf(qmp.execute('query-status')), 'ECONNRESET', 'and so does a command after it');
  t.ok(qmp.isClosed, 'the client knows it is closed');

  t.equal(await codeOf(QmpClient.connect(path.join(dir, 'absent.sock'), { timeoutMs: 2000 })), 'ENOENT', 'no socket: ENOENT');

  const fake = socketPath(t, 'fake.sock');
  const server = net.createServer((c) => c.end('hello, I am not QEMU\n'));
  await new Promise<void>((r) => server.listen(fake, r));
  t.teardown(() => server.close());
  t.equal(await codeOf(QmpClient.connect(fake, { timeoutMs: 2000 })), 'EPROTO', 'a peer that is not QMP: EPROTO');
  const silent = socketPath(t, 'silent.sock');
  const server2 = net.createServer(() => undefined);
  await new Promise<void>((r) => server2.listen(silent, r));
  t.teardown(() => {
    server2.close();
  });
  t.equal(await codeOf(QmpClient.connect(silent, { timeoutMs: 300 })), 'ETIMEDOUT', 'a peer that says nothing: ETIMEDOUT');
});

/**
 * A scripted QMP peer on a unix socket (no QEMU: the faults below cannot be made on demand in
 * one). Connection n (from 1) greets; `drop(n)` true: it reads nothing and closes after 50 ms,
 * so the client's qmp_capabilities is left unread and the client's read fails with ECONNRESET,
 * as from a QEMU dropping it. Otherwise it answers every command, first with a stale answer
 * (the id a killed client's second command had under the ids before session 39), then with
 * `{return: {ok: n}}` under the command's own id.
 */
async function scriptedPeer(t: Test, drop: (n: number) => boolean): Promise<{ sock: string; connections: () => number }> {
  const sock = socketPath(t, `scripted-${Math.random().toString(36).slice(2, 8)}.sock`);
  let n = 0;
  const server = net.createServer({ pauseOnConnect: true }, (c) => {
    const me = ++n;
    c.write('{"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}\n');
    if (drop(me)) {
      setTimeout(() => c.destroy(), 50);
      return;
    }
    let buf = '';
    c.setEncoding('utf8');
    c.on('data', (chunk: string) => {
      buf += chunk;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const msg = JSON.parse(buf.slice(0, nl)) as { id: string };
        buf = buf.slice(nl + 1);
        c.write(`{"return": {"stale": true}, "id": "disksnap-2"}\n{"return": {"ok": ${me}}, "id": ${JSON.stringify(msg.id)}}\n`);
      }
    });
    c.resume();
  });
  await new Promise<void>((r) => server.listen(sock, r));
  t.teardown(() => server.close());
  return { sock, connections: () => n };
}

t.test('a connection QEMU drops before the handshake is made again; errors name the socket; ids are unique per connection', async (t) => {
  const once = await scriptedPeer(t, (n) => n === 1);
  const qmp = await QmpClient.connect(once.sock, { timeoutMs: 5000 });
  t.teardown(() => qmp.close());
  t.equal(once.connections(), 2, 'the dropped connection was made again, once');
  t.same(await qmp.execute('query-status'), { ok: 2 }, "a command gets its own answer, not one owed to an earlier client's same-numbered command");

  const always = await scriptedPeer(t, () => true);
  let err: unknown;
  try {
    await QmpClient.connect(always.sock, { timeoutMs: 5000 });
  } catch (e) {
    err = e;
  }
  t.ok(isDisksnapError(err, 'ECONNRESET'), `a peer that drops every connection: ECONNRESET (${String(err)})`);
  t.equal(always.connections(), CONNECT_ATTEMPTS, `after ${CONNECT_ATTEMPTS} connections`);
  const msg = (err as Error).message;
  t.ok(msg.includes(always.sock), `the message names the socket (${msg})`);
  t.match(msg, /reset by the other end \(read ECONNRESET\).*3 connections, each dropped before the QMP handshake was done/, 'and says what happened, how often');
});

t.test("namedNodes: QEMU's node list only once no block job is concluded and not dismissed (QEMU 7.2 crashes on it then); disksnap's own jobs waited for and dismissed", { skip }, async (t) => {
  const dir = t.testdir();
  // two drives, each on a chain base <- mid (192 MiB of data) <- top
  const chain = (k: string) => {
    const [base, mid, top] = ['base', 'mid', 'top'].map((x) => path.join(dir, `${x}${k}.qcow2`));
    qemuImgOk('create', '-q', '-f', 'qcow2', base, '256M');
    qemuImgOk('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', mid);
    qemuIo(mid, ['write -P 0x82 0 192M']);
    qemuImgOk('create', '-q', '-f', 'qcow2', '-b', mid, '-F', 'qcow2', top);
    return { base, mid, top };
  };
  const a = chain('a');
  const b = chain('b');
  const sock = socketPath(t);
  const qemu = await startBareQemu(sock, ['-drive', `file=${a.top},if=none,id=drva,format=qcow2,node-name=diska`, '-drive', `file=${b.top},if=none,id=drvb,format=qcow2,node-name=diskb`]);
  let died: string | undefined;
  qemu.on('exit', (code, signal) => (died = `exit ${code} ${signal}`));
  t.teardown(() => stopQemu(qemu));
  const qmp = await connectQmp(sock);
  t.teardown(() => qmp.close());
  type Node = { 'node-name': string; drv: string; file: string };
  const before = await namedNodes<Node>(qmp);
  const nodeOf = (file: string) => before.find((n) => n.drv === 'qcow2' && n.file === file)!['node-name'];
  const status = async (id: string) => (await qmp.execute<{ id: string; status: string }[]>('query-jobs')).find((j) => j.id === id)?.status;

  // Another client's job: not waited for while it runs (a backup may run for hours), waited
  // for once it concluded, until its owner dismisses it.
  await qmp.execute('block-stream', { 'job-id': 'theirs', device: 'diska', 'base-node': nodeOf(a.base), 'auto-dismiss': false, speed: 16 << 20 });
  t.equal(await status('theirs'), 'running', 'their job runs (held to 16 MiB/s)');
  t.ok((await namedNodes<Node>(qmp, 300)).some((n) => n.file === a.mid), 'asked while it runs: the list, at once, with the node being streamed');
  await qmp.execute('block-job-set-speed', { device: 'theirs', speed: 0 });
  for (let i = 0; i < 200 && (await status('theirs')) !== 'concluded'; i++) await new Promise((r) => setTimeout(r, 50));
  t.equal(await status('theirs'), 'concluded', 'their job ended');
  await t.rejects(namedNodes(qmp, 300), { code: 'EBUSY', message: /block job theirs \(concluded\) after 300 ms/ }, 'concluded, not dismissed: EBUSY naming it, and the query is not sent');
  t.equal(died, undefined, 'QEMU runs');
  await qmp.execute('job-dismiss', { id: 'theirs' });
  t.notOk((await namedNodes<Node>(qmp)).some((n) => n.file === a.mid), 'dismissed: the list comes, without the streamed node');

  // disksnap's own job (a killed run's): waited for, then dismissed by namedNodes itself.
  await qmp.execute('block-stream', { 'job-id': 'disksnap-delete-test', device: 'diskb', 'base-node': nodeOf(b.base), 'auto-dismiss': false });
  const nodes = await namedNodes<Node>(qmp);
  t.equal(await status('disksnap-delete-test'), undefined, 'its job was waited for and dismissed');
  t.notOk(nodes.some((n) => n.file === b.mid), 'the list is of the graph after it');
  t.equal(died, undefined, 'QEMU is still running');
  t.same(await qmp.execute('query-name'), {}, 'and answers');
});
