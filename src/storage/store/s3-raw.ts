/**
 * Whole-object GETs and PUTs over plain TCP sockets of our own, for the S3 wire
 * (./s3-wire.ts) on `http:` endpoints: each response is read straight from the socket (`net`
 * with `onread`, one reusable read buffer per connection), a GET's body into the caller's buffer.
 *
 * Why: through node:http, every body chunk of a response becomes a new Buffer (the HTTP
 * parser copies each socket read), goes through a stream, and is copied again into the object's
 * buffer. A 1 GiB restore made ~16,000 such chunks, V8 counts each as external memory, and the
 * garbage set off 26 full collections and ~60 scavenges per restore; the parser, the streams
 * and the collections took most of the main thread. 1,024 GETs of 512 KiB from the bench's
 * Ceph gateway, 32 connections (a prototype of this, the same requests): 1.95 s and 1.40 s of
 * CPU through node:http, 1.25-1.3 s and 0.52 s here. A PUT through node:http costs its
 * request object, header checks, the agent's bookkeeping and a response stream: 164 PUTs of
 * 64 KiB (an incremental's granules) to the same gateway took 0.19 s of CPU that way, 0.11 s
 * here (head and body in one writev).
 *
 * What it speaks: HTTP/1.1, one request at a time per connection, kept alive and reused;
 * bodies with a Content-Length (what S3 servers send for objects) or chunked (some servers'
 * error answers). A response it cannot read (a body that runs to the connection's close, a
 * 1xx, another transfer-encoding) throws RAW_UNSUPPORTED before anything is handed over: the
 * caller then sends that request, and every later one, through node:http. A connection that
 * sent a body and got an answer other than 2xx is not reused (the server may have answered
 * without reading the body). Not for HEAD (its Content-Length has no body behind it). Socket
 * errors and connections closed mid-response reject with their code (ECONNRESET where node
 * gives none), which ./s3.ts retries like any broken connection.
 */
import * as net from 'node:net';

/** Thrown (as `code`) for a response this client does not read: use node:http instead. */
export const RAW_UNSUPPORTED = 'ERAWHTTP';

/** The most a response head may take. */
const MAX_HEAD = 64 * 1024;
/** Each connection's read buffer: what one read() may take. */
const READ_BUFFER = 256 * 1024;

export interface RawAnswer {
  status: number;
  /** header names in lower case */
  headers: Map<string, string>;
  /** the body: in the caller's buffer when it fitted */
  body: Buffer;
}

interface Pending {
  into: Buffer | undefined;
  /** the request carried a body */
  sentBody: boolean;
  resolve: (a: RawAnswer) => void;
  reject: (e: Error) => void;
  /** bytes of the head so far, until it is complete */
  head: Buffer | undefined;
  status: number;
  headers: Map<string, string>;
  /** the body's length once the head is read (-1 before; CHUNKED for a chunked body) */
  length: number;
  body: Buffer;
  got: number;
  /** a chunked body: what comes next, the bytes left of this chunk, a line read so far */
  next: 'size' | 'data' | 'crlf' | 'trailer';
  left: number;
  line: string;
}

/** Pending.length of a body in chunked transfer-encoding. */
const CHUNKED = -2;

function failure(message: string, code: string): Error {
  return Object.assign(new Error(message), { code });
}

/** One keep-alive connection. */
class Connection {
  readonly socket: net.Socket;
  private pending: Pending | undefined;
  /** false once the connection must not carry another request */
  reusable = true;

  constructor(host: string, port: number, private readonly timeoutMs: number, private readonly done: (c: Connection) => void) {
    const buffer = Buffer.allocUnsafe(READ_BUFFER);
    this.socket = net.connect({ host, port, onread: { buffer, callback: (n: number, buf: Uint8Array) => (this.onRead(buf as Buffer, n), true) } });
    this.socket.setNoDelay(true);
    this.socket.on('error', (e: NodeJS.ErrnoException) => this.end(e));
    this.socket.on('close', () => this.end(failure('connection closed by the server', 'ECONNRESET')));
    this.socket.on('timeout', () => this.socket.destroy(failure(`no answer for ${this.timeoutMs} ms (socket timed out)`, 'ETIMEDOUT')));
  }

