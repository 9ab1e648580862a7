/**
 * One qcow2 volume kept in two stores (a local one and another, say off the machine): each
 * store's snapshots track the volume with a persistent bitmap of their own, named for the
 * store, so that a snapshot into one store never removes the bitmap the other reads next.
 * Before, the bitmap was named for the volume alone (whose id is the same in every store), and
 * every incremental of such a volume hashed all of its data. Also: a parent recorded under that
 * earlier name is still read (then removed), and a record naming any other bitmap is not followed.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as snap from '../src/storage';
import { assertClean, guestBytes, qemuImgOk, qemuIo } from './helpers/qemu';
import { needQemuNbd, qemuBitmaps, trackedVolume } from './helpers/qemu-bitmaps';
import { restored, sha } from './helpers/granules';

const KiB = 1024;
const MiB = 2 ** 20;
const BS = 512 * KiB;
const skip = needQemuNbd();

const storeId = (store: string): string => (JSON.parse(fs.readFileSync(path.join(store, 'store.json'), 'utf8')) as { id: string }).id;

/** Rewrites a snapshot record's bitmap name (a directory store's record is plain JSON). */
function recordBitmap(store: string, id: string, name: string): void {
  const file = path.join(store, 'snapshots', `${id}.json`);
  const rec = JSON.parse(fs.readFileSync(file, 'utf8')) as { changeTracking: { bitmap: string } };
  rec.changeTracking.bitmap = name;
  fs.writeFileSync(file, JSON.stringify(rec, null, 2) + '\n');
}

t.test('two stores snapshot one qcow2 volume in turns: each incremental reads its own store\'s bitmap', { skip }, async (t) => {
  const dir = t.testdir();
  const vol = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', vol, '64M');
  qemuIo(vol, ['write -P 0x11 0 24M']);
  const stores = [path.join(dir, 'local'), path.join(dir, 'offsite')];
  const firsts = [];
  for (const store of stores) firsts.push(await snap.createSnapshot(vol, { store, blockSize: BS }));
  t.equal(firsts[0].volumeId, firsts[1].volumeId, 'the volume has the same id in both stores');
  for (const [k, s] of firsts.entries()) {
    t.equal(s.changeTracking?.bitmap, `disksnap-${storeId(stores[k])}-${s.volumeId}-${s.id}`, `store ${k + 1}'s bitmap is named for the store, the volume and the snapshot`);
  }
  t.same(qemuBitmaps(vol).map((b) => b.name).sort(), firsts.map((s) => s.changeTracking!.bitmap).sort(), 'each store keeps one bitmap in the image');
  for (let round = 0; round < 3; round++) {
    qemuIo(vol, [`write -P ${0x21 + round} ${(2 + round * 5) * MiB} 64k`, `write -P ${0x31 + round} ${(40 + round) * MiB} 4k`]);
    const want = guestBytes(vol);
    for (const [k, store] of stores.entries()) {
      const s = await snap.createSnapshot(vol, { store });
      t.equal(s.changeSource, 'bitmap', `round ${round + 1}, store ${k + 1}: the bitmap was used (${s.changeSourceReason})`);
      // store 2 also sees the writes made before store 1's snapshot of this round: the same ones
      t.equal(s.stats.bytesScanned, 2 * 64 * KiB, `round ${round + 1}, store ${k + 1}: only the two dirty granules were read`);
      t.equal(await restored(store, s.id, dir), sha(want), `round ${round + 1}, store ${k + 1}: restores exactly`);
    }
    t.equal(qemuBitmaps(vol).length, 2, `round ${round + 1}: still one bitmap per store`);
    assertClean(t, vol, `round ${round + 1}`);
  }
});

t.test('a parent recorded under the earlier bitmap name is read, and its bitmap removed after', { skip }, async (t) => {
  const dir = t.testdir();
  const { store, vol, s1 } = await trackedVolume(dir, '8M');
  // as an earlier disksnap left it: the bitmap named for the volume alone, and the record saying so
  const legacy = `disksnap-${s1.volumeId}-${s1.id}`;
  qemuImgOk('bitmap', '--add', '-g', '65536', '-f', 'qcow2', vol, legacy);
  qemuImgOk('bitmap', '--remove', '-f', 'qcow2', vol, s1.changeTracking!.bitmap);
  recordBitmap(store, s1.id, legacy);
  qemuIo(vol, ['write -P 0x22 5M 4k']);
  const s2 = await snap.createSnapshot(vol, { store });
  t.equal(s2.changeSource, 'bitmap', `the bitmap under the earlier name was read (${s2.changeSourceReason})`);
  t.equal(s2.stats.bytesScanned, 64 * KiB, 'one dirty granule read');
  t.equal(await restored(store, s2.id, dir), sha(guestBytes(vol)), 'restores exactly');
  t.same(qemuBitmaps(vol).map((b) => b.name), [s2.changeTracking!.bitmap], 'the earlier-named bitmap is gone; the new one is named for the store');
  t.match(s2.changeTracking!.bitmap, new RegExp(`^disksnap-${storeId(store)}-`));
});

t.test('a record that names a bitmap this store does not name is not followed, and that bitmap stays', { skip }, async (t) => {
  const dir = t.testdir();
  const { store, vol, s1 } = await trackedVolume(dir, '8M');
  // another tool's bitmap, added after the snapshot: it would miss nothing here, but it is not
  // this store's to read (nor to remove)
  qemuImgOk('bitmap', '--add', '-g', '65536', '-f', 'qcow2', vol, 'backup-tool');
  recordBitmap(store, s1.id, 'backup-tool');
  qemuIo(vol, ['write -P 0x22 5M 4k']);
  const s2 = await snap.createSnapshot(vol, { store });
  t.not(s2.changeSource, 'bitmap', 'the named bitmap was not used');
  t.match(s2.changeSourceReason ?? '', /records bitmap 'backup-tool', which is not a name this store gives/);
  t.equal(await restored(store, s2.id, dir), sha(guestBytes(vol)), 'restores exactly (every data block hashed)');
  t.same(qemuBitmaps(vol).map((b) => b.name).sort(), ['backup-tool', s2.changeTracking!.bitmap].sort(), "the other tool's bitmap is left alone");
});
