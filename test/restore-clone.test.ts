/**
 * Restore on a filesystem that shares extents (a loop-mounted xfs): plain block objects are
 * verified, then cloned into the image rather than copied. The image is byte-exact, shares
 * its extents with the store, stays independent of it (copy on write), and a damaged object
 * still stops the restore before anything appears. Short last blocks and sealed objects are
 * written as before.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { needLoop, scratch, sh } from './helpers/loop';
import * as snap from '../src/storage';
import { KiB, MiB, Write, makeImage, sha, touched } from '../fixtures/store/helpers';

const skip = needLoop(['mkfs.xfs', 'filefrag']);
const BS = 64 * KiB;

/** An xfs filesystem with reflinks in a 400 MiB image file, loop-mounted. */
function xfs(s: ReturnType<typeof scratch>): string {
  const img = path.join(s.dir, 'xfs.img');
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 400 * MiB);
  const mk = sh('mkfs.xfs', ['-q', '-m', 'reflink=1', img]);
  if (mk.status !== 0) throw new Error(`mkfs.xfs: ${mk.stderr}`);
  const mp = path.join(s.dir, 'mnt');
  s.mount(img, mp, ['-o', 'loop']);
  return mp;
}

/** Bytes in extents that filefrag flags as shared. */
function sharedBytes(file: string): number {
  const r = sh('filefrag', ['-v', '-b1024', file]);
  let kib = 0;
  for (const line of r.stdout.split('\n')) {
    const m = /^\s*\d+:\s*\d+\.\.\s*\d+:\s*\d+\.\.\s*\d+:\s*(\d+):.*shared/.exec(line);
    if (m) kib += Number(m[1]);
  }
  return kib * 1024;
}

const writes: Write[] = [
  { offset: 0, length: 1 * MiB, seed: 1 },
  { offset: 3 * MiB + 100, length: 200 * KiB, seed: 2 },
  { offset: 20 * MiB + 1000 - 500, length: 500, seed: 3 }, // ends the volume: a short last block
];
const SIZE = 20 * MiB + 1000;

/** A scratch xfs (torn down after the test) holding the volume; the store goes beside it. */
function setup(t: { teardown: (fn: () => Promise<void>) => void }): { mp: string; vol: string; store: string } {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const mp = xfs(s);
  const vol = path.join(mp, 'vol.img');
  makeImage(vol, SIZE, writes);
  return { mp, vol, store: path.join(mp, 'store') };
}

t.test('a plain snapshot restores by cloning its objects on xfs', { skip }, async (t) => {
  const { mp, vol, store } = setup(t);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  const data = touched(writes, BS);
  t.equal(s1.stats.dataBlocks, data.length);

  const out = path.join(mp, 'out.img');
  const r = await snap.restoreSnapshot(s1.id, { store, to: out });
  t.equal(sha(out), sha(vol), 'byte-exact');
  t.equal(r.blocksWritten, data.length);
  t.equal(r.blocksCloned, data.length - 1, 'every whole block cloned; the short last one written');
  t.ok(sharedBytes(out) >= (data.length - 1) * BS, `the image shares its extents with the store (${sharedBytes(out)} bytes)`);

  // Copy on write: changing the restored image leaves the store's objects alone.
  const fd = fs.openSync(out, 'r+');
  fs.writeSync(fd, randomBytes(4096), 0, 4096, 8192);
  fs.fsyncSync(fd);
  fs.closeSync(fd);
  const v = await snap.verifySnapshot(s1.id, { store });
  t.equal(v.ok, true, 'the snapshot still verifies after its restored image was written to');

  // Without cloning (DISKSNAP_NO_CLONE=1) the same restore copies.
  process.env.DISKSNAP_NO_CLONE = '1';
  try {
    const out2 = path.join(mp, 'out2.img');
    const r2 = await snap.restoreSnapshot(s1.id, { store, to: out2 });
    t.equal(r2.blocksCloned, 0);
    t.equal(sha(out2), sha(vol));
    t.equal(sharedBytes(out2), 0, 'a copied image shares nothing');
  } finally {
    delete process.env.DISKSNAP_NO_CLONE;
  }

  // A damaged object is caught by the read before any clone: no output.
  const objects = path.join(store, 'blocks');
  const obj = fs
    .readdirSync(objects)
    .flatMap((d) => fs.readdirSync(path.join(objects, d)).map((f) => path.join(objects, d, f)))
    .find((f) => fs.statSync(f).size === BS)!;
  const bytes = fs.readFileSync(obj);
  bytes[100] ^= 0xff;
  fs.writeFileSync(obj, bytes);
  const bad = path.join(mp, 'bad.img');
  await t.rejects(snap.restoreSnapshot(s1.id, { store, to: bad }), /does not match its digest/);
  t.notOk(fs.existsSync(bad), 'nothing under the target name');
  // (the snapshot keeps its reflink clone of the volume in .vol.img.disksnap-reflink: not a temporary)
  t.same(
    fs.readdirSync(mp).filter((f) => f.includes('disksnap') && f !== '.vol.img.disksnap-reflink'),
    [],
    'no temporary file left',
  );
});

t.test('sealed objects are never cloned: an encrypted snapshot restores by decrypting', { skip }, async (t) => {
  const { mp, vol, store } = setup(t);
  const keyFile = path.join(mp, 'k');
  fs.writeFileSync(keyFile, randomBytes(32), { mode: 0o600 });
  await snap.registerVolume(vol, { store, blockSize: BS, encrypted: true, key: { keyFile } });
  const s1 = await snap.createSnapshot(vol, { store, key: { keyFile } });
  const out = path.join(mp, 'out.img');
  const r = await snap.restoreSnapshot(s1.id, { store, to: out, key: { keyFile } });
  t.equal(r.blocksCloned, 0);
  t.equal(sha(out), sha(vol));
  t.equal(sharedBytes(out), 0);
});
