/**
 * Differencing disks beside QEMU, measured side by side in one run on the same 1 GiB parent
 * (random content, page cache warm), 64 KiB-cluster overlays:
 *
 *   - `disksnap bench` (the CLI, as a user runs it) on a fresh disksnap child vs
 *     `qemu-img bench -t writeback` on a fresh qemu-img overlay: 4 KiB writes at depth 1
 *     (every 16th allocates a cluster and copies the rest of it from the parent), then
 *     4 KiB reads of what was written, then the same at depth 16 and 64.
 *   - `diff commit` of a child with 512 MiB written (library call: the work itself, without
 *     the CLI's ~0.1-0.2 s of Node start-up) vs `qemu-img commit` of an identical overlay.
 *
 * Both sides run alternately (which one goes first flips every run) and each figure is the
 * median of the runs. Both exclude their final flush from the bench figures, as qemu-img
 * bench does; commit includes everything up to a durable parent and the child gone.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { BenchOptions, BenchRow } from './types';
import { CLI, fillRandom, hasCommand, median, MiB, GiB, run, timed } from './util';
import { WorkedIn } from './workedin';
import { parseQemuSeconds } from './engine';
import * as diff from '../src/differencing';
import { Qcow2Image } from '../src/image/qcow2/image';


function disksnap(args: string[]): string {
  const r = spawnSync(CLI, args, { maxBuffer: 1 << 26 });
  if (r.status !== 0) throw new Error(`disksnap ${args.join(' ')} failed (${r.status}): ${r.stderr}`);
  return r.stdout.toString();
}

function rm(...files: string[]): void {
  for (const f of files) fs.rmSync(f, { force: true });
}

export async function benchDiff(opts: BenchOptions): Promise<BenchRow[]> {
  if (!hasCommand('qemu-img')) {
    process.stderr.write('bench diff: qemu-img is missing (Debian package qemu-utils); no peer to compare with\n');
    return [];
  }
  const quick = !!opts.quick;
  const runs = opts.runs ?? (quick ? 1 : 3);
  const parentSize = quick ? 256 * MiB : GiB;
  const commitBytes = quick ? 64 * MiB : 512 * MiB;
  const count = quick ? 20000 : 75000;
  const dir = opts.dir;
  const parent = path.join(dir, 'parent.raw');
  fillRandom(parent, 0, parentSize);
  run('sync', []);
  const rows: BenchRow[] = [];
  const ours = path.join(dir, 'ours.qcow2');
  const theirs = path.join(dir, 'theirs.qcow2');

  // --- disksnap bench vs qemu-img bench ----------------------------------------------------
  for (const depth of [1, 16, 64]) {
    const w: number[] = [];
    const wq: number[] = [];
    const r: number[] = [];
    const rq: number[] = [];
    for (let i = 0; i < runs; i++) {
      const sides = [
        () => {
          rm(ours);
          if (fs.existsSync(ours + '.disksnap-commit.json')) rm(ours + '.disksnap-commit.json');
          disksnap(['diff', 'create', parent, ours]);
          const wr = JSON.parse(disksnap(['bench', ours, '-w', '-s', '4k', '-d', String(depth), '-c', String(count), '--json'])) as { iops: number };
          const rd = JSON.parse(disksnap(['bench', ours, '-s', '4k', '-d', String(depth), '-c', String(count), '--json'])) as { iops: number };
          w.push(wr.iops);
          r.push(rd.iops);
          disksnap(['diff', 'rollback', ours]);
        },
        () => {
          rm(theirs);
          run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', '-b', parent, '-F', 'raw', theirs]);
          const wout = run('qemu-img', ['bench', '-f', 'qcow2', '-w', '-t', 'writeback', '-s', '4k', '-d', String(depth), '-c', String(count), theirs]).out;
          const rout = run('qemu-img', ['bench', '-f', 'qcow2', '-t', 'writeback', '-s', '4k', '-d', String(depth), '-c', String(count), theirs]).out;
          wq.push(count / parseQemuSeconds(wout));
          rq.push(count / parseQemuSeconds(rout));
          rm(theirs);
        },
      ];
      if (i % 2) sides.reverse();
      for (const s of sides) s();
    }
    const note = depth === 1 ? undefined : `disksnap bench issues each ${depth} requests as one batch (one native call when they land in allocated clusters); qemu-img keeps ${depth} AIO requests in flight`;
    rows.push({
      area: 'differencing disk',
      metric: `4 KiB writes into a fresh child, depth ${depth} (${count} sequential, ${(count * 4) / 1024} MiB)`,
      disksnap: median(w),
      peer: `qemu-img bench -w -t writeback -s 4k -d ${depth}`,
      peerValue: median(wq),
      unit: 'req/s',
      higherIsBetter: true,
      note,
    });
    rows.push({
      area: 'differencing disk',
      metric: `4 KiB reads of the child, depth ${depth}`,
      disksnap: median(r),
      peer: `qemu-img bench -t writeback -s 4k -d ${depth}`,
      peerValue: median(rq),
      unit: 'req/s',
      higherIsBetter: true,
      note,
    });
  }

  // --- diff commit vs qemu-img commit -------------------------------------------------------
  rows.push(...(await benchCommit(dir, parent, parentSize, commitBytes, runs, 'on this machine\'s filesystem [fresh machine]', true)));
  // The same on a worked-in machine (bench/workedin.ts before each side and the floor).
  const workedIn = new WorkedIn(dir, quick);
  try {
    rows.push(...(await benchCommit(dir, parent, parentSize, commitBytes, runs, 'on this machine\'s filesystem [worked-in machine]', true, workedIn)));
  } finally {
    workedIn.close();
  }
  // On a filesystem that shares extents, commit clones the child's clusters into the parent
  // (FICLONERANGE) where qemu-img copies them: measured on a loop-mounted xfs, as root.
  if (process.getuid?.() === 0 && hasCommand('mkfs.xfs')) {
    const img = path.join(dir, 'xfs.img');
    const mnt = path.join(dir, 'xfs');
    fs.mkdirSync(mnt);
    fs.writeFileSync(img, '');
    fs.truncateSync(img, parentSize * 3 + 2 * commitBytes + 512 * MiB);
    run('mkfs.xfs', ['-q', '-m', 'reflink=1', img]);
    run('mount', ['-o', 'loop', img, mnt]);
    try {
      const xfsParent = path.join(mnt, 'parent.raw');
      fs.copyFileSync(parent, xfsParent);
      rows.push(...(await benchCommit(mnt, xfsParent, parentSize, commitBytes, runs, 'on xfs (reflinks)', false)));
    } finally {
      run('umount', [mnt]);
      rm(img);
    }
  }
  return rows;
}

/**
 * `diff commit` vs `qemu-img commit` of identical overlays over copies of `parent` in `dir`.
 * With `floor`, also what any commit that copies must pay on this disk, in the same runs: dd
 * of the same bytes from a synced file into the parent with fdatasync, then removing that
 * file (the child's space given back).
 */
