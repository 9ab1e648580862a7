/**
 * The S3 backend: a store in a bucket under a key prefix (`s3://BUCKET[/PREFIX]`), for any
 * S3-compatible server (tested against Ceph's RADOS Gateway 16).
 *
 *   backend method   request                                   on the wire
 *   get              GET key                                   404 -> ENOENT
 *   putIfAbsent      PUT key, If-None-Match: *                 412 -> false
 *   put              PUT key                                   (records, manifests)
 *   list             ListObjectsV2 prefix, paginated           never `temporary` (PUTs are whole)
 *   delete           HEAD key, then DELETE key                 false when the HEAD found nothing
 *   remove           DELETE key                                (leases let go of: no HEAD)
 *   stat             HEAD key                                  404 -> undefined
 *   open             GET Range: the first MiB (size, ETag),    then ranged GETs If-Match the ETag
 *   prefetch         that first GET, started early             for the next open or get of the key
 *
 * A PUT is durable when the server answers it and an object appears whole or not at all, so
 * there are no temporary names, no multipart uploads (nothing the store writes is near the
 * 5 GiB single-PUT limit) and `flush` is a no-op.
 *
 * Requests (./s3-ops.ts) go without the AWS SDK where an endpoint is set (./s3-wire.ts: SigV4
 * by `aws4` over node:http; no SDK to load, 2-3 ms of CPU less per request); AWS itself,
 * `wire: false` and DISKSNAP_S3_WIRE=sdk use the SDK's client (./s3-sdk-ops.ts).
 *
 * Transport: one keep-alive agent per backend; at most `maxInFlight` requests at once (the
 * agent's socket limit and a semaphore in front of it, so queued work waits here rather than
 * inside a client's timers). No client retries by itself: `attempt()`
 * retries 5xx (except 501), SlowDown, RequestTimeout, connection resets/refusals, timeouts and
 * responses whose body ended short, with exponential backoff and full jitter; any other 4xx
 * fails at once. A request retried after an answer that got lost is safe: GET, HEAD, PUT of a
 * record and DELETE are idempotent, and a putIfAbsent that finds its own earlier PUT answers
 * 412 -> false, which for content-addressed objects means the same bytes are there.
 *
 * Checksums: no CRC trailers (RGW 16 refuses the SDK's default aws-chunked bodies with 411:
 * ./s3-sdk-ops.ts). Bytes are still never taken on trust: every GET's length is checked
 * against Content-Length (a short body is retried), block objects are checked against their
 * digest by the store, and manifests carry their own checksums. A PUT is signed with the SHA-256 of its body
 * (x-amz-content-sha256), which the server checks; the body is hashed for that, except
 * for a plain block, whose digest is that hash already: the store passes it to putIfAbsent
 * (one SHA-256 pass over every byte fewer on the main thread: 2.8 s of a 1 GiB snapshot's
 * 37 s under load).
 *
 * Throughput: `concurrency` (the in-flight bound) tells readers how much to queue
 * (src/storage/fetch.ts keeps twice the bound queued, so it stays full while a batch waits
 * for its slowest GET and is hashed).
 *
 * Credentials, region and endpoint come from the SDK's usual chain: AWS_ACCESS_KEY_ID /
 * AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, AWS_REGION, AWS_ENDPOINT_URL (or
 * AWS_ENDPOINT_URL_S3); the SDK is loaded for them only when the environment lacks them.
 * Addressing is path-style (local gateways rarely have wildcard DNS).
 * Tuning: DISKSNAP_S3_CONCURRENCY (requests in flight, default 32), DISKSNAP_S3_RETRIES
 * (attempts per request, default 8). A private CA for an https endpoint: NODE_EXTRA_CA_CERTS,
 * as for any node program (the executable defers it to here: ../../engine/extra-ca.ts).
 */
