/**
 * Change tags (src/storage/store/tags.ts): the GMAC arithmetic of the native tagger against
 * node:crypto, and what incremental snapshots do with tags — skip SHA-256 for unchanged
 * blocks, still find every changed block, and fall back to hashing (never to a wrong
 * snapshot) when a tag file is missing, damaged, swapped or of another key.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createCipheriv, randomBytes } from 'node:crypto';
import * as snap from '../src/storage';
import { native } from '../src/engine/native';
import { granuleSizeFor } from '../src/storage/store/tags';
import { KiB, MiB, Write, applyWrites, makeImage, sha, touched } from '../fixtures/store/helpers';
import { withHashImpl } from './helpers/hash-impl';

const BS = 64 * KiB;
const n = native();

function gmac(key: Buffer, iv: Buffer, data: Uint8Array): Buffer {
  const c = createCipheriv('aes-256-gcm', key, iv);
  c.setAAD(data);
  c.final();
  return c.getAuthTag();
}

const xor = (a: Buffer, b: Buffer) => Buffer.from(a.map((x, i) => x ^ b[i]));

t.test('native tags: unmasked tag ^ mask(iv) is GMAC(iv, block); the same from memory and from a file', async (t) => {
  const key = randomBytes(32);
  const bs = 4 * KiB;
  const buf = randomBytes(bs * 6 + 100); // a short last block
  buf.fill(0, bs, 2 * bs); // block 1 is zeros
  const h = await n.hashBlocksAsync(buf, bs, 2, undefined, key);
  t.equal(h.tags!.length, 7 * 16);
  const ivs = randomBytes(7 * 16);
  const masks = n.tagMasks(key, ivs);
  for (let b = 0; b < 7; b++) {
    const iv = ivs.subarray(b * 16, b * 16 + 16);
    t.same(masks.subarray(b * 16, b * 16 + 16), gmac(key, iv, Buffer.alloc(0)), `mask ${b} is GMAC of nothing`);
    const u = h.tags!.subarray(b * 16, b * 16 + 16);
    if (b === 1) {
      t.equal(h.zero[b], 1);
      t.ok(u.every((x) => x === 0), 'a zero block has no tag');
    } else {
      t.same(xor(u, masks.subarray(b * 16, b * 16 + 16)), gmac(key, iv, buf.subarray(b * bs, Math.min(buf.length, (b + 1) * bs))), `block ${b}`);
    }
  }
  const tb = await n.tagBlocksAsync(buf, bs, 2, key);
  t.same(tb.tags, h.tags, 'tagBlocksAsync (no SHA-256): the same tags');
  t.same(Buffer.from(tb.zero), Buffer.from(h.zero), 'and zero flags');
  const dir = t.testdir();
  const f = path.join(dir, 'f');
  fs.writeFileSync(f, buf);
  const fd = fs.openSync(f, 'r');
  try {
    const ft = await n.tagFile(fd, 0, buf.length, bs, 2, key);
    t.same(ft.tags, h.tags, 'tagFile gives the same unmasked tags');
    t.same(Buffer.from(ft.zero), Buffer.from(h.zero));
    const both = await n.hashFile(fd, 0, buf.length, bs, 2, undefined, undefined, key);
    t.same(both.digests, h.digests, 'hashFile with a tag key: same digests');
    t.same(both.tags, h.tags, 'and the same tags');
    const other = await n.tagFile(fd, 0, buf.length, bs, 2, randomBytes(32));
    t.notSame(other.tags.subarray(0, 16), h.tags!.subarray(0, 16), 'another key, another tag');

    // Collect mode: blocks whose tag is not the expected one are copied in the same read.
    const expect = Buffer.from(h.tags!);
    const known = new Uint8Array(7).fill(1);
    expect[2 * 16] ^= 1; // block 2 changed
    expect[6 * 16 + 5] ^= 1; // the short last block changed
    known[4] = 0; // block 4: the parent has no tag for it
    expect[1 * 16] ^= 1; // block 1 is zero: never collected, whatever is expected
    for (const [cap, label] of [[3, 'room for all three'], [2, 'room for two']] as const) {
      const into = Buffer.alloc(cap * bs);
      const r = await n.tagFile(fd, 0, buf.length, bs, 2, key, expect, known, into);
      t.same(r.tags, h.tags, `${label}: the same tags`);
      const slots = [...r.slot];
      t.same([0, 1, 3, 5].map((b) => slots[b]), [-1, -1, -1, -1], `${label}: unchanged and zero blocks are not collected`);
      const changed = [2, 4, 6];
      t.equal(changed.filter((b) => slots[b] >= 0).length, cap, `${label}: ${cap} blocks collected`);
      t.equal(r.collected, cap);
      t.equal(changed.filter((b) => slots[b] === -2).length, 3 - cap, `${label}: the rest marked to read again`);
      for (const b of changed.filter((b) => slots[b] >= 0)) {
        const s = slots[b];
        const len = Math.min(bs, buf.length - b * bs);
        t.ok(into.subarray(s * bs, s * bs + len).equals(buf.subarray(b * bs, b * bs + len)), `${label}: block ${b}'s bytes in slot ${s}`);
      }
    }
    await t.rejects(n.tagFile(fd, 0, buf.length, bs, 2, key, expect.subarray(16), known, Buffer.alloc(bs)), /expect must hold 16 bytes/);
  } finally {
    fs.closeSync(fd);
  }
  t.throws(() => n.tagMasks(randomBytes(16), ivs), /tagKey must be 32 bytes/);
  t.throws(() => n.tagMasks(key, Buffer.alloc(15)), /multiple of 16/);
  await t.rejects(n.hashBlocksAsync(buf, bs, 1, undefined, Buffer.alloc(31)), /tagKey must be 32 bytes/);
});

/**
 * Counts the blocks hashed with SHA-256 (the candidates of a tagged incremental): from memory,
 * and those collected by tagFile's own read; `again`, the blocks read a second time.
 */
