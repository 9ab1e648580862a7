/**
 * Live operations on an image a running QEMU uses, over its QMP socket (src/host/qmp.ts):
 *
 * createLive(IMAGE, NAME)      a checkpoint without stopping the VM
 *   1. journal; hard link IMAGE -> IMAGE.checkpoints/NAME.qcow2 (QEMU keeps writing that inode)
 *   2. QEMU's node for IMAGE (the active layer, still read-write) is moved onto a protocol
 *      node opened by the node's path (blockdev-add, blockdev-reopen with a new `file`, the old
 *      protocol node deleted): the same inode under a name that will keep naming it. This
 *      must come BEFORE anything is renamed over IMAGE: QEMU's file driver reopens a file by
 *      its name whenever a node's permissions change (step 4 drops the old top's write
 *      permission), and a name that names another file by then gives the node that file, its
 *      L2 tables read from the new overlay (issue #16: two live checkpoints in a row lost
 *      writes that way). The new protocol node takes no locks (locking=off) until step 5: the
 *      old one holds QEMU's write lock on the inode, so a locking one would conflict; IMAGE's
 *      inode is unlocked for the moment in between. blockdev-reopen is allowed for named
 *      nodes only: an unnamed node is refused before step 1. The VM is paused (QMP stop/cont,
 *      ~10 ms) from the new protocol node's open to the reopen: QEMU 7.2 learns a file's
 *      length only at open and from the node's own writes, so a cluster the guest appended
 *      through the old node in between read back as zeros through the new one (see
 *      moveNodeToPath). A resume guard process sends the `cont` if disksnap dies meanwhile.
 *   3. a fresh overlay, backing name -> the node, written under a temporary name and renamed
 *      over IMAGE (QEMU does not use it yet: IMAGE shows the node, which is what the VM sees)
 *   4. blockdev-snapshot-sync mode=existing: QEMU opens the overlay at IMAGE's path and makes
 *      it the active layer over the node; from here the node no longer changes
 *   5. the node is reopened read-only over another protocol node of its path, a locking one
 *      (QEMU flushes its metadata and never writes it again)
 *   6. the node's backing name is rewritten by disksnap (its directory changed): QEMU holds
 *      it as a read-only backing node now and never writes its header; QEMU's in-memory copy
 *      of the old name is only used if QEMU itself rewrites that header (it does not for a
 *      read-only node); registries, tree.json, journal removed
 *   A node a block job uses (its edges in QEMU's block graph) is refused before step 1: QEMU
 *   refuses to switch it, and the moves would disturb the job. If step 2 fails, the link and
 *   the journal are removed: nothing changed. If step 4 fails,
 *   the node is renamed back over IMAGE (the VM never stopped writing to that inode, and
 *   IMAGE is again the file it runs on) and QEMU's node is moved onto a protocol node of
 *   IMAGE's name again (best effort). The overlay carries no parent guard (the
 *   node was still changing when it was made; a guard written later would be dropped by
 *   QEMU's own header updates), so disksnap reports its guard as 'unrecorded'.
 *
 * commitLive(CHILD)            `diff commit` while the VM runs on CHILD
 *   block-commit of the active layer into its parent, wait for BLOCK_JOB_READY, job-complete:
 *   QEMU pivots the VM onto the parent, then CHILD is deleted. The commit marker of the offline
 *   commit is written first: if the job fails (the parent's filesystem full, an I/O error), the
 *   VM keeps running on CHILD (QEMU leaves the active layer in place; the parent may hold part
 *   of CHILD's data, which CHILD covers) and the marker makes `disksnap diff commit CHILD`
 *   finish the job later, live again or after the VM stopped.
 *
 * `checkpoint delete` while the VM runs is live-delete.ts (block-stream); finding QEMU's QMP
 * socket without --qmp is src/host/qmp-find.ts (used by the CLI).
 *
 * Errors: EJOB when QEMU's block job fails (QEMU's message included), ENOTFOUND when no device
 * of that QEMU runs the image, plus the QMP client's EQMP / ETIMEDOUT / ECONNRESET.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { DisksnapError, busy } from '../engine/errors';
import { syncDir } from '../engine/atomic';
import { backingNode, blockGraph, BlockGraph, childNode, namedNodes, QmpClient } from '../host/qmp';
import { jobFailure, runCommitJob } from '../host/qmp-job';
import { VmPauser } from '../host/qmp-pause';
import { commitMarkerPath, writeJsonAtomic } from '../image/sidecars';
import { childrenOf, readRegistry, removeChild, makeReadOnly } from './registry';
import * as cp from './checkpoint';
import { readHeader, rewriteBacking } from './checkpoint-merge';
import { BlockFile } from '../engine/file';

export type Progress = (done: number, total: number) => void;

export interface LiveOptions {
  /** QEMU's QMP socket (unix) */
  qmp: string;
  /** for each QMP command; jobs wait as long as they make progress (default 60 s) */
  timeoutMs?: number;
  onProgress?: Progress;
}

