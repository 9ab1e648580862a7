/**
 * Storage snapshot commands: `snapshot …` (`volume …`, `store …` and `key …` are in
 * ./store.ts; what they share in ./store-common.ts). Each is a few lines over
 * src/storage/. Results on stdout (a table, or one JSON document with --json), progress
 * bars on stderr when it is a terminal, failures as one line on stderr with exit 1.
 *
 * The store is `--store DIR`, else $DISKSNAP_STORE, else $XDG_DATA_HOME/disksnap/store
 * (~/.local/share/disksnap/store). Its block size is fixed when it is created: by
 * `store init --block-size`, or by `--block-size` on the `snapshot create` or
 * `volume register` that creates it (512K by default).
 *
 * Keys (src/storage/keys.ts): `--key-file K` (32 random bytes) or `--passphrase-file F`, else the
 * passphrase in $DISKSNAP_PASSPHRASE, wherever an encrypted volume or snapshot is touched.
 */
import * as path from 'node:path';
import { Command } from 'commander';

import { KeyFlags, keyOptions, keySpec, secondsArg, StoreFlag, storeHelp, storeOption, storeOpts, table, waitHelp, warnDamaged, withBar } from './store-common';
import * as snap from '../storage';
import { parseTags } from '../storage/store/records';
import type { KeySpec } from '../storage/keys';
import { formatSize } from '../engine/size';
import { keepOptions, KeepFlags, policyOf, printPrune } from './retention';
import { ExitStatus, UsageError, action, collect, log, OutputFormat, outputFormat, outputOption, outputStyle, printJson, printLines, printable, powerOfTwoArg, sizeArg, untilArg } from './util';
import { ec2CopySnapshot, ec2DescribeSnapshots, ec2ListBin, ec2LockSnapshot, ec2Snapshot } from './ec2';
import { writeOut } from '../engine/stdio';

/** 'frozen-clone (filesystem frozen for 3.1 ms)' and the like. */
function consistencyText(s: snap.SnapshotJson): string {
  switch (s.consistency) {
    case null:
      return '- (not recorded)';
    case 'not-mounted':
      return 'not-mounted (the volume was not mounted)';
    case 'frozen':
      return `frozen (filesystem frozen while it was read${s.frozenMs !== null ? `, ${(s.frozenMs / 1000).toFixed(2)} s` : ''})`;
    case 'frozen-clone':
      return `frozen-clone (filesystem frozen for a reflink clone${s.frozenMs !== null ? `, ${s.frozenMs} ms` : ''}; the clone was read)`;
    case 'frozen-cbw':
      return (
        `frozen-cbw (filesystem frozen for ${s.frozenMs !== null ? `${s.frozenMs} ms` : 'a moment'}; ` +
        `${s.preservedBytes !== null ? formatSize(s.preservedBytes) : 'an unrecorded amount'} preserved by copy-before-write while it was read)`
      );
    case 'crash-consistent':
      return 'crash-consistent (written to while read, not frozen: --no-freeze, or a running VM whose guest agent did not freeze it)';
    case 'guest-frozen':
      return `guest-frozen (the guest's filesystems frozen through qemu-guest-agent${s.frozenMs !== null ? ` for ${s.frozenMs} ms` : ''} while QEMU switched to a temporary overlay; the image was read after the thaw)`;
  }
}

const SEALED = '(encrypted: give the key to see it)';

/** --json (disksnap's document) or --output json (EC2's, ./ec2.ts) */
type Out = { json?: boolean; output?: OutputFormat };

/** The clone a snapshot kept beside its volume, and the space it pins now. */
function reflinkText(c: NonNullable<snap.SnapshotJson['reflinkClone']>): string {
  if (c.pinnedBytes === undefined || c.pinnedBytes === null) return `${c.path} (no longer kept: replaced by a later snapshot's, or removed)`;
  return `${c.path} (pins ${formatSize(c.pinnedBytes)}, ${c.pinnedBytes} bytes the volume no longer shares)`;
}

/** A time recorded in nanoseconds since the epoch (a decimal string), as ISO 8601. */
const nsTime = (ns: string): string => new Date(Number(BigInt(ns) / 1_000_000n)).toISOString();

