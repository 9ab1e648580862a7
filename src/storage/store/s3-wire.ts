/**
 * The short request path of the S3 backend (./s3.ts) for block objects: a PUT with
 * If-None-Match or a GET, signed with SigV4 (@smithy/signature-v4, the SDK's own signer) and
 * sent with node:http(s) over the backend's keep-alive agent, without the SDK's middleware.
 *
 * Why: the SDK spends 2-3 ms of CPU on each request (its middleware stack, the serializers,
 * the response parsers, promise chains): 164 PUTs of 64 KiB took 0.35-0.50 s of CPU through
 * it and 0.12-0.15 s signed and sent here, in the same runs against the test gateway. A
 * snapshot sends one request per object it stores, and a restore one per object it reads,
 * on the two cores that Ceph's gateway and OSD share on these machines: in an S3
 * incremental of a 1% rewrite the SDK was most of the CPU beyond the local snapshot's.
 *
 * Only what blocks need: an object key of URL-safe characters, a body with its SHA-256
 * known (the signed x-amz-content-sha256; the server checks it), a whole-object or ranged GET
 * into a caller's buffer. Everything else (records, manifests, lists, leases, the bucket
 * check) stays on the SDK. Errors take the shape ./s3.ts's `classify` reads (the S3 error
 * code from the XML body as `name`, the status in `$metadata.httpStatusCode`; socket errors
 * as node gives them), so retries and messages are the same on both paths. Used where an
 * endpoint is configured (AWS_ENDPOINT_URL and the like: the local gateways this backend is
 * tested on); AWS itself, with its region's virtual hosts, keeps the SDK.
 */
import type * as HttpModule from 'node:http';
import type { IncomingMessage } from 'node:http';
import type { Readable } from 'node:stream';
import { ObjectData, dataLength } from './backend';
import { createHash, createHmac } from 'node:crypto';

/** An S3 credential set, as the SDK's provider chain resolves it. */
export interface WireCredentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

/** The part of @smithy/signature-v4's SignatureV4 used here. */
interface Signer {
  sign(req: SignableRequest): Promise<SignableRequest>;
}
export type SignerClass = new (init: {
  credentials: () => Promise<WireCredentials>;
  region: string | (() => Promise<string>);
  service: string;
  sha256: new (secret?: unknown) => { update(d: Uint8Array | string): void; digest(): Promise<Uint8Array> };
  uriEscapePath: boolean;
  applyChecksum: boolean;
}) => Signer;

interface SignableRequest {
  method: string;
  protocol: string;
  hostname: string;
  port?: number;
  path: string;
  query: Record<string, string>;
  headers: Record<string, string>;
}

export interface WireOptions {
  endpoint: URL;
  region: () => Promise<string>;
  credentials: () => Promise<WireCredentials>;
  agent: HttpModule.Agent;
  /** socket inactivity limit (ms) */
  timeoutMs: number;
  signer: SignerClass;
}

/** SHA-256 and HMAC-SHA-256 in the form the signer takes (node:crypto underneath). */
class Sha256 {
  private readonly h;
  constructor(secret?: unknown) {
    this.h = secret ? createHmac('sha256', secret as Uint8Array) : createHash('sha256');
  }
  update(d: Uint8Array | string): void {
    this.h.update(d);
  }
  async digest(): Promise<Uint8Array> {
    return this.h.digest();
  }
}

