/**
 * What every command shares: error handling and exit codes, size options, JSON output,
 * progress on stderr. A command is a few lines over a library call (STYLE.md).
 *
 * Exit codes: 0 success, 1 failure (one line on stderr), 2 bad usage (commander's own, and
 * EINVALID raised while parsing arguments), or a command's documented code (diff check).
 */
import { Option } from 'commander';
import { DisksnapError } from '../engine/errors';
import { formatSize, parseSize } from '../engine/size';

/** Thrown by an action to end with a specific exit status after printing its result. */
export class ExitStatus extends Error {
  constructor(readonly status: number) {
    super(`exit ${status}`);
  }
}

/** Usage error: exit 2. */
export class UsageError extends Error {}

/**
 * commander argument parser for sizes: `.argument('<size>', '...', sizeArg('size'))`.
 * A malformed size is bad usage (exit 2), with a message naming the argument.
 */
export function sizeArg(what: string): (value: string) => number {
  return (value: string) => {
    try {
      return parseSize(value, what);
    } catch (e) {
      throw new UsageError(e instanceof Error ? e.message : String(e));
    }
  };
}

/** A size that must also be a power of two in [min, max] (cluster and block sizes): exit 2 if not. */
export function powerOfTwoArg(what: string, min: number, max: number): (value: string) => number {
  const parse = sizeArg(what);
  return (value: string) => {
    const n = parse(value);
    if (n < min || n > max || (n & (n - 1)) !== 0) {
      throw new UsageError(`${what} '${value}' must be a power of two from ${formatSize(min)} to ${formatSize(max)}`);
    }
    return n;
  };
}

/** commander parser for a whole number (count, depth): exit 2 with a clear message if not. */
export function intArg(what: string, min = 0): (value: string) => number {
  return (value: string) => {
    if (!/^\d+$/.test(value) || Number(value) < min || !Number.isSafeInteger(Number(value))) {
      throw new UsageError(`${what} '${value}' is not a whole number${min > 0 ? ` of at least ${min}` : ''}`);
    }
    return Number(value);
  };
}

/**
 * `--output FORMAT` of the commands qemu-img has too (info, map, diff check, measure):
 * `human` (the default) or `json`, which prints the document `qemu-img ... --output=json`
 * prints, key for key (README: "qemu-img compatible JSON"). `--output=json` works as well.
 */
export type OutputFormat = 'human' | 'json';

export function outputOption(): Option {
  return new Option('--output <format>', "human (default) or json: the JSON document qemu-img prints with --output=json").argParser(
    (value: string): OutputFormat => {
      if (value === 'human' || value === 'json') return value;
      throw new UsageError(`--output '${value}' is not supported: the formats are human (the default) and json (qemu-img's --output=json document)`);
    },
  );
}

/**
 * Which output a command with both `--json` (disksnap's own document) and `--output` prints:
 * 'disksnap', 'qemu' or 'human'. Both at once is bad usage: they are different documents.
 */
export function outputStyle(opts: { json?: boolean; output?: OutputFormat }): 'disksnap' | 'qemu' | 'human' {
  if (opts.json && opts.output !== undefined) {
    throw new UsageError("--json (disksnap's document) and --output (qemu-img's) cannot be combined; pick one");
  }
  if (opts.json) return 'disksnap';
  return opts.output === 'json' ? 'qemu' : 'human';
}

/** Repeatable option collector: `--tag K=V --tag K2=V2`. */
export function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

/**
 * Text from a store or an image file (names, descriptions, tags, backing file names) made safe
 * for a terminal: control characters (C0, DEL, C1; an ESC sequence in a tag could retitle or
 * rewrite the terminal) become `\xHH`. JSON output needs no such step: printJson escapes them.
 */
export function printable(text: string): string {
  // eslint-disable-next-line no-control-regex
  return text.replace(/[\x00-\x1f\x7f-\x9f]/g, (c) => `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

/** Human output: each line made printable (tabs and newlines between lines are kept). */
export function printLines(lines: string[]): void {
  process.stdout.write(lines.map((l) => printable(l)).join('\n') + '\n');
}

export function printJson(value: unknown): void {
  // eslint-disable-next-line no-control-regex
  process.stdout.write(JSON.stringify(value, null, 2).replace(/[\x7f-\x9f]/g, (c) => `\\u00${c.charCodeAt(0).toString(16)}`) + '\n');
}

export function log(message: string): void {
  process.stderr.write(printable(message) + '\n');
}

/**
 * Wraps a command action: maps thrown errors to one line on stderr and the exit code.
 * DisksnapError EINVALID raised before the action did anything is still a failure (exit 1):
 * the argument was well-formed for the parser but wrong for the image (offset past the end).
 */
export function action<A extends unknown[]>(fn: (...args: A) => unknown | Promise<unknown>): (...args: A) => Promise<void> {
  return async (...args: A) => {
    try {
      await fn(...args);
    } catch (e) {
      fail(e);
    }
  };
}

export function fail(e: unknown): never {
  if (e instanceof ExitStatus) process.exit(e.status);
  if (e instanceof UsageError) {
    process.stderr.write(`disksnap: ${printable(e.message)}\n`);
    process.exit(2);
  }
  if (e instanceof DisksnapError) {
    process.stderr.write(`disksnap: ${printable(e.message)}${e.code && !e.message.includes(e.code) ? ` (${e.code})` : ''}\n`);
    if (process.env.DISKSNAP_DEBUG) process.stderr.write(`${e.stack}\n`);
    process.exit(1);
  }
  const err = e as NodeJS.ErrnoException;
  if (err && typeof err.code === 'string' && typeof err.syscall === 'string') {
    // node:fs errors already name the call and the path: "ENOENT: no such file or directory, open 'x'"
    process.stderr.write(`disksnap: ${printable(err.message)}\n`);
    process.exit(1);
  }
  process.stderr.write(`disksnap: internal error: ${err?.stack ?? String(e)}\n`);
  process.exit(1);
}

/** `--until`: an ISO time, or a duration from now (`90m`, `12h`, `30d`, `2w`), as an ISO time. */
export function untilArg(value: string): string {
  const m = /^(\d+)(m|h|d|w)$/.exec(value);
  if (m) return new Date(Date.now() + Number(m[1]) * { m: 60e3, h: 3600e3, d: 86400e3, w: 604800e3 }[m[2] as 'm' | 'h' | 'd' | 'w']).toISOString();
  if (!/^\d{4}-\d{2}-\d{2}([T ][\d:.]+(Z|[+-]\d{2}:?\d{2})?)?$/.test(value) || Number.isNaN(Date.parse(value))) {
    throw new UsageError(`--until '${value}' is neither an ISO time (2027-01-31, 2027-01-31T12:00:00Z) nor a duration (90m, 12h, 30d, 2w)`);
  }
  return new Date(Date.parse(value)).toISOString();
}

/** A duration (`90m`, `12h`, `30d`, `2w`) in seconds. */
export function durationArg(value: string): number {
  const m = /^(\d+)(m|h|d|w)$/.exec(value);
  if (!m || Number(m[1]) === 0) throw new UsageError(`'${value}' is not a duration (90m, 12h, 30d, 2w)`);
  return Number(m[1]) * { m: 60, h: 3600, d: 86400, w: 604800 }[m[2] as 'm' | 'h' | 'd' | 'w'];
}
