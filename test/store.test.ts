/**
 * The store's building blocks on their own: manifest format (round trip, every damaged field
 * named), records (field-by-field validation), the digest set of gc, the directory backend's
 * write-once semantics, store creation and block size rules, and the store lock.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { DirectoryBackend } from '../src/storage/store/dir';
import { ManifestReader, ManifestWriter, ManifestCursor, HEADER_LENGTH, ENTRY_LENGTH } from '../src/storage/store/manifest';
import { DigestSet } from '../src/storage/store/digestset';
import { TagReader, TagWriter, tagKeyFrom } from '../src/storage/store/tags';
import { Store, defaultStoreDir } from '../src/storage/store/store';
import { StoreLock, Lease } from '../src/storage/store/lock';
import { parseSnapshotRecord, parseStoreConfig, parseTags } from '../src/storage/store/records';
import { DisksnapError, corrupt, isDisksnapError } from '../src/engine/errors';
import { readListed } from '../src/storage/store/backend';
import { native } from '../src/engine/native';
import { flipByte } from '../fixtures/store/helpers';

const digestOf = (i: number) => createHash('sha256').update(`block ${i}`).digest();

async function writeManifest(dir: string, name: string, entries: number[], volumeSize = 100 * 65536) {
  const be = new DirectoryBackend(dir);
  const w = new ManifestWriter(await be.create(name), {
    blockSize: 65536,
    volumeSize,
    snapshotId: 'snap-0123456789abcdef',
    volumeId: 'vol-0123456789abcdef',
    digest: 'sha256',
    sealed: false,
  });
  for (const i of entries) w.append(i, digestOf(i));
  await w.commit();
  return be;
}

async function readAll(be: DirectoryBackend, name: string) {
  const r = await ManifestReader.open(be.describe(name), await be.open(name));
  const got: number[] = [];
  let same = true;
  try {
    for (let i = await r.next(); i >= 0; i = await r.next()) {
      same &&= r.digest.equals(digestOf(i));
      got.push(i);
    }
  } finally {
    await r.close();
  }
  if (!same) throw new Error('a digest differs, and the reader did not notice');
  return { got, header: r.header };
}

t.test('a manifest round-trips sparse entries, ids and sizes, and is append-only sized', async (t) => {
  const dir = t.testdir();
  const entries = [0, 1, 7, 50, 99];
  const be = await writeManifest(dir, 'm.map', entries, 100 * 65536 - 100);
  const { got, header } = await readAll(be, 'm.map');
  t.same(got, entries);
  t.equal(header.volumeSize, 100 * 65536 - 100);
  t.equal(header.snapshotId, 'snap-0123456789abcdef');
  t.equal(header.volumeId, 'vol-0123456789abcdef');
  t.equal(fs.statSync(path.join(dir, 'm.map')).size, HEADER_LENGTH + ENTRY_LENGTH * entries.length + 40);
  t.same(fs.readdirSync(dir), ['m.map'], 'no temporary file left');
});

t.test('a manifest with more entries than one read chunk streams in order (cursor lookups too)', async (t) => {
  const dir = t.testdir();
  const entries = Array.from({ length: 60000 }, (_, i) => i * 3);
  const be = await writeManifest(dir, 'big.map', entries, 200000 * 65536);
  const { got } = await readAll(be, 'big.map');
  t.equal(got.length, entries.length);
  t.equal(got[59999], 179997);
  const r = await ManifestReader.open('big.map', await be.open('big.map'));
  const c = new ManifestCursor(r);
  t.ok((await c.lookup(3))?.equals(digestOf(3)));
  t.equal(await c.lookup(4), undefined, 'a block with no entry is a zero block');
  t.ok((await c.lookup(179997))?.equals(digestOf(179997)));
  await c.finish();
  await r.close();
});

/**
 * Walks `probes` with a synchronous answer (`now`, undefined where it must read) falling back
 * to the awaited one (`later`), against a second reader's awaited answers (`ref`); `own` says
 * what is wrong with the entry an answer points at. Counts answers without and with a read.
 */
