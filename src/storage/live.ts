/**
 * Live storage snapshots: `snapshot create IMAGE --qmp SOCKET [--qga SOCKET]` while QEMU runs
 * IMAGE (a qcow2 image or chain, or a raw image). QEMU holds IMAGE open for writing, so it is
 * not read in place; instead the VM is moved off it for as long as the copy takes:
 *
 *   0. leftovers of an earlier run are settled first (below)
 *   1. an empty overlay IMAGE.live-snapshot-<hex>.qcow2 (backing IMAGE) is created beside IMAGE
 *   2. the guest agent, if it answers guest-ping within agentTimeoutMs: guest-fsfreeze-freeze
 *      (src/host/qga.ts: thawed on every path, a guard process for SIGKILL)
 *   3. blockdev-snapshot-sync mode=existing: QEMU writes the overlay from now on and holds IMAGE
 *      read-only beneath it; then at once guest-fsfreeze-thaw. The freeze lasts only this
 *      switch and is bounded (maxFreezeMs, default 10 s: if the switch takes longer the guest
 *      is thawed anyway and the snapshot is recorded crash-consistent)
 *   4. IMAGE (with its backing chain: the guest view) no longer changes: the normal snapshot
 *      path reads it at leisure (./create.ts, `heldBy`). No persistent bitmap is trusted or
 *      added: QEMU's writes go to the overlay, not into IMAGE's bitmaps, and IMAGE's header is
 *      QEMU's while it runs. Every block is compared with the parent's instead (change tags)
 *   5. block-commit of the active layer (the overlay) into IMAGE, job-complete: QEMU pivots
 *      back onto IMAGE; the overlay is deleted only once no node of QEMU names it
 *   6. the consistency recorded: 'guest-frozen' (the agent froze the guest for the switch, the
 *      freeze time recorded) or 'crash-consistent' (no agent, or it did not answer: the reason
 *      goes to onLog and into the report)
 *
 * The agent's socket is --qga, or found through QMP: a unix-socket chardev whose id contains
 * "qga" or "guest_agent"/"guest-agent", or the chardev of a virtserialport named
 * org.qemu.guest_agent.0 (libvirt's channel; libvirt itself must not be connected to it then).
 *
 * Failures: the VM never stops and always runs on a valid chain. If the switch fails, the VM
 * stays on IMAGE and the overlay is removed (only once QEMU does not name it). If the copy
 * fails, the overlay is still merged back. If the merge fails (or this process is killed after
 * the switch), the VM keeps running on the overlay over IMAGE, and the overlay holds the
 * guest's newest writes: it is never dropped. The next `snapshot create IMAGE --qmp` settles
 * every IMAGE.live-snapshot-*.qcow2 first: one QEMU runs is merged back live; one QEMU does not
 * name and that holds no data is deleted; one that QEMU does not name but holds data is kept
 * and the snapshot refused (EBUSY): whether its writes still belong in IMAGE (the VM was
 * stopped while on it) or are there already (a run killed between QEMU's pivot and the
 * unlink) only the user can say (`disksnap diff commit OVERLAY` merges it).
 *
 * Errors: EJOB (QEMU's block job failed; its message included), ENOTFOUND (no device of that
 * QEMU runs IMAGE), EBUSY (a leftover overlay with data), plus QMP's EQMP/ETIMEDOUT/ECONNRESET.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { DisksnapError, busy } from '../engine/errors';
import { syncDir } from '../engine/atomic';
import { backingNode, namedNodes, QmpClient } from '../host/qmp';
import { jobFailure, JobWaitOptions, runCommitJob } from '../host/qmp-job';
import { guestFreeze, pingAgent, type QgaClient } from '../host/qga';
import type { Consistency } from '../host/point-in-time';
import { detectFormat, openImage } from '../image';
import { createQcow2 } from '../image/qcow2/create';
import { parseHeader } from '../image/qcow2/format';
import { readHeaderCluster } from '../image/qcow2/header';
import { BlockFile } from '../engine/file';
import { createSnapshot, type CreateSnapshotOptions } from './create';
import { realVolumePath } from './common';
import { faultsOf } from './faults';
import type { SnapshotJson } from './store/records';

export interface LiveSnapshotOptions extends CreateSnapshotOptions {
  /** QEMU's QMP socket */
  qmp: string;
  /** the guest agent's socket (default: found through QMP, see the module note) */
  qga?: string;
  /** do not use the guest agent even when there is one (crash-consistent) */
  noAgent?: boolean;
  /** how long the agent has to answer guest-ping (default 3000 ms) */
  agentTimeoutMs?: number;
  /** the longest the guest stays frozen for the switch (default 10000 ms) */
  maxFreezeMs?: number;
  /** for each QMP command (default 60 s) */
  timeoutMs?: number;
}