interface BlockDevice {
  device: string;
  qdev?: string;
  inserted?: { 'node-name': string; file: string; drv: string };
}

function real(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch {
    return path.resolve(p);
  }
}

/**
 * The file a QEMU filename names: QEMU reports `json:{...}` when an image's backing name and
 * its backing node's filename disagree (after a live checkpoint: QEMU never learns that the
 * old top was renamed into the tree); the image's own file is then json.file.filename.
 */
export function fileOf(qemuName: string): string {
  if (!qemuName.startsWith('json:')) return qemuName;
  try {
    const j = JSON.parse(qemuName.slice(5)) as { file?: { filename?: string } };
    return j.file?.filename ?? qemuName;
  } catch {
    return qemuName; // not JSON after all: compare the name as it is
  }
}

/** The active (top) node of the device that runs `image`. */
export async function activeNode(qmp: QmpClient, image: string): Promise<{ node: string; device: string }> {
  const devs = await qmp.execute<BlockDevice[]>('query-block');
  const want = real(image);
  for (const d of devs) {
    if (d.inserted && real(fileOf(d.inserted.file)) === want) return { node: d.inserted['node-name'], device: d.device || d.qdev || d.inserted['node-name'] };
  }
  throw new DisksnapError(`no device of the QEMU at ${qmp.socketPath} runs ${image} (it runs: ${devs.map((d) => d.inserted?.file ?? '-').join(', ')})`, 'ENOTFOUND', undefined, image);
}

/** `checkpoint create --qmp`: see the opening note. */
export async function createLive(image: string, name: string, opts: LiveOptions): Promise<cp.NodeInfo> {
  const qmp = await QmpClient.connect(opts.qmp, { timeoutMs: opts.timeoutMs ?? 60_000 });
  let pause: VmPauser | undefined;
  try {
    const { node: top } = await activeNode(qmp, image);
    if (top.startsWith('#')) {
      throw new DisksnapError(
        `${image} is open in QEMU without a node name (${top}); a live checkpoint must reopen it under its new path, which QEMU allows only for named nodes: configure the disk with -blockdev ...,node-name=NAME (libvirt does) or -drive ...,node-name=NAME,file.node-name=NAME2`,
        'EUNSUPPORTED',
        undefined,
        image,
      );
    }
    const jobs = jobsOn(await blockGraph(qmp), top);
    if (jobs.length > 0) {
      // QEMU refuses to switch a node a block job uses, and the moves before the switch would
      // disturb the job (a paused and resumed stream ran past its speed limit and ended)
      throw busy(`QEMU runs block job(s) ${jobs.join(', ')} on ${image}'s node ${top}: a live checkpoint waits for none. Retry once the job ended (QMP query-jobs); nothing changed`, image);
    }
    pause = new VmPauser(qmp).prepare(); // its guard starts while the node is linked
    const overlayNode = `ds-${name.replace(/[^A-Za-z0-9_-]/g, '_').slice(0, 20)}-${randomBytes(3).toString('hex')}`;
    const backing = cp.backingOf(image);
    return await cp.create(image, name, {
      // step 2 of the opening note, before anything is renamed over IMAGE
      beforeSwitch: async (nodeFile) => {
        try {
          await moveNodeToPath(qmp, top, nodeFile, { readOnly: false, locking: false, pause });
        } catch (e) {
          // QEMU still runs IMAGE on its old protocol node: drop the link, nothing changed
          fs.rmSync(nodeFile, { force: true });
          syncDir(path.dirname(path.resolve(nodeFile)));
          fs.rmSync(cp.journalPath(image), { force: true });
          throw e;
        }
      },
      live: async (nodeFile) => {
        try {
          await qmp.execute('blockdev-snapshot-sync', {
            'node-name': top,
            'snapshot-file': path.resolve(image),
            'snapshot-node-name': overlayNode,
            format: 'qcow2',
            mode: 'existing',
          });
        } catch (e) {
          // the VM still writes the node's inode: give it back its name (a link renamed over
          // IMAGE, so that the node's path, which QEMU's protocol node names, stays until QEMU
          // is moved back onto IMAGE's name; best effort: the VM runs either way)
          const undo = `${path.resolve(image)}.ds-undo-${randomBytes(3).toString('hex')}`;
          fs.linkSync(nodeFile, undo);
          fs.renameSync(undo, image);
          syncDir(path.dirname(path.resolve(image)));
          await moveNodeToPath(qmp, top, path.resolve(image), { readOnly: false, locking: true, pause }).catch(() => undefined);
          fs.rmSync(nodeFile, { force: true });
          syncDir(path.dirname(path.resolve(nodeFile)));
          fs.rmSync(cp.journalPath(image), { force: true });
          throw e;
        }
        // read-only, over a protocol node that locks the file again (shared reads): QEMU
        // flushes the node's metadata now and never writes it again
        await moveNodeToPath(qmp, top, nodeFile, { readOnly: true, locking: true });
        if (backing !== undefined) {
          // The node is now a read-only backing node, which QEMU never writes: disksnap fixes
          // its backing name itself, without a lock. (QMP change-backing-file is not used: it
          // stamps the node's own format, qcow2, as the backing format, wrong for a raw base,
          // and it fails with a "write" lock error when the image is a -drive.)
          const f = BlockFile.open(nodeFile, { write: true, lock: 'none' });
          try {
            rewriteBacking(nodeFile, backing, { guard: readHeader(nodeFile).guard !== undefined, file: f });
          } finally {
            f.close();
          }
        }
      },
    });
  } finally {
    await pause?.close();
    qmp.close();
  }
}

