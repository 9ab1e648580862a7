/**
 * What a command loads at its start. The bundled CLI takes node:child_process through
 * src/engine/lazy-child-process.ts (esbuild's --alias in package.json's build), so a command
 * that starts no process does not load it, nor net and dgram with it (~5 ms of every command);
 * the commands that do start one (a FUSE attachment, a guard) get the real module through it.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CLI } from './helpers/cli';
import { MiB, makeImage } from '../fixtures/store/helpers';

/** Runs the executable with a preload that writes the builtins loaded by the exit to `out`. */
function runRecording(dir: string, args: string[]): { status: number | null; err: string; builtins: string[] } {
  const out = path.join(dir, `loaded-${args[0]}-${args[1] ?? ''}.json`);
  const probe = path.join(dir, 'probe.js');
  fs.writeFileSync(
    probe,
    `process.on('exit', () => require('fs').writeFileSync(process.env.LOADED_OUT, JSON.stringify(process.moduleLoadList.filter((m) => m.startsWith('NativeModule ')).map((m) => m.slice(13)))));\n`,
  );
  // (through sh, which sets NODE_OPTIONS itself: tap's process hooks add their own preload to
  // every child's NODE_OPTIONS, and that preload loads node:child_process)
  const r = spawnSync('sh', ['-c', 'NODE_OPTIONS="--require $PROBE" exec "$@"', 'sh', CLI, ...args], {
    env: { ...process.env, PROBE: probe, LOADED_OUT: out },
    encoding: 'utf8',
    timeout: 120_000,
  });
  if (r.error) throw r.error;
  return { status: r.status, err: r.stderr, builtins: JSON.parse(fs.readFileSync(out, 'utf8')) as string[] };
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
  }
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
