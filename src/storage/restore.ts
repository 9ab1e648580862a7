/**
 * `snapshot restore`: to a new file, or in place (./restore-in-place.ts).
 *
 * To a file: every object is verified against its digest as it is read (./fetch.ts), written
 * into a temporary sparse file in the target's directory (zero blocks stay holes), the
 * manifest's checksum checked at its end, fsync, then linked (or renamed with --force) onto
 * the target and the directory fsynced. Any failure removes the temporary file: no partial
 * output under the final name.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { rawToQcow2 } from '../image/qcow2/from-raw';
import { randomBytes } from 'node:crypto';
import { BlockFile } from '../engine/file';
import { DisksnapError, invalid, isDisksnapError, fromNodeError } from '../engine/errors';
import { native } from '../engine/native';
import { syncDir } from '../engine/atomic';
import { KeyRing } from './keys';
import { Store } from './store/store';
import { DirectIo, DIRECT_ALIGN } from './store/direct';
import { blockLength } from './store/manifest';
import type { SnapshotRecord } from './store/records';
import { ProgressFn, StoreOptions, assertCompleted, threadsOf, withStoreLock } from './common';
import { codecOf, resolve } from './lookup';
import { BatchEntry, blocksListed, pipelineBlocks } from './fetch';
import { emptyReport, restoreInPlace } from './restore-in-place';

/** Restore starts an fdatasync of what it wrote every this many bytes (see FileOutput). */
const SYNC_EVERY_BYTES = 128 * 1024 * 1024;

export interface RestoreOptions extends StoreOptions {
  /** a new raw image file */
  to?: string;
  /** roll this volume back in place */
  inPlace?: string;
  /**
   * With `inPlace` into a qcow2 volume: restore even though its backing chain is not the one
   * the snapshot recorded (the guest view is written either way; the parents are never touched)
   */
  allowChainChange?: boolean;
  /** with `to`: replace an existing file */
  force?: boolean;
  /** with `to`: 'raw' (default) a sparse raw image, 'qcow2' a standalone qcow2 v3 image */
  format?: 'raw' | 'qcow2';
  onProgress?: ProgressFn;
}

export interface RestoreReport {
  snapshotId: string;
  target: string;
  mode: 'file' | 'in-place';
  volumeSize: number;
  blockSize: number;
  blocksWritten: number;
  bytesWritten: number;
  /** in place: blocks made holes because the snapshot has zeros there */
  blocksPunched: number;
  /** in place: blocks that already matched (allocated zeros included) */
  blocksUnchanged: number;
  /**
   * to a file: blocks of blocksWritten that share the store object's extents instead of
   * copying its bytes (plain stores on xfs, btrfs: FICLONERANGE)
   */
  blocksCloned?: number;
}

export async function restoreSnapshot(ref: string, opts: RestoreOptions): Promise<RestoreReport> {
  if ((opts.to === undefined) === (opts.inPlace === undefined)) throw invalid('restore needs exactly one of --to FILE and --in-place VOLUME');
  if (opts.format !== undefined && opts.format !== 'raw' && opts.format !== 'qcow2') throw invalid(`restore format '${String(opts.format)}' must be raw or qcow2`);
  if (opts.format === 'qcow2' && opts.inPlace !== undefined) throw invalid('--format applies to --to FILE only');
  if (opts.allowChainChange && opts.inPlace === undefined) throw invalid('--allow-chain-change applies to --in-place only');
  const plain = await Store.open(opts.store);
  return withStoreLock(plain, 'shared', opts, async () => {
    const ring = new KeyRing(opts.key);
    const rec = await resolve(plain, ref, ring);
    assertCompleted(rec, 'restored');
    // The key before any output exists: a missing or wrong key leaves nothing behind.
    const store = plain.withCodec(await codecOf(plain, rec, ring));
    return opts.to !== undefined ? restoreToFile(store, rec, opts.to, opts) : restoreInPlace(store, rec, opts.inPlace!, opts);
  });
}

