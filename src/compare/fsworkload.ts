/**
 * The filesystem workload (`--workload fs[:AMOUNT]`): files written into an ext4 filesystem
 * in the image, through a loop mount. Root only.
 *
 *   base.img ──copy──▶ scratch.img ──disksnap attach + mount──▶ write files, sync, umount
 *       │                    │
 *       └──── compare 4 KiB blocks ────┘──▶ changed ranges + their bytes (trace.bin)
 *
 * The ranges ext4 changed (data, inodes, bitmaps, journal, superblock) become the
 * workload's write plan, replayed through each strategy's own write path: both strategies
 * receive exactly the writes the filesystem made, in one deterministic batch, and the
 * result is checked against the scratch image byte for byte. This measures the strategies,
 * not a FUSE server or the loop driver (a differencing child cannot be loop-mounted
 * without the loopback library's FUSE layer), and keeps both runs identical.
 *
 * If the image already holds an ext2/3/4 filesystem it is used as it is; otherwise the
 * copy is formatted first (`mkfs.ext4` with eager inode-table and journal initialisation,
 * so no background thread writes after the capture). The format belongs to the volume's
 * starting state, before the snapshot.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawnSync } from 'node:child_process';
import { BlockFile } from '../engine/file';
import { native } from '../engine/native';
import { DisksnapError } from '../engine/errors';
import { formatSize } from '../engine/size';
import { WorkDir } from './workdir';
import { copySparse, hashFile } from './files';
import { FsDetail, fillKeystream, prng, WritePlan, yieldLoop } from './workload';
import * as loop from '../host';
import * as loopState from '../host/state';

const EXT_MAGIC_OFFSET = 1024 + 0x38;
const EXT_MAGIC = 0xef53;
const BLOCK = 4096;
/** changed runs are split into requests of at most this size, as a block layer would */
const MAX_REQUEST = 1024 * 1024;

export function fsWorkloadUnavailable(): string | undefined {
  const lacks: string[] = [];
  if (typeof process.getuid === 'function' && process.getuid() !== 0) lacks.push('root (to loop-mount the image)');
  for (const cmd of ['mkfs.ext4', 'mount', 'umount']) {
    if (spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status !== 0) lacks.push(`the command ${cmd}`);
  }
  return lacks.length ? `the fs workload needs ${lacks.join(' and ')}` : undefined;
}

function hasExtFilesystem(file: string): boolean {
  const f = BlockFile.open(file, { lock: 'none' });
  try {
    const b = Buffer.alloc(2);
    return f.readSync(b, EXT_MAGIC_OFFSET) === 2 && b.readUInt16LE(0) === EXT_MAGIC;
  } finally {
    f.close();
  }
}

function sh(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.error) throw new DisksnapError(`${cmd}: ${r.error.message}`, 'EIO');
  if (r.status !== 0) {
    throw new DisksnapError(`${cmd} ${args.join(' ')} failed (exit ${r.status}): ${(r.stderr || r.stdout).trim()}`, 'EIO');
  }
}

/** Formats `file` with ext4 unless it already holds an ext filesystem; returns whether it formatted. */
export function ensureExt4(file: string): boolean {
  if (hasExtFilesystem(file)) return false;
  sh('mkfs.ext4', ['-q', '-F', '-E', 'nodiscard,lazy_itable_init=0,lazy_journal_init=0', file]);
  return true;
}

/**
 * Attaches `file` with the loopback library and mounts it at `mnt`. Cleanup steps are
 * registered with the working directory so that an interruption unmounts and detaches too
 * (from a signal handler only synchronous calls are possible: `umount` and `losetup -d`;
 * the library ignores and later removes its record of a device detached that way).
 */
async function mountLoop(work: WorkDir, file: string, mnt: string): Promise<{ how: string; unmount: () => Promise<void> }> {
  const a = await loop.attach(file);
  const device = a.device;
  work.defer(`detach ${device}`, () => {
    sh('losetup', ['-d', device]);
    // and the library's record of it, if it is still ours (a stale one would only be ignored)
    if (loopState.readRecord(a.index)?.image === a.image) loopState.removeRecord(a.index);
  });
  try {
    sh('mount', ['-t', 'ext4', device, mnt]);
  } catch (e) {
    work.forget(`detach ${device}`);
    await loop.detach(device);
    throw e;
  }
  let mounted = true;
  const forgetUmount = work.defer(`umount ${mnt}`, () => {
    if (mounted) sh('umount', [mnt]);
  });
  return {
    how: `disksnap attach (${device}) + mount`,
    unmount: async () => {
      sh('umount', [mnt]);
      mounted = false;
      forgetUmount();
      await loop.detach(device);
      // detached: the emergency step must not run losetup on a device someone else may get
      work.forget(`detach ${device}`);
    },
  };
}

export interface FsCapture {
  plan: WritePlan;
  detail: FsDetail;
  /** SHA-256 of the image as ext4 left it: the replayed plan must give exactly this */
  afterSha256: string;
}

/**
 * Runs the fs workload once on a scratch copy of `base` (already formatted) and returns the
 * block writes it made as a plan. The trace file stays in the working directory for the
 * run (the plan reads its bytes from there).
 */
