/**
 * Fuzz: a seeded run of a few hundred mutated qcow2 images (header fields, L1 and L2
 * entries, the refcount table and refcount blocks). For each, disksnap's info, map, read,
 * check and write either succeed — a read then shows the same bytes as `qemu-img convert`
 * whenever QEMU reads the image — or fail with a typed DisksnapError; never a signal, a
 * hang, an internal error (any other exception), or a changed file: read-only operations
 * never change the image, and a refused write leaves the copy it was tried on unchanged.
 *
 * The operations run in worker processes over the compiled library (dist/), a batch of
 * images each, with a time limit: a hang or a crash names the image it happened on.
 * DISKSNAP_FUZZ_SEED and DISKSNAP_FUZZ_COUNT choose another run; a failure prints the seed
 * and the mutations, so it can be replayed.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { needQemu, pattern, qemuImgOk, qemuIo } from './helpers/qemu';
import { xorshift32 } from './helpers/rng';

const SEED = Number(process.env.DISKSNAP_FUZZ_SEED ?? 20261202);
const COUNT = Number(process.env.DISKSNAP_FUZZ_COUNT ?? 250);
const BATCH = 50;
const DIST = path.resolve(__dirname, '..', 'dist', 'src');
const skip = needQemu() || (fs.existsSync(path.join(DIST, 'image', 'qcow2', 'image.js')) ? false : 'needs the compiled library (npm run build)');
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

interface Base {
  name: string;
  file: string;
  bytes: Buffer;
  /** file regions worth mutating: [offset, length, what] */
  regions: [number, number, string][];
  clusterSize: number;
}

/** Where the metadata of a qcow2 file lies (from its header and tables). */
function regionsOf(b: Buffer): { regions: [number, number, string][]; clusterSize: number } {
  const cs = 2 ** b.readUInt32BE(20);
  const l1Size = b.readUInt32BE(36);
  const l1 = Number(b.readBigUInt64BE(40));
  const rt = Number(b.readBigUInt64BE(48));
  const rtClusters = b.readUInt32BE(56);
  const regions: [number, number, string][] = [[0, b.readUInt32BE(4) === 3 ? 112 : 72, 'header']];
  regions.push([l1, l1Size * 8, 'L1 table']);
  regions.push([rt, Math.min(rtClusters * cs, 512), 'refcount table']);
  for (let i = 0; i < 8; i++) {
    const off = Number(b.readBigUInt64BE(rt + i * 8) & ~0x1ffn);
    if (off > 0 && off < b.length) regions.push([off, cs, `refcount block ${i}`]);
  }
  for (let i = 0; i < l1Size; i++) {
    const off = Number(b.readBigUInt64BE(l1 + i * 8) & 0x00fffffffffffe00n);
    if (off > 0 && off < b.length) regions.push([off, cs, `L2 table ${i}`]);
  }
  return { regions, clusterSize: cs };
}