  send(head: string, body: Buffer | undefined, into: Buffer | undefined): Promise<RawAnswer> {
    return new Promise<RawAnswer>((resolve, reject) => {
      const sentBody = !!body?.length;
      this.pending = { into, sentBody, resolve, reject, head: undefined, status: 0, headers: new Map(), length: -1, body: Buffer.alloc(0), got: 0, next: 'size', left: 0, line: '' };
      this.socket.ref();
      this.socket.setTimeout(this.timeoutMs);
      // head and body in one writev
      this.socket.cork();
      this.socket.write(head, 'latin1');
      if (sentBody) this.socket.write(body!);
      this.socket.uncork();
    });
  }

  /** The connection broke (or closed): the request in flight, if any, fails with `e`. */
  private end(e: Error): void {
    this.reusable = false;
    const p = this.pending;
    this.pending = undefined;
    if (p) {
      const where = p.length === -1 ? 'before the response head was complete' : `after ${p.got}${p.length >= 0 ? ` of ${p.length}` : ''} body bytes`;
      p.reject(failure(`${e.message} (${where})`, (e as NodeJS.ErrnoException).code ?? 'ECONNRESET'));
    }
    this.socket.destroy();
    this.done(this);
  }

  private onRead(buf: Buffer, n: number): void {
    const p = this.pending;
    if (!p) {
      // bytes nobody asked for: the connection is out of step
      this.end(failure('unexpected bytes from the server', 'EPROTO'));
      return;
    }
    let data = buf.subarray(0, n);
    if (p.length === -1) {
      const all: Buffer = p.head ? Buffer.concat([p.head, data]) : data;
      const at = all.indexOf('\r\n\r\n');
      if (at < 0) {
        if (all.length > MAX_HEAD) return this.end(failure(`response head longer than ${MAX_HEAD} bytes`, RAW_UNSUPPORTED));
        p.head = Buffer.from(all); // (buf is reused by the next read)
        return;
      }
      const problem = this.readHead(p, all.toString('latin1', 0, at));
      if (problem) return this.end(failure(problem, RAW_UNSUPPORTED));
      data = all.subarray(at + 4);
    }
    if (p.length === CHUNKED) return this.readChunked(p, data);
    const take = Math.min(data.length, p.length - p.got);
    data.copy(p.body, p.got, 0, take);
    p.got += take;
    if (take < data.length) this.reusable = false; // more than the body: out of step
    if (p.got === p.length) this.complete(p);
  }

  /** Takes what `data` holds of a chunked body: sizes, chunks, their CRLFs, the trailer. */
  private readChunked(p: Pending, data: Buffer): void {
    let i = 0;
    while (i < data.length) {
      if (p.next === 'data') {
        const take = Math.min(p.left, data.length - i);
        this.append(p, data.subarray(i, i + take));
        i += take;
        p.left -= take;
        if (p.left === 0) p.next = 'crlf';
        continue;
      }
      const nl = data.indexOf(10, i);
      const end = nl < 0 ? data.length : nl + 1;
      p.line += data.toString('latin1', i, end);
      i = end;
      if (p.line.length > 4096) return this.end(failure('a chunked body line longer than 4096 bytes', 'EPROTO'));
      if (nl < 0) return;
      const line = p.line.replace(/\r?\n$/, '');
      p.line = '';
      if (p.next === 'crlf') {
        if (line !== '') return this.end(failure('a chunk not followed by CRLF', 'EPROTO'));
        p.next = 'size';
      } else if (p.next === 'size') {
        const m = /^([0-9a-fA-F]{1,12})(;.*)?$/.exec(line.trim());
        if (!m) return this.end(failure(`a bad chunk size line ${JSON.stringify(line.slice(0, 40))}`, 'EPROTO'));
        p.left = parseInt(m[1], 16);
        p.next = p.left === 0 ? 'trailer' : 'data';
      } else if (line === '') {
        if (i < data.length) this.reusable = false; // more than the body: out of step
        return this.complete(p);
      }
    }
  }

