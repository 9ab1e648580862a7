/**
 * Leases: locks for a store that many hosts share through an S3 bucket, where no local lock
 * can reach. A lease is a small JSON object written with conditional PUTs:
 *
 *   take      PUT key, If-None-Match: *            412: someone holds it, or held it —
 *             then GET it: live -> ELOCKED naming the holder; expired or released ->
 *             PUT key, If-Match: <its ETag> (412 again: another taker won -> ELOCKED)
 *   renew     PUT key, If-Match: <our ETag>        412: the lease ran out and was taken
 *   release   PUT key, If-Match: <our ETag> with `released: true`; a lease whose key is unique
 *             to its holder (a writer's, a shared lock's) is deleted instead: nobody else
 *             writes such a key
 *
 * Body: {holder, host, pid, purpose, acquired, expires (ms since the epoch), released}. A
 * holder renews every ttl/3 (`startHeartbeat`), so a crashed holder's lease runs out within
 * one ttl; expiry is judged on the reader's clock, so hosts' clocks must agree to within a
 * fraction of the ttl (60 s by default; DISKSNAP_S3_LEASE_TTL_MS for tests).
 *
 * A lost answer is harmless: a take retried after its PUT landed finds a live lease with its
 * own holder id and adopts it.
 *
 * The store lock built on leases (S3StoreLock), the counterpart of the directory store's OFD
 * lock on STORE/lock:
 *
 *   shared     (snapshot create, restore, verify, delete, copy): the lease
 *              `locks/shared/<holder id>`, taken first, then `locks/gc` checked: live -> give
 *              the shared lease back and wait (or ELOCKED)
 *   exclusive  (gc): `locks/gc` taken first, then `locks/shared/` listed: any live lease ->
 *              give `locks/gc` back and wait (or ELOCKED)
 *
 * Both sides write before they look, and the server is strongly consistent (a LIST or GET
 * after a PUT sees it), so of a writer and a gc starting at once at least one sees the other:
 * gc never runs beside a live writer on any host, which is what keeps it from deleting a block
 * a snapshot in progress has found present and will reference. A holder whose heartbeat
 * fails (the lease ran out and was taken) is told through `lost`, and must not complete.
 *
 * gc is refused on a server that ignores conditional writes (S3Backend.conditionalWriteProblem):
 * there two gcs, or a gc and a writer, could both believe they hold the store.
 */
import * as os from 'node:os';
import { randomBytes } from 'node:crypto';
import { DisksnapError } from '../../engine/errors';
import type { S3Backend } from './s3';

export interface LeaseBody {
  holder: string;
  host: string;
  pid: number;
  purpose: string;
  acquired: string;
  expires: number;
  released: boolean;
}

export function defaultLeaseTtl(): number {
  const env = Number(process.env.DISKSNAP_S3_LEASE_TTL_MS);
  return Number.isFinite(env) && env >= 100 ? env : 60_000;
}

/** A holder id unique to this process and call. */
export function newHolderId(): string {
  return `${os.hostname().replace(/[^A-Za-z0-9.-]/g, '_')}-${process.pid}-${randomBytes(6).toString('hex')}`;
}

function parseLease(where: string, data: Buffer): LeaseBody | undefined {
  try {
    const v = JSON.parse(data.toString('utf8')) as LeaseBody;
    if (typeof v.holder === 'string' && typeof v.expires === 'number') return v;
  } catch {
    // Unparseable: treated as not a lease (below), which a taker may overwrite.
  }
  void where;
  return undefined;
}

export function leaseIsLive(b: LeaseBody | undefined, now = Date.now()): boolean {
  return !!b && !b.released && b.expires > now;
}

export function describeHolder(b: LeaseBody): string {
  return `${b.purpose} by pid ${b.pid} on ${b.host}, lease valid for ${Math.max(0, Math.round((b.expires - Date.now()) / 1000))} s more`;
}

export class S3Lease {
  private heartbeat: NodeJS.Timeout | undefined;
  private renewing: Promise<void> | undefined;
  /** set when a renewal found the lease taken by someone else */
  lost: DisksnapError | undefined;

  private constructor(
    readonly backend: S3Backend,
    readonly key: string,
    readonly holder: string,
    readonly purpose: string,
    readonly ttlMs: number,
    private etag: string,
  ) {}

  private body(released = false): Buffer {
    const b: LeaseBody = {
      holder: this.holder,
      host: os.hostname(),
      pid: process.pid,
      purpose: this.purpose,
      acquired: new Date().toISOString(),
      expires: released ? 0 : Date.now() + this.ttlMs,
      released,
    };
    return Buffer.from(JSON.stringify(b) + '\n');
  }

