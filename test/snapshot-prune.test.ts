/**
 * `snapshot prune`: restic's forget rules per volume, on fabricated snapshot times (the policy
 * is a pure function of the records: a fake clock is just chosen start times), then the
 * command on a real store: dry run, removal, what stays restores, bad policies refused.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { decide, PrunePolicy } from '../src/storage/prune';
import { cli } from './helpers/cli';
import * as snap from '../src/storage';

function snaps(times: string[], tags: Record<number, Record<string, string>> = {}) {
  return times.map((startTime, i) => ({ id: `snap-${String(i).padStart(16, '0')}`, volumeId: 'vol-1', startTime, tags: tags[i] ?? {} }));
}

function kept(times: string[], policy: PrunePolicy, tags: Record<number, Record<string, string>> = {}): string[] {
  return decide(snaps(times, tags), policy)
    .filter((d) => d.keptBy.length > 0)
    .map((d) => d.startTime)
    .sort();
}

t.test('each --keep rule, as restic forget applies it (UTC buckets, the newest of each)', async (t) => {
  const hours = ['2026-03-01T10:05:00.000Z', '2026-03-01T10:50:00.000Z', '2026-03-01T11:10:00.000Z', '2026-03-01T12:00:00.000Z', '2026-03-02T09:00:00.000Z'];
  t.same(kept(hours, { last: 2 }), [hours[3], hours[4]], 'last 2: the two newest');
  t.same(kept(hours, { hourly: 3 }), [hours[2], hours[3], hours[4]], 'hourly 3: the newest of the three newest hours');
  t.same(kept(hours, { hourly: 10 }), [hours[1], hours[2], hours[3], hours[4]], 'hourly 10: one per hour that has a snapshot (10:50, not 10:05)');
  t.same(kept(hours, { daily: 2 }), [hours[3], hours[4]], 'daily 2: the newest of each day');
  // ISO weeks across a year boundary: Thu 2020-12-31 and Sun 2021-01-03 are week 53 of 2020
  const weeks = ['2020-12-31T12:00:00.000Z', '2021-01-03T12:00:00.000Z', '2021-01-04T12:00:00.000Z'];
  t.same(kept(weeks, { weekly: 2 }), [weeks[1], weeks[2]], 'weekly 2: ISO weeks (2020-W53 ends on Sunday 2021-01-03)');
  const months = ['2025-11-30T23:59:00.000Z', '2025-12-01T00:00:00.000Z', '2025-12-31T00:00:00.000Z', '2026-01-15T00:00:00.000Z'];
  t.same(kept(months, { monthly: 2 }), [months[2], months[3]], 'monthly 2');
  t.same(kept(months, { yearly: 5 }), [months[2], months[3]], 'yearly: one per year');
  t.same(kept(hours, { last: 1, daily: 2 }), [hours[3], hours[4]], 'rules are a union');
  t.same(kept(hours, { last: 1, tags: ['keep'] }, { 0: { keep: 'yes' } }), [hours[0], hours[4]], '--keep-tag KEY');
  t.same(kept(hours, { last: 1, tags: ['env=prod'] }, { 1: { env: 'prod' }, 2: { env: 'test' } }), [hours[1], hours[4]], '--keep-tag KEY=VALUE');
  const reasons = decide(snaps(hours), { last: 1, daily: 1 }).find((d) => d.startTime === hours[4])!.keptBy;
  t.same(reasons, ['last', 'daily'], 'every reason is reported');
  t.same(kept([], { last: 3 }), [], 'no snapshots: nothing to do');
  t.throws(() => decide(snaps(hours), {}), { code: 'EINVALID', message: /at least one --keep/ }, 'an empty policy would remove everything: refused');
  t.throws(() => decide(snaps(hours), { last: 0 }), { code: 'EINVALID' }, 'zero is not a count');
});

t.test('snapshot prune on a store: dry run, removal per volume, the kept ones restore', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const a = path.join(dir, 'a.img');
  const b = path.join(dir, 'b.img');
  fs.writeFileSync(b, Buffer.alloc(1 << 20, 9));
  const ids: string[] = [];
  for (const fill of [1, 2, 3]) {
    fs.writeFileSync(a, Buffer.alloc(1 << 20, fill));
    const r = cli(['snapshot', 'create', a, '--store', store, '--json']);
    t.equal(r.status, 0, r.stderr);
    ids.push((JSON.parse(r.out) as { id: string }).id);
  }
  const bSnap = (JSON.parse(cli(['snapshot', 'create', b, '--store', store, '--json']).out) as { id: string }).id;
  const listed = () => (JSON.parse(cli(['snapshot', 'list', '--store', store, '--json']).out) as { snapshots: { id: string }[] }).snapshots.map((s) => s.id).sort();

  const dry = cli(['snapshot', 'prune', '--keep-last', '1', '--dry-run', '--store', store, '--json']);
  t.equal(dry.status, 0, dry.stderr);
  const d = JSON.parse(dry.out) as { dryRun: boolean; kept: { id: string }[]; removed: { id: string }[] };
  t.equal(d.dryRun, true);
  t.same(d.removed.map((x) => x.id).sort(), [ids[0], ids[1]].sort(), 'would remove the two older snapshots of a.img');
  t.same(d.kept.map((x) => x.id).sort(), [ids[2], bSnap].sort(), 'and keep the newest of each volume');
  t.same(listed(), [...ids, bSnap].sort(), 'a dry run removes nothing');

  const real = cli(['snapshot', 'prune', '--keep-last', '1', '--store', store]);
  t.equal(real.status, 0, real.stderr);
  t.match(real.out, /2 kept, 2 removed/);
  t.same(listed(), [ids[2], bSnap].sort(), 'the two older ones are gone');
  const files = (d: string): string[] => fs.readdirSync(d, { recursive: true }).map(String).sort();
  const before = files(store);
  const dryGc = cli(['store', 'gc', '--dry-run', '--store', store, '--json']);
  t.equal(dryGc.status, 0, dryGc.stderr);
  const would = JSON.parse(dryGc.out) as { dryRun: boolean; blocksFreed: number };
  t.equal(would.dryRun, true);
  t.ok(would.blocksFreed >= 2, `gc --dry-run counts the pruned snapshots' blocks: ${would.blocksFreed}`);
  t.same(files(store), before, 'gc --dry-run deletes nothing');
  const realGc = cli(['store', 'gc', '--store', store, '--json']);
  t.equal(realGc.status, 0, 'gc after prune');
  t.equal((JSON.parse(realGc.out) as { blocksFreed: number }).blocksFreed, would.blocksFreed, 'and frees what the dry run counted');
  const out = path.join(dir, 'out.img');
  t.equal(cli(['snapshot', 'restore', ids[2], '--to', out, '--store', store]).status, 0);
  t.ok(fs.readFileSync(out).equals(fs.readFileSync(a)), 'the kept snapshot restores exactly after prune and gc');

  for (const bad of [[], ['--keep-last', '0'], ['--keep-daily', 'x'], ['--keep-tag', '=v']]) {
    const r = cli(['snapshot', 'prune', '--store', store, ...bad]);
    t.equal(r.status, 2, `prune ${bad.join(' ') || '(no rule)'} is bad usage`);
    t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  }
  t.same(listed(), [ids[2], bSnap].sort(), 'a refused prune removes nothing');
});

t.test('a lock keeps a snapshot through prune, in the pure policy too, until it runs out', async (t) => {
  const times = ['2026-03-01T10:00:00.000Z', '2026-03-02T10:00:00.000Z', '2026-03-03T10:00:00.000Z'];
  const now = Date.parse('2026-03-10T00:00:00.000Z');
  const locked = snaps(times).map((s, i) => ({ ...s, lockedUntil: i === 0 ? '2026-04-01T00:00:00.000Z' : i === 1 ? '2026-03-05T00:00:00.000Z' : null }));
  const d = decide(locked, { last: 1 }, now);
  t.same(d.find((x) => x.startTime === times[0])!.keptBy, ['locked until 2026-04-01T00:00:00.000Z'], 'a lock still running keeps it, and says so');
  t.same(d.find((x) => x.startTime === times[1])!.keptBy, [], 'an expired lock keeps nothing');
  t.same(d.find((x) => x.startTime === times[2])!.keptBy, ['last']);
});

t.test('snapshot lock --until refuses delete and prune; unlock, dry runs, and what a lock accepts', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const a = path.join(dir, 'a.img');
  const ids: string[] = [];
  for (const fill of [1, 2]) {
    fs.writeFileSync(a, Buffer.alloc(1 << 20, fill));
    ids.push((JSON.parse(cli(['snapshot', 'create', a, '--store', store, '--json']).out) as { id: string }).id);
  }
  const listed = () => (JSON.parse(cli(['snapshot', 'list', '--store', store, '--json']).out) as { snapshots: { id: string }[] }).snapshots.map((s) => s.id).sort();

  const lock = cli(['snapshot', 'lock', ids[0], '--until', '30d', '--store', store, '--json']);
  t.equal(lock.status, 0, lock.stderr);
  const until = (JSON.parse(lock.out) as { lockedUntil: string }).lockedUntil;
  const days = (Date.parse(until) - Date.now()) / 86400e3;
  t.ok(days > 29.9 && days <= 30, `locked for 30 days: until ${until}`);
  t.match(cli(['snapshot', 'show', ids[0], '--store', store]).out, /locked until\s+\S+ \(delete and prune refuse it\)/);

  const del = cli(['snapshot', 'delete', ids[0], '--store', store]);
  t.equal(del.status, 1);
  t.match(del.stderr, new RegExp(`snapshot ${ids[0]} is locked until ${until.replace(/\./g, '\\.')}: it cannot be deleted before then`));
  const dryLocked = cli(['snapshot', 'delete', ids[0], '--dry-run', '--store', store]);
  t.equal(dryLocked.status, 1, 'a dry run says a locked snapshot cannot be deleted');
  const prune = cli(['snapshot', 'prune', '--keep-last', '1', '--store', store, '--json']);
  t.equal(prune.status, 0, prune.stderr);
  t.same((JSON.parse(prune.out) as { removed: unknown[] }).removed, [], 'prune keeps the locked one');
  t.same(listed(), [...ids].sort(), 'nothing removed');

  // a lock is extended, never shortened by lock; times in the past and nonsense are refused
  t.equal(cli(['snapshot', 'lock', ids[0], '--until', '1d', '--store', store]).status, 1, 'a shorter lock is refused');
  t.equal(cli(['snapshot', 'lock', ids[0], '--until', '2020-01-01', '--store', store]).status, 1, 'a time in the past is refused');
  t.equal(cli(['snapshot', 'lock', ids[0], '--until', 'soon', '--store', store]).status, 2, 'not a time: bad usage');
  t.equal(cli(['snapshot', 'lock', ids[0], '--store', store]).status, 2, '--until is required');
  const later = cli(['snapshot', 'lock', ids[0], '--until', '2w', '--store', store]);
  t.equal(later.status, 1, '2 weeks is sooner than 30 days: refused');

  // the dry run of an unlocked snapshot deletes nothing
  const dry = cli(['snapshot', 'delete', ids[1], '--dry-run', '--store', store, '--json']);
  t.equal(dry.status, 0, dry.stderr);
  t.same(JSON.parse(dry.out), { deleted: ids[1], state: 'completed', dryRun: true });
  t.same(listed(), [...ids].sort(), 'a dry run deletes nothing');

  t.equal(cli(['snapshot', 'unlock', ids[0], '--store', store]).status, 0);
  t.notMatch(cli(['snapshot', 'show', ids[0], '--store', store]).out, /locked until/);
  t.equal(cli(['snapshot', 'delete', ids[0], '--store', store]).status, 0, 'unlocked: delete works');
  t.same(listed(), [ids[1]]);
  const out = path.join(dir, 'out.img');
  t.equal(cli(['snapshot', 'restore', ids[1], '--to', out, '--store', store]).status, 0);
  t.ok(fs.readFileSync(out).equals(fs.readFileSync(a)), 'the other snapshot still restores');
});

t.test('volume policy: the rules run after each snapshot of the volume, which is always kept; shown, cleared, checked', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const a = path.join(dir, 'a.img');
  const b = path.join(dir, 'b.img');
  fs.writeFileSync(a, Buffer.alloc(1 << 20, 1));
  fs.writeFileSync(b, Buffer.alloc(1 << 20, 2));
  const take = (img: string, fill: number, extra: string[] = []) => {
    fs.writeFileSync(img, Buffer.alloc(1 << 20, fill));
    const r = cli(['snapshot', 'create', img, '--store', store, '--json', ...extra]);
    t.equal(r.status, 0, r.stderr);
    return { id: (JSON.parse(r.out) as { id: string }).id, stderr: r.stderr };
  };
  const of = (img: string) => (JSON.parse(cli(['snapshot', 'list', '--volume', img, '--store', store, '--json']).out) as { snapshots: { id: string }[] }).snapshots.map((s) => s.id);
  const a1 = take(a, 1).id;
  const b1 = take(b, 1).id;
  t.equal(cli(['volume', 'policy', a, '--store', store]).status, 2, 'a policy without a rule is bad usage');
  t.equal(cli(['volume', 'policy', a, '--keep-last', '2', '--clear', '--store', store]).status, 2, '--clear with rules is bad usage');
  t.equal(cli(['volume', 'policy', path.join(dir, 'nope.img'), '--keep-last', '2', '--store', store]).status, 1, 'an unknown volume is refused');
  const set = cli(['volume', 'policy', a, '--keep-last', '2', '--store', store]);
  t.equal(set.status, 0, set.stderr);
  t.match(set.out, /after each snapshot, keep --keep-last 2/);
  t.match(cli(['volume', 'list', '--store', store]).out, /--keep-last 2/);

  const a2 = take(a, 2).id;
  t.same(of(a), [a1, a2], 'two snapshots: nothing to remove');
  const a3 = take(a, 3);
  t.same(of(a), [a2, a3.id], 'the third snapshot removed the oldest');
  t.match(a3.stderr, new RegExp(`retention policy removed ${a1}`), 'and said so');
  t.same(of(b), [b1], 'another volume is untouched');
  take(b, 2);
  t.equal(of(b).length, 2, 'b has no policy: it keeps everything');

  // a tag-only policy never removes the snapshot it runs after
  t.equal(cli(['volume', 'policy', a, '--keep-tag', 'keep', '--store', store]).status, 0);
  const a4 = take(a, 4).id;
  t.same(of(a), [a4], 'untagged older snapshots go; the new one stays (just taken)');
  const out = path.join(dir, 'out.img');
  t.equal(cli(['snapshot', 'restore', a4, '--to', out, '--store', store]).status, 0);
  t.ok(fs.readFileSync(out).equals(fs.readFileSync(a)), 'what the policy kept restores');

  t.equal(cli(['volume', 'policy', a, '--clear', '--store', store]).status, 0);
  take(a, 5);
  t.equal(of(a).length, 2, 'cleared: nothing pruned');

  // a damaged policy in the record is refused as such, never read as "no rule"
  const volFile = fs.readdirSync(path.join(store, 'volumes')).map((f) => path.join(store, 'volumes', f)).find((f) => JSON.parse(fs.readFileSync(f, 'utf8')).path === fs.realpathSync(a))!;
  const rec = JSON.parse(fs.readFileSync(volFile, 'utf8'));
  fs.writeFileSync(volFile, JSON.stringify({ ...rec, retention: {} }));
  const bad = cli(['snapshot', 'create', a, '--store', store]);
  t.equal(bad.status, 1);
  t.match(bad.stderr, /retention' has no rule/);
});

t.test("the library applies a volume's retention policy after each snapshot, with or without onPrune", async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'v.img');
  const take = async (fill: number, opts: Partial<snap.CreateSnapshotOptions> = {}) => {
    fs.writeFileSync(vol, Buffer.alloc(1 << 20, fill));
    return (await snap.createSnapshot(vol, { store, ...opts })).id;
  };
  const ids = async () => (await snap.listSnapshots({ store })).snapshots.map((s) => s.id);
  const s1 = await take(1);
  await snap.setVolumeRetention(vol, { last: 2 }, { store });
  const s2 = await take(2);
  const s3 = await take(3); // no onPrune: the policy applies all the same
  t.same(await ids(), [s2, s3], 'the oldest went when the third was taken');
  const reports: snap.PruneReport[] = [];
  const s4 = await take(4, { onPrune: (r) => reports.push(r) });
  t.same(await ids(), [s3, s4]);
  t.same(reports.map((r) => r.removed.map((d) => d.id)), [[s2]], 'onPrune hears what went');
  t.notOk((await ids()).includes(s1));
});
