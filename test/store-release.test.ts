/**
 * Giving back a store lock or a snapshot's lease (src/storage/common.ts `holding`): a command
 * that failed reports its own first error, not the release that failed after it (a gateway
 * that broke the command is usually still down); a command whose work is done and durable
 * does not fail because the release did (the lease runs out on its own), it says so instead.
 * The gateway suites (test/s3-faults*.test.ts) kill the gateway at such moments.
 */
import t from 'tap';
import { holding } from '../src/storage/common';

function held(fail: boolean) {
  const h = { released: 0, release: async () => {
    h.released++;
    if (fail) throw new Error('DELETE leases/snap-1 failed after 2 attempt(s): ECONNREFUSED');
  } };
  return h;
}

t.test('the work failed, the release too: the work\'s error is the one thrown', async (t) => {
  const h = held(true);
  const logs: string[] = [];
  await t.rejects(holding(h, 'the lease of snap-1', (m) => logs.push(m), async () => {
    throw new Error('PUT blocks/ab failed after 2 attempt(s)');
  }), { message: /PUT blocks\/ab/ });
  t.equal(h.released, 1, 'the release was tried');
  t.same(logs, [], 'and not reported: the first failure is the story');
});

t.test('the work is done, the release failed: the result stands and the release is reported', async (t) => {
  const h = held(true);
  const logs: string[] = [];
  t.equal(await holding(h, 'the lease of snap-1', (m) => logs.push(m), async () => 'completed'), 'completed');
  t.equal(h.released, 1);
  t.equal(logs.length, 1);
  t.match(logs[0], /^the lease of snap-1 was not given back \(DELETE leases\/snap-1 failed .*\); it runs out on its own$/);
});

t.test('nothing failed: released once, nothing said; a synchronous release works too', async (t) => {
  const h = held(false);
  const logs: string[] = [];
  t.equal(await holding(h, 'x', (m) => logs.push(m), async () => 42), 42);
  t.equal(h.released, 1);
  t.same(logs, []);
  let sync = 0;
  t.equal(await holding({ release: () => void sync++ }, 'y', undefined, async () => 'ok'), 'ok');
  t.equal(sync, 1);
  await t.rejects(holding({ release: () => { throw new Error('lock file gone'); } }, 'y', undefined, async () => { throw new Error('first'); }), { message: 'first' });
});

t.test('gc that finished says its exclusive lock was not given back (the store\'s other commands wait for it)', async (t) => {
  const os = await import('node:os');
  const fs = await import('node:fs');
  const path = await import('node:path');
  const { gc } = await import('../src/storage/gc');
  const { Store } = await import('../src/storage/store/store');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-release-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  const store = path.join(dir, 'store');
  await Store.open(store, { create: true });
  const lock = Store.prototype.lock;
  t.teardown(() => void (Store.prototype.lock = lock));
  Store.prototype.lock = async function (this: InstanceType<typeof Store>, ...a: Parameters<typeof lock>) {
    const held = await lock.apply(this, a);
    const release = held.release.bind(held);
    held.release = async () => {
      await release();
      throw new Error('PUT locks/exclusive failed after 2 attempt(s): ECONNREFUSED');
    };
    return held;
  };
  const logs: string[] = [];
  const r = await gc({ store, onLog: (m) => logs.push(m) });
  t.equal(r.blocksFreed, 0, 'the gc report stands');
  t.equal(logs.length, 1);
  t.match(logs[0], /^the exclusive lock of store .*store was not given back \(PUT locks\/exclusive failed .*\); it runs out on its own$/);
});
