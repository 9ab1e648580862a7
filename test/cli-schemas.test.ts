/**
 * The JSON Schemas of the CLI's documents (schemas/, test/helpers/schemas.ts):
 * - the shipped files are what the TypeScript types generate (DISKSNAP_WRITE_SCHEMAS=1 rewrites them);
 * - every schema compiles in ajv's strict mode, and every document name the CLI's source prints has one;
 * - a tour runs each command with --json / --output json once: cli() validates every document,
 *   and the tour checks it met every schema (the few it cannot run here are named, with where they are run);
 * - the check can fail: broken copies of real documents are rejected;
 * - --output json of the snapshot commands is EC2's document (names, shapes, units).
 */
import t from 'tap';
import type { Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { cli } from './helpers/cli';
import { assertValid, generateSchemas, schemaFiles, SCHEMA_DIR, validated, validatorOf, ROOT } from './helpers/schemas';
import { missing } from './helpers/tools';

const GIB = 1024 ** 3;

function ok(t: Test, args: string[], env?: NodeJS.ProcessEnv): unknown {
  const r = cli(args, { env });
  t.equal(r.status, 0, `disksnap ${args.join(' ')}: exit 0 ${r.status !== 0 ? r.stderr : ''}`);
  return r.out.trim().startsWith('{') || r.out.trim().startsWith('[') ? JSON.parse(r.out) : undefined;
}

t.test('the shipped schemas are the ones the types generate', async (t) => {
  const generated = generateSchemas();
  if (process.env.DISKSNAP_WRITE_SCHEMAS === '1') {
    fs.mkdirSync(SCHEMA_DIR, { recursive: true });
    for (const f of fs.readdirSync(SCHEMA_DIR)) if (f.endsWith('.schema.json')) fs.rmSync(path.join(SCHEMA_DIR, f));
    for (const [n, s] of generated) fs.writeFileSync(path.join(SCHEMA_DIR, `${n}.schema.json`), JSON.stringify(s, null, 2) + '\n');
  }
  const files = schemaFiles();
  t.same([...files.keys()].sort(), [...generated.keys()].sort(), 'one file per document name, no other (npm run schemas rewrites them)');
  for (const [n, s] of generated) t.same(files.get(n), s, `schemas/${n}.schema.json is current (npm run schemas)`);
  const pkg = JSON.parse(fs.readFileSync(path.join(ROOT, 'package.json'), 'utf8')) as { files: string[] };
  t.ok(pkg.files.includes('schemas'), 'package.json ships schemas/');
});

t.test('every schema compiles (ajv strict); every document name in the CLI source has a schema', async (t) => {
  const files = schemaFiles();
  for (const n of files.keys()) t.doesNotThrow(() => validatorOf(n), `${n} compiles`);
  const names = new Set<string>();
  const dir = path.join(ROOT, 'src', 'cli');
  for (const f of fs.readdirSync(dir)) {
    const text = fs.readFileSync(path.join(dir, f), 'utf8');
    for (const m of text.matchAll(/(?:printJson|printQemuJson|traceDocument)\(\s*'([a-z0-9-]+)'/g)) names.add(m[1]);
    for (const m of text.matchAll(/\? '([a-z0-9-]+)' : '([a-z0-9-]+)'/g)) if (files.has(m[1]) && files.has(m[2])) names.add(m[1]).add(m[2]);
  }
  t.ok(names.size > 40, `the scan found the printed names (${names.size})`);
  for (const n of names) t.ok(files.has(n), `'${n}' printed by src/cli has schemas/${n}.schema.json`);
});

t.test('the check can fail: broken copies of real documents are rejected', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const img = path.join(dir, 'v.img');
  ok(t, ['create', img, '1M']);
  ok(t, ['write', img, '0'], undefined);
  const rec = ok(t, ['snapshot', 'create', img, '--store', store, '--tag', 'a=b', '--json']) as Record<string, unknown>;
  t.doesNotThrow(() => assertValid('snapshot', rec, 'test'), 'the real document passes');
  const broken: Array<[string, Record<string, unknown>]> = [
    ['a required key missing', Object.fromEntries(Object.entries(rec).filter(([k]) => k !== 'volumeId'))],
    ['a key the type does not declare', { ...rec, surprise: 1 }],
    ['a wrong type', { ...rec, progress: '100' }],
    ['a value outside its enum', { ...rec, state: 'done' }],
    ['tags as EC2 writes them (a list)', { ...rec, tags: [{ Key: 'a', Value: 'b' }] }],
  ];
  for (const [what, doc] of broken) t.throws(() => assertValid('snapshot', doc, 'test'), new RegExp(`'snapshot' document`), `${what}: rejected`);
  const ec2 = ok(t, ['snapshot', 'show', String(rec.id), '--store', store, '--output', 'json']) as { Snapshots: Array<Record<string, unknown>> };
  t.throws(() => assertValid('ec2-describe-snapshots', { Snapshots: [{ ...ec2.Snapshots[0], Progress: 100 }] }, 'test'), /ec2-describe-snapshots/, 'EC2 Progress as a number: rejected');
  t.throws(() => assertValid('ec2-describe-snapshots', { snapshots: ec2.Snapshots }, 'test'), /ec2-describe-snapshots/, "disksnap's key name in EC2's document: rejected");
  t.throws(() => assertValid('progress-event', { message_type: 'status', command: 'x', phase: '', percent_done: 1.5, seconds_elapsed: 0 }, 'test'), /progress-event/, 'percent_done past 1: rejected');
});

t.test("--output json of the snapshot commands is EC2's document", async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const img = path.join(dir, 'v.img');
  ok(t, ['create', img, '64M']);
  fs.writeFileSync(path.join(dir, 'data'), Buffer.alloc(65536, 7));
  ok(t, ['write', img, '0', '--input', path.join(dir, 'data')]);
  const own = ok(t, ['snapshot', 'create', img, '--store', store, '--description', 'first', '--tag', 'env=ci', '--tag', 'team=qa', '--json']) as Record<string, unknown>;
  const show = ok(t, ['snapshot', 'show', String(own.id), '--store', store, '--output', 'json']) as { Snapshots: Array<Record<string, unknown>> };
  t.same(Object.keys(show), ['Snapshots'], 'describe-snapshots: {"Snapshots": [...]}');
  const s = show.Snapshots[0];
  t.equal(s.SnapshotId, own.id);
  t.equal(s.VolumeId, own.volumeId);
  t.equal(s.State, 'completed');
  t.equal(s.Progress, '100%', 'Progress is a string with %');
  t.equal(s.VolumeSize, Math.ceil((64 << 20) / GIB), 'VolumeSize in GiB, rounded up (64 MiB -> 1)');
  t.equal(s.Description, 'first');
  t.same(s.Tags, [{ Key: 'env', Value: 'ci' }, { Key: 'team', Value: 'qa' }], 'Tags as [{Key, Value}]');
  t.equal(s.Encrypted, false);
  t.equal(s.StartTime, own.startTime);
  t.equal(s.CompletionTime, own.completionTime);
  t.notOk('KmsKeyId' in s, 'no KmsKeyId when not encrypted');
  t.ok(Object.keys(s).every((k) => /^[A-Z]/.test(k)), 'every key in EC2 PascalCase');

  const created = ok(t, ['snapshot', 'create', img, '--store', store, '--output', 'json']) as Record<string, unknown>;
  t.match(created, { SnapshotId: /^snap-/, State: 'completed', Progress: '100%', VolumeSize: 1 }, 'create-snapshot: the snapshot itself');
  t.notOk('Tags' in created, 'no Tags key when there are none (as EC2)');
  const list = ok(t, ['snapshot', 'list', '--store', store, '--output', 'json']) as { Snapshots: Array<{ SnapshotId: string }> };
  t.same(list.Snapshots.map((x) => x.SnapshotId), [own.id, created.SnapshotId], 'describe-snapshots lists both, oldest first');
  const copy = ok(t, ['snapshot', 'copy', String(own.id), '--store', store, '--to-store', path.join(dir, 'region2'), '--output', 'json']) as Record<string, unknown>;
  t.match(copy, { SnapshotId: /^snap-/ }, 'copy-snapshot: {"SnapshotId"}');
  t.not(copy.SnapshotId, own.id, 'the copy has its own id');
  const lock = ok(t, ['snapshot', 'lock', String(own.id), '--until', '2d', '--store', store, '--output', 'json']) as Record<string, unknown>;
  t.match(lock, { SnapshotId: own.id, LockState: 'governance', LockExpiresOn: /^\d{4}-/ }, 'lock-snapshot');
  t.same(ok(t, ['snapshot', 'unlock', String(own.id), '--store', store, '--output', 'json']), { SnapshotId: own.id }, 'unlock-snapshot');
  const vols = ok(t, ['volume', 'list', '--store', store, '--output', 'json']) as { Volumes: Array<Record<string, unknown>> };
  t.match(vols.Volumes, [{ VolumeId: own.volumeId, Size: 1, Encrypted: false, State: 'available' }], 'describe-volumes');
  ok(t, ['store', 'bin', '--retention', '1d', '--store', store, '--json']);
  ok(t, ['snapshot', 'delete', String(created.SnapshotId), '--store', store, '--json']);
  const bin = ok(t, ['snapshot', 'list', '--in-bin', '--store', store, '--output', 'json']) as { Snapshots: Array<Record<string, unknown>> };
  t.match(bin.Snapshots, [{ SnapshotId: created.SnapshotId, RecycleBinEnterTime: /^\d{4}-/, RecycleBinExitTime: /^\d{4}-/ }], 'list-snapshots-in-recycle-bin');
  const back = ok(t, ['snapshot', 'undelete', String(created.SnapshotId), '--store', store, '--output', 'json']) as Record<string, unknown>;
  t.match(back, { SnapshotId: created.SnapshotId, State: 'completed' }, 'restore-snapshot-from-recycle-bin');
  const both = cli(['snapshot', 'list', '--store', store, '--json', '--output', 'json']);
  t.equal(both.status, 2, '--json with --output json: bad usage');
  t.match(both.stderr, /cannot be combined/);
  const bad = cli(['snapshot', 'list', '--store', store, '--output', 'aws']);
  t.equal(bad.status, 2, '--output aws: bad usage, naming the formats');
  t.match(bad.stderr, /human.*json.*AWS CLI/);
});

