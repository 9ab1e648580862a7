/**
 * `diff accept-parent`: records the parent as it is now in the child's parent guard (after a
 * deliberate change, or for a child made by qemu-img), like `qemu-img rebase -u`, and registers
 * the child with its parent. The guard itself (what is recorded, how a change is found) lives
 * with the format, in src/image/qcow2/guard.ts; this module only rewrites it.
 *
 * The rewrite touches cluster 0 only: in place when a guard of the same size is there (one
 * small write), else the extension area is rebuilt with every other extension kept and the
 * cluster written whole, header fields unchanged (as QEMU rewrites its header). Either is one
 * write followed by an fdatasync; a crash inside the rebuild's write is the one window in
 * which the extension area could be torn, the same window QEMU's header updates have.
 */
import { BlockFile } from '../engine/file';
import { DisksnapError, invalid } from '../engine/errors';
import { Qcow2Image } from '../image/qcow2/image';
import { readHeaderCluster } from '../image/qcow2/header';
import { EXT_PARENT_GUARD, GUARD_LAYOUT, HEADER_V2_LENGTH, parseHeader, Qcow2Header, MAX_BACKING_NAME } from '../image/qcow2/format';
import { encodeTail, extensionsSize } from '../image/qcow2/encode';
import { identify, toRecord } from '../image/qcow2/guard';
import { addChild } from './registry';
import { assertNotAttached } from './attached';
import { openParent } from './child';

export interface AcceptParentResult {
  child: string;
  parent: string;
  /** what the guard said before: 'ok', 'unrecorded' or 'changed: ...' */
  before: string;
}

/**
 * Records the parent as it is now in the child's guard (like `qemu-img rebase -u`), and
 * registers the child with its parent (adopting a child made by qemu-img).
 */
export function acceptParent(child: string): AcceptParentResult {
  assertNotAttached(child, 'rewrite the header of');
  // what the guard says now (this also proves the chain below opens)
  const probe = Qcow2Image.open(child, { ignoreParentGuard: true, l2CacheEntries: 1, refcountCacheEntries: 1 });
  const before = probe.guardState ?? 'unrecorded';
  const parent = probe.backingPath;
  probe.close();
  if (parent === undefined) throw invalid(`${child} has no backing file: it is not a differencing child`, child);
  // registered first: making the parent read-only changes its ctime, which the guard records
  addChild(parent, child);
  const p = openParent(parent);
  let guard: Guard;
  try {
    guard = toRecord(identify(p.file));
  } finally {
    p.close();
  }
  const f = BlockFile.open(child, { write: true });
  try {
    const size = f.size();
    const cluster0 = readHeaderCluster(f, size);
    rewriteGuard(child, f, cluster0, parseHeader(child, cluster0, size), guard);
  } finally {
    f.close();
  }
  return { child, parent, before };
}

type Guard = ReturnType<typeof toRecord>;

/** Rewrites the extension area of cluster 0 with a new guard, keeping every other extension. */
function rewriteGuard(child: string, f: BlockFile, cluster0: Buffer, h: Qcow2Header, guard: Guard): void {
  const cs = h.clusterSize;
  const existing = h.extensions.findIndex((e) => e.type === EXT_PARENT_GUARD);
  const g = Buffer.alloc(GUARD_LAYOUT.span);
  GUARD_LAYOUT.encode(guard, g, 0);
  if (h.version === 3 && h.headerLength >= 104 && existing >= 0 && h.extensions[existing].data.length === g.length) {
    // same size: overwrite the payload in place (one small write)
    let pos = h.headerLength;
    for (let i = 0; i < existing; i++) pos += 8 + Math.ceil(h.extensions[i].data.length / 8) * 8;
    f.writeSync(g, pos + 8);
    f.syncSync(true);
    return;
  }
  // rebuild: header fields as they are, extensions + ours, end, backing name
  const start = h.version === 2 ? HEADER_V2_LENGTH : h.headerLength;
  const exts = h.extensions.filter((e) => e.type !== EXT_PARENT_GUARD);
  exts.push({ type: EXT_PARENT_GUARD, data: g });
  const name = Buffer.from(h.backingFile ?? '', 'utf8');
  if (start + extensionsSize(exts) + name.length > cs || name.length > MAX_BACKING_NAME) {
    throw new DisksnapError(`${child}: no room in the header cluster for the parent guard (cluster size ${cs})`, 'EUNSUPPORTED', undefined, child);
  }
  const out = Buffer.from(cluster0.subarray(0, cs));
  out.fill(0, start);
  encodeTail(out, start, exts, name);
  f.writeSync(out, 0);
  f.syncSync(true);
}
