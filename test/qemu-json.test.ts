/**
 * `--output json` is qemu-img's document, key for key: disksnap's info (with and without
 * --backing-chain), map, diff check and measure are run beside qemu-img's on the same files
 * and the parsed JSON must be deep-equal (map's text must even be byte-equal). The files are
 * made by qemu-img/qemu-io and by disksnap: chains three and four deep, a child over a
 * shorter parent, compressed clusters, plain and preallocated zero clusters, 512-byte
 * clusters over several L2 tables (fragmentation), metadata preallocation, persistent
 * bitmaps, an internal snapshot, a version 2 image, a raw file whose size is not a multiple
 * of 512, a leaking image before and after repair, relative backing names across directories.
 *
 * No key is left out of the comparison: every fact qemu-img prints for these files,
 * disksnap prints the same (README, "qemu-img compatible JSON").
 */
import t, { Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { cli, ROOT } from './helpers/cli';
import { needQemu, qemuIo } from './helpers/qemu';

const skip = needQemu();
const KiB = 1024;
const MiB = 2 ** 20;

function qemuImg(args: string[], cwd?: string): { status: number | null; out: string; err: string } {
  const r = spawnSync('qemu-img', args, { cwd, maxBuffer: 1 << 28 });
  if (r.error) throw r.error;
  return { status: r.status, out: r.stdout.toString(), err: r.stderr.toString() };
}

function sh(cmd: string, args: string[], cwd?: string): void {
  const r = spawnSync(cmd, args, { cwd });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr.toString()}`);
}

interface Facts {
  info: Record<string, unknown>;
  chain: Record<string, unknown>[];
  map: { start: number; length: number; depth: number; present: boolean; zero: boolean; data: boolean; offset?: number }[];
  check?: Record<string, unknown>;
}

/**
 * Runs qemu-img and disksnap side by side on FILE (a name relative to `cwd`, as a script would
 * pass it) and compares every document. Returns qemu-img's documents, so that a test can also
 * prove its file exercises what it claims (a compare of two empty documents proves nothing).
 */
function compareAll(t: Test, cwd: string, file: string, opts: { check?: boolean; only?: string[] } = {}): Facts {
  const pairs: [string, string[], string[]][] = [
    ['info', ['info', '--output=json', file], ['info', '--output', 'json', file]],
    ['info --backing-chain', ['info', '--output=json', '--backing-chain', file], ['info', '--output=json', '--backing-chain', file]],
    ['map', ['map', '--output=json', file], ['map', '--output', 'json', file]],
    ['measure -O raw', ['measure', '--output=json', '-O', 'raw', file], ['measure', '--output', 'json', '-O', 'raw', file]],
    ['measure -O qcow2', ['measure', '--output=json', '-O', 'qcow2', file], ['measure', '--output', 'json', '-O', 'qcow2', file]],
    [
      'measure -O qcow2 (4k clusters)',
      ['measure', '--output=json', '-O', 'qcow2', '-o', 'cluster_size=4096', file],
      ['measure', '--output', 'json', '-O', 'qcow2', '--cluster-size', '4k', file],
    ],
  ];
  if (opts.check !== false) pairs.push(['check', ['check', '--output=json', file], ['diff', 'check', '--output', 'json', file]]);
  const facts: Partial<Facts> = {};
  for (const [what, qargs, dargs] of pairs) {
    if (opts.only !== undefined && !opts.only.includes(what)) continue;
    const q = qemuImg(qargs, cwd);
    const d = cli(dargs, { cwd });
    t.equal(d.status, q.status, `${file}: ${what}: exit status as qemu-img's (${q.err.trim()} / ${d.stderr.trim()})`);
    if (q.out.trim() === '') {
      // no document (check of a raw file: "does not support checks", exit 63)
      t.equal(d.out, '', `${file}: ${what}: no document either`);
      continue;
    }
    const qj = JSON.parse(q.out) as unknown;
    let dj: unknown;
    try {
      dj = JSON.parse(d.out);
    } catch {
      t.fail(`${file}: ${what}: disksnap printed no JSON: ${d.out}${d.stderr}`);
      continue;
    }
    t.same(dj, qj, `${file}: ${what}: the same document as qemu-img's`);
    t.same(Object.keys(dj as object).sort(), Object.keys(qj as object).sort(), `${file}: ${what}: the same keys, none added`);
    if (what === 'map') t.equal(d.out, q.out, `${file}: map: even the text is qemu-img's`);
    if (what === 'info') facts.info = qj as Record<string, unknown>;
    if (what === 'info --backing-chain') facts.chain = qj as Record<string, unknown>[];
    if (what === 'map') facts.map = qj as Facts['map'];
    if (what === 'check') facts.check = qj as Record<string, unknown>;
  }
  return facts as Facts;
}