/**
 * Counts, while a snapshot runs: `blocks` examined whole (copied by tagFile's one read, or
 * read again and hashed with their tags), `again` of them read a second time, and `whole`
 * collected blocks hashed in the buffer to be stored whole (hashBlocksAsync without tags).
 */
function countHashing(): { blocks: number; again: number; whole: number; restore: () => void } {
  const orig = n.hashBlocksAsync;
  const origTag = n.tagFile;
  const origSpans = n.hashSpansAsync;
  const c = {
    blocks: 0,
    again: 0,
    whole: 0,
    restore: () => {
      n.hashBlocksAsync = orig;
      n.tagFile = origTag;
      n.hashSpansAsync = origSpans;
    },
  };
  // a tag scan hashes a chunk's new pieces (a granule long) and its blocks stored whole in one call
  n.hashSpansAsync = (...args: Parameters<typeof origSpans>) => {
    const spans = args[1];
    for (let i = 1; i < spans.length; i += 2) if (spans[i] > granuleSizeFor(BS)) c.whole++;
    return origSpans.apply(n, args);
  };
  n.hashBlocksAsync = (...args: Parameters<typeof orig>) => {
    const [buf, bs, , , tagKey] = args;
    const count = Math.ceil(buf.length / bs);
    if (tagKey) {
      c.blocks += count;
      c.again += count;
    } else if (bs === BS) c.whole += count; // (not the SHA-256 naming a pack of pieces: one "block" of the pack's length)
    return orig.apply(n, args); // (every argument: a call may read its blocks first, `fd` and `reads`)
  };
  n.tagFile = (async (...args: Parameters<typeof origTag>) => {
    const r = await (origTag as (...a: unknown[]) => Promise<{ collected?: number }>).apply(n, args);
    c.blocks += r.collected ?? 0;
    return r;
  }) as typeof origTag;
  return c;
}

