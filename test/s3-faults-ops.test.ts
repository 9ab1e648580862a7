/**
 * Faults on an S3 store during copy, restore and gc (s3-faults.test.ts covers snapshot
 * create): the gateway SIGKILLed in the middle of each, and restarted; then a fault proxy
 * (test/helpers/s3-fault-proxy.ts) between the CLI and the gateway that resets connections,
 * cuts response bodies and answers 503 at random during snapshot, copy, restore and gc.
 * After every fault: each completed snapshot restores byte-exact (checked straight against
 * the gateway), nothing half-written is visible (no completed snapshot that does not verify,
 * no output file under its final name, no temporary file), a failure is exit 1 with one
 * clear line, and a re-run completes.
 *
 * The kills hit a gateway of this file's own (port DISKSNAP_CEPH_OWN_PORT, default 7490), so
 * the shared one other test files use is not killed; it is removed at the end.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import * as net from 'node:net';
import * as snap from '../src/storage';
import { S3Backend } from '../src/storage/store/s3';
import { withStoreLock } from '../src/storage/common';
import { setBackendFactory, type Store } from '../src/storage/store/store';
import { DirectoryBackend } from '../src/storage/store/dir';
import { DisksnapError } from '../src/engine/errors';
import { KiB, MiB, applyWrites, makeImage, sha } from '../fixtures/store/helpers';
import { cliAsync } from './helpers/cli';
import { CEPH_SCRIPT, ceph, cephMissing, killGateway, newBucket, restartGatewayAsync } from './helpers/ceph';
import { startFaultProxy } from './helpers/s3-fault-proxy';

const skip = cephMissing();
t.setTimeout(1_200_000);
const BS = 64 * KiB;
const TTL = 6000;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// A gateway of our own (see ownGateway); leases of killed holders run out in 6 s. Its
// directory is its port's default: a DISKSNAP_CEPH_DIR inherited from the shared cluster's env
// file would make our `stop` remove the shared cluster under every other test file.
const sharedPort = process.env.DISKSNAP_CEPH_PORT;
const sharedDir = process.env.DISKSNAP_CEPH_DIR;
process.env.DISKSNAP_CEPH_PORT = process.env.DISKSNAP_CEPH_OWN_PORT ?? '7490';
delete process.env.DISKSNAP_CEPH_DIR;
process.env.DISKSNAP_S3_LEASE_TTL_MS = String(TTL);

async function countBlocks(url: string): Promise<number> {
  const b = new S3Backend(url);
  let n = 0;
  try {
    for await (const _ of b.list('blocks/')) n++;
  } finally {
    b.destroy();
  }
  return n;
}

async function waitFor(cond: () => Promise<boolean> | boolean, maxMs: number): Promise<boolean> {
  const end = Date.now() + maxMs;
  for (;;) {
    if (await cond()) return true;
    if (Date.now() > end) return false;
    await sleep(25);
  }
}

/** Every completed snapshot of a store restores byte-exact (one of `expected`) and verifies. */
async function everyCompletedRestores(t: Tap.Test, url: string, dir: string, expected: Map<string, string>, what: string): Promise<number> {
  const listing = await snap.listSnapshots({ store: url });
  // (callers wait out the leases of writers that died first)
  t.same(listing.snapshots.filter((s) => s.state === 'pending').map((s) => s.id), [], `${what}: nothing left pending by a writer that is gone`);
  let n = 0;
  for (const s of listing.snapshots.filter((s) => s.state === 'completed')) {
    const out = path.join(dir, `check-${s.id}-${n}.img`);
    await snap.restoreSnapshot(s.id, { store: url, to: out });
    const got = sha(out);
    t.ok([...expected.values()].includes(got), `${what}: completed ${s.id} (${s.name || 'no name'}) restores to one of the volume's moments`);
    if (expected.has(s.name)) t.equal(got, expected.get(s.name), `${what}: ${s.name} restores byte-exact`);
    t.ok((await snap.verifySnapshot(s.id, { store: url })).ok, `${what}: ${s.id} verifies`);
    fs.rmSync(out);
    n++;
  }
  return n;
}

/**
 * A failed command: exit 1, and its error is one line, the last, that names the gateway and what
 * failed. Lines before it may be --json progress status lines (a command over 5 s prints them)
 * and notices printed as the command went on, each one line of its own: gc waiting for a lease
 * the gateway's kill left behind, a copy whose previous copy cannot be read falling back to
 * every block. No stack trace, and no error printed twice.
 */
