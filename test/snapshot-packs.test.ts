/**
 * Packs (src/storage/store/packs.ts): an incremental's pieces are stored as parts of a few
 * pack objects, and its manifest (version 3) has a pack index beside it that says where each
 * piece it references lives. Checked on both backends: fewer objects than pieces, exact
 * restores along a chain after the parents are deleted and gc ran, a damaged pack or index
 * never giving wrong bytes (and gc stopping rather than freeing packs it cannot account for),
 * the recycle bin, copies, encryption, and the DISKSNAP_NO_PACKS diagnostic.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import * as snap from '../src/storage';
import { PACK_BYTES, PackTable, PackWriter, decodePackIndex, encodePackIndex, packName, packsOf } from '../src/storage/store/packs';
import { Throttle } from '../src/storage/pool';
import { forEachBackend } from './helpers/backends';
import { BS, KiB, MiB, PS, makeVolume, restored, sha } from './helpers/granules';

/**
 * Fresh random granules at `count` places (at most 60): two granules in each of count/2 blocks,
 * which a tag scan stores as pieces (at most four moved, and fewer changed blocks than its
 * buffer holds).
 */
function scatter(file: string, count: number, seed: number): void {
  const fd = fs.openSync(file, 'r+');
  try {
    for (let k = 0; k < count; k++) {
      const block = (seed + (k >> 1)) % 40;
      const granule = (seed + block + (k & 1) * 4) % 8;
      fs.writeSync(fd, randomBytes(PS), 0, PS, block * BS + granule * PS);
    }
  } finally {
    fs.closeSync(fd);
  }
}


t.test('a pack index: sorted entries, each digest once, a checksum; lookups find every entry', async (t) => {
  const packA = randomBytes(32);
  const packB = randomBytes(32);
  const entries = Array.from({ length: 300 }, (_, k) => ({ digest: randomBytes(32), pack: k % 2 ? packA : packB, offset: k * PS, length: PS + (k % 3) }));
  const encoded = encodePackIndex([...entries, entries[7]]);
  t.equal(encoded.toString('latin1', 0, 8), 'DSNAPPK\n');
  t.equal(encoded.length, 16 + 300 * 72 + 40, 'a digest given twice is listed once');
  const table = new PackTable();
  table.add(decodePackIndex('idx', encoded));
  for (const e of entries) {
    const at = table.lookup(e.digest);
    if (!at || !at.pack.equals(e.pack) || at.offset !== e.offset || at.length !== e.length) {
      t.fail(`entry ${e.digest.toString('hex')} not found as written`);
      return;
    }
  }
  t.equal(table.lookup(randomBytes(32)), undefined, 'a digest not listed is not found');
  t.same(packsOf(decodePackIndex('idx', encoded)).map((p) => p.toString('hex')).sort(), [packA, packB].map((p) => p.toString('hex')).sort(), 'the packs it names, each once');
  const damaged = Buffer.from(encoded);
  damaged[16 + 5 * 72 + 40] ^= 1;
  t.throws(() => decodePackIndex('idx', damaged), { code: 'ECORRUPT', message: /does not match its checksum/ });
  t.throws(() => decodePackIndex('idx', encoded.subarray(0, encoded.length - 72)), { code: 'ECORRUPT' }, 'a truncated index');
});

/** The pieces of the pack named `pack` in index entries, in pack order, as packName takes them. */
function partsOf(entries: Buffer, pack: Buffer): Array<{ digest: Buffer; offset: number; length: number }> {
  const out: Array<{ digest: Buffer; offset: number; length: number }> = [];
  for (let o = 0; o < entries.length; o += 72) {
    if (entries.subarray(o + 32, o + 64).equals(pack)) out.push({ digest: entries.subarray(o, o + 32), offset: entries.readUInt32LE(o + 64), length: entries.readUInt32LE(o + 68) });
  }
  return out.sort((a, b) => a.offset - b.offset);
}

