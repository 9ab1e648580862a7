/**
 * The differencing-disk strategy behind the common interface (src/strategy.ts): a chain of
 * children over the volume, each snapshot one more child on top.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DisksnapError } from '../engine/errors';
import { DiskImage, openImage } from '../image';
import { extraBytesIn, Strategy, StrategySession } from '../strategy';
import * as diff from './index';

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
    return extraBytesIn(this.dir, this.volumePath);
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