export async function captureFsWorkload(work: WorkDir, base: string, amount: number, seed: number, formatted: boolean, onDetail?: (text: string) => void): Promise<FsCapture> {
  const scratch = work.file('fs-scratch.img');
  const mnt = work.mkdir('fs-mnt');
  await copySparse(base, scratch);
  const mount = await mountLoop(work, scratch, mnt);
  let files = 0;
  let fileBytes = 0;
  try {
    const st = fs.statfsSync(mnt);
    const free = st.bavail * st.bsize;
    if (amount > free * 0.9) {
      throw new DisksnapError(
        `the fs workload writes ${formatSize(amount)} of files, but the filesystem in the image has only ${formatSize(free)} free; use a smaller amount (fs:SIZE)`,
        'EINVALID',
      );
    }
    const rnd = prng(seed ^ 0xf11e5);
    const dirs = 16;
    for (let d = 0; d < dirs; d++) fs.mkdirSync(path.join(mnt, `dir${String(d).padStart(2, '0')}`), { recursive: true });
    const buf = Buffer.alloc(4 * 1024 * 1024);
    while (fileBytes < amount) {
      // file sizes 4 KiB..4 MiB, log-uniform, not always block multiples (tails are real)
      let len = Math.round(4096 * Math.pow(1024, rnd()) - rnd() * 2048);
      len = Math.max(1, Math.min(len, amount - fileBytes, buf.length));
      const view = buf.subarray(0, len);
      fillKeystream(view, seed, 'fs-file', files);
      const name = path.join(mnt, `dir${String(files % dirs).padStart(2, '0')}`, `file${files}.bin`);
      fs.writeFileSync(name, view);
      files++;
      fileBytes += len;
      if (files % 64 === 0) {
        onDetail?.(`${formatSize(fileBytes)} of files`);
        await yieldLoop();
      }
    }
    sh('sync', ['-f', mnt]);
  } finally {
    await mount.unmount();
  }
  fs.rmdirSync(mnt);
  const plan = await diffToPlan(base, scratch, work.file('fs-trace.bin'), seed);
  const afterSha256 = await hashFile(scratch);
  fs.rmSync(scratch);
  return { plan, detail: { files, fileBytes, formatted, mountedWith: mount.how }, afterSha256 };
}

/** The 4 KiB blocks where `after` differs from `before`, as a plan whose bytes come from a trace file. */
async function diffToPlan(before: string, after: string, traceFile: string, seed: number): Promise<WritePlan> {
  const n = native();
  const a = BlockFile.open(before, { lock: 'shared' });
  const b = BlockFile.open(after, { lock: 'shared' });
  const trace = BlockFile.open(traceFile, { create: true, exclusive: true, lock: 'none' });
  try {
    const size = a.size();
    if (b.size() !== size) throw new DisksnapError(`internal: ${after} changed size under the fs workload`, 'EIO', undefined, after);
    const offsets: number[] = [];
    const lengths: number[] = [];
    const threads = 4;
    const window = 256 * 1024 * 1024;
    let runStart = -1;
    let runEnd = -1;
    const flushRun = (): void => {
      for (let p = runStart; p < runEnd; p += MAX_REQUEST) {
        offsets.push(p);
        lengths.push(Math.min(MAX_REQUEST, runEnd - p));
      }
      runStart = runEnd = -1;
    };
    for (let w = 0; w < size; w += window) {
      const len = Math.min(window, size - w);
      const [ha, hb] = await Promise.all([
        n.hashFile(a.fd, w, len, BLOCK, threads, undefined, undefined),
        n.hashFile(b.fd, w, len, BLOCK, threads, undefined, undefined),
      ]);
      const blocks = ha.zero.length;
      for (let i = 0; i < blocks; i++) {
        const same = ha.zero[i] && hb.zero[i] ? true : ha.digests.compare(hb.digests, i * 32, i * 32 + 32, i * 32, i * 32 + 32) === 0;
        const off = w + i * BLOCK;
        if (!same) {
          const end = Math.min(off + BLOCK, size);
          if (runEnd === off) runEnd = end;
          else {
            if (runStart >= 0) flushRun();
            runStart = off;
            runEnd = end;
          }
        }
      }
    }
    if (runStart >= 0) flushRun();
    // copy the changed bytes into the trace, in plan order
    const traceAt = new Float64Array(offsets.length);
    let pos = 0;
    const buf = Buffer.alloc(MAX_REQUEST);
    for (let i = 0; i < offsets.length; i++) {
      const view = buf.subarray(0, lengths[i]);
      b.readFullSync(view, offsets[i]);
      trace.writeSync(view, pos);
      traceAt[i] = pos;
      pos += lengths[i];
    }
    trace.syncSync(true);
    let max = 0;
    for (const l of lengths) max = Math.max(max, l);
    return new TracePlan(traceFile, Float64Array.from(offsets), Float64Array.from(lengths), traceAt, pos, max, seed);
  } finally {
    a.close();
    b.close();
    trace.close();
  }
}

class TracePlan implements WritePlan {
  readonly label = 'fs';
  constructor(
    private readonly traceFile: string,
    readonly offsets: Float64Array,
    readonly lengths: Float64Array,
    private readonly traceAt: Float64Array,
    readonly bytes: number,
    readonly maxLength: number,
    readonly seed: number,
  ) {}

  fill(index: number, into: Buffer): void {
    const f = BlockFile.open(this.traceFile, { lock: 'none' });
    try {
      f.readFullSync(into.subarray(0, this.lengths[index]), this.traceAt[index]);
    } finally {
      f.close();
    }
  }
}