t.test('a pack name: the SHA-256 of the piece table, so any digest, offset or length changes it', async (t) => {
  const parts = [0, 1, 2].map((i) => ({ digest: randomBytes(32), offset: i * 64 * KiB, length: 64 * KiB }));
  const name = packName(parts);
  t.equal(name.length, 32);
  t.same(packName(parts.map((p) => ({ ...p, digest: Buffer.from(p.digest) }))), name, 'the same table, the same name');
  t.notSame(packName([parts[1], parts[0], parts[2]]), name, 'another order');
  t.notSame(packName(parts.map((p, i) => (i === 2 ? { ...p, length: p.length - 1 } : p))), name, 'another length');
  t.notSame(packName(parts.map((p, i) => (i === 1 ? { ...p, offset: p.offset + 512 } : p))), name, 'another offset');
  const other = Buffer.from(parts[0].digest);
  other[31] ^= 1;
  t.notSame(packName([{ ...parts[0], digest: other }, parts[1], parts[2]]), name, 'another digest');
  t.notSame(packName(parts.slice(0, 2)), name, 'one piece fewer');
});

t.test('a pack writer: pieces one after the other, a pack named by its piece table, pieces larger than a pack (64 MiB blocks) in packs of their own', async (t) => {
  const written = new Map<string, Buffer>();
  const payloads: Array<Uint8Array | undefined> = [];
  const backend = {
    putIfAbsent: async (key: string, data: Uint8Array | readonly Uint8Array[], sha256?: Uint8Array) => {
      written.set(key, Buffer.concat(data instanceof Uint8Array ? [data] : [...data]));
      payloads.push(sha256);
      return true;
    },
  };
  const w = new PackWriter(backend, new PackTable(), new Throttle(64 * MiB), (d) => `blocks/${d.toString('hex')}`);
  const small = randomBytes(4 * KiB);
  const big = randomBytes(PACK_BYTES + 4 * MiB); // a piece of a 64 MiB block is 8 MiB
  const d = (b: Buffer) => createHash('sha256').update(b).digest();
  t.ok(await w.add(d(small), small));
  t.notOk(await w.add(d(small), small), 'the same piece twice is packed once');
  await w.flush(); // (its buffer is kept for the next pack)
  await new Promise((r) => setTimeout(r, 50));
  t.ok(await w.add(d(big), [big.subarray(0, 100), big.subarray(100)]), 'a piece larger than a pack buffer (in parts)');
  await w.flush();
  await new Promise((r) => setTimeout(r, 50));
  t.notOk(w.pending, 'every piece is in a written pack');
  t.equal(written.size, 2, 'two packs');
  const entries = decodePackIndex('idx', await w.index(Buffer.concat([d(small), d(big)])));
  for (const key of written.keys()) {
    const pack = Buffer.from(key.slice('blocks/'.length), 'hex');
    t.equal(key, `blocks/${packName(partsOf(entries, pack)).toString('hex')}`, 'named by the SHA-256 of its piece table');
  }
  t.same(payloads, [undefined, undefined], 'a local backend gets no payload hash (none is computed)');
  // a remote one (S3 signs x-amz-content-sha256) gets the SHA-256 of the bytes it stores
  const signed: Array<[Buffer, Uint8Array | undefined]> = [];
  const remote = new PackWriter(
    { concurrency: 4, putIfAbsent: async (_k: string, data: Uint8Array | readonly Uint8Array[], sha256?: Uint8Array) => (signed.push([Buffer.concat(data instanceof Uint8Array ? [data] : [...data]), sha256]), true) },
    new PackTable(),
    new Throttle(64 * MiB),
    (x) => `blocks/${x.toString('hex')}`,
  );
  t.ok(await remote.add(d(small), small));
  await remote.flush();
  while (!signed.length) await new Promise((r) => setTimeout(r, 5));
  t.same(Buffer.from(signed[0][1] ?? []), d(signed[0][0]), 'a remote backend gets the SHA-256 of the pack\'s bytes to sign');
  const table = new PackTable();
  table.add(entries);
  for (const piece of [small, big]) {
    const at = table.lookup(d(piece))!;
    t.ok(written.get(`blocks/${at.pack.toString('hex')}`)!.subarray(at.offset, at.offset + at.length).equals(piece), 'the index places each piece at its bytes');
  }
});

