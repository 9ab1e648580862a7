/**
 * `disksnap diff check` gives the verdict and exit status `qemu-img check` gives on the same
 * file: 0 clean, 1 the check could not be done (a missing backing file, a truncated header,
 * an unsupported feature), 2 corruption, 3 leaks only, and for a raw image QEMU's 63 with
 * "no qcow2 metadata to check". Images QEMU checks although it would not write them (the
 * corrupt bit, extended L2 entries) are checked, not refused. The allocated and total
 * cluster counts are QEMU's (guest clusters), and so is the image end offset.
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { cli } from './helpers/cli';
import { needQemu, qemuImg, qemuImgOk, qemuIo } from './helpers/qemu';

const skip = needQemu();
const FIXTURES = path.resolve(__dirname, '..', 'fixtures', 'qcow2');

/** Both checks on `file` (run in its directory, where relative backing names resolve). */
function both(file: string): { qemu: number | null; qemuOut: string; ours: number | null; ourOut: string; ourErr: string } {
  const q = qemuImg('check', file);
  const d = cli(['diff', 'check', file]);
  return { qemu: q.status, qemuOut: q.stdout + q.stderr, ours: d.status, ourOut: d.out, ourErr: d.stderr };
}

const fixtures = fs
  .readdirSync(FIXTURES)
  .filter((f) => f.endsWith('.qcow2') && !f.startsWith('loop-')) // QEMU does not return on a looping chain
  .sort();

t.test('every committed fixture: the same exit status as qemu-img check', { skip }, async (t) => {
  const dir = t.testdir();
  for (const f of fixtures) fs.copyFileSync(path.join(FIXTURES, f), path.join(dir, f));
  const seen = new Set<number | null>();
  for (const f of fixtures) {
    const r = both(path.join(dir, f));
    seen.add(r.qemu);
    t.equal(r.ours, r.qemu, `${f}: exit ${r.qemu} as qemu-img check (${r.qemuOut.split('\n')[0]}) — disksnap: ${(r.ourErr || r.ourOut).split('\n')[0]}`);
    if (r.qemu === 1) t.equal(r.ourErr.trim().split('\n').length, 1, `${f}: one line on stderr`);
  }
  t.same([...seen].sort(), [0, 1, 2, 3], 'the fixtures cover every verdict');
});

t.test('the corrupt bit and extended L2 entries are checked, with QEMU\'s counts', { skip }, async (t) => {
  const dir = t.testdir();
  const ext = path.join(dir, 'ext.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=65536', ext, '4M');
  qemuIo(ext, ['write -P 0x11 0 64k', 'write -P 0x22 1M 8k', 'write -P 0x33 3M 200k']);
  const plain = path.join(dir, 'plain.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', plain, '4M');
  qemuIo(plain, ['write -P 0x11 0 64k', 'write -P 0x22 1M 8k', 'write -z 2M 64k']);
  const corrupt = path.join(dir, 'corrupt-bit.qcow2');
  fs.copyFileSync(path.join(FIXTURES, 'corrupt-bit.qcow2'), corrupt);
  for (const f of [ext, plain, corrupt]) {
    const q = JSON.parse(qemuImgOk('check', '--output=json', f)) as Record<string, number>;
    const d = cli(['diff', 'check', '--json', f]);
    t.equal(d.status, 0, `${path.basename(f)}: clean, as QEMU says ${d.stderr}`);
    const r = JSON.parse(d.out) as Record<string, number>;
    t.equal(r.allocatedClusters, q['allocated-clusters'], `${path.basename(f)}: allocated clusters as QEMU counts them`);
    t.equal(r.totalClusters, q['total-clusters'], `${path.basename(f)}: total clusters`);
    t.equal(r.imageEndOffset, q['image-end-offset'], `${path.basename(f)}: image end offset`);
  }
});