export interface LiveReport {
  /** the temporary overlay QEMU ran on during the copy */
  overlay: string;
  consistency: Consistency;
  /** the agent's socket when it froze the guest */
  agent?: string;
  /** why the snapshot is crash-consistent, when it is */
  reason?: string;
  /** how long the guest was frozen (freeze sent to thaw answered), ms */
  frozenMs: number | null;
  /** how long QEMU took to switch to the overlay, ms */
  switchMs: number;
  /** how long the merge back took, ms */
  commitMs: number;
  /** leftover overlays of earlier runs merged back or removed first */
  settled: string[];
}

interface Held {
  consistency: Consistency;
  frozenMs: number | null;
  switchMs: number;
  agent?: string;
  reason?: string;
}

const OVERLAY_RE = /^(.*)\.live-snapshot-[0-9a-f]{8}\.qcow2$/;

/** The temporary overlays of `real` left in its directory. */
export function liveOverlaysOf(real: string): string[] {
  const dir = path.dirname(real);
  return fs
    .readdirSync(dir)
    .filter((n) => OVERLAY_RE.exec(n)?.[1] === path.basename(real))
    .map((n) => path.join(dir, n));
}

function realOf(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch {
    return path.resolve(p);
  }
}

/** The file a QEMU filename names (`json:{...}` when QEMU thinks its backing names are stale). */
function fileOf(qemuName: string): string {
  if (!qemuName.startsWith('json:')) return qemuName;
  try {
    return (JSON.parse(qemuName.slice(5)) as { file?: { filename?: string } }).file?.filename ?? qemuName;
  } catch {
    return qemuName;
  }
}

interface Device {
  device: string;
  node: string;
  file: string;
}

async function devicesOf(qmp: QmpClient): Promise<Device[]> {
  const devs = await qmp.execute<{ device: string; qdev?: string; inserted?: { 'node-name': string; file: string } }[]>('query-block');
  return devs.filter((d) => d.inserted).map((d) => ({ device: d.device || d.qdev || d.inserted!['node-name'], node: d.inserted!['node-name'], file: realOf(fileOf(d.inserted!.file)) }));
}

/** Whether any block node of QEMU has `file` open. */
async function qemuNames(qmp: QmpClient, file: string): Promise<boolean> {
  const nodes = await namedNodes<{ file: string }>(qmp);
  const want = realOf(file);
  return nodes.some((n) => realOf(fileOf(n.file)) === want);
}

/**
 * Whether the overlay holds anything of its own (guest writes): any L1 entry set. Read from
 * its own file only (its backing file may be QEMU's, locked for writing).
 */
function holdsData(overlay: string): boolean {
  const f = BlockFile.open(overlay, { lock: 'none' });
  try {
    const size = f.stat().size;
    const h = parseHeader(overlay, readHeaderCluster(f, size), size);
    const l1 = Buffer.alloc(h.l1Size * 8);
    f.readFullSync(l1, h.l1TableOffset);
    for (let i = 0; i < l1.length; i += 8) if (l1.readBigUInt64BE(i) !== 0n) return true;
    return false;
  } finally {
    f.close();
  }
}

/**
 * Merges the active layer `top` of a device into its backing node `base` (block-commit,
 * job-complete: QEMU pivots onto `base`), then deletes `overlay` once QEMU no longer names it.
 * On failure the VM keeps running on the overlay (QEMU leaves the active layer in place); a
 * job that stops making progress is cancelled (src/host/qmp-job.ts).
 */
async function commitBack(qmp: QmpClient, top: string, base: string, overlay: string, wait: JobWaitOptions = {}): Promise<void> {
  const why = jobFailure(await runCommitJob(qmp, `disksnap-live-${randomBytes(3).toString('hex')}`, top, base, wait));
  if (why !== undefined) throw new DisksnapError(`merging ${overlay} back failed: ${why}`, 'EJOB', undefined, overlay);
  if (await qemuNames(qmp, overlay)) {
    throw new DisksnapError(`QEMU still names ${overlay} after the merge: it is kept`, 'EJOB', undefined, overlay);
  }
  fs.unlinkSync(overlay);
  syncDir(path.dirname(overlay));
}

