/**
 * The S3 requests of the S3 backend (./s3-ops.ts) signed with SigV4 by the `aws4` package and
 * sent with node:http(s) over the backend's keep-alive agent: no AWS SDK in the path.
 *
 * Why: a snapshot sends one request per object it stores, a restore one per object it reads,
 * on the two cores that Ceph's gateway and OSD share on these machines. The SDK spends 2-3 ms
 * of CPU on each request (its middleware stack, serializers, response parsers, promise
 * chains): 164 PUTs of 64 KiB took 0.35-0.50 s of CPU through it, 0.12-0.15 s here. And
 * loading it costs a command ~75 ms before its first request even from its bundle with a code
 * cache (the SDK's signer package alone ~40 ms; `aws4`, one file, ~2 ms): an incremental S3
 * snapshot of a 1% rewrite spent a third of its time before and between the scan's requests.
 * So everything the backend sends goes this way where an endpoint is configured
 * (AWS_ENDPOINT_URL and the like: the local gateways this backend is tested on); AWS itself,
 * with its region's virtual hosts, keeps the SDK (./s3-sdk-ops.ts), and so do `wire: false`
 * and DISKSNAP_S3_WIRE=sdk.
 *
 * Credentials and region: where the environment has them (AWS_ACCESS_KEY_ID and
 * AWS_SECRET_ACCESS_KEY without AWS_PROFILE, as the SDK's chain itself takes them; AWS_REGION)
 * they are read here; otherwise the SDK's chain resolves them (profiles, ~/.aws, SSO, instance
 * roles), which loads the SDK once for that.
 *
 * Whole-object GETs (`getInto`: the blocks a restore, verify or copy reads) and PUTs on an
 * http: endpoint skip node:http: ./s3-raw.ts writes each request and reads its answer on
 * sockets of its own, a GET's body into the caller's buffer (2.7x less CPU per GET, 1.4-1.7x per
 * PUT; its note says why). Lists, HEADs and DELETEs stay on node:http.
 *
 * Error answers take the shape ./s3.ts's `classify` reads (the S3 error code from the XML body
 * as `name`, the status in `$metadata.httpStatusCode`; socket errors as node gives them), so
 * retries and messages are the same on both paths. List answers are parsed with the SDK's own
 * small XML parser (@aws-sdk/xml-builder, no dependencies of weight).
 */
import type * as HttpModule from 'node:http';
import type { IncomingMessage } from 'node:http';
import type { Readable } from 'node:stream';
import { createHash } from 'node:crypto';
import { sign } from 'aws4';
import { parseXML } from '@aws-sdk/xml-builder';
import { ObjectData, dataLength } from './backend';
import type { GetAnswer, ListPage, PutOptions, S3Credentials, S3Ops } from './s3-ops';
import { RAW_UNSUPPORTED, RawAnswer, RawHttp } from './s3-raw';

export interface WireOptions {
  endpoint: URL;
  bucket: string;
  region: () => Promise<string>;
  credentials: () => Promise<S3Credentials>;
  agent: HttpModule.Agent;
  /** socket inactivity limit (ms) */
  timeoutMs: number;
}

/** Socket error codes that mean a broken connection (retried: ./s3.ts). */
export const RETRY_CODES = new Set(['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'ECONNABORTED', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH', 'ERR_STREAM_PREMATURE_CLOSE', 'EPROTO', 'ESHORTBODY']);

/** SHA-256 of nothing: the payload hash of a request without a body. */
const EMPTY_SHA256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';

