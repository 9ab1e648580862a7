/**
 * `volume …`, `store …` and `key …`: the store's records of volumes, its maintenance, and
 * key files. The flags and conventions are the snapshot commands' (./store-common.ts).
 */
import { Command } from 'commander';
import * as snap from '../storage';
import { generateKeyFile } from '../storage/keys';
import { formatSize } from '../engine/size';
import { keepOptions, KeepFlags, policyOf, policyText } from './retention';
import { KeyFlags, keySpec, secondsArg, StoreFlag, storeHelp, storeOption, storeOpts, table, waitHelp, warnDamaged } from './store-common';
import { ExitStatus, UsageError, action, durationArg, log, OutputFormat, outputOption, outputStyle, printJson, powerOfTwoArg } from './util';
import { ec2Volume } from './ec2';
import { attachmentOf } from '../host/attach';
import { writeOut } from '../engine/stdio';

export function register(program: Command): void {
  const volume = program.command('volume').description('volumes known to a snapshot store');
  volume
    .command('register')
    .description("record a volume in the store (snapshot create does this for unknown volumes)")
    .argument('<volume>')
    .option(storeOption, storeHelp)
    .option('--block-size <size>', 'block size of a store this command creates (default 512K)', powerOfTwoArg('block size', 4096, 64 * 1024 * 1024))
    .option('--encrypted', 'encrypt every snapshot of the volume (with --key-file or --passphrase-file)')
    .option('--key-file <file>', 'key for --encrypted: a file of 32 random bytes (head -c 32 /dev/urandom > K)')
    .option('--passphrase-file <file>', 'passphrase for --encrypted (its first line; default $DISKSNAP_PASSPHRASE)')
    .option('--json', 'print the volume record as JSON')
    .action(
      action(async (v: string, o: StoreFlag & KeyFlags & { blockSize?: number; encrypted?: boolean }) => {
        const rec = await snap.registerVolume(v, { ...storeOpts(o), blockSize: o.blockSize, encrypted: o.encrypted, key: keySpec(o) });
        if (o.json) printJson('volume', rec);
        else writeOut(`${rec.id} ${rec.path} (${formatSize(rec.size)})${rec.encrypted ? `, encrypted (key ${rec.keyId})` : ''}\n`);
      }),
    );
  keepOptions(volume.command('policy'))
    .description("set the retention rules applied to the volume's snapshots after each one completes (as snapshot prune; the new one is always kept)")
    .argument('<volume>', 'path, vol- id or attached loop device')
    .option('--clear', 'remove the policy')
    .option(storeOption, storeHelp)
    .option('--json', 'print the volume record as JSON')
    .action(
      action(async (v: string, o: StoreFlag & KeepFlags & { clear?: boolean }) => {
        const given = o.keepTag.length > 0 || [o.keepLast, o.keepHourly, o.keepDaily, o.keepWeekly, o.keepMonthly, o.keepYearly].some((x) => x !== undefined);
        if (o.clear && given) throw new UsageError('--clear removes the policy: give it without --keep-* rules');
        const rec = await snap.setVolumeRetention(v, o.clear ? null : policyOf(o, 'volume policy'), storeOpts(o));
        if (o.json) printJson('volume', rec);
        else writeOut(rec.retention ? `${rec.id}: after each snapshot, keep ${policyText(rec.retention)}\n` : `${rec.id}: no retention policy\n`);
      }),
    );
  volume
    .command('list')
    .description('volumes recorded in the store')
    .option(storeOption, storeHelp)
    .option('--json', 'print {"volumes": [...]}')
    .addOption(outputOption('ec2'))
    .action(
      action(async (o: StoreFlag & { json?: boolean; output?: OutputFormat }) => {
        const style = outputStyle(o);
        const { volumes, damaged } = await snap.listVolumes(storeOpts(o));
        if (style === 'disksnap') printJson('volume-list', { volumes });
        else if (style === 'peer') printJson('ec2-describe-volumes', { Volumes: volumes.map((v) => ec2Volume(v, attachmentOf(v.path) !== undefined)) });
        else if (volumes.length === 0) writeOut('no volumes\n');
        else {
          table(
            ['ID', 'SIZE', 'ENCRYPTED', 'POLICY', 'PATH'],
            volumes.map((v) => [v.id, formatSize(v.size), String(v.encrypted), v.retention ? policyText(v.retention) : '-', v.path + (v.inPlaceRestore ? `  (unfinished in-place restore of ${v.inPlaceRestore.snapshotId})` : '')]),
          );
        }
        warnDamaged(damaged, 'volume record');
        if (damaged.length) throw new ExitStatus(1);
      }),
    );

  program
    .command('key')
    .description('encryption keys')
    .command('generate')
    .description('write a new key file (32 random bytes, mode 0600) for --key-file')
    .argument('<file>')
    .option('--force', 'replace an existing file')
    .option('--json', 'print the file and key id as JSON')
    .action(
      action(async (file: string, o: { force?: boolean; json?: boolean }) => {
        const r = await generateKeyFile(file, { force: o.force });
        if (o.json) printJson('key-generate', r);
        else writeOut(`wrote a new key to ${r.file} (${r.keyId}); keep a copy elsewhere: what is encrypted with it cannot be read without it\n`);
      }),
    );

  const store = program.command('store').description('snapshot store maintenance');
  store
    .command('bin')
    .description('the recycle bin: with a retention, snapshot delete moves snapshots there (snapshot undelete brings them back; gc purges them when they expire)')
    .option('--retention <time>', 'keep deleted snapshots this long (90m, 12h, 30d, 2w)', durationArg)
    .option('--off', 'no bin from now on (what is in it stays until it expires)')
    .option(storeOption, storeHelp)
    .option('--json', 'print {"retentionSeconds": N or null}')
    .action(
      action(async (o: StoreFlag & { retention?: number; off?: boolean }) => {
        if (o.off && o.retention !== undefined) throw new UsageError('give --retention or --off, not both');
        const r = o.off || o.retention !== undefined ? await snap.setBinRetention(o.off ? null : o.retention!, storeOpts(o)) : await snap.binSettings(storeOpts(o));
        if (o.json) printJson('store-bin', r);
        else writeOut(r.retentionSeconds === null ? 'no recycle bin: snapshot delete removes snapshots at once\n' : `recycle bin: deleted snapshots are kept ${r.retentionSeconds} s (${(r.retentionSeconds / 86400).toFixed(1)} days)\n`);
      }),
    );
  store
    .command('init')
    .description('create a snapshot store (the block size is fixed from then on)')
    .option(storeOption, storeHelp)
    .option('--block-size <size>', 'block size (default 512K, power of two from 4K to 64M)', powerOfTwoArg('block size', 4096, 64 * 1024 * 1024))
    .option('--json', 'print the store as JSON')
    .action(
      action(async (o: StoreFlag & { blockSize?: number }) => {
        const info = await snap.initStore({ ...storeOpts(o), blockSize: o.blockSize });
        if (o.json) printJson('store-info', info);
        else writeOut(`store ${info.path}: block size ${formatSize(info.blockSize)}, ${info.id}\n`);
      }),
    );
  store
    .command('gc')
    .description('delete block objects no completed snapshot references (waits for running commands)')
    .option(storeOption, storeHelp)
    .option('--wait <seconds>', waitHelp, secondsArg)
    .option('--dry-run', 'count what gc would free, delete nothing')
    .option('--json', 'print a JSON report')
    .action(
      action(async (o: StoreFlag & { dryRun?: boolean }) => {
        const r = await snap.gc({ ...storeOpts(o), dryRun: o.dryRun, onWait: () => log('disksnap: waiting for running snapshot commands to finish...'), onLog: (m) => log(`disksnap: ${m}`) });
        if (o.json) printJson('store-gc', r);
        else {
          writeOut(
            `${r.dryRun ? 'would free' : 'freed'} ${r.blocksFreed} blocks (${formatSize(r.bytesFreed)}) and ${r.otherFilesRemoved} other files (${formatSize(r.otherBytesFreed)}); ` +
              `kept ${r.blocksKept} blocks (${formatSize(r.bytesKept)}) of ${r.liveSnapshots} snapshots` +
              (r.staleSnapshots.length ? `; marked ${r.staleSnapshots.length} abandoned snapshots as error` : '') +
              (r.reflinkClonesRemoved.length ? `; removed ${r.reflinkClonesRemoved.length} stale reflink clones` : '') +
              (r.dryRun ? ' (dry run: nothing deleted)' : '') +
              '\n',
          );
        }
      }),
    );
}
