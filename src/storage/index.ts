/**
 * Strategy 2, storage snapshots: the EBS-style block store behind `disksnap snapshot|volume|store`.
 *
 * What this folder owns: snapshots of a volume (a raw image file or block device) into a
 * store, and everything done with them afterwards — restore to a file or in place, copy to
 * another store, delete, diff, verify, gc — plus volume and store records and encryption keys.
 * A snapshot is a manifest (block index -> digest, zero blocks omitted) plus the block objects
 * it names. The first snapshot of a volume stores every data block; later ones store only the
 * blocks whose digest the store lacks, and every snapshot has a complete manifest: any one of
 * them restores on its own.
 *
 * One module per operation: create.ts (+ capture.ts, the one read pipeline, and detect.ts, the
 * change-detection paths over it; live.ts, the snapshot of a running VM's image through QMP and
 * qemu-guest-agent), restore.ts and restore-in-place.ts, copy.ts (+ copy-blocks.ts),
 * delete.ts, diff.ts, verify.ts, gc.ts, list.ts, volumes.ts; shared: common.ts (options, one
 * Progress type, volume and lock helpers), pool.ts (buffers, throttles, read-ahead), fetch.ts
 * (blocks read back and verified), lifecycle.ts (pending -> completed | error), lookup.ts
 * (references and sealed metadata), keys.ts, faults.ts (test hooks, not public). Below them,
 * store/ is the store itself: layout, records, manifests, change tags, crypto, locks, backends.
 *
 * Store layout (a directory; store/store.ts has the details, store/backend.ts the S3 form):
 *
 *   store.json                   id, block size, digest algorithm
 *   lock                         flock: shared by every command, exclusive by gc
 *   tag.key                      the secret of plain stores' change tags (0600)
 *   keys/<key-id>.json           key records of encrypted volumes (never a key)
 *   volumes/<vol-id>.json        path, size, dev/ino, encryption, in-place-restore mark
 *   snapshots/<snap-id>.json     the record: state pending | completed | error, stats, names
 *   snapshots/<snap-id>.map      the manifest (checksummed; sealed when encrypted)
 *   snapshots/<snap-id>.tags     change tags: a cache that lets the next snapshot skip SHA-256
 *   snapshots/<snap-id>.packs    pack index of a version 3 manifest: where its pieces (and, in
 *                                index version 2, whole blocks) are in packs
 *   blocks/<ab>/<digest>         block objects, named by their (keyed) digest, and packs of a
 *                                snapshot's 64 KiB pieces and unsealed incremental blocks, named
 *                                by the SHA-256 of their piece table (store/packs.ts)
 *   leases/<snap-id>             held by the live writer of a pending snapshot
 *
 * Crash safety: every file is written to a temporary name, synced and renamed (objects are
 * linked, so an existing name is never replaced); the order of `snapshot create` is
 *   1. each new object: temporary file, fdatasync, link to its name (many in flight at once)
 *   2. fsync every block directory that got a new name                  (backend.flush)
 *   3. manifest: temporary file, fsync, rename, fsync snapshots/ (beside it the pack index of a
 *      packed manifest, and the change tags the same way: a cache, whose failure only makes
 *      the next snapshot hash every block)
 *   4. record `completed`: temporary file, fsync, rename, fsync snapshots/
 * so a crash anywhere leaves pending (later `error`) snapshots and garbage, never a completed
 * snapshot that cannot be restored. Progress rewrites the pending record atomically and is
 * settled before step 4. Delete removes the record before the manifest; gc (exclusive lock)
 * deletes only what no completed manifest references; restore writes a temporary file and
 * links it; in-place restore marks the volume record before its first write and clears the
 * mark after the fsync, and is idempotent when re-run.
 *
 * A snapshot is of one moment: an object is always written from the buffer whose bytes were
 * hashed, a block read twice must hash the same both times, and the volume's stat (size,
 * mtime, ctime, inode) must not move during the read; otherwise the attempt is thrown away
 * and retried, then the snapshot is `error`. Writes through a shared mmap that move no mtime
 * are ruled out by clean pages (an fdatasync of a regular file on ext4/xfs/btrfs, after which
 * every store faults and moves mtime) or, elsewhere, by a second pass of change tags
 * (capture.ts). A mounted volume is frozen or cloned first (src/host/point-in-time.ts).
 *
 * Encryption follows the volume (`registerVolume(..., {encrypted, key})`): every snapshot of
 * an encrypted volume is taken through a Store whose codec seals blocks (AES-256-GCM), keys
 * its digests (HMAC-SHA-256) and manifests, and seals the record's name, description and tags
 * (store/crypto.ts; keys: keys.ts). The key is checked against the volume's or snapshot's key
 * id before anything is read or written; without it, an encrypted volume's snapshot, restore
 * or verify is ENOKEY — never a plaintext fallback.
 *
 * Deliberately left unoptimised: unchanged data is re-read on every snapshot (mtime or extent
 * maps cannot prove a block unchanged; a keyed tag can); objects are written with write(2),
 * not copy_file_range, because the bytes are already in the buffer that was hashed (a second
 * read of the volume could see different bytes).
 */
export { defaultStoreDir } from './store/store';
export { initStore, registerVolume, listVolumes, setVolumeRetention } from './volumes';
export type { InitStoreOptions, StoreInfo, RegisterVolumeOptions } from './volumes';
export { createSnapshot } from './create';
export type { CreateSnapshotOptions } from './create';
export { createLiveSnapshot, liveOverlaysOf } from './live';
export type { LiveSnapshotOptions, LiveReport } from './live';
export { listSnapshots, lockSnapshot, showSnapshot, tagSnapshot } from './list';
export type { ListSnapshotsOptions } from './list';
export { restoreSnapshot } from './restore';
export type { RestoreOptions, RestoreReport } from './restore';
export { copySnapshot } from './copy';
export type { CopySnapshotOptions } from './copy';
export { deleteSnapshot } from './delete';
export { pruneSnapshots } from './prune';
export { binSettings, listBin, setBinRetention, undeleteSnapshot } from './bin';
export type { BinEntry } from './bin';
export type { PrunePolicy, PruneOptions, PruneReport, PruneDecision } from './prune';
export type { DeleteReport } from './delete';
export { diffSnapshots } from './diff';
export type { DiffResult } from './diff';
export { verifySnapshot } from './verify';
export type { VerifyOptions, VerifyReport } from './verify';
export { gc } from './gc';
export type { GcOptions, GcReport } from './gc';
export type { StoreOptions, Progress, ProgressFn } from './common';
export type { KeySpec } from './keys';
export type { SnapshotJson, SnapshotRecord, SnapshotStats, VolumeRecord } from './store/records';
