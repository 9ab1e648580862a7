/**
 * What is attached where: small state records of our own, always checked against the kernel.
 *
 *   $DISKSNAP_RUN_DIR (default /run/disksnap)/
 *     attachments/loopN.json   one record per loop device disksnap attached (written by
 *                              temporary name + rename; removed by detach)
 *     fuse/<id>/disk           the flat view of a qcow2 child, served by a FUSE server
 *     fuse/<id>.log            that server's log
 *
 * The kernel is the authority: a record counts only while /dev/loopN is bound to the file the
 * record names (LOOP_GET_STATUS64: backing st_dev and st_ino). Records left by a reboot, a
 * `losetup -d` or a crash are therefore ignored, and replaced or removed when next touched.
 * Loop devices attached by other tools (losetup, mount -o loop) are found by scanning
 * /sys/block/loop* with LOOP_GET_STATUS64, so `attachmentOf` sees them too.
 * /run is a tmpfs: records do not survive a reboot, and neither do loop devices.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { native, LoopStatus, LO_FLAGS_AUTOCLEAR, LO_FLAGS_DIRECT_IO, LO_FLAGS_READ_ONLY } from '../engine/native';
import { DisksnapError, fromNodeError } from '../engine/errors';

export type AttachVia = 'loop' | 'fuse+loop';

export interface FuseRecord {
  pid: number;
  /** /proc/<pid>/stat start time, so that a recycled pid is not mistaken for the server */
  startTime: string;
  mountpoint: string;
  /** the regular file the loop device is attached to */
  file: string;
  log: string;
}

export interface AttachmentRecord {
  version: 1;
  device: string;
  index: number;
  /** the image as given to attach, made absolute (symlinks resolved) */
  image: string;
  imageDev: number;
  imageIno: string;
  format: string;
  readOnly: boolean;
  via: AttachVia;
  /** what the loop device is bound to: the image itself, or the FUSE file */
  backing: string;
  backingDev: number;
  backingIno: string;
  fuse?: FuseRecord;
  attachedAt: string;
}

export function runDir(): string {
  return process.env.DISKSNAP_RUN_DIR || '/run/disksnap';
}

export function attachmentsDir(): string {
  return path.join(runDir(), 'attachments');
}

export function fuseDir(): string {
  return path.join(runDir(), 'fuse');
}

function recordPath(index: number): string {
  return path.join(attachmentsDir(), `loop${index}.json`);
}

