/**
 * The parent lock, read side: which children a parent has, from the sidecar the
 * differencing room keeps next to it (src/differencing/registry.ts writes it):
 *
 *   PARENT.disksnap-children.json
 *   { "version": 1, "originalMode": 420, "children": ["child.qcow2", "sub/other.qcow2"] }
 *
 * It lives in the image layer because every writable open of an image (raw or qcow2) must
 * refuse a parent with children, and that open happens here. Children are stored relative
 * to the parent's directory (a tree moved as a whole keeps working). Reads prune entries
 * whose file is gone or no longer names this parent as its backing file (a child deleted or
 * replaced by hand), so the count heals itself.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { busy, fromNodeError } from '../engine/errors';
import { BlockFile } from '../engine/file';
import { parseHeader } from './qcow2/format';
import { readHeaderCluster, resolveBacking } from './qcow2/header';
import { childrenRegistryPath, readJson } from './sidecars';

export interface RegistryFile {
  version: number;
  originalMode: number;
  children: string[];
}

export interface Registry {
  originalMode: number;
  /** absolute paths */
  children: string[];
}

export function same(a: string, b: string): boolean {
  try {
    return fs.realpathSync(a) === fs.realpathSync(b);
  } catch {
    return path.resolve(a) === path.resolve(b);
  }
}

/** True when `child` exists and its backing file is `parent`. */
export function isChildOf(child: string, parent: string): boolean {
  let f: BlockFile;
  try {
    f = BlockFile.open(child, { lock: 'none' });
  } catch (e) {
    return (e as NodeJS.ErrnoException).code !== 'ENOENT';
  }
  try {
    const size = f.size();
    const h = parseHeader(child, readHeaderCluster(f, size), size);
    return h.backingFile !== undefined && same(resolveBacking(child, h.backingFile), parent);
  } catch {
    return false;
  } finally {
    f.close();
  }
}

export function readRegistry(parent: string): Registry | undefined {
  const file = childrenRegistryPath(parent);
  let doc: RegistryFile | undefined;
  try {
    doc = readJson<RegistryFile>(file);
  } catch (e) {
    throw fromNodeError(e, file);
  }
  if (!doc) return undefined;
  const dir = path.dirname(parent);
  const children = (Array.isArray(doc.children) ? doc.children : [])
    .map((c) => path.resolve(dir, c))
    .filter((c) => isChildOf(c, parent));
  return { originalMode: typeof doc.originalMode === 'number' ? doc.originalMode : 0o644, children };
}

export function childrenOf(parent: string): string[] {
  return readRegistry(parent)?.children ?? [];
}

/**
 * Throws EBUSY when `parent` has children: it stays read-only while they exist. Mode bits
 * do not stop root, so every writable open of an image (raw or qcow2) asks here too.
 */
export function assertNoChildren(parent: string): void {
  if (!fs.existsSync(childrenRegistryPath(parent))) return;
  const children = childrenOf(parent);
  if (children.length === 0) return;
  throw busy(`${parent} is the parent of ${children.join(', ')}: it stays read-only while it has children (writing would corrupt them); roll them back or commit them first`, parent);
}
