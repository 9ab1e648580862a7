/**
 * A real Linux guest for the VM tests: QEMU (TCG, no KVM needed) boots a Debian kernel from
 * disksnap's images and runs a small shell job inside, whose output the test reads.
 *
 *   test/helpers/guest-setup.sh (run once, by .ci/run): qemu-system-x86, busybox-static, kmod,
 *     and the Debian kernel extracted with dpkg -x into CACHE/kernel/<version>/; qemu-guest-agent
 *     the same way into CACHE/qga (guestAgentFiles/guestAgentArgs put it in a guest, on ttyS1)
 *   initramfs (built here once per kernel version and init script, CACHE/initramfs-*.cpio.gz):
 *     busybox, the modules `modprobe --show-depends` lists for virtio_pci, virtio_blk, ext4 and
 *     qemu_fw_cfg (in that order, insmod'ed), and /init: mount /dev/vda, switch_root into it
 *   root filesystem (makeRootfs: raw ext4 made by `mkfs.ext4 -d`, no mount needed):
 *     /bin/busybox, /sbin/init: mounts proc/sys/dev/tmp, prints "DS-BOOTED", copies the job
 *     from fw_cfg (opt/disksnap/job) to /tmp/job.sh, runs it, prints "DS-JOB-EXIT <status>",
 *     syncs, remounts / read-only (so the host sees a clean ext4), and reboots, which with
 *     -no-reboot ends QEMU.
 *
 * The job is any busybox shell script; it talks to the test through the serial console:
 * what it prints is the test's to read, and `read LINE` waits for a line the test sends. QEMU's disk is virtio-blk with node name "disk0" (device id "vd0") and, when asked,
 * a QMP socket for live operations.
 */
import { spawn, spawnSync, ChildProcess } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { gzipSync } from 'node:zlib';
import type { Test } from 'tap';
import { QmpClient } from '../../src/host/qmp';
import { missing, REQUIRE_TOOLS } from './tools';

export const GUEST_CACHE = process.env.DISKSNAP_GUEST_CACHE ?? '/var/tmp/disksnap-guest';
const SETUP = path.join(__dirname, 'guest-setup.sh');
const MODULES = ['virtio_pci', 'virtio_blk', 'ext4', 'qemu_fw_cfg'];
const SBIN = ['/usr/sbin', '/sbin'];

/** /init of the initramfs: load the drivers, mount the disk, switch_root into it. */
const INITRAMFS_INIT = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /newroot
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /modules.list); do insmod /modules/$m 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if ! mount -t ext4 /dev/vda /newroot; then echo "DS-NOROOT"; reboot -f; fi
umount /proc /sys
exec switch_root /newroot /sbin/init
`;

/** /sbin/init of the root filesystem: run the job handed over through fw_cfg. */
const ROOTFS_INIT = `#!/bin/busybox sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mount -t tmpfs tmp /tmp
echo "DS-BOOTED"
job=/sys/firmware/qemu_fw_cfg/by_name/opt/disksnap/job/raw
if [ -f $job ]; then
  cat $job > /tmp/job.sh
  sh /tmp/job.sh
  echo "DS-JOB-EXIT $?"
else
  echo "DS-NOJOB"
