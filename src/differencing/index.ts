/**
 * Strategy 1, differencing disks: qcow2 children over read-only parents. The public surface
 * of this room (createChild, rollback, reset, commit, flatten, check, acceptParent,
 * childrenOf); the modules beside it hold one operation each.
 */
export * from './diff';