/** Settles the temporary overlays an earlier run left (see the module note); returns them. */
async function settleLeftovers(qmp: QmpClient, real: string, onLog?: (m: string) => void): Promise<string[]> {
  const left = liveOverlaysOf(real);
  if (left.length === 0) return [];
  const devs = await devicesOf(qmp);
  for (const overlay of left) {
    const dev = devs.find((d) => d.file === realOf(overlay));
    if (dev) {
      onLog?.(`QEMU still runs on ${overlay}, left by an earlier live snapshot: merging it back into ${real}`);
      await commitBack(qmp, dev.node, await backingNode(qmp, dev.node), overlay);
    } else if (await qemuNames(qmp, overlay)) {
      throw busy(`${overlay} (left by an earlier live snapshot) is open in QEMU, though not as a device's top: not touching it`, overlay);
    } else if (!holdsData(overlay)) {
      onLog?.(`removing ${overlay}: left by an earlier live snapshot, empty and unused`);
      fs.unlinkSync(overlay);
      syncDir(path.dirname(overlay));
    } else {
      throw busy(
        `${overlay} (a temporary overlay of an earlier live snapshot) holds guest writes but QEMU does not run it (the VM was stopped while on it, ` +
          `or a run was killed just after merging it back); merge it into ${real} with 'disksnap diff commit ${overlay}' if its writes are not in ${real} yet, or remove it, then try again`,
        overlay,
      );
    }
  }
  return left;
}

/** The agent's socket from QEMU's chardevs and virtio-serial ports, if any (see the module note). */
export async function findAgentSocket(qmp: QmpClient): Promise<string | undefined> {
  const chardevs = await qmp.execute<{ label: string; filename: string }[]>('query-chardev');
  const unixPath = (id: string) => /^(?:disconnected:)?unix:([^,]+)/.exec(chardevs.find((c) => c.label === id)?.filename ?? '')?.[1];
  for (const root of ['/machine/peripheral', '/machine/peripheral-anon']) {
    const kids = await qmp.execute<{ name: string; type: string }[]>('qom-list', { path: root }).catch(() => []);
    for (const k of kids.filter((x) => x.type === 'child<virtserialport>')) {
      const p = `${root}/${k.name}`;
      const name = await qmp.execute<string>('qom-get', { path: p, property: 'name' }).catch(() => '');
      if (name !== 'org.qemu.guest_agent.0') continue;
      const chardev = await qmp.execute<string>('qom-get', { path: p, property: 'chardev' }).catch(() => '');
      const s = unixPath(chardev);
      if (s) return s;
    }
  }
  for (const c of chardevs) {
    const s = unixPath(c.label);
    if (s && /qga|guest[_-]agent/i.test(c.label)) return s;
  }
  return undefined;
}

/** The agent to freeze with, or why there is none. */
async function agentFor(qmp: QmpClient, opts: LiveSnapshotOptions): Promise<{ client: QgaClient } | { reason: string }> {
  if (opts.noAgent) return { reason: 'the guest agent was not used (noAgent)' };
  const sock = opts.qga ?? (await findAgentSocket(qmp));
  if (!sock) return { reason: 'QEMU has no guest agent channel (no --qga socket given, none found among its chardevs)' };
  return pingAgent(sock, opts.agentTimeoutMs ?? 3000);
}

/** Steps 2-3: the switch to the overlay, inside a bounded guest freeze when the agent answers. */
async function switchHeld(qmp: QmpClient, top: string, overlay: string, overlayNode: string, opts: LiveSnapshotOptions): Promise<Held> {
  const doSwitch = async () => {
    const t0 = performance.now();
    await qmp.execute('blockdev-snapshot-sync', { 'node-name': top, 'snapshot-file': overlay, 'snapshot-node-name': overlayNode, format: 'qcow2', mode: 'existing' });
    return performance.now() - t0;
  };
  const agent = await agentFor(qmp, opts);
  if ('reason' in agent) return { consistency: 'crash-consistent', frozenMs: null, switchMs: await doSwitch(), reason: agent.reason };
  const client = agent.client;
  try {
    const maxFreeze = opts.maxFreezeMs ?? 10_000;
    const frozen = await guestFreeze(client, maxFreeze);
    let overran = false;
    let timer: NodeJS.Timeout | undefined;
    const bound = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        overran = true;
        resolve();
      }, Math.max(0, maxFreeze - (performance.now() - frozen.startedAt)));
    });
    const switching = doSwitch();
    let switchMs: number;
    let frozenMs: number;
    try {
      await Promise.race([switching.then(() => undefined, () => undefined), bound]);
    } finally {
      clearTimeout(timer);
      frozenMs = await frozen.thaw();
    }
    switchMs = await switching;
    frozenMs = Math.round(frozenMs * 10) / 10;
    if (overran) return { consistency: 'crash-consistent', frozenMs: null, switchMs, reason: `the switch took longer than the freeze may last (${maxFreeze} ms): the guest was thawed before it` };
    return { consistency: 'guest-frozen', frozenMs, switchMs, agent: client.socketPath };
  } finally {
    client.close();
  }
}

