/**
 * `disksnap attach FILE [--read-only] [--via fuse]` and `disksnap detach DEVICE|FILE`: thin
 * wrappers over src/host/attach.ts. attach prints the device (/dev/loopN) on stdout, or with
 * --json the whole attachment; detach prints nothing unless --json. `--via fuse` serves a raw
 * image through disksnap's FUSE server, whose copy-before-write lets `snapshot create` freeze
 * the mounted filesystem for milliseconds on any host filesystem (src/host/cbw.ts); it is not
 * the default because the FUSE path is slower (README, "Loop devices": measured figures).
 */
import { Command, Option } from 'commander';
import { attach, detach } from '../host/attach';
import { action, log, printJson } from './util';
import { writeOut } from '../engine/stdio';

export function register(program: Command): void {
  program
    .command('attach')
    .description('attach an image to a loop device (a qcow2 child through a FUSE view of it) and print the device')
    .argument('<file>', 'raw image or qcow2 child')
    .option('-r, --read-only', 'attach read-only (required for a parent that has children)')
    .addOption(new Option('--cache <mode>', 'FUSE caching for children').choices(['direct', 'page']).default('direct'))
    .addOption(
      new Option('--via <how>', "'fuse': serve a raw image through disksnap's FUSE view too (snapshots of it then freeze its filesystem for milliseconds)")
        .choices(['auto', 'fuse'])
        .default('auto'),
    )
    .option('--json', 'print the attachment as JSON')
    .action(
      action(async (file: string, opts: { readOnly?: boolean; cache: 'direct' | 'page'; via: 'auto' | 'fuse'; json?: boolean }) => {
        const a = await attach(file, { readOnly: !!opts.readOnly, cache: opts.cache, via: opts.via });
        if (opts.json) printJson('attach', a);
        else writeOut(`${a.device}\n`);
      }),
    );

  program
    .command('detach')
    .description('release a loop device attached by `attach` (by device, or every attachment of an image)')
    .argument('<target>', '/dev/loopN or the image file')
    .option('--json', 'print what was detached as JSON')
    .action(
      action(async (target: string, opts: { json?: boolean }) => {
        const results = await detach(target);
        for (const r of results) {
          if (r.serverWasDead) {
            log(
              `disksnap: the FUSE server of ${r.image ?? r.device} had died (its log: ${r.log ?? 'none'}); its mount is removed. ` +
                `Run \`disksnap diff check --repair ${r.image ?? ''}\` before using the child again.`,
            );
          }
        }
        if (opts.json) printJson('detach', { detached: results });
      }),
    );
}