t.test('a chain made by qemu-img: raw base, a child larger than it, a grandchild larger again', { skip }, async (t) => {
  const dir = t.testdir();
  sh('qemu-img', ['create', '-q', '-f', 'raw', 'base.raw', '1M'], dir);
  qemuIo(path.join(dir, 'base.raw'), ['write -P 1 0 64k', 'write -P 2 300k 10k'], 'raw');
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'mid.qcow2', '2M'], dir);
  // data; a plain zero cluster; a preallocated zero cluster (write -z over data keeps the
  // cluster); an unmapped one (-u drops it); data past the base's end
  qemuIo(path.join(dir, 'mid.qcow2'), ['write -P 3 64k 64k', 'write -z 128k 64k', 'write -P 4 192k 128k', 'write -z 192k 64k', 'write -z -u 256k 64k', 'write -P 5 1536k 4k']);
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2', '3M'], dir);
  qemuIo(path.join(dir, 'top.qcow2'), ['write -P 6 63k 2k', 'write -P 7 2560k 64k']);
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'top.qcow2', '-F', 'qcow2', 'gc.qcow2', '3M'], dir);
  qemuIo(path.join(dir, 'gc.qcow2'), ['write -P 8 1M 4k']);

  for (const f of ['base.raw', 'mid.qcow2', 'top.qcow2']) compareAll(t, dir, f);
  const gc = compareAll(t, dir, 'gc.qcow2');
  t.same(gc.chain.map((l) => l.filename), ['gc.qcow2', 'top.qcow2', 'mid.qcow2', 'base.raw'], 'the chain is four deep, top first');
  const depths = new Set(gc.map.map((e) => e.depth));
  t.same([...depths].sort(), [0, 1, 2, 3], 'the map has entries from every layer');
  t.ok(gc.map.some((e) => e.zero && !e.present && e.depth > 0), 'a range past a shorter parent reads as an absent zero');
  t.ok(gc.map.some((e) => e.zero && e.present && e.offset !== undefined && e.depth === 2), 'a preallocated zero cluster (with its host offset)');
  t.ok(gc.map.some((e) => e.zero && e.present && e.offset === undefined && e.depth === 2), 'a plain zero cluster (no host offset)');
});

t.test('compressed clusters (qemu-img convert -c): data without an offset; compressed and fragmented counts', { skip }, async (t) => {
  const dir = t.testdir();
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'src.qcow2', '4M'], dir);
  qemuIo(path.join(dir, 'src.qcow2'), ['write -P 7 0 256k', 'write -P 9 1M 64k', 'write -P 3 3M 200k']);
  sh('qemu-img', ['convert', '-c', '-O', 'qcow2', 'src.qcow2', 'comp.qcow2'], dir);
  qemuIo(path.join(dir, 'comp.qcow2'), ['write -P 5 64k 4k']); // one cluster rewritten uncompressed
  const f = compareAll(t, dir, 'comp.qcow2');
  t.ok(f.map.some((e) => e.data && e.offset === undefined), 'compressed data has no offset');
  t.ok((f.check?.['compressed-clusters'] as number) > 0, 'compressed clusters counted');
  t.ok((f.check?.['fragmented-clusters'] as number) > 0, 'fragmented clusters counted');
});

