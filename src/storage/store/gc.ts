/**
 * Garbage collection: mark and sweep of block objects, under the exclusive store lock.
 *
 * Why it never races a snapshot in progress: every process that writes or reads block
 * objects (snapshot create, restore, verify, delete) holds the store lock shared for its
 * whole run; gc takes it exclusive, so while gc runs no snapshot is pending with a live
 * writer, and any `pending` record it finds belongs to a dead process (it is marked `error`
 * first). Blocks written by a dead writer are not referenced by a completed manifest and are
 * swept — they were never promised to anyone.
 *
 * Mark: every manifest of a `completed` snapshot is streamed and checked to its checksum;
 * its digests go into a DigestSet. A completed snapshot whose manifest cannot be read, or a
 * record that cannot be parsed but has a manifest that cannot be read, aborts gc before it
 * deletes anything (an incomplete mark set would delete live blocks). A damaged record with
 * a readable manifest keeps that manifest's blocks alive (conservative).
 *
 * Encrypted snapshots need no key here: their manifests' entries (keyed digests) are the
 * names of their objects; only the keyed trailer goes unchecked, which can only keep more.
 * Key records (`keys/`) are never removed: they are tiny, and a passphrase needs its salt.
 *
 * Sweep: block objects not in the set, temporary files of dead writers, manifests and change
 * tag files with no completed snapshot, and leases of dead writers are deleted. Each deletion is independent,
 * so a gc killed half-way leaves a store with less garbage and nothing else changed.
 */
import * as path from 'node:path';
import { DisksnapError } from '../../engine/errors';
import { DigestSet } from './digestset';
import { ManifestReader } from './manifest';
import type { Store } from './store';

export interface GcReport {
  /** snapshots that were pending with a dead writer and are now `error` */
  staleSnapshots: string[];
  /** completed snapshots whose blocks were kept */
  liveSnapshots: number;
  blocksKept: number;
  bytesKept: number;
  blocksFreed: number;
  bytesFreed: number;
  /** temporary files, stray manifests and leases removed */
  otherFilesRemoved: number;
  otherBytesFreed: number;
}

export interface GcOptions {
  waitMs?: number;
  onWait?: () => void;
  /** test hook: called before each deletion */
  beforeDelete?: (key: string) => void | Promise<void>;
}

export async function collectGarbage(store: Store, opts: GcOptions = {}): Promise<GcReport> {
  const lock = await store.lock('exclusive', { waitMs: opts.waitMs ?? 0, onWait: opts.onWait });
  try {
    const listing = await store.listSnapshots();
    const staleSnapshots = await store.reapStale(listing);
    const live = new DigestSet(4096);
    const completed = new Set<string>();
    for (const s of listing.snapshots) {
      if (s.state !== 'completed') continue;
      completed.add(s.id);
      let reader: ManifestReader;
      try {
        // Sealed manifests too: gc holds no keys, and reading the entries is all it needs.
        reader = await store.openManifest(s, { unauthenticated: true });
      } catch (e) {
        throw new DisksnapError(
          `gc stopped before deleting anything: completed snapshot ${s.id} has an unreadable manifest (${(e as Error).message}); delete that snapshot or restore the file first`,
          'ECORRUPT',
          undefined,
          store.backend.describe(store.manifestKey(s.id)),
        );
      }
      try {
        while ((await reader.next()) >= 0) live.add(reader.digest);
      } catch (e) {
        throw new DisksnapError(
          `gc stopped before deleting anything: manifest of completed snapshot ${s.id} is damaged (${(e as Error).message}); delete that snapshot first`,
          'ECORRUPT',
          undefined,
          store.backend.describe(store.manifestKey(s.id)),
        );
      } finally {
        await reader.close();
      }
    }
    // Damaged records: keep whatever their manifest references, if it is readable.
    for (const d of listing.damaged) {
      const key = store.manifestKey(d.id);
      if ((await store.backend.stat(key)) === undefined) continue;
      completed.add(d.id);
      let reader: ManifestReader | undefined;
      try {
        reader = await ManifestReader.open(store.backend.describe(key), await store.backend.open(key), {}, { unauthenticated: true });
        while ((await reader.next()) >= 0) live.add(reader.digest);
      } catch (e) {
        throw new DisksnapError(
          `gc stopped before deleting anything: snapshot ${d.id} has a damaged record (${d.error.message}) and a damaged manifest (${(e as Error).message})`,
          'ECORRUPT',
          undefined,
          store.backend.describe(key),
        );
      } finally {
        await reader?.close();
      }
    }

    const report: GcReport = {
      staleSnapshots,
      liveSnapshots: listing.snapshots.filter((s) => s.state === 'completed').length,
      blocksKept: 0,
      bytesKept: 0,
      blocksFreed: 0,
      bytesFreed: 0,
      otherFilesRemoved: 0,
      otherBytesFreed: 0,
    };
    const del = async (key: string): Promise<boolean> => {
      await opts.beforeDelete?.(key);
      return store.backend.delete(key);
    };

    for await (const o of store.backend.list('blocks/')) {
      if (o.temporary) {
        if (await del(o.key)) {
          report.otherFilesRemoved++;
          report.otherBytesFreed += o.size;
        }
        continue;
      }
      const name = path.posix.basename(o.key);
      const digest = /^[0-9a-f]{64}$/.test(name) ? Buffer.from(name, 'hex') : undefined;
      if (digest && live.has(digest)) {
        report.blocksKept++;
        report.bytesKept += o.size;
        continue;
      }
      if (!digest) continue; // not ours: leave foreign files alone
      if (await del(o.key)) {
        report.blocksFreed++;
        report.bytesFreed += o.size;
      }
    }
    for await (const o of store.backend.list('snapshots/')) {
      const base = path.posix.basename(o.key);
      const stray =
        o.temporary ||
        (base.endsWith('.map') && !completed.has(base.slice(0, -4))) ||
        (base.endsWith('.tags') && !completed.has(base.slice(0, -5)));
      if (stray && (await del(o.key))) {
        report.otherFilesRemoved++;
        report.otherBytesFreed += o.size;
      }
    }
    for await (const o of store.backend.list('volumes/')) {
      if (o.temporary && (await del(o.key))) report.otherFilesRemoved++;
    }
    for await (const o of store.backend.list('leases/')) {
      const id = path.posix.basename(o.key);
      // Every writer is gone (we hold the store exclusively), so every lease is stale.
      if (!listing.snapshots.some((s) => s.id === id && s.state === 'pending') && (await del(o.key))) report.otherFilesRemoved++;
    }
    if ((await store.backend.stat('store.json')) === undefined) {
      throw new DisksnapError(`store ${store.dir} lost its store.json during gc`, 'ECORRUPT');
    }
    return report;
  } finally {
    lock.release();
  }
}
