/**
 * `checkpoint delete IMAGE NAME --qmp SOCKET` while a QEMU runs IMAGE (the offline delete is
 * in checkpoint.ts; the other live operations in live.ts).
 *
 * QEMU's chain for IMAGE is read from its block graph (the device's active node, then the
 * `backing` edges), each node matched to a file by device and inode. Then:
 *
 *   NAME not in the chain (a branch)   the offline delete, as when no VM runs: none of the
 *                                      files it writes is QEMU's (a guard on a file QEMU
 *                                      holds that only moved by a chmod is rewritten without
 *                                      a lock, see below)
 *   NAME in the chain, above it A      QEMU merges NAME into A itself: block-stream on A's
 *   (IMAGE or the next node up)        node with base-node = NAME's parent's node (no base
 *                                      when NAME is the root), backing-file = the parent's
 *                                      name relative to A: what A shows never changes (the
 *                                      job copies only what A does not store, then QEMU drops
 *                                      NAME from the chain). An inner A is opened read-write
 *                                      for the job (made writable for it) and read-only after.
 *                                      NAME's other children get the offline merge.
 *
 * block-commit is not used: it would write NAME's data into NAME's parent, another checkpoint
 * whose view (and its other children's) must not change; streaming into the child is the
 * live form of the offline merge (mergeDown).
 *
 * After the job, QEMU has written A's backing name but kept its parent guard (an extension
 * QEMU carries unread), which still describes NAME: disksnap rewrites A's header (the backing
 * name and the guard of the new parent) without a lock, as live.ts does for a node's backing
 * name. Only the header cluster's backing name and extensions change, fields QEMU does not
 * write while it runs. The guards of A's own children (in QEMU's chain too) the same way.
 *
 * NAME's file goes last, and only when query-named-block-nodes shows no node on it any more
 * (nodes left only because the monitor owns them, as a live checkpoint's protocol node or a
 * -blockdev node, are removed with blockdev-del first; if QEMU refuses, the file stays).
 *
 * Crash and failure safety: the delete's journal (checkpoint.ts) is written first, marked
 * live. A failed job (EJOB with QEMU's message: a full filesystem, an I/O error, a cancel)
 * leaves A over NAME as before (QEMU changes the chain only when the job completes; what it
 * copied is what A showed anyway), so the VM runs on a valid chain and no file it uses is
 * deleted; the journal stays and a re-run (`checkpoint delete IMAGE NAME --qmp`, or any
 * checkpoint command once the VM stopped) finishes the delete. A run killed while QEMU's job
 * runs: the job goes on in QEMU; the re-run waits for it (job ids disksnap-delete-*).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { DisksnapError, busy } from '../engine/errors';
import { blockGraph, graphChild, namedNodes, QmpClient, QmpEvent } from '../host/qmp';
import * as cp from './checkpoint';
import { activeNode, fileOf, LiveOptions } from './live';
import { cancelJob, jobFailure, waitJob } from '../host/qmp-job';

interface ChainNode {
  node: string;
  file: string;
  key: string | undefined;
}

interface NamedNode {
  'node-name': string;
  file: string;
  drv: string;
}

/** A file's identity (device and inode); undefined when it does not exist. */
function keyOf(file: string | undefined): string | undefined {
  if (file === undefined) return undefined;
  try {
    const s = fs.statSync(file);
    return `${s.dev}:${s.ino}`;
  } catch {
    return undefined;
  }
}

/** QEMU's chain for IMAGE, top (the active node) first. */
async function qemuChain(qmp: QmpClient, image: string): Promise<ChainNode[]> {
  const { node: top } = await activeNode(qmp, image);
  const named = await namedNodes<NamedNode>(qmp);
  const g = await blockGraph(qmp);
  const out: ChainNode[] = [];
  const seen = new Set<string>();
  for (let cur: string | undefined = top; cur !== undefined && !seen.has(cur); ) {
    seen.add(cur);
    const n = named.find((x) => x['node-name'] === cur);
    const file = n ? fileOf(n.file) : '';
    out.push({ node: cur, file, key: keyOf(file) });
    cur = graphChild(g, cur, 'backing');
  }
  return out;
}

export interface LiveDeleteResult extends cp.DeleteResult {
  /** the QMP socket used */
  qmp: string;
  /** whether NAME was in QEMU's chain (else the offline delete ran beside the VM) */
  inQemuChain: boolean;
  ms: number;
}

type Job = { id: string; type: string; status: string };

/** Waits for (and dismisses) a delete job a killed run left running in QEMU. */
async function settleOldJobs(qmp: QmpClient, opts: LiveOptions): Promise<void> {
  const jobs = await qmp.execute<Job[]>('query-jobs');
  for (const j of jobs.filter((x) => x.id.startsWith('disksnap-delete-'))) {
    if (j.status !== 'concluded' && j.status !== 'null') {
      await waitJob(qmp, j.id, 0, 'done', opts).catch(async (e: unknown) => {
        // the job ended before this connection saw its event: query-jobs says so
        const now = (await qmp.execute<Job[]>('query-jobs')).find((x) => x.id === j.id);
        if (now && now.status !== 'concluded') throw e;
      });
    }
    await qmp.execute('job-dismiss', { id: j.id }).catch(() => undefined); // gone already
  }
}

