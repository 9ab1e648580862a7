/**
 * A real S3 for tests: the one-node Ceph cluster with the RADOS Gateway of .ci/ceph.sh,
 * started on first use (once per test file; a running one is reused) and left running for
 * the next file — `.ci/ceph.sh stop` (which .ci/run calls at the end) removes it.
 *
 *   const skip = cephMissing();                     // tap `{ skip }`; throws under REQUIRE_TOOLS
 *   const s3 = await ceph();                        // endpoint + credentials, also put in process.env
 *   const url = await newBucket(t, 'snap');         // s3://<fresh bucket>
 *
 * The gateway listens on 127.0.0.1 only; DISKSNAP_CEPH_PORT picks the port (default 7480).
 */
import { spawn, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import { missing } from './tools';

export const CEPH_SCRIPT = path.resolve(__dirname, '..', '..', '.ci', 'ceph.sh');

export interface CephS3 {
  endpoint: string;
  accessKeyId: string;
  secretAccessKey: string;
  region: string;
  /** the KEY=VALUE lines of the cluster's env file, for child processes */
  env: Record<string, string>;
  rgwPidFile: string;
}

/** Skip reason when the Ceph packages are missing (tap `{ skip }`), else false. */
export function cephMissing(): string | false {
  return missing({ commands: ['ceph-mon', 'ceph-osd', 'radosgw', 'radosgw-admin', 'ceph', 'ceph-authtool', 'curl'] });
}

let started: CephS3 | undefined;

function parseEnv(text: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const m = /^([A-Z0-9_]+)=(.*)$/.exec(line.trim());
    if (m) env[m[1]] = m[2];
  }
  return env;
}

/** Starts the cluster unless it runs; sets AWS_* in process.env so the SDK chain finds them. */
export async function ceph(): Promise<CephS3> {
  if (started) return started;
  const r = spawnSync('bash', [CEPH_SCRIPT, 'start'], { encoding: 'utf8', timeout: 300_000 });
  if (r.status !== 0) throw new Error(`.ci/ceph.sh start failed (exit ${r.status}): ${r.stderr.trim().split('\n').slice(-5).join(' | ')}`);
  const env = parseEnv(r.stdout);
  for (const k of ['AWS_ENDPOINT_URL', 'AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_REGION']) {
    if (!env[k]) throw new Error(`.ci/ceph.sh start printed no ${k}`);
    process.env[k] = env[k];
  }
  started = {
    endpoint: env.AWS_ENDPOINT_URL,
    accessKeyId: env.AWS_ACCESS_KEY_ID,
    secretAccessKey: env.AWS_SECRET_ACCESS_KEY,
    region: env.AWS_REGION,
    env,
    rgwPidFile: env.DISKSNAP_CEPH_RGW_PIDFILE,
  };
  return started;
}

let admin: S3Client | undefined;

/** A new empty bucket with a unique name; returns `s3://NAME` (or `s3://NAME/PREFIX`). */
export async function newBucket(label = 't', prefix?: string): Promise<string> {
  const s3 = await ceph();
  admin ??= new S3Client({
    endpoint: s3.endpoint,
    region: s3.region,
    forcePathStyle: true,
    credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey },
  });
  const name = `${label.toLowerCase().replace(/[^a-z0-9-]/g, '-').slice(0, 30)}-${randomBytes(5).toString('hex')}`;
  await admin.send(new CreateBucketCommand({ Bucket: name }));
  return `s3://${name}${prefix ? '/' + prefix : ''}`;
}

/** SIGKILLs the gateway (mon and OSD keep running, so the data survives). */
export function killGateway(): void {
  const r = spawnSync('bash', [CEPH_SCRIPT, 'kill-rgw'], { encoding: 'utf8', timeout: 30_000 });
  if (r.status !== 0) throw new Error(`.ci/ceph.sh kill-rgw failed: ${r.stderr.trim()}`);
}

/** Brings a killed gateway back and waits until it answers. */
export function restartGateway(): void {
  const r = spawnSync('bash', [CEPH_SCRIPT, 'start'], { encoding: 'utf8', timeout: 300_000 });
  if (r.status !== 0) throw new Error(`.ci/ceph.sh start failed: ${r.stderr.trim()}`);
}

/** `restartGateway` without blocking the event loop (work in flight keeps running). */
export function restartGatewayAsync(): Promise<void> {
  return new Promise((resolve, reject) => {
    const c = spawn('bash', [CEPH_SCRIPT, 'start'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    c.stderr.on('data', (d) => (err += d));
    c.on('error', reject);
    c.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`.ci/ceph.sh start failed: ${err.trim()}`))));
  });
}

export function gatewayPid(): number | undefined {
  const f = started?.rgwPidFile;
  if (!f || !fs.existsSync(f)) return undefined;
  return Number(fs.readFileSync(f, 'utf8').trim()) || undefined;
}