import type * as HttpModule from 'node:http';
import type * as HttpsModule from 'node:https';
import { createHash, randomBytes } from 'node:crypto';
import { DisksnapError, invalid } from '../../engine/errors';
import { trustExtraCa } from '../../engine/extra-ca';
import type { ObjectData } from './backend';
import type { S3Ops } from './s3-ops';
import { SdkOps } from './s3-sdk-ops';
import { RETRY_CODES, S3Wire, envCredentials, readBody, toBody } from './s3-wire';
import type { ObjectInfo, ObjectReader, StoreBackend } from './backend';

/** node's codes for a server certificate that does not verify: never retried, named as such. */
const TLS_TRUST_CODES = new Set([
  'DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'CERT_UNTRUSTED', 'CERT_REJECTED', 'CERT_HAS_EXPIRED', 'CERT_NOT_YET_VALID', 'ERR_TLS_CERT_ALTNAME_INVALID',
]);

/** `s3://BUCKET[/PREFIX]` -> bucket and prefix (no leading or trailing '/'; '' for none). */
export function parseS3Url(url: string): { bucket: string; prefix: string } {
  const m = /^s3:\/\/([^/]*)(?:\/(.*))?$/.exec(url);
  if (!m) throw invalid(`'${url}' is not an S3 store URL (s3://BUCKET[/PREFIX])`);
  const bucket = m[1];
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket) || bucket.includes('..')) {
    throw invalid(`'${url}': bucket name '${bucket}' is not valid (3-63 characters: lowercase letters, digits, '.', '-')`);
  }
  const prefix = (m[2] ?? '').replace(/^\/+|\/+$/g, '');
  if (prefix.split('/').some((p) => p === '.' || p === '..') || prefix.includes('//')) {
    throw invalid(`'${url}': prefix '${prefix}' has an empty, '.' or '..' part`);
  }
  return { bucket, prefix };
}

export { isS3Url } from './backend';

export interface RetryPolicy {
  /** attempts per request, the first included */
  attempts: number;
  /** first backoff (ms); doubles per attempt, with full jitter */
  baseMs: number;
  /** largest backoff (ms) */
  capMs: number;
}

export interface S3BackendOptions {
  /** requests in flight at most (default: DISKSNAP_S3_CONCURRENCY, else 32) */
  maxInFlight?: number;
  retry?: Partial<RetryPolicy>;
  /** overrides AWS_ENDPOINT_URL (tests point this at a fault-injecting proxy) */
  endpoint?: string;
  /** ListObjectsV2 page size (default 1000; tests use small pages to cover pagination) */
  listPageSize?: number;
  /** per-request socket inactivity limit (ms, default 120000) */
  requestTimeoutMs?: number;
  /** static credentials instead of the SDK's chain (tests: wrong keys) */
  credentials?: { accessKeyId: string; secretAccessKey: string };
  /** false: every request through the SDK even where an endpoint is set (./s3-wire.ts; DISKSNAP_S3_WIRE=sdk) */
  wire?: boolean;
  /** called before each retry (tests count them) */
  onRetry?: (what: string, attempt: number, err: unknown) => void;
}

/** A counting semaphore: the bound on requests in flight. */
class Gate {
  private waiting: (() => void)[] = [];
  private active = 0;
  constructor(private readonly limit: number) {}
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.active >= this.limit) await new Promise<void>((r) => this.waiting.push(r));
    else this.active++;
    try {
      return await fn();
    } finally {
      const next = this.waiting.shift();
      if (next) next();
      else this.active--;
    }
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Bytes the first request of `open` fetches (see there). */
export const OPEN_PREFETCH = 1024 * 1024;

/** What an S3/SDK/socket error is, as far as retrying and messages go. */
interface Classified {
  status: number | undefined;
  name: string;
  retryable: boolean;
}

const RETRY_NAMES = new Set(['SlowDown', 'RequestTimeout', 'InternalError', 'ServiceUnavailable', 'ThrottlingException', 'TimeoutError', 'RequestTimeTooSkewed']);

