/**
 * A client for QMP, the QEMU Machine Protocol, over a unix socket (`-qmp unix:PATH,server=on,
 * wait=off`, or libvirt's monitor socket when libvirt is not using it).
 *
 *   connect ──> greeting {"QMP": {version, capabilities}}
 *           ──> {"execute": "qmp_capabilities"} <── {"return": {}}     (command mode)
 *   execute ──> {"execute": C, "arguments": A, "id": N}
 *           <── {"return": R, "id": N} | {"error": {class, desc}, "id": N}
 *   events  <── {"event": E, "data": D, "timestamp": {...}}            (any time)
 *
 * Messages are JSON objects, one per line. Replies carry the id of their command, so several
 * commands may be in flight. Events are numbered as they arrive and the last EVENT_LOG are
 * kept: waitEvent(pred, {after}) looks at the ones already received after a sequence number
 * first, so "start a job, then wait for its completion event" has no window in which the
 * event could be missed (take `eventSeq` before the command).
 *
 * Errors are DisksnapError with code:
 *   EQMP        QEMU answered with an error; the message has its class and description
 *               (`qmpClass` on the error object too)
 *   ETIMEDOUT   no answer / event within the time allowed
 *   ECONNRESET  the socket closed (QEMU exited) with commands or waits outstanding
 *   EPROTO      the other end does not speak QMP (no greeting, a line that is not JSON)
 * and connection errors keep their errno code (ENOENT, ECONNREFUSED) and the socket path; every
 * message names the socket.
 *
 * A connection that QEMU drops before the handshake is done (greeting, qmp_capabilities) is
 * made again, up to CONNECT_ATTEMPTS times: nothing has been asked of QEMU yet. Why: a QEMU
 * whose previous client was just killed can drop the next one while it tears the old one down.
 * (The `read ECONNRESET` of a re-run of `checkpoint delete --qmp` right after a SIGKILL, once
 * taken for that, was QEMU crashing: see namedNodes below.) Command ids name this process and
 * connection, not only a counter: an answer QEMU still owed a killed client can never be taken
 * for the answer to one of ours.
 */
import type * as net from 'node:net';
import { DisksnapError, fromNodeError } from '../engine/errors';

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
  /** order of arrival on this connection, from 1 */
  seq: number;
}

export interface QmpOptions {
  /** for the connection and the greeting, and the default for each command (ms) */
  timeoutMs?: number;
}

interface Pending {
  command: string;
  resolve(value: unknown): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

interface Waiter {
  pred(e: QmpEvent): boolean;
  resolve(e: QmpEvent): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout;
}

/** How many events are kept for waitEvent's look-back. */
const EVENT_LOG = 1000;
const DEFAULT_TIMEOUT_MS = 30_000;
/** Connections tried when QEMU drops one before the handshake is done, and the pause between. */
export const CONNECT_ATTEMPTS = 3;
const RECONNECT_PAUSE_MS = 100;
/** Connections made by this process, for command ids. */
let connections = 0;

export class QmpError extends DisksnapError {
  /** QEMU's error class (GenericError, DeviceNotFound, ...) */
  readonly qmpClass: string;
  readonly command: string;
  constructor(command: string, qmpClass: string, desc: string, socketPath: string) {
    super(`QMP ${command}: ${qmpClass}: ${desc}`, 'EQMP', undefined, socketPath);
    this.qmpClass = qmpClass;
    this.command = command;
  }
}

export class QmpClient {
  readonly socketPath: string;
  /** QEMU's version from the greeting, e.g. {major: 7, minor: 2, micro: 0} */
  version: { major: number; minor: number; micro: number } = { major: 0, minor: 0, micro: 0 };
  /** the sequence number of the last event received */
  eventSeq = 0;
  private sock: net.Socket;
  private buf = '';
  private nextId = 1;
  /** `disksnap-<pid>.<connection>-`: ids unique across processes and connections */
  private readonly idPrefix = `disksnap-${process.pid}.${++connections}-`;
  private pending = new Map<string, Pending>();
  private waiters = new Set<Waiter>();
  private events: QmpEvent[] = [];
  private listeners = new Set<(e: QmpEvent) => void>();
  private closed: Error | undefined;
  private defaultTimeout: number;
  private greeting: ((g: Record<string, unknown>) => void) | undefined;

