/**
 * `disksnap checkpoint ...`: named checkpoint trees over a VM's disk image (the library is
 * src/differencing/checkpoint.ts; live forms over QMP in src/differencing/live.ts). IMAGE keeps
 * its path through every command; nodes live in IMAGE.checkpoints/.
 */
import { Command } from 'commander';
import * as cp from '../differencing/checkpoint';
import { createLive } from '../differencing/live';
import { removeLive } from '../differencing/live-delete';
import { formatSize } from '../engine/size';
import { qmpFor } from '../host/qmp-find';
import { reporter } from './progress';
import { action, printJson } from './util';
import { writeOut } from '../engine/stdio';

/** QEMU's job progress on stderr (./progress.ts). */
function progress(label: string, json?: boolean): (done: number, total: number) => void {
  const r = reporter(label, { json });
  return (done, total) => {
    r.update(label, done, total, true);
    if (done >= total) r.stop();
  };
}

function printTree(t: cp.TreeInfo): void {
  const out: string[] = [`${t.image} (${formatSize(t.imageAllocated)}) sits on ${t.current ?? '(no checkpoint)'}`];
  const walk = (name: string, depth: number): void => {
    const n = t.nodes.find((x) => x.name === name)!;
    const here = t.current === name ? '  <- IMAGE' : '';
    out.push(`${'  '.repeat(depth)}${n.name}  ${n.created ?? '?'}  ${formatSize(n.allocated)}${here}`);
    for (const c of n.children) walk(c, depth + 1);
  };
  for (const r of t.nodes.filter((n) => n.parent === undefined)) {
    if (r.base) out.push(`(over ${r.base})`);
    walk(r.name, 0);
  }
  writeOut(out.join('\n') + '\n');
}

export function register(program: Command): void {
  const group = program.command('checkpoint').description('named checkpoints of a VM disk image: a tree of read-only nodes, IMAGE always at its path');

  group
    .command('create')
    .description('what IMAGE shows now becomes node NAME; IMAGE continues as a fresh child of it')
    .argument('<image>', 'the qcow2 image a VM uses')
    .argument('<name>')
    .option('--qmp <socket>', 'IMAGE is in use by a running QEMU: switch it live over this QMP socket (default: found from the QEMU holding IMAGE)')
    .option('--json', 'print JSON')
    .action(
      action(async (image: string, name: string, opts: { qmp?: string; json?: boolean }) => {
        const qmp = await qmpFor(image, opts.qmp, 'make a checkpoint');
        const n = qmp ? await createLive(image, name, { qmp }) : await cp.create(image, name);
        if (opts.json) printJson('checkpoint-node', qmp ? { ...n, qmp } : n);
        else writeOut(`checkpoint ${n.name}: ${n.file}${qmp ? ` (live, QMP ${qmp})` : ''}; ${image} continues over it\n`);
      }),
    );

  group
    .command('list')
    .description('the tree: names, times, sizes, and the node IMAGE sits on')
    .argument('<image>')
    .option('--json', 'print JSON')
    .action(
      action(async (image: string, opts: { json?: boolean }) => {
        const t = await cp.list(image);
        if (opts.json) printJson('checkpoint-tree', t);
        else printTree(t);
      }),
    );

  group
    .command('revert')
    .description('IMAGE becomes a fresh child of NAME (any node); what it held is discarded, or kept as node AS')
    .argument('<image>')
    .argument('<name>')
    .option('--keep <as>', 'keep what IMAGE holds now as a new node AS')
    .option('--json', 'print JSON')
    .action(
      action(async (image: string, name: string, opts: { keep?: string; json?: boolean }) => {
        const t = await cp.revert(image, name, { keep: opts.keep });
        if (opts.json) printJson('checkpoint-tree', t);
        else writeOut(`${image} now sits on ${name}${opts.keep ? `; its previous state is node ${opts.keep}` : ''}\n`);
      }),
    );

  group
    .command('delete')
    .description('remove node NAME, leaf or inner, without changing what any other node or IMAGE shows')
    .argument('<image>')
    .argument('<name>')
    .option('--qmp <socket>', "IMAGE is in use by a running QEMU: a node in its chain is merged by QEMU's block-stream (default: found from the QEMU holding IMAGE)")
    .option('--json', 'print JSON')
    .action(
      action(async (image: string, name: string, opts: { json?: boolean; qmp?: string }) => {
        const qmp = await qmpFor(image, opts.qmp, 'delete a checkpoint');
        const r = qmp ? await removeLive(image, name, { qmp, onProgress: progress('delete', opts.json) }) : await cp.remove(image, name);
        if (opts.json) printJson('checkpoint-delete', r);
        else {
          const live = r.streamed.length ? ` (${r.streamed.join(', ')} by the running QEMU's block-stream)` : '';
          writeOut(`deleted ${name}: merged into ${r.mergedInto.length} child(ren)${live}, ${formatSize(r.bytesCopied)} copied${qmp ? `; QMP ${qmp}` : ''}\n`);
        }
      }),
    );

  group
    .command('squash')
    .description('fold the nodes from FROM (an ancestor) up to TO into TO')
    .argument('<image>')
    .argument('<from>')
    .argument('<to>')
    .option('--json', 'print JSON')
    .action(
      action(async (image: string, from: string, to: string, opts: { json?: boolean }) => {
        const r = await cp.squash(image, from, to);
        if (opts.json) printJson('checkpoint-squash', r);
        else writeOut(`squashed into ${to}: deleted ${r.deleted.join(', ') || 'nothing'}\n`);
      }),
    );

  group
    .command('resume')
    .description('finish an operation on the tree that was interrupted (any command also does this first)')
    .argument('<image>')
    .option('--json', 'print {"image", "unfinished": false}')
    .action(
      action(async (image: string, opts: { json?: boolean }) => {
        await cp.resume(image);
        if (opts.json) printJson('checkpoint-resume', { image, unfinished: false });
        else writeOut(`${image}: nothing left unfinished\n`);
      }),
    );
}