/** The overlay after a failed switch: removed unless QEMU opened it after all. */
async function dropUnused(qmp: QmpClient, overlay: string, onLog?: (m: string) => void): Promise<void> {
  try {
    if (await qemuNames(qmp, overlay)) {
      onLog?.(`${overlay} is open in QEMU after a failed switch: kept (the next live snapshot merges it back)`);
      return;
    }
    fs.rmSync(overlay, { force: true });
    syncDir(path.dirname(overlay));
  } catch (e) {
    onLog?.(`${overlay} was left in place (${(e as Error).message}); the next live snapshot settles it`);
  }
}

/** A storage snapshot of the image a running QEMU uses: see the module note. */
export async function createLiveSnapshot(image: string, opts: LiveSnapshotOptions): Promise<{ snapshot: SnapshotJson; live: LiveReport }> {
  const real = realVolumePath(image);
  const qmp = await QmpClient.connect(opts.qmp, { timeoutMs: opts.timeoutMs ?? 60_000 });
  try {
    const settled = await settleLeftovers(qmp, real, opts.onLog);
    const dev = (await devicesOf(qmp)).find((d) => d.file === real);
    if (!dev) throw new DisksnapError(`no device of the QEMU at ${opts.qmp} runs ${real} as its top image`, 'ENOTFOUND', undefined, real);
    const overlay = `${real}.live-snapshot-${randomBytes(4).toString('hex')}.qcow2`;
    const overlayNode = `dsls-${randomBytes(4).toString('hex')}`;
    const probe = openImage(real, { readLock: 'none' });
    const size = probe.virtualSize;
    probe.close();
    createQcow2(overlay, { size, backingFile: path.basename(real), backingFormat: detectFormat(real) === 'qcow2' ? 'qcow2' : 'raw' });
    syncDir(path.dirname(real));
    let held: Held;
    try {
      held = await switchHeld(qmp, dev.node, overlay, overlayNode, opts);
    } catch (e) {
      await dropUnused(qmp, overlay, opts.onLog);
      throw e;
    }
    if (held.reason) opts.onLog?.(`${held.reason}: the snapshot is crash-consistent`);
    const faults = faultsOf(opts);
    let snapshot: SnapshotJson | undefined;
    let failure: unknown;
    try {
      await faults.afterSwitch?.();
      const reason = 'a live snapshot (QEMU ran on a temporary overlay): no bitmap is trusted, every block was compared with the parent';
      snapshot = await createSnapshot(real, { ...opts, heldBy: { consistency: held.consistency, frozenMs: held.frozenMs, reason } });
    } catch (e) {
      failure = e;
    }
    const t0 = performance.now();
    try {
      await faults.beforeCommitBack?.();
      await commitBack(qmp, overlayNode, dev.node, overlay, { timeoutMs: opts.timeoutMs });
    } catch (e) {
      const what = snapshot ? `snapshot ${snapshot.id} completed, but ` : '';
      const err = new DisksnapError(
        `${what}the VM still runs on the temporary overlay ${overlay} (${(e as Error).message}); it holds the guest's newest writes: ` +
          `the next 'disksnap snapshot create ${image} --qmp ${opts.qmp}' merges it back first`,
        'EJOB',
        undefined,
        overlay,
      );
      if (failure) opts.onLog?.(err.message);
      throw failure ?? err;
    }
    if (failure || !snapshot) throw failure;
    return { snapshot, live: { overlay, consistency: held.consistency, agent: held.agent, reason: held.reason, frozenMs: held.frozenMs, switchMs: held.switchMs, commitMs: performance.now() - t0, settled } };
  } finally {
    qmp.close();
  }
}
