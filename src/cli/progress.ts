/**
 * Progress of long commands on stderr, in the form the reader can use:
 *
 *   terminal      a cli-progress bar with the amount, the rate and the time left
 *   not terminal  a plain line every few seconds (and one at the end), so a CI log shows an
 *                 8 s snapshot moving: "snapshot: scan 42% (1.2 GiB of 4.0 GiB, 310 MB/s, 9 s left)"
 *   --json        one JSON object per line instead (as restic's --json status lines:
 *                 message_type "status", percent_done 0..1, bytes_done, total_bytes,
 *                 seconds_elapsed, seconds_remaining), stdout keeping the one result document
 *   --quiet       nothing (the global -q, --quiet, or DISKSNAP_QUIET=1)
 *
 * The interval of plain lines is 5 s (DISKSNAP_PROGRESS_INTERVAL in ms: tests use a short one).
 */
import type * as CliProgress from 'cli-progress';
import { formatSize } from '../engine/size';
import { traceDocument } from './util';
import { isTerminal, writeErr } from '../engine/stdio';

let quiet = process.env.DISKSNAP_QUIET === '1';

/** -q, --quiet: no progress at all. */
export function setQuiet(q: boolean): void {
  quiet = q;
}

export function isQuiet(): boolean {
  return quiet;
}

export interface Reporter {
  /** `done` of `total` in `phase`; `bytes`: the amounts are bytes (else items, e.g. blocks) */
  update(phase: string, done: number, total: number, bytes?: boolean): void;
  stop(): void;
}

function intervalMs(): number {
  const v = Number(process.env.DISKSNAP_PROGRESS_INTERVAL);
  return Number.isFinite(v) && v >= 0 ? v : 5000;
}

function rateOf(done: number, secs: number): number {
  return secs > 0 ? done / secs : 0;
}

function amount(v: number, bytes: boolean): string {
  return bytes ? formatSize(v) : String(v);
}

function secondsText(s: number): string {
  if (!Number.isFinite(s)) return '?';
  if (s < 60) return `${Math.ceil(s)} s`;
  return `${Math.floor(s / 60)} min ${Math.ceil(s % 60)} s`;
}

/** The reporter for a command: `json` when the command prints JSON (--json). */
export function reporter(label: string, opts: { json?: boolean } = {}): Reporter {
  if (quiet) return { update: () => undefined, stop: () => undefined };
  if (opts.json) return jsonReporter(label);
  return isTerminal(2) ? barReporter(label) : lineReporter(label);
}

/**
 * Plain and JSON lines: the first after one interval (a command shorter than that prints
 * nothing, as before), then one per interval, and the final state at the end when any was
 * printed. `format` makes a line of the state, given the seconds since the start.
 */
function throttled(format: (phase: string, done: number, total: number, bytes: boolean, secs: number) => string): Reporter {
  const t0 = Date.now();
  let last = t0;
  let printed = false;
  let pending: (() => string) | undefined;
  return {
    update(phase, done, total, bytes = true) {
      const now = Date.now();
      pending = () => format(phase, done, total, bytes, (now - t0) / 1000);
      if (now - last < intervalMs()) return;
      last = now;
      printed = true;
      writeErr(pending());
      pending = undefined;
    },
    stop() {
      // the last state, unless it was just printed: a log ends with where the command got to
      if (pending && printed) writeErr(pending());
      pending = undefined;
    },
  };
}

function lineReporter(label: string): Reporter {
  return throttled((phase, done, total, bytes, secs) => {
    const rate = rateOf(done, secs);
    const pct = total > 0 ? Math.floor((done / total) * 100) : 100;
    const parts = [`${amount(done, bytes)} of ${amount(total, bytes)}`];
    if (bytes && rate > 0) parts.push(`${(rate / 1e6).toFixed(rate >= 1e8 ? 0 : 1)} MB/s`);
    if (rate > 0 && done < total) parts.push(`${secondsText((total - done) / rate)} left`);
    return `${label}: ${phase === label ? '' : `${phase} `}${pct}% (${parts.join(', ')})\n`;
  });
}

/**
 * One `--json` progress line on stderr, restic's `message_type: "status"` convention: either
 * bytes_done/total_bytes or items_done/total_items (by what the operation counts).
 */
export interface ProgressEvent {
  message_type: 'status';
  /** the operation: snapshot, restore, verify, copy, commit, flatten, compare ... */
  command: string;
  /** a step of it ('' when it has one) */
  phase: string;
  /**
   * fraction done, 0..1
   * @minimum 0
   * @maximum 1
   */
  percent_done: number;
  bytes_done?: number;
  total_bytes?: number;
  items_done?: number;
  total_items?: number;
  /** @minimum 0 */
  seconds_elapsed: number;
  /** @minimum 0 */
  seconds_remaining?: number;
}

function jsonReporter(label: string): Reporter {
  return throttled((phase, done, total, bytes, secs) => {
    const rate = rateOf(done, secs);
    const o: ProgressEvent = {
      message_type: 'status',
      command: label,
      phase,
      percent_done: total > 0 ? Math.min(1, done / total) : 1,
      seconds_elapsed: Math.round(secs * 1000) / 1000,
    };
    if (bytes) {
      o.bytes_done = done;
      o.total_bytes = total;
    } else {
      o.items_done = done;
      o.total_items = total;
    }
    if (rate > 0 && done < total) o.seconds_remaining = Math.round(((total - done) / rate) * 1000) / 1000;
    traceDocument('progress-event', 'stderr');
    return `${JSON.stringify(o)}\n`;
  });
}

function barReporter(label: string): Reporter {
  // Loaded only for a bar on a terminal: its module and readline cost a few ms of every
  // command's start, and `--json`, pipes and CI never draw one.
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const cliProgress = require('cli-progress') as typeof CliProgress;
  const bar = new cliProgress.SingleBar(
    {
      stream: process.stderr,
      format: `${label}{phase} [{bar}] {percentage}% {doneText}/{totalText} {rateText} ETA {etaText}`,
      hideCursor: true,
      clearOnComplete: true,
    },
    cliProgress.Presets.shades_classic,
  );
  const t0 = Date.now();
  let started = false;
  let phase = '';
  return {
    update(p, done, total, bytes = true) {
      const secs = (Date.now() - t0) / 1000;
      const rate = rateOf(done, secs);
      const payload = {
        phase: p === label ? '' : ` (${p})`,
        doneText: amount(done, bytes),
        totalText: amount(total, bytes),
        rateText: bytes ? `${(rate / 1e6).toFixed(1)} MB/s` : `${rate.toFixed(0)}/s`,
        // cli-progress's own ETA shows NaN until its buffer fills: the average rate so far instead
        etaText: done >= total ? '0 s' : rate > 0 ? secondsText((total - done) / rate) : '?',
      };
      if (!started) {
        bar.start(total, done, payload);
        started = true;
      } else if (p !== phase) bar.setTotal(total);
      phase = p;
      bar.update(done, payload);
    },
    stop() {
      if (started) bar.stop();
    },
  };
}