t.test('512-byte clusters over several L2 tables, out-of-order writes: fragmentation as QEMU counts it', { skip }, async (t) => {
  const dir = t.testdir();
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', 'small.qcow2', '1M'], dir);
  qemuIo(path.join(dir, 'small.qcow2'), ['write -P 1 0 40k', 'write -P 2 100k 3k', 'write -P 3 20k 1k', 'write -P 4 700k 64k', 'write -P 5 10k 512']);
  const f = compareAll(t, dir, 'small.qcow2');
  t.ok((f.check?.['allocated-clusters'] as number) > 100, 'many clusters allocated');
});

t.test('metadata preallocation: data clusters that are holes in the file read as zero, as QEMU guesses', { skip }, async (t) => {
  const dir = t.testdir();
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', 'pm.qcow2', '8M'], dir);
  qemuIo(path.join(dir, 'pm.qcow2'), ['write -P 3 100k 4k']);
  const f = compareAll(t, dir, 'pm.qcow2');
  t.ok(f.map.some((e) => e.zero && e.data), 'zero and data at once (the heuristic fired)');
});

t.test('persistent bitmaps, an internal snapshot, a version 2 image', { skip }, async (t) => {
  const dir = t.testdir();
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'bm.qcow2', '4M'], dir);
  sh('qemu-img', ['bitmap', '--add', 'bm.qcow2', 'b0'], dir);
  sh('qemu-img', ['bitmap', '--add', '-g', '1M', '--disable', 'bm.qcow2', 'a-longer-bitmap-name'], dir);
  qemuIo(path.join(dir, 'bm.qcow2'), ['write -P 1 0 64k']);
  const bm = compareAll(t, dir, 'bm.qcow2');
  const data = (bm.info['format-specific'] as { data: { bitmaps?: unknown[] } }).data;
  t.equal(data.bitmaps?.length, 2, 'info lists both bitmaps');

  sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'snap.qcow2', '1M'], dir);
  qemuIo(path.join(dir, 'snap.qcow2'), ['write -P 1 0 64k']);
  sh('qemu-img', ['snapshot', '-c', 'before', 'snap.qcow2'], dir);
  qemuIo(path.join(dir, 'snap.qcow2'), ['write -P 2 0 4k']);
  const snap = compareAll(t, dir, 'snap.qcow2');
  t.equal((snap.info.snapshots as unknown[]).length, 1, 'info lists the snapshot');

  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on', 'lazy.qcow2', '1M'], dir);
  qemuIo(path.join(dir, 'lazy.qcow2'), ['write -P 1 0 4k']);
  const lazy = compareAll(t, dir, 'lazy.qcow2');
  t.equal((lazy.info['format-specific'] as { data: Record<string, unknown> }).data['lazy-refcounts'], true, 'lazy refcounts reported');

  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '1M'], dir);
  qemuIo(path.join(dir, 'v2.qcow2'), ['write -P 1 0 4k', 'write -z 64k 64k']);
  compareAll(t, dir, 'v2.qcow2');
});

t.test('a raw file whose size is not a multiple of 512 (QEMU rounds up), and a child over it', { skip }, async (t) => {
  const dir = t.testdir();
  const raw = path.join(dir, 'odd.raw');
  fs.writeFileSync(raw, '');
  fs.truncateSync(raw, 100000);
  const fd = fs.openSync(raw, 'r+');
  fs.writeSync(fd, Buffer.from('xyz'), 0, 3, 70000);
  fs.writeSync(fd, Buffer.from('end'), 0, 3, 99997);
  fs.closeSync(fd);
  compareAll(t, dir, 'odd.raw');
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'odd.raw', '-F', 'raw', 'child.qcow2', '1M'], dir);
  const f = compareAll(t, dir, 'child.qcow2');
  t.equal(f.chain[1]['virtual-size'], 100352, 'the raw parent is seen in whole sectors');
});

