/**
 * `--output json` of the snapshot and volume commands: the documents the AWS CLI prints for
 * the EC2 calls that do the same thing (`aws ec2 describe-snapshots`, `create-snapshot`,
 * `copy-snapshot`, `lock-snapshot`, `describe-volumes`, `list-snapshots-in-recycle-bin`, ...),
 * with EC2's names and shapes, so a script written against EBS reads disksnap unchanged:
 *
 *   disksnap (--json)                    EC2 (--output json)
 *   {"snapshots": [...]}                 {"Snapshots": [...]}
 *   id, volumeId                         SnapshotId, VolumeId (disksnap's ids: snap-/vol- + 16 hex)
 *   state "completed", progress 100      State "completed", Progress "100%"
 *   volumeSize (bytes)                   VolumeSize (GiB, rounded up: EC2 volumes are whole GiB)
 *   tags {"k": "v"}                      Tags [{"Key": "k", "Value": "v"}] (left out when none, as EC2 does)
 *   encrypted, keyId                     Encrypted, KmsKeyId (the store key's id)
 *   startTime, completionTime            StartTime, CompletionTime
 *   error                                StateMessage
 *
 * Only what EC2 has a name for is printed: facts only disksnap has (bytes scanned, the change
 * source, the consistency reached) are in disksnap's own `--json` document. EC2 fields disksnap
 * has no fact for (OwnerId, AvailabilityZone, Iops) are left out rather than made up. An
 * encrypted snapshot whose key was not given has no Description and no Tags (they are sealed
 * with its data). A lock is EC2's governance mode: `snapshot unlock` removes it.
 */
import type { SnapshotJson, VolumeRecord } from '../storage/store/records';
import type { BinEntry } from '../storage/bin';

const GIB = 1024 ** 3;

export interface Ec2Tag {
  Key: string;
  Value: string;
}

/** One snapshot as `aws ec2 describe-snapshots` prints it. */
export interface Ec2Snapshot {
  /** @pattern ^snap-[0-9a-f]+$ */
  SnapshotId: string;
  /** @pattern ^vol-[0-9a-f]+$ */
  VolumeId: string;
  State: 'pending' | 'completed' | 'error';
  /** the error of a snapshot in state error */
  StateMessage?: string;
  /** @format date-time */
  StartTime: string;
  /** @format date-time */
  CompletionTime?: string;
  /**
   * percent done, as EC2 prints it ("100%")
   * @pattern ^\d{1,3}%$
   */
  Progress: string;
  /**
   * GiB, rounded up
   * @minimum 0
   */
  VolumeSize: number;
  Description?: string;
  Encrypted: boolean;
  /** @pattern ^key-[0-9a-f]{32}$ */
  KmsKeyId?: string;
  StorageTier: 'standard';
  Tags?: Ec2Tag[];
}

/** `aws ec2 describe-snapshots` (list, show) */
export interface Ec2DescribeSnapshots {
  Snapshots: Ec2Snapshot[];
}

/** `aws ec2 copy-snapshot` */
export interface Ec2CopySnapshot {
  SnapshotId: string;
  Tags?: Ec2Tag[];
}

/** `aws ec2 lock-snapshot` (governance mode: `snapshot unlock` removes the lock) */
export interface Ec2LockSnapshot {
  SnapshotId: string;
  LockState: 'governance' | 'expired';
  /** @format date-time */
  LockExpiresOn: string;
}

/** `aws ec2 unlock-snapshot` */
export interface Ec2UnlockSnapshot {
  SnapshotId: string;
}

/** One volume as `aws ec2 describe-volumes` prints it. */
export interface Ec2Volume {
  /** @pattern ^vol-[0-9a-f]+$ */
  VolumeId: string;
  /**
   * GiB, rounded up
   * @minimum 0
   */
  Size: number;
  /** @format date-time */
  CreateTime: string;
  Encrypted: boolean;
  KmsKeyId?: string;
  /** in-use while the image is attached to a loop device (disksnap attach), else available */
  State: 'available' | 'in-use';
}

/** `aws ec2 describe-volumes` (volume list) */
export interface Ec2DescribeVolumes {
  Volumes: Ec2Volume[];
}

/** One entry of `aws ec2 list-snapshots-in-recycle-bin` */
export interface Ec2BinSnapshot {
  SnapshotId: string;
  VolumeId: string;
  Description?: string;
  /** @format date-time */
  RecycleBinEnterTime: string;
  /** @format date-time */
  RecycleBinExitTime: string;
}

/** `aws ec2 list-snapshots-in-recycle-bin` (snapshot list --in-bin) */
export interface Ec2ListBin {
  Snapshots: Ec2BinSnapshot[];
}

function gib(bytes: number): number {
  return Math.ceil(bytes / GIB);
}

function tagsOf(tags: Record<string, string>): Ec2Tag[] | undefined {
  const list = Object.entries(tags).map(([Key, Value]) => ({ Key, Value }));
  return list.length ? list : undefined;
}

export function ec2Snapshot(s: SnapshotJson): Ec2Snapshot {
  const o: Ec2Snapshot = {
    SnapshotId: s.id,
    VolumeId: s.volumeId,
    State: s.state,
    StartTime: s.startTime,
    Progress: `${Math.round(s.progress)}%`,
    VolumeSize: gib(s.volumeSize),
    Encrypted: s.encrypted,
    StorageTier: 'standard',
  };
  if (s.state === 'error' && s.error) o.StateMessage = s.error;
  if (s.completionTime) o.CompletionTime = s.completionTime;
  if (!s.metadataHidden) {
    o.Description = s.description;
    const t = tagsOf(s.tags);
    if (t) o.Tags = t;
  }
  if (s.keyId) o.KmsKeyId = s.keyId;
  return o;
}

export function ec2DescribeSnapshots(list: SnapshotJson[]): Ec2DescribeSnapshots {
  return { Snapshots: list.map(ec2Snapshot) };
}

export function ec2CopySnapshot(s: SnapshotJson): Ec2CopySnapshot {
  const t = s.metadataHidden ? undefined : tagsOf(s.tags);
  return t ? { SnapshotId: s.id, Tags: t } : { SnapshotId: s.id };
}

export function ec2LockSnapshot(s: SnapshotJson, now = Date.now()): Ec2LockSnapshot {
  const until = s.lockedUntil ?? new Date(now).toISOString();
  return { SnapshotId: s.id, LockState: Date.parse(until) > now ? 'governance' : 'expired', LockExpiresOn: until };
}

export function ec2Volume(v: VolumeRecord, attached: boolean): Ec2Volume {
  const o: Ec2Volume = { VolumeId: v.id, Size: gib(v.size), CreateTime: v.created, Encrypted: v.encrypted, State: attached ? 'in-use' : 'available' };
  if (v.keyId) o.KmsKeyId = v.keyId;
  return o;
}

export function ec2ListBin(entries: BinEntry[]): Ec2ListBin {
  return {
    Snapshots: entries.map((e) => {
      const o: Ec2BinSnapshot = { SnapshotId: e.snapshot.id, VolumeId: e.snapshot.volumeId, RecycleBinEnterTime: e.binnedAt, RecycleBinExitTime: e.binExpires };
      if (!e.snapshot.metadataHidden) o.Description = e.snapshot.description;
      return o;
    }),
  };
}