fi
sync
mount -o remount,ro /
echo "DS-DOWN"
reboot -f
`;

export interface GuestKernel {
  version: string;
  vmlinuz: string;
  /** the extracted package: ROOT/lib/modules/<version> */
  root: string;
}

function kernelFromCache(): GuestKernel | undefined {
  let version: string;
  try {
    version = fs.readFileSync(path.join(GUEST_CACHE, 'kernel.version'), 'utf8').trim();
  } catch {
    return undefined; // not prepared: needGuest() says how to prepare it
  }
  const root = path.join(GUEST_CACHE, 'kernel', version);
  const vmlinuz = path.join(root, 'boot', `vmlinuz-${version}`);
  if (!fs.existsSync(vmlinuz) || !fs.existsSync(path.join(root, 'lib/modules', version, 'modules.dep'))) return undefined;
  return { version, vmlinuz, root };
}

function findSbin(cmd: string): string | undefined {
  for (const d of [...(process.env.PATH ?? '').split(':'), ...SBIN]) {
    const p = path.join(d, cmd);
    if (d && fs.existsSync(p)) return p;
  }
  return undefined;
}

/**
 * Skip reason for tap's `{ skip }` (false when a guest can boot). Under
 * DISKSNAP_REQUIRE_TOOLS=1 a missing part throws instead (CI runs guest-setup.sh first).
 */
export function needGuest(): string | false {
  const tools = missing({ commands: ['qemu-system-x86_64', 'qemu-img', 'mkfs.ext4', 'debugfs'] });
  if (tools) return tools;
  const lacks: string[] = [];
  if (!fs.existsSync('/bin/busybox')) lacks.push('/bin/busybox (busybox-static)');
  if (!findSbin('modprobe')) lacks.push('modprobe (kmod)');
  if (!kernelFromCache()) lacks.push(`a guest kernel in ${GUEST_CACHE}`);
  if (lacks.length === 0) return false;
  const reason = `needs ${lacks.join(', ')}: run ${SETUP}`;
  if (REQUIRE_TOOLS) throw new Error(`${reason}; DISKSNAP_REQUIRE_TOOLS=1 forbids skipping`);
  return reason;
}

/** The modules to insmod, dependencies first, as `modprobe --show-depends` orders them. */
function moduleFiles(k: GuestKernel): string[] {
  const modprobe = findSbin('modprobe');
  if (!modprobe) throw new Error('modprobe not found (package kmod)');
  const out: string[] = [];
  for (const m of MODULES) {
    const r = spawnSync(modprobe, ['-d', k.root, '-S', k.version, '--show-depends', m], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`modprobe --show-depends ${m}: ${r.stderr}`);
    for (const line of r.stdout.split('\n')) {
      const f = /^insmod (\S+)/.exec(line)?.[1];
      if (f && !out.includes(f)) out.push(f);
    }
  }
  return out;
}

/** A newc cpio archive (what the kernel unpacks as initramfs). */
class Cpio {
  private parts: Buffer[] = [];
  private ino = 1;
  private add(name: string, mode: number, data: Buffer, rdev: [number, number] = [0, 0]): void {
    const fields = [this.ino++, mode, 0, 0, 1, 0, data.length, 0, 0, rdev[0], rdev[1], name.length + 1, 0];
    const head = '070701' + fields.map((f) => f.toString(16).padStart(8, '0')).join('');
    const pad = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
    const nameBuf = Buffer.from(name + '\0');
    this.parts.push(Buffer.from(head), nameBuf, pad(head.length + nameBuf.length), data, pad(data.length));
  }
  dir(name: string): void {
    this.add(name, 0o040755, Buffer.alloc(0));
  }
  file(name: string, data: Buffer, exec = false): void {
    this.add(name, exec ? 0o100755 : 0o100644, data);
  }
  charDev(name: string, major: number, minor: number): void {
    this.add(name, 0o020600, Buffer.alloc(0), [major, minor]);
  }
  done(): Buffer {
    this.add('TRAILER!!!', 0, Buffer.alloc(0));
    return Buffer.concat(this.parts);
  }
}

/** Builds (once per kernel and init script) the initramfs; returns its path. */
export function initramfs(k: GuestKernel): string {
  const key = createHash('sha256').update(k.version).update(INITRAMFS_INIT).update(MODULES.join(',')).digest('hex').slice(0, 12);
  const out = path.join(GUEST_CACHE, `initramfs-${k.version}-${key}.cpio.gz`);
  if (fs.existsSync(out)) return out;
  const cpio = new Cpio();
  for (const d of ['bin', 'dev', 'proc', 'sys', 'newroot', 'modules']) cpio.dir(d);
  cpio.charDev('dev/console', 5, 1);
  cpio.file('bin/busybox', fs.readFileSync('/bin/busybox'), true);
  cpio.file('init', Buffer.from(INITRAMFS_INIT), true);
  const mods = moduleFiles(k);
  for (const m of mods) cpio.file(`modules/${path.basename(m)}`, fs.readFileSync(m));
  cpio.file('modules.list', Buffer.from(mods.map((m) => path.basename(m)).join('\n') + '\n'));
  const tmp = `${out}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, gzipSync(cpio.done(), { level: 6 }));
  fs.renameSync(tmp, out);
  return out;
}

/**
 * A raw ext4 root filesystem of `size` bytes holding busybox, the init that runs jobs, and
 * `files` (path inside the guest -> content).
 */