export function writeRecord(rec: AttachmentRecord): void {
  fs.mkdirSync(attachmentsDir(), { recursive: true, mode: 0o755 });
  const final = recordPath(rec.index);
  const tmp = `${final}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  fs.writeFileSync(tmp, JSON.stringify(rec, null, 2) + '\n', { mode: 0o644 });
  fs.renameSync(tmp, final);
}

export function removeRecord(index: number): void {
  fs.rmSync(recordPath(index), { force: true });
}

/** Every record on disk, valid or not (unparseable files are skipped). */
export function readRecords(): AttachmentRecord[] {
  let names: string[];
  try {
    names = fs.readdirSync(attachmentsDir());
  } catch {
    // none yet (nothing attached since boot) or unreadable: no records; the kernel scan
    // (kernelLoops) still finds every bound device
    return [];
  }
  const out: AttachmentRecord[] = [];
  for (const name of names) {
    if (!/^loop\d+\.json$/.test(name)) continue;
    try {
      const rec = JSON.parse(fs.readFileSync(path.join(attachmentsDir(), name), 'utf8')) as AttachmentRecord;
      if (rec && rec.version === 1 && typeof rec.device === 'string') out.push(rec);
    } catch {
      // a torn or foreign file: ignored, like a stale record
    }
  }
  return out;
}

export function readRecord(index: number): AttachmentRecord | undefined {
  try {
    const rec = JSON.parse(fs.readFileSync(recordPath(index), 'utf8')) as AttachmentRecord;
    return rec && rec.version === 1 ? rec : undefined;
  } catch {
    // missing or not JSON: no record; a record only ever counts once the kernel confirms it
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel's view

export interface KernelLoop {
  index: number;
  device: string;
  /** "7:N" */
  majorMinor: string;
  status: LoopStatus;
  /** /sys/block/loopN/loop/backing_file (whole path; " (deleted)" suffix when unlinked) */
  backingFile: string;
  readOnly: boolean;
}

/** Status of one loop device, or undefined when it is not bound (or does not exist). */
export function kernelLoop(index: number): KernelLoop | undefined {
  const sys = `/sys/block/loop${index}`;
  let majorMinor: string;
  try {
    majorMinor = fs.readFileSync(path.join(sys, 'dev'), 'utf8').trim();
  } catch {
    return undefined; // no such device in sysfs: nothing is bound to it
  }
  const device = `/dev/loop${index}`;
  let status: LoopStatus | null;
  try {
    status = native().loopStatus(device);
  } catch (e) {
    if (e instanceof DisksnapError && (e.code === 'ENOENT' || e.code === 'ENXIO' || e.code === 'ENODEV')) return undefined;
    // Without root, /dev/loopN cannot be opened: sysfs says the same, world-readable.
    if (e instanceof DisksnapError && (e.code === 'EACCES' || e.code === 'EPERM')) status = statusFromSysfs(sys);
    else throw e;
  }
  if (!status) return undefined;
  let backingFile = status.fileName;
  try {
    backingFile = fs.readFileSync(path.join(sys, 'loop', 'backing_file'), 'utf8').replace(/\n$/, '');
  } catch {
    // unbound between the two reads, or sysfs without loop attributes
  }
  let readOnly = (status.flags & LO_FLAGS_READ_ONLY) !== 0;
  try {
    readOnly = readOnly || fs.readFileSync(path.join(sys, 'ro'), 'utf8').trim() === '1';
  } catch {
    // keep the flag
  }
  return { index, device, majorMinor, status, backingFile, readOnly };
}

/** LOOP_GET_STATUS64's answer rebuilt from /sys/block/loopN (for users who cannot open the device). */
function statusFromSysfs(sys: string): LoopStatus | null {
  const read = (name: string): string | undefined => {
    try {
      return fs.readFileSync(path.join(sys, name), 'utf8').replace(/\n$/, '');
    } catch {
      return undefined; // attribute absent (device unbound, older kernel): not known
    }
  };
  const backing = read('loop/backing_file');
  if (backing === undefined) return null; // not bound
  let dev = 0;
  let ino = 0n;
  try {
    const st = fs.statSync(backing.replace(/ \(deleted\)$/, ''), { bigint: true });
    dev = Number(st.dev);
    ino = st.ino;
  } catch {
    // the backing file was unlinked or is out of reach: identity unknown
  }
  const flag = (name: string, bit: number): number => (read(name) === '1' ? bit : 0);
  return {
    number: Number(/loop(\d+)$/.exec(sys)?.[1] ?? -1),
    backingDev: dev,
    backingIno: ino,
    offset: Number(read('loop/offset') ?? 0),
    sizeLimit: Number(read('loop/sizelimit') ?? 0),
    flags: flag('ro', LO_FLAGS_READ_ONLY) | flag('loop/autoclear', LO_FLAGS_AUTOCLEAR) | flag('loop/partscan', 8) | flag('loop/dio', LO_FLAGS_DIRECT_IO),
    fileName: backing.slice(0, 63),
  };
}

/** Every bound loop device. Cheap: one ioctl per existing /sys/block/loopN. */
export function kernelLoops(): KernelLoop[] {
  let names: string[];
  try {
    names = fs.readdirSync('/sys/block');
  } catch {
    return []; // no sysfs (a container without /sys): no loop device can be seen, or used
  }
  const out: KernelLoop[] = [];
  for (const name of names) {
    const m = /^loop(\d+)$/.exec(name);
    if (!m) continue;
    const k = kernelLoop(Number(m[1]));
    if (k) out.push(k);
  }
  return out.sort((a, b) => a.index - b.index);
}

/** Whether the kernel's loop device is (still) bound to what the record says. */
export function recordMatchesKernel(rec: AttachmentRecord, k: KernelLoop | undefined): boolean {
  return !!k && k.index === rec.index && k.status.backingDev === rec.backingDev && k.status.backingIno.toString() === rec.backingIno;
}

/** "/dev/loop3" -> 3; undefined for anything that is not a loop device path. */
export function loopIndexOf(device: string): number | undefined {
  const m = /^\/dev\/loop(\d+)$/.exec(device);
  if (m) return Number(m[1]);
  // a symlink or another node for the same device
  try {
    const st = fs.statSync(device);
    if (!st.isBlockDevice()) return undefined;
    const major = Math.floor(st.rdev / 256) & 0xfff;
    if (major !== 7) return undefined;
    const sysDev = `${major}:${(st.rdev & 0xff) | ((st.rdev >> 12) & 0xfff00)}`;
    for (const name of fs.readdirSync('/sys/block')) {
      const mm = /^loop(\d+)$/.exec(name);
      if (mm && fs.readFileSync(`/sys/block/${name}/dev`, 'utf8').trim() === sysDev) return Number(mm[1]);
    }
  } catch {
    return undefined; // gone, or sysfs unreadable: not a loop device we can name
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Mounts

export interface MountEntry {
  majorMinor: string;
  mountpoint: string;
  fstype: string;
  source: string;
  options: string;
}

function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, oct: string) => String.fromCharCode(parseInt(oct, 8)));
}

/** /proc/self/mountinfo, parsed. */
export function mounts(): MountEntry[] {
  let text: string;
  try {
    text = fs.readFileSync('/proc/self/mountinfo', 'utf8');
  } catch (e) {
    throw fromNodeError(e, '/proc/self/mountinfo');
  }
  const out: MountEntry[] = [];
  for (const line of text.split('\n')) {
    if (!line) continue;
    const parts = line.split(' ');
    const sep = parts.indexOf('-');
    if (sep < 6) continue;
    out.push({
      majorMinor: parts[2],
      mountpoint: unescapeMount(parts[4]),
      options: parts[5],
      fstype: parts[sep + 1],
      source: unescapeMount(parts[sep + 2] ?? ''),
    });
  }
  return out;
}

/** Mountpoints of the filesystem on a block device "major:minor". */
export function mountpointsOf(majorMinor: string, all: MountEntry[] = mounts()): string[] {
  return all.filter((m) => m.majorMinor === majorMinor).map((m) => m.mountpoint);
}

// ---------------------------------------------------------------------------------------------
// Processes

/** Field 22 of /proc/<pid>/stat (start time in clock ticks), or undefined if there is no such live process. */
export function processStartTime(pid: number): string | undefined {
  let stat: string;
  try {
    stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return undefined; // no such process: that is the answer
  }
  // comm may contain spaces and parentheses: fields start after the last ')'
  const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const state = rest[0];
  if (state === 'Z' || state === 'X') return undefined; // exited (a zombie nobody reaped yet)
  return rest[19];
}

export function fuseServerAlive(f: FuseRecord): boolean {
  return processStartTime(f.pid) === f.startTime;
}