  private constructor(sock: net.Socket, socketPath: string, timeoutMs: number) {
    this.sock = sock;
    this.socketPath = socketPath;
    this.defaultTimeout = timeoutMs;
    sock.setEncoding('utf8');
    sock.on('data', (chunk: string) => this.onData(chunk));
    sock.on('close', () => this.fail(new DisksnapError(`QMP ${socketPath}: connection closed`, 'ECONNRESET', undefined, socketPath)));
    sock.on('error', (e) => this.fail(socketError(e, socketPath)));
  }

  /**
   * Connects, reads the greeting and enters command mode; a connection dropped before that is
   * made again (CONNECT_ATTEMPTS in all, within timeoutMs).
   */
  static async connect(socketPath: string, opts: QmpOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const until = Date.now() + timeoutMs;
    for (let attempt = 1; ; attempt++) {
      try {
        return await QmpClient.connectOnce(socketPath, Math.max(1, until - Date.now()), timeoutMs);
      } catch (e) {
        const dropped = e instanceof DisksnapError && (e.code === 'ECONNRESET' || e.code === 'EPIPE');
        if (!dropped || attempt >= CONNECT_ATTEMPTS || Date.now() + RECONNECT_PAUSE_MS >= until) {
          if (dropped && attempt > 1) (e as Error).message += ` (${attempt} connections, each dropped before the QMP handshake was done)`;
          throw e;
        }
        await new Promise((res) => setTimeout(res, RECONNECT_PAUSE_MS));
      }
    }
  }

  private static async connectOnce(socketPath: string, timeoutMs: number, commandTimeoutMs: number): Promise<QmpClient> {
    const sock = await connectUnix(socketPath, timeoutMs, 'QMP');
    const client = new QmpClient(sock, socketPath, commandTimeoutMs);
    try {
      const greeting = await client.readGreeting(timeoutMs);
      const v = (greeting.QMP as { version?: { qemu?: QmpClient['version'] } } | undefined)?.version?.qemu;
      if (v) client.version = v;
      await client.execute('qmp_capabilities', undefined, { timeoutMs });
    } catch (e) {
      client.close();
      throw e;
    }
    return client;
  }

  private readGreeting(timeoutMs: number): Promise<Record<string, unknown>> {
    return new Promise((resolve, reject) => {
      // a connection that closes before its greeting rejects through this waiter
      const closeWaiter: Waiter = {
        pred: () => false,
        resolve: () => undefined,
        reject: (e) => {
          clearTimeout(closeWaiter.timer);
          reject(e);
        },
        timer: setTimeout(() => {
          this.greeting = undefined;
          this.waiters.delete(closeWaiter);
          reject(new DisksnapError(`QMP ${this.socketPath}: no greeting within ${timeoutMs} ms`, 'ETIMEDOUT', undefined, this.socketPath));
        }, timeoutMs),
      };
      this.waiters.add(closeWaiter);
      this.greeting = (g) => {
        clearTimeout(closeWaiter.timer);
        this.waiters.delete(closeWaiter);
        this.greeting = undefined;
        if (typeof g.QMP !== 'object') {
          reject(new DisksnapError(`QMP ${this.socketPath}: the first message is not a QMP greeting`, 'EPROTO', undefined, this.socketPath));
        } else resolve(g);
      };
    });
  }

  /**
   * Runs one command and resolves with its `return` value; rejects with QmpError (EQMP)
   * when QEMU answers with an error.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.closed) return Promise.reject(this.closed);
    const id = `${this.idPrefix}${this.nextId++}`;
    const msg: Record<string, unknown> = { execute: command, id };
    if (args !== undefined) msg.arguments = args;
    const timeoutMs = opts.timeoutMs ?? this.defaultTimeout;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new DisksnapError(`QMP ${command}: no answer within ${timeoutMs} ms`, 'ETIMEDOUT', undefined, this.socketPath));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      this.sock.write(JSON.stringify(msg) + '\n');
    });
  }

  /**
   * Resolves with the first event after sequence number `after` (default: any kept event)
   * for which pred holds.
   */
  waitEvent(pred: (e: QmpEvent) => boolean, opts: { after?: number; timeoutMs?: number; what?: string } = {}): Promise<QmpEvent> {
    const after = opts.after ?? 0;
    for (const e of this.events) if (e.seq > after && pred(e)) return Promise.resolve(e);
    if (this.closed) return Promise.reject(this.closed);
    const timeoutMs = opts.timeoutMs ?? this.defaultTimeout;
    return new Promise<QmpEvent>((resolve, reject) => {
      const w: Waiter = {
        pred,
        resolve,
        reject,
        timer: setTimeout(() => {
          this.waiters.delete(w);
          reject(new DisksnapError(`QMP ${this.socketPath}: no ${opts.what ?? 'matching event'} within ${timeoutMs} ms`, 'ETIMEDOUT', undefined, this.socketPath));
        }, timeoutMs),
      };
      this.waiters.add(w);
    });
  }

