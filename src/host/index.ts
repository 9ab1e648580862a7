/**
 * The host layer: what disksnap does with the running system rather than with image bytes.
 * It sits above the image layer (it serves and attaches images) and below both strategies,
 * which ask it "is this attached?", "where is it mounted?" and "give me one moment of it".
 *
 *   attach.ts          loop devices: raw images bound directly, anything else (qcow2 children,
 *                      chains) through a FUSE view; detach; stale records and views reaped
 *   state.ts           what is attached where: records under $DISKSNAP_RUN_DIR, always checked
 *                      against the kernel (LOOP_GET_STATUS64), mounts from /proc/self/mountinfo
 *   fuse-server.ts     the detached process serving an image's flat view as one FUSE file
 *   fuse-protocol.ts   the FUSE kernel protocol subset it speaks (struct layouts, opcodes)
 *   freeze.ts          FIFREEZE/FITHAW, and the nets that end every freeze (thaw-guard.ts: a
 *                      watcher process for SIGKILL)
 *   point-in-time.ts   the consistent view of a live volume: not mounted, a reflink clone taken
 *                      while frozen, frozen for the read, or crash-consistent; its `Consistency`
 *   qmp.ts             a QMP client (QEMU's monitor) for live operations on a running VM
 *   qga.ts             a qemu-guest-agent client and the guest freeze through it (thawed on
 *                      every path; qga-thaw-guard.ts: a watcher process for SIGKILL)
 *   exit-cleanup.ts    the one signal/exit path: thaws and clone removals run on SIGINT, SIGTERM,
 *                      SIGHUP and exit, then the signal is re-raised
 *
 * Crash safety: the kernel is the authority on attachments (a record counts only while its
 * device is bound to the file it names), so records left by a crash are ignored and replaced;
 * a freeze never outlives its process (guard process); clones of a killed process are removed
 * by the next point-in-time view of the same volume.
 */
export { attach, detach, attachmentOf, attachmentsOf, assertNotAttached, listAttachments, reapStale } from './attach';
export type { Attachment, AttachOptions, DetachResult } from './attach';
export { freeze, thaw, withFrozen } from './freeze';
export {
  findMount,
  mountsOfImage,
  cloneFile,
  canReflink,
  cloneWhileFrozen,
  pointInTime,
  withPointInTime,
  snapshotFreezeHook,
} from './point-in-time';
export type { Consistency, PointInTime, PointInTimeOptions, CaptureSource, CaptureOptions } from './point-in-time';
export type { AttachVia } from './state';
