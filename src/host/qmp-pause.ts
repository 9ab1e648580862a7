/**
 * A VM paused over QMP for a few milliseconds, with a net: `stop`, the caller's QMP commands,
 * `cont`. QMP's stop drains every device's requests, so nothing the guest does reaches its
 * disks in between (a live checkpoint moves the node the VM writes, differencing/live.ts).
 *
 * The net: a resume guard process (qmp-cont-guard.ts) is started before the pause, told
 * "armed" before the `stop` and "safe" after the `cont`; if this process dies while the VM is
 * paused (SIGKILL included), the guard connects to the same socket and resumes it. On SIGINT/SIGTERM/SIGHUP this process
 * drops its QMP connection first (exit-cleanup.ts), so that QEMU serves the guard at once. A VM
 * that was not running is left as it was: nothing is paused, and nothing is resumed.
 *
 * The guard is started when the pauser is made (prepare()), so that its start (a Node process,
 * tens of milliseconds) overlaps the caller's other work instead of delaying the pause.
 */
import type { ChildProcess } from 'node:child_process';
import { DisksnapError } from '../engine/errors';
import { untilExit } from './exit-cleanup';
import { endGuard, startGuard } from './guard-process';
import type { QmpClient } from './qmp';

export class VmPauser {
  private guard?: Promise<ChildProcess | undefined>;

  constructor(private readonly qmp: QmpClient) {}

  /** Starts the resume guard now (once), so that a later run() need not wait for it. */
  prepare(): this {
    this.guard ??= startGuard('qmp-cont-guard.js', this.qmp.socketPath);
    return this;
  }

  /** Runs `fn` with the VM's vCPUs stopped when the VM runs; otherwise just runs it. */
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (!(await this.qmp.execute<{ running: boolean }>('query-status')).running) return fn();
    const guard = await this.prepare().guard;
    if (!guard) {
      this.guard = undefined;
      throw new DisksnapError('the resume guard (qmp-cont-guard.js) is missing or did not start: not pausing the VM without it', 'EIO', undefined, this.qmp.socketPath);
    }
    const forget = untilExit(() => this.qmp.close());
    let resumed = false;
    const resume = async () => {
      await this.qmp.execute('cont');
      resumed = true;
      await say(guard, 'safe').catch(() => undefined); // the VM runs; a guard gone since has nothing to do
    };
    try {
      await say(guard, 'armed'); // before the stop: the guard resumes only a pause in force
      await this.qmp.execute('stop');
      let value: T;
      try {
        value = await fn();
      } catch (e) {
        await resume().catch(() => undefined); // the first error is the one to report
        throw e;
      }
      await resume();
      return value;
    } finally {
      forget();
      if (!resumed) {
        // our cont did not get through: the guard sends it (a later pause starts another guard)
        this.guard = undefined;
        guard.stdin?.destroy();
      }
    }
  }

  /** Tells the guard it has nothing to do; resolves once it was told (before this process may exit). */
  async close(): Promise<void> {
    const guard = this.guard && (await this.guard);
    this.guard = undefined;
    await endGuard(guard);
  }
}

/** Writes a word to the guard's stdin; resolves once it is handed to the pipe. */
function say(guard: ChildProcess, word: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const stdin = guard.stdin;
    if (!stdin || stdin.destroyed) return reject(new DisksnapError('the resume guard is gone: not pausing the VM without it', 'EIO'));
    stdin.write(`${word}\n`, (e) => (e ? reject(e) : resolve()));
  });
}
