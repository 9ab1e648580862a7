/**
 * The guest thaw guard: `node qga-thaw-guard.js AGENT_SOCKET`, started by guestFreeze()
 * (qga.ts) before it freezes a guest through qemu-guest-agent. It says "ready" on stdout, then
 * waits on stdin. The freezing process writes "done" once the guest is thawed; if stdin ends
 * without "done" (that process died while the guest was frozen, or gave up on its own thaw),
 * the guard connects to the agent's socket (QEMU serves one client at a time: it retries until
 * the dead process's connection is gone, for up to 60 s) and sends guest-fsfreeze-thaw. It runs
 * detached (own process group), so a ^C aimed at the freezing process does not kill it too.
 */
import * as net from 'node:net';
import { guardMain, retryFor } from './guard-main';

const RETRY_MS = 60_000;

function thawOnce(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createConnection(socketPath);
    let buf = '';
    const timer = setTimeout(() => {
      s.destroy();
      resolve(false);
    }, 10_000);
    s.setEncoding('latin1');
    s.on('connect', () => {
      // 0xFF resets the agent's parser; the sync skips stale answers; then the thaw
      s.write(Buffer.concat([Buffer.from([0xff]), Buffer.from('{"execute":"guest-sync-delimited","arguments":{"id":4242}}\n')]));
    });
    s.on('data', (chunk: string) => {
      buf += chunk;
      if (buf.includes('4242') && !buf.includes('thaw-sent')) {
        buf = 'thaw-sent';
        s.write('{"execute":"guest-fsfreeze-thaw"}\n');
      } else if (buf.startsWith('thaw-sent') && /"return"|"error"/.test(buf)) {
        clearTimeout(timer);
        s.destroy();
        resolve(true);
      }
    });
    s.on('error', () => {
      clearTimeout(timer);
      resolve(false);
    });
    s.on('close', () => {
      clearTimeout(timer);
      resolve(false);
    });
  });
}

guardMain('qga-thaw-guard AGENT_SOCKET', (socketPath) => retryFor(RETRY_MS, () => thawOnce(socketPath)));
