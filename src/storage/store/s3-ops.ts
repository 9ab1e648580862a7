/**
 * The S3 requests the S3 backend (./s3.ts) makes, as one interface with two implementations:
 *
 *   ./s3-wire.ts      signed with SigV4 (the `aws4` package) and sent with node:http(s):
 *                     where an endpoint is configured (the local gateways this backend is
 *                     tested on), and no AWS SDK is loaded at all when the credentials and
 *                     the region are in the environment
 *   ./s3-sdk-ops.ts   the AWS SDK's S3 client: AWS itself (virtual-hosted buckets), `wire:
 *                     false` or DISKSNAP_S3_WIRE=sdk
 *
 * Keys here are full object keys (the store's prefix included). Errors have the shape ./s3.ts's
 * `classify` reads: the S3 error code as `name`/`Code`, the HTTP status as
 * `$metadata.httpStatusCode`, socket errors as node gives them. Retries, the in-flight bound
 * and messages live in ./s3.ts, the same for both.
 */
import type { Readable } from 'node:stream';

export interface GetAnswer {
  /** the body, unread: the caller reads it (./s3-wire.ts readBody) */
  body: Readable;
  /** Content-Length, when the server sent one */
  length: number | undefined;
  /** Content-Range of a ranged GET ("bytes 0-N/TOTAL"), when the server honoured the range */
  contentRange: string | undefined;
  etag: string;
}

export interface PutOptions {
  /** the body's SHA-256 (hex), when the caller has it: signed as the payload hash */
  payloadHash?: string;
  /** If-None-Match: * (a 412 when the key exists) */
  ifNoneMatch?: boolean;
  /** If-Match: this ETag (a 412 when the object is another) */
  ifMatch?: string;
}

export interface ListPage {
  objects: Array<{ key: string; size: number }>;
  /** the continuation token of the next page; undefined on the last */
  next: string | undefined;
}

export interface S3Ops {
  get(key: string, o?: { range?: string; ifMatch?: string }): Promise<GetAnswer>;
  /** A whole object, read into `into` when it fits (where given, the path for block GETs). */
  getInto?(key: string, into: Buffer | undefined): Promise<Buffer>;
  /** Resolves with the new object's ETag ('' when the server sent none). */
  put(key: string, body: Buffer, o?: PutOptions): Promise<string>;
  head(key: string): Promise<{ size: number; etag: string }>;
  delete(key: string): Promise<void>;
  /** One ListObjectsV2 page of keys under `prefix`. */
  list(prefix: string | undefined, token: string | undefined, maxKeys: number): Promise<ListPage>;
  headBucket(): Promise<void>;
  /** Lets go of what the implementation holds (the SDK client). */
  destroy(): void;
}

/** An S3 credential set, as the SDK's provider chain resolves it. */
export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}
