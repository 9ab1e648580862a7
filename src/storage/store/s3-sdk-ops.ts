/**
 * The S3 requests of the S3 backend (./s3-ops.ts) through the AWS SDK's S3 client: for AWS
 * itself (virtual-hosted buckets, its regions' endpoints), `wire: false` and
 * DISKSNAP_S3_WIRE=sdk. The client is made, and the SDK loaded, at the first request, so that
 * a backend that sends everything through ./s3-wire.ts never loads it; the wire path also
 * asks it for credentials and the region when the environment does not have them (the SDK's
 * chain: profiles, ~/.aws, SSO, instance roles).
 *
 * Checksums: the SDK's default (CRC32 trailers, aws-chunked bodies) makes plain PUTs fail on
 * RGW 16 with 411, so checksums are computed only where an operation requires them. The SDK's
 * own retries are off: ./s3.ts retries, the same for both paths.
 */
import type * as HttpModule from 'node:http';
import type * as HttpsModule from 'node:https';
import * as path from 'node:path';
import type { Readable } from 'node:stream';
import type { S3Client } from '@aws-sdk/client-s3';
import { cacheFileOf, loadScript } from '../../engine/bundle';
import type { GetAnswer, ListPage, PutOptions, S3Credentials, S3Ops } from './s3-ops';

// The SDK warns once per process that releases after January 2027 need Node 22; package.json
// pins a release that supports Node 20, and the warning would land in every CLI run's stderr.
process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= 'true';

type Sdk = typeof import('@aws-sdk/client-s3');
let sdkModule: Sdk | undefined;
/** Where `npm run build` puts the SDK's bundle (./s3-sdk.ts): beside the CLI's bundle, whose code this is then. */
const SDK_BUNDLE = path.join(__dirname, 's3-sdk.bundle.js');
/**
 * The AWS SDK, loaded the first time it is needed. From the package's ~300 files it takes ~90
 * ms to load and ~40 ms more in the first request. The CLI loads it from one bundle with a
 * code cache made at build time (../../engine/bundle.ts): ~45-75 ms and ~30 ms (README,
 * "Design", esbuild). Elsewhere (the library, tests run from the sources) it comes from the
 * package.
 */
export function sdk(): Sdk {
  // A package, not a module of src/: the layer check's "no lazy require" rule is about the latter.
  return (sdkModule ??= loadScript<Sdk>(SDK_BUNDLE, cacheFileOf(SDK_BUNDLE))?.exports ?? (require('@aws-sdk/client-s3') as Sdk));
}

export interface SdkOpsOptions {
  bucket: string;
  endpoint: string | undefined;
  credentials: S3Credentials | undefined;
  httpAgent: HttpModule.Agent;
  httpsAgent: HttpsModule.Agent;
  /** socket inactivity limit (ms) */
  timeoutMs: number;
}

export class SdkOps implements S3Ops {
  private made: S3Client | undefined;

  constructor(private readonly o: SdkOpsOptions) {}

  /** The client, made at the first use. */
  get client(): S3Client {
    return (this.made ??= new (sdk().S3Client)({
      endpoint: this.o.endpoint,
      credentials: this.o.credentials,
      forcePathStyle: true,
      maxAttempts: 1,
      requestChecksumCalculation: 'WHEN_REQUIRED',
      responseChecksumValidation: 'WHEN_REQUIRED',
      requestHandler: {
        httpAgent: this.o.httpAgent,
        httpsAgent: this.o.httpsAgent,
        connectionTimeout: 10_000,
        // socketTimeout, not requestTimeout: in @smithy/node-http-handler 4 the latter only
        // logs a warning (unless throwOnRequestTimeout), so a server that took a request and
        // never answered hung the command for ever. This is inactivity, not total time.
        socketTimeout: this.o.timeoutMs,
      },
    }));
  }

  /** The credentials the SDK's chain resolves (for ./s3-wire.ts when the environment has none). */
  credentials(): Promise<S3Credentials> {
    return this.client.config.credentials();
  }

  /** The region the SDK's configuration resolves (AWS_REGION, the profile's region). */
  region(): Promise<string> {
    return this.client.config.region();
  }

  async get(key: string, o: { range?: string; ifMatch?: string } = {}): Promise<GetAnswer> {
    const r = await this.client.send(new (sdk().GetObjectCommand)({ Bucket: this.o.bucket, Key: key, Range: o.range, IfMatch: o.ifMatch }));
    return { body: r.Body as Readable, length: r.ContentLength, contentRange: r.ContentRange, etag: r.ETag ?? '' };
  }

  async put(key: string, body: Buffer, o: PutOptions = {}): Promise<string> {
    const cmd = new (sdk().PutObjectCommand)({ Bucket: this.o.bucket, Key: key, Body: body, ContentLength: body.length, IfNoneMatch: o.ifNoneMatch ? '*' : undefined, IfMatch: o.ifMatch });
    if (o.payloadHash) withPayloadHash(cmd, o.payloadHash);
    return (await this.client.send(cmd)).ETag ?? '';
  }

  async head(key: string): Promise<{ size: number; etag: string }> {
    const r = await this.client.send(new (sdk().HeadObjectCommand)({ Bucket: this.o.bucket, Key: key }));
    return { size: r.ContentLength ?? 0, etag: r.ETag ?? '' };
  }

  async delete(key: string): Promise<void> {
    await this.client.send(new (sdk().DeleteObjectCommand)({ Bucket: this.o.bucket, Key: key }));
  }

  async list(prefix: string | undefined, token: string | undefined, maxKeys: number): Promise<ListPage> {
    const page = await this.client.send(new (sdk().ListObjectsV2Command)({ Bucket: this.o.bucket, Prefix: prefix, ContinuationToken: token, MaxKeys: maxKeys }));
    const objects = (page.Contents ?? []).filter((c) => c.Key).map((c) => ({ key: c.Key as string, size: c.Size ?? 0 }));
    return { objects, next: page.IsTruncated ? page.NextContinuationToken : undefined };
  }

  async headBucket(): Promise<void> {
    await this.client.send(new (sdk().HeadBucketCommand)({ Bucket: this.o.bucket }));
  }

  destroy(): void {
    this.made?.destroy();
  }
}

/**
 * Signs a PUT with a payload hash the caller already has (x-amz-content-sha256 is read by the
 * signer before it would hash the body itself: src @smithy/signature-v4 getPayloadHash). The
 * server hashes what it receives and answers 400 XAmzContentSHA256Mismatch when they differ.
 */
function withPayloadHash(cmd: { middlewareStack: { add: (mw: never, opts: { step: 'build'; name: string }) => void } }, hex: string): void {
  const mw = (next: (a: unknown) => Promise<unknown>) => async (args: { request?: { headers?: Record<string, string> } }) => {
    if (args.request?.headers) args.request.headers['x-amz-content-sha256'] = hex;
    return next(args);
  };
  cmd.middlewareStack.add(mw as never, { step: 'build', name: 'disksnapPayloadHash' });
}