function classify(e: unknown): Classified {
  const err = e as { name?: string; Code?: string; code?: string; $metadata?: { httpStatusCode?: number }; message?: string };
  const status = err?.$metadata?.httpStatusCode;
  const name = err?.Code ?? err?.name ?? err?.code ?? 'Error';
  let retryable = false;
  if (status !== undefined && status >= 500 && status !== 501) retryable = true;
  if (RETRY_NAMES.has(name)) retryable = true;
  if (err?.code && RETRY_CODES.has(err.code)) retryable = true;
  if (status === undefined && /socket hang up|ECONNRESET|ECONNREFUSED|premature close|aborted|EPIPE|timed? ?out/i.test(err?.message ?? '')) retryable = true;
  // A response the SDK could not parse with no status is a broken connection, not an answer.
  if (status === undefined && name === 'Error' && /Deserialization|Unexpected end|parse/i.test(err?.message ?? '')) retryable = true;
  if (status !== undefined && status >= 400 && status < 500 && !RETRY_NAMES.has(name)) retryable = false;
  return { status, name, retryable };
}

export class S3Backend implements StoreBackend {
  readonly location: string;
  readonly bucket: string;
  readonly prefix: string;
  readonly endpoint: string;
  /** requests in flight at most (readers queue twice this many: backend.ts) */
  readonly concurrency: number;
  /** how requests are sent: ./s3-wire.ts where an endpoint is set, else the SDK (./s3-sdk-ops.ts) */
  private readonly ops: S3Ops;
  private readonly sdkOps: SdkOps;
  private readonly agents: HttpModule.Agent[];
  private readonly gate: Gate;
  /** lease requests: never queued behind block transfers, or a busy writer's lease would run out */
  private readonly leaseGate = new Gate(4);
  private readonly retry: RetryPolicy;
  private readonly listPageSize: number;
  private readonly onRetry?: S3BackendOptions['onRetry'];
  private conditional: Promise<string | undefined> | undefined;
  /** opens started by prefetch(), each taken by the next open() or get() of its key */
  private readonly prefetched = new Map<string, Promise<ObjectReader>>();
  /** undefined until an If-Match PUT succeeded in one of the two forms */
  private bareEtags: boolean | undefined;

  constructor(url: string, opts: S3BackendOptions = {}) {
    const { bucket, prefix } = parseS3Url(url);
    this.bucket = bucket;
    this.prefix = prefix;
    this.location = `s3://${bucket}${prefix ? '/' + prefix : ''}`;
    const envInFlight = Number(process.env.DISKSNAP_S3_CONCURRENCY);
    const maxInFlight = opts.maxInFlight ?? (Number.isInteger(envInFlight) && envInFlight > 0 ? envInFlight : 32);
    const envRetries = Number(process.env.DISKSNAP_S3_RETRIES);
    this.retry = {
      attempts: opts.retry?.attempts ?? (Number.isInteger(envRetries) && envRetries > 0 ? envRetries : 8),
      baseMs: opts.retry?.baseMs ?? 100,
      capMs: opts.retry?.capMs ?? 5000,
    };
    this.listPageSize = opts.listPageSize ?? 1000;
    this.onRetry = opts.onRetry;
    this.gate = new Gate(maxInFlight);
    this.concurrency = maxInFlight;
    this.endpoint = opts.endpoint ?? process.env.AWS_ENDPOINT_URL_S3 ?? process.env.AWS_ENDPOINT_URL ?? 'AWS S3';
    trustExtraCa(); // NODE_EXTRA_CA_CERTS the executable left for the first TLS connection
    const agentOpts = { keepAlive: true, maxSockets: maxInFlight + 4, maxFreeSockets: maxInFlight + 4 }; // + the lease gate
    const httpAgent = new (require('node:http') as typeof HttpModule).Agent(agentOpts);
    const httpsAgent = new (require('node:https') as typeof HttpsModule).Agent(agentOpts);
    this.agents = [httpAgent, httpsAgent];
    const timeoutMs = opts.requestTimeoutMs ?? 120_000;
    this.sdkOps = new SdkOps({ bucket, endpoint: opts.endpoint, credentials: opts.credentials, httpAgent, httpsAgent, timeoutMs });
    const ep = opts.endpoint ?? process.env.AWS_ENDPOINT_URL_S3 ?? process.env.AWS_ENDPOINT_URL;
    if (ep && /^https?:\/\//.test(ep) && opts.wire !== false && process.env.DISKSNAP_S3_WIRE !== 'sdk') {
      const endpoint = new URL(ep);
      const agent = endpoint.protocol === 'https:' ? httpsAgent : httpAgent;
      // from the environment where it has them; else the SDK's chain (which loads the SDK)
      const creds = opts.credentials ?? envCredentials();
      const region = process.env.AWS_REGION;
      this.ops = new S3Wire({
        endpoint,
        bucket,
        agent,
        timeoutMs,
        credentials: creds ? async () => creds : () => this.sdkOps.credentials(),
        region: region ? async () => region : () => this.sdkOps.region(),
      });
    } else {
      this.ops = this.sdkOps;
    }
  }