  /** The lease at `key`, or ELOCKED naming its live holder. */
  static async take(backend: S3Backend, key: string, opts: { purpose: string; holder?: string; ttlMs?: number }): Promise<S3Lease> {
    const lease = new S3Lease(backend, key, opts.holder ?? newHolderId(), opts.purpose, opts.ttlMs ?? defaultLeaseTtl(), '');
    const first = await backend.putConditional(key, lease.body(), undefined);
    if (first !== undefined) {
      lease.etag = first;
      return lease;
    }
    const cur = await S3Lease.inspect(backend, key);
    if (cur === undefined) {
      // Released and deleted between our PUT and our GET: one more try, then give up.
      const again = await backend.putConditional(key, lease.body(), undefined);
      if (again === undefined) throw lease.busy(undefined);
      lease.etag = again;
      return lease;
    }
    if (cur.body?.holder === lease.holder && !cur.body.released) {
      lease.etag = cur.etag; // our own PUT, whose answer was lost
      return lease;
    }
    if (leaseIsLive(cur.body)) throw lease.busy(cur.body);
    const taken = await backend.putConditional(key, lease.body(), cur.etag);
    if (taken === undefined) throw lease.busy(undefined);
    lease.etag = taken;
    return lease;
  }

  private busy(b: LeaseBody | undefined): DisksnapError {
    return new DisksnapError(
      `${this.backend.describe(this.key)} is held${b ? ` (${describeHolder(b)})` : ' by another process'}`,
      'ELOCKED',
      undefined,
      this.backend.describe(this.key),
    );
  }

  /** The lease object at `key` with its ETag; undefined when there is none. */
  static async inspect(backend: S3Backend, key: string): Promise<{ body: LeaseBody | undefined; etag: string } | undefined> {
    const r = await backend.getWithEtag(key);
    if (!r) return undefined;
    return { body: parseLease(backend.describe(key), r.data), etag: r.etag };
  }

  /**
   * Extends the lease by its ttl; ELOCKED when it ran out and another holder took it.
   * Renewals (the heartbeat's and a caller's) run one after the other: two at once would
   * both send the same If-Match, and the second would look like a lost lease.
   */
  renew(): Promise<void> {
    const p = this.queue.then(() => this.renewOnce());
    this.queue = p.catch(() => undefined);
    return p;
  }

  private queue: Promise<void> = Promise.resolve();

  private async renewOnce(): Promise<void> {
    if (this.lost) throw this.lost;
    const etag = await this.backend.putConditional(this.key, this.body(), this.etag);
    if (etag === undefined) {
      this.lost = new DisksnapError(
        `lost the lease ${this.backend.describe(this.key)} (${this.purpose}): it ran out before it was renewed and another process took it`,
        'ELOCKED',
        undefined,
        this.backend.describe(this.key),
      );
      throw this.lost;
    }
    this.etag = etag;
  }

  /** Renews every ttl/3 until release; a failure is kept in `lost` (and tried again if transient). */
  startHeartbeat(onLost?: (e: DisksnapError) => void): void {
    if (this.heartbeat) return;
    this.heartbeat = setInterval(() => {
      if (this.renewing || this.lost) return;
      this.renewing = this.renew()
        .catch((e) => {
          if (this.lost) onLost?.(this.lost);
          // A transient failure (gateway down) is tried again at the next tick; the lease
          // runs out only if that keeps failing for a whole ttl.
          else void e;
        })
        .finally(() => {
          this.renewing = undefined;
        });
    }, Math.max(50, Math.floor(this.ttlMs / 3)));
    this.heartbeat.unref();
  }

  /** Throws when the lease was lost (a holder checks this before it completes anything). */
  assertHeld(): void {
    if (this.lost) throw this.lost;
  }

