/**
 * `snapshot create --read-all`: every data block read and compared with the parent, whatever
 * the records of change say. A qcow2 image whose file is edited behind QEMU's back (its
 * bitmap knows nothing of it) is the case it is for: the default incremental trusts the bitmap
 * and keeps the parent's bytes there (shown here, so that the read-all half can fail), the
 * read-all one holds exactly what `qemu-img convert` shows, stores only the new block, and
 * leaves the bitmap chain going, so the next default incremental reads the bitmap again.
 * A raw volume whose times say it is unchanged is read anyway. Both on a directory store and
 * on the Ceph gateway.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as snap from '../src/storage';
import { assertClean, guestBytes, qemuImgOk, qemuIo } from './helpers/qemu';
import { needQemuNbd, qemuBitmaps } from './helpers/qemu-bitmaps';
import { cli } from './helpers/cli';
import { forEachBackend } from './helpers/backends';

const KiB = 1024;
const MiB = 2 ** 20;
const skip = needQemuNbd();

async function restoredBytes(store: string, id: string, dir: string): Promise<Buffer> {
  const out = path.join(dir, `r-${id}.raw`);
  await snap.restoreSnapshot(id, { store, to: out });
  try {
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(out);
  }
}

function createJson(args: string[]): snap.SnapshotJson {
  const r = cli(['snapshot', 'create', ...args, '--json']);
  if (r.status !== 0) throw new Error(`snapshot create ${args.join(' ')}: ${r.stderr}`);
  return JSON.parse(r.out) as snap.SnapshotJson;
}

forEachBackend(t, 'a qcow2 image edited behind its bitmap: the default incremental misses it, --read-all does not', async (t, b) => {
  if (skip) return void t.skip(skip);
  const dir = t.testdir();
  const store = await b.store('read-all-qcow2');
  const vol = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', vol, '16M');
  qemuIo(vol, ['write -P 0x11 0 3M', 'write -P 0x12 8M 1M']);
  t.equal(createJson([vol, '--store', store]).changeSource, 'full');
  qemuIo(vol, ['write -P 0x13 1M 512k']); // a whole block: no pieces, which a read-all would store whole again
  const second = createJson([vol, '--store', store]);
  t.equal(second.changeSource, 'bitmap', 'a guest write: the bitmap is read');
  const before = guestBytes(vol);
  t.ok((await restoredBytes(store, second.id, dir)).equals(before), 'and the incremental is exact');

  // Bytes of a data cluster changed in the file itself, as a tool that bypasses QEMU would.
  const map = JSON.parse(qemuImgOk('map', '--output=json', vol)) as { start: number; length: number; data: boolean; offset?: number }[];
  const at = map.find((e) => e.data && e.start <= 8 * MiB && 8 * MiB < e.start + e.length)!;
  const fd = fs.openSync(vol, 'r+');
  fs.writeSync(fd, Buffer.alloc(4 * KiB, 0x99), 0, 4 * KiB, at.offset! + (8 * MiB - at.start) + 100 * KiB);
  fs.closeSync(fd);
  const now = guestBytes(vol);
  t.notOk(now.equals(before), 'the guest view changed');

  const trusted = createJson([vol, '--store', store]);
  t.equal(trusted.changeSource, 'bitmap', 'by default the bitmap is trusted');
  t.ok((await restoredBytes(store, trusted.id, dir)).equals(before), 'so that snapshot keeps the parent bytes where the file was edited (what --read-all is for)');

  const all = createJson([vol, '--store', store, '--read-all']);
  t.equal(all.changeSource, 'hash', 'with --read-all every block is hashed');
  t.match(all.changeSourceReason ?? '', /read-all/, 'and the record says why');
  t.equal(all.stats.bytesScanned, 4 * MiB, 'every data block was read');
  t.equal(all.stats.changedBlocks, 1, 'one block differs from the parent');
  t.equal(all.stats.blocksAdded, 1, 'and only it is stored');
  t.ok((await restoredBytes(store, all.id, dir)).equals(now), 'it holds exactly what qemu-img convert shows');
  assertClean(t, vol, 'after the read-all snapshot');
  const names = qemuBitmaps(vol).map((b) => b.name);
  t.ok(names.some((n) => n.endsWith(all.id)), `its own bitmap is on the image (${names.join(', ')})`);
  t.notOk(names.some((n) => n.endsWith(trusted.id)), "and the parent's is gone: the chain goes on");

  qemuIo(vol, ['write -P 0x14 12M 64k']);
  const next = createJson([vol, '--store', store]);
  t.equal(next.changeSource, 'bitmap', 'the next default incremental reads the bitmap again');
  t.ok((await restoredBytes(store, next.id, dir)).equals(guestBytes(vol)), 'and is exact');
});

forEachBackend(t, 'a raw volume whose times say unchanged is read anyway with --read-all', async (t, b) => {
  const dir = t.testdir();
  const store = await b.store('read-all-raw');
  const vol = path.join(dir, 'vol.img');
  const data = Buffer.alloc(4 * MiB);
  for (let i = 0; i < data.length; i += 4096) data[i] = (i / 4096) & 0xff || 1;
  fs.writeFileSync(vol, data);
  createJson([vol, '--store', store]);
  const quiet = createJson([vol, '--store', store]);
  if (quiet.changeSource !== 'unchanged') {
    // (only where the volume's times are trusted: ext4, xfs, btrfs)
    t.comment(`the unchanged path is not taken on this filesystem (${quiet.changeSource}: ${quiet.changeSourceReason ?? ''})`);
  }
  t.equal(quiet.stats.bytesScanned, quiet.changeSource === 'unchanged' ? 0 : 4 * MiB, 'by default: read only where the times do not vouch for it');
  const all = createJson([vol, '--store', store, '--read-all']);
  t.not(all.changeSource, 'unchanged', `with --read-all it is read (${all.changeSource})`);
  t.match(all.changeSourceReason ?? '', /read-all/);
  t.equal(all.stats.bytesScanned, 4 * MiB, 'every data block');
  t.equal(all.stats.blocksAdded, 0, 'nothing new to store');
  t.ok((await restoredBytes(store, all.id, dir)).equals(data), 'and it restores exactly');
});
