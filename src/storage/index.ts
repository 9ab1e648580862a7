/**
 * Strategy 2, storage snapshots: the EBS-style block store. The public surface of this room
 * (createSnapshot, restoreSnapshot, copySnapshot, deleteSnapshot, diffSnapshots,
 * verifySnapshot, gc, volumes and stores); the modules beside it hold one operation each.
 */
export * from './snapshot';