t.test('images disksnap writes: create, write, diff create (4k clusters), a three-deep chain', { skip }, async (t) => {
  const dir = t.testdir();
  t.equal(cli(['create', 'base.img', '3M'], { cwd: dir }).status, 0);
  t.equal(cli(['write', 'base.img', '0'], { cwd: dir, input: Buffer.alloc(128 * KiB, 0x11) }).status, 0);
  let r = cli(['diff', 'create', 'base.img', 'child.qcow2', '--cluster-size', '4k'], { cwd: dir });
  t.equal(r.status, 0, r.stderr);
  t.equal(cli(['write', 'child.qcow2', String(63 * KiB)], { cwd: dir, input: Buffer.alloc(2 * KiB, 0x22) }).status, 0);
  t.equal(cli(['write', 'child.qcow2', String(2 * MiB)], { cwd: dir, input: Buffer.alloc(4 * KiB) }).status, 0);
  r = cli(['diff', 'create', 'child.qcow2', 'gc.qcow2'], { cwd: dir });
  t.equal(r.status, 0, r.stderr);
  t.equal(cli(['write', 'gc.qcow2', String(MiB + 5)], { cwd: dir, input: Buffer.alloc(70 * KiB, 0x33) }).status, 0);
  compareAll(t, dir, 'child.qcow2');
  const f = compareAll(t, dir, 'gc.qcow2');
  t.same(f.chain.map((l) => l.format), ['qcow2', 'qcow2', 'raw']);
  t.equal(f.check?.['check-errors'], 0);
});

t.test('relative backing names across directories: the names are combined as qemu-img combines them', { skip }, async (t) => {
  const dir = t.testdir();
  fs.mkdirSync(path.join(dir, 'a'));
  fs.mkdirSync(path.join(dir, 'b'));
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'a/base.qcow2', '1M'], dir);
  qemuIo(path.join(dir, 'a', 'base.qcow2'), ['write -P 1 0 4k']);
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', '../a/base.qcow2', '-F', 'qcow2', 'b/child.qcow2'], dir);
  qemuIo(path.join(dir, 'b', 'child.qcow2'), ['write -P 2 64k 4k']);
  for (const name of ['b/child.qcow2', './b/child.qcow2', path.join(dir, 'b', 'child.qcow2')]) {
    const f = compareAll(t, dir, name);
    t.equal(f.info['backing-filename'], '../a/base.qcow2', `${name}: the name as recorded`);
  }
});

t.test('a child whose parent is gone: info still describes it (each layer read alone); the rest fail as qemu-img fails', { skip }, async (t) => {
  const dir = t.testdir();
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', 'parent.qcow2', '1M'], dir);
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'parent.qcow2', '-F', 'qcow2', 'child.qcow2'], dir);
  qemuIo(path.join(dir, 'child.qcow2'), ['write -P 2 0 4k']);
  fs.unlinkSync(path.join(dir, 'parent.qcow2'));
  const f = compareAll(t, dir, 'child.qcow2');
  t.equal(f.info['backing-filename'], 'parent.qcow2', 'info described the child');
  t.equal(f.map, undefined, 'map failed for both');
});

t.test('a format disksnap does not read is refused by name, never described as raw', { skip }, async (t) => {
  const dir = t.testdir();
  sh('qemu-img', ['create', '-q', '-f', 'vmdk', 'disk.vmdk', '1M'], dir);
  for (const args of [
    ['info', '--output', 'json', 'disk.vmdk'],
    ['map', '--output', 'json', 'disk.vmdk'],
    ['measure', '--output', 'json', 'disk.vmdk'],
  ]) {
    const r = cli(args, { cwd: dir });
    t.equal(r.status, 1, `${args[0]}: a failure`);
    t.match(r.stderr, /vmdk/, `${args[0]}: names the format`);
    t.equal(r.out, '', `${args[0]}: no document`);
  }
});