function clearFailure(t: Tap.Test, r: { status: number | null; err: string }, what: string): void {
  t.equal(r.status, 1, `${what}: exit 1`);
  const lines = r.err.trim().split('\n').filter((l) => !l.startsWith('{"message_type"'));
  const all = `(${r.err.trim()})`;
  t.ok(lines.length > 0 && lines.every((l) => l.startsWith('disksnap: ') && !l.startsWith('disksnap: internal error')), `${what}: only disksnap's own one-line messages ${all}`);
  t.equal(lines.slice(0, -1).filter((l) => /\((E[A-Z]+)\)$/.test(l)).length, 0, `${what}: one error line ${all}`);
  t.match(lines[lines.length - 1] ?? '', /S3 at http:\/\/127\.0\.0\.1:\d+: .* failed after \d+ attempt\(s\)|ELOCKED|in use/, `${what}: the last line says what failed`);
}

t.test('an operation that fails while the gateway is down reports its own failure, not the lock release that failed after it', async (t) => {
  let released = 0;
  const store = {
    lock: async () => ({
      release: async () => {
        released++;
        throw new Error('PUT locks/shared/x failed after 2 attempt(s)');
      },
    }),
  } as unknown as Store;
  await t.rejects(
    withStoreLock(store, 'shared', {}, async () => {
      throw new Error('GET blocks/ab/abcd failed after 2 attempt(s)');
    }),
    { message: /GET blocks\/ab\/abcd/ },
  );
  t.equal(released, 1, 'the release was still tried');
  // the work done and durable stands (a command that exits 1 must not have completed it); the
  // lease runs out on its own, and the command says so
  const logs: string[] = [];
  t.equal(await withStoreLock(store, 'shared', { onLog: (m) => logs.push(m) }, async () => 1), 1, 'after a success, the result stands');
  t.match(logs, [/lock of store .* was not given back \(PUT locks\/shared\/x failed after 2 attempt\(s\)\); it runs out on its own/], 'and the failed release is reported');
});

t.test('a snapshot that completed is not reported failed because the store failed a read after it (the retention policy)', async (t) => {
  const dir = t.testdir();
  let armed = false; // reads fail once a snapshot taken while armed has completed
  let completed = false;
  let failedReads = 0;
  setBackendFactory((root) => {
    const d = new DirectoryBackend(root);
    return {
      location: d.location,
      describe: (k) => d.describe(k),
      get: (k, into) => {
        if (completed) {
          failedReads++;
          return Promise.reject(new DisksnapError(`GET ${k} failed after 2 attempt(s): HTTP 503 SlowDown`, 'EIO'));
        }
        return d.get(k, into);
      },
      putIfAbsent: (k, data) => d.putIfAbsent(k, data),
      put: async (k, data) => {
        await d.put(k, data);
        if (armed && /^snapshots\/.*\.json$/.test(k) && JSON.parse(Buffer.from(data).toString('utf8')).state === 'completed') completed = true;
      },
      list: (p) => d.list(p),
      delete: (k) => d.delete(k),
    };
  });
  t.teardown(() => setBackendFactory(undefined));
  const vol = path.join(dir, 'vol.img');
  const store = path.join(dir, 'store');
  makeImage(vol, 2 * MiB, [{ offset: 0, length: MiB, seed: 3 }]);
  await snap.createSnapshot(vol, { store, blockSize: BS });
  // the policy is applied after each snapshot completes: it lists the volume's snapshots
  await snap.setVolumeRetention(vol, { last: 1 }, { store });
  armed = true;
  const logs: string[] = [];
  const s = await snap.createSnapshot(vol, { store, blockSize: BS, onLog: (m: string) => logs.push(m) });
  t.equal(s.state, 'completed', 'the completed snapshot is what the call returns');
  t.ok(failedReads > 0, `the store failed ${failedReads} read(s) after it completed`);
  t.match(logs.join('\n'), /retention policy of volume .* could not be applied: GET .* failed/, 'the failure is reported, not thrown');
});

/**
 * A directory store whose record writes fail as a gateway's do when it dies: the completing
 * write of a record lands (`lands`) or not, its answer is lost either way, and so are the
 * writes after it while `down` says the gateway is still gone.
 */
