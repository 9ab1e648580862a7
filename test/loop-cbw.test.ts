/**
 * Short freezes through copy-before-write (src/host/cbw.ts): a raw image attached with
 * `attach --via fuse` keeps its frozen moment readable (`snap`) while the VM's filesystem
 * goes on writing; the snapshot records 'frozen-cbw'. The oracle for the view is the image's
 * own bytes saved before the session; for the snapshots, e2fsck and debugfs on the restored
 * image, and a writer process's log of what it had made durable before the freeze — new files,
 * and in-place overwrites of a big file spread over the volume, so that many writes land ahead
 * of the snapshot's read (with preservation turned off, that check fails: 74 records wrong).
 */
import t from 'tap';
import type { Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn, spawnSync, ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { needLoop, scratch, makeExt4, sh, shOk, writeWithTimeout, debugfsCat, debugfsLs, e2fsckClean } from './helpers/loop';
import { attach, detach, Attachment } from '../src/host/attach';
import { createSnapshot, restoreSnapshot, listSnapshots } from '../src/storage';
import { CBW_CHUNK, CTL_NAME, SNAP_NAME } from '../src/host/cbw';
import { cli } from './helpers/cli';

const skip = needLoop(['mkfs.ext4', 'e2fsck', 'debugfs', 'blkdiscard']);

/** A mounted ext4 on a raw image attached through the FUSE view. */
async function mountedViaFuse(s: ReturnType<typeof scratch>, vol: string, size: string): Promise<{ a: Attachment; mp: string }> {
  makeExt4(vol, size);
  const a = await attach(vol, { via: 'fuse' });
  s.attached(a.device);
  const mp = path.join(s.dir, 'mnt');
  s.mount(a.device, mp);
  return { a, mp };
}

const CONTENT = (i: number): string => `file ${i}\n`.repeat(6000); // ~50 KiB

/** 4 KiB records of the big file the writer overwrites in place: "gen G rec K", padded. */
const RECORD = 4096;
const record = (gen: number, k: number): Buffer => Buffer.from(`gen ${gen} rec ${k}\n`.padEnd(RECORD, '.'));
/** The record the writer's step i overwrites (spread over the whole file). */
const recordOf = (i: number, records: number): number => (i * 7919) % records;

/** A file of `records` records, generation 0, in `dir` (spread over the filesystem by its size). */
function makeBig(file: string, records: number): void {
  const fd = fs.openSync(file, 'w');
  const batch = 256;
  for (let k = 0; k < records; k += batch) {
    fs.writeSync(fd, Buffer.concat(Array.from({ length: Math.min(batch, records - k) }, (_, j) => record(0, k + j))), 0, undefined, k * RECORD);
  }
  fs.fsyncSync(fd);
  fs.closeSync(fd);
}

/**
 * A process that, for i = 0, 1, ... until killed, writes a new file w<i> into `dir` and
 * overwrites record recordOf(i) of the big file with generation i+1 in place, each fsynced
 * (with the directory), then logs "i startMs doneMs" to `log` (outside the volume). The
 * in-place writes land all over the volume: many of them ahead of the snapshot's read.
 */
function startWriter(dir: string, log: string, big?: { file: string; records: number }): ChildProcess {
  const src = `
    const fs = require('fs'), path = require('path');
    const [dir, log, bigFile, records] = process.argv.slice(1);
    const dfd = fs.openSync(dir, 'r');
    const big = bigFile ? fs.openSync(bigFile, 'r+') : undefined;
    for (let i = 0; ; i++) {
      const t0 = Date.now();
      const fd = fs.openSync(path.join(dir, 'w' + i), 'w');
      fs.writeSync(fd, ('file ' + i + '\\n').repeat(6000));
      fs.fsyncSync(fd);
      fs.closeSync(fd);
      fs.fsyncSync(dfd);
      if (big !== undefined) {
        const k = (i * 7919) % Number(records);
        fs.writeSync(big, Buffer.from(('gen ' + (i + 1) + ' rec ' + k + '\\n').padEnd(${RECORD}, '.')), 0, ${RECORD}, k * ${RECORD});
        fs.fsyncSync(big);
      }
      fs.appendFileSync(log, i + ' ' + t0 + ' ' + Date.now() + '\\n');
    }`;
  const args = big ? [big.file, String(big.records)] : [];
  return spawn(process.execPath, ['-e', src, dir, log, ...args], { stdio: 'ignore' });
}

async function stopWriter(w: ChildProcess): Promise<void> {
  if (w.exitCode !== null || w.signalCode !== null) return;
  const gone = new Promise((r) => w.once('exit', r));
  w.kill('SIGKILL');
  await gone;
}

function writerLog(log: string): Array<{ i: number; start: number; done: number }> {
  return fs
    .readFileSync(log, 'utf8')
    .split('\n')
    .filter(Boolean)
    .map((l) => {
      const [i, start, done] = l.split(' ').map(Number);
      return { i, start, done };
    });
}

/** A 1 GiB ext4 mounted through the FUSE view with a writer (startWriter, files only) running in it. */
async function mountedWithWriter(t: Test, s: ReturnType<typeof scratch>, vol: string): Promise<{ a: Attachment; mp: string; log: string; w: ChildProcess }> {
  const { a, mp } = await mountedViaFuse(s, vol, '1G');
  fs.mkdirSync(path.join(mp, 'w'));
  const log = path.join(s.dir, 'writer.log');
  fs.writeFileSync(log, '');
  const w = startWriter(path.join(mp, 'w'), log);
  t.teardown(() => stopWriter(w));
  await waitFor('the writer to start', () => writerLog(log).length >= 5);
  return { a, mp, log, w };
}

/** When the FUSE server started its (last) copy-before-write session: the frozen moment, from its log. */
function sessionStart(a: Attachment): number {
  const lines = fs.readFileSync(a.fuse!.log, 'utf8').split('\n').filter((l) => l.includes('copy-before-write session started'));
  return Date.parse(lines[lines.length - 1].split(' ')[0]);
}

/** Preserve files beside the image, and ones the FUSE server still holds open (unlinked). */
function preserveLeftovers(vol: string, serverPid: number): string[] {
  const named = fs.readdirSync(path.dirname(vol)).filter((n) => n.includes('.disksnap-cbw-'));
  let held: string[] = [];
  try {
    held = fs
      .readdirSync(`/proc/${serverPid}/fd`)
      .map((fd) => {
        try {
          return fs.readlinkSync(`/proc/${serverPid}/fd/${fd}`);
        } catch {
          return '';
        }
      })
      .filter((l) => l.includes('.disksnap-cbw-'));
  } catch {
    // the server is gone: it holds nothing
  }
  return [...named, ...held];
}

async function waitFor(what: string, cond: () => boolean, ms = 20_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

t.test('the snap view: the image as it was when the session started, whatever is written since', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const vol = path.join(s.dir, 'vol.img');
  const size = 8 << 20;
  const before = randomBytes(size);
  fs.writeFileSync(vol, before);
  const a = await attach(vol, { via: 'fuse' });
  s.attached(a.device);
  const view = a.fuse!.mountpoint;
  const ctl = fs.openSync(path.join(view, CTL_NAME), 'r+');
  const status = () => {
    const b = Buffer.alloc(4096);
    return JSON.parse(b.toString('utf8', 0, fs.readSync(ctl, b, 0, b.length, 0)));
  };
  const snap = fs.openSync(path.join(view, SNAP_NAME), 'r');
  const readSnap = (off: number, len: number) => {
    const b = Buffer.alloc(len);
    fs.readSync(snap, b, 0, len, off);
    return b;
  };
  t.throws(() => readSnap(0, 4096), { code: 'EIO' }, 'no session: the snap view refuses to answer');
  t.throws(() => fs.writeSync(ctl, 'frobnicate\n', 0), { code: 'EINVAL' }, 'an unknown command');
  t.match(status(), { session: 'none', lastError: /unknown command/ });

  fs.writeSync(ctl, 'start 4194304\n', 0);
  t.match(status(), { session: 'active', preservedBytes: 0, limit: 4194304, chunk: CBW_CHUNK });
  const other = fs.openSync(path.join(view, CTL_NAME), 'r+');
  t.throws(() => fs.writeSync(other, 'start 100\n', 0), { code: 'EBUSY' }, 'one session at a time');
  t.throws(() => fs.writeSync(other, 'end\n', 0), { code: 'EPERM' }, 'only its owner ends it');
  fs.closeSync(other);
  t.equal(status().session, 'active', 'closing another handle does not end it');

  // Chunk 0 is read whole first: it needs no copy when overwritten, and cannot be read again.
  t.ok(readSnap(0, CBW_CHUNK).equals(before.subarray(0, CBW_CHUNK)));
  // Writes through the loop device: unaligned to chunks, spanning chunks, then a discard.
  const dev = fs.openSync(a.device, 'r+');
  const patch = randomBytes(3 * CBW_CHUNK);
  fs.writeSync(dev, patch, 0, patch.length, CBW_CHUNK + 4096); // chunks 1-4, partially 1 and 4
  fs.writeSync(dev, randomBytes(512), 0, 512, 0); // chunk 0: already read
  fs.fsyncSync(dev);
  fs.closeSync(dev);
  shOk('blkdiscard', ['-o', String(6 * CBW_CHUNK), '-l', String(2 * CBW_CHUNK), a.device]);
  const live = fs.readFileSync(vol);
  t.ok(live.subarray(CBW_CHUNK + 4096, CBW_CHUNK + 4096 + patch.length).equals(patch), 'the writes reached the image');
  t.ok(live.subarray(6 * CBW_CHUNK, 8 * CBW_CHUNK).equals(Buffer.alloc(2 * CBW_CHUNK)), 'the discard zeroed its range');
  t.equal(status().preservedBytes, 6 * CBW_CHUNK, 'chunks 1-4 and 6-7 preserved, chunk 0 (read) not');

  t.ok(readSnap(CBW_CHUNK, size - CBW_CHUNK).equals(before.subarray(CBW_CHUNK)), 'the snap view is the image before the writes');
  t.ok(readSnap(5 * CBW_CHUNK + 100, 3 * CBW_CHUNK).equals(before.subarray(5 * CBW_CHUNK + 100, 8 * CBW_CHUNK + 100)), 'unaligned reads across preserved chunks');
  t.throws(() => readSnap(0, 4096), { code: 'EIO' }, 'chunk 0 was read, then overwritten: never served with later bytes');
  t.equal(status().refusedReads, 1);

  fs.writeSync(ctl, 'end\n', 0);
  t.match(status(), { session: 'none', preservedBytes: 6 * CBW_CHUNK });
  t.throws(() => readSnap(0, 4096), { code: 'EIO' }, 'after the end: no frozen moment');
  t.same(preserveLeftovers(vol, a.fuse!.pid), [], 'the preserve file is gone');

  // A session whose owner closes its handle (or dies) ends with it.
  fs.writeSync(ctl, 'start 100\n', 0);
  t.equal(preserveLeftovers(vol, a.fuse!.pid).length, 1, 'the server holds an (unlinked) preserve file');
  fs.closeSync(ctl);
  fs.closeSync(snap);
  await waitFor('the release to end the session', () => preserveLeftovers(vol, a.fuse!.pid).length === 0);
  t.pass('closing the control file ended the session and freed its preserve file');
  await detach(a.device);
});

t.test('mounted ext4 via FUSE: a snapshot freezes it for milliseconds while a writer writes on', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const vol = path.join(s.dir, 'vol.img');
  const store = path.join(s.dir, 'store');
  const { a, mp } = await mountedViaFuse(s, vol, '1G');
  fs.mkdirSync(path.join(mp, 'w'));
  const records = (384 << 20) / RECORD;
  makeBig(path.join(mp, 'big'), records);
  const log = path.join(s.dir, 'writer.log');
  fs.writeFileSync(log, '');
  const w = startWriter(path.join(mp, 'w'), log, { file: path.join(mp, 'big'), records });
  t.teardown(() => stopWriter(w));
  await waitFor('the writer to make 20 files', () => writerLog(log).length >= 20);

  // what a server SIGKILLed between making its preserve file and unlinking it would leave
  const dead = spawnSync('true').pid!;
  const stale = path.join(s.dir, `.vol.img.disksnap-cbw-${dead}-0badcafe`);
  fs.writeFileSync(stale, 'old bytes');

  const logs: string[] = [];
  const t0 = performance.now();
  const snap = await createSnapshot(vol, { store, onLog: (m) => logs.push(m) });
  t.notOk(fs.existsSync(stale), 'a preserve file whose server is dead was removed');
  const took = performance.now() - t0;
  const frozenAt = sessionStart(a);
  await waitFor('20 more files after the snapshot', () => writerLog(log).filter((e) => e.start > frozenAt).length >= 20);
  await stopWriter(w);

  t.equal(snap.state, 'completed');
  t.equal(snap.consistency, 'frozen-cbw');
  t.ok(snap.frozenMs !== null && snap.frozenMs < 1000, `frozen for ${snap.frozenMs} ms`);
  t.ok(took > 10 * snap.frozenMs!, `the read took ${took.toFixed(0)} ms, the freeze ${snap.frozenMs} ms`);
  t.ok(snap.preservedBytes !== null && snap.preservedBytes > 0, `the writer's blocks were preserved (${snap.preservedBytes} bytes)`);
  t.same(logs.filter((m) => /attach --via fuse/.test(m)), [], 'no long-freeze notice on this path');
  const during = writerLog(log).filter((e) => e.done < frozenAt + took && e.start > frozenAt);
  t.ok(during.length > 0, `the writer completed ${during.length} files while the snapshot was read`);
  t.same(preserveLeftovers(vol, a.fuse!.pid), [], 'the preserve file is gone');
  t.ok(await writeWithTimeout(path.join(mp, 'after'), 'x'), 'writable after the snapshot');

  const show = cli(['snapshot', 'show', snap.id, '--store', store]);
  t.equal(show.status, 0, show.stderr);
  t.match(show.out, /consistency +frozen-cbw \(filesystem frozen for [\d.]+ ms; [\d.]+ (KiB|MiB) preserved by copy-before-write while it was read\)/);

  // The snapshot: a clean filesystem holding exactly what was durable at the frozen moment.
  const restored = path.join(s.dir, 'restored.img');
  await restoreSnapshot(snap.id, { store, to: restored });
  const fsck = e2fsckClean(restored);
  t.ok(fsck.ok, `the snapshot is a clean filesystem:\n${fsck.out}`);
  const inSnap = new Set(debugfsLs(restored, '/w'));
  const entries = writerLog(log);
  const before = entries.filter((e) => e.done < frozenAt);
  const after = entries.filter((e) => e.start > frozenAt);
  t.ok(before.length >= 20 && after.length >= 20, `${before.length} files done before the freeze, ${after.length} started after`);
  t.same(before.filter((e) => !inSnap.has(`w${e.i}`)).map((e) => e.i), [], 'every file done before the freeze is in the snapshot');
  t.same(after.filter((e) => inSnap.has(`w${e.i}`)).map((e) => e.i), [], 'no file started after the freeze is');
  const last = before[before.length - 1];
  t.equal(debugfsCat(restored, `/w/w${last.i}`), CONTENT(last.i), 'the last file before the freeze is whole');
  t.equal(debugfsCat(restored, `/w/w${before[3].i}`), CONTENT(before[3].i));
  const ambiguous = entries.filter((e) => e.done >= frozenAt && e.start <= frozenAt);
  // one step straddles the freeze; two only if both touch its millisecond
  t.ok(ambiguous.length <= 2, `only the step being written at the freeze is undecided (${ambiguous.length})`);

  // The big file, overwritten in place all over the volume: each record holds the generation
  // of its last write done before the freeze (or the undecided one), never a later one.
  const dumped = path.join(s.dir, 'big.dump');
  shOk('debugfs', ['-R', `dump /big ${dumped}`, restored]);
  const big = fs.readFileSync(dumped);
  t.equal(big.length, records * RECORD);
  const allowed = new Map<number, Set<number>>();
  for (const e of before) allowed.set(recordOf(e.i, records), new Set([e.i + 1]));
  for (const e of ambiguous) allowed.get(recordOf(e.i, records))?.add(e.i + 1) ?? allowed.set(recordOf(e.i, records), new Set([0, e.i + 1]));
  const wrong: string[] = [];
  for (let k = 0; k < records; k++) {
    const gen = Number(/^gen (\d+) rec /.exec(big.toString('latin1', k * RECORD, k * RECORD + 32))?.[1] ?? -1);
    const ok = allowed.get(k) ?? new Set([0]);
    if (!ok.has(gen) || !big.subarray(k * RECORD, (k + 1) * RECORD).equals(record(gen, k))) wrong.push(`record ${k}: gen ${gen}, expected ${[...ok].join(' or ')}`);
  }
  t.same(wrong.slice(0, 5), [], `every record of the big file is as at the freeze (${wrong.length} wrong)`);
  const overwrittenAfter = new Set(after.map((e) => recordOf(e.i, records)));
  t.ok(overwrittenAfter.size >= 20, `${overwrittenAfter.size} records were overwritten after the freeze`);

  // The live volume has everything, later writes included.
  s.umount(mp);
  await detach(a.device);
  t.ok(e2fsckClean(vol).ok, 'the live volume is clean');
  const live = new Set(debugfsLs(vol, '/w'));
  t.same(entries.filter((e) => !live.has(`w${e.i}`)).map((e) => e.i), [], 'every file the writer completed is in the live volume');
  t.equal(debugfsCat(vol, `/w/w${after[after.length - 1].i}`), CONTENT(after[after.length - 1].i));
  t.same(preserveLeftovers(vol, a.fuse!.pid), [], 'nothing left beside the image');
});