const base: Write[] = [
  { offset: 0, length: 2 * MiB, seed: 1 },
  { offset: 5 * MiB + 77, length: 1 * MiB, seed: 2 },
  { offset: 16 * MiB - 4096, length: 4096, seed: 3 },
];

/**
 * Lengths around the GHASH code's steps and padding: 16-byte blocks, 256-byte steps of 16 and
 * 512-byte steps of 32 (ghash.cc: 512-bit steps, then at most one 256-bit step, then blocks).
 */
const LENGTHS = [1, 15, 16, 17, 31, 32, 33, 240, 255, 256, 257, 271, 272, 511, 512, 513, 767, 768, 784, 1000, 1023, 1024, 1296, 4096, 4097, 65536 + 48, 512 * KiB];

t.test('native tags of every length are GMAC less its mask (the CLMUL GHASH where the CPU has it)', async (t) => {
  const key = randomBytes(32);
  const data = randomBytes(512 * KiB + 16);
  for (const len of LENGTHS) {
    for (const at of [0, 3]) {
      const block = data.subarray(at, at + len);
      const h = await n.hashBlocksAsync(block, len, 1, undefined, key);
      const iv = randomBytes(16);
      const mask = n.tagMasks(key, iv);
      t.same(xor(h.tags!.subarray(0, 16), mask), gmac(key, iv, block), `${len} bytes at offset ${at}`);
    }
  }
});

/** Whether this CPU has what the 512-bit GHASH needs (native/ghash.cc CpuHasZmm). */
function cpuHasZmm(): boolean {
  const flags = (fs.readFileSync('/proc/cpuinfo', 'utf8').match(/^flags\s*:(.*)$/m)?.[1] ?? '').split(/\s+/);
  return ['avx2', 'vpclmulqdq', 'avx512f', 'avx512bw'].every((f) => flags.includes(f));
}

t.test('tags are the same from each GHASH (512-bit, DISKSNAP_HASH_IMPL=avx2 256-bit, =openssl node\'s GMAC)', async (t) => {
  const addon = path.resolve(__dirname, '..', 'build', 'Release', 'disksnap.node');
  const key = randomBytes(32);
  const data = randomBytes(512 * KiB + 16);
  const dir = t.testdir();
  fs.writeFileSync(path.join(dir, 'data'), data);
  const script = `
    const a = require(${JSON.stringify(addon)});
    const data = require('fs').readFileSync(${JSON.stringify(path.join(dir, 'data'))});
    const key = Buffer.from(${JSON.stringify(key.toString('hex'))}, 'hex');
    (async () => {
      const out = [];
      for (const len of ${JSON.stringify(LENGTHS)}) out.push((await a.hashBlocksAsync(data.subarray(1, 1 + len), len, 1, undefined, key)).tags.toString('hex'));
      out.push((await a.hashBlocksAsync(data, 4096, 2, undefined, key)).tags.toString('hex'));
      process.stdout.write(JSON.stringify({ impl: a.hashImplementations().ghash, out }));
    })();`;
  const run = (impl: 'openssl' | 'avx2' | undefined) => withHashImpl<{ impl: string; out: string[] }>(t, script, impl);
  const fallback = run('openssl');
  t.equal(fallback.impl, 'openssl');
  t.equal(fallback.out.length, LENGTHS.length + 1);
  const def = run(undefined);
  const narrow = run('avx2');
  // the project's machines have AVX-512 (README, Design): there the default must be the 512-bit code
  if (cpuHasZmm()) t.equal(def.impl, 'vpclmulqdq-512', 'this CPU has AVX-512: the default is the 512-bit GHASH');
  t.not(narrow.impl, 'vpclmulqdq-512', 'DISKSNAP_HASH_IMPL=avx2 keeps to 256-bit registers');
  t.same(def.out, fallback.out, `${def.impl}: the same tags as OpenSSL's`);
  t.same(narrow.out, fallback.out, `${narrow.impl}: the same tags as OpenSSL's`);
  const iv = randomBytes(16);
  const mask = n.tagMasks(key, iv);
  t.same(xor(Buffer.from(fallback.out[0], 'hex'), mask), gmac(key, iv, data.subarray(1, 2)), 'and the fallback\'s are GMAC less the mask');
});