t.test('pieces read into reserved pack regions: the stored ones closed up, the others dropped, the pack written once its regions are settled', async (t) => {
  const written = new Map<string, Buffer>();
  const backend = {
    putIfAbsent: async (key: string, data: Uint8Array | readonly Uint8Array[]) => (written.set(key, Buffer.concat(data instanceof Uint8Array ? [data] : [...data])), true),
  };
  const writes = new Throttle(64 * MiB);
  const w = new PackWriter(backend, new PackTable(), writes, (x) => `blocks/${x.toString('hex')}`);
  const d = (b: Buffer) => createHash('sha256').update(b).digest();
  const [a, b, c] = [randomBytes(PS), randomBytes(PS), randomBytes(1000)];
  const r1 = await w.reserve(3 * PS);
  const r2 = await w.reserve(2 * PS);
  t.equal(r1.buf.length, 3 * PS, 'a region of the bytes asked for');
  t.equal(r2.buf.byteOffset - r1.buf.byteOffset, 3 * PS, 'the next one after it, in the same pack buffer');
  // as a dirty scan reads them: r1 holds a, a piece that did not change, then b; r2 holds c (short) and a again
  r1.buf.set(a, 0);
  r1.buf.fill(7, PS, 2 * PS);
  r1.buf.set(b, 2 * PS);
  r2.buf.set(c, 0);
  r2.buf.set(a, PS);
  const r3 = await w.reserve(PACK_BYTES - 5 * PS + 1); // does not fit: a fresh pack, and the first one is sealed
  await new Promise((r) => setTimeout(r, 20));
  t.equal(written.size, 0, 'a sealed pack waits for its open regions');
  t.same(w.settle(r1, [{ off: 0, len: PS, digest: d(a) }, { off: 2 * PS, len: PS, digest: d(b) }]), { count: 2, bytes: 2 * PS });
  t.same(w.settle(r2, [{ off: 0, len: 1000, digest: d(c) }, { off: PS, len: PS, digest: d(a) }]), { count: 1, bytes: 1000 }, 'a piece packed already is dropped');
  t.same(w.settle(r3, []), { count: 0, bytes: 0 }, 'a region with nothing to store (a failed read settles so)');
  await w.flush();
  await writes.drain();
  t.equal(written.size, 1, 'one pack: the empty one is not written');
  const [body] = [...written.values()];
  t.ok(body.equals(Buffer.concat([a, b, c])), 'the stored pieces closed up, in their order');
  t.notOk(w.pending, 'every piece is in a written pack');
  const table = new PackTable();
  table.add(decodePackIndex('idx', await w.index(Buffer.concat([d(a), d(b), d(c)]))));
  for (const piece of [a, b, c]) {
    const at = table.lookup(d(piece))!;
    t.ok(body.subarray(at.offset, at.offset + at.length).equals(piece), 'the index places each piece at its bytes');
  }
  // a region larger than a pack buffer gets a buffer of its own
  const big = await w.reserve(PACK_BYTES + PS);
  t.equal(big.buf.length, PACK_BYTES + PS);
  big.buf.fill(1);
  w.settle(big, [{ off: 0, len: PACK_BYTES + PS, digest: d(big.buf) }]);
  await w.flush();
  await writes.drain();
  t.equal(written.size, 2, 'written once settled and flushed');
  // reservations asked for at once are made one after the other, in order (a fresh pack for the first)
  const [x, y] = await Promise.all([w.reserve(PS), w.reserve(PS)]);
  t.same([x.at, y.at], [0, PS], 'in the order asked, one after the other');
  t.equal(x.f, y.f, 'in the same pack');
  w.settle(y, []);
  w.settle(x, []);
});

