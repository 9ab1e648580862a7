/**
 * The outputs of one snapshot attempt (its manifest, change tags) and the parent's inputs
 * (manifest, change tags), opened for ./capture.ts.
 */
import type { Store } from './store/store';
import { ManifestCursor, ManifestReader, ManifestWriter } from './store/manifest';
import { TagReader, TagWriter } from './store/tags';
import type { SnapshotRecord } from './store/records';
import type { CaptureSettings, ParentView } from './capture';

/** The new manifest's writer, and the change tags' where they can be written; `expectEntries`: the parent manifest's count, if any. */
export async function openOutputs(store: Store, rec: SnapshotRecord, size: number, s: CaptureSettings, pieceSize: number, expectEntries?: number): Promise<{ writer: ManifestWriter; tagWriter?: TagWriter }> {
  const bs = store.blockSize;
  // A manifest with pieces is packed (version 3, ./store/packs.ts): it lists the pieces it keeps from a packed parent.
  const writer = await store.createManifest({ blockSize: bs, volumeSize: size, snapshotId: rec.id, volumeId: rec.volumeId, digest: store.codec.digest, sealed: store.codec.sealed, pieceSize, packed: !!pieceSize }, expectEntries);
  // whole blocks the parent's chain packed (./store/packs.ts): each entry kept is looked up too
  if (store.packs.listsWhole) writer.noteEveryWhole();
  if (!s.tk) return { writer };
  try {
    return { writer, tagWriter: await TagWriter.create(store.backend, { blockSize: bs, volumeSize: size, snapshotId: rec.id, volumeId: rec.volumeId }, s.tk) };
  } catch (e) {
    s.onLog?.(`change tags of ${rec.id} cannot be written (${(e as Error).message}); its next snapshot hashes every block`);
    return { writer };
  }
}

/** The parent's manifest and change tags; a damaged one only costs speed. */
export async function openParent(store: Store, parent: SnapshotRecord | undefined, s: CaptureSettings): Promise<ParentView & { reader?: ManifestReader }> {
  if (!parent) return {};
  let reader: ManifestReader;
  try {
    reader = await store.openManifest(parent);
  } catch (e) {
    s.onLog?.(`parent snapshot ${parent.id} cannot be used (${(e as Error).message}); comparing with the store instead`);
    return {};
  }
  const view: ParentView & { reader?: ManifestReader } = { reader, cursor: new ManifestCursor(reader) };
  if (!s.tk) return view;
  try {
    view.tags = await TagReader.open(store.backend, { blockSize: parent.blockSize, volumeSize: parent.volumeSize, snapshotId: parent.id, volumeId: parent.volumeId }, s.tk);
  } catch (e) {
    s.onLog?.(`change tags of parent snapshot ${parent.id} cannot be used (${(e as Error).message}); hashing every block`);
  }
  return view;
}