t.test('hashBlocksAsync with granules: their tags as tagBlocksAsync gives them, and block tags combined from them equal the blocks\' own (both implementations)', async (t) => {
  const addon = path.resolve(__dirname, '..', 'build', 'Release', 'disksnap.node');
  const key = randomBytes(32);
  const bs = 512 * KiB;
  const gs = 64 * KiB;
  // 5 blocks: random; a zero block; zero granules (first, middle, last) in random blocks;
  // a short last block whose last granule is short and not a multiple of 16 bytes
  const data = randomBytes(4 * bs + 3 * gs + 1000);
  data.fill(0, bs, 2 * bs);
  data.fill(0, 2 * bs, 2 * bs + gs);
  data.fill(0, 2 * bs + 4 * gs, 2 * bs + 5 * gs);
  data.fill(0, 4 * bs - gs, 4 * bs);
  const dir = t.testdir();
  fs.writeFileSync(path.join(dir, 'data'), data);
  const script = `
    const a = require(${JSON.stringify(addon)});
    const data = require('fs').readFileSync(${JSON.stringify(path.join(dir, 'data'))});
    const key = Buffer.from(${JSON.stringify(key.toString('hex'))}, 'hex');
    (async () => {
      const both = await a.hashBlocksAsync(data, ${bs}, 2, undefined, key, ${gs});
      const plain = await a.hashBlocksAsync(data, ${bs}, 2, undefined, key);
      const gran = await a.tagBlocksAsync(data, ${gs}, 2, key);
      const hex = (b) => Buffer.from(b).toString('hex');
      process.stdout.write(JSON.stringify({ tags: hex(both.tags), plainTags: hex(plain.tags), digests: hex(both.digests), plainDigests: hex(plain.digests),
        zero: hex(both.zero), gtags: hex(both.granules.tags), gzero: hex(both.granules.zero), granTags: hex(gran.tags), granZero: hex(gran.zero) }));
    })();`;
  for (const impl of [undefined, 'avx2', 'openssl'] as const) {
    const r = withHashImpl<Record<string, string>>(t, script, impl);
    const label = impl ?? 'default';
    t.equal(r.tags, r.plainTags, `${label}: block tags combined from the granules' are the blocks' own`);
    t.equal(r.digests, r.plainDigests, `${label}: digests unchanged`);
    const count = Math.ceil(data.length / gs); // the granules there are
    t.equal(r.gtags.slice(0, count * 32), r.granTags, `${label}: granule tags as tagBlocksAsync gives them`);
    t.equal(r.gzero.slice(0, count * 2), r.granZero, `${label}: and their zero flags`);
    t.equal(r.gzero.slice(count * 2), '01'.repeat(5 * 8 - count), `${label}: past the short last block: none`);
    t.same([...Buffer.from(r.zero, 'hex')], [0, 1, 0, 0, 0], `${label}: block zero flags`);
  }
  const iv = randomBytes(16);
  const mask = n.tagMasks(key, iv);
  const r = await n.hashBlocksAsync(data, bs, 2, undefined, key, gs);
  t.same(xor(r.tags!.subarray(4 * 16, 5 * 16), mask), gmac(key, iv, data.subarray(4 * bs)), 'the short last block\'s combined tag is its GMAC less the mask');
  t.same(xor(r.tags!.subarray(2 * 16, 3 * 16), mask), gmac(key, iv, data.subarray(2 * bs, 3 * bs)), 'and a block with zero granules');
  await t.rejects(n.hashBlocksAsync(data, bs, 2, undefined, key, 3000), /granuleSize must divide blockSize/);
  await t.rejects(n.hashBlocksAsync(data, bs, 2, undefined, undefined, gs), /needs a tagKey/);
});

