/**
 * Loopback: attach images to loop devices (raw directly, qcow2 children through a FUSE view),
 * find where they are mounted, and take point-in-time views of mounted volumes.
 */
export { attach, detach, attachmentOf, attachmentsOf, assertNotAttached, listAttachments, reapStale } from './attach';
export type { Attachment, AttachOptions, DetachResult } from './attach';
export {
  findMount,
  mountsOfImage,
  freeze,
  thaw,
  withFrozen,
  cloneFile,
  canReflink,
  cloneWhileFrozen,
  pointInTime,
  withPointInTime,
  snapshotFreezeHook,
} from './freeze';
export type { Consistency, PointInTime, PointInTimeOptions } from './freeze';
export type { AttachVia } from './state';
