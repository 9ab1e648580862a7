/**
 * Checkpoint trees: named, read-only states of a VM's disk, over differencing disks.
 *
 *   vm.qcow2                       IMAGE: the VM's disk, always at this path (the VM's
 *    │ backing                            configuration never changes); a fresh child
 *    ▼                                    over the node it sits on
 *   vm.qcow2.checkpoints/
 *     tree.json                    names and creation times (the parent links are the qcow2
 *                                  backing names themselves: nothing to get out of step)
 *     journal.json                 the operation in progress, when one is
 *     squash.json                  the nodes a squash still has to delete
 *     .lock                        held (OFD lock) by the disksnap process working on the tree
 *     base.qcow2 ── clean.qcow2 ── tests.qcow2        nodes: ordinary qcow2 children, each
 *                 └ other.qcow2                        backed by its parent node; the first
 *                                                      keeps IMAGE's original backing, if any
 *
 * Operations (library first; the CLI is src/cli/checkpoint.ts):
 *   create IMAGE NAME     IMAGE's file becomes node NAME (a hard link, then a rename of a
 *                         fresh child over IMAGE: nothing is copied)
 *   revert IMAGE NAME     IMAGE becomes a fresh child of NAME; what it held is discarded, or
 *                         with `keep` first made a node of its own (a branch)
 *   delete IMAGE NAME     the node's data is merged into each of its children (only where a
 *                         child stores nothing: checkpoint-merge.ts), each child is rebased
 *                         onto the node's parent, then the node file goes
 *   squash IMAGE FROM TO  deletes FROM .. TO's parent (one delete at a time), so that TO holds
 *                         what the range held
 *
 * Crash safety: each mutating operation first writes journal.json (what it is about to do,
 * with everything a re-run needs that the files would no longer say), then takes steps that
 * are each idempotent and leave every node and IMAGE showing the same bytes at every moment:
 *   - create: link IMAGE -> node; fix the node's backing name (its directory changed); write
 *     a fresh child to a temporary name; rename it over IMAGE (the one step that switches
 *     IMAGE, atomic); registries; tree.json; journal removed.
 *   - revert: the same rename of a fresh child over IMAGE (journal holds IMAGE's old inode, so
 *     a re-run knows whether the rename happened).
 *   - delete: per child, mergeDown (copies only bytes the child already showed), then rebase
 *     (one header write), then re-guard its children; then the node file goes.
 * Every operation starts by finishing a journal left by a killed one (recover()). A crash can
 * leave a temporary file in IMAGE's directory or leaked clusters in a child (qemu-img check
 * reports leaks, never corruption); it never changes what a node or IMAGE shows.
 *
 * Locks: the tree's .lock against other disksnap processes; IMAGE and every file written are
 * opened with QEMU-compatible locks, so a running VM makes these operations fail with ELOCKED
 * (the live forms over QMP are in live.ts and live-delete.ts). A delete whose files are none
 * of QEMU's runs beside the VM; with DeleteHooks (live-delete.ts) a child in QEMU's chain is
 * merged by QEMU's block-stream and the headers of files QEMU holds are written without a
 * lock. A revert while a VM runs IMAGE is refused (the guest's filesystems would change
 * under it).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BlockFile } from '../engine/file';
import { DisksnapError, busy, invalid, fromNodeError } from '../engine/errors';
import { syncDir, writeAtomically } from '../engine/atomic';
import { childrenRegistryPath, readJson, writeJsonAtomic } from '../image/sidecars';
import { createQcow2 } from '../image/qcow2/create';
import { resolveBacking } from '../image/qcow2/header';
import { detectFormat } from '../image';
import { addChild, childrenOf, makeReadOnly, removeChild } from './registry';
import { guardOf, mergeDown, readHeader, refreshGuard, reguardChildren, rewriteBacking, withHeldFile } from './checkpoint-merge';

export interface NodeInfo {
  name: string;
  file: string;
  /** the parent node's name; undefined for a root node */
  parent: string | undefined;
  /** a root node's backing file outside the tree, if any */
  base: string | undefined;
  created: string | undefined;
  /** bytes the node's file takes on disk */
  allocated: number;
  children: string[];
}

