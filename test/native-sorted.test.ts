/**
 * The sorted-table calls of the native addon (native/sorted.cc), which the pack indexes of
 * src/storage/store/packs.ts use, held to plain TypeScript models: find, the order check, the
 * in-place sort that keeps the first of each key, and the join of keys against tables.
 */
import t from 'tap';
import { randomBytes } from 'node:crypto';
import { native } from '../src/engine/native';

const n = native();
const ENTRY = 72;
const KEY = 32;

/** `count` entries with random keys (some repeated when `dups`), each tagged with its position in bytes 64-67. */
function entries(count: number, dups = 0): Buffer {
  const b = randomBytes(count * ENTRY);
  for (let i = 0; i < count; i++) b.writeUInt32LE(i, i * ENTRY + 64);
  for (let k = 0; k < dups; k++) {
    const from = (k * 7919) % count;
    const to = (k * 104729 + 1) % count;
    b.copy(b, to * ENTRY, from * ENTRY, from * ENTRY + KEY);
  }
  return b;
}

const keyOf = (b: Buffer, i: number) => b.subarray(i * ENTRY, i * ENTRY + KEY);
const rows = (b: Buffer) => Array.from({ length: b.length / ENTRY }, (_, i) => b.subarray(i * ENTRY, (i + 1) * ENTRY));

/** The model of sortRecords: a stable sort by key, the first of each key kept. */
function sortModel(b: Buffer): Buffer {
  const sorted = rows(b)
    .map((r, i) => ({ r, i }))
    .sort((x, y) => x.r.compare(y.r, 0, KEY, 0, KEY) || x.i - y.i)
    .map((x) => x.r);
  return Buffer.concat(sorted.filter((r, i) => i === 0 || r.compare(sorted[i - 1], 0, KEY, 0, KEY) !== 0));
}

t.test('sortRecords: sorted by key, the first of equal keys kept, the count returned', async (t) => {
  for (const [count, dups] of [
    [0, 0],
    [1, 0],
    [2, 1],
    [500, 0],
    [3000, 400],
  ]) {
    const b = entries(count, dups);
    const want = sortModel(Buffer.from(b));
    const kept = n.sortRecords(b, ENTRY, KEY);
    t.equal(kept, want.length / ENTRY, `${count} entries, ${dups} keys copied: how many kept`);
    t.ok(b.subarray(0, kept * ENTRY).equals(want), `${count} entries, ${dups} keys copied: the model's order and entries`);
  }
  t.throws(() => n.sortRecords(Buffer.alloc(ENTRY + 1), ENTRY, KEY), { code: 'EINVAL', message: /whole entries/ });
  t.throws(() => n.sortRecords(Buffer.alloc(ENTRY), ENTRY, ENTRY + 1), { code: 'EINVAL' });
});

t.test('sortedCheck: the first entry not above the one before it, or -1', async (t) => {
  const b = entries(1000);
  t.equal(n.sortRecords(b, ENTRY, KEY), 1000);
  t.equal(n.sortedCheck(b, ENTRY, KEY), -1, 'sorted');
  t.equal(n.sortedCheck(Buffer.alloc(0), ENTRY, KEY), -1, 'empty');
  const twice = Buffer.from(b);
  keyOf(twice, 500).copy(twice, 501 * ENTRY);
  t.equal(n.sortedCheck(twice, ENTRY, KEY), 501, 'a key equal to the one before');
  const swapped = Buffer.from(b);
  b.copy(swapped, 700 * ENTRY, 701 * ENTRY, 702 * ENTRY);
  b.copy(swapped, 701 * ENTRY, 700 * ENTRY, 701 * ENTRY);
  t.equal(n.sortedCheck(swapped, ENTRY, KEY), 701, 'two entries swapped');
  const lastByte = Buffer.from(b);
  keyOf(b, 9).copy(lastByte, 10 * ENTRY, 0, KEY - 1); // entry 10: entry 9's key but for its last byte, which is made lower
  lastByte[10 * ENTRY + KEY - 1] = 0;
  lastByte[9 * ENTRY + KEY - 1] = 1;
  t.equal(n.sortedCheck(lastByte, ENTRY, KEY), 10, 'a key below the one before only in its 32nd byte');
});

