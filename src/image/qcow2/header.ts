/**
 * Reading a qcow2 file's first cluster and resolving its backing file name: what every
 * module that looks at a child's header (open, check, the children registry, commit) needs
 * before anything is parsed. The header's fields themselves are decoded in format.ts.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockFile } from '../../engine/file';
import { DisksnapError } from '../../engine/errors';

/** Cluster 0 (or the whole file when shorter): 64 KiB first, more if cluster_bits says so. */
export function readHeaderCluster(file: BlockFile, fileSize: number): Buffer {
  let head = Buffer.alloc(Math.min(fileSize, 65536));
  file.readFullSync(head, 0);
  if (head.length >= 24) {
    const bits = head.readUInt32BE(20);
    if (bits > 16 && bits <= 21 && fileSize > head.length) {
      head = Buffer.alloc(Math.min(fileSize, 2 ** bits));
      file.readFullSync(head, 0);
    }
  }
  return head;
}

export function realpathOr(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch {
    // Safe to drop: only used to compare paths (loop detection); a path that cannot be
    // resolved (gone, or a dangling link) is compared by its absolute name instead.
    return path.resolve(p);
  }
}

/**
 * The backing file name as QEMU resolves it: absolute as written, relative to the
 * directory of the child otherwise.
 */
export function resolveBacking(child: string, name: string): string {
  if (/^[a-z][a-z0-9+.-]*:/i.test(name) && !name.startsWith('/')) {
    if (name.startsWith('json:')) {
      throw new DisksnapError(`${child}: backing file '${name}' is a QEMU json: description, which disksnap does not support`, 'EUNSUPPORTED', undefined, child);
    }
    if (name.startsWith('file:')) name = name.slice(5);
  }
  return path.isAbsolute(name) ? name : path.join(path.dirname(child), name);
}
