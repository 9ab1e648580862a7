/**
 * Loop devices and mounts in tests: a scratch directory outside the repository, and a
 * teardown that unmounts and detaches everything a test set up — in reverse order, even when
 * the test failed half-way — so that no loop device, mount or FUSE server outlives the test.
 */
import { spawn, spawnSync, SpawnSyncReturns } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { missing } from './tools';

export function needLoop(commands: string[] = []): string | false {
  const devs = fs.existsSync('/dev/loop-control') ? false : 'needs /dev/loop-control';
  const base = missing({ root: true, commands: ['mount', 'umount', ...commands] });
  if (base) return base;
  if (devs && process.env.DISKSNAP_REQUIRE_TOOLS === '1') throw new Error(`${devs}, and DISKSNAP_REQUIRE_TOOLS=1 forbids skipping`);
  return devs;
}

export function sh(cmd: string, args: string[], opts: { input?: string; timeoutMs?: number } = {}): SpawnSyncReturns<string> {
  return spawnSync(cmd, args, { encoding: 'utf8', input: opts.input, timeout: opts.timeoutMs ?? 120_000, maxBuffer: 1 << 26 });
}

/** Runs a command and throws with its output unless it exits 0. */
export function shOk(cmd: string, args: string[], opts: { input?: string; timeoutMs?: number } = {}): string {
  const r = sh(cmd, args, opts);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal}): ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/**
 * Writes `text` to a file inside a mounted filesystem from a separate process and reports
 * whether that finished within `ms`. A write to a frozen filesystem sleeps uninterruptibly
 * until the thaw, so the writer is never waited for nor killed: it finishes after the thaw.
 */
export function writeWithTimeout(file: string, text: string, ms = 5000): Promise<boolean> {
  const child = spawn('sh', ['-c', 'printf %s "$1" > "$2" && sync "$2"', 'sh', text, file], { stdio: 'ignore', detached: true });
  child.unref();
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(false), ms);
    child.once('exit', (code) => {
      clearTimeout(timer);
      resolve(code === 0);
    });
  });
}

export interface Scratch {
  dir: string;
  /** registers a mountpoint to unmount at teardown (lazily if it is busy) */
  mounted(mountpoint: string): void;
  /** registers a loop device to detach at teardown */
  attached(device: string): void;
  /** mkdir + mount DEV DIR [opts] + register */
  mount(device: string, dir: string, options?: string[]): void;
  umount(dir: string): void;
  cleanup(): Promise<void>;
}

type Step = { kind: 'mount' | 'loop'; target: string };

export function scratch(prefix = 'disksnap-loop-'): Scratch {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  const steps: Step[] = [];
  const s: Scratch = {
    dir,
    mounted: (mp) => void steps.push({ kind: 'mount', target: mp }),
    attached: (dev) => void steps.push({ kind: 'loop', target: dev }),
    mount(device, mp, options = []) {
      fs.mkdirSync(mp, { recursive: true });
      shOk('mount', [...options, device, mp]);
      s.mounted(mp);
    },
    umount(mp) {
      shOk('umount', [mp]);
      const i = steps.findIndex((x) => x.kind === 'mount' && x.target === mp);
      if (i >= 0) steps.splice(i, 1);
    },
    async cleanup() {
      // eslint-disable-next-line @typescript-eslint/no-var-requires
      const { detach } = require('../../src/host/attach') as typeof import('../../src/host/attach');
      // eslint-disable-next-line @typescript-eslint/no-var-requires
      const { native } = require('../../src/engine/native') as typeof import('../../src/engine/native');
      for (const mp of [...steps].reverse()) {
        if (mp.kind === 'mount') {
          sh('fsfreeze', ['--unfreeze', mp.target]);
          if (sh('umount', [mp.target]).status !== 0) sh('umount', ['-l', mp.target]);
        } else {
          try {
            await detach(mp.target);
          } catch {
            try {
              native().loopDetach(mp.target);
            } catch {
              // already detached
            }
          }
        }
      }
      steps.length = 0;
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
  return s;
}

/**
 * A sparse raw image with an ext4 filesystem (no discard: faster, and nothing to punch). Inode
 * tables and journal are zeroed now, not by the kernel's ext4lazyinit thread after the first
 * mount: that thread writes to the volume for seconds after mounting, which a live read
 * (--no-freeze) sees as the volume changing under it (an EBUSY once in a full CI run).
 */
export function makeExt4(file: string, size = '64M', extra: string[] = []): void {
  shOk('truncate', ['-s', size, file]);
  shOk('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard,lazy_itable_init=0,lazy_journal_init=0', ...extra, file]);
}

/** `debugfs -R 'cat PATH' image`: a file's contents read from an unmounted ext4 image. */
export function debugfsCat(image: string, p: string): string | undefined {
  const r = sh('debugfs', ['-R', `cat ${p}`, image]);
  if (r.status !== 0 || /File not found/.test(r.stderr)) return undefined;
  return r.stdout;
}

/** `debugfs -R 'ls -p DIR'`: the names in a directory of an unmounted ext4 image. */
export function debugfsLs(image: string, dir = '/'): string[] {
  const r = sh('debugfs', ['-R', `ls -p ${dir}`, image]);
  // each line: /inode/mode/uid/gid/name/size/
  return r.stdout
    .split('\n')
    .map((l) => l.split('/')[5])
    .filter((n): n is string => !!n && n !== '.' && n !== '..');
}

export function e2fsckClean(image: string): { ok: boolean; out: string } {
  const r = sh('e2fsck', ['-fn', image]);
  return { ok: r.status === 0, out: r.stdout + r.stderr };
}
