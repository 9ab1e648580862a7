/**
 * What the CLI says about itself, generated from the command definitions: an example in every
 * --help that uses only the command's own flags, one meaning per short flag across commands,
 * a bash completion script that a real bash sources and completes with, and a man page that
 * man(1) renders without warnings and that lists every command.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { cli } from './helpers/cli';
import { missing } from './helpers/tools';
import { buildProgram } from '../src/cli/program';
import { commandsOf, EXAMPLES } from '../src/cli/docs';

const program = buildProgram();
const commands = commandsOf(program);
const leaves = commands.filter((c) => c.cmd.commands.length === 0);

t.test('every command has examples, and each uses only flags the command defines', async (t) => {
  t.ok(leaves.length >= 40, `${leaves.length} commands`);
  for (const { path: p, cmd } of leaves) {
    const ex = EXAMPLES[p];
    t.ok(ex && ex.length > 0, `${p}: has examples`);
    const flags = new Set(['--help', '-h', ...cmd.options.flatMap((o) => [o.long, o.short].filter((x): x is string => !!x))]);
    for (const e of ex ?? []) {
      // the disksnap invocation of the example (after env assignments, before a pipe or &&)
      const m = new RegExp(`(?:^|[\\s(])disksnap ${p.replace(/ /g, ' ')}((?:\\s+[^|&;<>]*)?)`).exec(e);
      t.ok(m, `${p}: the example runs this command: ${e}`);
      if (!m) continue;
      const used = m[1].split(/\s+/).filter((w) => /^--?[a-zA-Z]/.test(w));
      for (const f of used) t.ok(flags.has(f.split('=')[0]), `${p}: example flag ${f} exists`);
    }
  }
  for (const key of Object.keys(EXAMPLES)) t.ok(commands.some((c) => c.path === key), `examples of '${key}' belong to a command`);
  const help = cli(['snapshot', 'restore', '--help']);
  t.equal(help.status, 0);
  t.match(help.out, /Examples:\n {2}\$ disksnap snapshot restore 9e9c --to restored\.img/, '--help ends with the examples');
});

t.test('one meaning per short flag across all commands', async (t) => {
  const meaning = new Map<string, Set<string>>();
  for (const { path: p, cmd } of commands) {
    for (const o of cmd.options) {
      if (!o.short) continue;
      const set = meaning.get(o.short) ?? new Set<string>();
      set.add(o.long ?? o.short);
      meaning.set(o.short, set);
      void p;
    }
  }
  for (const [short, longs] of meaning) t.same([...longs], [[...longs][0]], `${short} means ${[...longs].join(' and ')}`);
});

t.test('--json on every command, and --force only ever replaces an output', async (t) => {
  for (const { path: p, cmd } of leaves) {
    if (p === 'completion' || p === 'man') continue; // they print a script and a page, not data
    t.ok(cmd.options.some((o) => o.long === '--json'), `${p} has --json`);
    const force = cmd.options.find((o) => o.long === '--force' && !o.hidden);
    if (force) t.match(force.description, /overwrite|replace/, `${p}: --force means replacing an output ("${force.description}")`);
  }
});

const noBash = missing({ commands: ['bash'] });

t.test('bash completion: a real bash sources it and completes commands, subcommands and flags', { skip: noBash }, async (t) => {
  const r = cli(['completion', 'bash']);
  t.equal(r.status, 0, r.stderr);
  const dir = t.testdir({ 'disk.img': '' });
  const script = path.join(dir, 'completion.sh');
  fs.writeFileSync(script, r.out);
  const complete = (...words: string[]): string[] => {
    const q = words.map((w) => `'${w}'`).join(' ');
    const b = spawnSync('bash', ['-c', `source '${script}'; COMP_WORDS=(disksnap ${q}); COMP_CWORD=${words.length}; _disksnap; printf '%s\\n' "\${COMPREPLY[@]}"`], { cwd: dir, encoding: 'utf8' });
    t.equal(b.status, 0, b.stderr);
    return b.stdout.split('\n').filter(Boolean).sort();
  };
  t.same(complete('sn'), ['snapshot']);
  t.same(complete('snapshot', 'cr'), ['create']);
  t.same(complete('snapshot', 'create', '--st'), ['--store']);
  t.same(complete('diff', 'commit', '--k'), ['--keep-child']);
  t.same(complete('snapshot', ''), ['--help', 'copy', 'create', 'delete', 'diff', 'list', 'lock', 'prune', 'restore', 'show', 'tag', 'undelete', 'unlock', 'untag', 'verify'], 'a group completes its commands, no files');
  t.same(complete('attach', 'di'), ['disk.img'], "a command's arguments complete as files");
  const zsh = cli(['completion', 'zsh']);
  t.match(zsh.out, /^#compdef disksnap\n/);
  t.match(zsh.out, /bashcompinit/);
  t.notMatch(zsh.out, /local [^\n]*\bpath=/, 'no variable named path (zsh ties it to PATH)');
  t.equal(cli(['completion', 'fish']).status, 2, 'an unknown shell is a usage error');
});

const noMan = missing({ commands: ['man', 'groff'] });

t.test('the man page renders without warnings and lists every command with its flags', { skip: noMan }, async (t) => {
  const r = cli(['man']);
  t.equal(r.status, 0, r.stderr);
  const dir = t.testdir();
  const page = path.join(dir, 'disksnap.1');
  fs.writeFileSync(page, r.out);
  const m = spawnSync('man', ['--warnings', '-l', page], { encoding: 'utf8', env: { ...process.env, MANWIDTH: '120', MAN_KEEP_FORMATTING: '0' } });
  t.equal(m.status, 0, m.stderr);
  t.equal(m.stderr.trim(), '', 'no groff warnings');
  const text = m.stdout.replace(/.\x08/g, '');
  t.match(text, /^DISKSNAP\(1\)/);
  for (const { path: p, cmd } of leaves) {
    t.ok(text.includes(`disksnap ${p} `) || text.includes(`disksnap ${p}\n`), `${p} is in the page`);
    for (const o of cmd.options) if (!o.hidden && o.long) t.ok(text.includes(o.long), `${p}: ${o.long} is in the page`);
  }
  t.match(text, /EXIT STATUS/);
  t.match(text, /DISKSNAP_STORE/);
});

t.test('--version loads no command group; a command loads only its own', async (t) => {
  const programJs = path.resolve(__dirname, '..', 'dist', 'src', 'cli', 'program.js');
  const version = (JSON.parse(fs.readFileSync(path.resolve(__dirname, '..', 'package.json'), 'utf8')) as { version: string }).version;
  const groupsLoaded = (args: string[]) => {
    const script = `process.on('exit', () => process.stderr.write(JSON.stringify(Object.keys(require.cache).map((k) => /[\\\\/]cli[\\\\/](image|diff|snapshot|store|loop|compare|checkpoint)\\.js$/.exec(k)?.[1]).filter(Boolean))));
require(${JSON.stringify(programJs)}).main(['node', 'disksnap', ...${JSON.stringify(args)}]);`;
    const r = spawnSync(process.execPath, ['-e', script], { encoding: 'utf8' });
    return { out: r.stdout.trim(), groups: JSON.parse(r.stderr.slice(r.stderr.lastIndexOf('['))) as string[] };
  };
  t.same(groupsLoaded(['--version']), { out: version, groups: [] });
  t.same(groupsLoaded(['-V']), { out: version, groups: [] });
  t.same(groupsLoaded(['snapshot', '--help']).groups, ['snapshot']);
  t.same(groupsLoaded(['--help']).groups.sort(), ['checkpoint', 'compare', 'diff', 'image', 'loop', 'snapshot', 'store']);
});