  describe(key: string): string {
    return `${this.location}/${key}`;
  }

  /** The full object key of a store key. */
  objectKey(key: string): string {
    if (key.startsWith('/') || key.split('/').some((p) => p === '..' || p === '.')) throw invalid(`bad store key '${key}'`);
    return this.prefix ? `${this.prefix}/${key}` : key;
  }

  /** Closes the keep-alive connections (a process exits sooner without them). */
  destroy(): void {
    this.sdkOps.destroy();
    if (this.ops !== this.sdkOps) this.ops.destroy();
    for (const a of this.agents) a.destroy();
  }

  /** One-line error for a failed request; `key` undefined for bucket-level requests. */
  private fail(e: unknown, what: string, key: string | undefined, attempts: number): DisksnapError {
    if (e instanceof DisksnapError) return e;
    const c = classify(e);
    const where = key === undefined ? this.location : this.describe(key);
    const detail = (e as Error)?.message && (e as Error).message !== c.name && (e as Error).message !== 'UnknownError' ? `: ${(e as Error).message}` : '';
    if (c.name === 'NoSuchBucket') {
      return new DisksnapError(`S3 bucket '${this.bucket}' does not exist at ${this.endpoint} (create it first, e.g. \`aws s3 mb s3://${this.bucket}\`)`, 'ENOENT', 2, this.location);
    }
    if (c.name === 'InvalidAccessKeyId' || c.name === 'SignatureDoesNotMatch' || c.name === 'InvalidToken' || c.name === 'ExpiredToken') {
      return new DisksnapError(`S3 at ${this.endpoint} rejected the credentials (${c.name}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile`, 'EACCES', 13, this.location);
    }
    if (c.name === 'AccessDenied' || c.status === 403) {
      return new DisksnapError(`S3 at ${this.endpoint} denied ${what} ${where} (${c.name}): the credentials lack permission`, 'EACCES', 13, where);
    }
    if (c.name === 'NoSuchKey' || c.name === 'NotFound' || c.status === 404) {
      return new DisksnapError(`${where}: no such object`, 'ENOENT', 2, where);
    }
    const code = (e as { code?: unknown })?.code;
    if (typeof code === 'string' && TLS_TRUST_CODES.has(code)) {
      const hint = code === 'ERR_TLS_CERT_ALTNAME_INVALID' || code.startsWith('CERT_') ? '' : ': for a private CA, set NODE_EXTRA_CA_CERTS to its PEM file';
      return new DisksnapError(`S3 at ${this.endpoint}: its TLS certificate is not trusted (${(e as Error).message}, ${code})${hint}`, 'EACCES', 13, this.location);
    }
    if (/Region is missing/i.test((e as Error)?.message ?? '')) {
      return new DisksnapError(`S3 region is not set: set AWS_REGION (any name your server accepts, e.g. us-east-1)`, 'EINVALID');
    }
    if (c.retryable) {
      const why = c.status !== undefined ? `HTTP ${c.status} ${c.name}` : `${c.name}${detail}`;
      return new DisksnapError(`S3 at ${this.endpoint}: ${what} ${where} failed after ${attempts} attempt(s): ${why}`, 'EIO', 5, where);
    }
    const why = c.status !== undefined ? `HTTP ${c.status} ${c.name}${detail}` : `${c.name}${detail}`;
    return new DisksnapError(`S3 at ${this.endpoint}: ${what} ${where}: ${why}`, c.status === 501 ? 'EUNSUPPORTED' : 'EIO', undefined, where);
  }