async function walkBoth<T>(probes: Iterable<number>, now: (i: number) => T | undefined, later: (i: number) => Promise<T>, ref: (i: number) => Promise<T>, own: (i: number, got: T) => string): Promise<{ now: number; waited: number; bad: string }> {
  const r = { now: 0, waited: 0, bad: '' };
  for (const i of probes) {
    const want = await ref(i);
    let got = now(i);
    if (got === undefined) {
      r.waited++;
      got = await later(i);
    } else r.now++;
    r.bad = got !== want ? `index ${i}: the fast path gave ${String(got)}, the awaited one alone ${String(want)}` : own(i, got);
    if (r.bad) break;
  }
  return r;
}

t.test('peekNow answers as peek does where the entries are read, and only there', async (t) => {
  const dir = t.testdir();
  const entries = Array.from({ length: 60000 }, (_, i) => i * 3);
  const be = await writeManifest(dir, 'big.map', entries, 200000 * 65536);
  const open = async () => new ManifestCursor(await ManifestReader.open('big.map', await be.open('big.map')));
  const fast = await open();
  const ref = await open();
  t.equal(fast.peekNow(0), undefined, 'nothing read yet: peek must read');
  // every index across the first two chunk boundaries (26214 entries each), then sparse steps
  const probes = [...Array.from({ length: 160000 }, (_, i) => i), 170000, 179996, 179997, 179998, 200000];
  const { now, waited, bad } = await walkBoth(probes, (i) => fast.peekNow(i), (i) => fast.peek(i), (i) => ref.peek(i), (i, got) =>
    got >= 0 && !fast.reader.digest.equals(digestOf(got)) ? `index ${i}: the digest beside entry ${got} is not its own` : '',
  );
  t.equal(bad, '', 'the same answer, and the digest beside it is its entry\'s');
  t.ok(now > 150000, `answered without a read ${now} times`);
  t.equal(waited, 4, 'waited for a read only at the start, where the 2nd and 3rd chunks begin, and for the trailer');
  await fast.finish();
  await ref.finish();
  await fast.reader.close();
  await ref.reader.close();
});

t.test('a tag file: lookupNow answers as lookup does where the entries are read, and only there', async (t) => {
  const dir = t.testdir();
  fs.mkdirSync(path.join(dir, 'snapshots'));
  const be = new DirectoryBackend(dir);
  const tk = tagKeyFrom(randomBytes(32));
  const header = { blockSize: 65536, volumeSize: 300000 * 65536, snapshotId: 'snap-0123456789abcdef', volumeId: 'vol-0123456789abcdef' };
  const w = await TagWriter.create(be, header, tk);
  const salt = Buffer.alloc(8);
  const tag = Buffer.alloc(16);
  for (let i = 0; i < 80000; i++) {
    salt.writeUInt32LE(i, 0);
    tag.writeUInt32LE(i * 7, 0);
    w.append(i * 3, salt, 0, tag, 0); // 80000 entries of 160 bytes (tag and granule tags): 13 read chunks of 6553 (1 MiB)
  }
  await w.commit();
  const fast = (await TagReader.open(be, header, tk))!;
  const ref = (await TagReader.open(be, header, tk))!;
  t.equal(fast.lookupNow(0), undefined, 'nothing read yet: lookup must read');
  const { now, waited, bad } = await walkBoth(Array.from({ length: 240010 }, (_, i) => i), (i) => fast.lookupNow(i), (i) => fast.lookup(i), (i) => ref.lookup(i), (i, got) =>
    got >= 0 && (fast.entries.readUInt32LE(got) !== i / 3 || fast.entries.readUInt32LE(got + 8) !== (i / 3) * 7) ? `block ${i}: salt or tag is not its own` : '',
  );
  t.equal(bad, '', 'the same answer, and the entry it points at is the block\'s');
  t.ok(now > 239000, `answered without a read ${now} times`);
  t.equal(waited, Math.ceil(80000 / Math.floor(2 ** 20 / 160)), 'waited for a read only at the start and where each later chunk begins');
  await fast.close();
  await ref.close();
});

