/**
 * What every operation on a child needs: its header and parent without opening the chain, the
 * would-be parent opened for its size and identity, and a fresh empty child written under a
 * temporary name (create, reset, and commit with --keep-child all end with one).
 */
import * as path from 'node:path';
import { BlockFile } from '../engine/file';
import { invalid } from '../engine/errors';
import { writeAtomically } from '../engine/atomic';
import { detectFormat, ImageFormat } from '../image';
import { Qcow2Image } from '../image/qcow2/image';
import { readHeaderCluster, resolveBacking } from '../image/qcow2/header';
import { createQcow2 } from '../image/qcow2/create';
import { parseHeader, Qcow2Header } from '../image/qcow2/format';
import { identify, toRecord } from '../image/qcow2/guard';

export interface ChildInfo {
  child: string;
  parent: string;
  parentFormat: ImageFormat;
  /** the backing name stored in the child */
  backingName: string;
  virtualSize: number;
  clusterSize: number;
}

export type Progress = (done: number, total: number) => void;

export interface OpenParent {
  format: ImageFormat;
  size: number;
  file: BlockFile;
  close(): void;
}

/** Virtual size and format of a would-be parent, and an open handle for its identity. */
export function openParent(parent: string): OpenParent {
  const format = detectFormat(parent);
  if (format === 'qcow2') {
    // opening checks the parent's own chain and guard
    const img = Qcow2Image.open(parent);
    return { format, size: img.virtualSize, file: img.file, close: () => img.close() };
  }
  const file = BlockFile.open(parent, { lock: 'shared' });
  return { format, size: file.size(), file, close: () => file.close() };
}

/** The header of a qcow2 file, read without opening its chain. */
export function readHeader(image: string): Qcow2Header {
  const f = BlockFile.open(image, { lock: 'none' });
  try {
    const size = f.size();
    return parseHeader(image, readHeaderCluster(f, size), size);
  } finally {
    f.close();
  }
}

/** Reads the header of a child (without opening its chain) and resolves its parent. */
export function readChild(child: string): { header: Qcow2Header; parent: string } {
  const header = readHeader(child);
  if (header.backingFile === undefined) {
    throw invalid(
      `${child} has no backing file: it is not a differencing child (it is standalone, as \`qemu-img rebase -b ''\` or a block-stream leaves one); ` +
        "nothing was changed. `disksnap diff children PARENT` releases a parent it was the child of",
      child,
    );
  }
  return { header, parent: resolveBacking(child, header.backingFile) };
}

/** Holds an exclusive lock on an image (QEMU-compatible): nobody else uses it meanwhile. */
export function lockExclusive(p: string): BlockFile {
  return BlockFile.open(p, { write: true, lock: 'exclusive' });
}

/** The new child's shape: its size and cluster size, and the parent name to store in it. */
export interface ChildShape {
  size: number;
  clusterSize: number;
  backingName: string;
}

/**
 * Writes an empty child of `p` at `child` (temporary name, synced, then renamed), recording
 * the parent's identity in its guard. `register` runs first, before the child appears under
 * its name: the registry entry, and the parent made read-only — a chmod, which changes the
 * parent's ctime, so the identity is taken after it.
 */
export async function writeEmptyChild(child: string, parent: string, p: OpenParent, shape: ChildShape, force: boolean, register?: () => void): Promise<ChildInfo> {
  await writeAtomically(child, { force, sync: true }, (tmp) => {
    register?.();
    const guard = toRecord(identify(p.file));
    createQcow2(tmp, { size: shape.size, clusterSize: shape.clusterSize, backingFile: shape.backingName, backingFormat: p.format, guard });
  });
  return { child, parent, parentFormat: p.format, backingName: shape.backingName, virtualSize: shape.size, clusterSize: shape.clusterSize };
}

/** Replaces `child` by a fresh empty child of the same parent, size, cluster size and backing name. */
export async function replaceWithEmpty(child: string, parent: string, header: Qcow2Header): Promise<ChildInfo> {
  const p = openParent(parent);
  try {
    return await writeEmptyChild(child, parent, p, { size: header.size, clusterSize: header.clusterSize, backingName: header.backingFile! }, true);
  } finally {
    p.close();
  }
}

/** The backing name a child at `child` stores for `parent`: relative to the child's directory. */
export function backingNameFor(child: string, parent: string): string {
  return path.relative(path.dirname(path.resolve(child)), path.resolve(parent));
}
