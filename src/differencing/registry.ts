/**
 * Which children a parent has, kept in a sidecar next to the parent:
 *
 *   PARENT.disksnap-children.json
 *   { "version": 1, "originalMode": 420, "children": ["child.qcow2", "sub/other.qcow2"] }
 *
 * Children are stored relative to the parent's directory (a tree moved as a whole keeps
 * working). `originalMode` is the parent's mode before its first child made it read-only;
 * removing the last child restores it and deletes the sidecar.
 *
 * Why a sidecar rather than xattrs (user.disksnap.children): it works on every filesystem
 * (tmpfs before 6.6, NFS, vfat), survives `cp` and `tar` without special flags, and a user
 * can read it. The price: the parent's directory must be writable, and two `diff create`
 * racing on one parent could lose an entry (each rewrites the file atomically); the parent
 * guard still catches any later write to a parent made writable by such a loss.
 *
 * Reads prune entries whose file is gone or no longer names this parent as its backing
 * file (a child deleted or replaced by hand), so the count heals itself.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { DisksnapError, fromNodeError } from '../engine/errors';
import { BlockFile } from '../engine/file';
import { parseHeader } from '../image/qcow2/format';
import { readHeaderCluster, resolveBacking } from '../image/qcow2/image';
import { childrenRegistryPath, readJson, writeJsonAtomic } from '../image/sidecars';

interface RegistryFile {
  version: number;
  originalMode: number;
  children: string[];
}

export interface Registry {
  originalMode: number;
  /** absolute paths */
  children: string[];
}

function same(a: string, b: string): boolean {
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

function write(parent: string, reg: Registry): void {
  const dir = path.dirname(parent);
  const doc: RegistryFile = {
    version: 1,
    originalMode: reg.originalMode,
    children: [...new Set(reg.children.map((c) => path.relative(dir, c)))],
  };
  writeJsonAtomic(childrenRegistryPath(parent), doc);
}

/** Records a child and makes the parent read-only (remembering its mode the first time). */
export function addChild(parent: string, child: string): void {
  const existing = readRegistry(parent);
  const mode = fs.statSync(parent).mode & 0o7777;
  const reg: Registry = existing ?? { originalMode: mode, children: [] };
  const abs = path.resolve(child);
  if (!reg.children.some((c) => same(c, abs))) reg.children.push(abs);
  write(parent, reg);
  makeReadOnly(parent);
}

/**
 * Forgets a child; when it was the last one, restores the parent's original mode and
 * removes the sidecar. Returns the children that remain.
 */
export function removeChild(parent: string, child: string): string[] {
  const reg = readRegistry(parent);
  if (!reg) return [];
  reg.children = reg.children.filter((c) => !same(c, child) && fs.existsSync(c));
  if (reg.children.length === 0) {
    try {
      fs.chmodSync(parent, reg.originalMode);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw fromNodeError(e, parent);
    }
    fs.rmSync(childrenRegistryPath(parent), { force: true });
    return [];
  }
  write(parent, reg);
  return reg.children;
}

export function makeReadOnly(parent: string): void {
  const mode = fs.statSync(parent).mode & 0o7777;
  if (mode & 0o222) fs.chmodSync(parent, mode & ~0o222);
}

/**
 * Throws EBUSY when `parent` has children: it stays read-only while they exist. Mode bits
 * do not stop root, so every writable open of an image (raw or qcow2) asks here too.
 */
export function assertNoChildren(parent: string): void {
  if (!fs.existsSync(childrenRegistryPath(parent))) return;
  const children = childrenOf(parent);
  if (children.length === 0) return;
  throw new DisksnapError(
    `${parent} is the parent of ${children.join(', ')}: it stays read-only while it has children (writing would corrupt them); roll them back or commit them first`,
    'EBUSY',
    16,
    parent,
  );
}