  /** Calls fn for every event from now on; returns a function that stops it. */
  onEvent(fn: (e: QmpEvent) => void): () => void {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }

  /** Events kept so far, oldest first. */
  recentEvents(): QmpEvent[] {
    return this.events.slice();
  }

  get isClosed(): boolean {
    return this.closed !== undefined;
  }

  close(): void {
    this.fail(new DisksnapError(`QMP ${this.socketPath}: connection closed by disksnap`, 'ECONNRESET', undefined, this.socketPath));
    this.sock.destroy();
  }

  private onData(chunk: string): void {
    this.buf += chunk;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line === '') continue;
      let msg: Record<string, unknown>;
      try {
        msg = JSON.parse(line) as Record<string, unknown>;
      } catch {
        // the line itself is the evidence; it goes into the error
        this.fail(new DisksnapError(`QMP ${this.socketPath}: not JSON: ${line.slice(0, 200)}`, 'EPROTO', undefined, this.socketPath));
        this.sock.destroy();
        return;
      }
      this.dispatch(msg);
    }
  }

  private dispatch(msg: Record<string, unknown>): void {
    if (this.greeting) {
      this.greeting(msg);
      return;
    }
    if (typeof msg.event === 'string') {
      const e: QmpEvent = {
        event: msg.event,
        data: (msg.data as Record<string, unknown>) ?? {},
        timestamp: msg.timestamp as QmpEvent['timestamp'],
        seq: ++this.eventSeq,
      };
      this.events.push(e);
      if (this.events.length > EVENT_LOG) this.events.shift();
      for (const fn of this.listeners) fn(e);
      for (const w of [...this.waiters]) {
        if (w.pred(e)) {
          this.waiters.delete(w);
          clearTimeout(w.timer);
          w.resolve(e);
        }
      }
      return;
    }
    const id = typeof msg.id === 'string' ? msg.id : undefined;
    const p = id !== undefined ? this.pending.get(id) : undefined;
    if (!p || id === undefined) return; // an answer to a command that already timed out
    this.pending.delete(id);
    clearTimeout(p.timer);
    if (msg.error) {
      const err = msg.error as { class?: string; desc?: string };
      p.reject(new QmpError(p.command, err.class ?? 'GenericError', err.desc ?? 'no description', this.socketPath));
    } else p.resolve(msg.return);
  }

  private fail(err: Error): void {
    if (this.closed) return;
    this.closed = err;
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
    for (const w of this.waiters) {
      clearTimeout(w.timer);
      w.reject(err);
    }
    this.waiters.clear();
  }
}

export function isQmpError(e: unknown, qmpClass?: string): e is QmpError {
  return e instanceof QmpError && (qmpClass === undefined || e.qmpClass === qmpClass);
}

/** A socket error as a DisksnapError whose message names the socket (node's says only `read ECONNRESET`). */
export function socketError(e: unknown, socketPath: string, label = 'QMP'): DisksnapError {
  const err = fromNodeError(e, socketPath);
  const why = err.code === 'ECONNRESET' || err.code === 'EPIPE' ? 'the connection was reset by the other end' : 'socket error';
  return new DisksnapError(`${label} ${socketPath}: ${why} (${err.message})`, err.code, err.errno, socketPath);
}

/** A connection to a unix socket within timeoutMs (QMP, the guest agent); `label` names it in errors. */
export function connectUnix(socketPath: string, timeoutMs: number, label: string): Promise<net.Socket> {
  return new Promise<net.Socket>((resolve, reject) => {
    // (node:net loaded here, at the first connection: ~2 ms of every command otherwise, most of which talk to no QEMU)
    const s = (require('node:net') as typeof net).createConnection(socketPath);
    const timer = setTimeout(() => {
      s.destroy();
      reject(new DisksnapError(`${label} ${socketPath}: no connection within ${timeoutMs} ms`, 'ETIMEDOUT', undefined, socketPath));
    }, timeoutMs);
    s.once('connect', () => {
      clearTimeout(timer);
      s.removeAllListeners('error');
      resolve(s);
    });
    s.once('error', (e) => {
      clearTimeout(timer);
      reject(fromNodeError(e, socketPath));
    });
  });
}

