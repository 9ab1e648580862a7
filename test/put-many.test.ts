/**
 * A directory store takes a chunk's block objects in one native call (putManyIfAbsent,
 * native putObjectsAsync) instead of one call per object. Each object is written as a single
 * put writes it: new prefix directories are made, existing objects are not replaced, equal
 * blocks are stored once and counted once, and the snapshot restores exact. An encrypted
 * store seals each object and keeps putting them one by one.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import * as snap from '../src/storage';
import { native } from '../src/engine/native';
import { DirectoryBackend } from '../src/storage/store/dir';
import { KiB, MiB, makeImage, sha } from '../fixtures/store/helpers';

const n = native();

/** Calls of putObjectsAsync (objects each) and of putObjectAsync for block objects while `fn` runs. */
async function puts<T>(fn: () => Promise<T>): Promise<{ value: T; many: number[]; single: number }> {
  const origMany = n.putObjectsAsync;
  const origOne = n.putObjectAsync;
  const many: number[] = [];
  let single = 0;
  n.putObjectsAsync = (d, nm, h) => {
    many.push(h.length);
    return origMany.call(n, d, nm, h);
  };
  n.putObjectAsync = (...a: Parameters<typeof origOne>) => {
    if (a[0].includes(`${path.sep}blocks${path.sep}`)) single++; // (not store.json, key records)
    return origOne.apply(n, a);
  };
  try {
    return { value: await fn(), many, single };
  } finally {
    n.putObjectsAsync = origMany;
    n.putObjectAsync = origOne;
  }
}

t.test('putManyIfAbsent: new objects written, existing ones kept, a missing prefix directory made', async (t) => {
  const dir = t.testdir();
  const b = new DirectoryBackend(dir);
  fs.mkdirSync(path.join(dir, 'blocks', 'aa'), { recursive: true });
  fs.writeFileSync(path.join(dir, 'blocks', 'aa', 'old'), 'kept');
  const items = [
    { key: 'blocks/aa/one', data: randomBytes(512 * KiB) },
    { key: 'blocks/aa/old', data: Buffer.from('new') },
    { key: 'blocks/bb/two', data: randomBytes(1000) }, // blocks/bb does not exist yet
  ];
  t.same(await b.putManyIfAbsent(items), [true, false, true]);
  t.ok(fs.readFileSync(path.join(dir, 'blocks', 'aa', 'one')).equals(items[0].data));
  t.equal(fs.readFileSync(path.join(dir, 'blocks', 'aa', 'old'), 'utf8'), 'kept');
  t.ok(fs.readFileSync(path.join(dir, 'blocks', 'bb', 'two')).equals(items[2].data), 'written after its directory was made');
  await b.flush();
  fs.writeFileSync(path.join(dir, 'blocks', 'cc'), 'a file where a prefix directory goes');
  await t.rejects(b.putManyIfAbsent([{ key: 'blocks/cc/x', data: Buffer.from('x') }]), { code: 'ENOTDIR', message: /blocks\/cc/ }, 'a failure names where');
});

t.test('a full snapshot into a directory store puts each chunk\'s objects in one call; equal blocks once; it restores exact', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  // 40 MiB of data: 3 chunks of 16 MiB; blocks 4 and 5 of the first chunk are equal
  makeImage(vol, 48 * MiB, [{ offset: 0, length: 40 * MiB, seed: 7 }]);
  const fd = fs.openSync(vol, 'r+');
  const same = randomBytes(512 * KiB);
  fs.writeSync(fd, same, 0, same.length, 4 * 512 * KiB);
  fs.writeSync(fd, same, 0, same.length, 5 * 512 * KiB);
  fs.closeSync(fd);
  const r = await puts(() => snap.createSnapshot(vol, { store }));
  t.equal(r.value.changeSource, 'full');
  t.same([...r.many].sort((a, b) => a - b), [16, 31, 32], 'one call per chunk (the equal block of the first put once)');
  t.equal(r.single, 0, 'no object put on its own (its prefix directories made in the call)');
  for (const d of fs.readdirSync(path.join(store, 'blocks'))) t.ok(fs.readdirSync(path.join(store, 'blocks', d)).every((f) => /^[0-9a-f]{64}$/.test(f)), `blocks/${d}: objects only`);
  t.equal(r.value.stats.blocksAdded, 79, 'every distinct block counted once');
  t.equal(r.value.stats.bytesAdded, 79 * 512 * KiB);
  const out = path.join(dir, 'out.img');
  await snap.restoreSnapshot(r.value.id, { store, to: out });
  t.equal(sha(out), sha(vol), 'restores exact');
  // another volume with the same bytes: every object exists already, none is replaced
  const twin = path.join(dir, 'twin.img');
  fs.copyFileSync(vol, twin);
  const again = await puts(() => snap.createSnapshot(twin, { store }));
  t.equal(again.value.changeSource, 'full');
  t.same([...again.many].sort((a, b) => a - b), [16, 31, 32], 'put the same way');
  t.equal(again.value.stats.blocksAdded, 0, 'a snapshot whose blocks the store has adds none');
  await snap.restoreSnapshot(again.value.id, { store, to: out, force: true });
  t.equal(sha(out), sha(vol), 'and restores exact');
});

t.test('an encrypted store seals each object and puts them one by one', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  const keyFile = path.join(dir, 'key');
  fs.writeFileSync(keyFile, randomBytes(32), { mode: 0o600 });
  makeImage(vol, 8 * MiB, [{ offset: 0, length: 4 * MiB, seed: 9 }]);
  await snap.registerVolume(vol, { store, encrypted: true, key: { keyFile } });
  const r = await puts(() => snap.createSnapshot(vol, { store, key: { keyFile } }));
  t.same(r.many, [], 'no batched call');
  t.ok(r.value.stats.blocksAdded > 0 && r.single >= r.value.stats.blocksAdded, `each sealed object a call of its own (${r.single} calls, ${r.value.stats.blocksAdded} objects)`);
  const out = path.join(dir, 'out.img');
  await snap.restoreSnapshot(r.value.id, { store, to: out, key: { keyFile } });
  t.equal(sha(out), sha(vol), 'restores exact');
});
