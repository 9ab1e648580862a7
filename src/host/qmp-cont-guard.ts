/**
 * The resume guard: `node qmp-cont-guard.js QMP_SOCKET`, started by a live checkpoint
 * (host/qmp-pause.ts, for src/differencing/live.ts) before it pauses the VM for the few
 * milliseconds its active node is moved. It says "ready" on stdout, then waits on stdin, where
 * the pausing process writes "armed" before each `stop`, "safe" after each `cont`, and "done"
 * at the end. If stdin ends without "done" (that process died, SIGKILL included, or gave up on
 * its own `cont`) while the last word was "armed", the guard connects to the QMP socket (QEMU
 * serves one client at a time: it retries until the dead process's connection is gone, for up
 * to 60 s) and sends `cont` if the VM is paused. A VM the user paused is never armed for, so
 * never resumed. It runs detached (own process group), so a ^C aimed at the pausing process
 * does not kill it too. The protocol is guard-process.ts's.
 */
import * as net from 'node:net';
import { guardMain, retryFor } from './guard-main';

const RETRY_MS = 60_000;

/**
 * One connection: greeting, qmp_capabilities, query-status, and `cont` only when the VM is not
 * running (a `cont` QEMU 7.2 did not need crashed it once, with a block job running). True once
 * QEMU answered the last of them.
 */
function contOnce(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createConnection(socketPath);
    let buf = '';
    let step: 'greeting' | 'capabilities' | 'status' | 'cont' = 'greeting';
    const end = (ok: boolean) => {
      clearTimeout(timer);
      s.destroy();
      resolve(ok);
    };
    const timer = setTimeout(() => end(false), 10_000);
    const send = (next: typeof step, execute: string) => {
      step = next;
      s.write(`{"execute":"${execute}"}\n`);
    };
    s.setEncoding('utf8');
    s.on('data', (chunk: string) => {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let msg: { QMP?: unknown; return?: { running?: boolean }; error?: unknown };
        try {
          msg = JSON.parse(line) as typeof msg;
        } catch {
          continue; // not a QMP message: nothing to act on
        }
        const answer = msg.return !== undefined || msg.error !== undefined;
        if (step === 'greeting' && msg.QMP !== undefined) send('capabilities', 'qmp_capabilities');
        else if (step === 'capabilities' && answer) send('status', 'query-status');
        else if (step === 'status' && answer) {
          if (msg.return?.running === false) send('cont', 'cont');
          else end(true); // running (or QEMU cannot say): nothing to resume
        } else if (step === 'cont' && answer) end(true); // an error: the VM cannot run (it quit): nothing left to do
      }
    });
    s.on('error', () => end(false));
    s.on('close', () => end(false));
  });
}

/** Whether the last word the pausing process said was "armed" (a pause in force). */
export function armed(said: string): boolean {
  const words = said.split(/\s+/);
  return words.lastIndexOf('armed') > words.lastIndexOf('safe');
}

if (require.main === module) {
  guardMain('qmp-cont-guard QMP_SOCKET', async (socketPath, said) => {
    if (armed(said)) await retryFor(RETRY_MS, () => contOnce(socketPath));
  });
}
