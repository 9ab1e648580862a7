/**
 * The thaw guard: `node thaw-guard.js MOUNTPOINT`, started by freeze() (freeze.ts) before it
 * freezes MOUNTPOINT. It says "ready" on stdout, then waits on stdin. The freezing process
 * writes "done" when it has thawed; if stdin instead ends without "done" — that process was
 * SIGKILLed or crashed while the filesystem was frozen — the guard thaws it, so that a frozen
 * filesystem never outlives the process that froze it. It runs detached (own process group),
 * so a ^C aimed at the freezing process does not kill the guard with it.
 */
import { native } from '../engine/native';
import { guardMain } from './guard-main';

guardMain('thaw-guard MOUNTPOINT', (mountpoint) => {
  try {
    native().fsThaw(mountpoint);
  } catch {
    // not frozen (any more)
  }
});
