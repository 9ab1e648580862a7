/**
 * The native tag scan (tagFile: native/hash_engine.cc HashFileRange) reads a regular file in
 * place through a mapping (native/io.h FileMapping) instead of copying it out with pread. It
 * must give exactly what the pread path gives (DISKSNAP_NO_MMAP=1) and what the bytes are, and
 * a file that shrinks while it is scanned must cost a short read, not the process (SIGBUS).
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { FALLOC_PUNCH_HOLE, native } from '../src/engine/native';

const KiB = 1024;
const MiB = 1024 * KiB;
const n = native();

/** Runs fn with DISKSNAP_NO_MMAP set to `value` (read by the addon at each call): 0 maps, 1 preads. */
async function withNoMap<T>(value: string | undefined, fn: () => Promise<T>): Promise<T> {
  const before = process.env.DISKSNAP_NO_MMAP;
  if (value === undefined) delete process.env.DISKSNAP_NO_MMAP;
  else process.env.DISKSNAP_NO_MMAP = value;
  try {
    return await fn();
  } finally {
    if (before === undefined) delete process.env.DISKSNAP_NO_MMAP;
    else process.env.DISKSNAP_NO_MMAP = before;
  }
}

t.test('the mapped tag scan gives what pread gives and what the bytes are: tags, zero flags, collected copies', async (t) => {
  const dir = t.testdir();
  const f = path.join(dir, 'vol');
  const bs = 64 * KiB;
  // 40 blocks and a short one: random data, a zero block, a hole of 3 blocks, a block that is
  // zero but for its last byte; more than one 1 MiB piece, so the threads share the work.
  const size = 40 * bs + 3000;
  const data = randomBytes(size);
  data.fill(0, 5 * bs, 6 * bs);
  data.fill(0, 20 * bs, 21 * bs - 1);
  fs.writeFileSync(f, data);
  const fd = fs.openSync(f, 'r+');
  try {
    n.fallocate(fd, FALLOC_PUNCH_HOLE, 10 * bs, 3 * bs);
    data.fill(0, 10 * bs, 13 * bs);
    const key = randomBytes(32);
    // whole file, and ranges that start inside a page and end before the file does
    for (const [off, len] of [[0, size], [bs, 17 * bs], [512, 9 * bs + 512], [3 * bs, size - 3 * bs]] as const) {
      const what = `bytes ${off}..${off + len}`;
      const scan = () => n.tagFile(fd, off, len, bs, 2, key);
      const mt = await withNoMap('0', scan);
      const pt = await withNoMap('1', scan);
      t.same(mt.tags, pt.tags, `${what}: the same tags`);
      t.same(Buffer.from(mt.zero), Buffer.from(pt.zero), `${what}: the same zero flags`);
      // and what the bytes themselves give, block by block (tags from memory: hashBlocks)
      const blocks = Math.ceil(len / bs);
      let wrong = 0;
      for (let b = 0; b < blocks; b++) {
        const bytes = data.subarray(off + b * bs, Math.min(off + len, off + (b + 1) * bs));
        const h = n.hashBlocks(bytes, bs, 1, undefined, key);
        if (mt.zero[b] !== h.zero[0] || !mt.tags.subarray(b * 16, b * 16 + 16).equals(h.tags!.subarray(0, 16))) wrong++;
      }
      t.equal(wrong, 0, `${what}: every block's zero flag and tag are those of its bytes`);
      if (off === 0) t.ok(mt.zero.includes(1) && mt.zero.includes(0), `${what}: zero and data blocks both`);
      // collect mode: every non-zero block expected otherwise is copied, with its own tag
      const expect = Buffer.alloc(blocks * 16);
      const known = new Uint8Array(blocks).fill(1);
      const into = Buffer.alloc(blocks * bs);
      const collect = (buf: Buffer) => () => n.tagFile(fd, off, len, bs, 2, key, expect, known, buf);
      const [mc, pc] = [await withNoMap('0', collect(into)), await withNoMap('1', collect(Buffer.alloc(blocks * bs)))];
      t.same(mc.tags, pc.tags, `${what}: collect mode, the same tags`);
      t.equal(mc.collected, pc.collected, `${what}: collect mode, as many blocks collected`);
      t.ok(mc.collected > 0);
      t.same([...mc.slot].map((s) => s >= 0), [...pc.slot].map((s) => s >= 0), `${what}: the same blocks collected`);
      let badCopies = 0;
      mc.slot.forEach((slot, b) => {
        if (slot < 0) return;
        const bytes = data.subarray(off + b * bs, Math.min(off + len, off + (b + 1) * bs));
        if (!into.subarray(slot * bs, slot * bs + bytes.length).equals(bytes)) badCopies++;
      });
      t.equal(badCopies, 0, `${what}: every collected copy holds its block's bytes`);
    }
  } finally {
    fs.closeSync(fd);
  }
});