function completingWriteFails(lands: boolean, down: () => boolean): { failed: () => number } {
  let failed = 0;
  let dead = false;
  setBackendFactory((root) => {
    const d = new DirectoryBackend(root);
    const lost = (k: string) => new DisksnapError(`S3 at http://gw: PUT ${k} failed after 2 attempt(s): Error: socket hang up`, 'EIO', 5, k);
    return {
      location: d.location,
      describe: (k) => d.describe(k),
      get: (k, into) => d.get(k, into),
      putIfAbsent: (k, data) => d.putIfAbsent(k, data),
      put: async (k, data) => {
        if (dead && down()) {
          failed++;
          throw lost(k);
        }
        if (/^snapshots\/.*\.json$/.test(k) && JSON.parse(Buffer.from(data).toString('utf8')).state === 'completed' && failed === 0) {
          if (lands) await d.put(k, data);
          dead = true;
          failed++;
          throw lost(k);
        }
        return d.put(k, data);
      },
      list: (p) => d.list(p),
      delete: (k) => d.delete(k),
    };
  });
  return { failed: () => failed };
}

t.test("a record's completing write whose answer is lost: the error says whether the snapshot completed is unknown, and it is whole if it did", async (t) => {
  t.teardown(() => setBackendFactory(undefined));
  for (const op of ['create', 'copy'] as const) {
    const dir = t.testdir(); // each round gets a directory of its own
    const vol = path.join(dir, `vol-${op}.img`);
    const store = path.join(dir, `store-${op}`);
    const to = path.join(dir, `to-${op}`);
    makeImage(vol, 2 * MiB, [{ offset: 0, length: MiB, seed: 4 }]);
    const want = sha(vol);
    const first = op === 'copy' ? await snap.createSnapshot(vol, { store, blockSize: BS }) : undefined;
    const run = () => (first ? snap.copySnapshot(first.id, { store, toStore: to }) : snap.createSnapshot(vol, { store, blockSize: BS }));
    const target = first ? to : store;

    // the write landed, and the gateway stayed down for the `error` one
    let down = true;
    const f = completingWriteFails(true, () => down);
    const e = await run().catch((x: unknown) => x);
    t.match(e, { code: 'EIO', message: /PUT snapshots\/snap-[0-9a-f]+\.json failed after 2 attempt\(s\).*; whether (snap-[0-9a-f]+) completed is unknown .*`disksnap snapshot show \1 --store / }, `${op}: the error says the outcome is unknown`);
    t.equal(f.failed(), 2, `${op}: the completing write and the error one failed`);
    down = false;
    const id = /whether (snap-[0-9a-f]+) completed/.exec((e as Error).message)?.[1] ?? '';
    const shown = await snap.showSnapshot(id, { store: target });
    t.equal(shown.state, 'completed', `${op}: the store took the write: the snapshot stands completed`);
    const out = path.join(dir, `out-${op}.img`);
    await snap.restoreSnapshot(id, { store: target, to: out });
    t.equal(sha(out), want, `${op}: and restores byte-exact`);
    await snap.deleteSnapshot(id, { store: target });

    // the write did not land, and the gateway was back for the `error` one: a plain failure
    const g = completingWriteFails(false, () => false);
    const e2 = await run().catch((x: unknown) => x);
    t.match(e2, { code: 'EIO', message: /failed after 2 attempt\(s\): Error: socket hang up$/ }, `${op}: the record says error: the error is the failure alone`);
    t.equal(g.failed(), 1, `${op}: one write failed`);
    setBackendFactory(undefined);
    const left = (await snap.listSnapshots({ store: target })).snapshots.filter((s) => s.id !== first?.id);
    t.same(left.map((s) => s.state), ['error'], `${op}: its record says error`);
  }
});

t.test('a server that takes a request and never answers: a clear error after the attempts, not a hang', async (t) => {
  t.setTimeout(60_000); // a hang fails here rather than at the file's limit
  const sockets = new Set<net.Socket>();
  const server = net.createServer((sock) => {
    sockets.add(sock);
    sock.on('data', () => undefined); // reads the request, never answers
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  t.teardown(() => {
    for (const s of sockets) s.destroy();
    server.close();
  });
  const port = (server.address() as net.AddressInfo).port;
  process.env.AWS_REGION ??= 'default';
  const b = new S3Backend('s3://silent-bucket', {
    endpoint: `http://127.0.0.1:${port}`,
    requestTimeoutMs: 300,
    retry: { attempts: 2, baseMs: 5, capMs: 10 },
    credentials: { accessKeyId: 'AKIDEXAMPLE', secretAccessKey: 'secret' },
  });
  t.teardown(() => b.destroy());
  const e = await b.get('store.json').catch((x) => x);
  t.match(e, { code: 'EIO', message: /GET s3:\/\/silent-bucket\/store\.json failed after 2 attempt\(s\): .*(TimeoutError|timed out)/ });
  t.equal(String(e.message).split('\n').length, 1, 'one line');
  t.ok(sockets.size >= 2, `each attempt reached the server (${sockets.size} connections)`);
});

/**
 * Our own cluster on DISKSNAP_CEPH_PORT, made afresh; its creation fails now and then on a
 * loaded machine (the OSD refused with 'wrong fsid'), so it is tried twice, and then the
 * shared gateway is used (killed and restarted, as s3-faults.test.ts does) with a comment.
 */
async function ownGateway(t: Tap.Test): Promise<Awaited<ReturnType<typeof ceph>>> {
  for (let i = 1; i <= 2; i++) {
    try {
      const s3 = await ceph();
      t.teardown(() => void spawnSync('bash', [CEPH_SCRIPT, 'stop'], { timeout: 120_000 })); // ours: remove it
      return s3;
    } catch (e) {
      t.comment(`own gateway on port ${process.env.DISKSNAP_CEPH_PORT}, try ${i}: ${(e as Error).message}`);
      spawnSync('bash', [CEPH_SCRIPT, 'stop'], { timeout: 120_000 });
    }
  }
  if (sharedPort === undefined) delete process.env.DISKSNAP_CEPH_PORT;
  else process.env.DISKSNAP_CEPH_PORT = sharedPort;
  if (sharedDir !== undefined) process.env.DISKSNAP_CEPH_DIR = sharedDir;
  t.comment('using the shared gateway');
  const s3 = await ceph();
  t.teardown(() => void spawnSync('bash', [CEPH_SCRIPT, 'start'], { timeout: 300_000 })); // leave it up
  return s3;
}

t.test('on a gateway of its own', { skip }, async (t) => {
  const s3 = await ownGateway(t);
  const giveUp = { ...s3.env, DISKSNAP_S3_RETRIES: '2' }; // a process that fails fast when the gateway dies

  // The interrupted command fails in one line or completes whole; every completed snapshot
  // restores byte-exact; nothing half-written is visible; each re-run completes.
  t.test('gateway SIGKILLed mid-copy, mid-restore and mid-gc, then restarted', async (t) => {
    const dir = t.testdir();
    const src = await newBucket('kill-src');
    const dst = await newBucket('kill-dst', 'dr');
    const vol = path.join(dir, 'vol.img');
    makeImage(vol, 16 * MiB, [{ offset: 0, length: 12 * MiB, seed: 1 }]);
    const moments = new Map<string, string>();
    const s1 = await snap.createSnapshot(vol, { store: src, blockSize: BS, name: 'one' });
    moments.set('one', sha(vol));
    applyWrites(vol, [{ offset: 2 * MiB, length: 8 * MiB, seed: 2 }]);
    const s2 = await snap.createSnapshot(vol, { store: src, name: 'two' });
    moments.set('two', sha(vol));

    // ---- copy ----
    const copy = cliAsync(['snapshot', 'copy', s1.id, '--store', src, '--to-store', dst, '--json'], giveUp);
    const midCopy = await waitFor(async () => (await countBlocks(dst)) >= 8, 60_000); // early: since block requests skip the SDK, 192 objects copy in well under a second
    killGateway();
    const c = await copy;
    await restartGatewayAsync();
    if (c.status === 0) t.comment(`the copy finished before the kill (blocks seen mid-copy: ${midCopy})`);
    else clearFailure(t, c, 'copy interrupted');
    await sleep(TTL + 500); // the dead copier's leases run out
    const dstListing = await snap.listSnapshots({ store: dst });
    // A kill between the gateway taking the record's completing write and its answer leaves the
    // copy completed (whole: its manifest was durable first) while the copy fails: the error says so.
    const unknown = c.status !== 0 && /whether snap-[0-9a-f]+ completed is unknown/.test(c.err);
    const landed = dstListing.snapshots.filter((s) => s.state === 'completed').length;
    if (c.status !== 0) {
      if (unknown) t.comment(`the kill came with the copy's completing write (completed copies: ${landed})`);
      else t.equal(landed, 0, 'the interrupted copy is not completed');
      t.ok(landed <= 1, 'at most the one copy');
      t.equal(dstListing.snapshots.filter((s) => s.state === 'pending').length, 0, 'nor left pending once its writer is gone');
    }
    t.equal(await everyCompletedRestores(t, src, dir, moments, 'source after the copy kill'), 2);
    const c1 = await snap.copySnapshot(s1.id, { store: src, toStore: dst });
    t.equal(c1.state, 'completed', 'the copy re-run completes');
    // a copy that finished before the kill (exit 0, or its completing write taken) is in the
    // destination beside the re-run's, and restores byte-exact like it
    const copies = c.status === 0 ? 2 : 1 + landed;
    t.equal(await everyCompletedRestores(t, dst, dir, moments, 'destination after the re-run'), copies);

    // ---- restore ----
    const outDir = path.join(dir, 'out');
    fs.mkdirSync(outDir);
    const target = path.join(outDir, 'restored.img');
    // one request at a time, so that the restore is still reading when the gateway dies
    const restore = cliAsync(['snapshot', 'restore', s2.id, '--store', src, '--to', target], { ...giveUp, DISKSNAP_S3_CONCURRENCY: '1' });
    const midRestore = await waitFor(() => fs.readdirSync(outDir).some((n) => n.endsWith('.tmp')), 60_000); // made first, written at the end of a chunk
    killGateway();
    const r = await restore;
    await restartGatewayAsync();
    if (r.status === 0) {
      t.comment(`the restore finished before the kill (temporary file seen: ${midRestore})`);
      t.equal(sha(target), moments.get('two'), 'and is byte-exact');
      fs.rmSync(target);
    } else {
      clearFailure(t, r, 'restore interrupted');
      t.same(fs.readdirSync(outDir), [], 'no output under the final name, no temporary file');
    }
    // In this process, with retries that outlast a restart: the same restore rides it out.
    process.env.DISKSNAP_S3_RETRIES = '12';
    const patient = src + '/'; // another URL string: a backend built with the retries above
    const pR = snap.restoreSnapshot(s2.id, { store: patient, to: target });
    await waitFor(() => fs.readdirSync(outDir).some((n) => n.endsWith('.tmp')), 60_000);
    killGateway();
    await restartGatewayAsync();
    await pR;
    delete process.env.DISKSNAP_S3_RETRIES;
    t.equal(sha(target), moments.get('two'), 'the restore that rode out the restart is byte-exact');
    t.same(fs.readdirSync(outDir), ['restored.img'], 'and left no temporary file');

    // ---- gc ----
    await snap.deleteSnapshot(s1.id, { store: src }); // s1's blocks that s2 replaced become garbage
    const before = await countBlocks(src);
    const gc = cliAsync(['store', 'gc', '--store', src, '--json'], giveUp);
    const midGc = await waitFor(async () => (await countBlocks(src)) <= before - 10, 60_000);
    killGateway();
    const g = await gc;
    await restartGatewayAsync();
    if (g.status === 0) t.comment(`gc finished before the kill (deletions seen: ${midGc})`);
    else clearFailure(t, g, 'gc interrupted');
    await sleep(TTL + 500); // the dead gc's lease runs out
    t.equal(await everyCompletedRestores(t, src, dir, moments, 'source after the gc kill'), 1, 'only s2 is left, and it is whole');
    const g2 = await snap.gc({ store: src });
    t.equal(g2.liveSnapshots, 1, 'the gc re-run completes');
    t.equal(await countBlocks(src), g2.blocksKept, 'and leaves exactly the live blocks');
    t.equal(await everyCompletedRestores(t, src, dir, moments, 'source after the gc re-run'), 1);
    t.equal(await everyCompletedRestores(t, dst, dir, moments, 'destination at the end'), copies);
  });

  // Snapshot, copy, restore and gc complete, or fail in one clear line and complete when
  // re-run; never a wrong byte.
  t.test('through a proxy that resets, cuts and answers 503 at random', async (t) => {
    const dir = t.testdir();
    let seed = 4242;
    const rnd = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
    const proxy = await startFaultProxy(s3.endpoint, { reset: 0.05, cut: 0.05, err503: 0.08 }, rnd);
    t.teardown(() => proxy.close());
    const src = await newBucket('proxy-src');
    const dst = await newBucket('proxy-dst');
    const viaProxy = { ...s3.env, AWS_ENDPOINT_URL: proxy.endpoint };
    const failures: string[] = [];
    /** Runs a CLI command through the proxy until it succeeds (3 tries); a failure must be clear. */
    const through = async (args: string[], env: NodeJS.ProcessEnv = viaProxy) => {
      for (let i = 1; ; i++) {
        const r = await cliAsync(args, env);
        if (r.status === 0) return r;
        clearFailure(t, r, `${args.slice(0, 2).join(' ')} (try ${i})`);
        failures.push(r.err.trim());
        if (i === 3) throw new Error(`${args.join(' ')} failed 3 times: ${r.err}`);
        await sleep(TTL + 500); // a failed writer's leases run out before the re-run
      }
    };
    const vol = path.join(dir, 'vol.img');
    makeImage(vol, 8 * MiB, [{ offset: 0, length: 5 * MiB, seed: 7 }, { offset: 7 * MiB + 100, length: 5000, seed: 8 }]);
    const moments = new Map<string, string>();
    const a = JSON.parse((await through(['snapshot', 'create', vol, '--store', src, '--block-size', '64K', '--name', 'a', '--json'])).out);
    moments.set('a', sha(vol));
    applyWrites(vol, [{ offset: MiB, length: 2 * MiB, seed: 9 }]);
    const b = JSON.parse((await through(['snapshot', 'create', vol, '--store', src, '--name', 'b', '--json'])).out);
    moments.set('b', sha(vol));
    const cb = JSON.parse((await through(['snapshot', 'copy', b.id, '--store', src, '--to-store', dst, '--json'])).out);
    t.equal(cb.state, 'completed');
    for (const [id, store, name] of [[a.id, src, 'a'], [b.id, src, 'b'], [cb.id, dst, 'b']]) {
      const out = path.join(dir, `r-${id}.img`);
      await through(['snapshot', 'restore', id, '--store', store, '--to', out]);
      t.equal(sha(out), moments.get(name), `${name} restored through the faults is byte-exact`);
    }
    await through(['snapshot', 'delete', a.id, '--store', src]);
    const g = JSON.parse((await through(['store', 'gc', '--store', src, '--json'])).out);
    t.ok(g.blocksFreed > 0, `gc through the faults freed ${g.blocksFreed} blocks`);
    t.ok(proxy.counts.reset > 0 && proxy.counts.cut > 0 && proxy.counts.err503 > 0, `faults happened: ${JSON.stringify(proxy.counts)}`);

    // Harsher, with processes that give up after 2 attempts: commands fail part way, clearly;
    // nothing is half-visible.
    proxy.rates = { reset: 0.07, cut: 0.07, err503: 0.06 }; // 4% of requests fail twice: most fail part way
    applyWrites(vol, [{ offset: 4 * MiB, length: MiB, seed: 10 }]);
    const harsh = { ...viaProxy, DISKSNAP_S3_RETRIES: '2' };
    const cMoment = sha(vol);
    const outDir = path.join(dir, 'harsh');
    fs.mkdirSync(outDir);
    const results = [
      await cliAsync(['snapshot', 'create', vol, '--store', src, '--name', 'c', '--json'], harsh),
      await cliAsync(['snapshot', 'copy', b.id, '--store', src, '--to-store', dst, '--name', 'b2', '--json'], harsh),
      await cliAsync(['snapshot', 'restore', b.id, '--store', src, '--to', path.join(outDir, 'b.img')], harsh),
      await cliAsync(['store', 'gc', '--store', dst, '--json'], harsh),
    ];
    const failed = results.filter((r) => r.status !== 0);
    for (const r of failed) clearFailure(t, r, 'under harsh faults');
    t.ok(failed.length > 0, `${failed.length} of 4 commands failed under harsh faults`);
    // The moment 'c' captured, whatever its command said: a completed 'c' must be exactly it.
    moments.set('c', cMoment);
    if (results[2].status === 0) t.equal(sha(path.join(outDir, 'b.img')), moments.get('b'), 'a restore that got through is byte-exact');
    else t.same(fs.readdirSync(outDir), [], 'a failed restore leaves no output and no temporary file');
    await sleep(TTL + 500);
    moments.set('b2', moments.get('b')!);
    t.ok((await everyCompletedRestores(t, src, dir, moments, 'source after the faults')) >= 1);
    t.ok((await everyCompletedRestores(t, dst, dir, moments, 'destination after the faults')) >= 1);
    // and everything completes once the faults stop
    proxy.rates = {};
    const c = JSON.parse((await through(['snapshot', 'create', vol, '--store', src, '--name', 'c2', '--json'])).out);
    t.equal(c.state, 'completed');
    moments.set('c2', sha(vol));
    t.equal((await through(['store', 'gc', '--store', src, '--json'])).status, 0);
    t.equal((await through(['store', 'gc', '--store', dst, '--json'])).status, 0);
    t.ok((await everyCompletedRestores(t, src, dir, moments, 'source at the end')) >= 2);
    t.comment(`failures seen and re-run: ${failures.length}`);
  });
});
