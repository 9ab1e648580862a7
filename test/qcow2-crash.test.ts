/**
 * Crash safety: a writer process is killed with SIGKILL at random points, many times.
 * Afterwards `qemu-img check` finds no corruption (leaks at most, which `diff check --repair`
 * removes) and every write the writer acknowledged (write + flush, then a line on stdout)
 * reads back. Bytes of the one operation in flight at the kill may be old or new.
 *
 * This file is also the writer: run with CRASH_WRITER=<json>, it performs the operations.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import { Qcow2Image } from '../src/image/qcow2/image';
import { createChild, check } from '../src/differencing';
import { needQemu, pattern, qemuCheck, qemuImgOk } from './helpers/qemu';

interface WriterArgs {
  image: string;
  seed: number;
  size: number;
  l2CacheEntries: number;
  refcountCacheEntries: number;
  maxLen: number;
}

interface Op {
  kind: 'write' | 'zero';
  offset: number;
  length: number;
  seed: number;
}

/** The deterministic operation sequence of a run (the writer and the checker agree on it). */
function* ops(a: WriterArgs): Generator<Op> {
  let x = a.seed >>> 0 || 1;
  const next = () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
  for (let i = 0; ; i++) {
    const length = 1 + (next() % a.maxLen);
    const offset = next() % (a.size - length);
    yield { kind: next() % 6 === 0 ? 'zero' : 'write', offset, length, seed: a.seed * 100000 + i };
  }
}

function apply(buf: Buffer, op: Op): void {
  if (op.kind === 'zero') buf.fill(0, op.offset, op.offset + op.length);
  else pattern(op.length, op.seed).copy(buf, op.offset);
}

/**
 * The writer runs the compiled library (dist/, built by `npm test`'s pretest like the CLI
 * tests use) so that each of the many runs starts in a fraction of a second.
 */
const DIST_IMAGE = path.resolve(__dirname, '..', 'dist', 'src', 'image', 'qcow2', 'image.js');
const WRITER = `
const fs = require('fs');
const { Qcow2Image } = require(${JSON.stringify(DIST_IMAGE)});
const pattern = ${pattern.toString()};
const ops = ${ops.toString()};
const a = JSON.parse(process.env.CRASH_WRITER);
const img = Qcow2Image.open(a.image, { write: true, l2CacheEntries: a.l2CacheEntries, refcountCacheEntries: a.refcountCacheEntries });
fs.writeSync(1, 'ready\\n');
let n = 0;
for (const op of ops(a)) {
  if (op.kind === 'zero') img.writeZeroesSync(op.offset, op.length);
  else img.writeSync(pattern(op.length, op.seed), op.offset);
  img.flushSync();
  n++;
  fs.writeSync(1, 'done ' + n + '\\n');
}
`;

