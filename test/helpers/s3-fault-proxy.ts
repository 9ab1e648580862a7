/**
 * An HTTP proxy between an S3 client and the gateway that misbehaves at random, to prove
 * that retries never turn a fault into a wrong byte. Per request, by the rates given:
 *
 *   reset       the client's connection is destroyed before the request is forwarded
 *   cut         the request is forwarded, the response headers and part of its body are
 *               sent back, then the connection is destroyed mid-body
 *   err503      answered 503 SlowDown (with an S3 XML error body) without forwarding
 *   notImpl     conditional PUTs (If-None-Match / If-Match) answered 501 NotImplemented,
 *               as a server without conditional writes does (OpenStack Swift's s3api)
 *
 * Everything else is forwarded untouched (the Host header included, which SigV4 signs).
 * `counts` says what happened, so a test can show the faults really occurred.
 */
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';

export interface FaultRates {
  reset?: number;
  cut?: number;
  err503?: number;
  /** conditional PUTs get 501 (always, when true) */
  notImplementedConditional?: boolean;
}

export interface FaultProxy {
  endpoint: string;
  counts: { requests: number; reset: number; cut: number; err503: number; notImpl: number; passed: number };
  rates: FaultRates;
  close(): Promise<void>;
}

export async function startFaultProxy(target: string, rates: FaultRates, random: () => number = Math.random): Promise<FaultProxy> {
  const to = new URL(target);
  const counts = { requests: 0, reset: 0, cut: 0, err503: 0, notImpl: 0, passed: 0 };
  const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });
  const state = { rates };
  const server = http.createServer((req, res) => {
    counts.requests++;
    const r = state.rates;
    const conditional = req.method === 'PUT' && (req.headers['if-none-match'] !== undefined || req.headers['if-match'] !== undefined);
    if (r.notImplementedConditional && conditional) {
      counts.notImpl++;
      req.resume();
      req.on('end', () => {
        res.writeHead(501, { 'content-type': 'application/xml' });
        res.end('<?xml version="1.0" encoding="UTF-8"?><Error><Code>NotImplemented</Code><Message>conditional writes</Message></Error>');
      });
      return;
    }
    const x = random();
    const reset = r.reset ?? 0;
    const e503 = r.err503 ?? 0;
    const cut = r.cut ?? 0;
    if (x < reset) {
      counts.reset++;
      req.socket.destroy();
      return;
    }
    if (x < reset + e503) {
      counts.err503++;
      req.resume();
      req.on('end', () => {
        res.writeHead(503, { 'content-type': 'application/xml' });
        res.end('<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code><Message>injected</Message></Error>');
      });
      return;
    }
    const cutThis = x < reset + e503 + cut;
    const up = http.request(
      { host: to.hostname, port: to.port, method: req.method, path: req.url, headers: req.headers, agent },
      (upRes) => {
        res.writeHead(upRes.statusCode ?? 502, upRes.headers);
        // A HEAD answer has no body, whatever its Content-Length says: nothing to cut.
        const len = req.method === 'HEAD' ? 0 : Number(upRes.headers['content-length'] ?? 0);
        if (!cutThis || len < 2) {
          if (!cutThis) counts.passed++;
          upRes.pipe(res);
          if (cutThis) upRes.on('end', () => req.socket.destroy()); // too short to cut: drop the connection after
          if (cutThis) counts.cut++;
          return;
        }
        counts.cut++;
        const keep = 1 + Math.floor(random() * (len - 1));
        let sent = 0;
        upRes.on('data', (chunk: Buffer) => {
          if (sent >= keep) return;
          const part = chunk.subarray(0, keep - sent);
          sent += part.length;
          res.write(part);
          if (sent >= keep) setImmediate(() => req.socket.destroy());
        });
      },
    );
    up.on('error', () => req.socket.destroy());
    req.pipe(up);
  });
  server.keepAliveTimeout = 30_000;
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as AddressInfo).port;
  return {
    endpoint: `http://127.0.0.1:${port}`,
    counts,
    get rates() {
      return state.rates;
    },
    set rates(v: FaultRates) {
      state.rates = v;
    },
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
      agent.destroy();
    },
  };
}