t.test('sortedFind: every key found at its index, absent keys -1', async (t) => {
  const b = entries(2000);
  const kept = n.sortRecords(b, ENTRY, KEY);
  const table = b.subarray(0, kept * ENTRY);
  let wrong = 0;
  for (let i = 0; i < kept; i++) if (n.sortedFind(table, ENTRY, keyOf(table, i)) !== i) wrong++;
  t.equal(wrong, 0, 'all 2,000 keys at their own index');
  let found = 0;
  for (let k = 0; k < 200; k++) if (n.sortedFind(table, ENTRY, randomBytes(KEY)) !== -1) found++;
  t.equal(found, 0, 'random keys are absent');
  t.equal(n.sortedFind(Buffer.alloc(0), ENTRY, randomBytes(KEY)), -1, 'an empty table');
  // a key past either end, and a prefix key (the first 4 bytes of each entry)
  t.equal(n.sortedFind(table, ENTRY, Buffer.alloc(KEY, 0)), -1);
  t.equal(n.sortedFind(table, ENTRY, Buffer.alloc(KEY, 0xff)), -1);
  const first = keyOf(table, 0).subarray(0, 4);
  t.equal(n.sortedFind(table, ENTRY, first), 0, 'a shorter key compares the first key.length bytes');
});

t.test('sortedJoin: each distinct key once, ascending, from the first table that has it', async (t) => {
  const a = entries(300);
  const b = entries(3000);
  const ta = a.subarray(0, n.sortRecords(a, ENTRY, KEY) * ENTRY);
  const tb = b.subarray(0, n.sortRecords(b, ENTRY, KEY) * ENTRY);
  // keys: some of a, some of b, 40 in both (b's entries added to a with a mark of their own), repeats, and keys in neither
  const shared = Buffer.concat(Array.from({ length: 40 }, (_, k) => tb.subarray(k * 50 * ENTRY, (k * 50 + 1) * ENTRY)));
  const aPlus = Buffer.concat([ta, shared]);
  for (let k = 0; k < 40; k++) aPlus.writeUInt32LE(0xa0000000 + k, ta.length + k * ENTRY + 64); // a's version of a shared key
  const tA = aPlus.subarray(0, n.sortRecords(aPlus, ENTRY, KEY) * ENTRY);
  const keys: Buffer[] = [];
  for (let i = 0; i < 300; i += 2) keys.push(keyOf(tA, i));
  for (let i = 0; i < 3000; i += 3) keys.push(keyOf(tb, i));
  for (let k = 0; k < 100; k++) keys.push(randomBytes(KEY));
  for (let k = 0; k < 200; k++) keys.push(keys[(k * 31) % keys.length]);
  const got = n.sortedJoin(Buffer.concat(keys), KEY, [tA, tb], ENTRY).entries;
  // the model: distinct keys, sorted, each from the first table holding it
  const distinct = [...new Map(keys.map((k) => [k.toString('hex'), k])).values()].sort((x, y) => x.compare(y));
  const lookIn = (tbl: Buffer, k: Buffer) => rows(tbl).find((r) => r.compare(k, 0, KEY, 0, KEY) === 0);
  const want = Buffer.concat(distinct.map((k) => lookIn(tA, k) ?? lookIn(tb, k)).filter((r): r is Buffer => r !== undefined));
  t.ok(got.equals(want), `${got.length / ENTRY} entries as the model has them (${want.length / ENTRY})`);
  t.ok(rows(got).some((r) => r.readUInt32LE(64) >= 0xa0000000), 'a key in both tables comes from the first');
  t.equal(n.sortedCheck(got, ENTRY, KEY), -1, 'the result is sorted, each key once');
  t.equal(n.sortedJoin(Buffer.alloc(0), KEY, [tA, tb], ENTRY).entries.length, 0, 'no keys: no entries');
  t.equal(n.sortedJoin(Buffer.concat(keys), KEY, [], ENTRY).entries.length, 0, 'no tables: no entries');
  t.throws(() => n.sortedJoin(Buffer.alloc(33), KEY, [tA], ENTRY), { code: 'EINVAL', message: /whole keys/ });
  // keys alike in their first 8 bytes (the native sort compares those as a number first), and
  // keys shorter than 8 bytes; tables walked from both ends
  const same = randomBytes(8);
  const alike = entries(500);
  for (let o = 0; o < alike.length; o += ENTRY) same.copy(alike, o + (o % (3 * ENTRY) === 0 ? 0 : 1)); // most share 8 bytes at 0 or 1
  const tAlike = alike.subarray(0, n.sortRecords(alike, ENTRY, KEY) * ENTRY);
  const some = [...rows(tAlike)].filter((_, k) => k % 3 !== 1).map((r) => r.subarray(0, KEY));
  const mixed = [...some].reverse().concat(randomBytes(KEY), Buffer.concat([same, randomBytes(KEY - 8)]));
  const gotAlike = n.sortedJoin(Buffer.concat(mixed), KEY, [tAlike], ENTRY).entries;
  const wantAlike = Buffer.concat(some.sort((x, y) => x.compare(y)).map((k) => rows(tAlike).find((r) => r.compare(k, 0, KEY, 0, KEY) === 0)!));
  t.ok(gotAlike.equals(wantAlike), `keys alike in their first 8 bytes: ${gotAlike.length / ENTRY} entries as the model has them (${wantAlike.length / ENTRY})`);
  const short = Buffer.alloc(6 * 16);
  for (let k = 0; k < 16; k++) short.writeUIntBE(k * 7919 + (k % 2) * 0x10000000, k * 6, 6);
  const tShort = Buffer.concat(Array.from({ length: 16 }, (_, k) => Buffer.concat([short.subarray(k * 6, k * 6 + 6), Buffer.alloc(10, k)])));
  const tS = tShort.subarray(0, n.sortRecords(tShort, 16, 6) * 16);
  const shortKeys = Buffer.concat([short.subarray(5 * 6, 6 * 6), short.subarray(0, 6), Buffer.from('zzzzzz')]);
  t.same(rows16(n.sortedJoin(shortKeys, 6, [tS], 16).entries).map((r) => r[6]), [0, 5], '6-byte keys: found in order, the one in no table left out');
  t.throws(() => n.sortedJoin(Buffer.alloc(32), KEY, [Buffer.alloc(10)], ENTRY), { code: 'EINVAL', message: /whole entries/ });
  t.throws(() => n.sortedJoin(Buffer.alloc(32), KEY, 'x' as unknown as Buffer[], ENTRY), { code: 'EINVAL', message: /array of buffers/ });
  // keys that all share one hash-set slot's neighbourhood are still told apart: 2,000 keys
  // equal but for their last byte pair
  const near = Buffer.alloc(2000 * ENTRY);
  for (let k = 0; k < 2000; k++) near.writeUInt16BE(k, k * ENTRY + KEY - 2);
  const nearKeys = Buffer.concat(rows(near).filter((_, k) => k % 2 === 0).map((r) => r.subarray(0, KEY)).reverse());
  const gotNear = n.sortedJoin(nearKeys, KEY, [near], ENTRY).entries;
  t.same(rows(gotNear).map((r) => r.readUInt16BE(KEY - 2)), Array.from({ length: 1000 }, (_, k) => 2 * k), 'keys alike but for their last bytes: each found, in order');
});