/** The target's checks before anything is written: EEXIST without force, EISDIR, a missing directory. */
function checkTarget(target: string, force: boolean | undefined): boolean {
  const exists = fs.existsSync(target);
  if (exists && !force) throw new DisksnapError(`${target} exists; use --force to replace it`, 'EEXIST', 17, target);
  if (exists && fs.statSync(target).isDirectory()) throw new DisksnapError(`${target} is a directory`, 'EISDIR', 21, target);
  const dir = path.dirname(target);
  if (!fs.existsSync(dir)) throw new DisksnapError(`directory ${dir} does not exist`, 'ENOENT', 2, dir);
  return exists;
}

async function restoreToFile(store: Store, rec: SnapshotRecord, to: string, opts: RestoreOptions): Promise<RestoreReport> {
  const target = path.resolve(to);
  const exists = checkTarget(target, opts.force);
  const dir = path.dirname(target);
  const reader = await store.openManifest(rec);
  const tmp = path.join(dir, `.${path.basename(target)}.disksnap-${randomBytes(4).toString('hex')}.tmp`);
  const tmpQcow2 = `${tmp}.qcow2`;
  const report: RestoreReport = { ...emptyReport(rec, target, 'file'), blocksCloned: 0 };
  let out: FileOutput | undefined;
  try {
    out = new FileOutput(store, rec, tmp, report);
    await pipelineBlocks(store, rec, reader, { threads: threadsOf(opts), total: blocksListed(reader, rec), phase: 'write', onProgress: opts.onProgress, alloc: out.alloc }, (batch, buf) =>
      out!.write(batch, buf),
    );
    await out.finish();
    out = undefined;
    if (opts.format === 'qcow2') {
      rawToQcow2(tmp, tmpQcow2, rec.volumeSize);
      fs.rmSync(tmp, { force: true });
      publish(tmpQcow2, target, exists);
    } else publish(tmp, target, exists);
    syncDir(dir);
    return report;
  } catch (e) {
    out?.close();
    fs.rmSync(tmp, { force: true });
    fs.rmSync(tmpQcow2, { force: true });
    throw e;
  } finally {
    await reader.close();
  }
}

/** Moves the finished temporary file onto the target: a link (never replacing a file that appeared meanwhile), or a rename with --force. */
function publish(tmp: string, target: string, replace: boolean): void {
  if (replace) {
    fs.renameSync(tmp, target);
    return;
  }
  try {
    fs.linkSync(tmp, target);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') throw new DisksnapError(`${target} exists; use --force to replace it`, 'EEXIST', 17, target);
    throw fromNodeError(e, target);
  }
  fs.unlinkSync(tmp);
}

/**
 * The temporary output file of a restore and how blocks get into it.
 *
 * Plain objects are files holding exactly a block's bytes: where the filesystem shares
 * extents (xfs, btrfs, with the store on the same one), whole blocks are cloned into the
 * image after their object was read and verified as always, and nothing is copied (the
 * restore rows of bench/snapshot.ts measure it). The first block that cannot be cloned turns
 * this off for the rest.
 *
 * Whole blocks go through a second, O_DIRECT descriptor where the filesystem allows it: one
 * big file written through the page cache is flushed by a single writeback thread (measured
 * here: 1 GiB buffered + fdatasync 3.4 s, O_DIRECT 0.77 s). The short last block, and every
 * block where O_DIRECT is refused (tmpfs), go through the page cache, with an fdatasync
 * started every SYNC_EVERY_BYTES so the final fsync does not find it all dirty.
 */
class FileOutput {
  private readonly file: BlockFile;
  private readonly direct: DirectWriter | undefined;
  /** false once the filesystem refused an O_DIRECT write (the descriptor stays open until close()) */
  private useDirect: boolean;
  private closed = false;
  private readonly localFile: ((key: string) => string) | undefined;
  private clone: boolean;
  private readonly syncs: Promise<void>[] = [];
  private unsynced = 0;
  readonly alloc: ((size: number, bulk?: boolean) => Buffer) | undefined;

