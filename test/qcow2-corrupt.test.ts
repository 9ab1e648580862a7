/**
 * Bad input: the committed fixtures in fixtures/qcow2 (made by fixtures/qcow2/make.sh) each
 * give a clear error naming what is wrong — never a crash, a hang or a write. Opening for
 * reading and writing, reading every byte, `diff check` and `diff check --repair` are tried
 * on a copy of each, and the copy's bytes are compared afterwards.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { openImage } from '../src/image';
import { check } from '../src/differencing';
import { isDisksnapError } from '../src/engine/errors';

const FIXTURES = path.resolve(__dirname, '..', 'fixtures', 'qcow2');
const sha = (f: string) => createHash('sha256').update(fs.readFileSync(f)).digest('hex');

interface Case {
  file: string;
  /** error expected from opening (and reading everything) */
  code: string;
  message: RegExp;
  /** exit code of `diff check` (undefined: the check cannot be done and fails with `code`, as qemu-img check exits 1) */
  check?: 0 | 2 | 3;
  extra?: string[];
}

const cases: Case[] = [
  { file: 'truncated-header.qcow2', code: 'ECORRUPT', message: /header truncated: the file has 50 bytes/ },
  { file: 'l1-past-eof.qcow2', code: 'ECORRUPT', message: /L1 entry 0 points to an L2 table at 1048576, past the end of the file/, check: 2 },
  { file: 'l2-past-eof.qcow2', code: 'ECORRUPT', message: /L2 entry for guest offset 0 points to 8388608, past the end of the file/, check: 2 },
  { file: 'overlap-data-on-reftable.qcow2', code: 'ECORRUPT', message: /guest offset 4096 points to 4096, which holds metadata/, check: 2 },
  { file: 'overlap-l2-on-l1.qcow2', code: 'ECORRUPT', message: /L1 entry 0 points to an L2 table at 12288, which overlaps other metadata/, check: 2 },
  { file: 'reftable-outside.qcow2', code: 'ECORRUPT', message: /refcount_table_offset is 268435456: the refcount table lies outside the file/, check: 2 },
  { file: 'refblock-past-eof.qcow2', code: 'ECORRUPT', message: /refcount table entry 0 points to 9437184, past the end of the file/, check: 2 },
  { file: 'missing-backing.qcow2', code: 'ENOENT', message: /backing file .*nowhere\.raw does not exist/ },
  { file: 'loop-a.qcow2', code: 'ECORRUPT', message: /backing chain loops: .*loop-a\.qcow2 -> .*loop-b\.qcow2 -> .*loop-a\.qcow2/, extra: ['loop-b.qcow2'] },
  { file: 'encrypted.qcow2', code: 'EUNSUPPORTED', message: /AES encryption/ },
  { file: 'corrupt-bit.qcow2', code: 'EUNSUPPORTED', message: /corrupt bit/, check: 0 },
  { file: 'unknown-incompatible.qcow2', code: 'EUNSUPPORTED', message: /unknown incompatible feature bits 0x400/ },
  { file: 'extended-l2.qcow2', code: 'EUNSUPPORTED', message: /extended L2 entries/, check: 0 },
  { file: 'external-data-file.qcow2', code: 'EUNSUPPORTED', message: /external data file/ },
];

function readEverything(file: string, write: boolean): void {
  const img = openImage(file, { write });
  try {
    const buf = Buffer.alloc(64 * 1024);
    for (let pos = 0; pos < img.virtualSize; pos += buf.length) img.readSync(buf.subarray(0, Math.min(buf.length, img.virtualSize - pos)), pos);
    img.map();
  } finally {
    img.close();
  }
}

for (const c of cases) {
  t.test(`${c.file}: ${c.code} naming the problem, nothing written`, async (t) => {
    const dir = t.testdir();
    for (const f of [c.file, ...(c.extra ?? [])]) fs.copyFileSync(path.join(FIXTURES, f), path.join(dir, f));
    const file = path.join(dir, c.file);
    const before = sha(file);
    for (const write of [false, true]) {
      t.throws(() => readEverything(file, write), { code: c.code, message: c.message }, `open for ${write ? 'writing' : 'reading'} and read everything`);
    }
    for (const repair of [false, true]) {
      try {
        const r = check(file, { repair });
        t.equal(r.exitCode, c.check, `check${repair ? ' --repair' : ''} exit code ${c.check}: ${r.messages.slice(0, 2).join('; ')}`);
      } catch (e) {
        t.equal(c.check, undefined, `check refuses: ${(e as Error).message}`);
        t.ok(isDisksnapError(e, c.code), `check${repair ? ' --repair' : ''} fails with ${c.code}`);
      }
    }
    t.equal(sha(file), before, 'the file was not modified');
  });
}

t.test('good fixtures (v3 and v2 made by qemu-img) read back as written by qemu-io', async (t) => {
  for (const f of ['good.qcow2', 'good-v2.qcow2']) {
    const img = openImage(path.join(FIXTURES, f));
    const b = Buffer.alloc(img.virtualSize);
    img.readSync(b, 0);
    img.close();
    t.ok(b.subarray(0, 8192).every((x) => x === 0x5a), `${f}: 8 KiB of 0x5a`);
    if (f === 'good.qcow2') t.ok(b.subarray(600 * 1024, 604 * 1024).every((x) => x === 0x33), `${f}: 4 KiB of 0x33 at 600 KiB`);
    const rest = f === 'good.qcow2' ? Buffer.concat([b.subarray(8192, 600 * 1024), b.subarray(604 * 1024)]) : b.subarray(8192);
    t.ok(rest.every((x) => x === 0), `${f}: zeros elsewhere`);
    t.equal(check(path.join(FIXTURES, f)).exitCode, 0, `${f}: check clean`);
  }
});

t.test('leaked-cluster.qcow2: check reports the leak (exit 3), --repair frees it (then exit 0)', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'leaked.qcow2');
  fs.copyFileSync(path.join(FIXTURES, 'leaked-cluster.qcow2'), file);
  const r = check(file);
  t.equal(r.exitCode, 3);
  t.equal(r.leaks, 1);
  t.equal(r.corruptions, 0);
  const fixed = check(file, { repair: true });
  t.equal(fixed.leaksFixed, 1);
  t.equal(fixed.exitCode, 0);
  t.equal(check(file).exitCode, 0, 'clean afterwards');
});

t.test('refcount-zero-in-use.qcow2: check reports corruption (exit 2) and --repair does not touch it', async (t) => {
  const dir = t.testdir();
  const file = path.join(dir, 'z.qcow2');
  fs.copyFileSync(path.join(FIXTURES, 'refcount-zero-in-use.qcow2'), file);
  const before = sha(file);
  const r = check(file, { repair: true });
  t.equal(r.exitCode, 2);
  t.match(r.messages.join('\n'), /cluster 3 \(offset 12288\): refcount 0, but 1 reference/);
  t.equal(sha(file), before, 'not written');
});
