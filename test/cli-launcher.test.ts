/**
 * The executable's shell lines: node starts without NODE_EXTRA_CA_CERTS (node 20 parses that
 * file at start, ~40 ms), the user's value comes back for child processes, and an S3 store over
 * https with a private CA (a TLS front on the real Ceph gateway, its certificate made here by
 * openssl) is trusted through it, as with node's own handling of the variable.
 */
import t from 'tap';
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as net from 'node:net';
import * as path from 'node:path';
import * as tls from 'node:tls';
import { CLI, cliAsync } from './helpers/cli';
import { ceph, cephMissing, newBucket } from './helpers/ceph';
import { missing } from './helpers/tools';
import { MiB, makeImage, sha } from '../fixtures/store/helpers';
import { MOVED_EXTRA_CA, deferExtraCa, pemCertificates } from '../src/engine/extra-ca';
import { LAUNCHER, writeLauncher } from '../src/cli/executable';

/** Runs the executable itself (its shell lines start the runtime), as a shell would. */
function run(args: string[], env: NodeJS.ProcessEnv): { status: number | null; out: string; err: string } {
  const r = spawnSync(CLI, args, { env, encoding: 'utf8', maxBuffer: 1 << 26, timeout: 120_000 });
  if (r.error) throw r.error;
  return { status: r.status, out: r.stdout, err: r.stderr };
}

/** The environment without NODE_EXTRA_CA_CERTS (undefined: left out by spawn), plus `more`. */
function envWith(more: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  return { ...process.env, NODE_EXTRA_CA_CERTS: undefined, ...more };
}

/**
 * A preload (NODE_OPTIONS=--require) that records the variables as the process starts and as
 * it exits (what its children inherit).
 */
function probe(dir: string): { env: NodeJS.ProcessEnv; read(): { start: Record<string, string | null>; exit: Record<string, string | null> } } {
  const out = path.join(dir, 'probe.json');
  const script = path.join(dir, 'probe.js');
  fs.writeFileSync(
    script,
    `const fs = require('fs');
const pick = () => ({ NODE_EXTRA_CA_CERTS: process.env.NODE_EXTRA_CA_CERTS ?? null, ${MOVED_EXTRA_CA}: process.env.${MOVED_EXTRA_CA} ?? null });
const start = pick();
process.on('exit', () => fs.writeFileSync(${JSON.stringify(out)}, JSON.stringify({ start, exit: pick() })));
`,
  );
  return { env: { NODE_OPTIONS: `--require ${script}` }, read: () => JSON.parse(fs.readFileSync(out, 'utf8')) };
}

t.test('the executable starts node without NODE_EXTRA_CA_CERTS and gives it back to child processes', async (t) => {
  const dir = t.testdir();
  const pem = path.join(dir, 'extra.pem');
  fs.writeFileSync(pem, '');
  const p = probe(dir);
  const r = run(['--version'], envWith({ ...p.env, NODE_EXTRA_CA_CERTS: pem }));
  t.equal(r.status, 0, r.err);
  t.same(p.read(), {
    start: { NODE_EXTRA_CA_CERTS: null, [MOVED_EXTRA_CA]: pem },
    exit: { NODE_EXTRA_CA_CERTS: pem, [MOVED_EXTRA_CA]: null },
  });
  t.notMatch(r.err, /Ignoring extra certs/, 'nothing read where no TLS connection was made');

  const q = probe(dir);
  const none = run(['--version'], envWith(q.env));
  t.equal(none.status, 0, none.err);
  t.same(q.read(), { start: { NODE_EXTRA_CA_CERTS: null, [MOVED_EXTRA_CA]: '' }, exit: { NODE_EXTRA_CA_CERTS: null, [MOVED_EXTRA_CA]: null } }, 'no variable made up');
});

