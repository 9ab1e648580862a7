/**
 * What a command loads at its start. The bundled CLI takes node:child_process through
 * src/engine/lazy-child-process.ts (esbuild's --alias in package.json's build), so a command
 * that starts no process does not load it, nor net and dgram with it (~5 ms of every command);
 * the commands that do start one (a FUSE attachment, a guard) get the real module through it.
 * Output goes to descriptors 1 and 2 by write(2) (src/engine/stdio.ts): with stdout and stderr
 * pipes, as here, net (the streams node makes for pipes) is not loaded. The node modules a
 * command loads come before V8's flag is set (src/cli/main.ts PRELOAD), so that node's compiled
 * code for them is used.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CLI } from './helpers/cli';
import { MiB, makeImage } from '../fixtures/store/helpers';

/** Runs the executable with a preload that writes the builtins loaded by the exit to `out`. */
function runRecording(dir: string, args: string[]): { status: number | null; err: string; builtins: string[]; afterFlag: string[] | null } {
  const out = path.join(dir, `loaded-${args[0]}-${args[1] ?? ''}.json`);
  const probe = path.join(dir, 'probe.js');
  fs.writeFileSync(
    probe,
    [
      // (and which of them came after V8's flag was set: those node compiles from source)
      "const v8 = require('v8'), set = v8.setFlagsFromString; let at = -1;",
      'v8.setFlagsFromString = function (f) { at = process.moduleLoadList.length; return set.call(this, f); };',
      "const names = (l) => l.filter((m) => m.startsWith('NativeModule ')).map((m) => m.slice(13));",
      "process.on('exit', () => require('fs').writeFileSync(process.env.LOADED_OUT, JSON.stringify({ all: names(process.moduleLoadList), after: at < 0 ? null : names(process.moduleLoadList.slice(at)) })));",
      '',
    ].join('\n'),
  );
  // (through sh, which sets NODE_OPTIONS itself: tap's process hooks add their own preload to
  // every child's NODE_OPTIONS, and that preload loads node:child_process)
  const r = spawnSync('sh', ['-c', 'NODE_OPTIONS="--require $PROBE" exec "$@"', 'sh', CLI, ...args], {
    env: { ...process.env, PROBE: probe, LOADED_OUT: out },
    encoding: 'utf8',
    timeout: 120_000,
  });
  if (r.error) throw r.error;
  const loaded = JSON.parse(fs.readFileSync(out, 'utf8')) as { all: string[]; after: string[] | null };
  return { status: r.status, err: r.stderr, builtins: loaded.all, afterFlag: loaded.after };
}

t.test('a snapshot of a raw file, and a listing, load no node:child_process', async (t) => {
  const dir = t.testdir();
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 4 * MiB, [{ offset: 0, length: MiB, seed: 1 }]);
  const store = path.join(dir, 'store');
  for (const args of [
    ['snapshot', 'create', vol, '--store', store, '--quiet'],
    ['snapshot', 'list', '--store', store],
  ]) {
    const r = runRecording(dir, args);
    t.equal(r.status, 0, `${args.slice(0, 2).join(' ')} ${r.err}`);
    t.ok(r.builtins.includes('fs') && r.builtins.includes('crypto'), 'the probe saw the builtins the command loads');
    t.notOk(r.builtins.includes('child_process'), `${args.slice(0, 2).join(' ')}: node:child_process not loaded`);
    for (const m of ['net', 'tty']) t.notOk(r.builtins.includes(m), `${args.slice(0, 2).join(' ')}: node:${m} not loaded`);
  }
  const r = runRecording(dir, ['snapshot', 'create', vol, '--store', store, '--json']);
  t.equal(r.status, 0, `snapshot create --json ${r.err}`);
  for (const m of ['net', 'tty']) t.notOk(r.builtins.includes(m), `snapshot create --json: node:${m} not loaded`);
  t.ok(r.afterFlag, 'V8\'s flag was set');
  const late = (r.afterFlag ?? []).filter((m) => !m.startsWith('internal/fs/rimraf'));
  t.same(late, [], 'no node module but fs.rm\'s was loaded after the flag');
});

t.test('output by write(2): a reader that goes away ends the command quietly; a slow one gets every byte', async (t) => {
  const dir = t.testdir();
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 8 * MiB, [{ offset: 0, length: 8 * MiB, seed: 7 }]);
  // 8 MiB to a pipe whose reader stops after 10 bytes: EPIPE on a write, exit 0, nothing on stderr
  const piped = spawnSync('bash', ['-c', '"$@" | head -c 10 > /dev/null; echo "${PIPESTATUS[0]}"', 'bash', CLI, 'read', vol, '0', String(8 * MiB)], { encoding: 'utf8', timeout: 60_000 });
  t.equal(piped.stdout.trim(), '0', 'the command exits 0 when its reader goes away');
  t.equal(piped.stderr, '', 'and says nothing');
  // a reader that starts late: the pipe fills, and the writes wait for it
  const slow = spawnSync('bash', ['-c', '"$@" | { sleep 0.5; cat; }', 'bash', CLI, 'read', vol, '0', String(8 * MiB)], { maxBuffer: 64 * MiB, timeout: 60_000 });
  t.equal(slow.status, 0, `read to a slow reader: ${slow.stderr}`);
  t.ok(slow.stdout.equals(fs.readFileSync(vol)), 'every byte arrived, in order');
});

t.test('the lazy node:child_process is the real module at first use', async (t) => {
  const lazy = require('../dist/src/engine/lazy-child-process.js') as typeof import('node:child_process');
  const real = require('node:child_process') as typeof import('node:child_process');
  t.equal(lazy.spawn, real.spawn, 'spawn');
  t.equal(lazy.spawnSync, real.spawnSync, 'spawnSync');
  t.ok('execFile' in lazy, '`in` answers from the module');
  t.same(Object.keys(lazy).sort(), Object.keys(real).sort(), 'and its keys');
  const r = lazy.spawnSync('sh', ['-c', 'echo ok'], { encoding: 'utf8' });
  t.equal(r.stdout, 'ok\n', 'a process started through it runs');
});