t.test('sortedJoin: `later` counts the entries found for later keys; room around the entries', async (t) => {
  const a = entries(400);
  const ta = a.subarray(0, n.sortRecords(a, ENTRY, KEY) * ENTRY);
  const k = (i: number) => keyOf(ta, i);
  const absent = randomBytes(KEY);
  // keys: 0-9; later keys: 10-14 (found), 5 (a key too), an absent key, 12 again
  const keys = Buffer.concat(Array.from({ length: 10 }, (_, i) => k(i)));
  const later = Buffer.concat([...[10, 11, 12, 13, 14, 5].map(k), absent, k(12)]);
  const all = n.sortedJoin(keys, KEY, [ta], ENTRY, later);
  t.equal(all.entries.length / ENTRY, 15, 'fifteen distinct keys found');
  t.ok(all.entries.equals(ta.subarray(0, 15 * ENTRY)), 'in order');
  t.equal(all.later, 6, 'six of them are among the later keys (one of those a key too)');
  t.equal(n.sortedJoin(keys, KEY, [ta], ENTRY).later, 0, 'no later keys: none');
  t.equal(n.sortedJoin(Buffer.alloc(0), KEY, [ta], ENTRY, later).later, 6, 'later keys alone');
  t.equal(n.sortedJoin(k(1), KEY, [ta], ENTRY, absent).later, 0, 'only an absent later key: none found');
  const framed = n.sortedJoin(keys, KEY, [ta], ENTRY, later, 16, 40);
  t.equal(framed.entries.length, 16 + 15 * ENTRY + 40, 'room before and after');
  t.ok(framed.entries.subarray(16, 16 + 15 * ENTRY).equals(all.entries), 'the entries between');
  t.ok(framed.entries.subarray(0, 16).equals(Buffer.alloc(16)) && framed.entries.subarray(16 + 15 * ENTRY).equals(Buffer.alloc(40)), 'the room zeroed');
  t.throws(() => n.sortedJoin(keys, KEY, [ta], ENTRY, Buffer.alloc(33)), { code: 'EINVAL', message: /laterKeys must be whole keys/ });
  t.throws(() => n.sortedJoin(keys, KEY, [ta], ENTRY, undefined, 2 ** 21), { code: 'EINVAL', message: /room/ });
});

function rows16(b: Buffer): Buffer[] {
  return Array.from({ length: b.length / 16 }, (_, k) => b.subarray(k * 16, (k + 1) * 16));
}