  constructor(
    private readonly store: Store,
    private readonly rec: SnapshotRecord,
    tmp: string,
    private readonly report: RestoreReport,
  ) {
    this.localFile = store.backend.localFile?.bind(store.backend);
    this.clone = !store.codec.keys && this.localFile !== undefined && process.env.DISKSNAP_NO_CLONE !== '1';
    this.file = BlockFile.open(tmp, { create: true, exclusive: true, lock: 'exclusive', mode: 0o644 });
    try {
      this.file.truncateSync(rec.volumeSize);
      this.direct = openDirect(tmp, rec.blockSize, rec.volumeSize);
    } catch (e) {
      this.file.close();
      throw e;
    }
    this.useDirect = this.direct !== undefined;
    this.alloc = this.direct?.alloc;
  }

  async write(batch: BatchEntry[], buf: Buffer): Promise<void> {
    const bs = this.rec.blockSize;
    const viaDirect: number[] = [];
    const viaCache: number[] = [];
    for (let k = 0; k < batch.length; k++) {
      const len = blockLength(batch[k].index, this.rec.volumeSize, bs);
      this.report.bytesWritten += len;
      const e = batch[k];
      // (a block with pieces is written from the buffer, where it was assembled, and so is a
      // block in a pack: the clone takes a whole object)
      if (this.clone && len === bs && e.digest && !e.pieces && !this.store.packs.lookup(e.digest)) {
        if (cloneBlock(this.localFile!(this.store.blockKey(e.digest)), this.file, e.index * len, len)) {
          this.report.blocksCloned!++;
          continue;
        }
        this.clone = false;
      }
      const list = this.useDirect && len === bs ? viaDirect : viaCache;
      list.push(batch[k].index * bs, k * bs, len);
    }
    if (viaDirect.length) {
      try {
        await this.direct!.file.writeBatch(buf, Float64Array.from(viaDirect));
      } catch (e) {
        if (!isDisksnapError(e, 'EINVAL')) throw e;
        this.useDirect = false; // the filesystem takes O_DIRECT reads but not these writes
        viaCache.push(...viaDirect);
      }
    }
    if (viaCache.length) {
      await this.file.writeBatch(buf, Float64Array.from(viaCache));
      for (let j = 2; j < viaCache.length; j += 3) this.unsynced += viaCache[j];
    }
    this.report.blocksWritten += batch.length;
    if (this.unsynced >= SYNC_EVERY_BYTES) {
      this.unsynced = 0;
      const p = this.file.sync(true);
      p.catch(() => undefined); // awaited in finish()
      this.syncs.push(p);
    }
  }

  /** Every write durable; both descriptors closed. */
  async finish(): Promise<void> {
    try {
      await Promise.all(this.syncs);
      await this.file.sync();
    } finally {
      this.close();
    }
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.direct?.close();
    this.file.close();
  }
}

/** Clones a whole object file into `out` at `at`; false where the filesystem cannot. */
function cloneBlock(object: string, out: BlockFile, at: number, len: number): boolean {
  let fd: number;
  try {
    fd = fs.openSync(object, 'r');
  } catch {
    return false; // the read that verified it just succeeded: let the copy path report it
  }
  try {
    return fs.fstatSync(fd).size === len && native().cloneRange(fd, 0, out.fd, at, len);
  } catch {
    return false; // no clone here (EXDEV, EOPNOTSUPP, ...): the bytes are copied instead
  } finally {
    fs.closeSync(fd);
  }
}

interface DirectWriter {
  file: BlockFile;
  /** Allocates buffers whose memory suits O_DIRECT on this file. */
  alloc: (size: number, bulk?: boolean) => Buffer;
  close: () => void;
}

/** Opens `file` a second time with O_DIRECT where its filesystem allows (src/storage/store/direct.ts). */
function openDirect(file: string, blockSize: number, size: number): DirectWriter | undefined {
  if (size < DIRECT_ALIGN || blockSize % DIRECT_ALIGN !== 0) return undefined;
  const dio = DirectIo.probe(path.dirname(file));
  if (!dio) return undefined;
  let f: BlockFile;
  try {
    f = BlockFile.open(file, { write: true, direct: true, lock: 'none' });
  } catch {
    return undefined; // O_DIRECT refused for this file: every block goes through the page cache
  }
  return { file: f, alloc: (n, bulk) => dio.alloc(n, bulk), close: () => f.close() };
}
