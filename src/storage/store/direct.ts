/**
 * O_DIRECT writes from Node: buffers aligned for the device, found by probing.
 *
 * Why: many files written through the page cache each need the writeback machinery and an
 * fdatasync, and one big file is flushed by a single writeback thread (measured on this
 * project's VM: 1 GiB buffered + fdatasync 3.4 s, O_DIRECT 0.77 s). Writing whole blocks with
 * O_DIRECT skips the page-cache copy and leaves fdatasync only the metadata to commit.
 *
 * How: Node has no aligned allocator and does not tell a Buffer's address. For each buffer it
 * allocates, a DirectIo opens a scratch file with O_DIRECT in the target directory (unlinked at
 * once) and tries 4 KiB O_DIRECT writes from increasing offsets into the buffer until the
 * kernel accepts one (it answers EINVAL for a misaligned address). Writes, because reads of a
 * hole skip the alignment check. Views of the buffer at multiples of 4 KiB from there are
 * aligned too; `isAligned` recognises them.
 *
 * Where O_DIRECT is refused (tmpfs, some FUSE filesystems) `probe` returns undefined and callers
 * write through the page cache. DISKSNAP_NO_DIRECT=1 forces that everywhere.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { BlockFile } from '../../engine/file';
import { isDisksnapError } from '../../engine/errors';

export const DIRECT_ALIGN = 4096;

/** Aligned offset of each buffer we allocated, by its ArrayBuffer. */
const bases = new WeakMap<ArrayBufferLike, number>();

export class DirectIo {

  private constructor(private readonly dir: string) {}

  /** A DirectIo for files in `dir`, or undefined when O_DIRECT does not work there. */
  static probe(dir: string): DirectIo | undefined {
    if (process.env.DISKSNAP_NO_DIRECT === '1') return undefined;
    const d = new DirectIo(dir);
    return d.shiftOf(Buffer.alloc(2 * DIRECT_ALIGN)) < 0 ? undefined : d;
  }

  /** The offset into `buf` from which O_DIRECT writes work, or -1. */
  private shiftOf(buf: Buffer): number {
    const p = path.join(this.dir, `.tmp-${process.pid}-probe-${randomBytes(4).toString('hex')}`);
    let scratch: BlockFile;
    try {
      scratch = BlockFile.open(p, { create: true, exclusive: true, direct: true, lock: 'none' });
    } catch {
      return -1;
    } finally {
      fs.rmSync(p, { force: true });
    }
    try {
      for (let off = 0; off + DIRECT_ALIGN <= buf.length; off += 16) {
        try {
          scratch.writeSync(buf.subarray(off, off + DIRECT_ALIGN), 0);
          return off;
        } catch (e) {
          if (!isDisksnapError(e, 'EINVAL')) return -1;
        }
      }
      return -1;
    } finally {
      scratch.close();
    }
  }

  /** A zeroed buffer of `size` bytes aligned for O_DIRECT (a plain one if probing fails). */
  alloc(size: number): Buffer {
    const raw = Buffer.alloc(size + DIRECT_ALIGN);
    const shift = this.shiftOf(raw);
    if (shift < 0) return Buffer.allocUnsafeSlow(size);
    bases.set(raw.buffer, raw.byteOffset + shift);
    return raw.subarray(shift, shift + size);
  }

  /** Whether `data` can be written with O_DIRECT: from an aligned buffer, whole 4 KiB units. */
  isAligned(data: Uint8Array): boolean {
    const base = bases.get(data.buffer);
    return base !== undefined && data.length % DIRECT_ALIGN === 0 && (data.byteOffset - base) % DIRECT_ALIGN === 0;
  }
}