export interface TreeInfo {
  image: string;
  dir: string;
  /** the node IMAGE is a child of (undefined: IMAGE has no checkpoints yet) */
  current: string | undefined;
  nodes: NodeInfo[];
  /** bytes IMAGE takes on disk */
  imageAllocated: number;
}

interface TreeFile {
  version: 1;
  nodes: Record<string, { created: string }>;
}

type Journal =
  | { op: 'create'; name: string; imageIno: number; backing: string | undefined }
  | { op: 'revert'; name: string; imageIno: number; from: string | undefined }
  | { op: 'delete'; name: string; parent: string | undefined; children: string[]; live?: boolean };

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,99}$/;

export function treeDir(image: string): string {
  return `${path.resolve(image)}.checkpoints`;
}

export function nodePath(image: string, name: string): string {
  return path.join(treeDir(image), `${name}.qcow2`);
}

function checkName(name: string): void {
  if (!NAME_RE.test(name) || name.endsWith('.qcow2')) {
    throw invalid(`checkpoint name '${name}': use 1-100 letters, digits, '.', '_', '+' or '-', not starting with a punctuation mark`);
  }
}

function readTree(image: string): TreeFile {
  return readJson<TreeFile>(path.join(treeDir(image), 'tree.json')) ?? { version: 1, nodes: {} };
}

function writeTree(image: string, t: TreeFile): void {
  writeJsonAtomic(path.join(treeDir(image), 'tree.json'), t);
}

function journalPath(image: string): string {
  return path.join(treeDir(image), 'journal.json');
}

function sameFile(a: string, b: string): boolean {
  try {
    const x = fs.statSync(a);
    const y = fs.statSync(b);
    return x.ino === y.ino && x.dev === y.dev;
  } catch {
    return false;
  }
}

/** The resolved backing path of a qcow2 file (undefined when it has none). */
export function backingOf(file: string): string | undefined {
  const h = readHeader(file);
  return h.backingFile === undefined ? undefined : path.resolve(resolveBacking(file, h.backingFile));
}

/** Node names in the tree directory (files NAME.qcow2). */
function nodeNames(image: string): string[] {
  const dir = treeDir(image);
  if (!fs.existsSync(dir)) return [];
  return fs
    .readdirSync(dir)
    .filter((f) => f.endsWith('.qcow2') && !f.startsWith('.'))
    .map((f) => f.slice(0, -'.qcow2'.length))
    .sort();
}

function nodeOf(image: string, file: string | undefined): string | undefined {
  if (file === undefined || path.dirname(path.resolve(file)) !== treeDir(image) || !file.endsWith('.qcow2')) return undefined;
  return path.basename(file, '.qcow2');
}

function requireNode(image: string, name: string): string {
  checkName(name);
  const p = nodePath(image, name);
  if (!fs.existsSync(p)) throw new DisksnapError(`${image} has no checkpoint '${name}'`, 'ENOENT', 2, p);
  return p;
}

/** Takes the tree's lock, finishes an interrupted operation, runs fn. */
async function withTree<T>(image: string, fn: () => Promise<T> | T, hooks?: DeleteHooks): Promise<T> {
  const dir = treeDir(image);
  fs.mkdirSync(dir, { recursive: true });
  const lock = BlockFile.open(path.join(dir, '.lock'), { write: true, create: true, lock: 'exclusive' });
  try {
    await recover(image, hooks);
    return await fn();
  } finally {
    lock.close();
  }
}

/** Refuses an IMAGE that is not a qcow2 file disksnap may replace, or that QEMU holds. */
function checkImage(image: string): void {
  if (!fs.existsSync(image)) throw new DisksnapError(`${image} does not exist`, 'ENOENT', 2, image);
  if (detectFormat(image) !== 'qcow2') {
    throw invalid(`${image} is a raw image: a checkpoint replaces IMAGE by a qcow2 child, which a VM configured for raw would misread. Make the VM's disk a qcow2 child first (disksnap diff create ${image} vm.qcow2)`, image);
  }
  const kids = childrenOf(image);
  if (kids.length > 0) throw busy(`${image} has differencing children of its own (${kids.join(', ')}); checkpoints need IMAGE to be a leaf`, image);
}

/**
 * A revert while a VM runs IMAGE is refused: the guest's mounted filesystems would change
 * under it (its page cache and journal describe the old disk). No live form is safe.
 */
