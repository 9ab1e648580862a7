/**
 * Finding the QMP socket of the QEMU that runs an image, when the user gave no --qmp:
 *
 *   1. the lock: QEMU holds OFD locks on every image it opens. /proc/locks lists them by
 *      device:inode, but with pid -1 (OFD locks belong to an open file, not a process), so
 *      the holder is found from /proc/PID/fdinfo/FD, whose `lock:` lines name the locks of
 *      that open file, for each fd that is the image (same device and inode)
 *   2. the holder must be a qemu-system-* process (its /proc/PID/cmdline)
 *   3. its QMP sockets, from the command line:
 *        -qmp unix:PATH[,server=on,wait=off]          (also -qmp-pretty, and unix:path=PATH)
 *        -chardev socket,id=X,path=PATH,server=on ... + -mon chardev=X,mode=control
 *      (`,,` is QEMU's escaped comma; a relative PATH is taken from /proc/PID/cwd)
 *   4. each socket is tried in order with a short greeting timeout (QEMU serves one client
 *      per QMP socket: a socket someone else is connected to answers nothing); the first that
 *      greets is used. All are monitors of the same QEMU, so which one does not matter.
 *
 * The result is used only when unambiguous: exactly one process holds the lock and it is a
 * QEMU with a QMP socket that answers. Otherwise findQmpSocket says why (the caller turns it
 * into "pass --qmp SOCKET"). Linux only (/proc).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { QmpClient } from './qmp';
import { BlockFile } from '../engine/file';
import { DisksnapError, isDisksnapError } from '../engine/errors';

export interface QmpHolder {
  pid: number;
  socket: string;
}

/** Splits a QEMU option value at single commas; `,,` is a literal comma. */
export function splitQemuOpts(value: string): string[] {
  const out: string[] = [];
  let cur = '';
  for (let i = 0; i < value.length; i++) {
    if (value[i] === ',') {
      if (value[i + 1] === ',') {
        cur += ',';
        i++;
        continue;
      }
      out.push(cur);
      cur = '';
    } else cur += value[i];
  }
  out.push(cur);
  return out;
}

function keyValues(parts: string[]): Map<string, string> {
  const m = new Map<string, string>();
  for (const p of parts) {
    const eq = p.indexOf('=');
    if (eq < 0) m.set(p, 'on');
    else m.set(p.slice(0, eq), p.slice(eq + 1));
  }
  return m;
}

/** The unix paths of the QMP sockets a QEMU command line (argv without argv[0] or with it) serves. */
export function parseQmpSockets(argv: string[], cwd = '/'): string[] {
  const opt = (a: string) => (a.startsWith('--') ? a.slice(1) : a);
  const out: string[] = [];
  const chardevs = new Map<string, string>();
  const mons: { chardev: string; mode: string }[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = opt(argv[i]);
    const v = argv[i + 1];
    if (v === undefined) break;
    if (a === '-qmp' || a === '-qmp-pretty') {
      i++;
      const parts = splitQemuOpts(v);
      const first = parts[0];
      if (first.startsWith('unix:')) {
        const p = first.slice(5);
        out.push(p.startsWith('path=') ? p.slice(5) : p);
      }
    } else if (a === '-chardev') {
      i++;
      const parts = splitQemuOpts(v);
      const kv = keyValues(parts.slice(1));
      if (parts[0] === 'socket' && kv.has('path') && kv.has('id') && ['on', 'yes', 'true'].includes(kv.get('server') ?? '')) chardevs.set(kv.get('id')!, kv.get('path')!);
    } else if (a === '-mon') {
      i++;
      const parts = splitQemuOpts(v);
      const kv = keyValues(parts);
      // -mon NAME is the short form of -mon chardev=NAME; the default mode is readline (HMP)
      const chardev = kv.get('chardev') ?? (parts[0].includes('=') ? undefined : parts[0]);
      if (chardev) mons.push({ chardev, mode: kv.get('mode') ?? 'readline' });
    }
  }
  for (const m of mons) {
    const p = chardevs.get(m.chardev);
    if (p !== undefined && m.mode === 'control') out.push(p);
  }
  return [...new Set(out.map((p) => path.resolve(cwd, p)))];
}

function readText(p: string): string | undefined {
  try {
    return fs.readFileSync(p, 'utf8');
  } catch {
    return undefined; // the process ended, or is not ours to read
  }
}

