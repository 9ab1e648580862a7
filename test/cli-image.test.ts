/**
 * The raw-image commands as a user runs them: create, info, map, read, write, bench, and
 * every error path of the command-line contract (exit 1 with one clear line; nothing
 * written on a failed command; exit 2 for usage errors).
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { spawn, spawnSync } from 'node:child_process';
import { cli, CLI } from './helpers/cli';
import { missing } from './helpers/tools';

const MiB = 2 ** 20;
const sha = (file: string) => createHash('sha256').update(fs.readFileSync(file)).digest('hex');

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed * 7 + (i >> 8)) & 0xff;
  return b;
}

t.test('create makes a sparse raw image of the exact size and refuses to overwrite', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.img');
  let r = cli(['create', img, '64M']);
  t.equal(r.status, 0, r.stderr);
  const st = fs.statSync(img);
  t.equal(st.size, 64 * MiB);
  t.ok(st.blocks * 512 < MiB, `sparse: ${st.blocks * 512} bytes allocated`);

  fs.writeFileSync(img, 'keep me');
  r = cli(['create', img, '1M']);
  t.equal(r.status, 1);
  t.match(r.stderr, /already exists.*--force/);
  t.equal(fs.readFileSync(img, 'utf8'), 'keep me', 'existing file untouched');

  r = cli(['create', img, '1M', '--force']);
  t.equal(r.status, 0, r.stderr);
  t.equal(fs.statSync(img).size, MiB);
  t.same(fs.readdirSync(dir), ['a.img'], 'no temporary files left');
});

t.test('sizes are parsed as qemu-img parses them (but for spaces and a b suffix); a bad size is a usage error that names it', async (t) => {
  const dir = t.testdir();
  for (const [text, bytes] of [
    ['512', 512],
    ['4k', 4096],
    ['64K', 65536],
    ['1M', MiB],
    ['2G', 2 * 2 ** 30],
    ['1.5M', 1.5 * MiB],
    ['1.3k', 1331],
  ] as const) {
    const img = path.join(dir, `s${bytes}.img`);
    const r = cli(['create', img, text]);
    t.equal(r.status, 0, `${text}: ${r.stderr}`);
    t.equal(fs.statSync(img).size, bytes, text);
  }
  for (const bad of ['12x', '4kk', 'abc', '1.5', '', ' 12', '12b', '1GB', '4KiB', '0x10', '-5']) {
    const img = path.join(dir, 'bad.img');
    const r = cli(['create', img, bad]);
    t.equal(r.status, 2, `'${bad}' is bad usage`);
    t.equal(r.stderr.trim().split('\n').length, 1, `'${bad}': one line on stderr`);
    if (bad !== '-5') t.match(r.stderr, /size '.*' is not a size/, `'${bad}' named in the error`);
    t.notOk(fs.existsSync(img), 'nothing created');
  }
  // qemu-img agrees on each good and bad size where it is installed
  if (!missing({ commands: ['qemu-img'] })) {
    for (const [text, ok] of [['1.5M', true], ['1GB', false], ['4KiB', false], ['1.5', false]] as const) {
      const q = spawnSync('qemu-img', ['create', '-f', 'raw', path.join(dir, 'q.img'), text], { encoding: 'utf8' });
      t.equal(q.status === 0, ok, `qemu-img ${ok ? 'takes' : 'refuses'} '${text}' too`);
    }
    // the two that qemu-img tolerates and disksnap calls slips (refused above)
    for (const text of ['12b', ' 12']) {
      const q = spawnSync('qemu-img', ['create', '-f', 'raw', path.join(dir, 'q.img'), text], { encoding: 'utf8' });
      t.equal(q.status, 0, `qemu-img takes '${text}' (12 bytes); disksnap refuses it`);
    }
  }
  const zero = cli(['create', path.join(dir, 'z.img'), '0']);
  t.equal(zero.status, 1);
  t.match(zero.stderr, /must be a positive number of bytes/);
});

t.test('usage errors exit 2', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'u.img');
  t.equal(cli(['create']).status, 2, 'missing arguments');
  t.equal(cli(['create', 'x', '1M', '--bogus']).status, 2, 'unknown option');
  t.equal(cli(['no-such-command']).status, 2, 'unknown command');
  t.equal(cli(['create', img, '1M']).status, 0);
  for (const args of [
    ['bench', img, '-c', 'x'],
    ['bench', img, '-d', '0'],
    ['diff', 'create', img, path.join(dir, 'c.qcow2'), '--cluster-size', '3k'],
    ['diff', 'create', img, path.join(dir, 'c.qcow2'), '--cluster-size', '4M'],
    ['snapshot', 'restore', 'snap-1234', '--store', path.join(dir, 'store')],
    ['snapshot', 'restore', 'snap-1234', '--store', path.join(dir, 'store'), '--to', 'a', '--in-place', img],
    ['store', 'init', '--store', path.join(dir, 'store'), '--block-size', '3k'],
  ]) {
    const r = cli(args);
    t.equal(r.status, 2, `${args.join(' ')}: exit 2`);
    t.equal(r.stderr.trim().split('\n').length, 1, `${args.join(' ')}: one line on stderr`);
  }
  t.notOk(fs.existsSync(path.join(dir, 'c.qcow2')), 'no child was made');
  t.notOk(fs.existsSync(path.join(dir, 'store')), 'no store was made');
  t.ok(fs.statSync(img).mode & 0o200, 'the image is still writable (no child was registered)');
});

t.test('info reports format, virtual size and allocation as JSON', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.img');
  t.equal(cli(['create', img, '8M']).status, 0);
  t.equal(cli(['write', img, '1M'], { input: pattern(128 * 1024, 1) }).status, 0);
  const r = cli(['info', img, '--json']);
  t.equal(r.status, 0, r.stderr);
  const info = JSON.parse(r.out);
  t.equal(info.format, 'raw');
  t.equal(info.virtualSize, 8 * MiB);
  t.ok(info.allocatedBytes >= 128 * 1024 && info.allocatedBytes < 2 * MiB, `allocated ${info.allocatedBytes}`);
  const human = cli(['info', img]);
  t.match(human.out, /format: raw/);
  t.match(human.out, /virtual size: 8\.00 MiB \(8388608 bytes\)/);
  const missingFile = cli(['info', path.join(dir, 'nope.img')]);
  t.equal(missingFile.status, 1);
  t.match(missingFile.stderr, /nope\.img/);
  t.match(missingFile.stderr, /ENOENT|no such file/i);
});

t.test('map lists data and zero extents of a sparse image', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.img');
  t.equal(cli(['create', img, '16M']).status, 0);
  t.equal(cli(['write', img, '0'], { input: pattern(64 * 1024, 2) }).status, 0);
  t.equal(cli(['write', img, '8M'], { input: pattern(64 * 1024, 3) }).status, 0);
  const r = cli(['map', img, '--json']);
  t.equal(r.status, 0, r.stderr);
  const m = JSON.parse(r.out);
  t.equal(m.virtualSize, 16 * MiB);
  const data = m.extents.filter((e: { kind: string }) => e.kind === 'data');
  t.notOk(m.extents.some((e: object) => 'offset' in e), "no `offset` key: qemu-img's offset is a host offset, ours is named hostOffset");
  t.same(
    data.map((e: { start: number; length: number }) => [e.start, e.length]),
    [
      [0, 64 * 1024],
      [8 * MiB, 64 * 1024],
    ],
  );
  let pos = 0;
  for (const e of m.extents) {
    t.equal(e.start, pos, 'extents are contiguous');
    pos += e.length;
  }
  t.equal(pos, 16 * MiB, 'extents cover the image');
});

t.test('write then read round-trips at unaligned offsets, via stdin/stdout and files', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.img');
  t.equal(cli(['create', img, '1M']).status, 0);
  const data = pattern(2048 + 77, 4);
  // 2 KiB (and change) at 63 KiB + 5: crosses a 64 KiB boundary at an odd offset
  const off = 63 * 1024 + 5;
  let r = cli(['write', img, String(off)], { input: data });
  t.equal(r.status, 0, r.stderr);
  r = cli(['read', img, String(off), String(data.length)]);
  t.equal(r.status, 0, r.stderr);
  t.ok(r.stdout.equals(data), 'stdout bytes equal what was written');
  const raw = fs.readFileSync(img);
  t.ok(raw.subarray(off, off + data.length).equals(data), 'bytes landed at the offset');
  t.equal(raw.subarray(0, off).filter((b) => b !== 0).length, 0, 'nothing before the offset changed');

  const input = path.join(dir, 'in.bin');
  fs.writeFileSync(input, pattern(5000, 5));
  t.equal(cli(['write', img, '4k', '-i', input]).status, 0);
  const out = path.join(dir, 'out.bin');
  r = cli(['read', img, '4k', '5000', '--to', out]);
  t.equal(r.status, 0, r.stderr);
  t.ok(fs.readFileSync(out).equals(fs.readFileSync(input)));
  r = cli(['read', img, '0', '10', '--to', out]);
  t.equal(r.status, 1, 'existing output refused');
  t.match(r.stderr, /already exists/);
  t.equal(fs.statSync(out).size, 5000, 'output untouched');
  t.equal(cli(['read', img, '0', '10', '--to', out, '--force']).status, 0);
  t.equal(fs.statSync(out).size, 10);
});

t.test('ranges past the end fail cleanly and write nothing', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.img');
  t.equal(cli(['create', img, '64k']).status, 0);
  t.equal(cli(['write', img, '0'], { input: pattern(1000, 6) }).status, 0);
  const before = sha(img);
  let r = cli(['write', img, '63k'], { input: pattern(2048, 7) });
  t.equal(r.status, 1);
  t.match(r.stderr, /longer than the 1024 bytes|past the end/);
  t.equal(sha(img), before, 'image unchanged after a refused write');
  r = cli(['write', img, '1M'], { input: Buffer.from('x') });
  t.equal(r.status, 1);
  t.match(r.stderr, /past the end/, 'an offset past the end is named as such');
  t.notMatch(r.stderr, /-\d+ bytes/, 'no negative byte count');
  t.equal(sha(img), before);
  r = cli(['read', img, '60k', '8k']);
  t.equal(r.status, 1);
  t.match(r.stderr, /past the end/);
  t.equal(r.stdout.length, 0, 'no partial output on stdout');
  r = cli(['read', img, 'x1', '8']);
  t.equal(r.status, 2, 'a malformed offset is bad usage');
  t.match(r.stderr, /offset 'x1'/);
  const out = path.join(dir, 'o.bin');
  r = cli(['read', img, '60k', '8k', '--to', out]);
  t.equal(r.status, 1);
  t.notOk(fs.existsSync(out), 'no output file on failure');
  t.same(fs.readdirSync(dir).sort(), ['a.img'], 'no temporary files');
  r = cli(['write', path.join(dir, 'missing.img'), '0'], { input: Buffer.from('x') });
  t.equal(r.status, 1);
  t.match(r.stderr, /missing\.img/);
});

t.test('a refused bench prints one line, no banner', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.img');
  t.equal(cli(['create', img, '64k']).status, 0);
  const r = cli(['bench', img, '-s', '128k', '-c', '1']);
  t.equal(r.status, 1);
  t.equal(r.stderr.trim().split('\n').length, 1, 'one line on stderr');
  t.notMatch(r.stderr, /Sending/, 'no banner before the error');
  t.match(r.stderr, /does not fit/);
});

t.test('a reader that closes stdout early ends the command quietly', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.img');
  t.equal(cli(['create', img, '8M']).status, 0);
  const r = spawnSync('bash', ['-c', `set -o pipefail; node ${JSON.stringify(CLI)} read ${JSON.stringify(img)} 0 8M | head -c 1 >/dev/null`], {
    encoding: 'utf8',
  });
  t.equal(r.status, 0, 'exit 0: the reader had all it wanted');
  t.equal(r.stderr, '', 'no stack, no message');
});

t.test('bench reads and writes with the qemu-img bench pattern', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.img');
  t.equal(cli(['create', img, '4M']).status, 0);
  let r = cli(['bench', img, '-w', '-s', '4k', '-c', '2048', '-d', '16', '--pattern', '165', '--json']);
  t.equal(r.status, 0, r.stderr);
  const w = JSON.parse(r.out);
  t.equal(w.operation, 'write');
  t.equal(w.count, 2048);
  t.equal(w.depth, 16);
  t.ok(w.iops > 0 && w.seconds > 0);
  // 2048 sequential 4 KiB writes from 0 cover 8 MiB: wraps around the 4 MiB image
  const bytes = fs.readFileSync(img);
  t.equal(bytes.filter((b) => b !== 165).length, 0, 'every byte written with the pattern');

  t.equal(cli(['create', img, '4M', '--force']).status, 0);
  r = cli(['bench', img, '-w', '-s', '4k', '-c', '10', '-d', '1', '-S', '64k', '--pattern', '1', '--json']);
  t.equal(r.status, 0, r.stderr);
  const b2 = fs.readFileSync(img);
  for (let i = 0; i < 10; i++) t.equal(b2[i * 65536], 1, `request ${i} at ${i * 64} KiB`);
  t.equal(b2[4096], 0, 'gap between steps untouched');

  r = cli(['bench', img, '-s', '4k', '-c', '1000', '-d', '8', '--random', '--json']);
  t.equal(r.status, 0, r.stderr);
  t.equal(JSON.parse(r.out).random, true);
  r = cli(['bench', img, '-c', '0']);
  t.equal(r.status, 2, 'a count below 1 is bad usage');
  t.match(r.stderr, /count '0'/);
  r = cli(['bench', img, '-s', '8M']);
  t.equal(r.status, 1);
  t.match(r.stderr, /does not fit/);
});

t.test('--help lists every command group, and each group runs', async (t) => {
  const r = cli(['--help']);
  t.equal(r.status, 0);
  for (const group of ['create', 'info', 'map', 'measure', 'read', 'write', 'bench', 'diff', 'snapshot', 'volume', 'store', 'attach', 'detach', 'compare']) {
    t.match(r.out, new RegExp(`\\n\\s+${group}\\b`), `${group} listed`);
    const g = cli([group, '--help']);
    t.equal(g.status, 0, `${group} --help works`);
    t.notMatch(g.out, /not built yet/, `${group} is built`);
  }
});

t.test('a second writer is refused while another process holds the image', async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.img');
  t.equal(cli(['create', img, '1M']).status, 0);
  const holder = spawn(
    process.execPath,
    [
      '-e',
      `const { BlockFile } = require(${JSON.stringify(path.join(path.dirname(CLI), '..', 'engine', 'file.js'))});
       const f = BlockFile.open(process.argv[1], { write: true });
       process.stdout.write('locked\\n');
       setTimeout(() => f.close(), 20000);`,
      img,
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  t.teardown(() => holder.kill('SIGKILL'));
  await new Promise<void>((resolve) => holder.stdout!.once('data', () => resolve()));
  const before = sha(img);
  const r = cli(['write', img, '0'], { input: Buffer.from('intruder') });
  t.equal(r.status, 1);
  t.match(r.stderr, /ELOCKED|locked/i);
  t.equal(sha(img), before, 'image unchanged');
  const reader = cli(['read', img, '0', '4']);
  t.equal(reader.status, 1, 'a shared reader is refused too while a writer holds it');
  holder.kill('SIGKILL');
  await new Promise((resolve) => holder.once('exit', resolve));
  t.equal(cli(['write', img, '0'], { input: Buffer.from('now ok') }).status, 0, 'lock released when the holder dies');
});

t.test('locks are visible to and from QEMU', { skip: missing({ commands: ['qemu-io'] }) }, async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'a.img');
  t.equal(cli(['create', img, '1M']).status, 0);
  const qemu = spawn('qemu-io', ['-f', 'raw', '-c', 'sleep 20000', img], { stdio: ['ignore', 'pipe', 'pipe'] });
  t.teardown(() => qemu.kill('SIGKILL'));
  // qemu-io has taken its locks once it is running its command; poll until our write is refused
  let r = cli(['write', img, '0'], { input: Buffer.from('x') });
  for (let i = 0; i < 50 && r.status === 0; i++) {
    await new Promise((res) => setTimeout(res, 100));
    r = cli(['write', img, '0'], { input: Buffer.from('x') });
  }
  t.equal(r.status, 1, 'disksnap refuses to write while qemu-io has the image open');
  t.match(r.stderr, /locked/i);
  qemu.kill('SIGKILL');
  await new Promise((resolve) => qemu.once('exit', resolve));

  const holder = spawn(
    process.execPath,
    [
      '-e',
      `const { BlockFile } = require(${JSON.stringify(path.join(path.dirname(CLI), '..', 'engine', 'file.js'))});
       BlockFile.open(process.argv[1], { write: true });
       process.stdout.write('locked\\n');
       setTimeout(() => {}, 20000);`,
      img,
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  t.teardown(() => holder.kill('SIGKILL'));
  await new Promise<void>((resolve) => holder.stdout!.once('data', () => resolve()));
  const { spawnSync } = await import('node:child_process');
  const q = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write 0 512', img]);
  t.not(q.status, 0, 'qemu-io cannot write while disksnap holds the image');
  t.match(q.stderr.toString() + q.stdout.toString(), /lock/i);
});

t.test('a raw parent with children refuses writes, even from root', async (t) => {
  const dir = t.testdir();
  const parent = path.join(dir, 'parent.img');
  const child = path.join(dir, 'child.qcow2');
  t.equal(cli(['create', parent, '1M']).status, 0);
  t.equal(cli(['write', parent, '0'], { input: pattern(4096, 8) }).status, 0);
  let r = cli(['diff', 'create', parent, child]);
  t.equal(r.status, 0, r.stderr);
  const before = sha(parent);
  const mtime = fs.statSync(parent).mtimeMs;
  r = cli(['write', parent, '0'], { input: Buffer.from('would corrupt the child') });
  t.equal(r.status, 1);
  t.match(r.stderr, /is the parent of .*child\.qcow2.*read-only while it has children/);
  r = cli(['bench', parent, '-w', '-c', '10']);
  t.equal(r.status, 1, 'a write benchmark is refused too');
  t.equal(sha(parent), before, 'parent bytes unchanged');
  t.equal(fs.statSync(parent).mtimeMs, mtime, 'parent mtime unchanged');
  t.equal(cli(['diff', 'rollback', child]).status, 0);
  t.equal(cli(['write', parent, '0'], { input: Buffer.from('ok now') }).status, 0, 'writable again after the last child is gone');
});