function refuseRunning(image: string): void {
  if (!fs.existsSync(image) || !heldElsewhere(image)) return;
  throw new DisksnapError(
    `${image} is in use by a running VM (locked): a revert would change the disk under the guest's mounted filesystems. Stop the VM, revert, then start it again`,
    'ELOCKED',
    undefined,
    image,
  );
}

/** Whether another process (QEMU) holds IMAGE's lock. */
function heldElsewhere(image: string): boolean {
  try {
    lockImage(image).close();
    return false;
  } catch (e) {
    if (e instanceof DisksnapError && e.code === 'ELOCKED') return true;
    throw e;
  }
}

/** Fails with ELOCKED when QEMU (or anyone) uses the file; the returned handle holds the lock. */
function lockImage(image: string): BlockFile {
  return BlockFile.open(image, { write: true, lock: 'exclusive' });
}

/** Writes a fresh, empty qcow2 child of `parent` over IMAGE (atomic rename). */
async function freshChildOver(image: string, parent: string, opts: { guard?: boolean } = {}): Promise<void> {
  const h = readHeader(parent);
  const backingName = path.relative(path.dirname(path.resolve(image)), path.resolve(parent));
  await writeAtomically(image, { force: true, sync: true }, (tmp) => {
    createQcow2(tmp, { size: h.size, clusterSize: h.clusterSize, backingFile: backingName, backingFormat: 'qcow2', guard: opts.guard === false ? undefined : guardOf(parent) });
  });
}

/** Makes a node read-only and registers it with its parent (as `diff create` would). */
function settleNode(node: string): void {
  const parent = backingOf(node);
  if (parent) addChild(parent, node);
  makeReadOnly(node);
}

export interface CreateOptions {
  /**
   * The live path (live.ts): QEMU runs IMAGE, so IMAGE is not locked, the node's backing name
   * is left to QEMU, and this switches the VM to the fresh child, which is in place when it runs.
   */
  live?: (node: string) => Promise<void>;
  /** the live path: run once the node's hard link exists, before the fresh child replaces IMAGE */
  beforeSwitch?: (node: string) => Promise<void>;
}

/** `checkpoint create IMAGE NAME`: what IMAGE shows now becomes node NAME. */
export async function create(image: string, name: string, opts: CreateOptions = {}): Promise<NodeInfo> {
  checkName(name);
  return withTree(image, async () => {
    checkImage(image);
    if (fs.existsSync(nodePath(image, name))) throw new DisksnapError(`${image} already has a checkpoint '${name}'`, 'EEXIST', 17, nodePath(image, name));
    const lock = opts.live ? undefined : lockImage(image);
    try {
      const j: Journal = { op: 'create', name, imageIno: fs.statSync(image).ino, backing: backingOf(image) };
      writeJsonAtomic(journalPath(image), j);
      await runCreate(image, j, { imageHandle: lock, live: opts.live, beforeSwitch: opts.beforeSwitch });
    } finally {
      lock?.close();
    }
    return (await list(image)).nodes.find((n) => n.name === name)!;
  });
}