t.test('the preserve limit exceeded: the snapshot fails clearly, the volume and its writes do not', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const vol = path.join(s.dir, 'vol.img');
  const store = path.join(s.dir, 'store');
  const { a, mp, log, w } = await mountedWithWriter(t, s, vol);

  await t.rejects(createSnapshot(vol, { store, cbwLimit: CBW_CHUNK }), {
    code: 'ENOSPC',
    message: /abandoned: the writes since the freeze needed more than the copy-before-write limit of 64\.0 KiB .*The volume and its writes are unaffected.*--cbw-limit/,
  });
  const failed = (await listSnapshots({ store })).snapshots;
  t.equal(failed.length, 1);
  t.equal(failed[0].state, 'error');
  t.match(failed[0].error, /copy-before-write limit/);
  t.same(preserveLeftovers(vol, a.fuse!.pid), [], 'the preserve file is gone');
  const n = writerLog(log).length;
  await waitFor('the writer to go on', () => writerLog(log).length >= n + 10);
  t.ok(await writeWithTimeout(path.join(mp, 'after'), 'x'), 'thawed and writable');

  // The CLI says the same, in one line, exit status 1.
  const r = cli(['snapshot', 'create', vol, '--store', store, '--cbw-limit', '64K']);
  t.equal(r.status, 1, r.stderr);
  t.match(r.stderr, /copy-before-write limit of 64\.0 KiB.*--cbw-limit/);

  await stopWriter(w);
  const entries = writerLog(log);
  s.umount(mp);
  await detach(a.device);
  t.ok(e2fsckClean(vol).ok, 'the volume is clean');
  const live = new Set(debugfsLs(vol, '/w'));
  t.same(entries.filter((e) => !live.has(`w${e.i}`)).map((e) => e.i), [], `all ${entries.length} files the writer completed are there`);
});

