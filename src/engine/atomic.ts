/**
 * Outputs appear under their final name only when complete: they are written to a
 * temporary name in the same directory, then renamed. A failure removes the temporary
 * file, so no half-written output is ever left under the final name.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { DisksnapError, busy } from './errors';

export function tempNameFor(finalPath: string): string {
  const dir = path.dirname(finalPath);
  return path.join(dir, `.${path.basename(finalPath)}.disksnap-tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
}

/** Throws EEXIST unless force; with force, refuses a file made read-only (a differencing parent). */
export function checkOutput(finalPath: string, force: boolean): void {
  let st: fs.Stats;
  try {
    st = fs.statSync(finalPath);
  } catch {
    return;
  }
  if (!force) {
    throw new DisksnapError(`${finalPath} already exists (use --force to overwrite it)`, 'EEXIST', 17, finalPath);
  }
  if (!st.isFile()) throw new DisksnapError(`${finalPath} exists and is not a regular file`, 'EEXIST', 17, finalPath);
  if ((st.mode & 0o222) === 0) {
    throw busy(`${finalPath} is read-only (a differencing parent keeps this mode while it has children); not overwriting it`, finalPath);
  }
}

/**
 * Runs `write(tmpPath)`, then renames the result to finalPath. The temporary file is
 * removed on any failure. With `sync`, the file and its directory are fsynced.
 */
export async function writeAtomically<T>(
  finalPath: string,
  opts: { force?: boolean; sync?: boolean },
  write: (tmpPath: string) => T | Promise<T>,
): Promise<T> {
  checkOutput(finalPath, !!opts.force);
  const tmp = tempNameFor(finalPath);
  try {
    const result = await write(tmp);
    if (opts.sync) {
      const fd = fs.openSync(tmp, 'r');
      try {
        fs.fsyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
    }
    checkOutput(finalPath, !!opts.force);
    fs.renameSync(tmp, finalPath);
    if (opts.sync) syncDir(path.dirname(finalPath));
    return result;
  } catch (e) {
    fs.rmSync(tmp, { force: true });
    throw e;
  }
}

export function syncDir(dir: string): void {
  const fd = fs.openSync(dir, 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}