/** The steps of create, each idempotent (see the opening note). */
async function runCreate(
  image: string,
  j: Extract<Journal, { op: 'create' }>,
  opts: { imageHandle?: BlockFile; live?: (node: string) => Promise<void>; beforeSwitch?: (node: string) => Promise<void> } = {},
): Promise<void> {
  const live = opts.live;
  const node = nodePath(image, j.name);
  const switched = fs.existsSync(node) && !sameFile(node, image) && backingOf(image) === node;
  if (!switched && !live && sameFile(node, image) && heldElsewhere(image)) {
    // a live create killed before the switch: QEMU still runs IMAGE, this very inode (over a
    // protocol node of the link's name, which it never reopens by name). Undone, not finished:
    // finishing would write the node's header under QEMU.
    fs.rmSync(node, { force: true });
    fs.rmSync(journalPath(image), { force: true });
    syncDir(treeDir(image));
    return;
  }
  if (!switched) {
    if (!fs.existsSync(node)) {
      if (fs.statSync(image).ino !== j.imageIno) throw new DisksnapError(`${image} changed while a checkpoint was being made of it; journal ${journalPath(image)} left for inspection`, 'ECORRUPT', undefined, image);
      fs.linkSync(image, node);
      syncDir(treeDir(image));
    }
    // the node's backing name is relative to its new directory
    if (j.backing !== undefined && backingOf(node) !== j.backing && !live) rewriteBacking(node, j.backing, { guard: readHeader(node).guard !== undefined, file: opts.imageHandle });
    if (opts.beforeSwitch) await opts.beforeSwitch(node);
    await freshChildOver(image, node, { guard: !live });
    if (live) await live(node);
  } else if (j.backing !== undefined && backingOf(node) !== j.backing) {
    // a live create killed before QEMU rewrote the node's backing name (ELOCKED while QEMU runs)
    rewriteBacking(node, j.backing, { guard: readHeader(node).guard !== undefined });
  }
  if (j.backing !== undefined) {
    // the node first: a registry never emptied never restores (chmods) the parent's mode
    addChild(j.backing, node);
    removeChild(j.backing, image);
  }
  addChild(node, image);
  makeReadOnly(node);
  // The link and the rename over IMAGE moved the node's ctime, which IMAGE's guard records
  // (a live create leaves the guards to QEMU's files: none on IMAGE, the node is QEMU's).
  if (!live) refreshTreeGuards(image, opts.imageHandle);
  const t = readTree(image);
  t.nodes[j.name] = { created: new Date().toISOString() };
  writeTree(image, t);
  fs.rmSync(journalPath(image), { force: true });
  syncDir(treeDir(image));
}

export interface RevertOptions {
  /** keep what IMAGE holds now as a new node of this name (a branch) */
  keep?: string;
}

/** `checkpoint revert IMAGE NAME`: IMAGE becomes a fresh child of node NAME. */
export async function revert(image: string, name: string, opts: RevertOptions = {}): Promise<TreeInfo> {
  requireNode(image, name);
  refuseRunning(image);
  if (opts.keep !== undefined) {
    checkName(opts.keep);
    const kept = nodePath(image, opts.keep);
    // a re-run after a crash between the two halves finds the branch made already
    if (!(fs.existsSync(kept) && fs.existsSync(image) && backingOf(image) === kept)) await create(image, opts.keep);
  }
  return withTree(image, async () => {
    checkImage(image);
    const lock = lockImage(image);
    try {
      const j: Journal = { op: 'revert', name, imageIno: fs.statSync(image).ino, from: backingOf(image) };
      writeJsonAtomic(journalPath(image), j);
      await runRevert(image, j, lock);
    } finally {
      lock.close();
    }
    return list(image);
  });
}

async function runRevert(image: string, j: Extract<Journal, { op: 'revert' }>, handle?: BlockFile): Promise<void> {
  const node = nodePath(image, j.name);
  if (fs.statSync(image).ino === j.imageIno) await freshChildOver(image, node);
  addChild(node, image);
  if (j.from !== undefined && j.from !== node) removeChild(j.from, image);
  makeReadOnly(node);
  if (j.from !== undefined) makeReadOnly(j.from);
  refreshTreeGuards(image, handle);
  fs.rmSync(journalPath(image), { force: true });
  syncDir(treeDir(image));
}

/**
 * The guards of IMAGE and every node, re-recorded where only their parent's ctime moved (the
 * chmods, links and renames of the step just taken; refreshGuard). `handle`: the caller's
 * locked handle on one of these files (its inode), used instead of opening it again.
 */
function refreshTreeGuards(image: string, handle?: BlockFile, held?: (file: string) => boolean): void {
  const heldIno = handle?.stat().ino;
  const files = [...nodeNames(image).map((n) => nodePath(image, n)), path.resolve(image)].filter((f) => fs.existsSync(f));
  // Parents before children: re-recording a read-only node's guard chmods it for the write,
  // which moves its ctime in turn, for its own children's guards to be refreshed after it.
  const depth = new Map<string, number>();
  const depthOf = (f: string, seen = 0): number => {
    const known = depth.get(f);
    if (known !== undefined) return known;
    const b = backingOf(f);
    const d = b !== undefined && files.includes(b) && seen < files.length ? depthOf(b, seen + 1) + 1 : 0;
    depth.set(f, d);
    return d;
  };
  files.sort((a, b) => depthOf(a) - depthOf(b));
  for (const f of files) {
    const mine = heldIno !== undefined && fs.statSync(f, { bigint: true }).ino === heldIno;
    if (!mine && held?.(f)) {
      // a file a running QEMU holds: only a stale guard is rewritten, without a lock
      const h = readHeader(f);
      if (h.guard !== undefined && h.backingFile !== undefined) withHeldFile(f, (file) => refreshGuard(f, { file }));
    } else refreshGuard(f, { file: mine ? handle : undefined });
  }
}

