/**
 * Two `snapshot create` of the same new volume at once register it once: one volume record,
 * both snapshots under it. The store holds many other volumes, so that listing them (what
 * each process does before it registers the volume) takes long enough for both to miss the
 * other's record.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import * as snap from '../src/storage';
import { MiB, makeImage, sha } from '../fixtures/store/helpers';
import { cliAsync } from './helpers/cli';

t.test('two snapshot creates of one new volume at once register it once', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 4 * MiB, [{ offset: 0, length: 2 * MiB, seed: 7 }]);
  await snap.initStore({ store, blockSize: 64 * 1024 });
  // Other volumes' records, so that the listing takes a while.
  for (let i = 0; i < 3000; i++) {
    const id = `vol-${randomBytes(8).toString('hex')}`;
    const rec = { id, path: path.join(dir, `other-${i}.img`), size: MiB, dev: 1, ino: String(i + 1), encrypted: false, keyId: null, created: new Date().toISOString(), inPlaceRestore: null };
    fs.writeFileSync(path.join(store, 'volumes', `${id}.json`), JSON.stringify(rec));
  }
  const [a, b] = await Promise.all([0, 1].map((n) => cliAsync(['snapshot', 'create', vol, '--store', store, '--name', `s${n}`, '--json'])));
  t.equal(a.status, 0, a.err);
  t.equal(b.status, 0, b.err);
  const real = fs.realpathSync(vol);
  const mine = (await snap.listVolumes({ store })).volumes.filter((v) => v.path === real);
  t.equal(mine.length, 1, 'one volume record for the path');
  const ids = [JSON.parse(a.out), JSON.parse(b.out)].map((s: { volumeId: string }) => s.volumeId);
  t.same(ids, [mine[0].id, mine[0].id], 'both snapshots are of that volume');
  const listed = (await snap.listSnapshots({ store, volume: vol })).snapshots;
  t.equal(listed.length, 2, 'both are listed under --volume');
  const before = sha(vol);
  for (const s of listed) {
    const r = await snap.restoreSnapshot(s.id, { store, inPlace: vol });
    t.equal(r.mode, 'in-place', `in-place restore of ${s.name} is allowed`);
  }
  t.equal(sha(vol), before, 'and gives the volume back as it was');
});