t.test('SIGKILL of the snapshot during its copy-before-write session: the server ends it, nothing is left', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const vol = path.join(s.dir, 'vol.img');
  const { a, mp, log, w } = await mountedWithWriter(t, s, vol);

  const child = spawn(process.execPath, [path.join(__dirname, '..', 'dist', 'src', 'cli', 'main.js'), 'snapshot', 'create', vol, '--store', path.join(s.dir, 'store')], { stdio: 'ignore' });
  const serverLog = () => fs.readFileSync(a.fuse!.log, 'utf8');
  await waitFor('the session to start', () => serverLog().includes('copy-before-write session started'));
  await waitFor('the server to hold its preserve file', () => preserveLeftovers(vol, a.fuse!.pid).length > 0);
  const gone = new Promise((r) => child.once('exit', r));
  child.kill('SIGKILL');
  await gone;
  await waitFor('the session to end', () => /copy-before-write session ended by the release of its control file/.test(serverLog()));
  t.same(preserveLeftovers(vol, a.fuse!.pid), [], 'the preserve file is gone with the session');
  t.ok(await writeWithTimeout(path.join(mp, 'after'), 'x'), 'writable');
  await stopWriter(w);
  s.umount(mp);
  await detach(a.device);
  t.ok(e2fsckClean(vol).ok, 'the volume is clean');
});