/** Every file whose backing is `node`: the nodes of the tree and IMAGE. */
function childrenInTree(image: string, node: string): string[] {
  const out: string[] = [];
  for (const n of nodeNames(image)) {
    const p = nodePath(image, n);
    if (p !== node && backingOf(p) === node) out.push(p);
  }
  if (fs.existsSync(image) && backingOf(image) === node) out.push(path.resolve(image));
  return out;
}

export interface DeleteResult {
  name: string;
  /** the files the node was merged into, rebased onto its parent */
  mergedInto: string[];
  bytesCopied: number;
  /** of mergedInto, the files a running QEMU merged itself (block-stream; live-delete.ts) */
  streamed: string[];
  /** an interrupted delete of this node was finished */
  resumed?: boolean;
}

/**
 * The live delete's part (live-delete.ts): the files a running QEMU holds, and QEMU's block
 * job for the one of them that is a child of the node.
 */
export interface DeleteHooks {
  /** whether a running QEMU holds the file (it is in its chain) */
  held(file: string): boolean;
  /** QEMU merges `node` into `child` (block-stream) and rebases it onto `parent` */
  stream(child: string, node: string, parent: string | undefined): Promise<void>;
  /** throws unless QEMU no longer references the node's file (called before it is deleted) */
  release(node: string): Promise<void>;
}

/** `checkpoint delete IMAGE NAME`: removes a node, leaf or inner; no other view changes. */
export async function remove(image: string, name: string, opts: { hooks?: DeleteHooks } = {}): Promise<DeleteResult> {
  const node = requireNode(image, name);
  const hooks = opts.hooks;
  const pending = readJson<Journal>(journalPath(image));
  return withTree(
    image,
    () => {
      // a re-run of a delete that was interrupted: finishing its journal was the delete
      if (pending?.op === 'delete' && pending.name === name && !fs.existsSync(node)) return { name, mergedInto: pending.children, bytesCopied: 0, streamed: [], resumed: true };
      requireNode(image, name);
      const children = childrenInTree(image, node);
      // every file the delete will write must be free now (a running VM: ELOCKED before the
      // journal), except what the live path has QEMU write
      for (const c of children) for (const f of [c, ...childrenOf(c)]) if (!hooks?.held(f)) BlockFile.open(f, { write: true, lock: 'exclusive' }).close();
      const j: Journal = { op: 'delete', name, parent: backingOf(node), children, live: children.some((c) => hooks?.held(c)) || undefined };
      writeJsonAtomic(journalPath(image), j);
      return runDelete(image, j, hooks);
    },
    hooks,
  );
}

/**
 * The steps of delete, each idempotent. A child a running QEMU holds is merged by QEMU
 * (hooks.stream), first: a failed job stops the delete before anything else changed; the
 * journal stays for a re-run. Its header and its children's are written without a lock.
 */
async function runDelete(image: string, j: Extract<Journal, { op: 'delete' }>, hooks?: DeleteHooks): Promise<DeleteResult> {
  const node = nodePath(image, j.name);
  const held = (f: string) => hooks?.held(f) ?? false;
  let copied = 0;
  const streamed: string[] = [];
  const order = [...j.children].sort((a, b) => Number(held(b)) - Number(held(a)));
  for (const c of order) {
    if (!fs.existsSync(c)) continue;
    const live = held(c);
    if (fs.existsSync(node) && backingOf(c) === node) {
      if (live) {
        await hooks!.stream(c, node, j.parent);
        streamed.push(c);
      } else {
        copied += mergeDown(node, c).copied;
        rewriteBacking(c, j.parent);
      }
    }
    // QEMU wrote the backing name and kept the guard of the node: the new parent's guard (also
    // on a re-run after the VM stopped, when QEMU had finished the job)
    if (j.live && backingOf(c) === j.parent) {
      const g = readHeader(c).guard !== undefined;
      if (live) withHeldFile(c, (f) => rewriteBacking(c, j.parent, { guard: g, file: f }));
      else rewriteBacking(c, j.parent, { guard: g });
    }
    reguardChildren(c, held);
    if (j.parent !== undefined) addChild(j.parent, c);
  }
  if (fs.existsSync(node)) {
    if (j.parent !== undefined) removeChild(j.parent, node);
    if (hooks) await hooks.release(node);
    fs.rmSync(childrenRegistryPath(node), { force: true });
    fs.unlinkSync(node);
  }
  for (const c of j.children) if (c !== path.resolve(image) && fs.existsSync(c)) makeReadOnly(c);
  if (j.parent !== undefined && fs.existsSync(j.parent) && childrenOf(j.parent).length > 0) makeReadOnly(j.parent);
  refreshTreeGuards(image, undefined, held);
  const t = readTree(image);
  delete t.nodes[j.name];
  writeTree(image, t);
  fs.rmSync(journalPath(image), { force: true });
  syncDir(treeDir(image));
  return { name: j.name, mergedInto: j.children, bytesCopied: copied, streamed };
}