t.test('a pack region left open by a failed read is settled empty: a reader waiting for a buffer goes on', async (t) => {
  const gates: Array<() => void> = [];
  const backend = { allocBuffer: (n: number) => Buffer.alloc(n), putIfAbsent: async () => (await new Promise<void>((r) => gates.push(r)), true) };
  const writes = new Throttle(1024 * MiB);
  const w = new PackWriter(backend, new PackTable(), writes, (x) => `blocks/${x.toString('hex')}`);
  const regions = [];
  for (let k = 0; k < 4; k++) regions.push(await w.reserve(PACK_BYTES)); // four buffers, each a pack
  let fifth = false;
  const next = w.reserve(PACK_BYTES).then((r) => ((fifth = true), r));
  await new Promise((r) => setTimeout(r, 30));
  t.notOk(fifth, 'a fifth region waits for a buffer');
  w.settle(regions[0], []); // the group failed: nothing stored, its (sealed) pack buffer goes back unwritten
  const r5 = await next;
  t.ok(fifth, 'and then gets the buffer back');
  for (const r of [...regions.slice(1), r5]) w.settle(r, []);
  await w.flush();
  t.equal(gates.length, 0, 'nothing written for empty packs');
});

t.test('a pack writer fills at most four buffers: the next pack waits for a stored one, and a failed store lets it go on and is reported', async (t) => {
  const gates: Array<() => void> = [];
  let allocated = 0;
  let failNext = false;
  const written: string[] = [];
  const backend = {
    allocBuffer: (n: number) => (allocated++, Buffer.alloc(n)),
    putIfAbsent: async (key: string) => {
      await new Promise<void>((r) => gates.push(r));
      if (failNext) throw Object.assign(new Error('disk full'), { code: 'ENOSPC' });
      written.push(key);
      return true;
    },
  };
  const w = new PackWriter(backend, new PackTable(), new Throttle(1024 * MiB), (d) => `blocks/${d.toString('hex')}`);
  const piece = () => {
    const b = randomBytes(PACK_BYTES); // one piece fills a pack
    return { d: createHash('sha256').update(b).digest(), b };
  };
  for (let k = 0; k < 4; k++) {
    const p = piece();
    t.ok(await w.add(p.d, p.b));
  }
  await w.flush(); // the fourth pack goes out; four writes wait on their gates
  await new Promise((r) => setTimeout(r, 20));
  t.equal(allocated, 4, 'four buffers for four packs in flight');
  const fifth = piece();
  let added = false;
  const adding = w.add(fifth.d, fifth.b).then(() => (added = true));
  await new Promise((r) => setTimeout(r, 50));
  t.notOk(added, 'a fifth pack waits while four buffers are being stored');
  while (!gates.length) await new Promise((r) => setTimeout(r, 5));
  gates.shift()!();
  await adding;
  t.equal(allocated, 4, 'and then fills the buffer the stored pack gave back');
  failNext = true;
  while (gates.length) gates.shift()!();
  await new Promise((r) => setTimeout(r, 20));
  const sixth = piece();
  await t.rejects(
    (async () => {
      await w.add(sixth.d, sixth.b);
      await w.flush();
    })(),
    { code: 'ENOSPC' },
    'a failed pack store is reported to the writer, which is not left waiting for its buffer',
  );
  t.equal(allocated, 4, 'no buffer beyond the four');

  // a remote backend (with a request concurrency): as many packs in flight as the write throttle admits
  let remote = 0;
  const held: Array<() => void> = [];
  const s3like = {
    concurrency: 32,
    putIfAbsent: async () => (await new Promise<void>((r) => held.push(r)), true),
    allocBuffer: (n: number) => (remote++, Buffer.alloc(n)),
  };
  const r = new PackWriter(s3like, new PackTable(), new Throttle(1024 * MiB), (d) => `blocks/${d.toString('hex')}`);
  for (let k = 0; k < 16; k++) {
    const p = piece();
    await r.add(p.d, p.b);
  }
  await r.flush();
  t.equal(remote, 16, 'sixteen packs in flight to a remote store');
  while (held.length) held.shift()!();
});

