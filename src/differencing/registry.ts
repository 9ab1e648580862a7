/**
 * The parent lock, write side: which children a parent has, kept in a sidecar next to the
 * parent (read by src/image/children.ts, which every writable open consults):
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
 * file (a child deleted or replaced by hand, or made standalone by `qemu-img rebase -b ''` or
 * QMP block-stream). currentChildren() also writes the pruned list back,
 * and a parent left with no children gets its mode back, as after its last rollback.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { fromNodeError } from '../engine/errors';
import { childrenRegistryPath, readJson, writeJsonAtomic } from '../image/sidecars';
import { readRegistry, same } from '../image/children';
import type { Registry, RegistryFile } from '../image/children';

export { childrenOf, readRegistry } from '../image/children';

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
  return settle(parent, reg);
}

/** Writes the registry back; with no children left, the parent's mode is restored and the file goes. */
function settle(parent: string, reg: Registry): string[] {
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

/**
 * The children of `parent`, with the registry healed: entries that are no children any more
 * are dropped from the file, and a parent left with none is released (its mode restored).
 * `diff children` (the public childrenOf) asks this; the operations read without healing, so
 * that a commit being resumed still finds the registry it started with.
 */
export function currentChildren(parent: string): string[] {
  const reg = readRegistry(parent);
  if (!reg) return [];
  const listed = readJson<RegistryFile>(childrenRegistryPath(parent))?.children;
  if (Array.isArray(listed) && new Set(listed).size === reg.children.length) return reg.children;
  return settle(parent, reg);
}

export function makeReadOnly(parent: string): void {
  const mode = fs.statSync(parent).mode & 0o7777;
  if (mode & 0o222) fs.chmodSync(parent, mode & ~0o222);
}

