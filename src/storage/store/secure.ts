/**
 * What disksnap asks of a store and of its secrets before it trusts them, as ssh asks of
 * ~/.ssh:
 *   - a secret (a key file, a plain store's tag.key) is readable by its owner alone, and that
 *     owner is this user (or root): otherwise refused, with the chmod to run;
 *   - a store and the entries at its top and in its record directories (volumes/, snapshots/,
 *     leases/, keys/) are owned by this user (or root), not writable by others, and none is a
 *     symbolic link: another user who could plant a link or a directory there could make
 *     disksnap write through it (the lock, records, leases) or trust what it names. With the
 *     directories ours and closed to others, nobody else can add entries below them, so the
 *     block objects (millions, each checked against its digest on every read) are not walked;
 *     blocks/ and its prefix directories are.
 * The store's own path may be a link (the user's choice); nothing inside it may.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DisksnapError, fromNodeError, isDisksnapError } from '../../engine/errors';
import { native } from '../../engine/native';

function refuse(message: string, p: string): DisksnapError {
  return new DisksnapError(message, 'EPERM', 1, p);
}

function myUid(): number | undefined {
  return typeof process.getuid === 'function' ? process.getuid() : undefined;
}

const mode = (st: { mode: number }) => (st.mode & 0o7777).toString(8).padStart(4, '0');

/** Refuses a secret that group or others can read, or that another user owns. */
export function assertPrivate(file: string, st: fs.Stats, what: string): void {
  const uid = myUid();
  if (uid !== undefined && st.uid !== uid && st.uid !== 0) {
    throw refuse(`${what} ${file} is owned by uid ${st.uid}, not by you (uid ${uid}); use a key file of your own`, file);
  }
  if (st.mode & 0o077) {
    throw refuse(`${what} ${file} can be read by group or others (mode ${mode(st)}); run: chmod 600 ${file}`, file);
  }
}

/** Reads a secret file, checked on the descriptor it is read from (no race with a chmod or rename). */
export function readSecretFile(file: string, what: string, check: (data: Buffer) => void = () => undefined): Buffer {
  let fd: number;
  try {
    fd = fs.openSync(file, 'r');
  } catch (e) {
    throw fromNodeError(e, file);
  }
  try {
    const data = fs.readFileSync(fd);
    check(data); // what is wrong with the content is said first: it is the likelier mistake
    const st = fs.fstatSync(fd);
    if (st.isFile()) assertPrivate(file, st, what);
    return data;
  } finally {
    fs.closeSync(fd);
  }
}

/** What the trust check needs of an lstat: st_mode and st_uid (fs.Stats has both). */
interface Owned {
  mode: number;
  uid: number;
}

/**
 * What is wrong with a store entry of this stat (undefined: nothing), for the user `uid`
 * (undefined where the platform has none). No path is needed to tell: the usual entry passes
 * without one being built.
 */
function untrusted(st: Owned, kind: 'file' | 'directory', uid: number | undefined): 'link' | 'kind' | 'owner' | 'mode' | undefined {
  const type = st.mode & fs.constants.S_IFMT;
  if (type === fs.constants.S_IFLNK) return 'link';
  if (type !== (kind === 'directory' ? fs.constants.S_IFDIR : fs.constants.S_IFREG)) return 'kind';
  if (uid !== undefined && st.uid !== uid && st.uid !== 0) return 'owner';
  if (st.mode & 0o002) return 'mode';
  return undefined;
}

function assertTrusted(p: string, st: Owned, kind: 'file' | 'directory'): void {
  const uid = myUid();
  switch (untrusted(st, kind, uid)) {
    case 'link':
      throw refuse(`${p} is a symbolic link inside a store; disksnap follows none there (remove it, or restore what it replaced)`, p);
    case 'kind':
      throw refuse(`${p} is not a ${kind}; a store has a ${kind} there`, p);
    case 'owner':
      throw refuse(`${p} in the store is owned by uid ${st.uid}, not by you (uid ${uid}); use a store of your own (or run: chown -R ${uid} ${p})`, p);
    case 'mode':
      throw refuse(`${p} in the store is writable by others (mode ${mode(st)}); run: chmod o-w ${p}`, p);
  }
}

/**
 * Every entry of directory `dir` (checked already), lstat'ed in one native call: a store of
 * 300 snapshots has ~1,200 record files, whose fs.lstatSync one by one was ~15 ms of every
 * command. `kindOf` says what each name must be.
 */
function assertEntries(dir: string, kindOf: (name: string) => 'file' | 'directory'): void {
  let listed: { names: string[]; modes: number[]; uids: number[] };
  try {
    listed = native().lstatDir(dir);
  } catch (e) {
    if (isDisksnapError(e, 'ENOENT')) return; // removed since it was checked
    throw e;
  }
  const { names, modes, uids } = listed;
  const uid = myUid();
  for (let i = 0; i < names.length; i++) {
    const kind = kindOf(names[i]);
    const st = { mode: modes[i], uid: uids[i] };
    // (a store's blocks/ alone has 256 entries: path.join and a uid lookup for each were ~3 ms
    // of every command, so the path is built only for an entry that fails)
    if (untrusted(st, kind, uid)) assertTrusted(path.join(dir, names[i]), st, kind);
  }
}

function lstatIfAny(p: string): fs.Stats | undefined {
  try {
    return fs.lstatSync(p);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw fromNodeError(e, p);
  }
}

const TOP_FILES = ['store.json', 'lock', 'tag.key'];
const RECORD_DIRS = ['volumes', 'snapshots', 'leases', 'keys'];

/** Refuses a store (an existing directory) that another user could have changed under us. */
export function assertTrustedStore(root: string): void {
  let st: fs.Stats;
  try {
    st = fs.statSync(root); // the store's own path may be a link
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw fromNodeError(e, root);
  }
  assertTrusted(root, st, 'directory');
  for (const name of TOP_FILES) {
    const p = path.join(root, name);
    const s = lstatIfAny(p);
    if (s) assertTrusted(p, s, 'file');
  }
  const blocks = path.join(root, 'blocks');
  const bs = lstatIfAny(blocks);
  if (bs) {
    assertTrusted(blocks, bs, 'directory');
    // its prefix directories (up to 256, made as objects need them; the objects below them are
    // not walked: see above), and the temporary files a killed process can leave beside them
    // (the O_DIRECT probe: direct.ts)
    assertEntries(blocks, (name) => (name.startsWith('.tmp-') ? 'file' : 'directory'));
  }
  for (const d of RECORD_DIRS) {
    const dir = path.join(root, d);
    const s = lstatIfAny(dir);
    if (!s) continue;
    assertTrusted(dir, s, 'directory');
    assertEntries(dir, () => 'file');
  }
}
