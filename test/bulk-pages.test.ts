/**
 * Which buffers ask for 2 MiB pages whatever the host does with free memory (`bulk`,
 * src/storage/common.ts BULK_REUSE): the chunk buffers of a pipeline that moves at least
 * BULK_REUSE times their bytes (a full snapshot or a restore of a large volume), and no others
 * (an incremental, anything small), where a first touch of a huge page costs more than its
 * requests save. Asserted on the calls the addon sees (allocBig's second argument), beside
 * byte-exact restores.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as snap from '../src/storage';
import { native } from '../src/engine/native';
import { BULK_REUSE, CHUNK_BYTES, MAX_BUFFERS } from '../src/storage/common';
import { MiB, Write, applyWrites, makeImage, sha } from '../fixtures/store/helpers';

const n = native();
/** A full snapshot reads this many bytes, or more, through bulk buffers. */
const BULK_BYTES = BULK_REUSE * MAX_BUFFERS * CHUNK_BYTES;

/** The `bulk` argument of every allocBig call of at least a chunk's size while `fn` runs. */
async function bigAllocs<T>(fn: () => Promise<T>): Promise<{ value: T; bulk: boolean[] }> {
  const orig = n.allocBig;
  const bulk: boolean[] = [];
  n.allocBig = (size: number, b?: boolean) => {
    if (size >= CHUNK_BYTES) bulk.push(!!b);
    return orig.call(n, size, b);
  };
  try {
    return { value: await fn(), bulk };
  } finally {
    n.allocBig = orig;
  }
}

/** Writes of `bytes` of data from `at` on, 8 MiB each (distinct seeds: nothing deduplicates). */
function data(at: number, bytes: number, seed: number): Write[] {
  const w: Write[] = [];
  for (let off = 0; off < bytes; off += 8 * MiB) w.push({ offset: at + off, length: Math.min(8 * MiB, bytes - off), seed: seed + off / MiB });
  return w;
}

t.test('a full snapshot and a restore of a large volume use bulk chunk buffers; an incremental, and a small volume, do not', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const big = path.join(dir, 'big.img');
  makeImage(big, BULK_BYTES + 64 * MiB, data(16 * MiB, BULK_BYTES, 1));
  const want = sha(big);

  const full = await bigAllocs(() => snap.createSnapshot(big, { store }));
  t.equal(full.value.changeSource, 'full');
  t.ok(full.bulk.length > 0 && full.bulk.every((b) => b), `full snapshot of ${BULK_BYTES / MiB} MiB of data: chunk buffers for bulk traffic (${full.bulk})`);

  applyWrites(big, [{ offset: 100 * MiB, length: 1 * MiB, seed: 99 }]);
  const wantIncr = sha(big);
  const incr = await bigAllocs(() => snap.createSnapshot(big, { store }));
  t.not(incr.value.changeSource, 'full', 'an incremental');
  t.ok(incr.bulk.every((b) => !b), `the incremental: no bulk buffers (${incr.bulk})`);

  const out = path.join(dir, 'restored.img');
  const rest = await bigAllocs(() => snap.restoreSnapshot(full.value.id, { store, to: out }));
  t.ok(rest.bulk.length > 0 && rest.bulk.every((b) => b), `its restore: bulk buffers (${rest.bulk})`);
  t.equal(sha(out), want, 'the full snapshot restores byte-exact');
  fs.rmSync(out);
  await snap.restoreSnapshot(incr.value.id, { store, to: out });
  t.equal(sha(out), wantIncr, 'the incremental restores byte-exact');
  fs.rmSync(out);

  // under the line of both pools (a restore keeps 3 chunk buffers, a snapshot 4): a full
  // snapshot and its restore of a smaller volume keep the process's choice
  const small = path.join(dir, 'small.img');
  const smallBytes = BULK_REUSE * 3 * CHUNK_BYTES - 16 * MiB;
  makeImage(small, smallBytes + 16 * MiB, data(0, smallBytes, 1000));
  const sf = await bigAllocs(() => snap.createSnapshot(small, { store }));
  t.equal(sf.value.changeSource, 'full');
  t.ok(sf.bulk.length > 0 && sf.bulk.every((b) => !b), `full snapshot of ${smallBytes / MiB} MiB: no bulk buffers (${sf.bulk})`);
  const sr = await bigAllocs(() => snap.restoreSnapshot(sf.value.id, { store, to: out }));
  t.ok(sr.bulk.every((b) => !b), `its restore: no bulk buffers (${sr.bulk})`);
  t.equal(sha(out), sha(small), 'and it restores byte-exact');
});
