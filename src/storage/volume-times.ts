/**
 * What a volume file's stat proves about writes to it (./capture.ts): a snapshot stats the
 * volume before its read and again after it, and any write in between must move the mtime or
 * ctime.
 *
 * The kernel stamps those times from a coarse clock (one tick: 4 ms at 250 Hz), so a write in
 * the same tick as the last one can leave them as they were. Two ways to be sure every write
 * after the first stat moves them:
 *   - Multigrain timestamps (Linux 6.13 and later on ext4, xfs, btrfs, tmpfs): once a stat has
 *     seen the times, the next change gets a fine-grained time, later than what the stat saw.
 *     No wait. Probed per directory on an unnamed O_TMPFILE (native mtimeProbe).
 *   - Elsewhere: wait until "now" is past the file's mtime by two ticks (unsettledMs), then
 *     stat; by 2 s more where the filesystem keeps times in whole seconds (before this probe a
 *     snapshot there could miss a write made within the second of the last one).
 * A qcow2 snapshot always waited in the second case, since adding its bitmap a moment before
 * moves the mtime: 9 ms after that update, of which the setup in between hid all but ~2-4 ms
 * (12 alternating runs of the bench's scattered incremental, DISKSNAP_COARSE_TIMES=1 against
 * the probe: 156 and 154.5 ms at the median, inside the spread). The probe also found the
 * whole-second filesystems, where the 9 ms wait was too short (README, "Times that move").
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockFile } from '../engine/file';
import { MtimeProbe, native, NativeStat } from '../engine/native';
import { VolumeStat, fileIdentityOf, sameFileIdentity } from './store/records';
import { sleep } from './common';

/** statfs f_type of the filesystems whose page_mkwrite updates mtime (linux/magic.h). */
const MTIME_ON_FAULT = new Set([0xef53 /* ext2/3/4 */, 0x58465342 /* xfs */, 0x9123683e /* btrfs */]);

/** Whether writes to `file`, through write(2) or a shared mapping of clean pages, move its mtime. */
export function writesMoveMtime(file: BlockFile): boolean {
  try {
    return fs.fstatSync(file.fd).isFile() && MTIME_ON_FAULT.has(fs.statfsSync(file.path).type);
  } catch {
    return false;
  }
}

/** Why the volume's stat says it moved between two stats, or undefined. */
export function statMoved(st0: NativeStat, st1: NativeStat): string | undefined {
  if (st1.size !== st0.size) return `size ${st0.size} -> ${st1.size}`;
  if (st1.mtimeNs !== st0.mtimeNs) return 'modification time moved';
  if (st1.ctimeNs !== st0.ctimeNs) return 'change time moved';
  if (st1.ino !== st0.ino) return 'replaced by another file';
  return undefined;
}

let bootIdCache: string | undefined;

/** This boot's id (the kernel's random boot_id), or '' where it cannot be read. */
function bootId(): string {
  if (bootIdCache === undefined) {
    try {
      bootIdCache = fs.readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim();
    } catch {
      bootIdCache = '';
    }
  }
  return bootIdCache;
}

/** A stat as a record keeps it; null without a boot id to bind it to. */
export function statOf(st: NativeStat): VolumeStat | null {
  const boot = bootId();
  return /^[0-9a-f-]{36}$/.test(boot) ? { ...fileIdentityOf(st), bootId: boot } : null;
}

/**
 * Whether the volume is exactly as the parent recorded it: the same file (device, inode) with
 * the same size, mtime and ctime, seen in the same boot. The parent recorded its stat only
 * where every write moves them (a live read by clean pages), and both stats were taken where
 * any later write moves the times (stableStat), so a write after the parent's moment gives a
 * later time. ctime cannot be set back from user space, so `touch -d` hides no write. Within
 * one boot the times a stat returns are the kernel's own, moved by every write; across a crash
 * they are what the journal last committed, which can be older than data already on disk: a
 * restart means reading the volume again.
 */
export function sameStat(v: VolumeStat | null | undefined, st: NativeStat): boolean {
  return !!v && v.bootId === bootId() && sameFileIdentity(v, st);
}

/** The volume's stat, taken where any write from here on moves its times (see above). */
export async function stableStat(file: BlockFile): Promise<NativeStat> {
  const st = file.stat();
  const wait = unsettledMs(file, st);
  if (!wait) return st;
  await sleep(wait);
  return file.stat();
}

let tickMs: number | undefined;

/** The coarse clock's tick (ms) the kernel stamps file times from; 10 where it does not tell. */
function tick(): number {
  if (tickMs === undefined) {
    const ns = native().timestampTickNs();
    tickMs = ns > 0 ? ns / 1e6 : 10;
  }
  return tickMs;
}

/** Per directory: how writes move mtime there (native mtimeProbe), null where it cannot tell. */
const probes = new Map<string, MtimeProbe | null>();

function probeOf(file: BlockFile, st: NativeStat): MtimeProbe | null {
  const dir = path.dirname(file.path);
  let p = probes.get(dir);
  if (p === undefined) {
    p = native().mtimeProbe(dir);
    probes.set(dir, p);
  }
  // a file bind-mounted from elsewhere is not on its directory's filesystem
  return p && p.dev === st.dev ? p : null;
}

/**
 * Milliseconds until any write to `file` after the stat `st` moves its mtime: 0 when it does.
 *   - A regular file on a filesystem with multigrain timestamps: 0 (DISKSNAP_COARSE_TIMES=1
 *     turns that off, for tests of the wait on such a machine).
 *   - Elsewhere "now" must be past the mtime by the filesystem's granularity and the coarse
 *     clock's tick (which can lag Date.now by a tick), and a millisecond for rounding: 9 ms on a
 *     250 Hz kernel, 21 at 100 Hz.
 *   - Where times are kept in whole seconds (ext3, ext4 with 128-byte inodes, vfat: 2 s), 2 s
 *     more: a write a second after another can get the same time there.
 */
export function unsettledMs(file: BlockFile, st: NativeStat): number {
  const p = st.isRegular ? probeOf(file, st) : null;
  if (p?.fine && process.env.DISKSNAP_COARSE_TIMES !== '1') return 0;
  const need = (p?.wholeSeconds ? 2000 : 0) + 2 * tick() + 1;
  const age = Number(BigInt(Date.now()) * 1_000_000n - st.mtimeNs) / 1e6;
  return age >= need ? 0 : Math.ceil(need - age);
}