/**
 * `checkpoint squash IMAGE FROM TO`: FROM must be TO or one of its ancestors; every node from
 * FROM up to TO's parent is deleted (merged downward), so TO alone holds the range.
 */
export async function squash(image: string, from: string, to: string): Promise<{ deleted: string[] }> {
  requireNode(image, from);
  requireNode(image, to);
  const range: string[] = [];
  if (from === to) return { deleted: [] };
  for (let cur = backingOf(nodePath(image, to)); ; ) {
    const n = nodeOf(image, cur);
    if (n === undefined || cur === undefined) throw invalid(`'${from}' is not an ancestor of '${to}' in ${image}'s checkpoints`);
    range.unshift(n);
    if (n === from) break;
    cur = backingOf(cur);
  }
  writeJsonAtomic(path.join(treeDir(image), 'squash.json'), { queue: range });
  await finishSquash(image);
  return { deleted: range };
}

async function finishSquash(image: string): Promise<void> {
  const file = path.join(treeDir(image), 'squash.json');
  const s = readJson<{ queue: string[] }>(file);
  if (!s) return;
  for (const n of s.queue) if (fs.existsSync(nodePath(image, n))) await remove(image, n);
  fs.rmSync(file, { force: true });
}

/** Finishes an operation a killed process left in journal.json (tree lock held). */
async function recover(image: string, hooks?: DeleteHooks): Promise<void> {
  const j = readJson<Journal>(journalPath(image));
  if (!j) return;
  if (j.op === 'create') await runCreate(image, j);
  else if (j.op === 'revert') await runRevert(image, j);
  else if (j.op === 'delete') await runDelete(image, j, hooks);
  else throw new DisksnapError(`${journalPath(image)}: unknown operation ${(j as { op: string }).op}`, 'ECORRUPT', undefined, journalPath(image));
}

/** Re-runs whatever a killed create/revert/delete/squash left unfinished. */
export async function resume(image: string): Promise<void> {
  await withTree(image, () => undefined);
  await finishSquash(image);
}

function allocated(file: string): number {
  try {
    return fs.statSync(file).blocks * 512;
  } catch (e) {
    throw fromNodeError(e, file);
  }
}

/** `checkpoint list IMAGE`: the tree, read from the nodes' backing links. */
export async function list(image: string): Promise<TreeInfo> {
  const t = readTree(image);
  const names = nodeNames(image);
  const parents = new Map<string, string | undefined>();
  const nodes: NodeInfo[] = names.map((name) => {
    const file = nodePath(image, name);
    const b = backingOf(file);
    const parent = nodeOf(image, b);
    parents.set(name, parent);
    return { name, file, parent, base: parent === undefined ? b : undefined, created: t.nodes[name]?.created, allocated: allocated(file), children: [] };
  });
  for (const n of nodes) if (n.parent) nodes.find((m) => m.name === n.parent)?.children.push(n.name);
  const current = fs.existsSync(image) && detectFormat(image) === 'qcow2' ? nodeOf(image, backingOf(image)) : undefined;
  return { image: path.resolve(image), dir: treeDir(image), current, nodes, imageAllocated: fs.existsSync(image) ? allocated(image) : 0 };
}

export { runCreate as runCreateSteps, journalPath, checkName, checkImage, withTree };
export type { Journal };
