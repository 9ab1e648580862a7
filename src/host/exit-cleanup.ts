/**
 * The one signal and exit path of the host layer: cleanups that must run however this process
 * ends (a filesystem this process froze is thawed, a point-in-time clone is removed).
 *
 *   untilExit(action) ─▶ registered ─▶ dispose() ......... the normal path: the caller did it
 *                                   └▶ SIGINT/SIGTERM/SIGHUP: every action, handlers removed,
 *                                      the signal re-raised (default action: the process dies
 *                                      of it, with the status a shell expects)
 *                                   └▶ process 'exit' (process.exit() anywhere): every action
 *
 * Actions are synchronous (they run from 'exit', where nothing asynchronous completes) and
 * best effort. The handlers are installed only while an action is registered, so a library
 * user's own handlers see the process as it was. Re-raising instead of waiting for "somebody
 * else" to end the process: libraries such as signal-exit wait for us in turn, which would
 * deadlock. SIGKILL runs nothing; freeze.ts covers that case with its guard process, and
 * point-in-time.ts reaps clones of dead processes on the next run.
 */

const SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
const actions = new Set<() => void>();
let installed = false;

function runAll(): void {
  const pending = [...actions];
  actions.clear();
  for (const action of pending) {
    try {
      action();
    } catch {
      // on the way out nothing can report it, and the other actions must still run
    }
  }
}

function onSignal(signal: NodeJS.Signals): void {
  runAll();
  uninstall();
  process.kill(process.pid, signal);
}

function onExit(): void {
  runAll();
}

function install(): void {
  if (installed) return;
  installed = true;
  for (const s of SIGNALS) process.on(s, onSignal);
  process.on('exit', onExit);
}

function uninstall(): void {
  if (!installed) return;
  installed = false;
  for (const s of SIGNALS) process.removeListener(s, onSignal);
  process.removeListener('exit', onExit);
}

/**
 * Runs `action` if the process is interrupted by a catchable signal or exits before the
 * returned function is called; calling it forgets the action (idempotent).
 */
export function untilExit(action: () => void): () => void {
  actions.add(action);
  install();
  return () => {
    actions.delete(action);
    if (!actions.size) uninstall();
  };
}
