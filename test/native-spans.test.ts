/**
 * hashSpansAsync (native/hash.cc): the digest of each [offset, length] span of a buffer, held
 * to node's own SHA-256 and HMAC-SHA-256. A tag scan hashes a chunk's new pieces and whole
 * blocks with it, where they lie scattered in the buffer tagFile copied them into.
 */
import t from 'tap';
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { native } from '../src/engine/native';

const n = native();
const KiB = 1024;

function ref(buf: Buffer, spans: number[], key?: Uint8Array): Buffer {
  const out: Buffer[] = [];
  for (let i = 0; i < spans.length; i += 2) {
    const h = key ? createHmac('sha256', key) : createHash('sha256');
    out.push(h.update(buf.subarray(spans[i], spans[i] + spans[i + 1])).digest());
  }
  return Buffer.concat(out);
}

t.test('hashSpansAsync: each span\'s digest, in order, whatever the threads and the mix of lengths', async (t) => {
  const buf = randomBytes(4 * 1024 * KiB);
  buf.fill(0, 512 * KiB, 1024 * KiB); // a zero block: hashed as bytes, no zero flag
  // pieces of 64 KiB and whole blocks of 512 KiB mixed (as a tag scan asks), a short tail,
  // odd offsets and lengths, an empty span, overlapping spans and the same span twice
  const spans = [3 * 64 * KiB, 64 * KiB, 512 * KiB, 512 * KiB, 7 * 64 * KiB, 64 * KiB, 1024 * KiB, 512 * KiB, 1, 100003, 77, 0, 0, 64 * KiB, 0, 64 * KiB, 32 * KiB, 64 * KiB, 4 * 1024 * KiB - 5000, 5000, 2 * 1024 * KiB, 511 * KiB];
  for (const key of [undefined, randomBytes(32), randomBytes(100)]) {
    const want = ref(buf, spans, key);
    for (const threads of [1, 2, 0, 5]) {
      const got = await n.hashSpansAsync(buf, Float64Array.from(spans), threads, key);
      t.ok(Buffer.isBuffer(got), 'a Buffer');
      t.equal(got.length, (spans.length / 2) * 32, '32 bytes a span');
      t.ok(got.equals(want), `${key ? `hmac (key of ${key.length} bytes)` : 'sha256'}, ${threads} threads: digests in span order`);
    }
  }
  // many spans: more than the threads take in their first claims
  const many: number[] = [];
  for (let i = 0; i < 301; i++) many.push(((i * 7919) % 60) * 64 * KiB + (i % 3), 64 * KiB - (i % 5) * 1000);
  t.ok((await n.hashSpansAsync(buf, Float64Array.from(many), 2)).equals(ref(buf, many)), '301 spans on 2 threads');
  t.equal((await n.hashSpansAsync(buf, new Float64Array(0), 2)).length, 0, 'no spans: no digests');
  // a span of a subarray is of that subarray's bytes
  const sub = buf.subarray(1000, 1000 + 256 * KiB);
  t.ok((await n.hashSpansAsync(sub, Float64Array.from([0, 64 * KiB, 100, 200 * KiB]), 2)).equals(ref(sub, [0, 64 * KiB, 100, 200 * KiB])), 'spans of a subarray');
});

t.test('hashSpansAsync refuses spans outside the buffer and malformed arguments', async (t) => {
  const buf = randomBytes(64 * KiB);
  await t.rejects(n.hashSpansAsync(buf, Float64Array.from([1, 64 * KiB]), 1), { code: 'EINVAL', message: /span 0 is not inside the buffer of 65536 bytes/ }, 'one byte past the end');
  await t.rejects(n.hashSpansAsync(buf, Float64Array.from([0, 10, 65537, 0]), 1), { code: 'EINVAL', message: /span 1 / }, 'an empty span past the end');
  await t.rejects(n.hashSpansAsync(buf, Float64Array.from([0.5, 10]), 1), { code: 'EINVAL' }, 'a fractional offset');
  await t.rejects(n.hashSpansAsync(buf, Float64Array.from([-1, 10]), 1), { code: 'EINVAL' }, 'a negative offset');
  await t.rejects(n.hashSpansAsync(buf, Float64Array.from([0, 10, 20]), 1), { code: 'EINVAL', message: /pairs/ }, 'an odd count');
  await t.rejects(n.hashSpansAsync(buf, [0, 10] as unknown as Float64Array, 1), { code: 'EINVAL', message: /Float64Array/ }, 'a plain array');
});
