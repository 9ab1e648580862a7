/**
 * qemu-img and qemu-io, the oracle of the qcow2 tests. Tests skip with a reason when they
 * are missing, except under DISKSNAP_REQUIRE_TOOLS=1 (CI), where a missing tool fails.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { missing } from './tools';

/** Skip reason for tap's `{ skip }` (false when qemu-img and qemu-io are present). */
export function needQemu(): string | false {
  return missing({ commands: ['qemu-img', 'qemu-io'] });
}

export interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

export function run(cmd: string, args: string[], input?: string): Run {
  const r = spawnSync(cmd, args, { input, maxBuffer: 1 << 28 });
  if (r.error) throw r.error;
  return { status: r.status, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
}

export function qemuImg(...args: string[]): Run {
  return run('qemu-img', args);
}

/** Runs qemu-img and throws with its stderr unless it exits 0. */
export function qemuImgOk(...args: string[]): string {
  const r = qemuImg(...args);
  if (r.status !== 0) throw new Error(`qemu-img ${args.join(' ')} failed (${r.status}): ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** `qemu-img info --output=json` of one image (the fields the tests read). */
export function qemuInfo(file: string): { format: string; 'virtual-size': number; 'backing-filename'?: string; [k: string]: unknown } {
  return JSON.parse(qemuImgOk('info', '--output=json', file)) as { format: string; 'virtual-size': number; 'backing-filename'?: string };
}

export interface QemuCheck {
  'check-errors': number;
  corruptions?: number;
  leaks?: number;
  'leaks-fixed'?: number;
  'image-end-offset'?: number;
  [k: string]: unknown;
}

/** `qemu-img check --output=json`; status 0 clean, 2 corruption, 3 leaks. */
export function qemuCheck(file: string): { status: number | null; result: QemuCheck | undefined; text: string } {
  const r = qemuImg('check', '--output=json', file);
  let result: QemuCheck | undefined;
  try {
    result = JSON.parse(r.stdout) as QemuCheck;
  } catch {
    result = undefined;
  }
  return { status: r.status, result, text: r.stdout + r.stderr };
}

/** Runs qemu-io commands (-c each) on a file; throws unless it exits 0 without errors. */
export function qemuIo(file: string, cmds: string[], format = 'qcow2'): string {
  const args = ['-f', format];
  for (const c of cmds) args.push('-c', c);
  args.push(file);
  const r = run('qemu-io', args);
  const text = r.stdout + r.stderr;
  if (r.status !== 0 || /failed|error/i.test(text)) throw new Error(`qemu-io ${args.join(' ')}: ${text}`);
  return text;
}

/** `qemu-img compare` of an image with a raw file: true when identical. */
export function qemuSame(image: string, raw: string): { same: boolean; text: string } {
  const r = qemuImg('compare', '-F', 'raw', image, raw);
  return { same: r.status === 0, text: r.stdout + r.stderr };
}

export function sha256(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

/** What must not change about a parent: bytes and mtime. */
export interface Snapshot {
  sha: string;
  mtimeNs: bigint;
  size: number;
}

export function snapshotOf(file: string): Snapshot {
  const st = fs.statSync(file, { bigint: true });
  return { sha: sha256(file), mtimeNs: st.mtimeNs, size: Number(st.size) };
}

/** Deterministic, position-dependent bytes (a different `seed` gives different bytes). */
export function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < len; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}


/** The assertions these helpers use (any tap test object has them). */
export interface Test {
  ok(value: unknown, message?: string): unknown;
  equal(found: unknown, wanted: unknown, message?: string): unknown;
}

/** qemu-img check: no errors and no leaks. */
export function assertClean(t: Test, image: string, phase: string): void {
  const c = qemuCheck(image);
  t.equal(c.status, 0, `${phase}: qemu-img check ${path.basename(image)} is clean${c.status === 0 ? '' : `: ${c.text}`}`);
}

/** qemu-img compare: the image shows exactly `expected`. */
export function assertShows(t: Test, image: string, expected: Buffer, phase: string): void {
  const raw = path.join(path.dirname(image), `.expected-${process.pid}-${Math.random().toString(16).slice(2)}.raw`);
  fs.writeFileSync(raw, expected);
  try {
    const r = qemuSame(image, raw);
    t.ok(r.same, `${phase}: qemu-img compare ${path.basename(image)} equals the expected bytes${r.same ? '' : `: ${r.text}`}`);
  } finally {
    fs.rmSync(raw, { force: true });
  }
}

export function assertUnchanged(t: Test, file: string, before: Snapshot, phase: string): void {
  const now = snapshotOf(file);
  t.equal(now.sha, before.sha, `${phase}: ${path.basename(file)} bytes unchanged`);
  t.equal(now.mtimeNs, before.mtimeNs, `${phase}: ${path.basename(file)} mtime unchanged`);
}

/** A raw parent of `size` bytes filled with a pattern (so copy-on-write is visible). */
export function makeParent(dir: string, size: number, name = 'parent.raw'): { file: string; bytes: Buffer } {
  const file = path.join(dir, name);
  const bytes = pattern(size, 1);
  fs.writeFileSync(file, bytes);
  return { file, bytes };
}

/** What the guest sees now, as qemu-img converts it. */
export function guestBytes(img: string): Buffer {
  const out = `${img}.expected-${process.pid}.raw`;
  qemuImgOk('convert', '-O', 'raw', img, out);
  try {
    return fs.readFileSync(out);
  } finally {
    fs.rmSync(out, { force: true });
  }
}

/**
 * sha256 of the guest view of an image (its whole chain), as qemu-img reads it. `shared`
 * (-U) reads an image a running QEMU holds.
 */
export function viewSha256(file: string, opts: { shared?: boolean } = {}): string {
  const out = `${file}.view-${process.pid}.raw`;
  try {
    qemuImgOk('convert', ...(opts.shared ? ['-U'] : []), '-O', 'raw', file, out);
    return sha256(out);
  } finally {
    fs.rmSync(out, { force: true });
  }
}
