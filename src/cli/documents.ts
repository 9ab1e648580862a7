/**
 * Every JSON document the CLI prints, by name. `printJson(name, value)` (util.ts) takes the
 * name, so the compiler checks each command prints the type its name promises; the JSON Schema
 * of each is `schemas/<name>.schema.json` in the package, generated from these types
 * (`npm run schemas`; test/cli-schemas.test.ts fails when they are stale), and the CLI tests
 * validate every document a command prints against it (test/helpers/cli.ts, with ajv).
 *
 * Three families:
 * - disksnap's own (`--json`): the library's result types, unchanged;
 * - qemu-img's (`--output json` on info, map, diff check, measure): ../image/qemu-docs.ts;
 * - EC2's (`--output json` on the snapshot and volume commands): ./ec2.ts.
 * And one line format: the progress events on stderr with --json (ProgressEvent, progress.ts).
 */
import type { SnapshotJson, VolumeRecord } from '../storage/store/records';
import type { BinEntry } from '../storage/bin';
import type { LiveReport } from '../storage/live';
import type { PruneReport } from '../storage/prune';
import type { RestoreReport } from '../storage/restore';
import type { DiffResult } from '../storage/diff';
import type { VerifyReport } from '../storage/verify';
import type { StoreInfo } from '../storage/volumes';
import type { GcReport } from '../storage/gc';
import type { ChildInfo } from '../differencing/child';
import type { RollbackResult } from '../differencing/rollback';
import type { CommitResult } from '../differencing/commit';
import type { LiveCommitResult } from '../differencing/live';
import type { LiveDeleteResult } from '../differencing/live-delete';
import type { FlattenResult } from '../differencing/flatten';
import type { CheckResult } from '../image/qcow2/check';
import type { AcceptParentResult } from '../differencing/guard';
import type { NodeInfo, TreeInfo, DeleteResult } from '../differencing/checkpoint';
import type { ImageInfo, ImageFormat } from '../image/view';
import type { BenchResult } from '../image/bench';
import type { Attachment, DetachResult } from '../host/attach';
import type { CompareReport } from '../compare/types';
import type { QemuImageInfo, QemuImageInfoChain, QemuMap, QemuImageCheck, QemuMeasure } from '../image/qemu-docs';
import type { Ec2Snapshot, Ec2DescribeSnapshots, Ec2CopySnapshot, Ec2LockSnapshot, Ec2UnlockSnapshot, Ec2DescribeVolumes, Ec2ListBin } from './ec2';
import type { ProgressEvent } from './progress';

/** `snapshot create --qmp --json`: the snapshot, and how the running VM was moved off its image */
export type SnapshotLiveDoc = SnapshotJson & { live: LiveReport };

/** `checkpoint create --json` (with `qmp`, the QMP socket of a live checkpoint) */
export type CheckpointNodeDoc = NodeInfo & { qmp?: string };

/** `diff commit --json` of a running VM: the QMP socket it used too */
export type DiffCommitLiveDoc = LiveCommitResult & { qmp: string };

/** `snapshot list --json` */
export interface SnapshotListDoc {
  snapshots: SnapshotJson[];
}

/** `snapshot list --in-bin --json` */
export interface BinListDoc {
  bin: BinEntry[];
}

/** `snapshot delete --json` */
export interface SnapshotDeleteDoc {
  deleted: string;
  state: string;
  dryRun: boolean;
  /**
   * when the snapshot leaves the recycle bin for good
   * @format date-time
   */
  binExpires?: string;
}

/** `volume list --json` */
export interface VolumeListDoc {
  volumes: VolumeRecord[];
}

/** `key generate --json` */
export interface KeyGenerateDoc {
  file: string;
  /** @pattern ^key-[0-9a-f]{32}$ */
  keyId: string;
}

/** `store bin --json`: the recycle bin's retention, null when the store has none */
export interface StoreBinDoc {
  retentionSeconds: number | null;
}

/** `diff children --json` */
export interface ChildrenDoc {
  parent: string;
  children: string[];
}

/** `checkpoint squash --json` */
export interface SquashDoc {
  deleted: string[];
}

/** `checkpoint resume --json` */
export interface ResumeDoc {
  image: string;
  unfinished: false;
}

/** `create --json` */
export interface CreateDoc {
  file: string;
  format: 'raw';
  /** @minimum 0 */
  virtualSize: number;
}

/** One extent of `map --json` (guest offset `start`, as qemu-img names it) */
export interface MapDocExtent {
  /** @minimum 0 */
  start: number;
  /** @minimum 1 */
  length: number;
  kind: 'data' | 'zero';
  /** @minimum 0 */
  depth: number;
  file?: string;
  hostOffset?: number;
}

/** `map --json` */
export interface MapDoc {
  virtualSize: number;
  extents: MapDocExtent[];
}

/** `read --to FILE --json` */
export interface ReadDoc {
  file: string;
  offset: number;
  length: number;
  to: string;
}

/** `write --json` */
export interface WriteDoc {
  file: string;
  offset: number;
  length: number;
}

/** `bench --json` */
export interface BenchDoc extends BenchResult {
  file: string;
  format: ImageFormat;
}

/** `detach --json` */
export interface DetachDoc {
  detached: DetachResult[];
}

/** Name -> type of every document. */
export interface Documents {
  snapshot: SnapshotJson;
  'snapshot-live': SnapshotLiveDoc;
  'snapshot-list': SnapshotListDoc;
  'snapshot-bin-list': BinListDoc;
  'snapshot-prune': PruneReport;
  'snapshot-restore': RestoreReport;
  'snapshot-delete': SnapshotDeleteDoc;
  'snapshot-diff': DiffResult;
  'snapshot-verify': VerifyReport;
  volume: VolumeRecord;
  'volume-list': VolumeListDoc;
  'key-generate': KeyGenerateDoc;
  'store-bin': StoreBinDoc;
  'store-info': StoreInfo;
  'store-gc': GcReport;
  'diff-child': ChildInfo;
  'diff-rollback': RollbackResult;
  'diff-commit': CommitResult;
  'diff-commit-live': DiffCommitLiveDoc;
  'diff-flatten': FlattenResult;
  'diff-check': CheckResult;
  'diff-accept-parent': AcceptParentResult;
  'diff-children': ChildrenDoc;
  'checkpoint-node': CheckpointNodeDoc;
  'checkpoint-tree': TreeInfo;
  'checkpoint-delete': DeleteResult | LiveDeleteResult;
  'checkpoint-squash': SquashDoc;
  'checkpoint-resume': ResumeDoc;
  'image-create': CreateDoc;
  'image-info': ImageInfo;
  'image-map': MapDoc;
  'image-read': ReadDoc;
  'image-write': WriteDoc;
  'image-bench': BenchDoc;
  attach: Attachment;
  detach: DetachDoc;
  'compare-report': CompareReport;
  'qemu-info': QemuImageInfo;
  'qemu-info-chain': QemuImageInfoChain;
  'qemu-map': QemuMap;
  'qemu-check': QemuImageCheck;
  'qemu-measure': QemuMeasure;
  'ec2-snapshot': Ec2Snapshot;
  'ec2-describe-snapshots': Ec2DescribeSnapshots;
  'ec2-copy-snapshot': Ec2CopySnapshot;
  'ec2-lock-snapshot': Ec2LockSnapshot;
  'ec2-unlock-snapshot': Ec2UnlockSnapshot;
  'ec2-describe-volumes': Ec2DescribeVolumes;
  'ec2-list-bin': Ec2ListBin;
  'progress-event': ProgressEvent;
}

export type DocumentName = keyof Documents;
