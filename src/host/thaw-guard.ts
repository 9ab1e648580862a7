/**
 * The thaw guard: `node thaw-guard.js MOUNTPOINT`, started by freeze() (freeze.ts) before it
 * freezes MOUNTPOINT. It says "ready" on stdout, then waits on stdin. The freezing process
 * writes "done" when it has thawed; if stdin instead ends without "done" — that process was
 * SIGKILLed or crashed while the filesystem was frozen — the guard thaws it, so that a frozen
 * filesystem never outlives the process that froze it. It runs detached (own process group),
 * so a ^C aimed at the freezing process does not kill the guard with it.
 */
import { native } from '../engine/native';

function main(): void {
  const mountpoint = process.argv[2];
  if (!mountpoint) {
    process.stderr.write('usage: thaw-guard MOUNTPOINT\n');
    process.exit(2);
  }
  let text = '';
  let done = false;
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (chunk: string) => {
    text += chunk;
    if (text.includes('done')) done = true;
  });
  const finish = () => {
    if (!done) {
      try {
        native().fsThaw(mountpoint);
      } catch {
        // not frozen (any more)
      }
    }
    process.exit(0);
  };
  process.stdin.on('end', finish);
  process.stdin.on('close', finish);
  process.stdin.on('error', finish);
  process.stdout.write('ready\n');
}

main();