t.test('the executable begins with POSIX shell: busybox sh runs it as /bin/sh does; node reads a string and a comment', async (t) => {
  const dir = t.testdir();
  const pem = path.join(dir, 'extra.pem');
  fs.writeFileSync(pem, '');
  t.ok(fs.readFileSync(CLI, 'utf8').startsWith(LAUNCHER), 'the build put the launcher lines in place');
  t.ok(fs.statSync(CLI).mode & 0o111, 'executable');
  const direct = probe(dir);
  const byNode = spawnSync(process.execPath, [CLI, '--version'], { env: envWith({ ...direct.env, NODE_EXTRA_CA_CERTS: pem }), encoding: 'utf8' });
  t.equal(byNode.status, 0, byNode.stderr);
  t.same(direct.read().start, { NODE_EXTRA_CA_CERTS: pem, [MOVED_EXTRA_CA]: null }, 'run by node itself: the variable is node\'s, as before');
  const skip = missing({ commands: ['busybox'] });
  if (skip) return void t.skip(skip);
  const b = probe(dir);
  const bb = spawnSync('busybox', ['sh', CLI, '--version'], { env: envWith({ ...b.env, NODE_EXTRA_CA_CERTS: pem }), encoding: 'utf8' });
  t.equal(bb.status, 0, bb.stderr);
  t.match(bb.stdout, /^\d+\.\d+\.\d+\n$/, 'the version');
  t.equal(bb.stderr, '', 'nothing on stderr');
  t.same(b.read().start, { NODE_EXTRA_CA_CERTS: null, [MOVED_EXTRA_CA]: pem }, 'busybox sh: node started without it');
});

