/**
 * Locks of a directory store, all OFD locks through BlockFile (so they vanish with the
 * process that holds them, SIGKILL included — no stale lock files to clean up):
 *
 *   STORE/lock                 shared:    snapshot create, delete, restore, verify
 *                              exclusive: store gc (so gc never runs beside a writer or reader)
 *   STORE/leases/<snap-id>     exclusive, held by the process writing that pending snapshot
 *
 * The lease tells other processes whether a `pending` snapshot is still being written. Order
 * of the writer: create + lock the lease, write the pending record, ..., write the final
 * record (completed | error), unlock and remove the lease. A checker that can lock the lease
 * (or finds it gone) re-reads the record; if it is still pending, its writer died, and the
 * checker marks it `error` (src/storage/store/store.ts `reapStale`).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockFile, LockMode } from '../../engine/file';
import { DisksnapError, isDisksnapError } from '../../engine/errors';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export interface LockOptions {
  /** how long to wait for a conflicting holder to go away (ms); 0 = fail at once */
  waitMs?: number;
  /** called once when the first attempt found the lock taken */
  onWait?: () => void;
}

export class StoreLock {
  private constructor(private file: BlockFile | undefined) {}

  static async acquire(storeDir: string, mode: Exclude<LockMode, 'none'>, opts: LockOptions = {}): Promise<StoreLock> {
    const p = path.join(storeDir, 'lock');
    const file = BlockFile.open(p, { create: true, lock: 'none', mode: 0o644 });
    const deadline = Date.now() + (opts.waitMs ?? 0);
    let told = false;
    for (;;) {
      try {
        file.setLock(mode);
        return new StoreLock(file);
      } catch (e) {
        if (!isDisksnapError(e, 'ELOCKED')) {
          file.close();
          throw e;
        }
        if (Date.now() >= deadline) {
          file.close();
          throw new DisksnapError(
            mode === 'exclusive'
              ? `store ${storeDir} is in use (a snapshot is being created, restored, verified or deleted); gc needs it alone — try again when that finished`
              : `store ${storeDir} is locked by a running gc; try again when it finished`,
            'ELOCKED',
            undefined,
            p,
          );
        }
        if (!told) opts.onWait?.();
        told = true;
        await sleep(50);
      }
    }
  }

  release(): void {
    this.file?.close();
    this.file = undefined;
  }
}

/** The lease of a pending snapshot (see the note above). */
export class Lease {
  private constructor(
    readonly path: string,
    private file: BlockFile | undefined,
  ) {}

  static take(storeDir: string, snapshotId: string): Lease {
    const dir = path.join(storeDir, 'leases');
    fs.mkdirSync(dir, { recursive: true });
    const p = path.join(dir, snapshotId);
    return new Lease(p, BlockFile.open(p, { create: true, lock: 'exclusive' }));
  }

  /**
   * Whether the writer of a pending snapshot is gone: the lease file is missing, or its lock
   * can be taken. Never blocks.
   */
  static writerGone(storeDir: string, snapshotId: string): boolean {
    const p = path.join(storeDir, 'leases', snapshotId);
    let f: BlockFile;
    try {
      f = BlockFile.open(p, { write: true, lock: 'exclusive' });
    } catch (e) {
      if (isDisksnapError(e, 'ELOCKED')) return false;
      if (isDisksnapError(e, 'ENOENT') || (e as NodeJS.ErrnoException).code === 'ENOENT') return true;
      throw e;
    }
    f.close();
    return true;
  }

  static remove(storeDir: string, snapshotId: string): void {
    fs.rmSync(path.join(storeDir, 'leases', snapshotId), { force: true });
  }

  release(): void {
    if (!this.file) return;
    // Unlink first, then close: a checker that opened the file before the unlink can lock it
    // only after our close, and then finds the final record.
    fs.rmSync(this.path, { force: true });
    this.file.close();
    this.file = undefined;
  }
}