t.test('every damaged part of a manifest is an ECORRUPT error that names it', async (t) => {
  const cases: [string, number | ((f: string) => void), RegExp][] = [
    ['magic', 0, /magic/],
    ['version', 8, /version/],
    ['entry length', 12, /entry length/],
    ['digest algorithm', 14, /digest algorithm/],
    ['flags', 15, /flags/],
    ['reserved', 100, /reserved/],
    ['snapshot id', 40, /snapshot id|printable|checksum/],
    ['an entry digest (checksum)', HEADER_LENGTH + ENTRY_LENGTH + 20, /checksum/],
    ['an entry index (order)', HEADER_LENGTH + ENTRY_LENGTH, /block index|checksum/],
    ['the trailer count', HEADER_LENGTH + 3 * ENTRY_LENGTH, /trailer counts|checksum/],
    ['truncated', (f) => fs.truncateSync(f, fs.statSync(f).size - 7), /bytes: not a/],
    ['cut to the header', (f) => fs.truncateSync(f, 60), /shorter than its/],
  ];
  for (const [what, where, re] of cases) {
    const dir = t.testdir();
    const be = await writeManifest(dir, 'm.map', [1, 2, 3]);
    const f = path.join(dir, 'm.map');
    if (typeof where === 'number') flipByte(f, where);
    else where(f);
    await t.rejects(readAll(be, 'm.map'), { code: 'ECORRUPT', message: re }, what);
  }
});

t.test('a manifest header must agree with the snapshot record that names it', async (t) => {
  const dir = t.testdir();
  const be = await writeManifest(dir, 'm.map', [1]);
  await t.rejects(
    ManifestReader.open(be.describe('m.map'), await be.open('m.map'), { snapshotId: 'snap-ffffffffffffffff' }),
    { code: 'ECORRUPT', message: /snapshotId.*record says/ },
  );
  await t.rejects(ManifestReader.open(be.describe('m.map'), await be.open('m.map'), { volumeSize: 1 }), { code: 'ECORRUPT', message: /volumeSize/ });
});

t.test('the manifest writer refuses entries out of order or past the volume', async (t) => {
  const dir = t.testdir();
  const be = new DirectoryBackend(dir);
  const w = new ManifestWriter(await be.create('x.map'), {
    blockSize: 65536,
    volumeSize: 10 * 65536,
    snapshotId: 'snap-0123456789abcdef',
    volumeId: 'vol-0123456789abcdef',
    digest: 'sha256',
    sealed: false,
  });
  w.append(3, digestOf(3));
  t.throws(() => w.append(3, digestOf(3)), { code: 'EINVALID' });
  t.throws(() => w.append(10, digestOf(10)), { code: 'EINVALID' });
  await w.abort();
  t.same(fs.readdirSync(dir), [], 'abort leaves nothing');
});

t.test("a packed manifest's writer lists the digests its pack index looks up: every piece, and whole blocks when told", async (t) => {
  const dir = t.testdir();
  const be = new DirectoryBackend(dir);
  const header = (id: string) => ({
    blockSize: 512 * 1024,
    volumeSize: 2 ** 40,
    snapshotId: id,
    volumeId: 'vol-0123456789abcdef',
    digest: 'sha256' as const,
    sealed: false,
    pieceSize: 65536,
    packed: true,
  });
  const sorted = (b: Buffer) => Array.from({ length: b.length / 32 }, (_, i) => b.subarray(i * 32, i * 32 + 32).toString('hex')).sort();
  // ~2.3 chunks of entries (a chunk is emitted, and its digests gathered, every 26,214): blocks
  // alternately whole and in 1 to 3 pieces
  const plan = (w: ManifestWriter, note: boolean) => {
    const pieces: string[] = [];
    const wholes: string[] = [];
    const noted: string[] = [];
    let mid: string[] | undefined;
    let midWant: string[] | undefined;
    for (let i = 0; i < 40000; i++) {
      if (i % 2 === 0) {
        const d = digestOf(i);
        w.append(i, d);
        wholes.push(d.toString('hex'));
        if (note && i % 6 === 0) {
          w.noteWhole(d);
          noted.push(d.toString('hex'));
        }
      } else {
        for (let s = 1; s <= 1 + (i % 3); s++) {
          const d = digestOf(i * 10 + s);
          w.append(i, d, 0, s);
          pieces.push(d.toString('hex'));
        }
      }
      if (i === 30001) {
        mid = sorted(w.pieceDigests); // some emitted, some not yet
        midWant = pieces.slice().sort();
      }
    }
    return { pieces, wholes, noted, mid: mid!, midWant: midWant! };
  };
  const w = new ManifestWriter(await be.create('a.map'), header('snap-0123456789abcdef'));
  const a = plan(w, true);
  t.same(a.mid, a.midWant, 'pieces listed in the middle of a chunk: the emitted and the pending');
  t.same(sorted(w.pieceDigests), a.pieces.slice().sort(), 'every piece, once');
  t.same(sorted(w.wholeDigests), a.noted.slice().sort(), 'whole blocks: only those noted');
  await w.commit();
  const w2 = new ManifestWriter(await be.create('b.map'), header('snap-0123456789abcde0'));
  w2.noteEveryWhole();
  const b = plan(w2, true);
  t.same(sorted(w2.wholeDigests), b.wholes.slice().sort(), 'told to note every whole block: each one, once (noteWhole adds no repeat)');
  t.same(sorted(w2.pieceDigests), b.pieces.slice().sort());
  t.throws(() => w2.noteEveryWhole(), /after the first entry/, 'noteEveryWhole comes before any entry');
  await w2.abort();
});