/** One run of each command with its JSON output; cli() validates each document. */
t.test('a tour of every command with --json / --output json: every document matches its schema', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const img = path.join(dir, 'v.img');
  const f = (n: string): string => path.join(dir, n);
  fs.writeFileSync(f('data'), Buffer.alloc(1 << 20, 3));
  fs.writeFileSync(f('key'), Buffer.alloc(32, 9), { mode: 0o600 });
  ok(t, ['create', img, '8M', '--json']);
  ok(t, ['write', img, '0', '--input', f('data'), '--json']);
  ok(t, ['read', img, '0', '4096', '--to', f('out'), '--json']);
  ok(t, ['info', img, '--json']);
  ok(t, ['info', img, '--output', 'json']);
  ok(t, ['map', img, '--json']);
  ok(t, ['map', img, '--output', 'json']);
  ok(t, ['measure', img, '--output', 'json']);
  ok(t, ['bench', img, '--count', '16', '--json']);
  // differencing disks
  ok(t, ['diff', 'create', img, f('c.qcow2'), '--json']);
  ok(t, ['write', f('c.qcow2'), '4096', '--input', f('data'), '--json']);
  ok(t, ['info', f('c.qcow2'), '--backing-chain', '--output', 'json']);
  ok(t, ['diff', 'check', f('c.qcow2'), '--json']);
  ok(t, ['diff', 'check', f('c.qcow2'), '--output', 'json']);
  ok(t, ['diff', 'children', img, '--json']);
  ok(t, ['diff', 'flatten', f('c.qcow2'), f('flat.img'), '--json']);
  ok(t, ['diff', 'rollback', f('c.qcow2'), '--dry-run', '--json']);
  ok(t, ['diff', 'reset', f('c.qcow2'), '--json']);
  ok(t, ['diff', 'accept-parent', f('c.qcow2'), '--json']);
  ok(t, ['diff', 'commit', f('c.qcow2'), '--json']);
  // checkpoints
  ok(t, ['create', f('vm.img'), '4M']);
  ok(t, ['diff', 'create', f('vm.img'), f('vm.qcow2')]);
  ok(t, ['checkpoint', 'create', f('vm.qcow2'), 'a', '--json']);
  ok(t, ['checkpoint', 'create', f('vm.qcow2'), 'b', '--json']);
  ok(t, ['checkpoint', 'create', f('vm.qcow2'), 'c', '--json']);
  ok(t, ['checkpoint', 'list', f('vm.qcow2'), '--json']);
  ok(t, ['checkpoint', 'revert', f('vm.qcow2'), 'b', '--json']);
  ok(t, ['checkpoint', 'squash', f('vm.qcow2'), 'a', 'b', '--json']);
  ok(t, ['checkpoint', 'delete', f('vm.qcow2'), 'c', '--json']);
  ok(t, ['checkpoint', 'resume', f('vm.qcow2'), '--json']);
  // storage snapshots
  const storeArgs = ['--store', store];
  ok(t, ['store', 'init', ...storeArgs, '--json']);
  ok(t, ['key', 'generate', f('k2'), '--json']);
  ok(t, ['volume', 'register', img, ...storeArgs, '--json']);
  ok(t, ['volume', 'policy', img, '--keep-last', '5', ...storeArgs, '--json']);
  ok(t, ['volume', 'list', ...storeArgs, '--json']);
  ok(t, ['volume', 'list', ...storeArgs, '--output', 'json']);
  const s1 = ok(t, ['snapshot', 'create', img, ...storeArgs, '--tag', 'k=v', '--json']) as { id: string };
  ok(t, ['write', img, '65536', '--input', f('data')]);
  const s2 = ok(t, ['snapshot', 'create', img, ...storeArgs, '--json'], { DISKSNAP_PROGRESS_INTERVAL: '1' }) as { id: string };
  ok(t, ['snapshot', 'create', img, ...storeArgs, '--output', 'json']);
  ok(t, ['snapshot', 'list', ...storeArgs, '--json']);
  ok(t, ['snapshot', 'list', ...storeArgs, '--output', 'json']);
  ok(t, ['snapshot', 'show', s1.id, ...storeArgs, '--json']);
  ok(t, ['snapshot', 'show', s1.id, ...storeArgs, '--output', 'json']);
  ok(t, ['snapshot', 'tag', s1.id, 'x=y', ...storeArgs, '--json']);
  ok(t, ['snapshot', 'untag', s1.id, 'x', ...storeArgs, '--json']);
  ok(t, ['snapshot', 'diff', s1.id, s2.id, ...storeArgs, '--json']);
  ok(t, ['snapshot', 'verify', s2.id, ...storeArgs, '--json'], { DISKSNAP_PROGRESS_INTERVAL: '1' });
  ok(t, ['snapshot', 'restore', s1.id, '--to', f('r.img'), ...storeArgs, '--json']);
  ok(t, ['snapshot', 'lock', s1.id, '--until', '1h', ...storeArgs, '--json']);
  ok(t, ['snapshot', 'lock', s1.id, '--until', '2h', ...storeArgs, '--output', 'json']);
  ok(t, ['snapshot', 'unlock', s1.id, ...storeArgs, '--json']);
  ok(t, ['snapshot', 'unlock', s1.id, ...storeArgs, '--output', 'json']);
  ok(t, ['snapshot', 'copy', s1.id, ...storeArgs, '--to-store', f('store2'), '--json']);
  ok(t, ['snapshot', 'copy', s2.id, ...storeArgs, '--to-store', f('store2'), '--output', 'json']);
  ok(t, ['snapshot', 'copy', s1.id, ...storeArgs, '--to-store', f('store3'), '--encrypt', '--key-file', f('key'), '--json']);
  ok(t, ['store', 'bin', '--retention', '1d', ...storeArgs, '--json']);
  ok(t, ['snapshot', 'delete', s2.id, ...storeArgs, '--json']);
  ok(t, ['snapshot', 'list', '--in-bin', ...storeArgs, '--json']);
  ok(t, ['snapshot', 'list', '--in-bin', ...storeArgs, '--output', 'json']);
  ok(t, ['snapshot', 'undelete', s2.id, ...storeArgs, '--json']);
  ok(t, ['snapshot', 'delete', s2.id, ...storeArgs, '--json']);
  ok(t, ['snapshot', 'undelete', s2.id, ...storeArgs, '--output', 'json']);
  ok(t, ['snapshot', 'prune', '--keep-last', '1', '--dry-run', ...storeArgs, '--json']);
  ok(t, ['store', 'gc', ...storeArgs, '--dry-run', '--json']);
  const loopSkip = missing({ root: true, commands: ['losetup'] });
  if (!loopSkip) {
    ok(t, ['attach', f('flat.img'), '--json']);
    ok(t, ['detach', f('flat.img'), '--json']);
  }
  const cmp = f('report.json');
  ok(t, ['compare', '--generate', '4M', '--growth', '1', '--only', 'differencing-disk', '--dir', dir, '--json', cmp], { DISKSNAP_QUIET: '1' });

  // run elsewhere, not here: each needs a running QEMU (test/live-qmp.test.ts and
  // test/live-snapshot.test.ts print them through cli(), which validates them)
  const elsewhere = new Set(['diff-commit-live', 'snapshot-live', ...(loopSkip ? ['attach', 'detach'] : [])]);
  for (const n of schemaFiles().keys()) {
    if (elsewhere.has(n)) continue;
    t.ok(validated.has(n), `the tour printed and validated a '${n}' document`);
  }
});