function printSnapshot(s: snap.SnapshotJson): void {
  const rows: [string, string][] = [
    ['id', s.id],
    ['volume', `${s.volumeId} (${s.volumePath})`],
    ['state', s.state + (s.state === 'pending' ? ` ${s.progress}%` : '')],
    ['name', s.metadataHidden ? SEALED : s.name],
    ['description', s.metadataHidden ? SEALED : s.description],
    ['tags', s.metadataHidden ? SEALED : Object.entries(s.tags).map(([k, v]) => `${k}=${v}`).join(', ')],
    ['encrypted', s.encrypted ? `true (key ${s.keyId})` : 'false'],
    ['consistency', consistencyText(s)],
    ['started', s.startTime],
    ['completed', s.completionTime ?? '-'],
    ['volume size', `${formatSize(s.volumeSize)} (${s.volumeSize} bytes)`],
    ['block size', formatSize(s.blockSize)],
    ['parent', s.parentId ?? '- (full snapshot)'],
    ['data blocks', `${s.stats.dataBlocks} (${s.stats.zeroBlocks} zero blocks not stored)`],
    ['changed blocks', String(s.stats.changedBlocks)],
    ['change source', (s.changeSource ?? '- (not recorded)') + (s.changeSourceReason ? ` (${s.changeSourceReason})` : '')],
    ['bytes scanned', `${formatSize(s.stats.bytesScanned)} (${s.stats.bytesScanned} bytes)`],
    ['blocks added', `${s.stats.blocksAdded} (${formatSize(s.stats.bytesAdded)})`],
  ];
  if (s.volumeFormat) rows.push(['volume format', s.volumeFormat + (s.volumeChain && s.volumeChain.length > 1 ? ` (chain: ${s.volumeChain.join(' -> ')})` : '')]);
  if (s.changeTracking) rows.push(['bitmap', `${s.changeTracking.bitmap} (granularity ${formatSize(s.changeTracking.granularity)})`]);
  if (s.reflinkClone) rows.push(['reflink clone', reflinkText(s.reflinkClone)]);
  if (s.volumeStat) rows.push(['volume times', `${nsTime(s.volumeStat.mtimeNs)} modified, ${nsTime(s.volumeStat.ctimeNs)} changed, inode ${s.volumeStat.ino} (while they stay, the next snapshot reads nothing)`]);
  if (s.lockedUntil) rows.push(['locked until', `${s.lockedUntil}${Date.parse(s.lockedUntil) > Date.now() ? ' (delete and prune refuse it)' : ' (expired)'}`]);
  if (s.copiedFrom) rows.push(['copied from', `${s.copiedFrom.snapshotId} of store ${s.copiedFrom.storeId}`]);
  if (s.error) rows.push(['error', s.error]);
  const w = Math.max(...rows.map((r) => r[0].length));
  printLines(rows.map(([k, v]) => `${k.padEnd(w)}  ${v}`));
}

/** `snap-…: k=v k2=v2` (control characters escaped), after tag/untag. */
function printTags(rec: { id: string; tags: Record<string, string> }): void {
  const tags = Object.entries(rec.tags).map(([k, v]) => `${printable(k)}=${printable(v)}`);
  writeOut(`${rec.id}: ${tags.join(' ') || 'no tags'}\n`);
}