{
  const skip = needQemu() || (fs.existsSync(DIST_IMAGE) ? false : 'needs the compiled library (npx tsc -p .)');


  function readAll(file: string): Buffer {
    const img = Qcow2Image.open(file);
    try {
      const b = Buffer.alloc(img.virtualSize);
      img.readSync(b, 0);
      return b;
    } finally {
      img.close();
    }
  }

  /** Runs the writer, kills it after `ms` milliseconds of writing; returns the ops acknowledged. */
  function runAndKill(args: WriterArgs, ms: number): Promise<number> {
    return new Promise((resolve, reject) => {
      const child = spawn(process.execPath, ['-e', WRITER], {
        env: { ...process.env, CRASH_WRITER: JSON.stringify(args) },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let out = '';
      let err = '';
      let timer: NodeJS.Timeout | undefined;
      child.stdout.on('data', (d: Buffer) => {
        out += d.toString();
        if (!timer && out.includes('ready\n')) timer = setTimeout(() => child.kill('SIGKILL'), ms);
      });
      child.stderr.on('data', (d: Buffer) => (err += d.toString()));
      child.on('close', (code, signal) => {
        if (timer) clearTimeout(timer);
        if (signal !== 'SIGKILL') return reject(new Error(`writer ended by itself (${code} ${signal}): ${err}`));
        const m = [...out.matchAll(/^done (\d+)$/gm)];
        resolve(m.length ? Number(m[m.length - 1][1]) : 0);
      });
    });
  }

  async function scenario(t: Asserts, image: string, base: Buffer, kills: number, args: Omit<WriterArgs, 'seed' | 'image'>): Promise<void> {
    let model = base;
    let leaksSeen = 0;
    let acked = 0;
    for (let k = 0; k < kills; k++) {
      const a: WriterArgs = { ...args, image, seed: 1000 + k * 7919 };
      const ms = 20 + Math.floor(Math.random() * 250);
      const n = await runAndKill(a, ms);
      acked += n;
      const q = qemuCheck(image);
      if (q.status !== 0 && q.status !== 3) {
        t.fail(`kill ${k} after ${n} ops (${ms} ms): qemu-img check finds corruption: ${q.text}`);
        return;
      }
      if (q.status === 3) {
        leaksSeen++;
        const r = check(image, { repair: true });
        if (r.exitCode !== 0 || qemuCheck(image).status !== 0) {
          t.fail(`kill ${k}: diff check --repair did not leave a clean image: ${r.messages.join('; ')}`);
          return;
        }
      } else if (check(image).exitCode === 2) {
        t.fail(`kill ${k}: disksnap check disagrees with qemu-img check (corruption)`);
        return;
      }
      // expected: every acknowledged op applied; the op in flight may be applied or not
      const gen = ops(a);
      for (let i = 0; i < n; i++) apply(model, gen.next().value as Op);
      const inflight = gen.next().value as Op;
      const withIt = Buffer.from(model);
      apply(withIt, inflight);
      const got = readAll(image);
      let bad = -1;
      for (let i = 0; i < got.length; i++) {
        if (got[i] !== model[i] && got[i] !== withIt[i]) {
          bad = i;
          break;
        }
      }
      if (bad >= 0) {
        t.fail(`kill ${k} after ${n} acknowledged ops: byte ${bad} is ${got[bad]}, expected ${model[bad]} (or ${withIt[bad]} from the op in flight)`);
        return;
      }
      model = got; // the in-flight op's bytes are whatever survived
    }
    t.pass(`${kills} kills, ${acked} acknowledged operations all read back; ${leaksSeen} kills left leaks, all repaired`);
    t.equal(qemuCheck(image).status, 0, 'final qemu-img check clean');
  }

  t.test('SIGKILL during writes to a child (4 KiB clusters, tiny caches evicting mid-run) never corrupts it', { skip }, async (t) => {
    const dir = t.testdir();
    const parent = path.join(dir, 'parent.raw');
    const size = 4 * 2 ** 20;
    const base = pattern(size, 77);
    fs.writeFileSync(parent, base);
    const child = path.join(dir, 'child.qcow2');
    await createChild(parent, child, { clusterSize: 4096 });
    await scenario(t, child, Buffer.from(base), 15, { size, l2CacheEntries: 2, refcountCacheEntries: 1, maxLen: 40000 });
  });

  t.test('SIGKILL while a 512-byte-cluster image outgrows its refcount table never corrupts it', { skip }, async (t) => {
    const dir = t.testdir();
    const image = path.join(dir, 'grow.qcow2');
    const size = 12 * 2 ** 20;
    qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', image, String(size));
    // one refcount-table cluster describes 8 MiB of file: fill 7.8 MiB first (about 7.95
    // MiB of file with its L2 tables and refcount blocks), so that the killed runs move the
    // table
    const base = Buffer.alloc(size);
    const fill = Qcow2Image.open(image, { write: true });
    const data = pattern(7.8 * 2 ** 20, 5);
    fill.writeSync(data, 0);
    fill.close();
    data.copy(base, 0);
    const reftableAt = () => fs.readFileSync(image).readBigUInt64BE(48);
    const before = reftableAt();
    const filled = (JSON.parse(qemuImgOk('check', '--output=json', image)) as { 'image-end-offset': number })['image-end-offset'];
    t.ok(filled < 8 * 2 ** 20, `the fill stays inside the first refcount table (end ${filled})`);
    await scenario(t, image, base, 15, { size, l2CacheEntries: 4, refcountCacheEntries: 2, maxLen: 300000 });
    t.not(reftableAt(), before, 'the killed runs moved the refcount table');
  });
}

interface Asserts {
  pass(message: string): unknown;
  fail(message: string): unknown;
  equal(found: unknown, wanted: unknown, message?: string): unknown;
  ok(value: unknown, message?: string): unknown;
}
