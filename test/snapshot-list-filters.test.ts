/**
 * `snapshot list` filters (--tag, --name, --state, --volume by path, id or the loop device an
 * image is attached to), `snapshot tag`/`untag` (plain and encrypted snapshots), and id
 * prefixes with or without `snap-`. Through the CLI, as a user runs them.
 */
import t from 'tap';
import type { Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { cli } from './helpers/cli';
import { needLoop } from './helpers/loop';

const MiB = 2 ** 20;

function image(file: string, fill: number): void {
  fs.writeFileSync(file, Buffer.alloc(2 * MiB, fill));
}

function ok(t: Test, args: string[]): string {
  const r = cli(args);
  t.equal(r.status, 0, `${args.slice(0, 2).join(' ')}: ${r.stderr.trim()}`);
  return r.out;
}

function ids(t: Test, args: string[]): string[] {
  return (JSON.parse(ok(t, [...args, '--json'])) as { snapshots: { id: string }[] }).snapshots.map((s) => s.id);
}

type Snap = { id: string; volumeId: string; tags: Record<string, string> };

t.test('list filters: tags (all must match; KEY alone for any value), name, state, volume by path and id', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const a = path.join(dir, 'a.img');
  const b = path.join(dir, 'b.img');
  image(a, 1);
  image(b, 2);
  const mk = (vol: string, ...extra: string[]): Snap => JSON.parse(ok(t, ['snapshot', 'create', vol, '--store', store, '--json', ...extra])) as Snap;
  const s1 = mk(a, '--name', 'nightly', '--tag', 'env=prod', '--tag', 'team=db');
  const s2 = mk(a, '--tag', 'env=test');
  const s3 = mk(b, '--name', 'nightly', '--tag', 'env=prod');
  const list = (...f: string[]) => ids(t, ['snapshot', 'list', '--store', store, ...f]);
  t.same(list('--tag', 'env=prod'), [s1.id, s3.id], '--tag KEY=VALUE');
  t.same(list('--tag', 'env=prod', '--tag', 'team=db'), [s1.id], 'two tags: both must match');
  t.same(list('--tag', 'team'), [s1.id], '--tag KEY: any value');
  t.same(list('--tag', 'env=staging'), [], 'no match is an empty list');
  t.same(list('--name', 'nightly'), [s1.id, s3.id], '--name');
  t.same(list('--name', 'nightly', '--volume', b), [s3.id], 'with --volume by path');
  t.same(list('--volume', s1.volumeId), [s1.id, s2.id], '--volume by vol- id');
  t.same(list('--state', 'completed'), [s1.id, s2.id, s3.id], '--state completed');
  t.same(list('--state', 'error'), [], '--state error');
  for (const bad of [['--state', 'done'], ['--tag', '=x'], ['--tag', '']]) {
    const r = cli(['snapshot', 'list', '--store', store, ...bad]);
    t.equal(r.status, 2, `${bad.join(' ')} is bad usage`);
    t.equal(r.stderr.trim().split('\n').length, 1, 'one line');
  }
});

t.test('tag and untag change a snapshot\'s tags; id prefixes work with or without snap-', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const a = path.join(dir, 'a.img');
  image(a, 3);
  const s = JSON.parse(ok(t, ['snapshot', 'create', a, '--store', store, '--json', '--tag', 'env=test'])) as Snap;
  const bare = s.id.slice('snap-'.length, 'snap-'.length + 6);
  let r = JSON.parse(ok(t, ['snapshot', 'tag', bare, 'env=prod', 'owner=ci', '--store', store, '--json'])) as Snap;
  t.same(r.tags, { env: 'prod', owner: 'ci' }, 'tag sets over existing keys; a bare hex prefix names the snapshot');
  t.same((JSON.parse(ok(t, ['snapshot', 'show', `snap-${bare}`, '--store', store, '--json'])) as Snap).tags, { env: 'prod', owner: 'ci' }, 'recorded');
  r = JSON.parse(ok(t, ['snapshot', 'untag', s.id, 'owner', 'absent', '--store', store, '--json'])) as Snap;
  t.same(r.tags, { env: 'prod' }, 'untag removes keys; an absent key is no error');
  t.same(ids(t, ['snapshot', 'list', '--store', store, '--tag', 'env=prod']), [s.id], 'the list filter sees the new tag');
  for (const bad of [['tag', s.id, 'novalue'], ['tag', s.id, '=x'], ['untag', s.id, 'env=prod']]) {
    const e = cli(['snapshot', ...bad, '--store', store]);
    t.equal(e.status, 2, `snapshot ${bad.join(' ')} is bad usage`);
  }
  const missingSnap = cli(['snapshot', 'tag', 'snap-ffffffffffffffff', 'a=b', '--store', store]);
  t.equal(missingSnap.status, 1, 'an unknown snapshot fails');
  t.match(missingSnap.stderr, /no snapshot/);
  // control characters in a tag are escaped on the terminal
  const shown = ok(t, ['snapshot', 'tag', s.id, 'title=\x1b]0;x\x07', '--store', store]);
  t.notMatch(shown, /\x1b/, 'no raw escape sequence printed');
  t.match(shown, /title=\\x1b/);
});

t.test('an encrypted snapshot\'s tags change only with its key, and stay sealed', async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const key = path.join(dir, 'vol.key');
  const a = path.join(dir, 'a.img');
  image(a, 4);
  ok(t, ['key', 'generate', key]);
  ok(t, ['volume', 'register', a, '--store', store, '--encrypted', '--key-file', key]);
  const s = JSON.parse(ok(t, ['snapshot', 'create', a, '--store', store, '--key-file', key, '--json', '--tag', 'env=test'])) as Snap;
  const noKey = cli(['snapshot', 'tag', s.id, 'env=prod', '--store', store]);
  t.equal(noKey.status, 1, 'without the key: refused');
  t.match(noKey.stderr, /sealed .*--key-file.*ENOKEY/);
  const r = JSON.parse(ok(t, ['snapshot', 'tag', s.id, 'env=prod', '--store', store, '--key-file', key, '--json'])) as Snap;
  t.same(r.tags, { env: 'prod' });
  const record = fs.readFileSync(path.join(store, 'snapshots', `${s.id}.json`), 'utf8');
  t.notMatch(record, /prod/, 'the record on disk holds no tag in the clear');
  t.same(ids(t, ['snapshot', 'list', '--store', store, '--tag', 'env=prod']), [], 'without the key the sealed tags match no filter');
  t.same(ids(t, ['snapshot', 'list', '--store', store, '--tag', 'env=prod', '--key-file', key]), [s.id], 'with it they do');
});

t.test('--volume by the loop device an image is attached to', { skip: needLoop(['losetup']) }, async (t) => {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const a = path.join(dir, 'a.img');
  const b = path.join(dir, 'b.img');
  image(a, 5);
  image(b, 6);
  const s = JSON.parse(ok(t, ['snapshot', 'create', a, '--store', store, '--json'])) as Snap;
  ok(t, ['snapshot', 'create', b, '--store', store, '--json']);
  const device = ok(t, ['attach', a]).trim().split(/\s+/).find((w) => w.startsWith('/dev/loop'))!;
  t.teardown(() => void cli(['detach', device]));
  t.match(device, /^\/dev\/loop\d+$/, `attached at ${device}`);
  t.same(ids(t, ['snapshot', 'list', '--store', store, '--volume', device]), [s.id], 'the device stands for the image attached there');
});
