/**
 * qemu-guest-agent (QGA) from the host: a client for the agent's socket, and a guest freeze
 * that always ends.
 *
 * The agent runs inside the guest and talks JSON over a virtio-serial port (name
 * org.qemu.guest_agent.0) or a plain serial port; QEMU connects that port to a chardev, usually
 * a unix socket (`-chardev socket,path=S,server=on,wait=off,id=qga0`). The protocol is QMP's
 * without greeting, ids or events: one command at a time, one answer each. QEMU's socket
 * chardev serves one client at a time, and a client that went away may have left half a
 * command in the agent's parser or an answer in the port, so every connection starts with a
 * 0xFF byte (the agent's parser resets on it) and `guest-sync-delimited` with a random id:
 * what comes before the 0xFF-prefixed answer carrying that id is stale and skipped.
 *
 * guestFreeze(): `guest-fsfreeze-freeze` (the agent freezes every mounted filesystem of the
 * guest: FIFREEZE after a sync), with the nets that end the freeze on every path:
 *   - the caller thaws in `finally` (GuestFreeze.thaw(), idempotent);
 *   - a guard process (qga-thaw-guard.ts), started and listening before the freeze, watches a
 *     pipe from this process; when the pipe breaks without "done" (this process SIGKILLed,
 *     crashed, or killed by SIGINT/SIGTERM/SIGHUP) it connects to the agent's socket and sends
 *     `guest-fsfreeze-thaw`. On a catchable signal or exit, this process drops its own agent
 *     connection first (exit-cleanup.ts), so that QEMU hands the socket to the guard at once.
 * No guard, no freeze: if the guard cannot start, guestFreeze() throws before freezing.
 *
 * Errors: DisksnapError EQGA (the agent answered with an error: its class and description),
 * ETIMEDOUT (no answer in time), ECONNRESET (the socket closed), errno codes of the connect.
 */
import * as fs from 'node:fs';
import * as net from 'node:net';
import { randomInt } from 'node:crypto';
import type { ChildProcess } from 'node:child_process';
import { DisksnapError } from '../engine/errors';
import { untilExit } from './exit-cleanup';
import { endGuard, startGuard } from './guard-process';
import { connectUnix, socketError } from './qmp';

interface Waiting {
  resolve(v: Record<string, unknown>): void;
  reject(e: Error): void;
}

export class QgaClient {
  readonly socketPath: string;
  private sock: net.Socket;
  private buf = '';
  private waiting: Waiting | undefined;
  private closed: Error | undefined;
  /** commands are sent one at a time: each waits for the previous answer */
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(sock: net.Socket, socketPath: string) {
    this.sock = sock;
    this.socketPath = socketPath;
    sock.setEncoding('latin1');
    sock.on('data', (chunk: string) => this.onData(chunk));
    sock.on('close', () => this.fail(new DisksnapError(`guest agent ${socketPath}: connection closed`, 'ECONNRESET', undefined, socketPath)));
    sock.on('error', (e) => this.fail(socketError(e, socketPath, 'guest agent')));
  }

  /** Connects and synchronises (guest-sync-delimited) within timeoutMs: a guest without a running agent times out here. */
  static async connect(socketPath: string, timeoutMs: number): Promise<QgaClient> {
    const sock = await connectUnix(socketPath, timeoutMs, 'guest agent');
    const c = new QgaClient(sock, socketPath);
    try {
      const id = randomInt(1, 2 ** 31);
      sock.write(Buffer.from([0xff]));
      const r = await c.execute<number>('guest-sync-delimited', { id }, timeoutMs, (m) => m.return === id);
      if (r !== id) throw new DisksnapError(`guest agent ${socketPath}: guest-sync answered ${String(r)}, not ${id}`, 'EPROTO', undefined, socketPath);
    } catch (e) {
      c.close();
      throw e;
    }
    return c;
  }

  /**
   * Runs one command; resolves with its `return`. `accept` picks the answer (default: the
   * first message after the command): stale answers before it are skipped.
   */
  execute<T = unknown>(command: string, args: Record<string, unknown> | undefined, timeoutMs: number, accept?: (m: Record<string, unknown>) => boolean): Promise<T> {
    const run = async (): Promise<T> => {
      if (this.closed) throw this.closed;
      const msg: Record<string, unknown> = { execute: command };
      if (args) msg.arguments = args;
      const answer = await new Promise<Record<string, unknown>>((resolve, reject) => {
        const timer = setTimeout(() => {
          this.waiting = undefined;
          reject(new DisksnapError(`guest agent ${this.socketPath}: no answer to ${command} within ${timeoutMs} ms`, 'ETIMEDOUT', undefined, this.socketPath));
        }, timeoutMs);
        this.waiting = {
          resolve: (m) => {
            if (accept && !accept(m)) return; // stale (or the parser's complaint about the 0xFF): keep waiting
            clearTimeout(timer);
            this.waiting = undefined;
            resolve(m);
          },
          reject: (e) => {
            clearTimeout(timer);
            this.waiting = undefined;
            reject(e);
          },
        };
        this.sock.write(JSON.stringify(msg) + '\n');
      });
      if (answer.error) {
        const err = answer.error as { class?: string; desc?: string };
        throw new DisksnapError(`guest agent ${command}: ${err.class ?? 'GenericError'}: ${err.desc ?? 'no description'}`, 'EQGA', undefined, this.socketPath);
      }
      return answer.return as T;
    };
    const p = this.queue.then(run, run);
    this.queue = p.catch(() => undefined);
    return p;
  }

