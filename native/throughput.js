#!/usr/bin/env node
// Hand-run throughput check of the native block engine (NOT a test; bench/ holds the real
// benchmarks). Usage: node native/throughput.js   (after `npx node-gyp rebuild`)
// Prints SHA-256 / HMAC-SHA-256 hashing rates with 512 KiB blocks on 1 and 2 threads (with
// SHA-NI, two blocks are hashed at once: ~2.3 GB/s per thread on the 2-core Xeon dev box, vs
// ~1.9 GB/s for OpenSSL's one-stream code) and the rate of batched 4 KiB preads from the page
// cache with 256 requests per call. DISKSNAP_HASH_IMPL=openssl measures the OpenSSL fallback.
// Wall-clock rates are only meaningful on an otherwise idle machine.
'use strict';
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const crypto = require('node:crypto');
const addon = require(process.env.DISKSNAP_ADDON || path.join(__dirname, '..', 'build', 'Release', 'disksnap.node'));

function rate(fn, bytesPerCall, seconds = 1.5) {
  fn(); // warm up
  let calls = 0;
  const start = process.hrtime.bigint();
  let elapsed = 0;
  while (elapsed < seconds) {
    fn();
    calls++;
    elapsed = Number(process.hrtime.bigint() - start) / 1e9;
  }
  return { perSec: calls / elapsed, bytesPerSec: (calls * bytesPerCall) / elapsed };
}

const gb = (x) => (x / 1e9).toFixed(2) + ' GB/s';
const block = 512 * 1024;
const data = crypto.randomBytes(64 * 1024 * 1024); // 128 blocks, not all-zero
const key = crypto.randomBytes(32);
for (const threads of [1, 2]) {
  const plain = rate(() => addon.hashBlocks(data, block, threads), data.length);
  const hmac = rate(() => addon.hashBlocks(data, block, threads, key), data.length);
  console.log(`hashBlocks ${threads} thread(s): sha256 ${gb(plain.bytesPerSec)}, hmac ${gb(hmac.bytesPerSec)}`);
}
const zeros = Buffer.alloc(64 * 1024 * 1024);
console.log(`hashBlocks all-zero input, 1 thread: ${gb(rate(() => addon.hashBlocks(zeros, block, 1), zeros.length).bytesPerSec)}`);
// The same 64 MiB as hashBlocks, so that both read memory rather than cache.
console.log(`node:crypto createHash sha256 (reference, 1 thread): ${gb(rate(() => {
  for (let i = 0; i < data.length / block; i++) crypto.createHash('sha256').update(data.subarray(i * block, (i + 1) * block)).digest();
}, data.length).bytesPerSec)}`);

async function ioChecks() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-throughput-'));
  try {
    const file = path.join(dir, 'f');
    const size = 64 * 1024 * 1024;
    fs.writeFileSync(file, crypto.randomBytes(size)); // now in the page cache
    const fd = addon.open(file, 0, 0);
    const n = 256;
    const buf = Buffer.allocUnsafe(n * 4096);
    const reqs = new Float64Array(n * 3);
    const fill = (sequential) => {
      for (let i = 0; i < n; i++) {
        const blk = sequential ? i : Math.floor(Math.random() * (size / 4096));
        reqs[3 * i] = blk * 4096;
        reqs[3 * i + 1] = i * 4096;
        reqs[3 * i + 2] = 4096;
      }
    };
    fill(false);
    const random = rate(() => addon.preadBatch(fd, buf, reqs), n * 4096);
    fill(true); // adjacent requests: merged into preadv calls
    const seq = rate(() => addon.preadBatch(fd, buf, reqs), n * 4096);
    console.log(`preadBatch 256 x 4 KiB from page cache: random ${((random.perSec * n) / 1e6).toFixed(2)} M req/s, ` +
      `sequential ${((seq.perSec * n) / 1e6).toFixed(2)} M req/s`);

    // hashFile over the same cached file: 4 MiB preads + hashing on worker threads.
    for (const threads of [1, 2]) {
      const t0 = process.hrtime.bigint();
      let calls = 0;
      while (Number(process.hrtime.bigint() - t0) < 1.5e9) {
        await addon.hashFile(fd, 0, size, block, threads, undefined, undefined);
        calls++;
      }
      const s = Number(process.hrtime.bigint() - t0) / 1e9;
      console.log(`hashFile (page cache) ${threads} thread(s): ${gb((calls * size) / s)}`);
    }
    const t1 = process.hrtime.bigint();
    let hcalls = 0;
    while (Number(process.hrtime.bigint() - t1) < 1.5e9) {
      await addon.hashFile(fd, 0, size, block, 2, key, undefined);
      hcalls++;
    }
    console.log(`hashFile (page cache) hmac 2 threads: ${gb((hcalls * size) / (Number(process.hrtime.bigint() - t1) / 1e9))}`);
    addon.close(fd);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

ioChecks().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
