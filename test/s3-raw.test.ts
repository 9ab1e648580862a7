/**
 * The raw-socket GETs and PUTs of the S3 wire (src/storage/store/s3-raw.ts) against TCP servers of the
 * test's own that answer byte by byte as told: heads and bodies split anywhere, keep-alive
 * reuse, chunked bodies, `Connection: close`, connections cut mid-body, silence, and answers
 * the client must leave to node:http (S3Wire.getInto's fallback). Against the real gateway the
 * same path carries every block GET of test/s3-*.test.ts.
 */
import t, { Test } from 'tap';
import * as http from 'node:http';
import * as net from 'node:net';
import type { AddressInfo } from 'node:net';
import { createHash, randomBytes } from 'node:crypto';
import { RAW_UNSUPPORTED, RawHttp } from '../src/storage/store/s3-raw';
import { S3Wire } from '../src/storage/store/s3-wire';

type Answer = (request: string, socket: net.Socket, n: number) => void;

/** A TCP server calling `answer` for each request head it receives (n counts requests). */
async function server(t: Test, answer: Answer): Promise<{ port: number; connections: () => number; requests: () => string[] }> {
  let connections = 0;
  const requests: string[] = [];
  const s = net.createServer((socket) => {
    connections++;
    let buf = '';
    socket.on('data', (d) => {
      buf += d.toString('latin1');
      let at: number;
      while ((at = buf.indexOf('\r\n\r\n')) >= 0) {
        const head = buf.slice(0, at);
        buf = buf.slice(at + 4);
        requests.push(head);
        answer(head, socket, requests.length);
      }
    });
    socket.on('error', () => undefined);
  });
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  t.teardown(() => new Promise<void>((r) => (s.close(() => r()), setImmediate(() => s.unref()))));
  return { port: (s.address() as AddressInfo).port, connections: () => connections, requests: () => requests };
}

/** Writes `bytes` in pieces of `step` bytes, one per tick. */
async function trickle(socket: net.Socket, bytes: Buffer, step: number): Promise<void> {
  for (let i = 0; i < bytes.length; i += step) {
    socket.write(bytes.subarray(i, i + step));
    await new Promise((r) => setTimeout(r, 1));
  }
}

const okHead = (len: number, extra = '') => Buffer.from(`HTTP/1.1 200 OK\r\nContent-Length: ${len}\r\nETag: "x"\r\n${extra}\r\n`, 'latin1');

t.test('heads and bodies split anywhere arrive whole, in the caller buffer, over one kept-alive connection', async (t) => {
  const bodies = [randomBytes(70_000), randomBytes(1), randomBytes(300_000), Buffer.alloc(0)];
  const srv = await server(t, (head, socket, n) => {
    const b = bodies[(n - 1) % bodies.length];
    // the first: its head 7 bytes at a time, then its body in pieces that end anywhere
    if (n === 1) void trickle(socket, okHead(b.length), 7).then(() => trickle(socket, b, 4093));
    else void trickle(socket, Buffer.concat([okHead(b.length), b]), 65_536);
  });
  const raw = new RawHttp('127.0.0.1', srv.port, 5000);
  t.teardown(() => raw.destroy());
  const into = Buffer.alloc(512 * 1024);
  for (let i = 0; i < bodies.length; i++) {
    const a = await raw.request('GET', `/bucket/k${i}`, { host: `127.0.0.1:${srv.port}`, authorization: 'AWS4 x' }, undefined, into);
    t.equal(a.status, 200);
    t.equal(a.headers.get('etag'), '"x"', 'header names in lower case');
    t.ok(a.body.equals(bodies[i]), `body ${i} (${bodies[i].length} bytes) is byte for byte the one sent`);
    t.equal(a.body.buffer, into.buffer, 'read into the caller buffer');
  }
  t.equal(srv.connections(), 1, 'one connection carried all four requests');
  t.match(srv.requests()[0], /^GET \/bucket\/k0 HTTP\/1\.1\r\nhost: 127\.0\.0\.1:\d+\r\nauthorization: AWS4 x$/);
  const small = await raw.request('GET', '/bucket/big', {}, undefined, Buffer.alloc(10)); // (the server's first body again)
  t.equal(small.body.length, 70_000, 'a body larger than the buffer gets one of its own');
  t.ok(small.body.equals(bodies[0]));
});

t.test('a chunked body (extensions, trailer) is decoded; a chunk size that is not hex is EPROTO', async (t) => {
  const part = [randomBytes(5000), randomBytes(3), randomBytes(70_000)];
  const srv = await server(t, (head, socket, n) => {
    if (n === 2) return void socket.write('HTTP/1.1 503 Slow Down\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n');
    const chunks = part.map((p, i) => Buffer.concat([Buffer.from(`${p.length.toString(16)}${i === 1 ? ';ext=1' : ''}\r\n`), p, Buffer.from('\r\n')]));
    void trickle(socket, Buffer.concat([Buffer.from('HTTP/1.1 503 Slow Down\r\nTransfer-Encoding: chunked\r\n\r\n'), ...chunks, Buffer.from('0\r\nX-Trailer: 1\r\n\r\n')]), 13);
  });
  const raw = new RawHttp('127.0.0.1', srv.port, 5000);
  t.teardown(() => raw.destroy());
  const a = await raw.request('GET', '/b/k', {}, undefined, undefined);
  t.equal(a.status, 503);
  t.ok(a.body.equals(Buffer.concat(part)), 'the chunks, in order, without sizes or CRLFs');
  await t.rejects(raw.request('GET', '/b/k', {}, undefined, undefined), { code: 'EPROTO', message: /chunk size/ });
});

