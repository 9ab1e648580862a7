/**
 * The two strategies as `compare` drives them: thin sessions over the libraries that
 * implement them (src/differencing/diff.ts and src/storage/snapshot.ts). compare does not implement either.
 *
 * differencing-disk                         storage-snapshot
 *   snapshot  diff createChild(top, child)    snapshot createSnapshot(volume, store)
 *   write     into the top child (CoW)        into the raw volume itself
 *   rollback  diff rollback(top child)        restoreSnapshot(last, inPlace: volume)
 *   restore   createChild + flatten of a      restoreSnapshot(last, to: new file)
 *             fresh child of the snapshot
 *             layer, into a standalone raw
 *   loss      the parent is renamed away;     the volume is renamed away;
 *             flatten(top child) is tried     restoreSnapshot(last, to: new file)
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as diff from '../differencing/diff';
import * as snapshot from '../storage/snapshot';
import { DiskImage, openImage } from '../image/image';
import { DisksnapError } from '../engine/errors';
import { allocatedBytes, treeAllocatedBytes } from './files';
import { Strategy, StrategyName, StrategySession } from './types';

/** Extra space of a session: everything in its directory except the volume copy itself. */
function extraIn(dir: string, volume: string): number {
  let vol = 0;
  try {
    vol = allocatedBytes(volume);
  } catch {
    // the volume may be renamed away (survival test)
  }
  return Math.max(0, treeAllocatedBytes(dir) - vol);
}

class DifferencingSession implements StrategySession {
  /** children, bottom first; the top is the current state */
  private chain: string[] = [];
  private made = 0;

  constructor(
    private readonly dir: string,
    readonly volumePath: string,
  ) {}

  private get top(): string {
    return this.chain.length ? this.chain[this.chain.length - 1] : this.volumePath;
  }

  async snapshot(): Promise<void> {
    const child = path.join(this.dir, `child-${++this.made}.qcow2`);
    await diff.createChild(this.top, child);
    this.chain.push(child);
  }

  open(write: boolean): DiskImage {
    return openImage(this.top, { write });
  }

  extraBytes(): number {
    return extraIn(this.dir, this.volumePath);
  }

  async rollback(): Promise<void> {
    const child = this.chain.pop();
    if (!child) throw new DisksnapError('internal: no child to roll back', 'EINVALID');
    diff.rollback(child);
  }

  async restore(out: string): Promise<void> {
    // the snapshot is the layer under the top child; a standalone copy of it is the
    // flattened view of a fresh child made on it (then discarded)
    const layer = this.chain.length >= 2 ? this.chain[this.chain.length - 2] : this.volumePath;
    const probe = path.join(this.dir, `restore-${++this.made}.qcow2`);
    await diff.createChild(layer, probe);
    try {
      await diff.flatten(probe, out);
    } finally {
      diff.rollback(probe);
    }
  }

  async recoverAfterLoss(out: string): Promise<void> {
    // all that is left is the child: ask the library for what it shows
    await diff.flatten(this.top, out);
  }

  async close(): Promise<void> {
    // discard the chain top down so the parent's registry and mode are as before
    while (this.chain.length) {
      const c = this.chain.pop()!;
      if (fs.existsSync(c)) diff.rollback(c, { recursive: true });
    }
  }
}

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
    return extraIn(this.dir, this.volumePath);
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

export const differencingDisk: Strategy = {
  name: 'differencing-disk',
  title: 'Differencing disk (qcow2 child)',
  how: {
    snapshot: 'diff create: a qcow2 child over the volume, which becomes its read-only parent',
    write: 'into the child: copy-on-write of whole clusters (64 KiB)',
    rollback: 'diff rollback: the child is deleted; the parent is the snapshot',
    restore: 'a fresh child of the snapshot layer flattened into a standalone raw image',
    loss: 'the parent is moved away and the child is flattened',
    growth: 'a chain of N children, a batch of writes into each',
  },
  loss: { lost: 'the parent (the volume the child was made on)', tried: 'flatten the child into a standalone image' },
  ensureAvailable() {},
  async open(dir: string, volume: string) {
    return new DifferencingSession(dir, volume);
  },
};

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

export function strategyFor(name: StrategyName): Strategy {
  if (name === 'differencing-disk') return differencingDisk;
  if (name === 'storage-snapshot') return storageSnapshot;
  throw new DisksnapError(`unknown strategy '${name}' (expected differencing-disk or storage-snapshot)`, 'EINVALID');
}