t.test('records are validated field by field', async (t) => {
  const good = {
    id: 'snap-0123456789abcdef',
    volumeId: 'vol-0123456789abcdef',
    state: 'completed',
    progress: 100,
    name: 'n',
    description: '',
    tags: { a: 'b' },
    encrypted: false,
    startTime: new Date().toISOString(),
    completionTime: null,
    blockSize: 524288,
    volumeSize: 1 << 30,
    parentId: null,
    volumePath: '/x',
    stats: { dataBlocks: 1, zeroBlocks: 2, changedBlocks: 1, blocksAdded: 1, bytesAdded: 5, bytesScanned: 5 },
    error: null,
    creator: { pid: 1, host: 'h' },
  };
  t.equal(parseSnapshotRecord('f', JSON.stringify(good)).id, good.id);
  t.throws(() => parseSnapshotRecord('f.json', '{"id": '), { code: 'ECORRUPT', message: /f\.json: not valid JSON/ });
  t.throws(() => parseSnapshotRecord('f', JSON.stringify({ ...good, state: 'done' })), { message: /field 'state' is "done"/ });
  t.throws(() => parseSnapshotRecord('f', JSON.stringify({ ...good, progress: 101 })), { message: /field 'progress'/ });
  t.throws(() => parseSnapshotRecord('f', JSON.stringify({ ...good, id: 'snap-xyz' })), { message: /field 'id'/ });
  t.throws(() => parseSnapshotRecord('f', JSON.stringify({ ...good, tags: { a: 1 } })), { message: /tag 'a'/ });
  t.throws(() => parseSnapshotRecord('f', JSON.stringify({ ...good, stats: { ...good.stats, bytesAdded: -1 } })), { message: /bytesAdded/ });
  const cbw = parseSnapshotRecord('f', JSON.stringify({ ...good, consistency: 'frozen-cbw', frozenMs: 4.2, preservedBytes: 12 << 20 }));
  t.match(cbw, { consistency: 'frozen-cbw', frozenMs: 4.2, preservedBytes: 12 << 20 }, 'a copy-before-write snapshot');
  t.equal(parseSnapshotRecord('f', JSON.stringify(good)).preservedBytes, null, 'older records: nothing preserved recorded');
  t.throws(() => parseSnapshotRecord('f', JSON.stringify({ ...good, consistency: 'thawed' })), { message: /field 'consistency' is "thawed", expected one of .*"frozen-cbw"/ });
  t.throws(() => parseSnapshotRecord('f', JSON.stringify({ ...good, preservedBytes: -1 })), { message: /preservedBytes/ });
  t.throws(() => parseStoreConfig('s', JSON.stringify({ format: 'disksnap-store', version: 9 })), { message: /version.*upgrade/ });
  t.same(parseTags(['a=b', 'c=d=e', 'e=']), { a: 'b', c: 'd=e', e: '' });
  t.throws(() => parseTags(['=x']), { code: 'EINVALID' });
  t.throws(() => parseTags(['novalue']), { code: 'EINVALID' });
});