t.test('a raw image: no qcow2 metadata to check, exit 63 as QEMU', { skip }, async (t) => {
  const dir = t.testdir();
  const raw = path.join(dir, 'disk.img');
  fs.writeFileSync(raw, Buffer.alloc(1 << 20, 0xab));
  const r = both(raw);
  t.equal(r.qemu, 63, `qemu-img check: ${r.qemuOut.trim()}`);
  t.equal(r.ours, 63, 'disksnap: the same status');
  t.match(r.ourOut + r.ourErr, /no qcow2 metadata to check/);
  t.notMatch(r.ourOut + r.ourErr, /corrupt|ERROR/i, 'a raw image is not called corrupt');
});

/** Adds `delta` to the stored refcount of the cluster at `offset` (16-bit refcounts, the default order 4); returns the old one. */
function setStoredRefcount(file: string, offset: number, delta: number): number {
  const fd = fs.openSync(file, 'r+');
  try {
    const head = Buffer.alloc(104);
    fs.readSync(fd, head, 0, head.length, 0);
    const clusterBits = head.readUInt32BE(20);
    if (head.readUInt32BE(96) !== 4) throw new Error('test expects refcount_order 4');
    const reftable = Number(head.readBigUInt64BE(48));
    const cluster = Math.floor(offset / 2 ** clusterBits);
    const perBlock = 2 ** (clusterBits - 1);
    const ent = Buffer.alloc(8);
    fs.readSync(fd, ent, 0, 8, reftable + Math.floor(cluster / perBlock) * 8);
    const at = Number(ent.readBigUInt64BE(0)) + (cluster % perBlock) * 2;
    const rc = Buffer.alloc(2);
    fs.readSync(fd, rc, 0, 2, at);
    const was = rc.readUInt16BE(0);
    rc.writeUInt16BE(was + delta);
    fs.writeSync(fd, rc, 0, 2, at);
    return was;
  } finally {
    fs.closeSync(fd);
  }
}