t.test('incremental snapshots hash only blocks whose tag moved, and find every change', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 16 * MiB, base);
  const dataBlocks = touched(base, BS).length;
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  t.equal(fs.statSync(path.join(store, 'tag.key')).mode & 0o777, 0o600, 'the plain store made its tag key, readable by its owner only');
  t.ok(fs.existsSync(path.join(store, 'snapshots', `${s1.id}.tags`)), 'the full snapshot wrote change tags');

  // Nothing changed: no block is hashed with SHA-256.
  let c = countHashing();
  const logs: string[] = [];
  let s2;
  try {
    s2 = await snap.createSnapshot(vol, { store, onLog: (m) => logs.push(m) });
  } finally {
    c.restore();
  }
  t.equal(c.blocks, 0, 'an unchanged volume: no block hashed');
  t.same(logs, []);
  t.equal(s2.stats.changedBlocks, 0);
  t.equal(s2.stats.dataBlocks, dataBlocks);

  // Three snapshots deep, with a few changes each time: exactly those blocks are hashed.
  let prev = s2;
  let want = sha(vol);
  const states: [string, string][] = [[s2.id, want]];
  for (let round = 0; round < 3; round++) {
    const change: Write[] = [
      { offset: (round + 1) * BS + 100, length: 10, seed: 20 + round }, // inside data
      { offset: 9 * MiB + round * BS, length: 1, seed: 30 + round }, // a hole becomes data
    ];
    applyWrites(vol, change);
    c = countHashing();
    let s;
    try {
      s = await snap.createSnapshot(vol, { store, onLog: (m) => logs.push(m) });
    } finally {
      c.restore();
    }
    const blocks = touched(change, BS);
    t.equal(c.blocks, blocks.length, `round ${round}: only the ${blocks.length} changed blocks hashed`);
    t.equal(c.again, 0, `round ${round}: none of them read a second time`);
    // the block written inside data becomes a piece (its one moved granule), so only the hole
    // that became data is hashed whole
    t.equal(c.whole, 1, `round ${round}: only the block stored whole hashed as a block`);
    t.equal(s.stats.changedBlocks, blocks.length);
    t.equal(s.parentId, prev.id);
    t.same((await snap.diffSnapshots(prev.id, s.id, { store })).changedBlocks, blocks, 'diff lists exactly the changed blocks');
    want = sha(vol);
    states.push([s.id, want]);
    prev = s;
  }
  t.same(logs, [], 'no tag file was refused');
  for (const [id, digest] of states) {
    const out = path.join(dir, `${id}.img`);
    await snap.restoreSnapshot(id, { store, to: out });
    t.equal(sha(out), digest, `${id} restores byte-exact`);
  }

  // A change that keeps the block's bytes but moves it is still a change of both blocks.
  const a = Buffer.alloc(BS);
  const fd = fs.openSync(vol, 'r+');
  fs.readSync(fd, a, 0, BS, 0);
  const b = Buffer.alloc(BS);
  fs.readSync(fd, b, 0, BS, BS);
  fs.writeSync(fd, b, 0, BS, 0);
  fs.writeSync(fd, a, 0, BS, BS);
  fs.closeSync(fd);
  const swapped = await snap.createSnapshot(vol, { store });
  t.same((await snap.diffSnapshots(prev.id, swapped.id, { store })).changedBlocks, [0, 1], 'two blocks swapped: both changed (the tag binds the block index)');
  const out = path.join(dir, 'swapped.img');
  await snap.restoreSnapshot(swapped.id, { store, to: out });
  t.equal(sha(out), sha(vol));
});