forEachBackend(t, 'an incremental stores its pieces in packs: fewer objects, a version 3 manifest with its index, exact restores after parents are deleted', async (t, b) => {
  const dir = t.testdir();
  const store = await b.store('packs');
  const vol = path.join(dir, 'vol.img');
  makeVolume(vol);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  const want1 = sha(fs.readFileSync(vol));
  const blocksBefore = (await b.keys(store, 'blocks/')).length;
  scatter(vol, 60, 1);
  const s2 = await snap.createSnapshot(vol, { store });
  const want2 = sha(fs.readFileSync(vol));
  t.equal(s2.changeSource, 'tags');
  t.equal(s2.stats.blocksAdded, 60, 'sixty pieces stored');
  t.equal(s2.stats.bytesAdded, 60 * PS, 'of a granule each');
  const added = (await b.keys(store, 'blocks/')).length - blocksBefore;
  t.ok(added >= 1 && added <= 2, `in ${added} pack object(s), not 60 objects`);
  const manifest = await b.read(store, `snapshots/${s2.id}.map`);
  t.equal(manifest.readUInt16LE(8), 3, 'the manifest is version 3');
  const index = decodePackIndex('idx', await b.read(store, `snapshots/${s2.id}.packs`));
  t.equal(index.length / 72, 60, 'its pack index lists the 60 pieces');
  for (const pack of packsOf(index)) t.same(packName(partsOf(index, pack)), pack, `pack ${pack.toString('hex').slice(0, 12)} is named by its piece table`);
  t.equal(await restored(store, s2.id, dir), want2, 'the incremental restores exactly');
  t.ok((await snap.verifySnapshot(s2.id, { store })).ok, 'verify reads every piece from its pack');

  // a second incremental keeps some of the first one's pieces and adds its own
  scatter(vol, 30, 5);
  const s3 = await snap.createSnapshot(vol, { store });
  const want3 = sha(fs.readFileSync(vol));
  const index3 = decodePackIndex('idx', await b.read(store, `snapshots/${s3.id}.packs`));
  const packs2 = new Set(packsOf(index).map((p) => p.toString('hex')));
  t.ok(packsOf(index3).some((p) => packs2.has(p.toString('hex'))), 'its index names pieces kept in the parent\'s pack');
  t.ok(index3.length / 72 > 30, `and lists those as well as its own (${index3.length / 72} entries)`);

  // the parents deleted and gc run: the packs the last one needs stay
  for (const s of [s1, s2]) await snap.deleteSnapshot(s.id, { store, permanently: true });
  const g = await snap.gc({ store });
  t.equal(g.liveSnapshots, 1);
  t.equal(await restored(store, s3.id, dir), want3, 'the last restores exactly after its parents are gone');
  t.ok((await snap.verifySnapshot(s3.id, { store })).ok, 'and verifies');
  t.notOk((await b.keys(store, 'snapshots/')).some((k) => k.includes(s2.id)), 'the deleted snapshot\'s index went with it');
  t.not(want1, want3);
});