export function register(program: Command): void {
  const snapshot = program.command('snapshot').description('EBS-style incremental storage snapshots of volumes (raw images, block devices, qcow2 guest views)');

  keyOptions(snapshot.command('create'), 'of an encrypted volume')
    .description('snapshot a raw image or block device, or a qcow2 image as its guest sees it (stores only blocks the store does not hold yet); with --qmp, the image of a running VM')
    .argument('<volume>', 'raw image file or block device, or qcow2 image')
    .option(storeOption, storeHelp)
    .option('--name <name>', 'name of the snapshot', '')
    .option('--description <text>', 'description', '')
    .option('--tag <key=value>', 'tag (repeatable)', collect, [])
    .option('--block-size <size>', 'block size of a store this command creates (default 512K)', powerOfTwoArg('block size', 4096, 64 * 1024 * 1024))
    .option('--no-freeze', 'do not freeze a mounted volume (the snapshot is then crash-consistent)')
    .option('--no-reflink', 'keep no reflink clone of the volume for the next snapshot (xfs, btrfs); removes the one it has')
    .option('--read-all', "read and compare every data block, trusting no record of what changed (a qcow2 image's bitmap, reflink clones, unchanged times): for an image changed behind QEMU's back; still stores only new blocks")
    .option('--cbw-limit <size>', 'a mounted raw volume attached with `attach --via fuse`: the most its FUSE server may preserve of what the VM overwrites during the read (default 1G); past it the snapshot fails, never the VM', sizeArg('--cbw-limit'))
    .option('--qmp <socket>', 'QEMU runs the image: its QMP socket (a live snapshot through a temporary overlay)')
    .option('--qga <socket>', "with --qmp: the guest agent's socket, to freeze the guest for the switch (default: found through QMP)")
    .option('--no-agent', 'with --qmp: do not freeze the guest through its agent (crash-consistent)')
    .option('--wait <seconds>', waitHelp, secondsArg)
    .option('--json', 'print the snapshot as JSON')
    .addOption(outputOption('ec2'))
    .action(
      action(async (volume: string, o: StoreFlag & KeyFlags & Out & { name: string; description: string; tag: string[]; blockSize?: number; freeze: boolean; reflink: boolean; readAll?: boolean; cbwLimit?: number; qmp?: string; qga?: string; agent: boolean }) => {
        const style = outputStyle(o);
        const tags = parseTags(o.tag);
        const key = keySpec(o);
        if (o.qga !== undefined && o.qmp === undefined) throw new UsageError('--qga needs --qmp (the snapshot of a running VM)');
        let live: snap.LiveReport | undefined;
        const rec = await withBar('snapshot', style !== 'human', async (onProgress) => {
          const common = {
            ...storeOpts(o),
            name: o.name,
            description: o.description,
            tags,
            blockSize: o.blockSize,
            key,
            noFreeze: o.freeze === false,
            noReflink: o.reflink === false,
            readAll: o.readAll,
            cbwLimit: o.cbwLimit,
            onProgress,
            onLog: (m: string) => log(`disksnap: ${m}`),
            onPrune: (r: snap.PruneReport) => r.removed.length && log(`disksnap: the volume's retention policy removed ${r.removed.map((d) => d.id).join(', ')} (their blocks go at the next store gc)`),
          };
          if (o.qmp === undefined) return snap.createSnapshot(volume, common);
          const r = await snap.createLiveSnapshot(volume, { ...common, qmp: o.qmp, qga: o.qga, noAgent: o.agent === false });
          live = r.live;
          return r.snapshot;
        });
        if (style === 'disksnap') {
          if (live) printJson('snapshot-live', { ...rec, live });
          else printJson('snapshot', rec);
        } else if (style === 'peer') printJson('ec2-snapshot', ec2Snapshot(rec));
        else {
          writeOut(
            `${rec.id} ${rec.state}: ${rec.stats.dataBlocks} data blocks of ${formatSize(rec.blockSize)}, ` +
              `${rec.stats.changedBlocks} changed${rec.parentId ? ` since ${rec.parentId}` : ''}, ` +
              `${rec.stats.blocksAdded} added to the store (${formatSize(rec.stats.bytesAdded)})` +
              (rec.encrypted ? `, encrypted (key ${rec.keyId})` : '') +
              (rec.consistency && rec.consistency !== 'not-mounted' ? `; ${consistencyText(rec)}` : '') +
              '\n',
          );
          if (live) writeOut(`live: QEMU switched to ${path.basename(live.overlay)} in ${live.switchMs.toFixed(1)} ms and merged it back in ${live.commitMs.toFixed(0)} ms\n`);
        }
      }),
    );

  keyOptions(snapshot.command('list'), 'to show the names of encrypted snapshots')
    .description('snapshots in the store, oldest first')
    .option(storeOption, storeHelp)
    .option('--volume <volume>', 'only snapshots of this volume (path, vol- id, or the loop device an image is attached to)')
    .option('--tag <key[=value]>', 'only snapshots with this tag (KEY=VALUE, or KEY for any value; repeatable: all must match)', collect, [])
    .option('--name <name>', 'only snapshots of this name')
    .option('--state <state>', 'only snapshots in this state: pending, completed or error')
    .option('--in-bin', 'the snapshots in the recycle bin instead, with when each expires')
    .option('--json', 'print {"snapshots": [...]} ({"bin": [...]} with --in-bin)')
    .addOption(outputOption('ec2'))
    .action(
      action(async (o: StoreFlag & KeyFlags & Out & { volume?: string; tag: string[]; name?: string; state?: string; inBin?: boolean }) => {
        const style = outputStyle(o);
        if (o.inBin) {
          const { entries, damaged } = await snap.listBin(storeOpts(o));
          if (style === 'disksnap') printJson('snapshot-bin-list', { bin: entries });
          else if (style === 'peer') printJson('ec2-list-bin', ec2ListBin(entries));
          else if (entries.length === 0) writeOut('the recycle bin is empty\n');
          else table(['ID', 'VOLUME', 'STARTED', 'DELETED', 'EXPIRES', 'NAME'], entries.map((e) => [e.snapshot.id, e.snapshot.volumeId, e.snapshot.startTime, e.binnedAt, e.binExpires, e.snapshot.name]));
          warnDamaged(damaged, 'recycle-bin entry');
          return;
        }
        if (o.state !== undefined && !['pending', 'completed', 'error'].includes(o.state)) throw new UsageError(`--state must be pending, completed or error, not '${o.state}'`);
        for (const f of o.tag) if (f === '' || f.startsWith('=')) throw new UsageError(`--tag '${f}' must be KEY=VALUE or KEY`);
        const state = o.state as 'pending' | 'completed' | 'error' | undefined;
        const { snapshots, damaged } = await snap.listSnapshots({ ...storeOpts(o), volume: o.volume, tags: o.tag, name: o.name, state, key: keySpec(o) });
        if (style === 'disksnap') printJson('snapshot-list', { snapshots });
        else if (style === 'peer') printJson('ec2-describe-snapshots', ec2DescribeSnapshots(snapshots));
        else if (snapshots.length === 0) writeOut('no snapshots\n');
        else {
          table(
            ['ID', 'STATE', 'VOLUME', 'STARTED', 'SIZE', 'ADDED', 'NAME'],
            snapshots.map((s) => [
              s.id,
              s.state === 'pending' ? `pending ${s.progress}%` : s.state,
              s.volumeId,
              s.startTime.replace(/\.\d+Z$/, 'Z'),
              formatSize(s.volumeSize),
              formatSize(s.stats.bytesAdded),
              (s.encrypted ? '[encrypted] ' : '') + (s.metadataHidden ? '(sealed)' : s.name),
            ]),
          );
        }
        warnDamaged(damaged, 'snapshot record');
        if (damaged.length) throw new ExitStatus(1);
      }),
    );

  keyOptions(snapshot.command('show'), 'to show the name, description and tags of an encrypted snapshot')
    .description('one snapshot (by id, unique id prefix or unique name)')
    .argument('<snap>')
    .option(storeOption, storeHelp)
    .option('--json', 'print the snapshot as JSON')
    .addOption(outputOption('ec2'))
    .action(
      action(async (ref: string, o: StoreFlag & KeyFlags & Out) => {
        const style = outputStyle(o);
        const rec = await snap.showSnapshot(ref, { ...storeOpts(o), key: keySpec(o) });
        if (style === 'disksnap') printJson('snapshot', rec);
        else if (style === 'peer') printJson('ec2-describe-snapshots', ec2DescribeSnapshots([rec]));
        else printSnapshot(rec);
      }),
    );

  // tag and untag: one shape, each with its own argument check
  const tagChanges: Array<[string, string, string, (items: string[]) => { set?: Record<string, string>; remove?: string[] }]> = [
    ['tag', 'set tags on a snapshot (over existing keys)', '<key=value...>', (items) => {
      try {
        return { set: parseTags(items) };
      } catch (e) {
        throw new UsageError((e as Error).message);
      }
    }],
    ['untag', 'remove tags from a snapshot (keys it does not have are ignored)', '<key...>', (keys) => {
      for (const k of keys) if (k === '' || k.includes('=')) throw new UsageError(`'${k}' is not a tag key (untag takes keys, not KEY=VALUE)`);
      return { remove: keys };
    }],
  ];
  for (const [name, description, items, change] of tagChanges) {
    keyOptions(snapshot.command(name), 'of an encrypted snapshot (its tags are sealed with it)')
      .description(description)
      .argument('<snap>')
      .argument(items)
      .option(storeOption, storeHelp)
      .option('--json', 'print the snapshot as JSON')
      .action(
        action(async (ref: string, args: string[], o: StoreFlag & KeyFlags) => {
          const rec = await snap.tagSnapshot(ref, change(args), { ...storeOpts(o), key: keySpec(o) });
          if (o.json) printJson('snapshot', rec);
          else printTags(rec);
        }),
      );
  }

  keepOptions(keyOptions(snapshot.command('prune'), 'to read the sealed tags of encrypted snapshots (for --keep-tag)'))
    .description("remove each volume's completed snapshots that a retention policy does not keep (restic's forget rules, UTC buckets)")
    .option(storeOption, storeHelp)
    .option('--volume <volume>', 'only this volume (path or vol- id)')
    .option('--dry-run', 'say what would be removed, remove nothing')
    .option('--json', 'print {"dryRun", "kept": [...], "removed": [...]}')
    .action(
      action(async (o: StoreFlag & KeyFlags & KeepFlags & { volume?: string; dryRun?: boolean }) => {
        const r = await snap.pruneSnapshots(policyOf(o, 'prune'), { ...storeOpts(o), volume: o.volume, dryRun: o.dryRun, key: keySpec(o) });
        if (o.json) printJson('snapshot-prune', r);
        else printPrune(r);
      }),
    );

  keyOptions(snapshot.command('restore'), 'of an encrypted snapshot')
    .description('restore a snapshot into a new sparse image (--to) or roll a volume back (--in-place)')
    .argument('<snap>')
    .option('--to <file>', 'new image to write, raw unless --format or a .qcow2 name says qcow2 (refused if it exists, unless --force)')
    .option('--in-place <volume>', 'roll this volume back, rewriting only the blocks that differ (a qcow2 volume through its guest view)')
    .option('--allow-chain-change', "with --in-place into a qcow2 volume: restore although its backing chain is not the one the snapshot recorded")
    .option('-f, --force', 'with --to: replace an existing file')
    .option('--format <format>', 'with --to: raw (sparse) or qcow2 (standalone qcow2 v3, zero blocks unallocated); default qcow2 for a FILE named *.qcow2, else raw')
    .option(storeOption, storeHelp)
    .option('--wait <seconds>', waitHelp, secondsArg)
    .option('--json', 'print a JSON report')
    .action(
      action(async (ref: string, o: StoreFlag & KeyFlags & { to?: string; inPlace?: string; force?: boolean; format?: string; allowChainChange?: boolean }) => {
        if ((o.to === undefined) === (o.inPlace === undefined)) throw new UsageError('restore needs exactly one of --to FILE and --in-place VOLUME');
        if (o.format !== undefined && o.to === undefined) throw new UsageError('--format applies to --to FILE only');
        if (o.allowChainChange && o.inPlace === undefined) throw new UsageError('--allow-chain-change applies to --in-place only');
        const format = o.to === undefined ? undefined : outputFormat(o.format, o.to);
        const r = await withBar('restore', o.json, (onProgress) =>
          snap.restoreSnapshot(ref, { ...storeOpts(o), to: o.to, inPlace: o.inPlace, force: o.force, format, allowChainChange: o.allowChainChange, key: keySpec(o), onProgress }),
        );
        if (o.json) printJson('snapshot-restore', r);
        else if (r.mode === 'file') {
          const rest = format === 'qcow2' ? 'as a standalone qcow2 image, zero blocks unallocated' : 'as a raw image, the rest left sparse';
          writeOut(`restored ${r.snapshotId} to ${r.target}: ${formatSize(r.volumeSize)}, ${r.blocksWritten} data blocks (${formatSize(r.bytesWritten)}) written, ${rest}\n`);
        } else {
          writeOut(
            `rolled ${r.target} back to ${r.snapshotId}: ${r.blocksWritten} blocks rewritten, ${r.blocksPunched} punched to holes, ${r.blocksUnchanged} already equal\n`,
          );
        }
      }),
    );

  snapshot
    .command('delete')
    .description('delete a snapshot (the others stay restorable; `store gc` frees its blocks)')
    .argument('<snap>')
    .option(storeOption, storeHelp)
    .option('--wait <seconds>', waitHelp, secondsArg)
    .option('--dry-run', 'check that the snapshot can be deleted (exists, not locked, not being taken) and delete nothing')
    .option('--permanently', 'skip the recycle bin (store bin), when the store has one')
    .option('--json', 'print a JSON report')
    .action(
      action(async (ref: string, o: StoreFlag & { dryRun?: boolean; permanently?: boolean }) => {
        const r = await snap.deleteSnapshot(ref, { ...storeOpts(o), dryRun: o.dryRun, permanently: o.permanently });
        if (o.json) printJson('snapshot-delete', { deleted: r.id, state: r.state, dryRun: r.dryRun, ...(r.binExpires ? { binExpires: r.binExpires } : {}) });
        else if (r.dryRun) writeOut(`would delete ${r.id} (dry run: nothing deleted)\n`);
        else writeOut(r.binExpires ? `deleted ${r.id}: in the recycle bin until ${r.binExpires} (snapshot undelete ${r.id})\n` : `deleted ${r.id}\n`);
      }),
    );

  snapshot
    .command('undelete')
    .description('bring a deleted snapshot back from the recycle bin (store bin), whole, before it expires')
    .argument('<snap>', 'id, unique id prefix or name')
    .option(storeOption, storeHelp)
    .option('--json', 'print the snapshot as JSON')
    .addOption(outputOption('ec2'))
    .action(
      action(async (ref: string, o: StoreFlag & Out) => {
        const style = outputStyle(o);
        const rec = await snap.undeleteSnapshot(ref, storeOpts(o));
        if (style === 'disksnap') printJson('snapshot', rec);
        else if (style === 'peer') printJson('ec2-snapshot', ec2Snapshot(rec));
        else writeOut(`${rec.id} is back (${rec.state})\n`);
      }),
    );

  snapshot
    .command('lock')
    .description('make delete and prune refuse a snapshot until a time (later locks extend it; unlock removes it)')
    .argument('<snap>')
    .requiredOption('--until <time>', 'an ISO time (2027-01-31, 2027-01-31T12:00:00Z) or a duration from now (90m, 12h, 30d, 2w)', untilArg)
    .option(storeOption, storeHelp)
    .option('--json', 'print the snapshot as JSON')
    .addOption(outputOption('ec2'))
    .action(
      action(async (ref: string, o: StoreFlag & Out & { until: string }) => {
        const style = outputStyle(o);
        const rec = await snap.lockSnapshot(ref, o.until, storeOpts(o));
        if (style === 'disksnap') printJson('snapshot', rec);
        else if (style === 'peer') printJson('ec2-lock-snapshot', ec2LockSnapshot(rec));
        else writeOut(`${rec.id} locked until ${rec.lockedUntil}\n`);
      }),
    );
  snapshot
    .command('unlock')
    .description('remove the lock of a snapshot')
    .argument('<snap>')
    .option(storeOption, storeHelp)
    .option('--json', 'print the snapshot as JSON')
    .addOption(outputOption('ec2'))
    .action(
      action(async (ref: string, o: StoreFlag & Out) => {
        const style = outputStyle(o);
        const rec = await snap.lockSnapshot(ref, null, storeOpts(o));
        if (style === 'disksnap') printJson('snapshot', rec);
        else if (style === 'peer') printJson('ec2-unlock-snapshot', { SnapshotId: rec.id });
        else writeOut(`${rec.id} unlocked\n`);
      }),
    );

  keyOptions(snapshot.command('diff'), 'of encrypted snapshots (optional: authenticates their manifests)')
    .description('indexes of the blocks that differ between two snapshots of one volume')
    .argument('<snap-a>')
    .argument('<snap-b>')
    .option(storeOption, storeHelp)
    .option('--json', 'print {"blockSize": N, "changedBlocks": [...]}')
    .action(
      action(async (a: string, b: string, o: StoreFlag & KeyFlags) => {
        const r = await snap.diffSnapshots(a, b, { ...storeOpts(o), key: keySpec(o) });
        if (o.json) printJson('snapshot-diff', r);
        else {
          writeOut(`${r.changedBlocks.length} changed blocks of ${formatSize(r.blockSize)}\n`);
          if (r.changedBlocks.length) writeOut(r.changedBlocks.join('\n') + '\n');
        }
      }),
    );

  keyOptions(snapshot.command('verify'), 'of an encrypted snapshot')
    .description('re-read every block of a snapshot and check its digest')
    .argument('<snap>')
    .option(storeOption, storeHelp)
    .option('--wait <seconds>', waitHelp, secondsArg)
    .option('--json', 'print a JSON report')
    .action(
      action(async (ref: string, o: StoreFlag & KeyFlags) => {
        const r = await withBar('verify', o.json, (onProgress) => snap.verifySnapshot(ref, { ...storeOpts(o), key: keySpec(o), onProgress }));
        if (o.json) printJson('snapshot-verify', r);
        else if (r.ok) writeOut(`${r.snapshotId} ok: ${r.blocksChecked} blocks (${formatSize(r.bytesChecked)}) match their digests\n`);
        if (!r.ok) {
          if (r.manifestError) log(`disksnap: ${r.snapshotId}: ${r.manifestError}`);
          const shown = r.badBlocks.slice(0, 10);
          for (const b of shown) log(`disksnap: ${r.snapshotId}: block ${b.index}: ${b.reason}`);
          if (r.badBlocks.length > shown.length) log(`disksnap: ... and ${r.badBlocks.length - shown.length} more bad blocks`);
          log(`disksnap: ${r.snapshotId} is damaged: ${r.badBlocks.length} bad blocks${r.manifestError ? ', damaged manifest' : ''}`);
          throw new ExitStatus(1);
        }
      }),
    );

  snapshot
    .command('copy')
    .description('copy a completed snapshot to another store (incremental; an encrypted one stays encrypted)')
    .argument('<snap>')
    .requiredOption('--to-store <dir>', 'destination store (created with the snapshot\'s block size if missing)')
    .option(storeOption, storeHelp)
    .option('--encrypt', 'encrypt the copy of an unencrypted snapshot (with --key-file or --passphrase-file)')
    .option('--key-file <file>', 'key of the copy (and of the source, unless --source-key-file): 32 random bytes')
    .option('--passphrase-file <file>', 'passphrase of the copy (and of the source, unless given separately); default $DISKSNAP_PASSPHRASE')
    .option('--source-key-file <file>', 're-key: the key of the encrypted source snapshot')
    .option('--source-passphrase-file <file>', 're-key: the passphrase of the encrypted source snapshot')
    .option('--name <name>', 'name of the copy (default: the source\'s)')
    .option('--description <text>', 'description of the copy (default: the source\'s)')
    .option('--tag <key=value>', 'tag, over the source\'s tags (repeatable)', collect, [])
    .option('--wait <seconds>', waitHelp, secondsArg)
    .option('--json', 'print the copy as JSON')
    .addOption(outputOption('ec2'))
    .action(
      action(
        async (
          ref: string,
          o: StoreFlag &
            KeyFlags &
            Out & { toStore: string; encrypt?: boolean; sourceKeyFile?: string; sourcePassphraseFile?: string; name?: string; description?: string; tag: string[] },
        ) => {
          const style = outputStyle(o);
          if (o.sourceKeyFile !== undefined && o.sourcePassphraseFile !== undefined) throw new UsageError('give one of --source-key-file and --source-passphrase-file');
          const sourceKey: KeySpec | undefined =
            o.sourceKeyFile !== undefined ? { keyFile: o.sourceKeyFile } : o.sourcePassphraseFile !== undefined ? { passphraseFile: o.sourcePassphraseFile } : undefined;
          const tags = parseTags(o.tag);
          const rec = await withBar('copy', style !== 'human', (onProgress) =>
            snap.copySnapshot(ref, {
              ...storeOpts(o),
              toStore: o.toStore,
              encrypt: o.encrypt,
              key: keySpec(o),
              sourceKey,
              name: o.name,
              description: o.description,
              tags,
              onProgress,
              onLog: (m) => log(`disksnap: ${m}`),
            }),
          );
          if (style === 'disksnap') printJson('snapshot', rec);
          else if (style === 'peer') printJson('ec2-copy-snapshot', ec2CopySnapshot(rec));
          else {
            writeOut(
              `${rec.copiedFrom!.snapshotId} copied to ${rec.id} (${rec.state}) in ${o.toStore}: ${rec.stats.dataBlocks} data blocks, ` +
                `${rec.stats.changedBlocks} changed${rec.parentId ? ` since ${rec.parentId}` : ''}, ${rec.stats.blocksAdded} added (${formatSize(rec.stats.bytesAdded)})` +
                (rec.encrypted ? `, encrypted (key ${rec.keyId})` : '') +
                '\n',
            );
          }
        },
      ),
    );
}
