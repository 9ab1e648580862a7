/**
 * `disksnap diff ...`: differencing disks (qcow2 children over read-only parents).
 * Each command is a few lines over src/differencing/ (its index); results on stdout (`--json` for machines),
 * progress on stderr.
 */
import { Command, Option } from 'commander';
import * as diff from '../differencing';
import { commitLive } from '../differencing/live';
import { DisksnapError } from '../engine/errors';
import { formatSize } from '../engine/size';
import { qemuCheck } from '../image/qemu';
import { qmpFor } from '../host/qmp-find';
import { reporter } from './progress';
import { action, ExitStatus, OutputFormat, outputFormat, outputOption, outputStyle, printJson, printQemuJson, powerOfTwoArg, UsageError } from './util';
import { writeErr, writeOut } from '../engine/stdio';

/** Progress of a commit or flatten on stderr (./progress.ts), in bytes. */
function progress(label: string): diff.Progress {
  const r = reporter(label);
  return (done, total) => {
    r.update(label, done, total);
    if (done >= total) r.stop();
  };
}

export function register(program: Command): void {
  const group = program.command('diff').description('differencing disks: qcow2 children over read-only parents');

  group
    .command('create')
    .description('make CHILD, a qcow2 child recording every write over PARENT (which becomes read-only)')
    .argument('<parent>', 'raw image or qcow2 child')
    .argument('<child>', 'qcow2 file to create')
    .option('--cluster-size <size>', 'cluster size, 512 to 2M (default 64K)', powerOfTwoArg('cluster size', 512, 2 * 1024 * 1024))
    .option('-f, --force', 'replace an existing CHILD')
    .option('--json', 'print JSON')
    .action(
      action(async (parent: string, child: string, opts: { clusterSize?: number; force?: boolean; json?: boolean }) => {
        const r = await diff.createChild(parent, child, { clusterSize: opts.clusterSize, force: opts.force });
        if (opts.json) printJson('diff-child', r);
        else
          writeOut(
            `created ${r.child}: qcow2 child of ${r.parent} (${r.parentFormat}), ${formatSize(r.virtualSize)}, ${formatSize(r.clusterSize)} clusters; ${r.parent} is now read-only\n`,
          );
      }),
    );

  group
    .command('rollback')
    .description('discard CHILD: its parent is exactly as it was; writable again when its last child is gone')
    .argument('<child>')
    .option('--recursive', "also discard the child's own children")
    .option('--dry-run', 'make every check a rollback makes and say what it would remove; remove nothing')
    .option('--json', 'print JSON')
    .action(
      action((child: string, opts: { recursive?: boolean; dryRun?: boolean; json?: boolean }) => {
        const r = diff.rollback(child, { recursive: opts.recursive, dryRun: opts.dryRun });
        if (opts.json) printJson('diff-rollback', r);
        else {
          const [did, left, again] = r.dryRun ? ['would remove', 'would have', 'would be'] : ['removed', 'has', 'is'];
          writeOut(`${did} ${r.removed.join(', ')}${r.dryRun ? ' (dry run: nothing removed)' : ''}\n`);
          writeOut(
            r.remaining.length === 0
              ? `${r.parent} ${left} no children left and ${again} writable again\n`
              : `${r.parent} ${r.dryRun ? 'would still have' : 'still has'} ${r.remaining.length} child${r.remaining.length > 1 ? 'ren' : ''} and ${r.dryRun ? 'would stay' : 'stays'} read-only\n`,
          );
        }
      }),
    );

  group
    .command('reset')
    .description('replace CHILD with a fresh empty child of the same parent (go back in one step)')
    .argument('<child>')
    .option('--accept-parent', 'accept a parent that changed since the child was made')
    .option('--json', 'print JSON')
    .action(
      action(async (child: string, opts: { acceptParent?: boolean; json?: boolean }) => {
        const r = await diff.reset(child, { acceptParent: opts.acceptParent });
        if (opts.json) printJson('diff-child', r);
        else writeOut(`reset ${r.child}: empty child of ${r.parent}\n`);
      }),
    );

  group
    .command('commit')
    .description("write CHILD's data into its parent, then discard CHILD (or keep it, empty)")
    .argument('<child>')
    .option('--keep-child', 'keep CHILD as an empty child of the updated parent')
    .option('--allow-sibling-change', 'commit even though the parent has other children (they will see the change)')
    .addOption(new Option('--force').hideHelp())
    .option('--qmp <socket>', 'CHILD is the active image of a running QEMU: commit live (block-commit), the VM moves onto the parent')
    .option('--json', 'print JSON')
    .action(
      action(async (child: string, opts: { keepChild?: boolean; allowSiblingChange?: boolean; force?: boolean; json?: boolean; qmp?: string }) => {
        // --force means "replace the output file" everywhere else; here it once meant this
        if (opts.force) throw new UsageError('diff commit --force is now --allow-sibling-change (--force only ever replaces an output file)');
        const qmp = await qmpFor(child, opts.qmp, 'commit');
        if (qmp) {
          if (opts.keepChild) throw new DisksnapError('--keep-child is not supported with --qmp (QEMU drops the child when it pivots)', 'EINVALID');
          const l = await commitLive(child, { qmp, allowSiblingChange: opts.allowSiblingChange, onProgress: progress('commit') });
          if (opts.json) printJson('diff-commit-live', { ...l, qmp });
          else writeOut(`committed ${l.child} into ${l.parent} live (QMP ${qmp}); the VM now runs on ${l.parent}; ${l.child} removed\n`);
          return;
        }
        const r = await diff.commit(child, { keepChild: opts.keepChild, allowSiblingChange: opts.allowSiblingChange, onProgress: progress('commit') });
        if (opts.json) printJson('diff-commit', r);
        else {
          writeOut(
            `committed ${r.child} into ${r.parent}: ${formatSize(r.bytesCopied)} written, ${formatSize(r.bytesZeroed)} zeroed${r.resumed ? ' (resumed an interrupted commit)' : ''}; ` +
              (r.keptChild ? `${r.child} is empty\n` : `${r.child} removed\n`),
          );
          if (r.siblings.length) {
            writeErr(
              `warning: ${r.parent} changed under its other children (${r.siblings.join(', ')}); they will refuse to open until rolled back or re-accepted with 'disksnap diff accept-parent'\n`,
            );
          }
        }
      }),
    );

  group
    .command('flatten')
    .description('write OUT, a standalone image of what CHILD shows: sparse raw, or qcow2 (--format, or an OUT named *.qcow2)')
    .argument('<child>')
    .argument('<out>')
    .option('-f, --force', 'overwrite an existing OUT')
    .option('--format <format>', 'raw (sparse) or qcow2 (standalone qcow2 v3, zero clusters unallocated); default qcow2 for an OUT named *.qcow2, else raw')
    .option('--json', 'print JSON')
    .action(
      action(async (child: string, out: string, opts: { force?: boolean; format?: string; json?: boolean }) => {
        const format = outputFormat(opts.format, out);
        const r = await diff.flatten(child, out, { force: opts.force, format, onProgress: progress('flatten') });
        if (opts.json) printJson('diff-flatten', r);
        else writeOut(`wrote ${r.out}: ${r.format}, ${formatSize(r.virtualSize)}, ${formatSize(r.dataBytes)} of data\n`);
      }),
    );

  group
    .command('check')
    .description('check refcounts and L1/L2 tables of a qcow2 image; exit 0 clean, 1 check failed, 2 corruption, 3 leaks only, 63 raw (as qemu-img check)')
    .argument('<image>')
    .option('--repair', 'free leaked clusters (never touches an image with corruption)')
    .option('--json', "print disksnap's JSON document")
    .addOption(outputOption())
    .action(
      action((image: string, opts: { repair?: boolean; json?: boolean; output?: OutputFormat }) => {
        const style = outputStyle(opts);
        const r = diff.check(image, { repair: opts.repair });
        if (style === 'peer') {
          // qemu-img check --output=json: the document on stdout, the findings on stderr; a raw
          // image has no document ("does not support checks", exit 63)
          for (const m of r.messages) writeErr(`${m}\n`);
          if (r.format === 'qcow2') printQemuJson('qemu-check', qemuCheck(r));
        } else if (style === 'disksnap') printJson('diff-check', r);
        else {
          for (const m of r.messages) writeOut(`${m}\n`);
          if (r.corruptions > 0) writeOut(`${r.corruptions} error${r.corruptions > 1 ? 's' : ''} were found on the image.\n`);
          if (r.leaks > 0) writeOut(`${r.leaks} leaked cluster${r.leaks > 1 ? 's' : ''} were found on the image (repair with --repair).\n`);
          if (r.format === 'qcow2') {
            if (r.corruptions === 0 && r.leaks === 0) writeOut('No errors were found on the image.\n');
            writeOut(`${r.allocatedClusters}/${r.totalClusters} guest clusters allocated; image end offset ${r.imageEndOffset}\n`);
          }
        }
        if (r.exitCode !== 0) throw new ExitStatus(r.exitCode);
      }),
    );

  group
    .command('accept-parent')
    .description("record CHILD's parent as it is now (after a deliberate change, or for a child made by qemu-img)")
    .argument('<child>')
    .option('--json', 'print JSON')
    .action(
      action((child: string, opts: { json?: boolean }) => {
        const r = diff.acceptParent(child);
        if (opts.json) printJson('diff-accept-parent', r);
        else writeOut(`${r.child}: parent ${r.parent} accepted as it is now (guard was: ${r.before})\n`);
      }),
    );

  group
    .command('children')
    .description('list the children disksnap knows a parent has')
    .argument('<parent>')
    .option('--json', 'print JSON')
    .action(
      action((parent: string, opts: { json?: boolean }) => {
        const children = diff.childrenOf(parent);
        if (opts.json) printJson('diff-children', { parent, children });
        else for (const c of children) writeOut(`${c}\n`);
      }),
    );
}