t.test('the digest set holds many digests compactly and answers membership exactly', async (t) => {
  const set = new DigestSet(16);
  const ds = Array.from({ length: 20000 }, () => randomBytes(32));
  for (const d of ds) set.add(d);
  for (const d of ds) set.add(d);
  t.equal(set.size, 20000);
  t.ok(ds.every((d) => set.has(d)));
  t.notOk(set.has(randomBytes(32)));
  t.notOk(set.has(Buffer.alloc(32)));
  set.add(Buffer.alloc(32));
  t.ok(set.has(Buffer.alloc(32)), 'the all-zero digest is a member like any other');
});

t.test('the directory backend writes once, atomically, and lists leftovers as temporary', async (t) => {
  const dir = t.testdir({ blocks: { ab: {} } });
  const be = new DirectoryBackend(dir);
  t.equal(await be.putIfAbsent('blocks/ab/x', Buffer.from('one')), true);
  t.equal(await be.putIfAbsent('blocks/ab/x', Buffer.from('two')), false, 'an existing object is kept');
  t.equal((await be.get('blocks/ab/x')).toString(), 'one');
  await be.flush();
  fs.writeFileSync(path.join(dir, 'blocks', 'ab', '.tmp-1-dead'), 'half');
  const listed = [];
  for await (const o of be.list('blocks/')) listed.push(o);
  listed.sort((a, b) => a.key.localeCompare(b.key));
  t.same(listed, [
    { key: 'blocks/ab/.tmp-1-dead', size: 4, temporary: true },
    { key: 'blocks/ab/x', size: 3, temporary: false },
  ]);
  const unsized = [];
  for await (const o of be.list('blocks/', { sizes: false })) unsized.push(o);
  unsized.sort((a, b) => a.key.localeCompare(b.key));
  t.same(
    unsized,
    listed.map((o) => ({ ...o, size: -1 })),
    'without sizes: the same keys and flags, size -1',
  );
  const all = [];
  for await (const o of be.list('')) all.push(o.key);
  t.same(all.sort(), ['blocks/ab/.tmp-1-dead', 'blocks/ab/x'], 'the whole store: keys relative to its root');
  await t.rejects(be.get('blocks/ab/none'), { code: 'ENOENT' });
  t.equal(await be.stat('blocks/ab/none'), undefined);
  t.equal(await be.delete('blocks/ab/x'), true);
  t.equal(await be.delete('blocks/ab/x'), false);
  await t.rejects(be.get('../etc/passwd'), { code: 'EINVALID' });
  const small = Buffer.alloc(2);
  await be.put('r.json', Buffer.from('12345'));
  t.equal((await be.get('r.json', small)).toString(), '12345', 'an object larger than `into` is still read whole');
});

t.test('a listing reads its records a bounded number at a time, in listing order, skipping deleted ones and naming damaged ones', async (t) => {
  const keys = Array.from({ length: 50 }, (_, i) => `snapshots/r${String(i).padStart(2, '0')}.json`);
  const backend = {
    async *list(prefix: string) {
      t.equal(prefix, 'snapshots/');
      for (const key of keys) yield { key, size: 1, temporary: false };
      yield { key: 'snapshots/r00.map', size: 1, temporary: false };
      yield { key: 'snapshots/.tmp-1-x.json', size: 1, temporary: true };
    },
  };
  let inFlight = 0;
  let most = 0;
  const { records, damaged } = await readListed(backend, 'snapshots/', async (id) => {
    inFlight++;
    most = Math.max(most, inFlight);
    // later records answer sooner: the result keeps listing order all the same
    await new Promise((r) => setTimeout(r, 50 - Number(id.slice(1))));
    inFlight--;
    if (id === 'r07') throw new DisksnapError(`no ${id}`, 'ENOENT');
    if (id === 'r03' || id === 'r40') throw corrupt(id, 'damaged');
    return id;
  });
  t.ok(most > 1 && most <= 16, `reads overlap, at most 16 at once (${most})`);
  t.same(records, keys.map((k) => path.basename(k, '.json')).filter((id) => !['r03', 'r07', 'r40'].includes(id)));
  t.same(damaged.map((d) => d.id), ['r03', 'r40']);
  t.ok(damaged.every((d) => d.error.code === 'ECORRUPT'));
  await t.rejects(
    readListed(backend, 'snapshots/', async () => {
      throw new TypeError('a bug, not a damaged record');
    }),
    /a bug/,
    'an error that is not a store error is thrown',
  );
});

