/**
 * Growing a qcow2 image's virtual size, as `qemu-img resize` (and `qemu-img commit` into a
 * smaller base) does: the new guest range is unallocated, so it reads as the backing file
 * shows it, or as zeros where there is none.
 *
 * Only the case that needs no cluster allocation is done here: the L1 table's clusters
 * already have room for the entries the new size needs (one 64 KiB L1 cluster maps 4 TiB
 * with 64 KiB clusters, so this is nearly always so). Anything else is refused by
 * growRefusal() — which callers run before they change anything — with what to do instead.
 *
 * Ordering, so that a crash at any point leaves a valid image of the old or the new size:
 *   1. the L1 entries that become part of the table are zeroed (bytes of the L1 table's own
 *      last cluster, which no reader looks at while l1_size excludes them), fdatasync;
 *   2. size and l1_size are written in ONE 16-byte write (bytes 24..39 of the header, the
 *      crypt_method between them rewritten with its own value), fdatasync.
 */
import { BlockFile } from '../../engine/file';
import { DisksnapError } from '../../engine/errors';
import { readHeaderCluster } from './header';
import { AUTOCLEAR_BITMAPS, EXT_BITMAPS, INCOMPAT_DIRTY, l1EntriesFor, MAX_VIRTUAL_SIZE, parseHeader, Qcow2Header } from './format';

/** Byte offset of the header's size field (u64); crypt_method (u32) and l1_size (u32) follow. */
const OFF_SIZE = 24;

/** Why `h` cannot be grown to `size` in place, or undefined when it can (or needs no growth). */
export function growRefusal(h: Qcow2Header, size: number): string | undefined {
  if (size <= h.size) return undefined;
  if (!Number.isSafeInteger(size) || size > MAX_VIRTUAL_SIZE) return `the size ${size} is over the qcow2 limit of 2^55 bytes`;
  if (h.nbSnapshots > 0) return `it has internal snapshots (${h.nbSnapshots}), which keep their own size`;
  if (h.incompatible & INCOMPAT_DIRTY) return 'its dirty bit is set (repair it with qemu-img check -r all first)';
  if (h.autoclear & AUTOCLEAR_BITMAPS && h.extensions.some((e) => e.type === EXT_BITMAPS)) return 'it has persistent dirty bitmaps, which would have to grow with it';
  const entries = l1EntriesFor(size, h.clusterBits);
  if (entries <= h.l1Size) return undefined;
  const room = h.l1Size === 0 ? 0 : (Math.ceil((h.l1Size * 8) / h.clusterSize) * h.clusterSize) / 8;
  if (entries > room) {
    return `its L1 table (${h.l1Size} entries in ${room / (h.clusterSize / 8)} cluster(s)) would need ${entries} entries and a new place; grow it with \`qemu-img resize\` first`;
  }
  return undefined;
}

/**
 * Grows the image at `path` to `size` bytes (a no-op when it is that large already). Takes
 * the image's exclusive lock; refuses with EUNSUPPORTED what growRefusal() refuses.
 */
export function growQcow2(path: string, size: number): void {
  const f = BlockFile.open(path, { write: true, lock: 'exclusive' });
  try {
    const fileSize = f.size();
    const h = parseHeader(path, readHeaderCluster(f, fileSize), fileSize);
    if (size <= h.size) return;
    const refusal = growRefusal(h, size);
    if (refusal) throw new DisksnapError(`${path}: cannot grow the image to ${size} bytes: ${refusal}`, 'EUNSUPPORTED', undefined, path);
    const entries = Math.max(h.l1Size, l1EntriesFor(size, h.clusterBits));
    if (entries > h.l1Size) {
      f.writeSync(Buffer.alloc((entries - h.l1Size) * 8), h.l1TableOffset + h.l1Size * 8);
      f.syncSync(true);
    }
    const fields = Buffer.alloc(16);
    f.readFullSync(fields, OFF_SIZE);
    fields.writeBigUInt64BE(BigInt(size), 0);
    fields.writeUInt32BE(entries, 12);
    f.writeSync(fields, OFF_SIZE);
    f.syncSync(true);
  } finally {
    f.close();
  }
}