t.test('a plain loop attachment on a filesystem without reflinks: frozen for the read, with a notice', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const vol = path.join(s.dir, 'vol.img');
  makeExt4(vol, '64M');
  const a = await attach(vol);
  s.attached(a.device);
  const mp = path.join(s.dir, 'mnt');
  s.mount(a.device, mp);
  fs.writeFileSync(path.join(mp, 'f'), 'x');
  if (sh('findmnt', ['-n', '-o', 'FSTYPE', '--target', s.dir]).stdout.trim() !== 'ext4') {
    t.skip('the scratch directory is not on ext4');
    return;
  }
  const logs: string[] = [];
  const snap = await createSnapshot(vol, { store: path.join(s.dir, 'store'), onLog: (m) => logs.push(m) });
  t.equal(snap.consistency, 'frozen');
  t.equal(snap.preservedBytes, null);
  t.match(logs.join('\n'), /stays frozen for the whole read\. Attached with `disksnap attach --via fuse`, a snapshot freezes it for milliseconds/);
  const r = cli(['snapshot', 'create', vol, '--store', path.join(s.dir, 'store')]);
  t.equal(r.status, 0, r.stderr);
  t.match(r.stderr, /disksnap: .* from a plain loop device on a filesystem without reflinks: it stays frozen for the whole read\. Attached with `disksnap attach --via fuse`/);
  t.match(r.out, /; frozen \(filesystem frozen while it was read/);
});