t.test('a directory store reads a listing\'s records in one native call: bytes, gone, damaged, links not followed', async (t) => {
  const dir = t.testdir({ snapshots: { 'a.json': '{"n":1}', 'b.json': '{"n":2}', 'd.json': {} }, volumes: { 'v.json': '{"v":1}' } });
  fs.symlinkSync(path.join(dir, 'snapshots', 'a.json'), path.join(dir, 'snapshots', 'l.json'));
  const be = new DirectoryBackend(dir);
  const got = await be.getSmallMany(['snapshots/b.json', 'volumes/v.json', 'snapshots/gone.json', 'snapshots/d.json', 'snapshots/l.json', 'snapshots/a.json']);
  t.same(
    got.map((r) => (r instanceof Error ? r.code : r.toString())),
    ['{"n":2}', '{"v":1}', 'ENOENT', 'EISDIR', 'ELOOP', '{"n":1}'],
    'in the order asked, across directories',
  );
  t.ok(got.slice(2, 5).every((r) => r instanceof DisksnapError && r.message.includes(path.join(dir, 'snapshots'))), 'each error names its file');
  t.same(
    (await be.getSmallMany(['none/x.json'])).map((r) => (r as DisksnapError).code),
    ['ENOENT'],
    'a directory that is not there: each of its records is gone',
  );
  await t.rejects(be.getSmallMany(['../x.json']), { code: 'EINVALID' }, 'a key that leaves the store is refused');
  const big = Buffer.alloc((16 << 20) + 1, 0x20);
  fs.writeFileSync(path.join(dir, 'snapshots', 'big.json'), big);
  t.match((await be.getSmallMany(['snapshots/big.json']))[0], { code: 'EFBIG', message: /too large for a record/ });
  // through readListed (which lists files only: not d.json, a directory, nor l.json, a link):
  // bytes handed to the reader, the gone one left out, the one too large reported
  const read: string[] = [];
  const { records, damaged } = await readListed(be, 'snapshots/', async (id, bytes) => {
    read.push(id);
    t.ok(Buffer.isBuffer(bytes), `${id}: its bytes come with it`);
    if (id === 'b') throw new DisksnapError('no b', 'ENOENT');
    return JSON.parse(bytes!.toString()).n as number;
  });
  t.same(records, [1]);
  t.same(damaged.map((d) => [d.id, d.error.code]), [['big', 'EFBIG']]);
  t.same(read.sort(), ['a', 'b'], 'the reader sees only what was read');
});

t.test('native readFiles refuses what is not a file name and a directory it cannot open', async (t) => {
  const dir = t.testdir({ 'x.json': 'x' });
  fs.writeFileSync(path.join(dir, 'y.json'), 'yy');
  const n = native();
  const none = n.readFiles(dir, [], 10);
  t.same([none.data.length, [...none.ends], none.failed], [0, [], []]);
  const two = n.readFiles(dir, ['x.json', 'z.json', 'y.json', 'x.json'], 2);
  t.same([two.data.toString(), [...two.ends]], ['xyyx', [1, 1, 3, 4]], 'one after the other, a failed one empty');
  t.same([two.failed[0], (two.failed[1] as DisksnapError).code, two.failed.length], [1, 'ENOENT', 2]);
  t.same(n.readFiles(dir, ['x.json'], 1).data.toString(), 'x', 'maxBytes is inclusive');
  t.same((n.readFiles(dir, ['x.json'], 0).failed[1] as DisksnapError).code, 'EFBIG');
  for (const bad of ['', '.', '..', 'a/b', '../x.json']) t.throws(() => n.readFiles(dir, [bad], 10), { code: 'EINVAL' }, `'${bad}'`);
  t.throws(() => n.readFiles(dir, 'x.json' as unknown as string[], 10), { code: 'EINVAL' });
  t.throws(() => n.readFiles(dir, ['x.json'], -1), { code: 'EINVAL' });
  t.throws(() => n.readFiles(path.join(dir, 'none'), ['x.json'], 10), { code: 'ENOENT' });
  const fifo = path.join(dir, 'p.json');
  require('node:child_process').execFileSync('mkfifo', [fifo]);
  t.match(n.readFiles(dir, ['p.json'], 10).failed[1], { code: 'EINVAL', message: /not a regular file/ }, 'a FIFO is refused without blocking');
});