  /** Gives the lease back; with `remove`, deletes its object (keys unique to one holder). */
  async release(opts: { remove?: boolean } = {}): Promise<void> {
    if (this.heartbeat) clearInterval(this.heartbeat);
    this.heartbeat = undefined;
    await this.renewing;
    await this.queue;
    if (this.lost) return;
    // A key unique to its holder is written by nobody else (others only delete it once it
    // ran out): it goes in one request, without being marked released first.
    if (opts.remove) return void (await this.backend.remove(this.key));
    const etag = await this.backend.putConditional(this.key, this.body(true), this.etag);
    if (etag === undefined) return; // ran out and taken by another holder: not ours to touch
    this.etag = etag;
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface S3LockOptions {
  waitMs?: number;
  onWait?: () => void;
  ttlMs?: number;
  purpose?: string;
}

/** The store lock of an S3 store (see the note at the top). */
export class S3StoreLock {
  private constructor(private lease: S3Lease | undefined) {}

  get held(): S3Lease | undefined {
    return this.lease;
  }

  static async acquire(backend: S3Backend, mode: 'shared' | 'exclusive', opts: S3LockOptions = {}): Promise<S3StoreLock> {
    if (mode === 'exclusive') {
      const why = await backend.conditionalWriteProblem();
      if (why) {
        throw new DisksnapError(
          `gc refused on ${backend.location}: the S3 server at ${backend.endpoint} does not support conditional writes (${why}); gc needs them for its lease, without which it could delete blocks that a snapshot being written on another host relies on`,
          'EUNSUPPORTED',
          undefined,
          backend.location,
        );
      }
    }
    const deadline = Date.now() + (opts.waitMs ?? 0);
    const holder = newHolderId();
    let told = false;
    for (;;) {
      const blocker = mode === 'shared' ? await S3StoreLock.tryShared(backend, holder, opts) : await S3StoreLock.tryExclusive(backend, holder, opts);
      if (blocker instanceof S3Lease) {
        blocker.startHeartbeat();
        return new S3StoreLock(blocker);
      }
      if (Date.now() >= deadline) {
        throw new DisksnapError(
          mode === 'exclusive'
            ? `store ${backend.location} is in use (${blocker}); gc needs it alone — try again when that finished`
            : `store ${backend.location} is locked by a running gc (${blocker}); try again when it finished`,
          'ELOCKED',
          undefined,
          backend.location,
        );
      }
      if (!told) opts.onWait?.();
      told = true;
      // Both sides write before they look, so a writer and a gc that keep colliding could
      // each back off for the other forever; the gc backs off longer, so writers get in
      // (gc waits for writers, as the directory store's exclusive lock does).
      await sleep(mode === 'shared' ? 50 + Math.random() * 150 : 1000 + Math.random() * 1000);
    }
  }

  /** The lease when the shared lock is ours, else what blocks it. */
  private static async tryShared(backend: S3Backend, holder: string, opts: S3LockOptions): Promise<S3Lease | string> {
    const lease = await S3Lease.take(backend, `locks/shared/${holder}`, { purpose: opts.purpose ?? 'a snapshot operation', holder, ttlMs: opts.ttlMs });
    const gc = await S3Lease.inspect(backend, 'locks/gc');
    if (gc && leaseIsLive(gc.body)) {
      await lease.release({ remove: true });
      return describeHolder(gc.body!);
    }
    return lease;
  }

  private static async tryExclusive(backend: S3Backend, holder: string, opts: S3LockOptions): Promise<S3Lease | string> {
    let lease: S3Lease;
    try {
      lease = await S3Lease.take(backend, 'locks/gc', { purpose: opts.purpose ?? 'gc', holder, ttlMs: opts.ttlMs });
    } catch (e) {
      if (e instanceof DisksnapError && e.code === 'ELOCKED') return `another gc: ${e.message}`;
      throw e;
    }
    const live: string[] = [];
    for await (const o of backend.list('locks/shared/')) {
      const cur = await S3Lease.inspect(backend, o.key);
      if (cur && leaseIsLive(cur.body)) live.push(describeHolder(cur.body!));
      else if (cur) await backend.delete(o.key); // a crashed writer's: ran out, nobody renews it
    }
    if (live.length) {
      await lease.release();
      return `${live.length} operation(s): ${live.join('; ')}`;
    }
    return lease;
  }

  assertHeld(): void {
    this.lease?.assertHeld();
  }

  /** Gives the lock back. */
  async release(): Promise<void> {
    const l = this.lease;
    this.lease = undefined;
    if (!l) return;
    await l.release({ remove: l.key.startsWith('locks/shared/') });
  }
}

/** What a Store hands out for a held lock or lease (src/storage/store/store.ts). */
export interface Held {
  release(): Promise<void>;
}

/** The store lock of a bucket; its lease joins `held` (renewed before a record completes). */
export async function lockBucket(
  remote: S3Backend,
  mode: 'shared' | 'exclusive',
  opts: { waitMs?: number; onWait?: () => void },
  held: Set<S3Lease>,
): Promise<Held> {
  const lock = await S3StoreLock.acquire(remote, mode, { waitMs: opts.waitMs, onWait: opts.onWait, purpose: mode === 'exclusive' ? 'gc' : 'a snapshot operation' });
  const lease = lock.held!;
  held.add(lease);
  return {
    release: async () => {
      held.delete(lease);
      await lock.release();
    },
  };
}

/** The lease `leases/<id>` of the process writing pending snapshot `id`, with its heartbeat. */
export async function takeSnapshotLease(remote: S3Backend, id: string, held: Set<S3Lease>): Promise<Held> {
  const lease = await S3Lease.take(remote, `leases/${id}`, { purpose: `writing snapshot ${id}` });
  lease.startHeartbeat();
  held.add(lease);
  return {
    release: async () => {
      held.delete(lease);
      await lease.release({ remove: true });
    },
  };
}

/** Whether the writer of pending snapshot `id` is gone: its lease is absent, released or ran out. */
export async function snapshotWriterGone(remote: S3Backend, id: string): Promise<boolean> {
  const cur = await S3Lease.inspect(remote, `leases/${id}`);
  return !cur || !leaseIsLive(cur.body);
}
