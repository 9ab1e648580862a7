/**
 * The public API (src/index.ts) as a library user sees it: one import, both strategies.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createRawImage, openImage, diff, snapshots, isDisksnapError } from '../src/index';

t.test('one import gives raw images, differencing disks and storage snapshots', async (t) => {
  const dir = t.testdir();
  const vol = path.join(dir, 'vol.img');
  const child = path.join(dir, 'vol.qcow2');
  const store = path.join(dir, 'store');
  await createRawImage(vol, 4 << 20);
  const img = openImage(vol, { write: true });
  img.writeSync(Buffer.from('first version'), 1 << 20);
  img.close();

  const snap = await snapshots.createSnapshot(vol, { store, name: 'before' });
  t.equal(snap.state, 'completed');

  await diff.createChild(vol, child);
  const c = openImage(child, { write: true });
  t.equal(c.format, 'qcow2');
  c.writeSync(Buffer.from('child version'), 1 << 20);
  const back = Buffer.alloc(13);
  c.readSync(back, 1 << 20);
  t.equal(back.toString(), 'child version', 'the child shows its own write');
  c.close();
  try {
    openImage(vol, { write: true }).close();
    t.fail('the parent opened for writing while it has a child');
  } catch (e) {
    t.ok(isDisksnapError(e, 'EBUSY'), 'the parent is read-only while it has a child');
  }
  diff.rollback(child);
  t.notOk(fs.existsSync(child));

  const restored = path.join(dir, 'restored.img');
  await snapshots.restoreSnapshot(snap.id, { store, to: restored });
  t.ok(fs.readFileSync(restored).equals(fs.readFileSync(vol)), 'the snapshot restores the volume byte for byte');
});