/** Socket error codes that mean a broken connection (retried: ./s3.ts). */
export const RETRY_CODES = new Set(['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'ECONNABORTED', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'ERR_STREAM_PREMATURE_CLOSE', 'EPROTO', 'ESHORTBODY']);

/** SHA-256 of nothing: the payload hash of a GET. */
const EMPTY_SHA256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';

/** A key's path segments escaped as S3 signs them (every character but unreserved ones and '/'). */
function escapeKey(key: string): string {
  return key
    .split('/')
    .map((s) => encodeURIComponent(s).replace(/[!'()*]/g, (c) => '%' + c.charCodeAt(0).toString(16).toUpperCase()))
    .join('/');
}

export class S3Wire {
  private readonly signer: Signer;
  private readonly http: typeof HttpModule;
  private readonly base: string;

  constructor(private readonly o: WireOptions) {
    this.signer = new o.signer({ credentials: o.credentials, region: o.region, service: 's3', sha256: Sha256, uriEscapePath: false, applyChecksum: false });
    this.http = require(o.endpoint.protocol === 'https:' ? 'node:https' : 'node:http') as typeof HttpModule;
    this.base = o.endpoint.pathname.replace(/\/+$/, '');
  }

  /**
   * One request; resolves with the response of a 2xx answer (its body unread: the caller
   * reads it), rejects with an S3-shaped error otherwise.
   */
  async send(method: 'GET' | 'PUT', bucket: string, key: string, opts: { body?: Buffer; payloadHash?: string; headers?: Record<string, string> } = {}): Promise<IncomingMessage> {
    const ep = this.o.endpoint;
    const headers: Record<string, string> = { host: ep.host, 'x-amz-content-sha256': opts.payloadHash ?? EMPTY_SHA256, ...opts.headers };
    if (opts.body) headers['content-length'] = String(opts.body.length);
    const path = `${this.base}/${bucket}/${escapeKey(key)}`;
    const signed = await this.signer.sign({ method, protocol: ep.protocol, hostname: ep.hostname, port: ep.port ? Number(ep.port) : undefined, path, query: {}, headers });
    return new Promise<IncomingMessage>((resolve, reject) => {
      const req = this.http.request({ method, protocol: ep.protocol, hostname: ep.hostname, port: ep.port || undefined, path, headers: signed.headers, agent: this.o.agent }, (res) => {
        const status = res.statusCode ?? 0;
        if (status >= 200 && status < 300) return resolve(res);
        // an error answer: its XML body names the S3 error code
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.length < 64 && chunks.push(c));
        res.on('error', reject);
        res.on('end', () => reject(wireError(status, Buffer.concat(chunks).toString('utf8'))));
      });
      req.setTimeout(this.o.timeoutMs, () => req.destroy(Object.assign(new Error(`no answer for ${this.o.timeoutMs} ms (socket timed out)`), { code: 'ETIMEDOUT' })));
      req.on('error', reject);
      req.end(opts.body);
    });
  }
}

/** The error of an S3 answer with `status` and (XML) `body`, as ./s3.ts's classify reads errors. */
function wireError(status: number, body: string): Error {
  const code = /<Code>([^<]+)<\/Code>/.exec(body)?.[1] ?? STATUS_NAMES[status] ?? `HTTP${status}`;
  const message = /<Message>([^<]*)<\/Message>/.exec(body)?.[1] || code;
  return Object.assign(new Error(message), { name: code, Code: code, $metadata: { httpStatusCode: status } });
}

const STATUS_NAMES: Record<number, string> = { 403: 'Forbidden', 404: 'NotFound', 412: 'PreconditionFailed', 416: 'InvalidRange', 500: 'InternalError', 503: 'ServiceUnavailable' };

export function toBody(data: ObjectData): Buffer {
  if (data instanceof Uint8Array) return Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  return Buffer.concat(data as Uint8Array[], dataLength(data));
}

/**
 * Reads a response body whole, into `into` when it fits. A body that ends before
 * `expected` bytes (a connection cut mid-response) throws a retryable ESHORTBODY.
 */
export async function readBody(body: Readable | undefined, expected: number | undefined, into: Buffer | undefined): Promise<Buffer> {
  if (!body) {
    if (expected) throw Object.assign(new Error('response has no body'), { code: 'ESHORTBODY' });
    return Buffer.alloc(0);
  }
  const fits = into && expected !== undefined && expected <= into.length;
  let out: Buffer = fits ? into : Buffer.allocUnsafe(expected ?? 64 * 1024);
  let n = 0;
  try {
    for await (const chunk of body as AsyncIterable<Buffer>) {
      if (n + chunk.length > out.length) {
        if (expected !== undefined) throw Object.assign(new Error(`response body longer than Content-Length ${expected}`), { code: 'ESHORTBODY' });
        const bigger = Buffer.allocUnsafe(Math.max(out.length * 2, n + chunk.length));
        out.copy(bigger, 0, 0, n);
        out = bigger;
      }
      chunk.copy(out, n);
      n += chunk.length;
    }
  } catch (e) {
    body.destroy();
    const err = e as NodeJS.ErrnoException;
    if (err.code === 'ESHORTBODY') throw e;
    throw Object.assign(new Error(`response body cut off after ${n} bytes: ${err.message}`), { code: err.code && RETRY_CODES.has(err.code) ? err.code : 'ESHORTBODY' });
  }
  if (expected !== undefined && n !== expected) {
    throw Object.assign(new Error(`response body has ${n} bytes, Content-Length said ${expected}`), { code: 'ESHORTBODY' });
  }
  return out.subarray(0, n);
}
