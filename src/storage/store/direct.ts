/**
 * O_DIRECT writes from Node: buffers aligned for the device, found by probing.
 *
 * Why: many files written through the page cache each need the writeback machinery and an
 * fdatasync, and one big file is flushed by a single writeback thread (measured on this
 * project's VM: 1 GiB buffered + fdatasync 3.4 s, O_DIRECT 0.77 s). Writing whole blocks with
 * O_DIRECT skips the page-cache copy and leaves fdatasync only the metadata to commit.
 *
 * How: Node has no aligned allocator; the addon tells how far a Buffer's memory is from the
 * next page boundary (`alignOffset`), and `alloc` returns the view that starts there. Views at
 * multiples of 4 KiB from there are aligned too; `isAligned` recognises them. Page alignment,
 * not merely what the kernel accepts: the kernel takes O_DIRECT from 512-byte aligned memory,
 * and this used to find that offset by trying writes — Node's big Buffers start 16 bytes past a
 * page, so every buffer ended up 512 bytes off one, and each request then cost the device
 * several times more (issue 18: a full snapshot 16-34 s instead of ~4 s on a busy machine;
 * native/object.cc has the measurements). `probe` still checks, with one 4 KiB write into a
 * scratch file (unlinked at once), that O_DIRECT works in the directory at all.
 *
 * Where O_DIRECT is refused (tmpfs, some FUSE filesystems) `probe` returns undefined and callers
 * write through the page cache. DISKSNAP_NO_DIRECT=1 forces that everywhere — a diagnostic,
 * not a mode to choose: with page-aligned buffers O_DIRECT was the faster mode both on a quiet
 * machine (1 GiB: 0.77 s against 3.4 s buffered + fdatasync) and on a busy one (the 2048-object
 * C loop of native/object.cc's note: 3.0-6.0 s against 13.8 s buffered, same minutes).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { BlockFile } from '../../engine/file';
import { native } from '../../engine/native';

export const DIRECT_ALIGN = 4096;

/** Buffers from this size on are mappings of their own (bigBuffer). */
const HUGE_FROM = 4 * 2 ** 20;

/**
 * A buffer for a pipeline's chunks (several MiB, kept for the whole command). Memory a command
 * touches for the first time costs a fault per page, and on a VM the host may have to fault it
 * in as well: the addon marks the buffer for 2 MiB pages, or 4 KiB ones where the guest hands
 * its free memory back to the host (native/object.cc, PickPages; DISKSNAP_BUFFER_PAGES=huge|small
 * forces one). `zeroed` as Buffer.alloc. Not faulted in ahead on the thread pool while a
 * snapshot's first ~40 ms leave a core idle: tried in session 39, the pipeline got as much
 * faster as the setup before it got slower, since on these VMs a first touch is mostly the
 * host's work (README, the qcow2 volumes' session 39 paragraph).
 *
 * `bulk`: the buffer will carry many times its own size of O_DIRECT requests (a full
 * snapshot's chunks, a restore's): 2 MiB pages even where the host takes free memory back,
 * since a request from 4 KiB pages is one segment per page for the host's block device to
 * serve (native/object.cc allocBig has the measurements).
 */
export function bigBuffer(size: number, zeroed = false, bulk = false): Buffer {
  if (size < HUGE_FROM) return zeroed ? Buffer.alloc(size) : Buffer.allocUnsafeSlow(size);
  // A mapping of its own that starts on a 2 MiB boundary (native/object.cc allocBig): only
  // whole aligned 2 MiB ranges can be huge pages, and a 4 MiB buffer at a mere page boundary
  // (where large allocations land) has one such range, its other half faulted in 4 KiB at a
  // time. Fresh mappings are zero, so `zeroed` costs nothing; and V8 counts each buffer's own
  // size as external memory, not 2 MiB of alignment slack besides.
  return native().allocBig(size, bulk);
}

/** Aligned offset of each buffer we allocated, by its ArrayBuffer. */
const bases = new WeakMap<ArrayBufferLike, number>();

export class DirectIo {

  private constructor() {}

  /**
   * A DirectIo for a store's objects, undefined only under DISKSNAP_NO_DIRECT=1. No probe: the
   * addon's putObject and readObject go direct only from aligned buffers and fall back to the
   * page cache by themselves where the filesystem refuses O_DIRECT (EINVAL at the open or at
   * the first write; native/object.cc). The probe below was a synchronous 4 KiB device write
   * on the main thread before a snapshot could start its scan: ~3 ms, 28 ms in one qcow2
   * incremental while the disk was busy with the run before.
   */
  static forObjects(): DirectIo | undefined {
    return process.env.DISKSNAP_NO_DIRECT === '1' ? undefined : new DirectIo();
  }

  /** A DirectIo for files in `dir`, or undefined when O_DIRECT does not work there. */
  static probe(dir: string): DirectIo | undefined {
    if (process.env.DISKSNAP_NO_DIRECT === '1') return undefined;
    return DirectIo.works(dir) ? new DirectIo() : undefined;
  }

  /** Whether a 4 KiB O_DIRECT write from page-aligned memory works in the directory. */
  private static works(dir: string): boolean {
    const p = path.join(dir, `.tmp-${process.pid}-probe-${randomBytes(4).toString('hex')}`);
    let scratch: BlockFile;
    try {
      scratch = BlockFile.open(p, { create: true, exclusive: true, direct: true, lock: 'none' });
    } catch {
      return false;
    } finally {
      fs.rmSync(p, { force: true });
    }
    try {
      const raw = Buffer.alloc(2 * DIRECT_ALIGN);
      const at = native().alignOffset(raw, DIRECT_ALIGN);
      scratch.writeSync(raw.subarray(at, at + DIRECT_ALIGN), 0);
      return true;
    } catch {
      return false; // EINVAL (O_DIRECT refused after all) or anything else: the page cache it is
    } finally {
      scratch.close();
    }
  }

  /** A zeroed buffer of `size` bytes whose memory starts on a page (4 KiB) boundary (`bulk`: see bigBuffer). */
  alloc(size: number, bulk = false): Buffer {
    // (a big buffer starts on a 2 MiB boundary already)
    const raw = size >= HUGE_FROM ? bigBuffer(size, true, bulk) : bigBuffer(size + DIRECT_ALIGN, true);
    const shift = native().alignOffset(raw, DIRECT_ALIGN);
    bases.set(raw.buffer, raw.byteOffset + shift);
    return raw.subarray(shift, shift + size);
  }

  /** Whether `data` can be written with O_DIRECT: from an aligned buffer, whole 4 KiB units. */
  isAligned(data: Uint8Array): boolean {
    const base = bases.get(data.buffer);
    return base !== undefined && data.length % DIRECT_ALIGN === 0 && (data.byteOffset - base) % DIRECT_ALIGN === 0;
  }
}
