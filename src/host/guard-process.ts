/**
 * The guard processes that undo a freeze or a pause when the process that made it dies
 * (SIGKILL included): thaw-guard.js for a host filesystem (freeze.ts), qga-thaw-guard.js for a
 * guest frozen through its agent (qga.ts), qmp-cont-guard.js for a VM paused over a live
 * checkpoint's node move (differencing/live.ts). Each is started detached before the change,
 * says "ready" on stdout and waits on stdin: "done" means the change was undone; stdin ending
 * without it means the process is gone, and the guard undoes it (guard-main.ts is their side).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn, ChildProcess } from 'node:child_process';
import { PACKAGE_ROOT } from '../engine/root';

/** The guard script `name` (e.g. 'thaw-guard.js'): beside this module, else in dist/. */
function guardScript(name: string): string | undefined {
  const here = path.join(__dirname, name);
  if (fs.existsSync(here)) return here;
  const compiled = path.join(PACKAGE_ROOT, 'dist', 'src', 'host', name);
  return fs.existsSync(compiled) ? compiled : undefined;
}

/** Starts guard `name` with `arg` and waits (10 s at most) for its "ready"; undefined if it is missing or did not start. */
export async function startGuard(name: string, arg: string): Promise<ChildProcess | undefined> {
  const script = guardScript(name);
  if (!script) return undefined;
  // without the parent's NODE_OPTIONS: loaders meant for it (a test runner's) only slow the guard's
  // start; nor NODE_EXTRA_CA_CERTS, which node parses as it starts (../engine/extra-ca.ts): no TLS here
  const env = { ...process.env, NODE_OPTIONS: '', NODE_EXTRA_CA_CERTS: undefined };
  const child = spawn(process.execPath, [script, arg], { stdio: ['pipe', 'pipe', 'ignore'], detached: true, env });
  const ok = await new Promise<boolean>((resolve) => {
    const timer = setTimeout(() => resolve(false), 10_000);
    child.stdout!.once('data', () => {
      clearTimeout(timer);
      resolve(true);
    });
    child.once('exit', () => {
      clearTimeout(timer);
      resolve(false);
    });
  });
  if (!ok) {
    child.kill('SIGKILL');
    return undefined;
  }
  child.unref();
  (child.stdout as unknown as { unref?: () => void }).unref?.();
  (child.stdin as unknown as { unref?: () => void }).unref?.();
  return child;
}

/**
 * Tells a guard the change was undone (it exits without doing anything). Resolves once "done"
 * is handed to the pipe: a process that exits right after must wait for it, or the guard sees
 * its stdin end without "done" and undoes a second time.
 */
export function endGuard(guard: ChildProcess | undefined): Promise<void> {
  const stdin = guard?.stdin;
  if (!stdin || stdin.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    try {
      stdin.end('done\n', () => resolve());
      stdin.once('error', () => resolve()); // the guard is gone already: nobody left to tell
    } catch {
      resolve(); // the guard is gone already: nothing it could still undo
    }
  });
}