t.test('internal snapshots are counted as qemu-img check counts them, not refused', { skip }, async (t) => {
  const dir = t.testdir();
  const img = path.join(dir, 'snaps.qcow2');
  // Three snapshots (one deleted again), compressed and discarded clusters, 4 KiB clusters:
  // clusters with refcounts 1, 2 and 3, and L2 tables shared between L1 tables.
  qemuImgOk('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', img, '8M');
  qemuIo(img, ['write -P 1 0 2M']);
  qemuImgOk('snapshot', '-c', 'a', img);
  qemuIo(img, ['write -P 2 1M 2M', 'write -c -P 3 6M 64k']);
  qemuImgOk('snapshot', '-c', 'b', img);
  qemuIo(img, ['write -P 4 0 512k', 'discard 3M 64k']);
  qemuImgOk('snapshot', '-d', 'a', img);
  qemuImgOk('snapshot', '-c', 'c', img);
  const verdict = (f: string) => {
    const q = qemuImg('check', '--output=json', f);
    const d = cli(['diff', 'check', '--json', f]);
    return { qs: q.status, q: JSON.parse(q.stdout || '{}') as Record<string, number>, ds: d.status, d: JSON.parse(d.out || '{}') as Record<string, number>, err: d.stderr };
  };
  const clean = verdict(img);
  t.equal(clean.qs, 0, 'qemu-img check: clean');
  t.equal(clean.ds, 0, `disksnap: clean too ${clean.err}`);
  t.equal(clean.d.allocatedClusters, clean.q['allocated-clusters'], 'allocated clusters as QEMU counts them');
  t.equal(clean.d.imageEndOffset, clean.q['image-end-offset'], 'image end offset');

  // A cluster that both the active table and snapshot "b" use (guest 1 MiB, written before
  // "b", kept by "c"): its refcount is 3. One less is a corruption, one more a leak.
  const map = JSON.parse(qemuImgOk('map', '--output=json', img)) as { start: number; length: number; offset?: number; data: boolean }[];
  const shared = map.find((e) => e.start <= 1 << 20 && 1 << 20 < e.start + e.length);
  t.ok(shared?.data && shared.offset !== undefined, 'guest offset 1 MiB is stored in this file');
  const at = (shared!.offset as number) + ((1 << 20) - shared!.start);
  const low = path.join(dir, 'low.qcow2');
  fs.copyFileSync(img, low);
  t.equal(setStoredRefcount(low, at, -1), 3, 'its refcount was 3: the active table and snapshots "b" and "c"');
  const lowV = verdict(low);
  t.equal(lowV.qs, 2, 'qemu-img check: a cluster with 3 references and refcount 2 is a corruption');
  t.equal(lowV.ds, 2, 'disksnap: the same verdict');
  t.ok(lowV.d.corruptions > 0 && lowV.d.corruptions === lowV.q['corruptions'], `as many corruptions as QEMU counts (${lowV.q['corruptions']})`);

  const high = path.join(dir, 'high.qcow2');
  fs.copyFileSync(img, high);
  setStoredRefcount(high, at, +1);
  const highV = verdict(high);
  t.equal(highV.qs, 3, 'qemu-img check: one reference too many stored is a leak');
  t.equal(highV.ds, 3, 'disksnap: the same verdict');
  t.equal(highV.d.leaks, highV.q['leaks'], 'as many leaks');
  const fixed = cli(['diff', 'check', '--repair', high]);
  t.equal(fixed.status, 0, `--repair frees the leak ${fixed.stderr}`);
  t.equal(qemuImg('check', high).status, 0, 'qemu-img check agrees afterwards');
  t.equal(qemuImgOk('snapshot', '-l', high).includes(' b '), true, 'the snapshots are still listed');

  // A table of garbage (nb_snapshots raised to 1000 over the clusters that follow it): a
  // corruption for both, and --repair does not write to the image.
  const garbage = path.join(dir, 'garbage.qcow2');
  fs.copyFileSync(img, garbage);
  const header = (file: string, at: number, value: Buffer) => {
    const fd = fs.openSync(file, 'r+');
    fs.writeSync(fd, value, 0, value.length, at);
    fs.closeSync(fd);
  };
  const be32 = (v: number) => Buffer.from([v >>> 24, (v >>> 16) & 255, (v >>> 8) & 255, v & 255]);
  header(garbage, 60, be32(1000));
  const gQ = qemuImg('check', garbage);
  const gD = cli(['diff', 'check', garbage]);
  t.equal(gQ.status, 2, 'qemu-img check: corruption');
  t.equal(gD.status, 2, `disksnap: corruption (${gD.out.split('\n')[0]})`);
  t.match(gD.out, /snapshot table entry \d+/, 'names a snapshot table entry');
  const before = fs.readFileSync(garbage);
  t.equal(cli(['diff', 'check', '--repair', garbage]).status, 2, '--repair refuses to write to a corrupt image');
  t.ok(fs.readFileSync(garbage).equals(before), 'and the file is unchanged');

  // A table whose first entry is garbage (the image's last cluster, 3 entries): QEMU's check
  // cannot load it (exit 1), nor can disksnap's.
  const cut = path.join(dir, 'cut.qcow2');
  fs.copyFileSync(img, cut);
  const off = Buffer.alloc(8);
  off.writeBigUInt64BE(BigInt(Math.floor(fs.statSync(cut).size / 4096) * 4096 - 4096));
  header(cut, 60, Buffer.concat([be32(3), off]));
  const cutQ = qemuImg('check', cut);
  const cutD = cli(['diff', 'check', cut]);
  t.equal(cutQ.status, 1, `qemu-img check: ${cutQ.stderr.trim().split('\n')[0]}`);
  t.equal(cutD.status, 1, 'disksnap: the check cannot be done either');
  t.match(cutD.stderr, /snapshot table entry 0 .*(extra data|past the end|L1 table)/, cutD.stderr.trim());
  t.equal(cutD.stderr.trim().split('\n').length, 1, 'one line');
});