t.test('collect mode with a granule size: the granule tags and zero flags of each copy, and its block tag combined from them', async (t) => {
  const dir = t.testdir();
  const f = path.join(dir, 'vol');
  const bs = 512 * KiB;
  const gs = 64 * KiB;
  const G = bs / gs;
  // 9 blocks and a short one (1.5 granules): random data, one block with a zero granule in the
  // middle, one all zero (not collected), one whose tag is expected (not collected either)
  const size = 9 * bs + gs + gs / 2;
  const data = randomBytes(size);
  data.fill(0, 2 * bs + 3 * gs, 2 * bs + 4 * gs);
  data.fill(0, 4 * bs, 5 * bs);
  fs.writeFileSync(f, data);
  const fd = fs.openSync(f, 'r');
  try {
    const key = randomBytes(32);
    const blocks = 10;
    const plain = await n.tagFile(fd, 0, size, bs, 2, key);
    const expect = Buffer.alloc(blocks * 16);
    plain.tags.copy(expect, 6 * 16, 6 * 16, 7 * 16); // block 6 as its parent had it
    const known = new Uint8Array(blocks).fill(1);
    for (const noMap of ['0', '1']) {
      const how = noMap === '1' ? 'pread' : 'mapped';
      const into = Buffer.alloc(blocks * bs);
      const r = await withNoMap(noMap, () => n.tagFile(fd, 0, size, bs, 2, key, expect, known, into, gs));
      t.equal(r.collected, 8, `${how}: the 8 changed non-zero blocks collected`);
      t.equal(r.slot[4], -1, `${how}: the zero block is not`);
      t.equal(r.slot[6], -1, `${how}: nor the one whose tag was expected`);
      t.ok(r.granuleTags && r.granuleZero, `${how}: granule tags returned`);
      t.equal(r.granuleTags!.length, blocks * G * 16, `${how}: 16 bytes per granule of the buffer`);
      // what tagBlocksAsync over the copies gives, the copies' bytes themselves (the short
      // block's granules past its end are zero, and its tail in the buffer is not read)
      const ref = await n.tagBlocksAsync(into.subarray(0, r.collected * bs), gs, 1, key);
      let wrong = 0;
      let blockWrong = 0;
      r.slot.forEach((slot, b) => {
        if (slot < 0) return;
        const len = Math.min(bs, size - b * bs);
        for (let s = 0; s < G; s++) {
          const k = slot * G + s;
          if (s * gs >= len) {
            if (r.granuleZero![k] !== 1 || !r.granuleTags!.subarray(k * 16, k * 16 + 16).equals(Buffer.alloc(16))) wrong++;
            continue;
          }
          if (s * gs + gs > len) continue; // a short granule: not a whole one of the reference
          if (r.granuleZero![k] !== ref.zero[k] || !r.granuleTags!.subarray(k * 16, k * 16 + 16).equals(ref.tags.subarray(k * 16, k * 16 + 16))) wrong++;
        }
        if (!r.tags.subarray(b * 16, b * 16 + 16).equals(plain.tags.subarray(b * 16, b * 16 + 16))) blockWrong++;
      });
      t.equal(wrong, 0, `${how}: every granule's zero flag and tag are those of its copy`);
      t.equal(blockWrong, 0, `${how}: every collected block's tag, combined from its granules, is its tag from the bytes`);
      t.equal(r.granuleZero![r.slot[2] * G + 3], 1, `${how}: the zero granule inside a changed block is flagged`);
      // the short block's own granule tags, from its bytes
      const last = r.slot[9];
      const short = n.hashBlocks(data.subarray(9 * bs + gs), gs, 1, undefined, key);
      t.ok(r.granuleTags!.subarray((last * G + 1) * 16, (last * G + 2) * 16).equals(short.tags!.subarray(0, 16)), `${how}: the short block's half granule tagged from its bytes`);
    }
    t.rejects(n.tagFile(fd, 0, size, bs, 2, key, expect, known, Buffer.alloc(bs), 3000), { code: 'EINVAL' }, 'a granule size that does not divide the block size is refused');
  } finally {
    fs.closeSync(fd);
  }
});

