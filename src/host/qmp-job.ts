/**
 * QEMU block jobs over QMP, as both rooms run them: a live commit (`diff commit --qmp`, and a
 * live storage snapshot merging its temporary overlay back), a live checkpoint delete
 * (block-stream).
 *
 *   eventSeq ──> block-commit / block-stream {auto-dismiss: false}
 *            ──> waitJob(…, 'ready')  BLOCK_JOB_READY (commit of the active layer)
 *            ──> job-complete ──> waitJob(…, 'done')  BLOCK_JOB_COMPLETED | _CANCELLED
 *            ──> job-dismiss
 *
 * The sequence number is taken before the command that starts the job, so its events cannot
 * be missed (src/host/qmp.ts). A job is waited for as long as it makes progress: one whose
 * progress stands still for `timeoutMs` (default 60 s) while QEMU says it runs is cancelled
 * and the wait fails with ETIMEDOUT, instead of hanging the command for ever.
 */
import { DisksnapError } from '../engine/errors';
import { QmpClient, QmpEvent } from './qmp';

export interface JobWaitOptions {
  /** how long a running job may stand still before the wait fails (default 60 s) */
  timeoutMs?: number;
  onProgress?: (done: number, total: number) => void;
}

/** Waits for the job's READY or its end, reporting progress from query-jobs meanwhile. */
export async function waitJob(qmp: QmpClient, jobId: string, after: number, until: 'ready' | 'done', opts: JobWaitOptions): Promise<QmpEvent> {
  const ended = (e: QmpEvent) => (e.event === 'BLOCK_JOB_COMPLETED' || e.event === 'BLOCK_JOB_CANCELLED') && e.data.device === jobId;
  const ready = (e: QmpEvent) => e.event === 'BLOCK_JOB_READY' && e.data.device === jobId;
  const wait = qmp.waitEvent((e) => ended(e) || (until === 'ready' && ready(e)), { after, timeoutMs: 24 * 3600_000, what: `end of job ${jobId}` });
  let lastDone = -1;
  let lastChange = Date.now();
  const stall = opts.timeoutMs ?? 60_000;
  for (;;) {
    const r = await Promise.race([wait, new Promise<undefined>((res) => setTimeout(() => res(undefined), 250))]);
    if (r) return r;
    const jobs = await qmp.execute<{ id: string; 'current-progress': number; 'total-progress': number; status: string; error?: string }[]>('query-jobs');
    const j = jobs.find((x) => x.id === jobId);
    if (!j) continue;
    opts.onProgress?.(j['current-progress'], j['total-progress']);
    if (j['current-progress'] !== lastDone) {
      lastDone = j['current-progress'];
      lastChange = Date.now();
    } else if (Date.now() - lastChange > stall && j.status === 'running') {
      throw new DisksnapError(`job ${jobId} made no progress for ${stall} ms`, 'ETIMEDOUT', undefined, qmp.socketPath);
    }
  }
}

/** Cancels a job and dismisses it; quiet when it has ended on its own meanwhile. */
export async function cancelJob(qmp: QmpClient, jobId: string): Promise<void> {
  if (qmp.isClosed) return;
  const seq = qmp.eventSeq;
  try {
    await qmp.execute('block-job-cancel', { device: jobId, force: true });
    await qmp.waitEvent((e) => (e.event === 'BLOCK_JOB_CANCELLED' || e.event === 'BLOCK_JOB_COMPLETED') && e.data.device === jobId, { after: seq, timeoutMs: 30_000 });
  } catch {
    // the job may have ended on its own meanwhile; the dismiss below settles it either way
  }
  await qmp.execute('job-dismiss', { id: jobId }).catch(() => undefined); // already gone: fine
}

/**
 * A block-commit of `device` (the active layer) into `base`, pivoted when READY, waited for
 * to its end and dismissed; cancelled if the wait fails. Returns the job's last event: the
 * caller decides what a cancelled or failed job means (BLOCK_JOB_COMPLETED with no error is
 * success).
 */
export async function runCommitJob(qmp: QmpClient, jobId: string, device: string, base: string, opts: JobWaitOptions): Promise<QmpEvent> {
  const seq = qmp.eventSeq;
  await qmp.execute('block-commit', { 'job-id': jobId, device, 'base-node': base, 'auto-dismiss': false });
  let e: QmpEvent;
  try {
    e = await waitJob(qmp, jobId, seq, 'ready', opts);
    if (e.event === 'BLOCK_JOB_READY') {
      const seq2 = qmp.eventSeq;
      await qmp.execute('job-complete', { id: jobId });
      e = await waitJob(qmp, jobId, seq2, 'done', opts);
    }
  } catch (err) {
    await cancelJob(qmp, jobId);
    throw err;
  }
  await qmp.execute('job-dismiss', { id: jobId }).catch(() => undefined); // gone already: nothing to dismiss
  return e;
}

/** Why a job's last event is not a success, or undefined when it is. */
export function jobFailure(e: QmpEvent): string | undefined {
  if (e.event === 'BLOCK_JOB_COMPLETED' && !e.data.error) return undefined;
  return typeof e.data.error === 'string' ? e.data.error : 'cancelled';
}