  get isClosed(): boolean {
    return this.closed !== undefined;
  }

  close(): void {
    this.fail(new DisksnapError(`guest agent ${this.socketPath}: connection closed by disksnap`, 'ECONNRESET', undefined, this.socketPath));
    this.sock.destroy();
  }

  private onData(chunk: string): void {
    this.buf += chunk;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      // 0xFF starts a delimited answer; anything before it on the line is stale
      const raw = this.buf.slice(0, nl);
      this.buf = this.buf.slice(nl + 1);
      const line = raw.slice(raw.lastIndexOf('\xff') + 1).trim();
      if (line === '') continue;
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(Buffer.from(line, 'latin1').toString('utf8')) as Record<string, unknown>;
      } catch {
        continue; // a fragment left by an earlier client: the sync skips it
      }
      this.waiting?.resolve(msg);
    }
  }

  private fail(err: Error): void {
    if (this.closed) return;
    this.closed = err;
    this.waiting?.reject(err);
  }
}

/** Connects and pings the agent within timeoutMs; the reason it cannot be used otherwise. */
export async function pingAgent(socketPath: string, timeoutMs: number): Promise<{ client: QgaClient } | { reason: string }> {
  if (!fs.existsSync(socketPath)) return { reason: `no guest agent socket at ${socketPath}` };
  let client: QgaClient | undefined;
  try {
    client = await QgaClient.connect(socketPath, timeoutMs);
    await client.execute('guest-ping', undefined, timeoutMs);
    return { client };
  } catch (e) {
    client?.close();
    return { reason: `the guest agent at ${socketPath} did not answer guest-ping within ${timeoutMs} ms (${(e as Error).message})` };
  }
}

export interface GuestFreeze {
  /** how many filesystems the agent froze */
  filesystems: number;
  /** when the freeze command was sent (performance.now() ms) */
  startedAt: number;
  /** guest-fsfreeze-thaw (once; later calls return the first result); resolves with the frozen time in ms */
  thaw(): Promise<number>;
}

async function startQgaGuard(socketPath: string): Promise<ChildProcess> {
  const child = await startGuard('qga-thaw-guard.js', socketPath);
  if (!child) throw new DisksnapError(`the guest thaw guard (qga-thaw-guard.js) is missing or did not start: not freezing the guest without it`, 'EIO');
  return child;
}

/**
 * Freezes the guest's filesystems through the agent (see the module note for the nets).
 * `freezeTimeoutMs` bounds the freeze command itself (the guest syncs first); if it fails or
 * times out, a thaw is sent before the error is thrown.
 */
export async function guestFreeze(client: QgaClient, freezeTimeoutMs: number): Promise<GuestFreeze> {
  const guard = await startQgaGuard(client.socketPath);
  // on a signal or exit: drop our connection so that QEMU gives the socket to the guard, and
  // leave the guard's pipe to break as this process dies (the guard then thaws)
  const forget = untilExit(() => client.close());
  const startedAt = performance.now();
  let thawed: Promise<number> | undefined;
  const thaw = (): Promise<number> => {
    thawed ??= (async () => {
      try {
        await client.execute('guest-fsfreeze-thaw', undefined, 30_000);
        void endGuard(guard); // thawed: the guard has nothing to do (a "done" lost at exit: it thaws a thawed guest)
      } catch (e) {
        // our thaw did not get through: drop the connection and let the guard try
        client.close();
        guard.stdin?.destroy();
        throw new DisksnapError(`guest agent: the thaw failed (${(e as Error).message}); the thaw guard retries it`, 'EQGA', undefined, client.socketPath);
      } finally {
        forget();
      }
      return performance.now() - startedAt;
    })();
    return thawed;
  };
  let n: number;
  try {
    n = await client.execute<number>('guest-fsfreeze-freeze', undefined, freezeTimeoutMs);
  } catch (e) {
    await thaw().catch(() => undefined); // a freeze that timed out may still happen: thaw anyway
    throw e;
  }
  return { filesystems: n, startedAt, thaw };
}
