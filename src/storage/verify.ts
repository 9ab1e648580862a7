/** `snapshot verify`: every block object a snapshot references re-read and checked against its digest. */
import { isDisksnapError } from '../engine/errors';
import { KeyRing } from './keys';
import { Store } from './store/store';
import { ManifestReader } from './store/manifest';
import { ProgressFn, StoreOptions, assertCompleted, blocksPerChunk, threadsOf, withStoreLock } from './common';
import { codecOf, resolve } from './lookup';
import { blocksListed, fetchVerified, nextBatch } from './fetch';
import { bigBuffer } from './store/direct';

export interface VerifyReport {
  snapshotId: string;
  ok: boolean;
  blocksChecked: number;
  bytesChecked: number;
  /** bad blocks, in index order */
  badBlocks: { index: number; digest: string; reason: string }[];
  /** a problem with the manifest itself (then not every block could be checked) */
  manifestError: string | null;
}

export interface VerifyOptions extends StoreOptions {
  onProgress?: ProgressFn;
}

/** Re-reads every block object the snapshot references and checks its digest. */
export async function verifySnapshot(ref: string, opts: VerifyOptions = {}): Promise<VerifyReport> {
  const plain = await Store.open(opts.store);
  return withStoreLock(plain, 'shared', opts, async () => {
    const ring = new KeyRing(opts.key);
    const rec = await resolve(plain, ref, ring);
    assertCompleted(rec, 'verified');
    const store = plain.withCodec(await codecOf(plain, rec, ring));
    const report: VerifyReport = { snapshotId: rec.id, ok: true, blocksChecked: 0, bytesChecked: 0, badBlocks: [], manifestError: null };
    let reader: ManifestReader;
    try {
      reader = await store.openManifest(rec);
    } catch (e) {
      if (!isDisksnapError(e, 'ECORRUPT')) throw e;
      report.ok = false;
      report.manifestError = e.message;
      return report;
    }
    const threads = threadsOf(opts);
    const maxBlocks = blocksPerChunk(rec.blockSize);
    let buf: Buffer = bigBuffer(maxBlocks * rec.blockSize);
    try {
      for (;;) {
        const batch = await nextBatch(reader, maxBlocks);
        if (!batch.length) break;
        // recheck: a sealed object is authenticated, and its plaintext hashed again too
        const r = await fetchVerified(store, batch, buf, rec.volumeSize, threads, true);
        buf = r.buf;
        for (const b of r.bad) report.badBlocks.push({ index: batch[b.k].index, digest: (batch[b.k].digest ?? batch[b.k].pieces![0].digest).toString('hex'), reason: b.why });
        report.blocksChecked += batch.length;
        report.bytesChecked += r.len;
        opts.onProgress?.({ phase: 'verify', done: report.blocksChecked, total: blocksListed(reader, rec) });
      }
    } catch (e) {
      if (!isDisksnapError(e, 'ECORRUPT')) throw e;
      report.manifestError = e.message;
    } finally {
      await reader.close();
    }
    report.ok = report.badBlocks.length === 0 && report.manifestError === null;
    return report;
  });
}