function makeBases(dir: string): Base[] {
  const out: Base[] = [];
  const add = (name: string, file: string) => {
    const bytes = fs.readFileSync(file);
    out.push({ name, file, bytes, ...regionsOf(bytes) });
  };
  const v3 = path.join(dir, 'v3.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', v3, '1M');
  qemuIo(v3, ['write -P 0x5a 0 12k', 'write -P 0x33 300k 6k', 'write -z 512k 8k', 'write -P 0x77 1020k 4k']);
  add('v3 4k', v3);
  const v2 = path.join(dir, 'v2.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'compat=0.10,cluster_size=4096', v2, '1M');
  qemuIo(v2, ['write -P 0x5a 0 8k', 'write -P 0x44 700k 4k']);
  add('v2 4k', v2);
  const small = path.join(dir, 'small.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', small, '256k');
  qemuIo(small, ['write -P 0x21 0 40k', 'write -P 0x22 100k 3k', 'write -P 0x23 250k 6k']);
  add('v3 512', small);
  const raw = path.join(dir, 'plain.raw');
  const p = pattern(256 * 1024, 9);
  p.fill(0, 64 * 1024, 128 * 1024);
  fs.writeFileSync(raw, p);
  const comp = path.join(dir, 'compressed.qcow2');
  qemuImgOk('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, comp);
  add('compressed 4k', comp);
  const parent = path.join(dir, 'parent.raw');
  fs.writeFileSync(parent, pattern(512 * 1024, 4));
  const child = path.join(dir, 'child.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'parent.raw', '-F', 'raw', child, '512k');
  qemuIo(child, ['write -P 0x66 4k 6k', 'write -z 100k 4k']);
  add('child of raw 4k', child);
  return out;
}

const INTERESTING_U64 = [0n, 1n, 0x200n, 0x1000n, 0x81000n, 0x7fffffffn, 0xffffffffn, 1n << 40n, 1n << 55n, (1n << 64n) - 1n];
const INTERESTING_U32 = [0, 1, 8, 9, 16, 21, 22, 64, 104, 112, 0x7fffffff, 0xffffffff];

/** 1 to 3 mutations of `base`: bit flips, random bytes, and interesting entries and fields. */
function mutate(base: Base, next: () => number): { bytes: Buffer; what: string[] } {
  const b = Buffer.from(base.bytes);
  const what: string[] = [];
  const n = 1 + (next() % 3);
  for (let m = 0; m < n; m++) {
    const [off, len, name] = base.regions[next() % base.regions.length];
    const kind = next() % 5;
    const used: number[] = [];
    for (let at = off; at + 8 <= off + len && at + 8 <= b.length; at += 8) if (b.readBigUInt64BE(at) !== 0n) used.push(at);
    if (kind === 4 && used.length > 0 && name !== 'header') {
      // an entry in use, moved: off by a sector, to the next cluster, into the header, onto
      // its own table, or past the end of the file (flags kept)
      const at = used[next() % used.length];
      const old = b.readBigUInt64BE(at);
      const flags = old & (3n << 62n);
      const target = BigInt(
        [Number(old & 0x00fffffffffffe00n) + 512, Number(old & 0x00fffffffffffe00n) + base.clusterSize, 512, off - (off % base.clusterSize), b.length + base.clusterSize][next() % 5],
      );
      b.writeBigUInt64BE(flags | target, at);
      what.push(`${name}: entry at ${at} 0x${old.toString(16)} -> 0x${(flags | target).toString(16)}`);
    } else if (kind === 0) {
      const at = off + (next() % len);
      const bit = next() % 8;
      if (at < b.length) b[at] ^= 1 << bit;
      what.push(`${name}: flip bit ${bit} of byte ${at}`);
    } else if (kind === 1) {
      const at = off + (next() % len);
      const v = next() & 0xff;
      if (at < b.length) b[at] = v;
      what.push(`${name}: byte ${at} = ${v}`);
    } else if (kind === 2 && len >= 8) {
      const at = off + 8 * (next() % Math.floor(len / 8));
      const r = next() % 4;
      const flags = [0n, 1n << 63n, 1n << 62n, 1n][next() % 4];
      const v =
        r === 0
          ? INTERESTING_U64[next() % INTERESTING_U64.length]
          : r === 1
            ? flags | (BigInt(next() % Math.ceil((b.length * 2) / base.clusterSize)) * BigInt(base.clusterSize))
            : r === 2
              ? flags | BigInt(next() % (b.length * 2))
              : flags | BigInt(next() % 64) * 512n;
      if (at + 8 <= b.length) b.writeBigUInt64BE(v & ((1n << 64n) - 1n), at);
      what.push(`${name}: u64 at ${at} = 0x${v.toString(16)}`);
    } else {
      const at = off + 4 * (next() % Math.max(1, Math.floor(len / 4)));
      const v = INTERESTING_U32[next() % INTERESTING_U32.length];
      if (at + 4 <= b.length) b.writeUInt32BE(v >>> 0, at);
      what.push(`${name}: u32 at ${at} = ${v}`);
    }
  }
  return { bytes: b, what };
}

/** The worker: runs the operations on each image listed in FUZZ_JOBS, one JSON line each. */
const WORKER = `
const fs = require('fs');
const crypto = require('crypto');
const { openImage } = require(${JSON.stringify(path.join(DIST, 'image', 'index.js'))});
const { checkImage } = require(${JSON.stringify(path.join(DIST, 'image', 'qcow2', 'check.js'))});
const { DisksnapError } = require(${JSON.stringify(path.join(DIST, 'engine', 'errors.js'))});
const sha = (b) => crypto.createHash('sha256').update(b).digest('hex');
const jobs = JSON.parse(process.env.FUZZ_JOBS);
const LIMIT = 4 * 1024 * 1024;
function attempt(fn) {
  try {
    return { ok: fn() };
  } catch (e) {
    if (e instanceof DisksnapError && typeof e.code === 'string') return { code: e.code };
    return { internal: String(e && e.stack || e) };
  }
}
function withImage(file, opts, fn) {
  const img = openImage(file, opts);
  try { return fn(img); } finally { img.close(); }
}
for (const j of jobs) {
  fs.writeSync(1, JSON.stringify({ start: j.i }) + '\\n');
  const before = sha(fs.readFileSync(j.file));
  const r = { i: j.i };
  r.info = attempt(() => withImage(j.file, {}, (img) => { img.info(true); return true; }));
  r.map = attempt(() => withImage(j.file, {}, (img) => img.map().length));
  r.read = attempt(() => withImage(j.file, {}, (img) => {
    const n = Math.min(img.virtualSize, LIMIT);
    const b = Buffer.alloc(n);
    img.readSync(b, 0);
    // QEMU sees the virtual size rounded down to 512-byte sectors: compare that much
    return { size: img.virtualSize, sha: sha(b.subarray(0, Math.min(n, Math.floor(img.virtualSize / 512) * 512))) };
  }));
  r.check = attempt(() => checkImage(j.file).exitCode);
  r.unchanged = sha(fs.readFileSync(j.file)) === before;
  fs.copyFileSync(j.file, j.copy);
  const copyBefore = sha(fs.readFileSync(j.copy));
  const data = Buffer.alloc(5000, 0xc3);
  r.write = attempt(() => withImage(j.copy, { write: true }, (img) => {
    const at = Math.max(0, Math.min(img.virtualSize - data.length, j.writeAt));
    if (img.virtualSize < data.length) return 'too small';
    img.writeSync(data, at);
    const back = Buffer.alloc(data.length);
    img.readSync(back, at);
    return back.equals(data) ? 'read back' : 'wrong bytes';
  }));
  if (!('ok' in r.write)) r.copyUnchanged = sha(fs.readFileSync(j.copy)) === copyBefore;
  fs.writeSync(1, JSON.stringify(r) + '\\n');
}
`;

interface Outcome {
  ok?: unknown;
  code?: string;
  internal?: string;
}
interface WorkerResult {
  i: number;
  info: Outcome;
  map: Outcome;
  read: Outcome;
  check: Outcome;
  write: Outcome;
  unchanged: boolean;
  copyUnchanged?: boolean;
}

/** What QEMU reads: the sha of (at most) the first 4 MiB `qemu-img convert` writes, or undefined when it refuses. */
function qemuRead(file: string, out: string, size: number): string | undefined {
  if (size > 64 * 2 ** 20) return undefined; // a mutated size QEMU would spend long converting
  // no -f: QEMU probes the format, as disksnap does (a broken magic makes both read raw)
  const r = spawnSync('qemu-img', ['convert', '-O', 'raw', file, out], { timeout: 20000, cwd: path.dirname(file) });
  if (r.status !== 0 || !fs.existsSync(out)) return undefined;
  const fd = fs.openSync(out, 'r');
  try {
    const b = Buffer.alloc(Math.min(size, 4 * 2 ** 20));
    const n = fs.readSync(fd, b, 0, b.length, 0);
    return sha(b.subarray(0, n));
  } finally {
    fs.closeSync(fd);
    fs.rmSync(out, { force: true });
  }
}

t.test(`${COUNT} mutated images (seed ${SEED}): same bytes as QEMU or a typed error; no crash, hang or change`, { skip }, async (t) => {
  const dir = t.testdir();
  const bases = makeBases(dir);
  const next = xorshift32(SEED);
  const jobs: { i: number; file: string; copy: string; base: string; what: string[]; writeAt: number }[] = [];
  for (let i = 0; i < COUNT; i++) {
    const base = bases[i % bases.length];
    const { bytes, what } = mutate(base, next);
    const file = path.join(dir, `m${i}.qcow2`);
    fs.writeFileSync(file, bytes);
    const writeAt = (next() % 256) * 4096 + (next() % 2) * 1000;
    jobs.push({ i, file, copy: path.join(dir, `m${i}.copy.qcow2`), base: base.name, what: [...what, `write at ${writeAt}`], writeAt });
  }
  const results = new Map<number, WorkerResult>();
  for (let s = 0; s < jobs.length; s += BATCH) {
    const batch = jobs.slice(s, s + BATCH);
    const r = spawnSync(process.execPath, ['-e', WORKER], {
      env: { ...process.env, FUZZ_JOBS: JSON.stringify(batch.map(({ i, file, copy, writeAt }) => ({ i, file, copy, writeAt }))) },
      timeout: 120000,
      maxBuffer: 1 << 26,
      cwd: dir,
    });
    let last = -1;
    for (const line of r.stdout.toString().split('\n')) {
      if (!line) continue;
      const o = JSON.parse(line) as WorkerResult & { start?: number };
      if (o.start !== undefined) last = o.start;
      else results.set(o.i, o);
    }
    if (r.signal || r.status !== 0) {
      const j = jobs[last];
      t.fail(`worker ended by ${r.signal ?? `exit ${r.status}`} on image ${last} (seed ${SEED}, ${j?.base}: ${j?.what.join('; ')}): ${r.stderr.toString().slice(0, 2000)}`);
      return;
    }
  }
  let sameBytes = 0;
  let typed = 0;
  let notAsked = 0;
  const codes = new Map<string, number>();
  for (const j of jobs) {
    const r = results.get(j.i);
    const label = `image ${j.i} (seed ${SEED}, ${j.base}: ${j.what.join('; ')})`;
    if (!r) {
      t.fail(`${label}: no result`);
      continue;
    }
    for (const op of ['info', 'map', 'read', 'check', 'write'] as const) {
      if (r[op].internal !== undefined) t.fail(`${label}: ${op} failed with an internal error: ${r[op].internal}`);
      else if (r[op].code !== undefined) {
        typed++;
        const k = `${op} ${r[op].code}`;
        codes.set(k, (codes.get(k) ?? 0) + 1);
      }
    }
    if (!r.unchanged) t.fail(`${label}: a read-only operation changed the file`);
    if (r.copyUnchanged === false) t.fail(`${label}: a refused write changed the file (${r.write.code})`);
    if (r.write.ok === 'wrong bytes') t.fail(`${label}: the write did not read back`);
    const read = r.read.ok as { size: number; sha: string } | undefined;
    if (read) {
      const q = qemuRead(j.file, path.join(dir, `q${j.i}.raw`), read.size);
      if (q === undefined && read.size <= 64 * 2 ** 20) t.fail(`${label}: disksnap reads the image, qemu-img convert refuses it`);
      else if (q === undefined) notAsked++;
      else if (q !== read.sha) t.fail(`${label}: disksnap reads other bytes than qemu-img convert`);
      else sameBytes++;
    }
  }
  const summary = [...codes].sort().map(([k, n]) => `${k} ${n}`).join(', ');
  t.pass(`${COUNT} images: ${sameBytes} read as QEMU reads them, ${notAsked} too large to ask QEMU; ${typed} typed refusals (${summary})`);
});
