/**
 * The guard side of guard-process.ts's protocol, shared by the guard scripts (thaw-guard.ts,
 * qga-thaw-guard.ts, qmp-cont-guard.ts): "ready" on stdout, then stdin. "done" on stdin means
 * the process that started the guard undid its change itself; stdin ending without it (that
 * process died, SIGKILL included, or gave up on its own undo) runs `undo` with all that was said
 * on stdin (a guard may take other words, e.g. whether the change is in force), then exits.
 */
export function guardMain(usage: string, undo: (arg: string, said: string) => Promise<void> | void): void {
  const arg = process.argv[2];
  if (!arg) {
    process.stderr.write(`usage: ${usage}\n`);
    process.exit(2);
  }
  let text = '';
  let done = false;
  let finishing = false;
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (chunk: string) => {
    text += chunk;
    if (text.includes('done')) done = true;
  });
  const finish = () => {
    if (finishing) return;
    finishing = true;
    if (done) process.exit(0);
    void Promise.resolve()
      .then(() => undo(arg, text))
      .catch(() => undefined) // best effort: nobody is left to report to
      .finally(() => process.exit(0));
  };
  process.stdin.on('end', finish);
  process.stdin.on('close', finish);
  process.stdin.on('error', finish);
  process.stdout.write('ready\n');
}

/** Calls `once` every 200 ms until it returns true, for at most `ms`. */
export async function retryFor(ms: number, once: () => Promise<boolean>): Promise<void> {
  const until = Date.now() + ms;
  while (Date.now() < until) {
    if (await once()) return;
    await new Promise((r) => setTimeout(r, 200));
  }
}
