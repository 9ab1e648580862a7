/**
 * Progress of long commands, terminal or not (src/cli/progress.ts): plain lines with amount,
 * rate and time left in a log, JSON status lines with --json (stdout keeping its one
 * document), a bar with rate and ETA on a terminal (through script(1)), nothing with -q,
 * --quiet or DISKSNAP_QUIET=1, and nothing for a command shorter than the interval.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { cli } from './helpers/cli';
import { missing } from './helpers/tools';

const MiB = 2 ** 20;
const CLI = path.join(__dirname, '..', 'dist', 'src', 'cli', 'main.js');

function volume(dir: string): string {
  const v = path.join(dir, 'vol.img');
  const fd = fs.openSync(v, 'w');
  for (let i = 0; i < 48; i++) fs.writeSync(fd, Buffer.alloc(MiB, i + 1), 0, MiB, i * MiB);
  fs.closeSync(fd);
  return v;
}

t.test('not a terminal: plain lines with the amount, rate and time left, ending at 100%', async (t) => {
  const dir = t.testdir();
  const v = volume(dir);
  const r = cli(['snapshot', 'create', v, '--store', path.join(dir, 's')], { env: { DISKSNAP_PROGRESS_INTERVAL: '0' } });
  t.equal(r.status, 0, r.stderr);
  const lines = r.stderr.trim().split('\n');
  t.ok(lines.length >= 2, `${lines.length} progress lines`);
  for (const l of lines) t.match(l, /^snapshot: \d+% \([\d.]+ [KMG]?i?B of 48\.0 MiB(, [\d.]+ MB\/s)?(, [\d.]+ (s|min \d+ s) left)?\)$/, l);
  t.match(lines[lines.length - 1], /^snapshot: 100% \(48\.0 MiB of 48\.0 MiB/, 'the last line is where it got to');
  t.match(r.out, /completed/, 'the result on stdout, progress on stderr');

  const c = path.join(dir, 'c.qcow2');
  t.equal(cli(['diff', 'create', v, c]).status, 0);
  t.equal(cli(['write', c, '0'], { input: Buffer.alloc(4 * MiB, 7) }).status, 0);
  const commit = cli(['diff', 'commit', c], { env: { DISKSNAP_PROGRESS_INTERVAL: '0' } });
  t.equal(commit.status, 0, commit.stderr);
  t.match(commit.stderr, /^commit: \d+% \(/m, 'diff commit reports progress the same way');
});

t.test('--json: JSON status lines on stderr (as restic), one document on stdout', async (t) => {
  const dir = t.testdir();
  const v = volume(dir);
  const r = cli(['snapshot', 'create', v, '--store', path.join(dir, 's'), '--json'], { env: { DISKSNAP_PROGRESS_INTERVAL: '0' } });
  t.equal(r.status, 0, r.stderr);
  t.equal((JSON.parse(r.out) as { state: string }).state, 'completed', 'stdout is the one result document');
  const events = r.stderr.trim().split('\n').map((l) => JSON.parse(l) as { message_type: string; percent_done: number; bytes_done: number; total_bytes: number; seconds_elapsed: number });
  t.ok(events.length >= 2, `${events.length} events`);
  for (const e of events) {
    t.equal(e.message_type, 'status');
    t.ok(e.percent_done >= 0 && e.percent_done <= 1, `percent_done ${e.percent_done} in [0, 1]`);
    t.equal(e.total_bytes, 48 * MiB);
  }
  t.ok(events.every((e, i) => i === 0 || e.bytes_done >= events[i - 1].bytes_done), 'bytes_done never goes back');
  t.equal(events[events.length - 1].percent_done, 1, 'the last event is the end');
});

t.test('quiet, and short commands: nothing on stderr', async (t) => {
  const dir = t.testdir();
  const v = volume(dir);
  const store = path.join(dir, 's');
  for (const [what, args, env] of [
    ['-q', ['-q', 'snapshot', 'create', v, '--store', store], { DISKSNAP_PROGRESS_INTERVAL: '0' }],
    ['--quiet after the command', ['snapshot', 'create', v, '--store', store, '--quiet'], { DISKSNAP_PROGRESS_INTERVAL: '0' }],
    ['DISKSNAP_QUIET=1', ['snapshot', 'create', v, '--store', store, '--json'], { DISKSNAP_PROGRESS_INTERVAL: '0', DISKSNAP_QUIET: '1' }],
    ['a command shorter than the 5 s interval', ['snapshot', 'create', v, '--store', store], {}],
  ] as const) {
    const r = cli([...args], { env: { ...env } });
    t.equal(r.status, 0, r.stderr);
    t.equal(r.stderr, '', `${what}: no progress`);
  }
});

t.test('on a terminal: a bar with the amount, rate and ETA', { skip: missing({ commands: ['script'] }) }, async (t) => {
  const dir = t.testdir();
  const v = volume(dir);
  const cmd = `'${process.execPath}' '${CLI}' snapshot create '${v}' --store '${path.join(dir, 's')}'`;
  const r = spawnSync('script', ['-qec', cmd, '/dev/null'], { encoding: 'utf8', env: { ...process.env, COLUMNS: '160' } });
  t.equal(r.status, 0, r.stderr);
  const frames = r.stdout.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, '\n').split(/[\r\n]+/).filter((l) => l.startsWith('snapshot ['));
  t.ok(frames.length >= 1, `${frames.length} frames of the bar`);
  for (const f of frames) t.match(f, /^snapshot \[[█░]+\] \d+% [\d.]+ [KMG]?i?B\/48\.0 MiB [\d.]+ MB\/s ETA ([\d.]+ s|\d+ min \d+ s|\?)$/, f);
  t.notMatch(r.stdout, /NaN|NF/, 'no NaN in the ETA');
});