/** The block jobs in QEMU's graph that use `top` or its protocol node (file child). */
function jobsOn(g: BlockGraph, top: string): string[] {
  const topId = g.nodes.find((n) => n.name === top)?.id;
  const fileId = g.edges.find((e) => e.parent === topId && e.name === 'file')?.child;
  const used = new Set([topId, fileId].filter((x): x is number => x !== undefined));
  return g.nodes.filter((n) => n.type === 'block-job' && g.edges.some((e) => e.parent === n.id && used.has(e.child))).map((n) => n.name);
}

/**
 * Puts QEMU's node `top` (qcow2) over a new protocol node opened by `file` (a hard link of,
 * or the very name of, the file it runs on) and deletes the old protocol node. The reason:
 * QEMU's file driver reopens its file BY NAME whenever a node's permissions change (e.g.
 * read-write -> read-only when blockdev-snapshot-sync makes the node a backing node), and a
 * name that names another file by then silently gives the node that other file: its L2 tables
 * read from the new overlay, clusters the VM wrote looking unallocated (issue #16).
 * `locking: false` while `top` is still read-write: the old protocol node holds QEMU's write
 * lock on the same inode until the reopen drops it, so a second locking node would conflict.
 *
 * `pause` (the node is the one the VM writes): the VM is paused (host/qmp-pause.ts) from the
 * new node's open to the reopen. QEMU's file driver learns a file's length when it opens it
 * and afterwards only from its own writes (QEMU 7.2; 8.1 also refreshes it on reopen): a
 * cluster the guest appends through the old node in between lies past what the new node
 * believes is the end, and reads of it return zeros until the new node itself writes further
 * out. A checkpoint taken while the guest appended lost the end of a file that way (the new
 * top's copy-on-write read the cluster from the node as zeros). The pause lasts two QMP round
 * trips; a VM the user had paused stays paused. Writers that are not the VM's devices (a block
 * export) are not paused: a length still short after the reopen is retried on a fresh node.
 */