async function stream(qmp: QmpClient, image: string, child: string, node: string, parent: string | undefined, opts: LiveOptions): Promise<void> {
  const chain = await qemuChain(qmp, image);
  const i = chain.findIndex((x) => x.key !== undefined && x.key === keyOf(child));
  if (i < 0) throw new DisksnapError(`${child} is not in the chain the QEMU at ${qmp.socketPath} runs for ${image}`, 'ENOTFOUND', undefined, child);
  const below = chain[i + 1];
  const parentKey = keyOf(parent);
  if (below?.key !== keyOf(node)) {
    // a killed run whose job QEMU finished: the chain already skips the node
    if ((below === undefined && parent === undefined) || (below !== undefined && below.key === parentKey)) return;
    throw new DisksnapError(`QEMU's chain under ${child} (${below?.file ?? 'none'}) is not ${node}: the tree and the running VM disagree; nothing changed`, 'ECORRUPT', undefined, child);
  }
  const base = chain[i + 2];
  if ((base === undefined) !== (parent === undefined) || (base !== undefined && base.key !== parentKey)) {
    throw new DisksnapError(`QEMU's chain under ${node} (${base?.file ?? 'none'}) is not its parent ${parent ?? '(none)'}; nothing changed`, 'ECORRUPT', undefined, node);
  }
  const mode = fs.statSync(child).mode & 0o7777;
  if (!(mode & 0o200)) fs.chmodSync(child, mode | 0o200);
  const jobId = `disksnap-delete-${randomBytes(3).toString('hex')}`;
  try {
    const seq = qmp.eventSeq;
    const args: Record<string, unknown> = { 'job-id': jobId, device: chain[i].node, 'auto-dismiss': false };
    if (base !== undefined) {
      args['base-node'] = base.node;
      args['backing-file'] = path.relative(path.dirname(path.resolve(child)), path.resolve(parent!));
    }
    await qmp.execute('block-stream', args);
    let e: QmpEvent;
    try {
      e = await waitJob(qmp, jobId, seq, 'done', opts);
    } catch (err) {
      await cancelJob(qmp, jobId);
      throw err;
    }
    await qmp.execute('job-dismiss', { id: jobId }).catch(() => undefined); // gone already
    // the end, also for a job too short for a progress poll to see
    if (e.event === 'BLOCK_JOB_COMPLETED' && !e.data.error && typeof e.data.len === 'number') opts.onProgress?.(e.data.len, e.data.len);
    const why = jobFailure(e);
    if (why !== undefined) {
      throw new DisksnapError(
        `live delete: QEMU's block-stream of ${node} into ${child} failed: ${why}. The VM still runs on ${child} over ${node}; re-run the delete to finish it`,
        'EJOB',
        undefined,
        child,
      );
    }
  } finally {
    if (!(mode & 0o200)) fs.chmodSync(child, mode);
  }
}

/** Throws unless QEMU holds no node on `node`'s file (removing the ones only the monitor owns). */
async function release(qmp: QmpClient, node: string): Promise<void> {
  const key = keyOf(node);
  for (;;) {
    const named = await namedNodes<NamedNode>(qmp);
    const refs = named.filter((n) => keyOf(fileOf(n.file)) === key);
    if (refs.length === 0) return;
    let gone = 0;
    for (const r of refs) {
      // QEMU refuses nodes still in use, or not the monitor's: the check above then fails
      if (await qmp.execute('blockdev-del', { 'node-name': r['node-name'] }).then(() => true, () => false)) gone++;
    }
    if (gone === 0) throw busy(`the QEMU at ${qmp.socketPath} still uses ${node} (nodes ${refs.map((r) => r['node-name']).join(', ')}); the file is kept`, node);
  }
}

/** `checkpoint delete --qmp`: see the opening note. */
export async function removeLive(image: string, name: string, opts: LiveOptions): Promise<LiveDeleteResult> {
  const started = Date.now();
  const qmp = await QmpClient.connect(opts.qmp, { timeoutMs: opts.timeoutMs ?? 60_000 });
  try {
    // first: a killed run's job is waited for with its progress shown, however long it takes
    // (qemuChain's node list would wait 60 s at most: namedNodes)
    await settleOldJobs(qmp, opts);
    const chain = await qemuChain(qmp, image);
    const keys = new Set(chain.map((c) => c.key).filter((k): k is string => k !== undefined));
    const nodeKey = keyOf(cp.nodePath(image, name));
    const r = await cp.remove(image, name, {
      hooks: {
        held: (f) => {
          const k = keyOf(f);
          return k !== undefined && keys.has(k);
        },
        stream: (child, node, parent) => stream(qmp, image, child, node, parent, opts),
        release: (node) => release(qmp, node),
      },
    });
    return { ...r, qmp: opts.qmp, inQemuChain: nodeKey !== undefined && keys.has(nodeKey), ms: Date.now() - started };
  } finally {
    qmp.close();
  }
}
