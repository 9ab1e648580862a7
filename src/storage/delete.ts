/**
 * `snapshot delete`: the record first, then the manifest and change tags; the blocks go at the
 * next gc. A crash in between leaves a stray manifest (gc removes it), never a record whose
 * manifest is gone. Every other snapshot keeps its complete manifest, so stays restorable.
 * The reflink clone the snapshot kept beside its volume (./reflink.ts) goes last: without its
 * record nothing can trust it, and one left by a crash is removed by gc. In a store with a
 * recycle bin (./bin.ts) a completed or error snapshot moves there instead, unless
 * `permanently`.
 */
import { busy, DisksnapError, isDisksnapError } from '../engine/errors';
import { Store } from './store/store';
import { tagsKey } from './store/tags';
import { packsKey } from './store/packs';
import { isSnapshotId, lockedAt, type ReflinkClone } from './store/records';
import { removeClone } from './reflink';
import { StoreOptions, withStoreLock } from './common';
import { faultsOf } from './faults';
import { binRetention, moveToBin } from './bin';

export interface DeleteReport {
  id: string;
  state: string;
  /** nothing was deleted: the snapshot would have been */
  dryRun: boolean;
  /** the store has a recycle bin: the snapshot is in it until this time (`snapshot undelete`) */
  binExpires?: string;
}

/** A locked snapshot (`snapshot lock --until`) is refused until its lock runs out or is removed. */
export async function deleteSnapshot(ref: string, opts: StoreOptions & { dryRun?: boolean; permanently?: boolean } = {}): Promise<DeleteReport> {
  const store = await Store.open(opts.store);
  return withStoreLock(store, 'shared', opts, async () => {
    let id: string;
    let state = 'damaged';
    let clone: ReflinkClone | null = null;
    try {
      const rec = await store.resolveSnapshot(ref);
      id = rec.id;
      state = rec.state;
      clone = rec.reflinkClone;
      if (rec.state === 'pending' && !(await store.writerGone(rec.id))) {
        throw busy(`snapshot ${rec.id} is still being created (pid ${rec.creator.pid}); wait for it to finish`);
      }
      const until = lockedAt(rec);
      if (until) throw new DisksnapError(`snapshot ${rec.id} is locked until ${until}: it cannot be deleted before then (snapshot unlock removes the lock)`, 'ELOCKED');
    } catch (e) {
      // A damaged record can still be deleted by its exact id.
      if (!isDisksnapError(e, 'ECORRUPT') || !isSnapshotId(ref)) throw e;
      id = ref;
    }
    if (opts.dryRun) return { id, state, dryRun: true };
    // a store with a recycle bin keeps a readable snapshot there (./bin.ts); a damaged record goes
    const bin = opts.permanently || state === 'damaged' || state === 'pending' ? undefined : await binRetention(store);
    if (bin !== undefined) {
      const entry = await moveToBin(store, id, bin);
      await store.removeLease(id);
      if (clone) removeClone(clone);
      return { id, state, dryRun: false, binExpires: entry.binExpires };
    }
    await store.backend.delete(store.snapshotKey(id));
    await faultsOf(opts).betweenSteps?.();
    await store.backend.delete(store.manifestKey(id));
    // The change tags are a cache of the deleted snapshot: one left behind is removed by gc.
    await store.backend.delete(tagsKey(id)).catch(() => false);
    await store.backend.delete(packsKey(id)).catch(() => false); // (gc also removes one left behind)
    await store.removeLease(id);
    if (clone) removeClone(clone);
    return { id, state, dryRun: false };
  });
}
