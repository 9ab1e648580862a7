/**
 * The image `compare` starts from: the user's image (checked, then only read) or a
 * generated demo image. The user's image is refused when it is missing, not a regular
 * file, not raw, written by someone else right now (a writer's exclusive lock makes our
 * shared lock fail with ELOCKED), or attached to a loop device (a mounted filesystem may
 * change under the copy).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockFile } from '../engine/file';
import { detectFormat } from '../image';
import { DisksnapError, fromNodeError, isDisksnapError, busy } from '../engine/errors';
import { formatSize } from '../engine/size';
import { fillKeystream, prng } from './workload';
import * as loop from '../host';

export interface SourceInfo {
  path: string;
  virtualSize: number;
  allocatedBytes: number;
  generated: boolean;
}

export function checkSourceImage(file: string): SourceInfo {
  let st: fs.Stats;
  try {
    st = fs.statSync(file);
  } catch (e) {
    const err = fromNodeError(e, file);
    if (err.code === 'ENOENT') throw new DisksnapError(`image ${file} does not exist`, 'ENOENT', 2, file);
    throw err;
  }
  if (!st.isFile()) {
    throw new DisksnapError(`${file} is not a regular file; compare works on a raw image file`, 'EINVALID', undefined, file);
  }
  if (st.size === 0) throw new DisksnapError(`image ${file} is empty`, 'EINVALID', undefined, file);
  if (detectFormat(file) !== 'raw') {
    throw new DisksnapError(
      `${file} is a qcow2 image; compare works on a raw volume (make one with \`disksnap diff flatten ${file} OUT\`)`,
      'EUNSUPPORTED',
      undefined,
      file,
    );
  }
  assertNotAttached(file);
  // A writer (disksnap, QEMU) holds an exclusive lock; our shared lock then fails.
  let f: BlockFile;
  try {
    f = BlockFile.open(file, { lock: 'shared' });
  } catch (e) {
    if (isDisksnapError(e, 'ELOCKED')) {
      throw new DisksnapError(
        `image ${file} is in use: another process holds a write lock on it (a VM or disksnap writing it); stop it and retry`,
        'ELOCKED',
        undefined,
        file,
      );
    }
    throw e;
  }
  try {
    const s = f.stat();
    return { path: path.resolve(file), virtualSize: s.size, allocatedBytes: s.allocated, generated: false };
  } finally {
    f.close();
  }
}

/**
 * Refuses an image attached to a loop device: the loopback library knows disksnap's own
 * attachments and the kernel's (losetup, mount -o loop); sysfs is asked as well, in case the
 * library cannot query the kernel here (unprivileged, no /dev/loop-control).
 */
export function assertNotAttached(file: string): void {
  try {
    loop.assertNotAttached(file, 'compare it');
  } catch (e) {
    // EBUSY is the answer; anything else (EACCES on /dev/loopN for an unprivileged user)
    // only means the library cannot ask the kernel here: sysfs below still can
    if (isDisksnapError(e, 'EBUSY')) throw e;
  }
  const dev = attachedDeviceBySysfs(file);
  if (dev) {
    throw busy(`image ${file} is attached to ${dev}; detach it (disksnap detach ${dev}, or losetup -d) before comparing`, file);
  }
}

/** The loop device whose backing file is `file`, from /sys/block/loop*\/loop/backing_file. */
export function attachedDeviceBySysfs(file: string): string | undefined {
  let real: string;
  try {
    real = fs.realpathSync(file);
  } catch {
    return undefined;
  }
  let names: string[];
  try {
    names = fs.readdirSync('/sys/block').filter((n) => n.startsWith('loop'));
  } catch {
    return undefined;
  }
  for (const n of names) {
    try {
      const backing = fs.readFileSync(`/sys/block/${n}/loop/backing_file`, 'utf8').trim();
      if (backing === real) return `/dev/${n}`;
    } catch {
      // not bound
    }
  }
  return undefined;
}

/**
 * A demo disk of `size` bytes at `file`: what a used VM disk looks like to both strategies —
 * about half of it data (incompressible, in runs of 256 KiB to 4 MiB), some blocks
 * allocated but zero, the rest holes. Deterministic for a seed.
 */
export async function generateImage(file: string, size: number, seed: number, opts: { empty?: boolean } = {}): Promise<SourceInfo> {
  if (!Number.isSafeInteger(size) || size < 1024 * 1024) {
    throw new DisksnapError(`--generate size ${formatSize(size)} is too small: compare needs at least 1 MiB`, 'EINVALID');
  }
  const f = BlockFile.open(file, { create: true, exclusive: true });
  try {
    f.truncateSync(size);
    if (!opts.empty) {
      const rnd = prng(seed ^ 0x5eed);
      const region = 4 * 2 ** 20;
      const buf = Buffer.alloc(region);
      let index = 0;
      for (let pos = 0; pos < size; pos += region) {
        const len = Math.min(region, size - pos);
        const r = rnd();
        // the first region always holds data (a boot area and partition table would)
        if (pos === 0 || r < 0.5) {
          const run = Math.min(len, Math.max(256 * 1024, Math.floor((rnd() * len) / 4096) * 4096));
          const view = buf.subarray(0, run);
          fillKeystream(view, seed, 'generate', index++);
          await f.write(view, pos);
        } else if (r < 0.6) {
          const view = buf.subarray(0, Math.min(len, 1024 * 1024)).fill(0);
          await f.write(view, pos);
        }
      }
    }
    await f.sync();
    const s = f.stat();
    return { path: path.resolve(file), virtualSize: size, allocatedBytes: s.allocated, generated: true };
  } finally {
    f.close();
  }
}
