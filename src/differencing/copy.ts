/**
 * File-to-file copying for commit (child clusters into a raw parent) and flatten (every layer's
 * data into a new raw image): FICLONERANGE where the filesystem shares extents (XFS, btrfs:
 * nothing is copied), else copy_file_range on the thread pool, IN_FLIGHT pieces at a time,
 * with an fdatasync of the destination started every SYNC_EVERY bytes so that writeback
 * overlaps the copying instead of all happening at the end.
 */
import { BlockFile } from '../engine/file';
import { native } from '../engine/native';

/** A piece of file-to-file copying: `length` bytes from src@srcOffset to dst@dstOffset. */
export interface CopyJob {
  src: BlockFile;
  srcOffset: number;
  dstOffset: number;
  length: number;
}

/** Copy piece size, and the buffer size of the paths that go through an image instead. */
export const PIECE = 16 * 2 ** 20;
const IN_FLIGHT = 4;
const SYNC_EVERY = 64 * 2 ** 20;

function piecesOf(jobs: CopyJob[]): CopyJob[] {
  const pieces: CopyJob[] = [];
  for (const j of jobs) {
    for (let pos = 0; pos < j.length; pos += PIECE) {
      pieces.push({ src: j.src, srcOffset: j.srcOffset + pos, dstOffset: j.dstOffset + pos, length: Math.min(PIECE, j.length - pos) });
    }
  }
  return pieces;
}

/**
 * Copies every job into `dst` (the caller still ends with an fdatasync). A source that ends
 * early (the last cluster of a qcow2 file) reads as zeros.
 */
export async function parallelCopy(jobs: CopyJob[], dst: BlockFile, onBytes: (n: number) => void): Promise<void> {
  const n = native();
  const pieces = piecesOf(jobs);
  let canClone = true;
  let next = 0;
  let sinceSync = 0;
  const syncs: Promise<void>[] = [];
  const worker = async (): Promise<void> => {
    while (next < pieces.length) {
      const i = next++;
      const p = pieces[i];
      let cloned = false;
      if (canClone) {
        try {
          cloned = n.cloneRange(p.src.fd, p.srcOffset, dst.fd, p.dstOffset, p.length);
        } catch {
          // EOPNOTSUPP, EXDEV, EINVAL (unaligned tail): the piece is copied below instead
          cloned = false;
        }
        if (!cloned && i === 0) canClone = false; // the filesystem cannot: stop trying
      }
      if (!cloned) {
        const got = await n.copyRangeAsync(p.src.fd, p.srcOffset, dst.fd, p.dstOffset, p.length);
        if (got < p.length) await dst.write(Buffer.alloc(p.length - got), p.dstOffset + got);
      }
      onBytes(p.length);
      sinceSync += p.length;
      if (sinceSync >= SYNC_EVERY) {
        sinceSync = 0;
        syncs.push(dst.sync(true));
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(IN_FLIGHT, pieces.length) }, worker));
  await Promise.all(syncs);
}