t.test('a store is created with its block size once; a different block size later is refused', async (t) => {
  const base = t.testdir();
  const dir = path.join(base, 'st');
  await t.rejects(Store.open(dir), { code: 'ENOENT', message: /no snapshot store at .*store init/ });
  const s = await Store.open(dir, { create: true, blockSize: 65536 });
  t.equal(s.blockSize, 65536);
  t.equal((await Store.open(dir)).blockSize, 65536);
  t.equal((await Store.open(dir, { create: true })).blockSize, 65536, 'create on an existing store opens it');
  await t.rejects(Store.open(dir, { create: true, blockSize: 4096 }), { code: 'EINVALID', message: /block size 65536/ });
  await t.rejects(Store.open(path.join(base, 'x'), { create: true, blockSize: 3000 }), { code: 'EINVALID', message: /power of two/ });
  fs.writeFileSync(path.join(dir, 'store.json'), '{"format": "disksnap-store", "version": 1}');
  await t.rejects(Store.open(dir), { code: 'ECORRUPT', message: /store\.json.*field/ });
});

t.test('a new store makes a prefix directory when its first object goes in, and syncs it and blocks/ then', async (t) => {
  const dir = path.join(t.testdir(), 'st');
  const s = await Store.open(dir, { create: true });
  t.same(fs.readdirSync(path.join(dir, 'blocks')).filter((n) => !n.startsWith('.tmp-')), [], 'no prefix directories yet');
  const be = new DirectoryBackend(dir);
  const data = randomBytes(1000);
  const key = s.blockKey(createHash('sha256').update(data).digest());
  t.equal(await be.putIfAbsent(key, data), true);
  t.same(fs.readdirSync(path.join(dir, 'blocks')), [path.basename(path.dirname(key))], 'its prefix directory made');
  // what a flush hands the addon to fsync (test/native.test.ts sees, under strace, that it does)
  const flushed = async (): Promise<string[]> => {
    const synced: string[] = [];
    const n = native();
    const sync = n.syncDirsAsync;
    n.syncDirsAsync = (dirs: string[]) => {
      synced.push(...dirs);
      return sync(dirs);
    };
    try {
      await be.flush();
    } finally {
      n.syncDirsAsync = sync;
    }
    return synced.sort();
  };
  t.same(await flushed(), [path.join(dir, 'blocks'), path.dirname(path.join(dir, key))].sort(), 'flush syncs the new directory and blocks/, where its name is');
  t.same(await flushed(), [], 'and nothing at the next flush: no object went in since');
  t.same(await be.get(key), data);
  t.equal(await be.putIfAbsent(key, data), false, 'written once');
});

t.test('the default store is $DISKSNAP_STORE, else under $XDG_DATA_HOME, else ~/.local/share', async (t) => {
  const saved = { s: process.env.DISKSNAP_STORE, x: process.env.XDG_DATA_HOME };
  t.teardown(() => {
    if (saved.s === undefined) delete process.env.DISKSNAP_STORE;
    else process.env.DISKSNAP_STORE = saved.s;
    if (saved.x === undefined) delete process.env.XDG_DATA_HOME;
    else process.env.XDG_DATA_HOME = saved.x;
  });
  process.env.DISKSNAP_STORE = '/srv/snaps';
  t.equal(defaultStoreDir(), '/srv/snaps');
  delete process.env.DISKSNAP_STORE;
  process.env.XDG_DATA_HOME = '/data';
  t.equal(defaultStoreDir(), '/data/disksnap/store');
  delete process.env.XDG_DATA_HOME;
  t.match(defaultStoreDir(), /\/\.local\/share\/disksnap\/store$/);
});

