/**
 * Loopback: sequential 1 MiB I/O through an attached differencing child (qcow2 → FUSE view →
 * loop device) beside the same through an attached raw image (loop device straight on the
 * file), and reading the whole child through the loop device beside `qemu-img convert` of it.
 *
 * All device I/O is `dd bs=1M iflag=direct|oflag=direct` on /dev/loopN, so the block device's
 * own page cache is out of the way; the image files themselves live in the page cache (warm),
 * as they would on a busy host. Runs are interleaved (raw, child, raw, child, ...) so that
 * background writeback of the host hits both sides alike; figures are medians. The copies of
 * the whole child go to tmpfs (/dev/shm) when it has room, for both sides. Each fresh FUSE
 * server first serves a 64 MiB warm-up read (V8 compiles its request path; the first 1 GiB
 * read of a new attachment is about half as fast as the next ones).
 * Needs root and /dev/loop-control; returns no rows (with a note on stderr) otherwise.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { attach, detach } from '../src/host/attach';
import { createChild, rollback } from '../src/differencing';
import { BenchOptions, BenchRow } from './types';
import { fillRandom, hasCommand, MB, median, MiB, run, warm } from './util';

function dd(args: string[]): number {
  return run('dd', [...args, 'status=none']).seconds;
}

function row(metric: string, ours: number, peer: string, peerValue: number, note?: string): BenchRow {
  return { area: 'loopback', metric, disksnap: ours, peer, peerValue, unit: 'MB/s', higherIsBetter: true, note };
}

export async function benchLoop(opts: BenchOptions): Promise<BenchRow[]> {
  if (typeof process.getuid !== 'function' || process.getuid() !== 0 || !fs.existsSync('/dev/loop-control')) {
    process.stderr.write('bench: loop: skipped (needs root and /dev/loop-control)\n');
    return [];
  }
  const runs = opts.runs ?? (opts.quick ? 1 : 3);
  const size = opts.quick ? 256 * MiB : 1024 * MiB;
  const count = size / MiB;
  const parent = path.join(opts.dir, 'parent.img');
  const raw = path.join(opts.dir, 'raw.img');
  const child = path.join(opts.dir, 'child.qcow2');
  const rawViaFuse = path.join(opts.dir, 'raw-fuse.img');
  const pattern = path.join(opts.dir, 'pattern.bin');
  fillRandom(parent, 0, size);
  fillRandom(raw, 0, size);
  fillRandom(rawViaFuse, 0, size);
  fillRandom(pattern, 0, size);
  warm(parent);
  warm(raw);
  warm(rawViaFuse);
  warm(pattern);

  // outputs of the whole-child copies go to tmpfs where there is room, so that the host
  // disk's writeback (which dominates and varies) is not what the row measures
  const outDir = fs.existsSync('/dev/shm') && fs.statfsSync('/dev/shm').bavail * fs.statfsSync('/dev/shm').bsize > 4 * size ? '/dev/shm' : opts.dir;
  const cleanup: Array<() => Promise<unknown>> = [];
  try {
    const r = await attach(raw);
    cleanup.push(() => detach(r.device));
    const label = `${count} MiB, 1 MiB requests`;
    const reads = { raw: [] as number[], child: [] as number[], childOwn: [] as number[] };
    const writes = { raw: [] as number[], child: [] as number[] };
    const writesSync = { raw: [] as number[], child: [] as number[] };
    const reread = [] as number[];
    const fuseOnly = { read: [] as number[], write: [] as number[] };
    const convert = [] as number[];

    for (let i = 0; i < runs; i++) {
      // a fresh child each round: its first writes allocate clusters, as in real use
      await createChild(parent, child);
      const c = await attach(child);
      try {
        // one-time start-up of a fresh FUSE server (V8 compiles its request path): 64 MiB
        dd([`if=${c.device}`, 'of=/dev/null', 'bs=1M', 'count=64', 'iflag=direct']);
        reads.raw.push(dd([`if=${r.device}`, 'of=/dev/null', 'bs=1M', 'iflag=direct']));
        reads.child.push(dd([`if=${c.device}`, 'of=/dev/null', 'bs=1M', 'iflag=direct']));
        writes.raw.push(dd([`if=${pattern}`, `of=${r.device}`, 'bs=1M', 'oflag=direct', 'conv=notrunc']));
        writes.child.push(dd([`if=${pattern}`, `of=${c.device}`, 'bs=1M', 'oflag=direct', 'conv=notrunc']));
        reread.push(dd([`if=${c.device}`, 'of=/dev/null', 'bs=1M', 'iflag=direct']));
        writesSync.raw.push(dd([`if=${pattern}`, `of=${r.device}`, 'bs=1M', 'oflag=direct', 'conv=notrunc,fsync']));
        writesSync.child.push(dd([`if=${pattern}`, `of=${c.device}`, 'bs=1M', 'oflag=direct', 'conv=notrunc,fsync']));
      } finally {
        await detach(c.device);
      }
      // the FUSE layer alone: a raw image served through the same view
      const f = await attach(rawViaFuse, { via: 'fuse' });
      try {
        dd([`if=${f.device}`, 'of=/dev/null', 'bs=1M', 'count=64', 'iflag=direct']);
        fuseOnly.read.push(dd([`if=${f.device}`, 'of=/dev/null', 'bs=1M', 'iflag=direct']));
        fuseOnly.write.push(dd([`if=${pattern}`, `of=${f.device}`, 'bs=1M', 'oflag=direct', 'conv=notrunc']));
      } finally {
        await detach(f.device);
      }
      // the whole child read into a raw file: through the loop device vs qemu-img convert
      const out = path.join(outDir, 'disksnap-bench-out.raw');
      const c2 = await attach(child, { readOnly: true });
      try {
        reads.childOwn.push(dd([`if=${c2.device}`, `of=${out}`, 'bs=1M', 'iflag=direct']));
      } finally {
        await detach(c2.device);
        fs.rmSync(out, { force: true });
      }
      if (hasCommand('qemu-img')) {
        convert.push(run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', child, out]).seconds);
        fs.rmSync(out, { force: true });
      }
      rollback(child);
    }
    const mbps = (secs: number[]) => size / median(secs) / MB;
    const rawPeer = 'raw image on a loop device (same dd)';
    const rows = [
      row(`child seq read (falls through to parent), ${label}`, mbps(reads.child), rawPeer, mbps(reads.raw)),
      row(`child seq write (allocating), ${label}`, mbps(writes.child), rawPeer, mbps(writes.raw), 'no fsync: both land in the host page cache'),
      row(`child seq write + fsync, ${label}`, mbps(writesSync.child), rawPeer, mbps(writesSync.raw), 'conv=fsync: durable on the host disk'),
      row(`child seq read (own clusters), ${label}`, mbps(reread), rawPeer, mbps(reads.raw)),
    ];
    rows.push(
      row(`raw image through the FUSE view, seq read, ${label}`, mbps(fuseOnly.read), rawPeer, mbps(reads.raw), 'the FUSE layer alone, without qcow2'),
      row(`raw image through the FUSE view, seq write, ${label}`, mbps(fuseOnly.write), rawPeer, mbps(writes.raw), 'the FUSE layer alone, without qcow2'),
    );
    if (convert.length) {
      rows.push(row(`whole child to a raw file, ${count} MiB`, mbps(reads.childOwn), 'qemu-img convert -O raw', mbps(convert), `dd from the attached child vs qemu-img reading the qcow2 file; output on ${outDir}`));
    }
    return rows;
  } finally {
    for (const f of cleanup.reverse()) await f().catch(() => undefined);
  }
}
