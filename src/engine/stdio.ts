/**
 * The CLI's output, written to file descriptors 1 and 2 with write(2), not through
 * `process.stdout` / `process.stderr`. Those streams are made on first use, and for a pipe or a
 * terminal that loads node's socket and stream modules: ~3 ms of a command's start in a
 * `--cpu-prof` profile of a qcow2 incremental spawned with pipes, as the bench and most
 * callers spawn it (README, Design). Node writes to pipes, files and terminals synchronously
 * on Linux anyway, so the order and the moment of the output do not change.
 *   - A reader that went away (`disksnap map X | head -1`, EPIPE on stdout) ends the command
 *     quietly with its exit status so far, as before.
 *   - A descriptor left non-blocking by whoever made it (EAGAIN) is waited for, 1 ms at a time.
 * Streams remain for what needs one: the progress bar on a terminal (cli-progress).
 */
import * as fs from 'node:fs';

let nap: Int32Array | undefined;

/** Writes all of `data` to `fd`. */
function writeAll(fd: 1 | 2, data: string | Uint8Array): void {
  const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
  for (let off = 0; off < buf.length; ) {
    try {
      off += fs.writeSync(fd, buf, off, buf.length - off);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EAGAIN') {
        Atomics.wait((nap ??= new Int32Array(new SharedArrayBuffer(4))), 0, 0, 1);
        continue;
      }
      if (code === 'EPIPE' && fd === 1) process.exit(typeof process.exitCode === 'number' ? process.exitCode : 0);
      if (code === 'EPIPE' && fd === 2) return; // stderr's reader went away: nothing to tell it
      throw e;
    }
  }
}

/** Standard output. */
export function writeOut(data: string | Uint8Array): void {
  writeAll(1, data);
}

/** Standard error. */
export function writeErr(text: string): void {
  writeAll(2, text);
}

/**
 * Whether `fd` is a terminal (as `process.stderr.isTTY`, without making the stream). A pipe or
 * a file is ruled out by its stat, without loading node:tty (which loads net).
 */
export function isTerminal(fd: 1 | 2): boolean {
  try {
    if (!fs.fstatSync(fd).isCharacterDevice()) return false;
  } catch {
    return false;
  }
  return (require('node:tty') as typeof import('node:tty')).isatty(fd);
}

/** Standard output as a minimal writable, for code that takes a stream. */
export const stdoutWriter = { write: (text: string): boolean => (writeOut(text), true) };