t.test('a connection cut mid-body, a server gone silent, and Connection: close', async (t) => {
  const srv = await server(t, (head, socket, n) => {
    if (n === 1) {
      socket.write(Buffer.concat([okHead(1000), randomBytes(400)]));
      setTimeout(() => socket.destroy(), 20);
    } else if (n === 2) {
      // silence
    } else {
      socket.write(Buffer.concat([okHead(3, 'Connection: close\r\n'), Buffer.from('abc')]));
    }
  });
  const raw = new RawHttp('127.0.0.1', srv.port, 300);
  t.teardown(() => raw.destroy());
  await t.rejects(raw.request('GET', '/b/1', {}, undefined, undefined), { code: 'ECONNRESET', message: /after 400 of 1000 body bytes/ });
  await t.rejects(raw.request('GET', '/b/2', {}, undefined, undefined), { code: 'ETIMEDOUT', message: /before the response head was complete/ });
  t.equal((await raw.request('GET', '/b/3', {}, undefined, undefined)).body.toString(), 'abc');
  t.equal((await raw.request('GET', '/b/4', {}, undefined, undefined)).body.toString(), 'abc');
  t.equal(srv.connections(), 4, 'a broken, a silent and a closed connection are never reused');
  await t.rejects(raw.request('GET', '/b/5', { 'x-evil': 'a\r\nb' }, undefined, undefined), { code: 'EINVAL' });
});

