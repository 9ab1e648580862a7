/**
 * `diff create`: a qcow2 v3 child over PARENT, recording the parent's identity (the parent
 * guard). The child is complete and the parent registered (and made read-only) before the
 * child appears under its name, so a crash leaves either no child or a registered one.
 */
import * as fs from 'node:fs';
import { DisksnapError, invalid, busy } from '../engine/errors';
import { checkOutput } from '../engine/atomic';
import { clusterBitsOf } from '../image/qcow2/create';
import { isChildOf, same } from '../image/children';
import { addChild, childrenOf, removeChild } from './registry';
import { assertNotAttachedWritable } from './attached';
import { backingNameFor, ChildInfo, openParent, writeEmptyChild } from './child';

/** QEMU's unit of virtual size (BDRV_SECTOR_SIZE). */
const SECTOR = 512;

export interface CreateChildOptions {
  /** bytes (default 64 KiB) */
  clusterSize?: number;
  /** replace an existing CHILD */
  force?: boolean;
}

export async function createChild(parent: string, child: string, opts: CreateChildOptions = {}): Promise<ChildInfo> {
  if (!fs.existsSync(parent)) throw new DisksnapError(`parent ${parent} does not exist`, 'ENOENT', 2, parent);
  if (fs.existsSync(child) && same(parent, child)) throw invalid(`the child ${child} cannot be its own parent`, child);
  const clusterSize = opts.clusterSize ?? 65536;
  clusterBitsOf(clusterSize);
  assertNotAttachedWritable(parent, 'make a child of');
  checkOutput(child, !!opts.force);
  if (fs.existsSync(child) && childrenOf(child).length > 0) {
    throw busy(`${child} has children of its own; roll them back before replacing it`, child);
  }
  const p = openParent(parent);
  try {
    // qemu-img create -b rounds the size up to whole 512-byte sectors, and QEMU sees qcow2
    // sizes in sectors: a child of the exact odd size would hide its last bytes from a VM
    const shape = { size: Math.ceil(p.size / SECTOR) * SECTOR, clusterSize, backingName: backingNameFor(child, parent) };
    // registered (and the parent read-only) before the child appears under its name
    return await writeEmptyChild(child, parent, p, shape, !!opts.force, () => addChild(parent, child));
  } catch (e) {
    // no child was made: the parent is released again unless it has others
    if (!isChildOf(child, parent)) removeChild(parent, child);
    throw e;
  } finally {
    p.close();
  }
}