/** QEMU's block graph (x-debug-query-block-graph): nodes, and edges by role ('file', 'backing', ...). */
export interface BlockGraph {
  nodes: { id: number; name: string; type?: 'block-backend' | 'block-job' | 'block-driver' }[];
  edges: { parent: number; child: number; name: string }[];
}

export function blockGraph(qmp: QmpClient): Promise<BlockGraph> {
  return qmp.execute<BlockGraph>('x-debug-query-block-graph');
}

/** The name of `node`'s child in role `edge` in a block graph, or undefined. */
export function graphChild(g: BlockGraph, node: string, edge: string): string | undefined {
  const id = g.nodes.find((n) => n.name === node)?.id;
  const e = g.edges.find((x) => x.parent === id && x.name === edge);
  return g.nodes.find((n) => n.id === e?.child)?.name;
}

/** The name of `node`'s child in role `edge` ('file', 'backing') in QEMU's block graph, or undefined. */
export async function childNode(qmp: QmpClient, node: string, edge: string): Promise<string | undefined> {
  return graphChild(await blockGraph(qmp), node, edge);
}

/**
 * The node QEMU uses as `top`'s backing, by node name (QEMU's filenames can be stale after a
 * live checkpoint renamed files under it); ENOTFOUND when there is none.
 */
export async function backingNode(qmp: QmpClient, top: string): Promise<string> {
  const child = await childNode(qmp, top, 'backing');
  if (child === undefined) throw new DisksnapError(`the QEMU at ${qmp.socketPath} shows no backing node under ${top}`, 'ENOTFOUND', undefined, qmp.socketPath);
  return child;
}

/** Job states a job passes through on its way to `concluded` (from `running`, within moments). */
const CONCLUDING = new Set(['waiting', 'pending', 'aborting']);
const JOB_POLL_MS = 100;

/**
 * QEMU's named block nodes (query-named-block-nodes, flat), asked for only while no block job
 * is concluded and not dismissed, or about to be: QEMU 7.2 (Debian 12's) crashes with SIGSEGV
 * on this query while a block-stream job that ended has not been dismissed (4 of 4 runs; after
 * job-dismiss 0 of 5; query-block and x-debug-query-block-graph did not crash either way; while
 * the job ran, hundreds of these queries did not either). It surfaced as the re-run of a
 * `checkpoint delete --qmp` killed in its job getting `read ECONNRESET` from a QEMU that had
 * died (8 runs in 30 of that test on a loaded machine). So: disksnap's own jobs (ids
 * disksnap-*, left by a killed run: the callers judge by QEMU's graph what they did) are
 * waited for while they run and dismissed; another client's concluded or concluding ones are
 * waited for (their owner dismisses them) up to `timeoutMs`, then EBUSY names them. Another
 * client's running job is not waited for: it may run for hours (a backup), and only its end
 * during the query itself is left to chance.
 */
export async function namedNodes<T>(qmp: QmpClient, timeoutMs = 60_000): Promise<T[]> {
  const until = Date.now() + timeoutMs;
  const ours = (j: { id: string }) => j.id.startsWith('disksnap-');
  for (;;) {
    const jobs = await qmp.execute<{ id: string; status: string }[]>('query-jobs');
    for (const j of jobs.filter((x) => ours(x) && x.status === 'concluded')) {
      await qmp.execute('job-dismiss', { id: j.id }).catch(() => undefined); // gone meanwhile: fine
    }
    const waitFor = jobs.filter((j) => CONCLUDING.has(j.status) || (ours(j) ? j.status === 'created' || j.status === 'running' : j.status === 'concluded'));
    if (waitFor.length === 0) return qmp.execute<T[]>('query-named-block-nodes', { flat: true });
    if (Date.now() >= until) {
      const list = waitFor.map((j) => `${j.id} (${j.status})`).join(', ');
      throw new DisksnapError(
        `the QEMU at ${qmp.socketPath} still has block job ${list} after ${timeoutMs} ms; disksnap reads QEMU's node list only once no job is concluding or concluded and not dismissed (QEMU 7.2 crashes otherwise): retry once it is dismissed`,
        'EBUSY',
        undefined,
        qmp.socketPath,
      );
    }
    await new Promise((res) => setTimeout(res, JOB_POLL_MS));
  }
}