export function makeRootfs(image: string, opts: { size?: number; files?: Record<string, string | Buffer>; executables?: Record<string, Buffer> } = {}): void {
  const tree = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-rootfs-'));
  try {
    for (const d of ['bin', 'sbin', 'proc', 'sys', 'dev', 'tmp', 'data']) fs.mkdirSync(path.join(tree, d));
    fs.copyFileSync('/bin/busybox', path.join(tree, 'bin/busybox'));
    fs.chmodSync(path.join(tree, 'bin/busybox'), 0o755);
    for (const l of ['sh', 'mount', 'cat', 'echo', 'sync', 'reboot', 'ls', 'md5sum', 'sleep', 'dd', 'rm', 'mkdir', 'cmp', 'seq', 'head', 'wc', 'sha256sum', 'tr', 'stat']) {
      fs.symlinkSync('busybox', path.join(tree, 'bin', l));
    }
    fs.writeFileSync(path.join(tree, 'sbin/init'), ROOTFS_INIT, { mode: 0o755 });
    for (const [p, content] of Object.entries(opts.files ?? {})) {
      const dest = path.join(tree, p);
      fs.mkdirSync(path.dirname(dest), { recursive: true });
      fs.writeFileSync(dest, content);
    }
    for (const [p, content] of Object.entries(opts.executables ?? {})) {
      const dest = path.join(tree, p);
      fs.mkdirSync(path.dirname(dest), { recursive: true });
      fs.writeFileSync(dest, content, { mode: 0o755 });
    }
    const mkfs = findSbin('mkfs.ext4') ?? 'mkfs.ext4';
    fs.rmSync(image, { force: true });
    fs.closeSync(fs.openSync(image, 'w'));
    fs.truncateSync(image, opts.size ?? 64 << 20);
    // -E root_owner: files owned by root whoever runs the test; no lazy init: the guest's
    // kernel would otherwise zero the inode tables in the background while the test runs
    const r = spawnSync(mkfs, ['-q', '-F', '-d', tree, '-E', 'root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0', '-L', 'dsroot', image], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`mkfs.ext4 -d: ${r.stderr}`);
  } finally {
    fs.rmSync(tree, { recursive: true, force: true });
  }
}

const QGA = path.join(GUEST_CACHE, 'qga', 'usr', 'sbin', 'qemu-ga');

/** Skip reason (false when qemu-ga is ready for a guest); throws under DISKSNAP_REQUIRE_TOOLS=1. */
export function needGuestAgent(): string | false {
  if (fs.existsSync(QGA)) return false;
  const reason = `needs qemu-ga in ${path.dirname(QGA)}: run ${SETUP}`;
  if (REQUIRE_TOOLS) throw new Error(`${reason}; DISKSNAP_REQUIRE_TOOLS=1 forbids skipping`);
  return reason;
}

/**
 * The guest agent for makeRootfs's `executables`: /bin/qemu-ga and the host's shared libraries
 * that `ldd` lists for it, at the same paths (host and guest run the same Debian release).
 * In the guest: `qemu-ga -m isa-serial -p /dev/ttyS1` with QEMU given guestAgentArgs(socket).
 */
