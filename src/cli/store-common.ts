/**
 * What the storage commands share (src/cli/snapshot.ts: `snapshot …`; src/cli/store.ts:
 * `volume …`, `store …`, `key …`): the store and key flags, progress, tables.
 */
import { Command } from 'commander';

// Snapshot objects are written and fsynced many at a time so that the filesystem commits
// them together; libuv's default of 4 pool threads serialises that (measured: 2048 objects
// of 512 KiB with fdatasync took 2.2 s with 4 threads, 0.75 s with 16). The pool starts on
// first use, after this module is loaded; a user's own setting wins.
process.env.UV_THREADPOOL_SIZE ??= '16';
import { reporter } from './progress';
import * as snap from '../storage';
import { DisksnapError } from '../engine/errors';
import type { KeySpec } from '../storage/keys';
import { log, printLines, printable, UsageError } from './util';

export const storeOption = '--store <dir>';
export const storeHelp = 'snapshot store: a directory or s3://BUCKET[/PREFIX] (default $DISKSNAP_STORE, else ~/.local/share/disksnap/store)';
export const waitHelp = 'seconds to wait for a conflicting store lock (default 60)';

export interface StoreFlag {
  store?: string;
  json?: boolean;
  wait?: number;
}

export function storeOpts(o: StoreFlag): snap.StoreOptions {
  return { store: o.store, lockWaitMs: o.wait !== undefined ? o.wait * 1000 : undefined };
}

export function secondsArg(value: string): number {
  const n = Number(value);
  if (!Number.isFinite(n) || n < 0) throw new DisksnapError(`--wait '${value}' is not a number of seconds`, 'EINVALID');
  return n;
}

export interface KeyFlags {
  keyFile?: string;
  passphraseFile?: string;
}

/** The key a command was given: --key-file, --passphrase-file, else $DISKSNAP_PASSPHRASE. */
export function keySpec(o: KeyFlags): KeySpec | undefined {
  if (o.keyFile !== undefined && o.passphraseFile !== undefined) throw new UsageError('give one of --key-file and --passphrase-file');
  if (o.keyFile !== undefined) return { keyFile: o.keyFile };
  if (o.passphraseFile !== undefined) return { passphraseFile: o.passphraseFile };
  const env = process.env.DISKSNAP_PASSPHRASE;
  if (env) return { passphrase: env, from: 'DISKSNAP_PASSPHRASE', implicit: true };
  return undefined;
}

export function keyOptions(c: Command, what: string): Command {
  return c
    .option('--key-file <file>', `key ${what}: a file of 32 random bytes`)
    .option('--passphrase-file <file>', `passphrase ${what} (its first line; default $DISKSNAP_PASSPHRASE)`);
}

/** Progress of a storage operation (./progress.ts): bytes while scanning, blocks otherwise. */
export async function withBar<T>(label: string, json: boolean | undefined, fn: (update: snap.ProgressFn) => Promise<T>): Promise<T> {
  const r = reporter(label, { json });
  try {
    return await fn((p) => r.update(p.phase === 'scan' ? label : p.phase, p.done, p.total, p.phase === 'scan'));
  } finally {
    r.stop();
  }
}

export function table(headers: string[], raw: string[][]): void {
  const rows = raw.map((r) => r.map(printable));
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]))).join('  ');
  printLines([line(headers), ...rows.map(line)]);
}

export function warnDamaged(damaged: { id: string; error: DisksnapError }[], what: string): void {
  for (const d of damaged) log(`disksnap: ${what} ${d.id} is unreadable: ${d.error.message}`);
}