  /**
   * Runs one request under the in-flight bound, retrying what `classify` calls retryable.
   * `accept` turns an error into a result (404 -> undefined, 412 -> false) before any retry.
   */
  private async attempt<T>(
    what: string,
    key: string | undefined,
    fn: () => Promise<T>,
    accept?: (c: Classified) => { value: T } | undefined,
    gate: Gate = this.gate,
  ): Promise<T> {
    for (let i = 1; ; i++) {
      try {
        return await gate.run(fn);
      } catch (e) {
        const c = classify(e);
        const ok = accept?.(c);
        if (ok) return ok.value;
        if (!c.retryable || i >= this.retry.attempts) throw this.fail(e, what, key, i);
        this.onRetry?.(what, i, e);
        const cap = Math.min(this.retry.capMs, this.retry.baseMs * 2 ** (i - 1));
        await sleep(Math.random() * cap);
      }
    }
  }

  // ---- the core ----

  async get(key: string, into?: Buffer): Promise<Buffer> {
    const early = this.takePrefetched(key);
    if (early) {
      const r = await early;
      return r.read(0, r.size);
    }
    const Key = this.objectKey(key);
    return this.attempt('GET', key, async () => {
      if (this.ops.getInto) return this.ops.getInto(Key, into);
      const r = await this.ops.get(Key);
      return readBody(r.body, r.length, into);
    });
  }

  async putIfAbsent(key: string, data: ObjectData, sha256?: Uint8Array): Promise<boolean> {
    const Key = this.objectKey(key);
    const body = toBody(data);
    // hashed once here, not on every attempt
    const payloadHash = sha256 ? Buffer.from(sha256.buffer, sha256.byteOffset, 32).toString('hex') : createHash('sha256').update(body).digest('hex');
    return this.attempt(
      'PUT',
      key,
      async () => (await this.ops.put(Key, body, { payloadHash, ifNoneMatch: true }), true),
      (c) => (c.status === 412 || c.name === 'PreconditionFailed' ? { value: false } : undefined),
    );
  }