forEachBackend(t, 'a damaged pack or pack index never gives wrong bytes; gc stops rather than free packs it cannot account for', async (t, b) => {
  const dir = t.testdir();
  const store = await b.store('damage');
  const vol = path.join(dir, 'vol.img');
  makeVolume(vol);
  await snap.createSnapshot(vol, { store, blockSize: BS });
  const before = new Set(await b.keys(store, 'blocks/'));
  scatter(vol, 6, 3);
  const s2 = await snap.createSnapshot(vol, { store });
  const packs = (await b.keys(store, 'blocks/')).filter((k) => !before.has(k));
  t.equal(packs.length, 1, 'six pieces: one pack');

  // a bit flipped in the pack: the piece over it is bad, named by verify; restore refuses
  await b.flip(store, packs[0], 2 * PS + 100);
  const v = await snap.verifySnapshot(s2.id, { store });
  t.notOk(v.ok);
  t.equal(v.badBlocks.length, 1, 'one block bad');
  t.match(v.badBlocks[0].reason, /does not match its digest/);
  await t.rejects(snap.restoreSnapshot(s2.id, { store, to: path.join(dir, 'r.raw') }), { code: 'ECORRUPT' });
  t.notOk(fs.existsSync(path.join(dir, 'r.raw')), 'no output under the final name');
  await b.flip(store, packs[0], 2 * PS + 100);
  t.ok((await snap.verifySnapshot(s2.id, { store })).ok, 'flipped back: verifies');

  // a damaged index: restore names it
  const key = `snapshots/${s2.id}.packs`;
  const good = await b.read(store, key);
  await b.flip(store, key, 40);
  await t.rejects(snap.restoreSnapshot(s2.id, { store, to: path.join(dir, 'r.raw') }), { code: 'ECORRUPT', message: /\.packs: pack index does not match its checksum/ });
  // ... and gc stops before deleting anything
  const objects = async () => [...(await b.keys(store, 'blocks/')), ...(await b.keys(store, 'snapshots/'))];
  const keysBefore = await objects();
  await t.rejects(snap.gc({ store }), { code: 'ECORRUPT', message: /gc stopped before deleting anything/ });
  t.same(await objects(), keysBefore, 'gc deleted nothing');
  // a missing index likewise
  await b.remove(store, key);
  await t.rejects(snap.restoreSnapshot(s2.id, { store, to: path.join(dir, 'r.raw') }), { code: 'ECORRUPT', message: /pack index .* is missing/ });
  await t.rejects(snap.gc({ store }), { code: 'ECORRUPT', message: /gc stopped before deleting anything/ });
  t.ok((await b.keys(store, 'blocks/')).includes(packs[0]), 'the pack is still there');
  await b.write(store, key, good);
  t.equal(await restored(store, s2.id, dir), sha(fs.readFileSync(vol)), 'the index put back: restores exactly');
  await snap.gc({ store });
  t.equal(await restored(store, s2.id, dir), sha(fs.readFileSync(vol)), 'and after gc');
});

t.test('packs in an encrypted store, copied to another store, through the recycle bin', async (t) => {
  const dir = t.testdir();
  const vol = path.join(dir, 'vol.img');
  makeVolume(vol);
  const store = path.join(dir, 'sealed');
  const keyFile = path.join(dir, 'k');
  fs.writeFileSync(keyFile, randomBytes(32), { mode: 0o600 });
  const key = { keyFile };
  await snap.registerVolume(vol, { store, blockSize: BS, encrypted: true, key });
  const s1 = await snap.createSnapshot(vol, { store, key });
  scatter(vol, 12, 2);
  const s2 = await snap.createSnapshot(vol, { store, key });
  const want2 = sha(fs.readFileSync(vol));
  t.equal(s2.stats.blocksAdded, 12, 'twelve sealed pieces');
  t.ok(fs.existsSync(path.join(store, 'snapshots', `${s2.id}.packs`)), 'in packs, with an index');
  t.equal(await restored(store, s2.id, dir, key), want2, 'restores exactly');
  t.ok((await snap.verifySnapshot(s2.id, { store, key })).ok, 'verifies (each sealed piece authenticated)');

  // a copy to another store holds whole blocks and restores alone
  const other = path.join(dir, 'other');
  const c = await snap.copySnapshot(s2.id, { store, toStore: other, key });
  t.equal(await restored(other, c.id, dir, key), want2, 'the copy restores exactly');

  // the bin: delete the parent for good, the child into the bin; gc keeps its packs; undelete
  await snap.setBinRetention(7 * 86400, { store });
  await snap.deleteSnapshot(s1.id, { store, permanently: true });
  await snap.deleteSnapshot(s2.id, { store });
  t.ok(fs.existsSync(path.join(store, 'bin', `${s2.id}.packs`)), 'its index went into the bin with it');
  await snap.gc({ store });
  await snap.undeleteSnapshot(s2.id, { store });
  t.equal(await restored(store, s2.id, dir, key), want2, 'back from the bin after gc: restores exactly');
});

