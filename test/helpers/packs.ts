/**
 * A store's block objects as the tests count them since packs (src/storage/store/packs.ts):
 * each pack object replaced by the pieces the pack indexes place in it, so that "one object
 * per piece" assertions keep their meaning whether a piece is an object of its own or a part
 * of a pack.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { decodePackIndex } from '../../src/storage/store/packs';
import type { StoreInspector } from './backends';

/** pack digest (hex) -> its pieces (digest hex -> stored length), from the given pack indexes. */
function packParts(indexes: Buffer[]): Map<string, Map<string, number>> {
  const parts = new Map<string, Map<string, number>>();
  for (const b of indexes) {
    const e = decodePackIndex('pack index', b);
    for (let o = 0; o < e.length; o += 72) {
      const pack = e.toString('hex', o + 32, o + 64);
      if (!parts.has(pack)) parts.set(pack, new Map());
      parts.get(pack)!.set(e.toString('hex', o, o + 32), e.readUInt32LE(o + 68));
    }
  }
  return parts;
}

function replacePacks(sizes: Map<string, number>, parts: Map<string, Map<string, number>>): Map<string, number> {
  const out = new Map<string, number>();
  for (const [key, size] of sizes) {
    const inside = parts.get(path.posix.basename(key));
    if (!inside) out.set(key, size);
    else for (const [piece, len] of inside) out.set(`${key}#${piece}`, len);
  }
  return out;
}

/** Sizes of a store's block objects by key, packs replaced by their pieces (`PACKKEY#PIECE`). */
export async function logicalSizes(b: StoreInspector, store: string): Promise<Map<string, number>> {
  const keys = [...(await b.keys(store, 'snapshots/')), ...(await b.keys(store, 'bin/'))].filter((k) => k.endsWith('.packs'));
  return replacePacks(await b.sizes(store, 'blocks/'), packParts(await Promise.all(keys.map((k) => b.read(store, k)))));
}

/** The same for a directory store, read synchronously: the sizes only. */
export function logicalSizesSync(store: string): number[] {
  const indexes: Buffer[] = [];
  for (const d of ['snapshots', 'bin']) {
    const at = path.join(store, d);
    if (fs.existsSync(at)) for (const f of fs.readdirSync(at)) if (f.endsWith('.packs')) indexes.push(fs.readFileSync(path.join(at, f)));
  }
  const sizes = new Map<string, number>();
  const root = path.join(store, 'blocks');
  for (const d of fs.readdirSync(root)) for (const f of fs.readdirSync(path.join(root, d))) sizes.set(`${d}/${f}`, fs.statSync(path.join(root, d, f)).size);
  return [...replacePacks(sizes, packParts(indexes)).values()];
}

/** Pack digests (hex) and the piece digests in them, from a directory store's live pack indexes. */
export function packedDigests(store: string): { packs: Set<string>; pieces: Set<string> } {
  const packs = new Set<string>();
  const pieces = new Set<string>();
  const at = path.join(store, 'snapshots');
  for (const f of fs.readdirSync(at)) {
    if (!f.endsWith('.packs')) continue;
    for (const [pack, inside] of packParts([fs.readFileSync(path.join(at, f))])) {
      packs.add(pack);
      for (const p of inside.keys()) pieces.add(p);
    }
  }
  return { packs, pieces };
}