  async put(key: string, data: Uint8Array): Promise<void> {
    const Key = this.objectKey(key);
    const body = toBody(data);
    await this.attempt('PUT', key, () => this.ops.put(Key, body));
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo & { temporary: boolean }> {
    const full = this.objectKey(prefix.replace(/\/?$/, '/'));
    const strip = this.prefix ? this.prefix.length + 1 : 0;
    let token: string | undefined;
    do {
      const page = await this.attempt('LIST', prefix, () => this.ops.list(full, token, this.listPageSize));
      for (const o of page.objects) yield { key: o.key.slice(strip), size: o.size, temporary: false };
      token = page.next;
    } while (token);
  }

  async delete(key: string): Promise<boolean> {
    if ((await this.stat(key)) === undefined) return false;
    await this.remove(key);
    return true;
  }

  /** DELETE without the HEAD that tells whether it was there (S3 answers 204 either way). */
  async remove(key: string): Promise<void> {
    const Key = this.objectKey(key);
    await this.attempt('DELETE', key, () => this.ops.delete(Key));
  }

  // ---- optional ----

  async stat(key: string): Promise<number | undefined> {
    return (await this.head(key))?.size;
  }

  /** Size and ETag of an object, or undefined when absent. */
  async head(key: string): Promise<{ size: number; etag: string } | undefined> {
    const Key = this.objectKey(key);
    return this.attempt(
      'HEAD',
      key,
      () => this.ops.head(Key),
      (c) => (c.status === 404 ? { value: undefined } : undefined),
    );
  }

  /**
   * A ranged reader. Its first request is a GET of the first OPEN_PREFETCH bytes, which also
   * tells the size and the ETag: an object that small (a manifest or tag file of a volume up to
   * ~25 GiB) is then read in that one round trip, not a HEAD and ranged GETs. Reads past the
   * prefetched bytes are ranged GETs with If-Match on that ETag: a replaced object is an error.
   */
  async open(key: string): Promise<ObjectReader> {
    return this.takePrefetched(key) ?? this.openNow(key);
  }

  /** The open prefetch() started for `key`, once (undefined when there is none). */
  private takePrefetched(key: string): Promise<ObjectReader> | undefined {
    const early = this.prefetched.get(key);
    this.prefetched.delete(key);
    return early;
  }

  prefetch(keys: string[]): void {
    for (const key of keys) {
      if (this.prefetched.has(key)) continue;
      const p = this.openNow(key);
      p.catch(() => undefined); // the open() that takes it sees the error
      this.prefetched.set(key, p);
    }
  }

  private async openNow(key: string): Promise<ObjectReader> {
    const Key = this.objectKey(key);
    const first = await this.attempt(
      'GET',
      key,
      async () => {
        const r = await this.ops.get(Key, { range: `bytes=0-${OPEN_PREFETCH - 1}` });
        const data = await readBody(r.body, r.length, undefined);
        // "bytes 0-N/TOTAL"; a server that ignores Range answers 200 with the whole object
        const total = /\/(\d+)$/.exec(r.contentRange ?? '');
        return { size: total ? Number(total[1]) : data.length, etag: r.etag, data };
      },
      // 416: an empty object has no byte 0 (the HEAD below tells its size and ETag)
      (c) => (c.status === 416 || c.name === 'InvalidRange' ? { value: undefined } : undefined),
    ); // a missing object: ENOENT, "no such object"
    const h = first ?? (await this.head(key));
    if (!h) throw new DisksnapError(`${this.describe(key)}: no such object`, 'ENOENT', 2, this.describe(key));
    const { size, etag } = h;
    const head = first?.data ?? Buffer.alloc(0);
    return {
      size,
      read: async (offset, length) => {
        const end = Math.min(size, offset + length);
        if (offset >= end) return Buffer.alloc(0);
        if (end <= head.length) return Buffer.from(head.subarray(offset, end));
        return this.attempt('GET', key, async () => {
          const r = await this.ops.get(Key, { range: `bytes=${offset}-${end - 1}`, ifMatch: etag || undefined });
          return readBody(r.body, end - offset, undefined);
        });
      },
      close: async () => undefined,
    };
  }

  async getRange(key: string, offset: number, length: number): Promise<Buffer> {
    const Key = this.objectKey(key);
    if (length <= 0) return Buffer.alloc(0);
    return this.attempt('GET', key, async () => {
      const r = await this.ops.get(Key, { range: `bytes=${offset}-${offset + length - 1}` });
      const body = await readBody(r.body, r.length, undefined);
      // a server that ignores Range answers 200 with the whole object
      return r.contentRange ? body : body.subarray(offset, offset + length);
    });
  }

  async flush(): Promise<void> {
    // PUTs are durable when answered: nothing to do.
  }

  // ---- bucket-level ----

  /**
   * Checks the bucket is there and the credentials work (HEAD bucket), so that opening a store
   * fails with one line naming the problem rather than at the first object.
   */
  async checkBucket(): Promise<void> {
    await this.attempt(
      'HEAD bucket',
      undefined,
      () => this.ops.headBucket(),
      (c) => {
        if (c.status === 404) throw new DisksnapError(`S3 bucket '${this.bucket}' does not exist at ${this.endpoint} (create it first, e.g. \`aws s3 mb s3://${this.bucket}\`)`, 'ENOENT', 2, this.location);
        // HEAD has no body, so a 403 does not say whether the key or the permission is wrong.
        if (c.status === 403) throw new DisksnapError(`S3 at ${this.endpoint} refused access to bucket '${this.bucket}' (HTTP 403): wrong credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profile) or no permission`, 'EACCES', 13, this.location);
        return undefined;
      },
    );
  }

  /** Whether anything is stored under the prefix (one LIST of one key). */
  async hasAnyObject(): Promise<boolean> {
    const r = await this.attempt('LIST', '', () => this.ops.list(this.prefix ? this.prefix + '/' : undefined, undefined, 1));
    return r.objects.length > 0;
  }

  // ---- conditional writes (leases: src/storage/store/s3-lease.ts) ----

  /**
   * PUT only if the object's ETag is `ifMatch` (or, with ifMatch undefined, only if there is
   * none). Returns the new ETag, or undefined when the condition failed (412).
   */
  async putConditional(key: string, data: Uint8Array, ifMatch: string | undefined): Promise<string | undefined> {
    if (ifMatch === undefined) return this.putIf(key, data, undefined);
    const bare = ifMatch.replace(/^"|"$/g, '');
    if (this.bareEtags !== undefined) return this.putIf(key, data, this.bareEtags ? bare : `"${bare}"`);
    // RGW 16 matches If-Match on PUT against the bare ETag, AWS against the quoted one: the
    // first If-Match learns which, sending both forms at once (one round trip, not two). At
    // most one can match: the other finds the object changed (or, should a lenient server
    // take both, the same bytes are written twice). A 412 to both: the ETag is not the object's.
    // A form that failed for good (after its retries) does not hide the other's success.
    const [q, b] = await Promise.allSettled([this.putIf(key, data, `"${bare}"`), this.putIf(key, data, bare)]);
    const quoted = q.status === 'fulfilled' ? q.value : undefined;
    const plain = b.status === 'fulfilled' ? b.value : undefined;
    if (quoted !== undefined) this.bareEtags = false;
    else if (plain !== undefined) this.bareEtags = true;
    else if (q.status === 'rejected') throw q.reason;
    else if (b.status === 'rejected') throw b.reason;
    return quoted ?? plain;
  }

  private async putIf(key: string, data: Uint8Array, ifMatch: string | undefined): Promise<string | undefined> {
    const Key = this.objectKey(key);
    const body = toBody(data);
    return this.attempt(
      'PUT',
      key,
      () => this.ops.put(Key, body, { ifNoneMatch: ifMatch === undefined, ifMatch }),
      (c) => (c.status === 412 || c.name === 'PreconditionFailed' ? { value: undefined } : undefined),
      this.leaseGate,
    );
  }

  /** Body and ETag of an object, or undefined when absent. */
  async getWithEtag(key: string): Promise<{ data: Buffer; etag: string } | undefined> {
    const Key = this.objectKey(key);
    return this.attempt(
      'GET',
      key,
      async () => {
        const r = await this.ops.get(Key);
        return { data: await readBody(r.body, r.length, undefined), etag: r.etag };
      },
      (c) => (c.status === 404 ? { value: undefined } : undefined),
      this.leaseGate,
    );
  }

  /**
   * Undefined when the server honours `If-None-Match: *` and `If-Match` on PUT; otherwise why
   * not. Probed once per backend with a scratch object under `.probe/`.
   */
  conditionalWriteProblem(): Promise<string | undefined> {
    this.conditional ??= this.probeConditional();
    return this.conditional;
  }

  private async probeConditional(): Promise<string | undefined> {
    const key = `.probe/${randomBytes(8).toString('hex')}`;
    const body = Buffer.from('disksnap conditional-write probe\n');
    try {
      let first: string | undefined;
      try {
        first = await this.putIf(key, body, undefined);
      } catch (e) {
        if (e instanceof DisksnapError && e.code === 'EUNSUPPORTED') return `it answers PUT with If-None-Match: * with ${/HTTP \d+ \w+/.exec(e.message)?.[0] ?? e.message}`;
        throw e;
      }
      if (first === undefined) return 'it refused If-None-Match: * on a new object (412)';
      const again = await this.putIf(key, body, undefined);
      if (again !== undefined) return 'it ignores If-None-Match: * (a second conditional PUT of one key succeeded)';
      const wrong = await this.putIf(key, body, '"00000000000000000000000000000000"');
      if (wrong !== undefined) return 'it ignores If-Match (a PUT with a wrong ETag succeeded)';
      if ((await this.putConditional(key, body, first)) !== undefined) return undefined;
      return 'it refuses If-Match with the current ETag';
    } finally {
      await this.delete(key).catch(() => false); // a leftover probe object is harmless
    }
  }
}