  /** Adds bytes to a body of unknown length, in `into` while they fit. */
  private append(p: Pending, bytes: Buffer): void {
    if (p.got + bytes.length > p.body.length) {
      const bigger = Buffer.allocUnsafe(Math.max(2 * p.body.length, p.got + bytes.length, 64 * 1024));
      p.body.copy(bigger, 0, 0, p.got);
      p.body = bigger;
    }
    bytes.copy(p.body, p.got);
    p.got += bytes.length;
  }

  private complete(p: Pending): void {
    this.pending = undefined;
    // an answer to a body it may not have read: the rest of the body could follow on this connection
    if (p.sentBody && (p.status < 200 || p.status >= 300)) this.reusable = false;
    this.socket.setTimeout(0);
    this.socket.unref();
    p.resolve({ status: p.status, headers: p.headers, body: p.body.subarray(0, p.got) });
    this.done(this);
  }

  /** Parses the head into `p` and sizes its body; a reason when this client cannot read it. */
  private readHead(p: Pending, head: string): string | undefined {
    const lines = head.split('\r\n');
    const m = /^HTTP\/1\.([01]) (\d{3})/.exec(lines[0]);
    if (!m) return `not an HTTP/1.x status line: ${JSON.stringify(lines[0].slice(0, 80))}`;
    p.status = Number(m[2]);
    if (m[1] === '0') this.reusable = false;
    for (let i = 1; i < lines.length; i++) {
      const c = lines[i].indexOf(':');
      if (c > 0) p.headers.set(lines[i].slice(0, c).trim().toLowerCase(), lines[i].slice(c + 1).trim());
    }
    if (p.status < 200) return `an interim ${p.status} answer`;
    if (/\bclose\b/i.test(p.headers.get('connection') ?? '')) this.reusable = false;
    const te = p.headers.get('transfer-encoding');
    if (te !== undefined) {
      if (te.toLowerCase() !== 'chunked') return `a body in transfer-encoding ${te}`;
      p.length = CHUNKED;
      p.body = p.into ?? Buffer.alloc(0);
      return undefined;
    }
    if (p.status === 204 || p.status === 304) {
      p.length = 0;
      return undefined;
    }
    const len = p.headers.get('content-length');
    if (len === undefined || !/^\d+$/.test(len)) return 'a body without Content-Length';
    p.length = Number(len);
    p.body = p.into && p.length <= p.into.length ? p.into : Buffer.allocUnsafe(p.length);
    return undefined;
  }
}

/** Keep-alive connections to one host:port, each carrying one request at a time. */
export class RawHttp {
  private idle: Connection[] = [];
  private readonly open = new Set<Connection>();

  constructor(
    private readonly host: string,
    private readonly port: number,
    private readonly timeoutMs: number,
  ) {}

  /**
   * Sends `method path` with `headers` (already signed, with the body's Content-Length) and
   * `body`, and reads the answer whole, into `into` when its body fits. Rejects with the
   * socket's error code on a broken connection, and with RAW_UNSUPPORTED for a response this
   * client does not read.
   */
  request(method: 'GET' | 'PUT', path: string, headers: Record<string, string>, body: Buffer | undefined, into: Buffer | undefined): Promise<RawAnswer> {
    let request = `${method} ${path} HTTP/1.1\r\n`;
    for (const [k, v] of Object.entries(headers)) {
      if (/[\r\n]/.test(k + v)) return Promise.reject(failure(`header ${k} holds a line break`, 'EINVAL'));
      request += `${k}: ${v}\r\n`;
    }
    request += '\r\n';
    let c = this.idle.pop();
    while (c && (!c.reusable || c.socket.destroyed)) c = this.idle.pop();
    if (!c) {
      c = new Connection(this.host, this.port, this.timeoutMs, (done) => this.release(done));
      this.open.add(c);
    }
    return c.send(request, body, into);
  }

  private release(c: Connection): void {
    if (c.reusable && !c.socket.destroyed) this.idle.push(c);
    else {
      c.socket.destroy();
      this.open.delete(c);
    }
  }

  destroy(): void {
    for (const c of this.open) c.socket.destroy();
    this.open.clear();
    this.idle = [];
  }
}
