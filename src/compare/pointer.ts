/**
 * The third kind of snapshot `compare` measures: a pointer snapshot, a reflink clone of the
 * image (FICLONE) on a filesystem that shares extents (xfs, btrfs). Taking one copies no data,
 * only the file's extent map; the volume and the clone then share every extent until one of
 * them is written, when the filesystem copies on write. Neither room implements it: it is a
 * filesystem feature, measured here beside the two strategies disksnap builds.
 *
 *   snapshot   FICLONE volume -> snap-N.img (then fsync: the clone's metadata is durable)
 *   write      into the volume itself (the filesystem copies shared extents on write)
 *   rollback   FICLONE snap-N.img -> a temporary file, renamed over the volume
 *   restore    FICLONE snap-N.img -> the new file (independent, sharing extents)
 *   loss       the volume file is moved away; the clone is a file of its own and comes back
 *              (the same filesystem, though: losing the disk loses both)
 *
 * Space: the union of the physical extents of the volume and every clone (FIEMAP), minus the
 * volume's own (FIEMAP too); st_blocks would count each shared extent once per clone, and on
 * xfs also counts copy-on-write reservations.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DisksnapError } from '../engine/errors';
import { BlockFile } from '../engine/file';
import { physicalBytes } from '../engine/space';
import { cloneFile } from '../host';
import { DiskImage, openImage } from '../image';
import type { Strategy, StrategySession } from '../strategy';

/** FICLONE of `src` to a new `dest`, made durable; EOPNOTSUPP where extents cannot be shared. */
function cloneDurably(src: string, dest: string): void {
  if (!cloneFile(src, dest)) {
    throw new DisksnapError(`cannot clone ${src}: its filesystem does not share extents (pointer snapshots need xfs or btrfs)`, 'EOPNOTSUPP', 95, src);
  }
  const f = BlockFile.open(dest, { write: true, lock: 'none' });
  try {
    f.syncSync(false);
  } finally {
    f.close();
  }
}

class PointerSession implements StrategySession {
  private readonly snaps: string[] = [];

  constructor(
    private readonly dir: string,
    readonly volumePath: string,
  ) {}

  private get last(): string {
    const s = this.snaps[this.snaps.length - 1];
    if (!s) throw new DisksnapError('internal: no snapshot taken yet', 'EINVALID');
    return s;
  }

  async snapshot(): Promise<void> {
    const snap = path.join(this.dir, `snap-${this.snaps.length + 1}.img`);
    cloneDurably(this.volumePath, snap);
    this.snaps.push(snap);
  }

  open(write: boolean): DiskImage {
    return openImage(this.volumePath, { write });
  }

  extraBytes(): number {
    // both sides from FIEMAP: st_blocks of an xfs file also counts its copy-on-write
    // reservations (speculative preallocation), which would hide the clones' own extents
    if (!fs.existsSync(this.volumePath)) return physicalBytes(this.snaps);
    return Math.max(0, physicalBytes([this.volumePath, ...this.snaps]) - physicalBytes([this.volumePath]));
  }

  async rollback(): Promise<void> {
    const tmp = `${this.volumePath}.rollback`;
    fs.rmSync(tmp, { force: true });
    try {
      cloneDurably(this.last, tmp);
      fs.renameSync(tmp, this.volumePath);
    } catch (e) {
      fs.rmSync(tmp, { force: true });
      throw e;
    }
  }

  async restore(out: string): Promise<void> {
    cloneDurably(this.last, out);
  }

  async recoverAfterLoss(out: string): Promise<void> {
    cloneDurably(this.last, out);
  }

  async close(): Promise<void> {}
}

export const pointerSnapshot: Strategy = {
  name: 'pointer-snapshot',
  title: 'Pointer snapshot (reflink clone of the image)',
  how: {
    snapshot: 'FICLONE of the image into a new file: only the extent map is copied',
    write: 'into the image itself: the filesystem copies a shared extent when it is first written',
    rollback: 'FICLONE of the snapshot over the image (a temporary clone renamed into place)',
    restore: 'FICLONE of the snapshot into a new file, sharing its extents',
    loss: 'the image file is moved away and the clone is cloned again (same filesystem: a lost disk takes both)',
    growth: 'N clones of the image, a batch of writes after each',
  },
  loss: { lost: 'the image file', tried: 'clone the pointer snapshot (a file beside it) into a new file' },
  ensureAvailable() {},
  async open(dir: string, volume: string) {
    return new PointerSession(dir, volume);
  },
};
