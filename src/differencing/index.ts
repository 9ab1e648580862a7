/**
 * Strategy 1, differencing disks: qcow2 children over read-only parents.
 *
 *   parent (raw or qcow2, read-only while it has children)
 *     └── child.qcow2   backing file = parent, stored relative to the child's directory
 *          └── grandchild.qcow2 ...
 *
 *   create.ts      diff create: an empty qcow2 v3 child recording the parent's identity
 *   rollback.ts    diff rollback (delete the child) and diff reset (an empty child in its place)
 *   commit.ts      diff commit: the child's clusters into the parent, then the child goes
 *   flatten.ts     diff flatten: a standalone sparse raw image of what the child shows
 *   check.ts       diff check: refcount/L1/L2 consistency, leak repair (src/image/qcow2/check.ts)
 *   guard.ts       diff accept-parent: record the parent as it is now (like `qemu-img rebase -u`)
 *   registry.ts    the children registry; child.ts, copy.ts: what the operations share
 *   attached.ts    refusals for images attached to loop devices (the host layer's view)
 *   strategy.ts    this room behind the common Strategy interface (src/strategy.ts)
 *
 * The children registry: PARENT.disksnap-children.json lists the parent's children and the
 * mode it had before the first one. The parent is made read-only (a-w) when a child is
 * registered, which happens before the child appears under its name; every writable open of
 * an image consults the registry too (src/image/children.ts: mode bits do not stop root). The
 * last child rolled back or committed gives the parent its mode back and removes the file.
 * Reads prune entries whose file is gone or names another backing file (deleted by hand, or
 * made standalone by `qemu-img rebase -b ''`); `diff children` writes the pruned list back and
 * releases a parent left with none.
 *
 * The commit marker: CHILD.disksnap-commit.json is written after every refusal and before the
 * parent is touched. While it exists the child opens only for the commit, rollback and reset
 * refuse (the parent may be half-committed), and re-running `diff commit` copies everything
 * again and finishes — the copy is idempotent because the child stays whole until it is
 * deleted, and the marker goes last, after the registry and the parent's mode are settled
 * (commit.ts has the steps).
 *
 * Backing names are stored relative to the child's directory (`path.relative`), which is how
 * QEMU resolves relative names: parent and child moved together keep working, and
 * `qemu-img info`/QEMU find the parent as disksnap does.
 */
export { createChild } from './create';
export type { CreateChildOptions } from './create';
export type { ChildInfo, Progress } from './child';
export { rollback, reset } from './rollback';
export type { RollbackOptions, RollbackResult, ResetOptions } from './rollback';
export { commit } from './commit';
export type { CommitOptions, CommitResult } from './commit';
export { flatten } from './flatten';
export type { FlattenOptions, FlattenResult } from './flatten';
export { check } from './check';
export type { CheckResult } from './check';
export { acceptParent } from './guard';
export type { AcceptParentResult } from './guard';
// the public childrenOf heals the registry (drops children QEMU made standalone, releases the parent)
export { currentChildren as childrenOf } from './registry';
export { Qcow2Image } from '../image/qcow2/image';
