/**
 * QEMU's own view of a persistent dirty bitmap: qemu-nbd exports the image with the bitmap
 * (-B) and `qemu-img map` reads it through the NBD "qemu:dirty-bitmap" context, where a
 * dirty area shows as `"data": false`. No disksnap code is involved.
 */
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { missing } from './tools';
import { qemuImgOk, qemuIo } from './qemu';
import * as snap from '../../src/storage';
import type { SnapshotJson } from '../../src/storage';

export function needQemuNbd(): string | false {
  return missing({ commands: ['qemu-img', 'qemu-io', 'qemu-nbd'] });
}

export interface Range {
  offset: number;
  length: number;
}

/** The dirty ranges of `bitmap` in `image` as QEMU reads them (coalesced, in order). */
export async function qemuDirtyRanges(image: string, bitmap: string): Promise<Range[]> {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'nbd-')); // a socket path must stay under 108 bytes
  const sock = path.join(dir, 's');
  const child = spawn('qemu-nbd', ['-r', '-k', sock, '-f', 'qcow2', '-B', bitmap, '-x', 'e', image], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<void>((resolve) => child.on('exit', () => resolve()));
  try {
    for (let i = 0; i < 200 && !fs.existsSync(sock); i++) {
      if (child.exitCode !== null) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    if (!fs.existsSync(sock)) throw new Error(`qemu-nbd did not start on ${image} with bitmap ${bitmap}: ${stderr}`);
    const out = qemuImgOk(
      'map',
      '--output=json',
      '--image-opts',
      `driver=nbd,server.type=unix,server.path=${sock},export=e,x-dirty-bitmap=qemu:dirty-bitmap:${bitmap}`,
    );
    const list = JSON.parse(out) as { start: number; length: number; data: boolean }[];
    const ranges: Range[] = [];
    for (const e of list) {
      if (e.data) continue;
      const last = ranges[ranges.length - 1];
      if (last && last.offset + last.length === e.start) last.length += e.length;
      else ranges.push({ offset: e.start, length: e.length });
    }
    return ranges;
  } finally {
    if (child.exitCode === null) child.kill('SIGTERM');
    await exited;
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

export interface QemuBitmapInfo {
  name: string;
  granularity: number;
  flags: string[];
}

/** The bitmaps `qemu-img info` shows (empty list when none). */
export function qemuBitmaps(image: string): QemuBitmapInfo[] {
  const info = JSON.parse(qemuImgOk('info', '--output=json', '-U', image)) as {
    'format-specific'?: { data?: { bitmaps?: QemuBitmapInfo[] } };
  };
  return info['format-specific']?.data?.bitmaps ?? [];
}

/** Granule-aligned cover of byte ranges, coalesced: what a bitmap of `granularity` must mark. */
export function granules(ranges: Range[], granularity: number, size: number): Range[] {
  const marks = [...ranges]
    .map((r) => ({ from: Math.floor(r.offset / granularity) * granularity, to: Math.min(size, Math.ceil((r.offset + r.length) / granularity) * granularity) }))
    .sort((a, b) => a.from - b.from);
  const out: Range[] = [];
  for (const m of marks) {
    const last = out[out.length - 1];
    if (last && m.from <= last.offset + last.length) last.length = Math.max(last.length, m.to - last.offset);
    else out.push({ offset: m.from, length: m.to - m.from });
  }
  return out;
}

/**
 * A 64 MiB qcow2 volume `vm.qcow2` in `dir` holding `data` bytes of 0x11 from offset 0, and its
 * first snapshot into `dir/store` (512 KiB blocks), which adds the store's tracking bitmap.
 */
export async function trackedVolume(dir: string, data: string): Promise<{ store: string; vol: string; s1: SnapshotJson }> {
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vm.qcow2');
  qemuImgOk('create', '-q', '-f', 'qcow2', vol, '64M');
  qemuIo(vol, [`write -P 0x11 0 ${data}`]);
  const s1 = await snap.createSnapshot(vol, { store, blockSize: 512 * 1024 });
  return { store, vol, s1 };
}
