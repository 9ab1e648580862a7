/**
 * Names resolve to completed snapshots first: a name left on an `error` snapshot (a failed
 * run) does not make it ambiguous after a successful re-run; the error snapshot can still be
 * found by its id, and by its name while it is the only one.
 */
import t from 'tap';
import * as path from 'node:path';
import * as snap from '../src/storage';
import { withFaults } from '../src/storage/faults';
import { MiB, ds, makeImage, sha } from '../fixtures/store/helpers';

t.test('a name left on an error snapshot resolves to the completed re-run', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 4 * MiB, [{ offset: 0, length: 2 * MiB, seed: 8 }]);
  await t.rejects(snap.createSnapshot(vol, withFaults({ store, name: 'nightly' }, { afterChunk: () => Promise.reject(new Error('disk on fire')) })), /disk on fire/);
  const failed = (await snap.listSnapshots({ store })).snapshots[0];
  t.equal(failed.state, 'error');
  t.equal((await snap.showSnapshot('nightly', { store })).id, failed.id, 'the only snapshot of that name: found by it');

  const good = await snap.createSnapshot(vol, { store, name: 'nightly' });
  t.equal(good.state, 'completed');
  t.equal((await snap.showSnapshot('nightly', { store })).id, good.id, 'the completed one wins');
  const out = path.join(dir, 'out.img');
  await snap.restoreSnapshot('nightly', { store, to: out });
  t.equal(sha(out), sha(vol), 'restore by name restores the completed one');
  const shown = ds(['snapshot', 'show', 'nightly', '--store', store, '--json']);
  t.equal(shown.status, 0, shown.stderr);
  t.equal(JSON.parse(shown.out).id, good.id, 'the CLI resolves it the same way');
  t.equal((await snap.showSnapshot(failed.id, { store })).state, 'error', 'the error snapshot by its id');

  const again = await snap.createSnapshot(vol, { store, name: 'nightly' });
  await t.rejects(snap.showSnapshot('nightly', { store }), { code: 'EINVALID', message: new RegExp(`ambiguous: ${good.id}, ${again.id}$`) }, 'two completed snapshots of one name stay ambiguous');
});
