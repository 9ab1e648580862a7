/** `snapshot diff`: the blocks that differ between two completed snapshots of one volume. */
import { invalid } from '../engine/errors';
import { KeyRing, isExplicit } from './keys';
import { Store, sealedCodec } from './store/store';
import { ManifestReader, sameEntries } from './store/manifest';
import { StoreOptions, assertCompleted } from './common';
import { resolve } from './lookup';
import { NumberList } from './pool';

export interface DiffResult {
  blockSize: number;
  changedBlocks: number[];
}

/** Indexes of the blocks that differ between two completed snapshots of one volume. */
export async function diffSnapshots(refA: string, refB: string, opts: StoreOptions = {}): Promise<DiffResult> {
  const plain = await Store.open(opts.store);
  const ring = new KeyRing(opts.key);
  const a = await resolve(plain, refA, ring);
  const b = await resolve(plain, refB, ring);
  for (const s of [a, b]) assertCompleted(s, 'compared');
  if (a.volumeId !== b.volumeId) throw invalid(`snapshots ${a.id} (${a.volumeId}) and ${b.id} (${b.volumeId}) are of different volumes`);
  if (a.blockSize !== b.blockSize) throw invalid(`snapshots ${a.id} and ${b.id} have different block sizes`);
  if (a.keyId !== b.keyId) {
    const under = (s: typeof a) => (s.keyId ? `key ${s.keyId}` : 'not encrypted');
    throw invalid(`snapshots ${a.id} (${under(a)}) and ${b.id} (${under(b)}) have digests under different keys, which cannot be compared`);
  }
  // Without the key, an encrypted pair is compared by its keyed digests, unauthenticated: the
  // list of changed blocks reveals nothing more than the manifests do. With it, authenticated.
  const keys = a.keyId ? await ring.tryId(plain, a.keyId) : undefined;
  if (a.keyId && isExplicit(opts.key) && !keys) await ring.forId(plain, a.keyId, `snapshot ${a.id}`);
  const store = keys ? plain.withCodec(sealedCodec(keys)) : plain;
  const unauthenticated = !!a.keyId && !keys;
  const ra = await store.openManifest(a, { unauthenticated });
  try {
    const rb = await store.openManifest(b, { unauthenticated });
    try {
      return { blockSize: a.blockSize, changedBlocks: await changed(ra, rb) };
    } finally {
      await rb.close();
    }
  } finally {
    await ra.close();
  }
}

/** Merges two manifests in index order: the indexes present in one only, or with different entries. */
async function changed(ra: ManifestReader, rb: ManifestReader): Promise<number[]> {
  const out = new NumberList();
  let ea = await ra.nextBlock();
  let eb = await rb.nextBlock();
  while (ea || eb) {
    if (!eb || (ea && ea.index < eb.index)) {
      out.push(ea!.index);
      ea = await ra.nextBlock();
    } else if (!ea || eb.index < ea.index) {
      out.push(eb.index);
      eb = await rb.nextBlock();
    } else {
      // (the same bytes kept whole in one and as pieces in the other count as changed)
      if (!sameEntries(ea, eb)) out.push(ea.index);
      ea = await ra.nextBlock();
      eb = await rb.nextBlock();
    }
  }
  return out.toArray();
}