t.test('the committed fixtures: info of every one disksnap reads (extended L2 and the corrupt bit included), check of the sound ones', { skip }, async (t) => {
  const dir = t.testdir();
  const fixtures = path.join(ROOT, 'fixtures', 'qcow2');
  for (const f of ['good.qcow2', 'good-v2.qcow2', 'corrupt-bit.qcow2', 'extended-l2.qcow2', 'leaked-cluster.qcow2', 'missing-backing.qcow2', 'loop-a.qcow2', 'loop-b.qcow2']) {
    fs.copyFileSync(path.join(fixtures, f), path.join(dir, f));
  }
  for (const f of ['good.qcow2', 'good-v2.qcow2', 'corrupt-bit.qcow2', 'extended-l2.qcow2', 'missing-backing.qcow2']) {
    compareAll(t, dir, f, { only: ['info', 'check'] });
  }
  // a chain that loops: the image alone is described, the chain is refused by both
  compareAll(t, dir, 'loop-a.qcow2', { only: ['info', 'info --backing-chain'] });
  const loop = cli(['info', '--output', 'json', '--backing-chain', 'loop-a.qcow2'], { cwd: dir });
  t.match(loop.stderr, /infinite loop/, 'the loop is named');
  // map and measure of these two: disksnap refuses to read their data (the corrupt bit; subclusters)
  compareAll(t, dir, 'good.qcow2');
  compareAll(t, dir, 'good-v2.qcow2');
  const ext = compareAll(t, dir, 'extended-l2.qcow2', { only: ['info'] });
  t.equal((ext.info['format-specific'] as { data: Record<string, unknown> }).data['extended-l2'], true, 'extended-l2 is reported');
  const cb = compareAll(t, dir, 'corrupt-bit.qcow2', { only: ['info'] });
  t.equal((cb.info['format-specific'] as { data: Record<string, unknown> }).data.corrupt, true, 'the corrupt bit is reported');
});

t.test('check with leaks: the counts, and after repair the leaks-fixed of a second check', { skip }, async (t) => {
  const dir = t.testdir();
  const fixture = path.join(ROOT, 'fixtures', 'qcow2', 'leaked-cluster.qcow2');
  fs.copyFileSync(fixture, path.join(dir, 'leak.qcow2'));
  const f = compareAll(t, dir, 'leak.qcow2');
  t.ok((f.check?.leaks as number) > 0, 'the fixture leaks');
  fs.copyFileSync(fixture, path.join(dir, 'q.qcow2'));
  fs.copyFileSync(fixture, path.join(dir, 'd.qcow2'));
  const q = qemuImg(['check', '-r', 'leaks', '--output=json', 'q.qcow2'], dir);
  const d = cli(['diff', 'check', '--repair', '--output', 'json', 'd.qcow2'], { cwd: dir });
  t.equal(d.status, q.status, 'exit status after repair');
  const qj = JSON.parse(q.out) as Record<string, unknown>;
  const dj = JSON.parse(d.out) as Record<string, unknown>;
  t.ok((qj['leaks-fixed'] as number) > 0, 'qemu-img fixed leaks');
  t.same({ ...dj, filename: 'X' }, { ...qj, filename: 'X' }, 'the same document after repair (filenames differ by design of the test)');
});

