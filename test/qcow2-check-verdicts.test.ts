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
