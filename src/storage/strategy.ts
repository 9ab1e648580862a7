/**
 * The storage-snapshot strategy behind the common interface (src/strategy.ts): snapshots of
 * the volume into a store in the session's directory, restored in place or to a new file.
 */
import * as path from 'node:path';
import { DisksnapError } from '../engine/errors';
import { DiskImage, openImage } from '../image';
import { extraBytesIn, Strategy, StrategySession } from '../strategy';
import * as snapshot from '.';

class StorageSession implements StrategySession {
  private snaps: string[] = [];
  private readonly store: string;

  constructor(
    private readonly dir: string,
    readonly volumePath: string,
  ) {
    this.store = path.join(dir, 'store');
  }

  private get last(): string {
    const id = this.snaps[this.snaps.length - 1];
    if (!id) throw new DisksnapError('internal: no snapshot taken yet', 'EINVALID');
    return id;
  }

  async snapshot(): Promise<void> {
    const rec = await snapshot.createSnapshot(this.volumePath, { store: this.store, name: `compare-${this.snaps.length + 1}` });
    if (rec.state !== 'completed') throw new DisksnapError(`snapshot ${rec.id} ended ${rec.state}`, 'EIO');
    this.snaps.push(rec.id);
  }

  open(write: boolean): DiskImage {
    return openImage(this.volumePath, { write });
  }

  extraBytes(): number {
    return extraBytesIn(this.dir, this.volumePath);
  }

  async rollback(): Promise<void> {
    await snapshot.restoreSnapshot(this.last, { store: this.store, inPlace: this.volumePath });
  }

  async restore(out: string): Promise<void> {
    await snapshot.restoreSnapshot(this.last, { store: this.store, to: out });
  }

  async recoverAfterLoss(out: string): Promise<void> {
    await snapshot.restoreSnapshot(this.last, { store: this.store, to: out });
  }

  async close(): Promise<void> {}
}

export const storageSnapshot: Strategy = {
  name: 'storage-snapshot',
  title: 'Storage snapshot (block copy into a store)',
  how: {
    snapshot: 'snapshot create: every data block hashed, new blocks copied into the store',
    write: 'into the raw volume itself: the snapshot is a separate copy',
    rollback: 'snapshot restore --in-place: only blocks that differ are rewritten',
    restore: 'snapshot restore --to: a new sparse raw image from the store',
    loss: 'the volume is moved away and the snapshot is restored from the store',
    growth: 'N snapshots of the volume into one store (incremental), a batch of writes after each',
  },
  loss: { lost: 'the volume', tried: 'restore the snapshot from the store into a new file' },
  ensureAvailable() {},
  async open(dir: string, volume: string) {
    return new StorageSession(dir, volume);
  },
};