t.test('answers raw sockets do not read: RAW_UNSUPPORTED, and S3Wire.getInto sends the request through node:http', async (t) => {
  const body = randomBytes(20_000);
  const srv = await server(t, (head, socket, n) => {
    if (n === 1) socket.end(Buffer.concat([Buffer.from('HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n'), body])); // length: until close
    else socket.write(Buffer.concat([okHead(body.length), body]));
  });
  const raw = new RawHttp('127.0.0.1', srv.port, 5000);
  t.teardown(() => raw.destroy());
  await t.rejects(raw.request('GET', '/b/k', {}, undefined, undefined), { code: RAW_UNSUPPORTED, message: /without Content-Length/ });

  const srv2 = await server(t, (head, socket, n) => {
    if (n === 1) socket.end(Buffer.concat([Buffer.from('HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n'), body]));
    else socket.write(Buffer.concat([okHead(body.length), body]));
  });
  const agent = new http.Agent({ keepAlive: true });
  const wire = new S3Wire({
    endpoint: new URL(`http://127.0.0.1:${srv2.port}`),
    bucket: 'bucket',
    agent,
    timeoutMs: 5000,
    credentials: async () => ({ accessKeyId: 'AKID', secretAccessKey: 'secret' }),
    region: async () => 'us-east-1',
  });
  t.teardown(() => (wire.destroy(), agent.destroy()));
  t.ok((await wire.getInto('key', undefined)).equals(body), 'the same bytes, through node:http');
  t.ok((await wire.getInto('key', undefined)).equals(body), 'and again');
  t.equal(srv2.requests().length, 3, 'one raw request, then node:http for this one and every later one');
  t.match(srv2.requests()[0], /authorization: AWS4-HMAC-SHA256 Credential=AKID\//i, 'the raw request is signed');
  const errSrv = await server(t, (head, socket) => {
    const xml = '<?xml version="1.0"?><Error><Code>NoSuchKey</Code><Message>gone</Message></Error>';
    socket.write(`HTTP/1.1 404 Not Found\r\nContent-Length: ${xml.length}\r\n\r\n${xml}`);
  });
  const wire2 = new S3Wire({ endpoint: new URL(`http://127.0.0.1:${errSrv.port}`), bucket: 'b', agent, timeoutMs: 5000, credentials: async () => ({ accessKeyId: 'A', secretAccessKey: 's' }), region: async () => 'r' });
  t.teardown(() => wire2.destroy());
  await t.rejects(wire2.getInto('key', undefined), { name: 'NoSuchKey', message: 'gone', $metadata: { httpStatusCode: 404 } }, 'an error answer has the shape classify reads');
});

/**
 * A TCP server that reads each request's head and its Content-Length body, then calls
 * `answer`; `early(head, n)` true answers at the head, before the body, and ignores the rest
 * of that connection.
 */
async function bodyServer(t: Test, answer: (head: string, body: Buffer, socket: net.Socket, n: number) => void, early?: (head: string, n: number) => boolean) {
  let connections = 0;
  const got: Array<{ head: string; body: Buffer; connection: number }> = [];
  const s = net.createServer((socket) => {
    const connection = ++connections;
    let buf = Buffer.alloc(0);
    let deaf = false;
    socket.on('data', (d: Buffer) => {
      if (deaf) return;
      buf = Buffer.concat([buf, d]);
      for (;;) {
        const at = buf.indexOf('\r\n\r\n');
        if (at < 0) return;
        const head = buf.toString('latin1', 0, at);
        const len = Number(/\r\ncontent-length: *(\d+)/i.exec(head)?.[1] ?? 0);
        if (early?.(head, got.length + 1)) {
          got.push({ head, body: Buffer.alloc(0), connection });
          deaf = true;
          answer(head, Buffer.alloc(0), socket, got.length);
          return;
        }
        if (buf.length < at + 4 + len) return;
        const body = Buffer.from(buf.subarray(at + 4, at + 4 + len));
        buf = buf.subarray(at + 4 + len);
        got.push({ head, body, connection });
        answer(head, body, socket, got.length);
      }
    });
    socket.on('error', () => undefined);
  });
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  t.teardown(() => new Promise<void>((r) => (s.close(() => r()), setImmediate(() => s.unref()))));
  return { port: (s.address() as AddressInfo).port, got };
}

function wireTo(t: Test, port: number): S3Wire {
  const agent = new http.Agent({ keepAlive: true });
  const wire = new S3Wire({ endpoint: new URL(`http://127.0.0.1:${port}`), bucket: 'bucket', agent, timeoutMs: 5000, credentials: async () => ({ accessKeyId: 'AKID', secretAccessKey: 'secret' }), region: async () => 'us-east-1' });
  t.teardown(() => (wire.destroy(), agent.destroy()));
  return wire;
}

t.test('PUTs on raw sockets: signed, every body byte-exact at the server, the ETag back, one kept-alive connection', async (t) => {
  const srv = await bodyServer(t, (head, body, socket, n) => socket.write(`HTTP/1.1 200 OK\r\nETag: "e${n}"\r\nContent-Length: 0\r\n\r\n`));
  const wire = wireTo(t, srv.port);
  const bodies = [randomBytes(65_536), randomBytes(1), randomBytes(300_000), Buffer.alloc(0), randomBytes(524_288)];
  for (let i = 0; i < bodies.length; i++) t.equal(await wire.put(`blocks/k${i}`, bodies[i], { ifNoneMatch: true }), `"e${i + 1}"`);
  t.equal(srv.got.length, bodies.length);
  for (let i = 0; i < bodies.length; i++) {
    t.ok(srv.got[i].body.equals(bodies[i]), `body ${i} (${bodies[i].length} bytes) arrived whole`);
    t.match(srv.got[i].head, new RegExp(`^PUT /bucket/blocks/k${i} HTTP/1.1\r\n`));
    t.match(srv.got[i].head, /\r\nif-none-match: \*/i);
    t.match(srv.got[i].head, /\r\nauthorization: AWS4-HMAC-SHA256 Credential=AKID\//i);
    t.match(srv.got[i].head, new RegExp(`\r\nx-amz-content-sha256: ${createHash('sha256').update(bodies[i]).digest('hex')}`, 'i'));
  }
  t.same(new Set(srv.got.map((g) => g.connection)), new Set([1]), 'all over one connection');
});

t.test('an answer to a PUT before its body was read: the error as classify reads it, and that connection is not reused', async (t) => {
  const xml = '<?xml version="1.0"?><Error><Code>PreconditionFailed</Code><Message>exists</Message></Error>';
  const srv = await bodyServer(
    t,
    (head, body, socket, n) => socket.write(n === 1 ? `HTTP/1.1 412 Precondition Failed\r\nContent-Length: ${xml.length}\r\n\r\n${xml}` : 'HTTP/1.1 200 OK\r\nETag: "ok"\r\nContent-Length: 0\r\n\r\n'),
    (head, n) => n === 1,
  );
  const wire = wireTo(t, srv.port);
  await t.rejects(wire.put('blocks/a', randomBytes(200_000), { ifNoneMatch: true }), { name: 'PreconditionFailed', $metadata: { httpStatusCode: 412 } });
  const b = randomBytes(100_000);
  t.equal(await wire.put('blocks/b', b), '"ok"');
  t.ok(srv.got[1].body.equals(b), 'the next body arrives whole');
  t.equal(srv.got[1].connection, 2, 'on a new connection: the first may still hold the rest of the refused body');
});

t.test('a PUT answer raw sockets do not read: S3Wire.put sends it again through node:http', async (t) => {
  const srv = await bodyServer(t, (head, body, socket, n) => {
    if (n === 1) socket.end('HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n'); // length: until close
    else socket.write(`HTTP/1.1 200 OK\r\nETag: "h${n}"\r\nContent-Length: 0\r\n\r\n`);
  });
  const wire = wireTo(t, srv.port);
  const b = randomBytes(80_000);
  t.equal(await wire.put('blocks/c', b), '"h2"');
  t.equal(await wire.put('blocks/d', b), '"h3"', 'later PUTs through node:http too');
  t.equal(srv.got.length, 3);
  for (const g of srv.got) t.ok(g.body.equals(b), 'each attempt carried the whole body');
});