/** The pids whose open files hold a lock on `file` (by device and inode). */
export function lockHolders(file: string): number[] {
  const st = fs.statSync(file);
  const locks = readText('/proc/locks') ?? '';
  // /proc/locks names the device as major:minor in hex (glibc's dev_t split), fdinfo the same
  const major = Math.floor(st.dev / 256) & 0xfff;
  const minor = (st.dev & 0xff) | (Math.floor(st.dev / 4096) & ~0xff);
  const want = `${major.toString(16).padStart(2, '0')}:${minor.toString(16).padStart(2, '0')}:${st.ino} `;
  if (!locks.split('\n').some((l) => l.includes(want))) return [];
  const pids: number[] = [];
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d) || Number(d) === process.pid) continue;
    let fds: string[];
    try {
      fds = fs.readdirSync(`/proc/${d}/fd`);
    } catch {
      continue; // gone, or another user's process
    }
    for (const fd of fds) {
      let s: fs.Stats;
      try {
        s = fs.statSync(`/proc/${d}/fd/${fd}`);
      } catch {
        continue;
      }
      if (s.ino !== st.ino || s.dev !== st.dev) continue;
      const info = readText(`/proc/${d}/fdinfo/${fd}`) ?? '';
      if (info.split('\n').some((l) => l.startsWith('lock:') && l.includes(want))) {
        pids.push(Number(d));
        break;
      }
    }
  }
  return pids;
}

export function cmdlineOf(pid: number): string[] {
  const raw = readText(`/proc/${pid}/cmdline`) ?? '';
  return raw.split('\0').filter((x, i, all) => x !== '' || i < all.length - 1);
}

/** Whether a QMP socket greets within timeoutMs (nobody else connected). */
async function answers(socket: string, timeoutMs: number): Promise<boolean> {
  try {
    const q = await QmpClient.connect(socket, { timeoutMs });
    q.close();
    return true;
  } catch {
    return false;
  }
}

/**
 * The QMP socket of the QEMU holding `file`'s lock, or a reason why none can be used
 * (one line, for the error the caller raises).
 */
export async function findQmpSocket(file: string, opts: { timeoutMs?: number } = {}): Promise<QmpHolder | { reason: string }> {
  const pids = lockHolders(file);
  if (pids.length === 0) return { reason: `no process holding a lock on ${file} was found` };
  if (pids.length > 1) return { reason: `several processes hold locks on ${file} (pids ${pids.join(', ')})` };
  const pid = pids[0];
  const argv = cmdlineOf(pid);
  if (!/^qemu-system-/.test(path.basename(argv[0] ?? ''))) return { reason: `${file} is held by pid ${pid} (${path.basename(argv[0] ?? '?')}), not by a qemu-system process` };
  let cwd = '/';
  try {
    cwd = fs.readlinkSync(`/proc/${pid}/cwd`);
  } catch {
    // unreadable: relative socket paths stay relative to /
  }
  const sockets = parseQmpSockets(argv.slice(1), cwd);
  if (sockets.length === 0) return { reason: `the QEMU holding ${file} (pid ${pid}) has no QMP unix socket on its command line` };
  for (const s of sockets) if (await answers(s, opts.timeoutMs ?? 1500)) return { pid, socket: s };
  return { reason: `no QMP socket of the QEMU holding ${file} (pid ${pid}: ${sockets.join(', ')}) answers (another client may be connected)` };
}

/**
 * The QMP socket to use for `file`: `given` (--qmp) as it is; else, when `file` is locked, the
 * socket of the QEMU holding it (a note on stderr says which), or ELOCKED saying to pass
 * --qmp SOCKET; undefined when nothing holds the file (the offline path).
 */
export async function qmpFor(file: string, given: string | undefined, what: string): Promise<string | undefined> {
  if (given !== undefined) return given;
  if (!fs.existsSync(file)) return undefined;
  try {
    try {
      BlockFile.open(file, { write: true, lock: 'exclusive' }).close();
    } catch (e) {
      // a read-only file (not ours to write): a QEMU writing it still conflicts with a reader
      if (!isDisksnapError(e) || !['EACCES', 'EPERM', 'EROFS'].includes(e.code)) throw e;
      BlockFile.open(file, { lock: 'shared' }).close();
    }
    return undefined;
  } catch (e) {
    if (!isDisksnapError(e, 'ELOCKED')) throw e;
  }
  const found = await findQmpSocket(file);
  if ('reason' in found) {
    throw new DisksnapError(`${file} is in use (locked) and its QMP socket was not found (${found.reason}): to ${what} live, pass --qmp SOCKET; else stop the VM first`, 'ELOCKED', undefined, file);
  }
  process.stderr.write(`${file} is in use by QEMU (pid ${found.pid}): using its QMP socket ${found.socket}\n`);
  return found.socket;
}
