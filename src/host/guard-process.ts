/**
 * The guard processes that undo a freeze when the process that froze dies (SIGKILL included):
 * thaw-guard.js for a host filesystem (freeze.ts), qga-thaw-guard.js for a guest frozen through
 * its agent (qga.ts). Each is started detached before the freeze, says "ready" on stdout and
 * waits on stdin: "done" means the thaw happened; stdin ending without it means the freezing
 * process is gone, and the guard thaws.
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
  const child = spawn(process.execPath, [script, arg], { stdio: ['pipe', 'pipe', 'ignore'], detached: true });
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

/** Tells a guard the thaw happened (it exits without doing anything). */
export function endGuard(guard: ChildProcess | undefined): void {
  if (!guard || !guard.stdin || guard.stdin.destroyed) return;
  try {
    guard.stdin.end('done\n');
  } catch {
    // the guard is gone already: there is nobody left to tell, and nothing it could still thaw
  }
}