// A child process scans a large file with one thread while the parent part of it truncates the
// file: a page of the mapping past the new end raises SIGBUS, which must become a short read
// (the blocks past the end read as zeros). Without the guard the child dies by SIGBUS.
const CHILD = `
const fs = require('fs');
const { randomFillSync, randomBytes } = require('crypto');
const n = require(process.argv[1]).native();
const [file, trials] = [process.argv[2], Number(process.argv[3])];
const bs = 512 * 1024, size = 256 * 1024 * 1024, keep = 1024 * 1024;
const buf = Buffer.allocUnsafe(16 * 1024 * 1024);
(async () => {
  let midway = 0;
  for (let i = 0; i < trials; i++) {
    const w = fs.openSync(file, 'w');
    for (let o = 0; o < size; o += buf.length) fs.writeSync(w, randomFillSync(buf), 0, buf.length, o);
    const fd = fs.openSync(file, 'r');
    const scan = n.tagFile(fd, 0, size, bs, 1, randomBytes(32));
    await new Promise((r) => setTimeout(r, 1 + (i % 6)));
    fs.ftruncateSync(w, keep);
    const r = await scan;
    const past = r.zero.subarray(keep / bs);
    // scanned partly before the truncation (tags) and partly after it (zeros): midway
    if (past.includes(0) && past.includes(1)) midway++;
    fs.closeSync(fd);
    fs.closeSync(w);
  }
  process.stdout.write(JSON.stringify({ midway }));
})().catch((e) => { console.error(e); process.exit(1); });
`;

t.test('a file that shrinks while it is scanned through the mapping: a short read, not SIGBUS', async (t) => {
  const dir = t.testdir();
  const lib = path.resolve(__dirname, '..', 'dist', 'src', 'engine', 'native.js');
  let midway = 0;
  for (let round = 0; round < 4 && midway === 0; round++) {
    // every scan mapped (not only those the choice of read way would map: see the next test)
    const env = { ...process.env, DISKSNAP_NO_MMAP: '0' };
    const r = spawnSync(process.execPath, ['-e', CHILD, lib, path.join(dir, 'shrinking'), '8'], { encoding: 'utf8', env });
    t.equal(r.signal, null, `the scanning process was not killed by a signal (round ${round})`);
    t.equal(r.status, 0, `it finished every scan (round ${round}) ${r.stderr}`);
    if (r.status !== 0) return;
    midway += (JSON.parse(r.stdout) as { midway: number }).midway;
  }
  // A scan cut by the truncation touched pages past the new end through the mapping.
  t.ok(midway > 0, `at least one scan was cut midway by the truncation (${midway})`);
});

t.test('a file is read the way that measured cheaper: both ways measured in the first call, then the cheaper one; every way gives the same tags', async (t) => {
  const dir = t.testdir();
  const f = path.join(dir, 'vol');
  const bs = 512 * KiB;
  const size = 40 * MiB; // 10 chunks of 4 MiB, 5 each way: past the 8 MiB each way a measurement needs
  const data = randomBytes(size);
  data.fill(0, 3 * bs, 4 * bs);
  fs.writeFileSync(f, data);
  const small = path.join(dir, 'small');
  fs.writeFileSync(small, randomBytes(4 * MiB));
  const fd = fs.openSync(f, 'r');
  const sfd = fs.openSync(small, 'r');
  try {
    const key = randomBytes(32);
    t.same(n.tagReadCosts(fd), { mapped: -1, pread: -1 }, 'nothing measured before the first call');
    const scan = () => withNoMap(undefined, () => n.tagFile(fd, 0, size, bs, 2, key));
    const first = await scan();
    const c1 = n.tagReadCosts(fd);
    t.ok(c1.mapped > 0 && c1.pread > 0, `the first call read it both ways and measured both (${JSON.stringify(c1)})`);
    const second = await scan();
    t.same(n.tagReadCosts(fd), c1, 'the second measures nothing more');
    const third = await scan();
    t.same(n.tagReadCosts(fd), c1, 'nor does a later one');
    const pread = await withNoMap('1', () => n.tagFile(fd, 0, size, bs, 2, key));
    for (const [what, r] of [['first (both ways)', first], ['second', second], ['third', third]] as const) {
      t.ok(r.tags.equals(pread.tags), `${what}: the tags pread gives`);
      t.same([...r.zero], [...pread.zero], `${what}: the zero flags pread gives`);
    }
    t.equal(pread.zero[3], 1, 'the zero block is one');
    await n.tagFile(sfd, 0, 4 * MiB, bs, 2, key);
    await n.tagFile(sfd, 0, 4 * MiB, bs, 2, key);
    t.same(n.tagReadCosts(sfd), { mapped: -1, pread: -1 }, 'a file with less data than a measurement needs is not measured (mapped, as before)');
  } finally {
    fs.closeSync(fd);
    fs.closeSync(sfd);
  }
});