t.test('writeLauncher: the #! line becomes the launcher, once, executable; a file without one is refused', async (t) => {
  const dir = t.testdir();
  const f = path.join(dir, 'tool.js');
  fs.writeFileSync(f, '#!/usr/bin/env node\n"use strict";\nconsole.log(process.argv.slice(2).join(","));\n', { mode: 0o644 });
  writeLauncher(f);
  const text = fs.readFileSync(f, 'utf8');
  t.equal(text, `${LAUNCHER}"use strict";\nconsole.log(process.argv.slice(2).join(","));\n`);
  t.equal(fs.statSync(f).mode & 0o777, 0o755);
  const r = spawnSync(f, ['a b', 'c'], { encoding: 'utf8' });
  t.equal(r.stdout, 'a b,c\n', 'arguments pass through the shell unchanged');
  writeLauncher(f);
  t.equal(fs.readFileSync(f, 'utf8'), text, 'a second run changes nothing');
  const plain = path.join(dir, 'plain.js');
  fs.writeFileSync(plain, 'console.log(1)\n');
  t.throws(() => writeLauncher(plain), /does not start with a #! line/);
  t.same(fs.readdirSync(dir).sort(), ['plain.js', 'tool.js'], 'no temporary file left');
});

t.test('deferExtraCa: the moved value goes back under its own name; none, or started by node itself: nothing changes', async (t) => {
  const env: NodeJS.ProcessEnv = { [MOVED_EXTRA_CA]: '/etc/ca.pem', OTHER: 'x' };
  t.equal(deferExtraCa(env), '/etc/ca.pem');
  t.same(env, { NODE_EXTRA_CA_CERTS: '/etc/ca.pem', OTHER: 'x' });
  const empty: NodeJS.ProcessEnv = { [MOVED_EXTRA_CA]: '' };
  t.equal(deferExtraCa(empty), undefined);
  t.same(empty, {});
  const direct: NodeJS.ProcessEnv = { NODE_EXTRA_CA_CERTS: '/etc/ca.pem' };
  t.equal(deferExtraCa(direct), undefined);
  t.same(direct, { NODE_EXTRA_CA_CERTS: '/etc/ca.pem' });
});

t.test('pemCertificates: each certificate of a bundle, nothing else', async (t) => {
  const one = '-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----';
  const two = '-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----';
  t.same(pemCertificates(`# a comment\n${one}\n\njunk\n${two}\n`), [one, two]);
  t.same(pemCertificates('-----BEGIN PRIVATE KEY-----\nCCCC\n-----END PRIVATE KEY-----\n'), []);
  t.same(pemCertificates(''), []);
});

const tlsSkip = cephMissing() || missing({ commands: ['openssl'] });

t.test('an S3 store over https with a private CA: trusted through NODE_EXTRA_CA_CERTS, refused without it', { skip: tlsSkip }, async (t) => {
  const s3 = await ceph();
  const dir = t.testdir();
  const key = path.join(dir, 'key.pem');
  const cert = path.join(dir, 'cert.pem');
  const made = spawnSync('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', '/CN=disksnap test gateway', '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost'], { encoding: 'utf8' });
  t.equal(made.status, 0, made.status === 0 ? 'openssl made the certificate' : made.stderr);
  // TLS in front of the gateway; the bytes inside are the gateway's own.
  const gw = new URL(s3.endpoint);
  let connections = 0;
  const front = tls.createServer({ key: fs.readFileSync(key), cert: fs.readFileSync(cert) }, (sock) => {
    connections++;
    const up = net.connect(Number(gw.port), gw.hostname);
    sock.pipe(up).pipe(sock);
    sock.on('error', () => up.destroy());
    up.on('error', () => sock.destroy());
  });
  front.on('tlsClientError', () => undefined);
  await new Promise<void>((resolve) => front.listen(0, '127.0.0.1', resolve));
  t.teardown(() => new Promise<void>((resolve) => front.close(() => resolve())));
  const endpoint = `https://127.0.0.1:${(front.address() as net.AddressInfo).port}`;
  const url = await newBucket('tls');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, 4 * MiB, [{ offset: 0, length: 1 * MiB, seed: 41 }, { offset: 3 * MiB, length: 5000, seed: 42 }]);
  const env = (more: NodeJS.ProcessEnv) => envWith({ ...s3.env, AWS_ENDPOINT_URL: endpoint, DISKSNAP_S3_RETRIES: '2', ...more });

  const trusted = env({ NODE_EXTRA_CA_CERTS: cert });
  const c = await cliAsync(['snapshot', 'create', vol, '--store', url, '--json'], trusted);
  t.equal(c.status, 0, c.err);
  t.ok(connections > 0, 'through the TLS front');
  const out = path.join(dir, 'out.img');
  const r = await cliAsync(['snapshot', 'restore', JSON.parse(c.out).id, '--to', out, '--store', url], trusted);
  t.equal(r.status, 0, r.err);
  t.equal(sha(out), sha(vol), 'restored byte for byte');

  const bundle = path.join(dir, 'bundle.pem');
  fs.writeFileSync(bundle, `# a bundle of two\n${fs.readFileSync(path.join(__dirname, '..', 'fixtures', 'tls', 'other-ca.pem'), 'utf8')}\n${fs.readFileSync(cert, 'utf8')}`);
  const l = await cliAsync(['snapshot', 'list', '--store', url, '--json'], env({ NODE_EXTRA_CA_CERTS: bundle }));
  t.equal(l.status, 0, l.err);
  t.equal(JSON.parse(l.out).snapshots.length, 1, 'the certificate found in a bundle');

  for (const [label, more] of [
    ['no NODE_EXTRA_CA_CERTS', {}],
    ['a file with no certificate', { NODE_EXTRA_CA_CERTS: key }],
    ['a missing file', { NODE_EXTRA_CA_CERTS: path.join(dir, 'nosuch.pem') }],
  ] as const) {
    const bad = await cliAsync(['snapshot', 'list', '--store', url], env(more));
    t.equal(bad.status, 1, label);
    t.match(bad.err, /^disksnap: S3 at https:\/\/127\.0\.0\.1:\d+: its TLS certificate is not trusted \(self[- ]signed certificate, DEPTH_ZERO_SELF_SIGNED_CERT\): for a private CA, set NODE_EXTRA_CA_CERTS to its PEM file \(EACCES\)$/m, `${label}: the error names the certificate`);
    t.equal(bad.err.split('\n').filter((l) => l.startsWith('disksnap:')).length, 1, `${label}: one line`);
    if ('NODE_EXTRA_CA_CERTS' in more) t.match(bad.err, /Ignoring extra certs from/, `${label}: warned, as node warns`);
  }
});