t.test('more changed blocks in one read than a buffer holds: the rest are read again, all stored', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  const size = 40 * MiB; // one 64 MiB read; a 16 MiB buffer holds 256 of its 640 blocks
  makeImage(vol, size, [{ offset: 0, length: size, seed: 7 }]);
  await snap.createSnapshot(vol, { store, blockSize: BS });
  applyWrites(vol, [{ offset: 0, length: size, seed: 8 }]);
  const c = countHashing();
  let s;
  try {
    s = await snap.createSnapshot(vol, { store });
  } finally {
    c.restore();
  }
  t.equal(s.changeSource, 'tags');
  t.equal(s.stats.changedBlocks, 640, 'every block changed');
  t.equal(s.stats.blocksAdded, 640, 'and stored');
  t.equal(c.blocks, 640, 'each hashed once');
  t.equal(c.again, 640 - 256, 'those past the buffer read a second time');
  t.equal(c.whole, 256, 'those in the buffer (every granule moved: stored whole) hashed there once');
  const out = path.join(dir, 'out.img');
  await snap.restoreSnapshot(s.id, { store, to: out });
  t.equal(sha(out), sha(vol), 'restores byte-exact');
});

t.test('a missing, damaged, swapped or foreign tag file costs speed, never correctness', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 16 * MiB, base);
  const dataBlocks = touched(base, BS).length;
  let last = await snap.createSnapshot(vol, { store, blockSize: BS });
  const tagsOf = (id: string) => path.join(store, 'snapshots', `${id}.tags`);

  /** Changes one block, snapshots, and checks the result against the volume. */
  const round = async (label: string, expectLog: RegExp | undefined, expectHashed: number, seed: number) => {
    applyWrites(vol, [{ offset: 3 * BS + 5, length: 3, seed }]);
    const logs: string[] = [];
    const c = countHashing();
    let s;
    try {
      s = await snap.createSnapshot(vol, { store, onLog: (m) => logs.push(m) });
    } finally {
      c.restore();
    }
    if (expectLog) t.match(logs.join('\n'), expectLog, `${label}: says why the tags were not used`);
    else t.same(logs, [], `${label}: nothing to say`);
    t.equal(c.blocks, expectHashed, `${label}: ${expectHashed} blocks hashed from memory`);
    t.equal(s.stats.changedBlocks, 1, `${label}: the one changed block found`);
    t.same((await snap.diffSnapshots(last.id, s.id, { store })).changedBlocks, [3]);
    const out = path.join(dir, `${s.id}.img`);
    await snap.restoreSnapshot(s.id, { store, to: out });
    t.equal(sha(out), sha(vol), `${label}: restores byte-exact`);
    t.ok(fs.existsSync(tagsOf(s.id)), `${label}: the new snapshot has tags again`);
    last = s;
  };

  fs.rmSync(tagsOf(last.id));
  // No tags: the native pass hashes every block (not counted here), then the changed one again.
  await round('missing', undefined, 1, 40);

  const damaged = fs.readFileSync(tagsOf(last.id));
  damaged[128 + 160 * 2 + 20] ^= 1; // a tag byte of the third entry (160 bytes each: tag and granule tags)
  fs.writeFileSync(tagsOf(last.id), damaged);
  await round('a flipped bit', /authentication \(HMAC\) does not match/, 1, 41);

  // Entries of another snapshot's tag file, under this snapshot's header: the HMAC refuses it.
  const mine = fs.readFileSync(tagsOf(last.id));
  const donor = (await snap.listSnapshots({ store })).snapshots.find((s) => s.id !== last.id && fs.existsSync(tagsOf(s.id)));
  const other = fs.readFileSync(tagsOf(donor!.id));
  const spliced = Buffer.concat([mine.subarray(0, 128), other.subarray(128)]);
  fs.writeFileSync(tagsOf(last.id), spliced);
  await round('entries of another snapshot', /HMAC|count/, 1, 42);

  // Another tag key (the store's key file replaced): the header's key check refuses the file.
  fs.writeFileSync(path.join(store, 'tag.key'), randomBytes(32), { mode: 0o600 });
  await round('another key', /another tag key/, 1, 43);
  // The snapshot just taken carries tags of the new key: the next one uses them.
  await round('the new key', undefined, 1, 44);

  // Without tags at all (the library option): correct, no tag file written.
  applyWrites(vol, [{ offset: 3 * BS + 9, length: 1, seed: 45 }]);
  const plain = await snap.createSnapshot(vol, { store, changeTags: false });
  t.equal(plain.stats.changedBlocks, 1);
  t.equal(plain.stats.dataBlocks, dataBlocks);
  t.notOk(fs.existsSync(tagsOf(plain.id)), 'changeTags: false writes no tag file');
});