export function guestAgentFiles(): Record<string, Buffer> {
  const out: Record<string, Buffer> = { 'bin/qemu-ga': fs.readFileSync(QGA) };
  const r = spawnSync('ldd', [QGA], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`ldd ${QGA}: ${r.stderr}`);
  for (const line of r.stdout.split('\n')) {
    const lib = /=>\s*(\/\S+)/.exec(line)?.[1] ?? /^\s*(\/\S+)\s+\(/.exec(line)?.[1];
    if (lib) out[lib.slice(1)] = fs.readFileSync(lib); // follows the symlink: the library itself
  }
  return out;
}

/** QEMU arguments for a guest agent on the second serial port (ttyS1), its chardev a unix socket. */
export function guestAgentArgs(socket: string): string[] {
  return ['-chardev', `socket,path=${socket},server=on,wait=off,id=qga0`, '-device', 'isa-serial,chardev=qga0'];
}

/** Reads a file of the ext4 filesystem in a raw image with debugfs (undefined if absent). */
export function readGuestFile(rawImage: string, file: string): Buffer | undefined {
  const debugfs = findSbin('debugfs') ?? 'debugfs';
  const r = spawnSync(debugfs, ['-R', `cat ${file}`, rawImage], { maxBuffer: 1 << 28 });
  const err = r.stderr.toString();
  if (/File not found|not found by ext2_lookup/.test(err)) return undefined;
  if (r.status !== 0) throw new Error(`debugfs cat ${file}: ${err}`);
  return r.stdout;
}

export interface BootOptions {
  /** the image QEMU boots (its backing chain opened as QEMU opens it) */
  disk: string;
  format?: 'raw' | 'qcow2';
  /** busybox sh script run as root with / = the disk */
  job: string;
  /** QMP socket path, for live operations */
  qmp?: string;
  /** whole run, boot included (default 180 s) */
  timeoutMs?: number;
  memoryMiB?: number;
  /** where QEMU's console output is copied as it arrives (for failures) */
  log?: string;
  /** more QEMU arguments (a guest agent's chardev and serial port) */
  extraArgs?: string[];
}

export interface GuestResult {
  /** everything the guest printed on its console */
  output: string;
  /** the job's exit status, undefined if it never ended */
  jobExit: number | undefined;
  /** QEMU's exit status (0 after the guest rebooted under -no-reboot) */
  qemuExit: number | null;
  timedOut: boolean;
  ms: number;
}

/** A guest booting or running; `result` settles when QEMU exits (or is killed at the timeout). */
export class Guest {
  readonly proc: ChildProcess;
  output = '';
  readonly result: Promise<GuestResult>;
  private watchers: { re: RegExp; resolve(m: RegExpExecArray): void }[] = [];
  private dir: string;

  constructor(opts: BootOptions) {
    const k = kernelFromCache();
    if (!k) throw new Error(`no guest kernel in ${GUEST_CACHE}: run ${SETUP}`);
    const initrd = initramfs(k);
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-guest-'));
    const jobFile = path.join(this.dir, 'job.sh');
    fs.writeFileSync(jobFile, opts.job);
    const format = opts.format ?? 'qcow2';
    const args = [
      '-machine', 'pc,accel=tcg', '-m', String(opts.memoryMiB ?? 256), '-smp', '1',
      '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot', '-serial', 'stdio',
      '-kernel', k.vmlinuz, '-initrd', initrd,
      '-append', 'console=ttyS0 quiet panic=-1 rdinit=/init mitigations=off',
      '-blockdev', `driver=file,filename=${opts.disk},node-name=file0`,
      '-blockdev', `driver=${format},file=file0,node-name=disk0`,
      '-device', 'virtio-blk-pci,drive=disk0,id=vd0',
      '-fw_cfg', `name=opt/disksnap/job,file=${jobFile}`,
    ];
    if (opts.qmp) args.push('-qmp', `unix:${opts.qmp},server=on,wait=off`);
    args.push(...(opts.extraArgs ?? []));
    const started = Date.now();
    this.proc = spawn('qemu-system-x86_64', args, { stdio: ['pipe', 'pipe', 'pipe'] });
    const log = opts.log ? fs.openSync(opts.log, 'a') : undefined;
    const onData = (b: Buffer) => {
      const s = b.toString('utf8').replace(/\r/g, '');
      this.output += s;
      if (log !== undefined) fs.writeSync(log, s);
      for (const w of [...this.watchers]) {
        const m = w.re.exec(this.output);
        if (m) {
          this.watchers.splice(this.watchers.indexOf(w), 1);
          w.resolve(m);
        }
      }
    };
    this.proc.stdout!.on('data', onData);
    this.proc.stderr!.on('data', onData);
    const timeoutMs = opts.timeoutMs ?? 180_000;
    this.result = new Promise((resolve) => {
      let timedOut = false;
      const timer = setTimeout(() => {
        timedOut = true;
        this.proc.kill('SIGKILL');
      }, timeoutMs);
      this.proc.on('exit', (code) => {
        clearTimeout(timer);
        if (log !== undefined) fs.closeSync(log);
        fs.rmSync(this.dir, { recursive: true, force: true });
        const exit = /DS-JOB-EXIT (\d+)/.exec(this.output);
        resolve({ output: this.output, jobExit: exit ? Number(exit[1]) : undefined, qemuExit: code, timedOut, ms: Date.now() - started });
      });
    });
  }

  /** Resolves when the console output matches re; rejects if QEMU exits first. */
  waitFor(re: RegExp, timeoutMs = 120_000): Promise<RegExpExecArray> {
    const m = re.exec(this.output);
    if (m) return Promise.resolve(m);
    return new Promise((resolve, reject) => {
      const w = { re, resolve: (x: RegExpExecArray) => { clearTimeout(timer); resolve(x); } };
      const timer = setTimeout(() => {
        this.watchers.splice(this.watchers.indexOf(w), 1);
        reject(new Error(`guest: no ${re} within ${timeoutMs} ms; output:\n${this.output.slice(-3000)}`));
      }, timeoutMs);
      this.watchers.push(w);
      void this.result.then(() => {
        if (this.watchers.includes(w)) {
          this.watchers.splice(this.watchers.indexOf(w), 1);
          clearTimeout(timer);
          reject(new Error(`guest: QEMU exited before ${re}; output:\n${this.output.slice(-3000)}`));
        }
      });
    });
  }

  /** Types a line on the guest's console (a job reads it with `read LINE`). */
  send(line: string): void {
    this.proc.stdin!.write(line + '\n');
  }

  kill(): void {
    if (this.proc.exitCode === null) this.proc.kill('SIGKILL');
  }
}

/** Boots, runs the job to the end, returns what the guest printed. */
export function bootGuest(opts: BootOptions): Promise<GuestResult> {
  return new Guest(opts).result;
}

/** Asserts that the guest's job ran and exited 0; the console is shown when it did not. */
export function jobOk(t: Test, r: GuestResult, msg: string): void {
  t.equal(r.jobExit, 0, `${msg} (job exit 0, ${r.ms} ms)`, { console: r.output.slice(-4000), qemuExit: r.qemuExit, timedOut: r.timedOut });
}

/** Describes a run for a failed assertion. */
export function explain(r: GuestResult): string {
  return `qemu exit ${r.qemuExit}, job exit ${r.jobExit}, ${r.timedOut ? 'TIMED OUT, ' : ''}${r.ms} ms; console:\n${r.output.slice(-4000)}`;
}

/**
 * QEMU with no machine at all (`-machine none`): enough for QMP, block nodes and block jobs,
 * without a guest. Resolves once the QMP socket exists.
 */
export async function startBareQemu(qmpSocket: string, extraArgs: string[] = []): Promise<ChildProcess> {
  const proc = spawn('qemu-system-x86_64', ['-machine', 'none', '-nodefaults', '-no-user-config', '-display', 'none', '-qmp', `unix:${qmpSocket},server=on,wait=off`, ...extraArgs], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  proc.stderr!.on('data', (b: Buffer) => (err += b.toString()));
  for (let i = 0; i < 400; i++) {
    if (fs.existsSync(qmpSocket)) return proc;
    if (proc.exitCode !== null) break;
    await new Promise((r) => setTimeout(r, 25));
  }
  proc.kill('SIGKILL');
  throw new Error(`qemu-system-x86_64 -machine none did not open ${qmpSocket}: ${err}`);
}

/** Kills a QEMU started by a test and waits until it is gone. */
export async function stopQemu(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const gone = new Promise((r) => proc.once('exit', r));
  proc.kill('SIGKILL');
  await gone;
}

/**
 * A path for a unix socket (at most 107 bytes: tap's test directories are longer) in a fresh
 * directory under the system's temporary directory, removed at the test's end.
 */
export function socketPath(t: { teardown(fn: () => void): void }, name = 'qmp.sock'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'dsq-'));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return path.join(dir, name);
}

/**
 * Connects to a QEMU that may still be starting: the socket file appears at bind(), a moment
 * before QEMU listens, so ECONNREFUSED/ENOENT are retried for a few seconds. (A probe that
 * connects and drops the connection is not used: QEMU can then leave the next client without
 * answers.)
 */
export async function connectQmp(sock: string): Promise<QmpClient> {
  for (let i = 0; ; i++) {
    try {
      return await QmpClient.connect(sock);
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (i >= 200 || (code !== 'ECONNREFUSED' && code !== 'ENOENT')) throw e;
      await new Promise((r) => setTimeout(r, 25));
    }
  }
}
