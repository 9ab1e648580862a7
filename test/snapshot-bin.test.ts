/**
 * The recycle bin (src/storage/bin.ts): with a retention on the store, delete moves a snapshot
 * into bin/, where nothing else sees it; undelete brings it back whole (it restores
 * byte-exact); gc keeps the blocks of what is in the bin and purges what expired; a crash
 * between the steps of a move leaves the live record winning. Without a retention, delete
 * removes at once, as before. Both backends: a directory and a bucket of the Ceph gateway.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { cli } from './helpers/cli';
import { Backend, closeInspector, forEachBackend } from './helpers/backends';

const MiB = 2 ** 20;

t.teardown(closeInspector);

async function setup(t: Tap.Test, b: Backend) {
  const dir = t.testdir();
  const store = await b.store('bin');
  const vol = path.join(dir, 'v.img');
  const ids: string[] = [];
  const contents: Buffer[] = [];
  for (const fill of [1, 2]) {
    const data = Buffer.alloc(2 * MiB, fill);
    data.fill(9, 0, 4096); // one block shared by both snapshots
    fs.writeFileSync(vol, data);
    contents.push(data);
    const r = cli(['snapshot', 'create', vol, '--store', store, '--json']);
    t.equal(r.status, 0, r.stderr);
    ids.push((JSON.parse(r.out) as { id: string }).id);
  }
  const listed = () => (JSON.parse(cli(['snapshot', 'list', '--store', store, '--json']).out) as { snapshots: { id: string }[] }).snapshots.map((s) => s.id);
  const inBin = () => (JSON.parse(cli(['snapshot', 'list', '--in-bin', '--store', store, '--json']).out) as { bin: { snapshot: { id: string }; binExpires: string }[] }).bin;
  const restores = (id: string, want: Buffer) => {
    const out = path.join(dir, `out-${Math.random().toString(16).slice(2)}.img`);
    const r = cli(['snapshot', 'restore', id, '--to', out, '--store', store]);
    const ok = r.status === 0 && fs.readFileSync(out).equals(want);
    fs.rmSync(out, { force: true });
    return ok;
  };
  return { dir, store, vol, ids, contents, listed, inBin, restores };
}

forEachBackend(t, 'a deleted snapshot waits in the bin: invisible, its blocks kept by gc, back whole with undelete', async (t, b) => {
  const s = await setup(t, b);
  t.same(JSON.parse(cli(['store', 'bin', '--store', s.store, '--json']).out), { retentionSeconds: null }, 'no bin by default');
  const set = cli(['store', 'bin', '--retention', '7d', '--store', s.store, '--json']);
  t.equal(set.status, 0, set.stderr);
  t.same(JSON.parse(set.out), { retentionSeconds: 7 * 86400 });

  const del = cli(['snapshot', 'delete', s.ids[0], '--store', s.store]);
  t.equal(del.status, 0, del.stderr);
  t.match(del.out, new RegExp(`deleted ${s.ids[0]}: in the recycle bin until \\S+ \\(snapshot undelete ${s.ids[0]}\\)`));
  t.same(s.listed(), [s.ids[1]], 'gone from the list');
  const bin = s.inBin();
  t.same(bin.map((e) => e.snapshot.id), [s.ids[0]], 'and in the bin');
  const days = (Date.parse(bin[0].binExpires) - Date.now()) / 86400e3;
  t.ok(days > 6.9 && days <= 7, `kept 7 days (${days.toFixed(3)})`);
  t.equal(cli(['snapshot', 'restore', s.ids[0], '--to', path.join(s.dir, 'x.img'), '--store', s.store]).status, 1, 'a binned snapshot cannot be restored');
  t.notOk(fs.existsSync(path.join(s.dir, 'x.img')));

  const gc = cli(['store', 'gc', '--store', s.store, '--json']);
  t.equal(gc.status, 0, gc.stderr);
  const g = JSON.parse(gc.out) as { blocksFreed: number; binKept: number; binPurged: string[] };
  t.equal(g.blocksFreed, 0, 'gc frees nothing a binned snapshot needs');
  t.equal(g.binKept, 1);
  t.same(g.binPurged, []);

  const back = cli(['snapshot', 'undelete', s.ids[0].slice(5, 11), '--store', s.store, '--json']);
  t.equal(back.status, 0, back.stderr);
  t.equal((JSON.parse(back.out) as { id: string }).id, s.ids[0], 'undelete by id prefix');
  t.same(s.listed().sort(), [...s.ids].sort(), 'back in the list');
  t.same(s.inBin(), [], 'the bin is empty');
  t.ok(s.restores(s.ids[0], s.contents[0]), 'it restores byte-exact after the round trip');
  t.equal(cli(['snapshot', 'undelete', s.ids[0], '--store', s.store]).status, 1, 'nothing left to undelete');

  // --permanently skips the bin; --off stops binning
  t.equal(cli(['snapshot', 'delete', s.ids[0], '--permanently', '--store', s.store]).status, 0);
  t.same(s.inBin(), [], '--permanently: not in the bin');
  t.equal(cli(['store', 'bin', '--off', '--store', s.store]).status, 0);
  t.equal(cli(['store', 'bin', '--off', '--retention', '1d', '--store', s.store]).status, 2, 'both: bad usage');
  t.equal(cli(['store', 'bin', '--retention', 'soon', '--store', s.store]).status, 2, 'not a duration: bad usage');
  t.ok(s.restores(s.ids[1], s.contents[1]), 'the other snapshot restores');
});

forEachBackend(t, 'gc purges expired bin entries and frees their blocks; a crashed move leaves the live record winning', async (t, b) => {
  const s = await setup(t, b);
  t.equal(cli(['store', 'bin', '--retention', '1d', '--store', s.store]).status, 0);
  t.equal(cli(['snapshot', 'delete', s.ids[0], '--store', s.store]).status, 0);
  // time passes: the entry's expiry moved into the past
  const entry = `bin/${s.ids[0]}.json`;
  const o = JSON.parse((await b.read(s.store, entry)).toString('utf8'));
  await b.write(s.store, entry, JSON.stringify({ ...o, binExpires: new Date(Date.now() - 1000).toISOString() }));
  const late = cli(['snapshot', 'undelete', s.ids[0], '--store', s.store]);
  t.equal(late.status, 1);
  t.match(late.stderr, /expired in the bin/);
  const dry = JSON.parse(cli(['store', 'gc', '--dry-run', '--store', s.store, '--json']).out) as { binPurged: string[] };
  t.same(dry.binPurged, [s.ids[0]], 'a dry run names what it would purge');
  t.ok((await b.keys(s.store, 'bin/')).includes(entry), '...and purges nothing');
  const gc = JSON.parse(cli(['store', 'gc', '--store', s.store, '--json']).out) as { binPurged: string[]; blocksFreed: number };
  t.same(gc.binPurged, [s.ids[0]]);
  t.ok(gc.blocksFreed >= 1, `its own blocks freed (${gc.blocksFreed})`);
  t.same(await b.keys(s.store, 'bin/'), [], 'nothing of it left in bin/');
  t.ok(s.restores(s.ids[1], s.contents[1]), 'the block it shared with the live snapshot was kept');

  // a move into the bin killed after the bin record was written, before the live record went:
  // both exist; the snapshot stays live, and gc removes the stale bin entry
  t.equal(cli(['snapshot', 'delete', s.ids[1], '--store', s.store]).status, 0);
  await b.write(s.store, `snapshots/${s.ids[1]}.map`, await b.read(s.store, `bin/${s.ids[1]}.map`));
  // (a packed manifest's pack index too: the move copies it before the bin record)
  if ((await b.keys(s.store, 'bin/')).includes(`bin/${s.ids[1]}.packs`)) await b.write(s.store, `snapshots/${s.ids[1]}.packs`, await b.read(s.store, `bin/${s.ids[1]}.packs`));
  const rec = JSON.parse((await b.read(s.store, `bin/${s.ids[1]}.json`)).toString('utf8'));
  delete rec.binnedAt;
  delete rec.binExpires;
  await b.write(s.store, `snapshots/${s.ids[1]}.json`, JSON.stringify(rec));
  t.same(s.listed(), [s.ids[1]], 'the live record is listed');
  const gc2 = JSON.parse(cli(['store', 'gc', '--store', s.store, '--json']).out) as { binPurged: string[]; blocksFreed: number };
  t.same(gc2.binPurged, [s.ids[1]], 'the stale bin entry goes');
  t.equal(gc2.blocksFreed, 0, 'and no block of the live snapshot');
  t.ok(s.restores(s.ids[1], s.contents[1]), 'the live snapshot restores');

  // a damaged bin record is reported, and its manifest still marks its blocks
  t.equal(cli(['snapshot', 'delete', s.ids[1], '--store', s.store]).status, 0);
  await b.write(s.store, `bin/${s.ids[1]}.json`, '{ not json');
  const listing = cli(['snapshot', 'list', '--in-bin', '--store', s.store]);
  t.match(listing.stderr, new RegExp(`recycle-bin entry ${s.ids[1]} is unreadable`));
  const gc3 = JSON.parse(cli(['store', 'gc', '--store', s.store, '--json']).out) as { blocksFreed: number; binKept: number };
  t.equal(gc3.blocksFreed, 0, 'a damaged entry keeps its blocks');
});