t.test('DISKSNAP_NO_PACKS=1: new pieces are objects of their own, and the index still lists the parent\'s packed ones', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeVolume(vol);
  await snap.createSnapshot(vol, { store, blockSize: BS });
  scatter(vol, 8, 4);
  const packed = await snap.createSnapshot(vol, { store });
  const count = () => fs.readdirSync(path.join(store, 'blocks')).reduce((n, d) => n + fs.readdirSync(path.join(store, 'blocks', d)).length, 0);
  const before = count();
  scatter(vol, 5, 9);
  const old = process.env.DISKSNAP_NO_PACKS;
  process.env.DISKSNAP_NO_PACKS = '1';
  let loose;
  try {
    loose = await snap.createSnapshot(vol, { store });
  } finally {
    if (old === undefined) delete process.env.DISKSNAP_NO_PACKS;
    else process.env.DISKSNAP_NO_PACKS = old;
  }
  t.equal(count() - before, loose.stats.blocksAdded, 'one object per new piece');
  const index = decodePackIndex('idx', fs.readFileSync(path.join(store, 'snapshots', `${loose.id}.packs`)));
  t.ok(index.length > 0, 'the pieces kept from the packed parent are listed');
  await snap.deleteSnapshot(packed.id, { store, permanently: true });
  await snap.gc({ store });
  t.equal(await restored(store, loose.id, dir), sha(fs.readFileSync(vol)), 'restores exactly after its parent is gone');
});

t.test('a pack writer prepares the buffers a known amount of pieces will fill, and fills those', async (t) => {
  const allocated: Buffer[] = [];
  const stored: Buffer[] = [];
  const backend = {
    allocBuffer: (n: number) => {
      const b = Buffer.alloc(n);
      allocated.push(b);
      return b;
    },
    putIfAbsent: async (_k: string, data: Uint8Array | readonly Uint8Array[]) => (stored.push(Buffer.from(data as Uint8Array)), true),
  };
  const w = new PackWriter(backend, new PackTable(), new Throttle(1024 * MiB), (d) => `blocks/${d.toString('hex')}`);
  w.prepare(PACK_BYTES + 1);
  t.equal(allocated.length, 2, 'two buffers for a pack and one byte');
  w.prepare(2 * PACK_BYTES);
  t.equal(allocated.length, 2, 'no more for as much again (it counts the buffers it has)');
  w.prepare(100 * PACK_BYTES);
  t.equal(allocated.length, 4, 'at most four, as when filling');
  const pieces = [randomBytes(64 * KiB), randomBytes(64 * KiB)];
  for (const p of pieces) t.ok(await w.add(createHash('sha256').update(p).digest(), p));
  await w.flush();
  while (!stored.length) await new Promise((r) => setTimeout(r, 5));
  t.equal(allocated.length, 4, 'the pieces went into a prepared buffer');
  t.ok(allocated.some((b) => b.subarray(0, 128 * KiB).equals(Buffer.concat(pieces))), 'one of the prepared buffers holds them');
  t.ok(stored[0].equals(Buffer.concat(pieces)), 'and the pack stored is their bytes');
  t.notOk(w.pending);
});