t.test('the store lock: shared holders coexist, exclusive excludes them both ways', async (t) => {
  const dir = t.testdir();
  const a = await StoreLock.acquire(dir, 'shared');
  const b = await StoreLock.acquire(dir, 'shared');
  await t.rejects(StoreLock.acquire(dir, 'exclusive'), { code: 'ELOCKED', message: /in use/ });
  a.release();
  await t.rejects(StoreLock.acquire(dir, 'exclusive'), { code: 'ELOCKED' });
  b.release();
  const x = await StoreLock.acquire(dir, 'exclusive');
  await t.rejects(StoreLock.acquire(dir, 'shared'), { code: 'ELOCKED', message: /running gc/ });
  setTimeout(() => x.release(), 150);
  const waited = await StoreLock.acquire(dir, 'shared', { waitMs: 5000 });
  t.pass('a waiting holder gets the lock once the other is released');
  waited.release();
});

t.test('a lease tells whether the writer of a pending snapshot is alive', async (t) => {
  const dir = t.testdir();
  const lease = Lease.take(dir, 'snap-0123456789abcdef');
  t.equal(Lease.writerGone(dir, 'snap-0123456789abcdef'), false);
  lease.release();
  t.equal(Lease.writerGone(dir, 'snap-0123456789abcdef'), true);
  t.notOk(fs.existsSync(path.join(dir, 'leases', 'snap-0123456789abcdef')));
  t.ok(isDisksnapError(new (require('../src/engine/errors').DisksnapError)('x', 'E')));
});

t.test('block objects from an aligned buffer are written with O_DIRECT and read back intact', async (t) => {
  const dir = t.testdir({ blocks: { ab: {} } });
  const be = new DirectoryBackend(dir);
  const buf = be.allocBuffer(3 * 65536);
  const { DirectIo } = await import('../src/storage/store/direct');
  const dio = DirectIo.probe(path.join(dir, 'blocks'));
  if (!dio) {
    t.comment('this filesystem refuses O_DIRECT: the page-cache path is used instead');
  } else {
    const b2 = dio.alloc(65536 * 2);
    t.equal(native().alignOffset(b2, 4096), 0, 'its memory starts on a page boundary, not merely where the kernel accepts O_DIRECT');
    t.ok(dio.isAligned(b2.subarray(65536)), 'a view at a 64 KiB offset is aligned');
    t.notOk(dio.isAligned(b2.subarray(100, 100 + 4096)), 'a view at an odd offset is not');
    t.notOk(dio.isAligned(Buffer.alloc(4096)), 'a plain buffer is not');
  }
  randomBytes(buf.length).copy(buf);
  t.equal(await be.putIfAbsent('blocks/ab/one', buf.subarray(65536, 131072)), true);
  t.equal(await be.putIfAbsent('blocks/ab/short', buf.subarray(0, 1000)), true, 'a short block goes through the cache');
  t.ok((await be.get('blocks/ab/one')).equals(buf.subarray(65536, 131072)));
  t.ok((await be.get('blocks/ab/short')).equals(buf.subarray(0, 1000)));
  t.same(fs.readdirSync(path.join(dir, 'blocks', 'ab')).sort(), ['one', 'short'], 'no probe or temporary file left');
});

t.test('big buffers start on a 2 MiB boundary (whole huge pages), small ones are plain', async (t) => {
  const { bigBuffer, DirectIo } = await import('../src/storage/store/direct');
  for (const size of [4 * 2 ** 20, 4 * 2 ** 20 + 4096, 9 * 2 ** 20]) {
    const b = bigBuffer(size);
    t.equal(b.length, size);
    t.equal(native().alignOffset(b, 2 * 2 ** 20), 0, `${size} bytes: at a 2 MiB boundary`);
    const z = bigBuffer(size, true);
    t.ok(z.every((x) => x === 0), 'zeroed when asked');
  }
  t.equal(bigBuffer(65536).length, 65536);
  const dio = DirectIo.probe(t.testdir());
  if (dio) t.equal(native().alignOffset(dio.alloc(4 * 2 ** 20), 2 * 2 ** 20), 0, 'an O_DIRECT buffer of a pack\'s size too');
});