async function benchCommit(dir: string, parent: string, parentSize: number, commitBytes: number, runs: number, where: string, floor: boolean, workedIn?: WorkedIn): Promise<BenchRow[]> {
  /** Runs one measured side: on a worked-in machine, after preparing it, with its background I/O beside. */
  const measured = async (fn: () => Promise<unknown> | unknown) => {
    workedIn?.prepare();
    try {
      await fn();
    } finally {
      workedIn?.stop();
    }
  };
  const p1 = path.join(dir, 'p-ours.raw');
  const p2 = path.join(dir, 'p-qemu.raw');
  const c1 = path.join(dir, 'c-ours.qcow2');
  const c2 = path.join(dir, 'c-qemu.qcow2');
  const data = Buffer.alloc(16 * MiB);
  const tOurs: number[] = [];
  const tQemu: number[] = [];
  const tFloor: number[] = [];
  const floorSrc = path.join(dir, 'floor-src');
  for (let i = 0; i < runs; i++) {
    for (const f of [p1, p2]) {
      if (fs.existsSync(f)) fs.chmodSync(f, 0o644);
      rm(f, f + '.disksnap-children.json');
      fs.copyFileSync(parent, f);
    }
    rm(c1, c2);
    await diff.createChild(p1, c1);
    const img = Qcow2Image.open(c1, { write: true });
    const fd = fs.openSync(parent, 'r');
    for (let pos = 0; pos < commitBytes; pos += data.length) {
      fs.readSync(fd, data, 0, data.length, (pos + 4096) % (parentSize - data.length)); // different from the parent there
      img.writeSync(data, pos);
    }
    fs.closeSync(fd);
    img.close();
    fs.copyFileSync(c1, c2);
    run('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', p2, '-F', 'raw', c2]);
    run('sync', []);
    const sides = [
      async () => tOurs.push(await timed(() => diff.commit(c1))),
      async () => tQemu.push(run('qemu-img', ['commit', '-f', 'qcow2', c2]).seconds),
    ];
    if (i % 2) sides.reverse();
    for (const s of sides) {
      await measured(s);
      run('sync', []);
    }
    if (floor) {
      const fd = fs.openSync(floorSrc, 'w');
      for (let pos = 0; pos < commitBytes; pos += data.length) fs.writeSync(fd, data, 0, data.length, pos);
      fs.closeSync(fd);
      fs.chmodSync(p1, 0o644);
      run('sync', []);
      const mib = commitBytes / MiB;
      await measured(() => tFloor.push(run('sh', ['-c', `dd if="$1" of="$2" bs=1M count=${mib} conv=notrunc,fdatasync status=none && rm "$1"`, 'sh', floorSrc, p1]).seconds));
      run('sync', []);
    }
  }
  const row: BenchRow = {
    area: 'differencing disk',
    metric: `commit a child with ${commitBytes / MiB} MiB written into a raw parent, ${where} (durable, child removed/emptied)`,
    disksnap: median(tOurs),
    peer: 'qemu-img commit',
    peerValue: median(tQemu),
    unit: 's',
    higherIsBetter: false,
    note: 'disksnap: library call (the CLI adds Node start-up); FICLONERANGE where the filesystem shares extents, else 4 parallel copy_file_range with overlapped writeback; the child is removed whole at the end',
  };
  for (const f of [p1, p2]) if (fs.existsSync(f)) fs.chmodSync(f, 0o644);
  if (fs.existsSync(parent)) fs.chmodSync(parent, 0o644);
  if (!floor) return [row];
  return [
    row,
    {
      area: 'differencing disk',
      metric: `the floor of a copying commit of ${commitBytes / MiB} MiB ${where}: dd into the parent with fdatasync, then rm of the synced source`,
      disksnap: median(tOurs),
      peer: 'dd + fdatasync + rm',
      peerValue: median(tFloor),
      unit: 's',
      higherIsBetter: false,
      note: `qemu-img commit in the same runs: ${median(tQemu).toFixed(3)} s; no tool that copies the data can be faster than the floor by much`,
    },
  ];
}