async function moveNodeToPath(qmp: QmpClient, top: string, file: string, opts: { readOnly: boolean; locking: boolean; pause?: VmPauser }): Promise<void> {
  const oldFile = await childNode(qmp, top, 'file');
  const backing = (await childNode(qmp, top, 'backing')) ?? null;
  let prev = oldFile;
  for (let attempt = 1; ; attempt++) {
    const fileNode = `dsf-${randomBytes(4).toString('hex')}`;
    const move = async () => {
      // not read-only itself (auto-read-only): a later live commit into the node reopens it read-write
      await qmp.execute('blockdev-add', { driver: 'file', 'node-name': fileNode, filename: file, 'auto-read-only': true, locking: opts.locking ? 'auto' : 'off' });
      try {
        await qmp.execute('blockdev-reopen', { options: [{ driver: 'qcow2', 'node-name': top, file: fileNode, backing, 'read-only': opts.readOnly }] });
      } catch (e) {
        await qmp.execute('blockdev-del', { 'node-name': fileNode }).catch(() => undefined); // unused: QEMU refused the reopen
        throw e;
      }
      return (await nodeLength(qmp, fileNode)) < fs.statSync(file).size;
    };
    const short = opts.pause ? await opts.pause.run(move) : await move();
    // the old protocol node has no user left; QEMU refuses to delete one it created itself
    // (-drive), which then only holds a descriptor (and no lock) of the same file
    if (prev) await qmp.execute('blockdev-del', { 'node-name': prev }).catch(() => undefined);
    prev = fileNode;
    if (!short) return;
    if (attempt === 5) {
      throw busy(`the file under QEMU's node ${top} kept growing through another writer (a block export?) while disksnap moved the node onto ${file}; stop that writer and retry`, file);
    }
  }
}

/** The length QEMU believes the file under protocol node `node` has (what its reads stop at). */
async function nodeLength(qmp: QmpClient, node: string): Promise<number> {
  const named = await namedNodes<{ 'node-name': string; image: { 'virtual-size': number } }>(qmp);
  const n = named.find((x) => x['node-name'] === node);
  if (!n) throw new DisksnapError(`QEMU has no node ${node} right after adding it`, 'EQMP', undefined, qmp.socketPath);
  return n.image['virtual-size'];
}

export interface LiveCommitResult {
  child: string;
  parent: string;
  /** the node QEMU runs the device on now */
  activeNode: string;
  ms: number;
}

/** `diff commit --qmp`: see the opening note. */
export async function commitLive(child: string, opts: LiveOptions & { allowSiblingChange?: boolean }): Promise<LiveCommitResult> {
  const started = Date.now();
  const h = readHeader(child);
  if (h.backingFile === undefined) throw new DisksnapError(`${child} has no backing file: nothing to commit into`, 'EINVALID', undefined, child);
  const parent = cp.backingOf(child)!;
  const siblings = childrenOf(parent).filter((c) => real(c) !== real(child));
  if (siblings.length > 0 && !opts.allowSiblingChange) throw busy(`${parent} has other children (${siblings.join(', ')}); committing would change what they show. Roll them back first, or pass --allow-sibling-change`, parent);
  if (childrenOf(child).length > 0) throw busy(`${child} has children of its own; committing would change their parent`, child);
  const qmp = await QmpClient.connect(opts.qmp, { timeoutMs: opts.timeoutMs ?? 60_000 });
  try {
    const { node: top } = await activeNode(qmp, child);
    const base = await backingNode(qmp, top);
    const markerPath = commitMarkerPath(child);
    const parentMode = fs.statSync(parent).mode & 0o7777;
    writeJsonAtomic(markerPath, { version: 1, parent: path.resolve(parent), keepChild: false, startedAt: new Date().toISOString(), parentMode });
    if (!(parentMode & 0o200)) fs.chmodSync(parent, parentMode | 0o200);
    const e = await runCommitJob(qmp, `disksnap-commit-${randomBytes(3).toString('hex')}`, top, base, opts);
    const why = jobFailure(e);
    if (why !== undefined) {
      if (!(parentMode & 0o200)) fs.chmodSync(parent, parentMode);
      throw new DisksnapError(
        `live commit of ${child} into ${parent} failed: ${why}. The VM still runs on ${child}; finish with 'disksnap diff commit ${child}' (live with --qmp, or after the VM stops)`,
        'EJOB',
        undefined,
        child,
      );
    }
    const now = await activeNode(qmp, parent);
    fs.unlinkSync(child);
    syncDir(path.dirname(path.resolve(child)));
    const hadRegistry = readRegistry(parent) !== undefined;
    const remaining = removeChild(parent, child);
    if (remaining.length > 0) makeReadOnly(parent);
    else if (!hadRegistry) fs.chmodSync(parent, parentMode);
    fs.rmSync(markerPath, { force: true });
    syncDir(path.dirname(path.resolve(child)));
    return { child, parent, activeNode: now.node, ms: Date.now() - started };
  } finally {
    qmp.close();
  }
}

