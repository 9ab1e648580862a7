/**
 * Text that comes from stores and image files (snapshot names, descriptions, tags, file and
 * backing file names) never reaches the terminal raw: control characters are shown as \xHH in
 * human output and errors, and JSON escapes them.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { cli } from './helpers/cli';

const ESC_TITLE = '\x1b]0;pwned\x07';
const CSI_C1 = '\u009b2J';
// eslint-disable-next-line no-control-regex
const RAW_CONTROL = /[\x00-\x08\x0b-\x1f\x7f-\x9f]/;

t.test('names, descriptions and tags with control characters are escaped, never printed raw', async (t) => {
  const dir = t.testdir();
  const vol = path.join(dir, 'v.img');
  const store = path.join(dir, 'store');
  t.equal(cli(['create', vol, '1M']).status, 0);
  const made = cli(['snapshot', 'create', vol, '--store', store, '--name', `n${ESC_TITLE}`, '--description', `d${CSI_C1}`, '--tag', `k=v${ESC_TITLE}`]);
  t.equal(made.status, 0, made.stderr);

  for (const args of [
    ['snapshot', 'list', '--store', store],
    ['snapshot', 'show', `n${ESC_TITLE}`, '--store', store],
  ]) {
    const r = cli(args);
    t.equal(r.status, 0, r.stderr);
    t.notMatch(r.out, RAW_CONTROL, `${args[1]}: no raw control character`);
    t.match(r.out, 'n\\x1b]0;pwned\\x07', `${args[1]}: the name is shown escaped`);
    if (args[1] === 'show') {
      t.match(r.out, 'd\\x9b2J', 'the description is shown escaped (C1 too)');
      t.match(r.out, 'k=v\\x1b]0;pwned\\x07', 'the tag is shown escaped');
    }
  }

  const json = cli(['snapshot', 'list', '--store', store, '--json']);
  t.equal(json.status, 0);
  t.notMatch(json.out, RAW_CONTROL, 'JSON: no raw control character');
  const parsed = JSON.parse(json.out) as { snapshots: { name: string; description: string; tags: Record<string, string> }[] };
  t.equal(parsed.snapshots[0].name, `n${ESC_TITLE}`, 'JSON keeps the exact name');
  t.equal(parsed.snapshots[0].description, `d${CSI_C1}`, 'JSON keeps the exact description');

  const missing = cli(['snapshot', 'show', `x${ESC_TITLE}`, '--store', store]);
  t.equal(missing.status, 1);
  t.notMatch(missing.stderr, RAW_CONTROL, 'an error echoing the argument escapes it');
  t.match(missing.stderr, 'x\\x1b]0;pwned\\x07');
});

t.test('file names with control characters are escaped in info and errors', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, `a${ESC_TITLE}.img`);
  t.equal(cli(['create', img, '1M']).status, 0);
  const info = cli(['info', img]);
  t.equal(info.status, 0, info.stderr);
  t.notMatch(info.out, RAW_CONTROL, 'info: no raw control character');
  t.match(info.out, 'a\\x1b]0;pwned\\x07.img');
  const bad = cli(['read', path.join(dir, `missing${CSI_C1}.img`), '0', '1']);
  t.equal(bad.status, 1);
  t.notMatch(bad.stderr, RAW_CONTROL, 'the error names the file escaped');
  t.ok(fs.existsSync(img));
});