t.test('deleted snapshots take their tag files along; gc removes stray ones', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 8 * MiB, base.slice(0, 2));
  const s1 = await snap.createSnapshot(vol, { store, blockSize: BS });
  applyWrites(vol, [{ offset: 0, length: 10, seed: 50 }]);
  const s2 = await snap.createSnapshot(vol, { store });
  await snap.deleteSnapshot(s1.id, { store });
  const names = fs.readdirSync(path.join(store, 'snapshots')).sort();
  // (s2 stored its change as a piece: its pack index is beside its manifest)
  t.same(names, [`${s2.id}.json`, `${s2.id}.map`, `${s2.id}.packs`, `${s2.id}.tags`]);
  // A stray tag file and pack index (as a crash between the manifest and the record would
  // leave) and a temporary file of a killed key writer.
  fs.writeFileSync(path.join(store, 'snapshots', 'snap-0123456789abcdef.tags'), 'x');
  fs.writeFileSync(path.join(store, 'snapshots', 'snap-0123456789abcdef.packs'), 'z');
  fs.writeFileSync(path.join(store, 'snapshots', '.tmp-99999-abcdef'), 'y');
  const g = await snap.gc({ store });
  t.equal(g.otherFilesRemoved, 3, 'gc removed the stray tag file, the stray pack index and the temporary file');
  t.same(fs.readdirSync(path.join(store, 'snapshots')).sort(), names);
});

t.test('encrypted volumes: tags come from the volume key; no key file in the store', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  const keyFile = path.join(dir, 'k');
  fs.writeFileSync(keyFile, randomBytes(32), { mode: 0o600 });
  makeImage(vol, 16 * MiB, base);
  await snap.registerVolume(vol, { store, blockSize: BS, encrypted: true, key: { keyFile } });
  const key = { keyFile };
  const s1 = await snap.createSnapshot(vol, { store, key });
  t.notOk(fs.existsSync(path.join(store, 'tag.key')), 'an encrypted volume needs no store tag key');
  t.ok(fs.existsSync(path.join(store, 'snapshots', `${s1.id}.tags`)));
  applyWrites(vol, [{ offset: 6 * MiB, length: 100, seed: 60 }]);
  const c = countHashing();
  let s2;
  try {
    s2 = await snap.createSnapshot(vol, { store, key });
  } finally {
    c.restore();
  }
  t.equal(c.blocks, 1, 'only the changed block hashed');
  t.equal(s2.stats.changedBlocks, 1);
  const out = path.join(dir, 'out.img');
  await snap.restoreSnapshot(s2.id, { store, to: out, key });
  t.equal(sha(out), sha(vol));
  // The tag file holds no plaintext: its entries are indexes, salts and GMAC tags.
  const volBytes = fs.readFileSync(vol);
  const tagFile = fs.readFileSync(path.join(store, 'snapshots', `${s2.id}.tags`));
  t.equal(tagFile.indexOf(volBytes.subarray(0, 16)), -1, 'no volume bytes in the tag file');
});
