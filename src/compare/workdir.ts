/**
 * The temporary working directory of one `compare` run, and the guarantee that it goes away:
 * on success, on failure, and on SIGINT/SIGTERM/SIGHUP. Cleanup steps (unmount, detach,
 * then remove the tree) run last-registered first, synchronously, so they also run from a
 * signal handler. Nothing of the user's is ever inside it: compare only reads the image.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { DisksnapError, fromNodeError } from '../engine/errors';
import { formatSize } from '../engine/size';

type Step = { label: string; run: () => void };

const SIGNALS: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];

export class WorkDir {
  readonly path: string;
  private steps: Step[] = [];
  private done = false;
  private readonly onSignal: (sig: NodeJS.Signals) => void;
  private readonly onExit: () => void;

  private constructor(dir: string) {
    this.path = dir;
    this.onSignal = (sig) => {
      process.stderr.write(`\ndisksnap: compare interrupted (${sig}); removing ${this.path}\n`);
      this.cleanup();
      // exit now, with the shell's status for the signal (130 for SIGINT): re-raising it
      // would let the interrupted work run on until the signal lands, and fail on its own
      process.exit(128 + (os.constants.signals[sig] ?? 0));
    };
    this.onExit = () => this.cleanup();
    for (const s of SIGNALS) process.once(s, this.onSignal);
    process.once('exit', this.onExit);
  }

  /** Makes `<parent>/disksnap-compare-XXXXXX`; the parent must exist and be a directory. */
  static create(parent: string): WorkDir {
    let st: fs.Stats;
    try {
      st = fs.statSync(parent);
    } catch (e) {
      throw fromNodeError(e, parent);
    }
    if (!st.isDirectory()) throw new DisksnapError(`${parent} is not a directory`, 'ENOTDIR', 20, parent);
    let dir: string;
    try {
      dir = fs.mkdtempSync(path.join(parent, 'disksnap-compare-'));
    } catch (e) {
      throw fromNodeError(e, parent);
    }
    return new WorkDir(dir);
  }

  /** A path inside the working directory. */
  file(...parts: string[]): string {
    return path.join(this.path, ...parts);
  }

  mkdir(...parts: string[]): string {
    const p = this.file(...parts);
    fs.mkdirSync(p, { recursive: true });
    return p;
  }

  /** Registers a cleanup step (e.g. unmount); returns a function that runs it now and forgets it. */
  defer(label: string, run: () => void): () => void {
    const step = { label, run };
    this.steps.push(step);
    return () => {
      const i = this.steps.indexOf(step);
      if (i >= 0) {
        this.steps.splice(i, 1);
        run();
      }
    };
  }

  /** Drops a registered step without running it (the work was undone another way). */
  forget(label: string): void {
    const i = this.steps.findIndex((s) => s.label === label);
    if (i >= 0) this.steps.splice(i, 1);
  }

  /** Runs every cleanup step (last first) and removes the directory. Safe to call twice. */
  cleanup(): void {
    if (this.done) return;
    this.done = true;
    for (const s of SIGNALS) process.removeListener(s, this.onSignal);
    process.removeListener('exit', this.onExit);
    const failures: string[] = [];
    while (this.steps.length) {
      const s = this.steps.pop()!;
      try {
        s.run();
      } catch (e) {
        failures.push(`${s.label}: ${(e as Error).message}`);
      }
    }
    try {
      makeWritable(this.path);
      fs.rmSync(this.path, { recursive: true, force: true, maxRetries: 3 });
    } catch (e) {
      failures.push(`remove ${this.path}: ${(e as Error).message}`);
    }
    if (failures.length) process.stderr.write(`disksnap: compare cleanup: ${failures.join('; ')}\n`);
  }
}

/** Differencing parents are made read-only; unprivileged users need write bits to remove their directory entries' files. */
function makeWritable(dir: string): void {
  const walk = (p: string): void => {
    let st: fs.Stats;
    try {
      st = fs.lstatSync(p);
    } catch {
      return;
    }
    if (st.isDirectory()) {
      if ((st.mode & 0o700) !== 0o700) fs.chmodSync(p, st.mode | 0o700);
      for (const n of fs.readdirSync(p)) walk(path.join(p, n));
    }
  };
  walk(dir);
}

/** Throws ENOSPC when `dir`'s filesystem has less than `needed` bytes available. */
export function checkRoom(dir: string, needed: number, what: string): { available: number } {
  let available: number;
  try {
    const s = fs.statfsSync(dir);
    available = s.bavail * s.bsize;
  } catch (e) {
    throw fromNodeError(e, dir);
  }
  if (available < needed) {
    throw new DisksnapError(
      `not enough room in ${dir}: ${what} needs about ${formatSize(needed)}, the filesystem has ${formatSize(available)} available ` +
        '(choose another place with --dir, or a smaller image/workload)',
      'ENOSPC',
      28,
      dir,
    );
  }
  return { available };
}
