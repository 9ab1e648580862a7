/**
 * A child that names no backing format (no backing-format header extension) has its backing
 * file probed, as QEMU probes it: qcow2 and raw parents are read, a parent of another format
 * QEMU knows (vmdk, vhdx, vdi, qed, vpc, parallels) is refused by that format's name and
 * never read as raw. QEMU is the oracle: qemu-img convert of each child shows the parent's
 * guest bytes (so a raw reading of the parent file would be wrong).
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { Qcow2Image } from '../src/image/qcow2/image';
import { createQcow2 } from '../src/image/qcow2/create';
import { needQemu, qemuImgOk, qemuIo } from './helpers/qemu';

const skip = needQemu();
const MiB = 2 ** 20;

/** A parent of `format` with 64 KiB of 0x5a at 0, and a child naming it without a format. */
function makeChain(dir: string, format: string): { parent: string; child: string } {
  const parent = path.join(dir, `parent.${format}`);
  qemuImgOk('create', '-q', '-f', format, parent, '1M');
  qemuIo(parent, ['write -P 0x5a 0 64k'], format);
  const child = path.join(dir, 'child.qcow2');
  createQcow2(child, { size: MiB, backingFile: path.basename(parent) });
  return { parent, child };
}

/** What QEMU shows through the child: the raw guest bytes of `qemu-img convert`. */
function qemuShows(dir: string, child: string): Buffer {
  const out = path.join(dir, 'shown.raw');
  qemuImgOk('convert', '-O', 'raw', child, out);
  return fs.readFileSync(out);
}

for (const format of ['vmdk', 'vhdx', 'vdi', 'qed', 'vpc', 'parallels']) {
  t.test(`a ${format} backing file without a backing format is refused by name, not read as raw`, { skip }, async (t) => {
    const dir = t.testdir();
    const { parent, child } = makeChain(dir, format);
    const shown = qemuShows(dir, child);
    t.ok(shown.subarray(0, 65536).every((b) => b === 0x5a), `QEMU probes the ${format} parent and shows its guest bytes`);
    const head = fs.readFileSync(parent).subarray(0, 65536);
    t.notOk(head.every((b) => b === 0x5a), `the ${format} file's own first bytes are not the guest bytes (a raw reading would be wrong)`);
    t.throws(() => Qcow2Image.open(child), { code: 'EUNSUPPORTED', message: new RegExp(`is a ${format} image`) }, 'disksnap refuses, naming the format');
  });
}

for (const format of ['raw', 'qcow2']) {
  t.test(`a ${format} backing file without a backing format is probed and read`, { skip }, async (t) => {
    const dir = t.testdir();
    const { child } = makeChain(dir, format);
    const shown = qemuShows(dir, child);
    const img = Qcow2Image.open(child);
    const buf = Buffer.alloc(img.virtualSize);
    img.readSync(buf, 0);
    img.close();
    t.ok(buf.equals(shown), 'disksnap shows the same bytes as qemu-img convert');
  });
}