t.test('measure --size: raw and qcow2 for sizes and cluster sizes', { skip }, async (t) => {
  for (const size of ['1', '513', '1M', '1G', '100G', '3T']) {
    const q = qemuImg(['measure', '--output=json', '--size', size]);
    const d = cli(['measure', '--output', 'json', '--size', size]);
    t.same(JSON.parse(d.out), JSON.parse(q.out), `raw ${size}`);
    for (const cs of ['512', '65536', '2M']) {
      const q2 = qemuImg(['measure', '--output=json', '--size', size, '-O', 'qcow2', '-o', `cluster_size=${cs}`]);
      const d2 = cli(['measure', '--output', 'json', '--size', size, '-O', 'qcow2', '--cluster-size', cs]);
      t.equal(d2.status, q2.status, `qcow2 ${size} ${cs}: exit status`);
      if (q2.status === 0) t.same(JSON.parse(d2.out), JSON.parse(q2.out), `qcow2 ${size}, ${cs}-byte clusters`);
    }
  }
  const human = cli(['measure', '--size', '1G', '-O', 'qcow2']);
  t.equal(human.status, 0, human.stderr);
  t.equal(human.out, qemuImg(['measure', '--size', '1G', '-O', 'qcow2']).out, 'the human text is qemu-img measure\'s');
});

t.test('check --output json of a raw file: no document, exit 63, as qemu-img', { skip }, async (t) => {
  const dir = t.testdir();
  t.equal(cli(['create', 'a.img', '1M'], { cwd: dir }).status, 0);
  const q = qemuImg(['check', '--output=json', 'a.img'], dir);
  const d = cli(['diff', 'check', '--output', 'json', 'a.img'], { cwd: dir });
  t.equal(q.status, 63);
  t.equal(d.status, 63);
  t.equal(d.out, '', 'nothing on stdout');
});

t.test('--output accepts human and json only; --json and --output together are refused', async (t) => {
  const dir = t.testdir();
  t.equal(cli(['create', 'a.img', '1M'], { cwd: dir }).status, 0);
  for (const args of [
    ['info', '--output', 'xml', 'a.img'],
    ['info', '--output=yaml', 'a.img'],
    ['map', '--output', 'JSON', 'a.img'],
    ['diff', 'check', '--output', 'xml', 'a.img'],
    ['measure', '--output', 'csv', 'a.img'],
  ]) {
    const r = cli(args, { cwd: dir });
    t.equal(r.status, 2, `${args.join(' ')}: bad usage`);
    t.match(r.stderr, /--output '(xml|yaml|JSON|csv)' is not supported.*human.*json/, `${args.join(' ')}: names the value and the choices`);
    t.equal(r.out, '', 'nothing on stdout');
  }
  const both = cli(['info', '--json', '--output', 'json', 'a.img'], { cwd: dir });
  t.equal(both.status, 2);
  t.match(both.stderr, /cannot be combined/);
  const human = cli(['info', '--output', 'human', 'a.img'], { cwd: dir });
  t.equal(human.status, 0);
  t.equal(human.out, cli(['info', 'a.img'], { cwd: dir }).out, '--output human is the default');
  const m = cli(['measure', 'a.img', '--size', '1M'], { cwd: dir });
  t.equal(m.status, 2, 'measure: FILE and --size together is bad usage');
});

t.test("--json keeps disksnap's own documents (map: start, not offset)", async (t) => {
  const dir = t.testdir();
  t.equal(cli(['create', 'a.img', '1M'], { cwd: dir }).status, 0);
  t.equal(cli(['write', 'a.img', '4096'], { cwd: dir, input: Buffer.alloc(4096, 1) }).status, 0);
  const info = JSON.parse(cli(['info', '--json', 'a.img'], { cwd: dir }).out) as Record<string, unknown>;
  t.equal(info.virtualSize, MiB, 'info --json: disksnap keys');
  const map = JSON.parse(cli(['map', '--json', 'a.img'], { cwd: dir }).out) as { extents: Record<string, unknown>[] };
  t.ok(map.extents.every((e) => typeof e.start === 'number' && !('offset' in e)), 'map --json extents: start, and no offset key');
  t.ok(map.extents.some((e) => e.kind === 'data' && e.hostOffset === 4096), 'the host offset keeps its own name');
});
