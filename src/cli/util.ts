/**
 * What every command shares: error handling and exit codes, size options, JSON output,
 * progress on stderr. A command is a few lines over a library call (STYLE.md).
 *
 * Exit codes: 0 success, 1 failure (one line on stderr), 2 bad usage (commander's own, and
 * EINVALID raised while parsing arguments), or a command's documented code (diff check).
 */
import * as fs from 'node:fs';
import { Option } from 'commander';
import { DisksnapError } from '../engine/errors';
import { formatSize, parseSize } from '../engine/size';
import { formatQemuJson, type QemuJson } from '../image/qemu';
import type { DocumentName, Documents } from './documents';
import { writeErr, writeOut } from '../engine/stdio';

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
 * `--output FORMAT`: `human` (the default) or `json`, the document the peer tool prints for the
 * same operation, key for key (README: "JSON for scripts"):
 * - info, map, diff check, measure: `qemu-img ... --output=json` (peer 'qemu');
 * - snapshot create/list/show/copy/lock/unlock/undelete, volume list: the AWS CLI's document of
 *   the EC2 call (`aws ec2 describe-snapshots`, ...; peer 'ec2', ./ec2.ts).
 * `--output=json` works as well. disksnap's own, fuller document is `--json`.
 */
export type OutputFormat = 'human' | 'json';
export type Peer = 'qemu' | 'ec2';

const PEER_DOC: Record<Peer, string> = {
  qemu: "the JSON document qemu-img prints with --output=json",
  ec2: "the JSON document the AWS CLI prints for the EC2 call (describe-snapshots, ...)",
};

export function outputOption(peer: Peer = 'qemu'): Option {
  return new Option('--output <format>', `human (default) or json: ${PEER_DOC[peer]}`).argParser((value: string): OutputFormat => {
    if (value === 'human' || value === 'json') return value;
    throw new UsageError(`--output '${value}' is not supported: the formats are human (the default) and json (${PEER_DOC[peer]})`);
  });
}

/**
 * Which output a command with both `--json` (disksnap's own document) and `--output` prints:
 * 'disksnap', 'peer' (qemu-img's or EC2's) or 'human'. Both at once is bad usage: they are
 * different documents.
 */
export function outputStyle(opts: { json?: boolean; output?: OutputFormat }): 'disksnap' | 'peer' | 'human' {
  if (opts.json && opts.output !== undefined) {
    throw new UsageError("--json (disksnap's document) and --output (the peer tool's) cannot be combined; pick one");
  }
  if (opts.json) return 'disksnap';
  return opts.output === 'json' ? 'peer' : 'human';
}

/**
 * The format of an image a command writes (`snapshot restore --to`, `diff flatten`): --format
 * when given, else qcow2 for a FILE named *.qcow2 (any case), else raw. A raw image under a
 * .qcow2 name misleads people and tools that go by the name (QEMU takes it only by probing it
 * as raw, with a warning, and then keeps its first sector from the guest).
 */
export function outputFormat(format: string | undefined, file: string): 'raw' | 'qcow2' {
  if (format === undefined) return /\.qcow2$/i.test(file) ? 'qcow2' : 'raw';
  if (format !== 'raw' && format !== 'qcow2') throw new UsageError(`--format must be raw or qcow2, not '${format}'`);
  return format;
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
  writeOut(lines.map((l) => printable(l)).join('\n') + '\n');
}

/**
 * Prints one JSON document on stdout: `name` says which (documents.ts), and the compiler checks
 * that `value` is of its type. C1 controls are escaped too (a terminal may act on them).
 */
export function printJson<K extends DocumentName>(name: K, value: Documents[K]): void {
  traceDocument(name, 'stdout');
  // eslint-disable-next-line no-control-regex
  writeOut(JSON.stringify(value, null, 2).replace(/[\x7f-\x9f]/g, (c) => `\\u00${c.charCodeAt(0).toString(16)}`) + '\n');
}

/** qemu-img's documents (`--output json`), as qemu-img prints them: four-space indentation. */
export function printQemuJson<K extends 'qemu-info' | 'qemu-info-chain' | 'qemu-check' | 'qemu-measure'>(name: K, value: QemuJson | QemuJson[]): void {
  traceDocument(name, 'stdout');
  writeOut(formatQemuJson(value));
}

/**
 * For the tests' schema check: with DISKSNAP_DOCUMENT_TRACE=FILE, each document printed adds
 * a line `NAME<TAB>WHERE` (stdout, stderr, or the file a report went to) to FILE, so the test
 * knows which schema (schemas/NAME.schema.json) the output must match. Off otherwise.
 */
export function traceDocument(name: DocumentName, where: string): void {
  const trace = process.env.DISKSNAP_DOCUMENT_TRACE;
  if (trace) fs.appendFileSync(trace, `${name}\t${where}\n`);
}

export function log(message: string): void {
  writeErr(printable(message) + '\n');
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
    writeErr(`disksnap: ${printable(e.message)}\n`);
    process.exit(2);
  }
  if (e instanceof DisksnapError) {
    writeErr(`disksnap: ${printable(e.message)}${e.code && !e.message.includes(e.code) ? ` (${e.code})` : ''}\n`);
    if (process.env.DISKSNAP_DEBUG) writeErr(`${e.stack}\n`);
    process.exit(1);
  }
  const err = e as NodeJS.ErrnoException;
  if (err && typeof err.code === 'string' && typeof err.syscall === 'string') {
    // node:fs errors already name the call and the path: "ENOENT: no such file or directory, open 'x'"
    writeErr(`disksnap: ${printable(err.message)}\n`);
    process.exit(1);
  }
  writeErr(`disksnap: internal error: ${err?.stack ?? String(e)}\n`);
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