/** A string escaped as SigV4 wants (every character but the unreserved ones). */
function escape(s: string): string {
  return encodeURIComponent(s).replace(/[!'()*]/g, (c) => '%' + c.charCodeAt(0).toString(16).toUpperCase());
}

/** A key's path segments escaped, the '/' between them kept. */
function escapeKey(key: string): string {
  return key.split('/').map(escape).join('/');
}

/** The credentials and region the environment gives, as the SDK's chain would take them (else undefined). */
export function envCredentials(): S3Credentials | undefined {
  const e = process.env;
  if (e.AWS_PROFILE || !e.AWS_ACCESS_KEY_ID || !e.AWS_SECRET_ACCESS_KEY) return undefined;
  return { accessKeyId: e.AWS_ACCESS_KEY_ID, secretAccessKey: e.AWS_SECRET_ACCESS_KEY, sessionToken: e.AWS_SESSION_TOKEN || undefined };
}

export interface WireRequest {
  method: 'GET' | 'PUT' | 'HEAD' | 'DELETE';
  /** the object key; undefined: the bucket itself */
  key: string | undefined;
  query?: Record<string, string | undefined>;
  headers?: Record<string, string | undefined>;
  body?: Buffer;
  payloadHash?: string;
}

export class S3Wire implements S3Ops {
  private readonly http: typeof HttpModule;
  private readonly base: string;
  /** whole-object GETs and PUTs on raw sockets (./s3-raw.ts): http: endpoints, unless DISKSNAP_S3_RAW=0 */
  private raw: RawHttp | undefined;

  constructor(private readonly o: WireOptions) {
    this.http = require(o.endpoint.protocol === 'https:' ? 'node:https' : 'node:http') as typeof HttpModule;
    this.base = o.endpoint.pathname.replace(/\/+$/, '');
    if (o.endpoint.protocol === 'http:' && process.env.DISKSNAP_S3_RAW !== '0') {
      this.raw = new RawHttp(o.endpoint.hostname.replace(/^\[|\]$/g, ''), Number(o.endpoint.port || 80), o.timeoutMs);
    }
  }

  /** The request's path and its headers, signed (SigV4). */
  private async signed(r: WireRequest): Promise<{ path: string; headers: Record<string, string> }> {
    const ep = this.o.endpoint;
    const headers: Record<string, string> = { host: ep.host, 'x-amz-content-sha256': r.payloadHash ?? (r.body ? createHash('sha256').update(r.body).digest('hex') : EMPTY_SHA256) };
    for (const [k, v] of Object.entries(r.headers ?? {})) if (v !== undefined) headers[k] = v;
    if (r.body) headers['content-length'] = String(r.body.length);
    const query = Object.entries(r.query ?? {})
      .filter((e): e is [string, string] => e[1] !== undefined)
      .map(([k, v]) => (v === '' ? escape(k) : `${escape(k)}=${escape(v)}`))
      .join('&');
    const path = `${this.base}/${this.o.bucket}${r.key === undefined ? '' : '/' + escapeKey(r.key)}${query ? '?' + query : ''}`;
    const [credentials, region] = await Promise.all([this.o.credentials(), this.o.region()]);
    // no body for the signer: the payload hash is in its header (aws4 would hash it again)
    const signed = sign({ host: ep.host, path, method: r.method, service: 's3', region, headers }, credentials);
    return { path, headers: signed.headers as Record<string, string> };
  }

  /**
   * One request; resolves with the response of a 2xx answer (its body unread: the caller
   * reads it), rejects with an S3-shaped error otherwise.
   */
  async send(r: WireRequest): Promise<IncomingMessage> {
    const ep = this.o.endpoint;
    const { path, headers } = await this.signed(r);
    return new Promise<IncomingMessage>((resolve, reject) => {
      const req = this.http.request({ method: r.method, protocol: ep.protocol, hostname: ep.hostname, port: ep.port || undefined, path, headers, agent: this.o.agent }, (res) => {
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
      req.end(r.body);
    });
  }

  async get(key: string, o: { range?: string; ifMatch?: string } = {}): Promise<GetAnswer> {
    const res = await this.send({ method: 'GET', key, headers: { range: o.range, 'if-match': o.ifMatch } });
    const len = Number(res.headers['content-length']);
    return { body: res, length: Number.isInteger(len) ? len : undefined, contentRange: res.headers['content-range'], etag: res.headers.etag ?? '' };
  }

  /**
   * `r` over the raw sockets of ./s3-raw.ts, a GET's body into `into` (when it fits):
   * undefined where there are none (https:, DISKSNAP_S3_RAW=0) or from the first answer they
   * cannot read (then for good: such a server answers the same way again), and the caller
   * sends it through node:http. Error answers reject as send() rejects them. (A PUT such a
   * server stored before its unreadable answer is sent again: a conditional one then gets 412,
   * which is "already there" for a block and a lost lease, the safe side, for a lease.)
   */
  private async viaRaw(r: WireRequest & { method: 'GET' | 'PUT' }, into?: Buffer): Promise<RawAnswer | undefined> {
    if (!this.raw) return undefined;
    const { path, headers } = await this.signed(r);
    try {
      const a = await this.raw.request(r.method, path, headers, r.body, into);
      if (a.status >= 200 && a.status < 300) return a;
      throw wireError(a.status, a.body.toString('utf8'));
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== RAW_UNSUPPORTED) throw e;
      this.raw?.destroy();
      this.raw = undefined;
      return undefined;
    }
  }

  /** A whole object into `into` (when it fits): raw sockets where they serve, else node:http. */
  async getInto(key: string, into: Buffer | undefined): Promise<Buffer> {
    const a = await this.viaRaw({ method: 'GET', key }, into);
    if (a) return a.body;
    const r = await this.get(key);
    return readBody(r.body, r.length, into);
  }

  /** Resolves with the new object's ETag: raw sockets where they serve, else node:http. */
  async put(key: string, body: Buffer, o: PutOptions = {}): Promise<string> {
    const r: WireRequest & { method: 'PUT' } = { method: 'PUT', key, body, payloadHash: o.payloadHash, headers: { 'if-none-match': o.ifNoneMatch ? '*' : undefined, 'if-match': o.ifMatch } };
    const a = await this.viaRaw(r);
    if (a) return a.headers.get('etag') ?? '';
    const res = await this.send(r);
    res.resume();
    return res.headers.etag ?? '';
  }

  async head(key: string): Promise<{ size: number; etag: string }> {
    const res = await this.send({ method: 'HEAD', key });
    res.resume();
    return { size: Number(res.headers['content-length'] ?? 0), etag: res.headers.etag ?? '' };
  }

  async delete(key: string): Promise<void> {
    (await this.send({ method: 'DELETE', key })).resume();
  }

  async list(prefix: string | undefined, token: string | undefined, maxKeys: number): Promise<ListPage> {
    const res = await this.send({ method: 'GET', key: undefined, query: { 'list-type': '2', prefix, 'continuation-token': token, 'max-keys': String(maxKeys) } });
    const xml = (await readBody(res, undefined, undefined)).toString('utf8');
    let doc: { ListBucketResult?: { Contents?: unknown; IsTruncated?: string; NextContinuationToken?: string } };
    try {
      doc = parseXML(xml) as typeof doc;
    } catch (e) {
      // a body cut short parses badly: retried as a broken connection
      throw Object.assign(new Error(`ListObjectsV2 answer is not XML: ${(e as Error).message}`), { code: 'ESHORTBODY' });
    }
    const result = doc.ListBucketResult;
    if (!result) throw Object.assign(new Error('ListObjectsV2 answer has no ListBucketResult'), { code: 'ESHORTBODY' });
    const contents = (Array.isArray(result.Contents) ? result.Contents : result.Contents ? [result.Contents] : []) as Array<{ Key?: string; Size?: string }>;
    const objects = contents.filter((c) => typeof c.Key === 'string').map((c) => ({ key: c.Key as string, size: Number(c.Size ?? 0) }));
    const next = result.IsTruncated === 'true' ? result.NextContinuationToken || undefined : undefined;
    return { objects, next };
  }

  async headBucket(): Promise<void> {
    (await this.send({ method: 'HEAD', key: undefined })).resume();
  }

  destroy(): void {
    // (the agent is the backend's: ./s3.ts destroys it)
    this.raw?.destroy();
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
