/**
 * `diff flatten`: a standalone sparse raw image of what a child shows, written under a
 * temporary name and renamed. Data extents are cloned or copied straight from the layer that
 * holds them (copy.ts); compressed clusters are inflated through the image, and all-zero
 * pieces of them stay holes. With format qcow2, that raw file (a second temporary name) is
 * copied into a standalone qcow2 v3 image (../image/qcow2/from-raw.ts), zero clusters
 * unallocated, which is what is renamed into place.
 */
import * as fs from 'node:fs';
import { BlockFile } from '../engine/file';
import { invalid } from '../engine/errors';
import { writeAtomically } from '../engine/atomic';
import { native } from '../engine/native';
import { Qcow2Image } from '../image/qcow2/image';
import { rawToQcow2 } from '../image/qcow2/from-raw';
import { BackingLayer } from '../image/qcow2/layer';
import { same } from '../image/children';
import { CopyJob, parallelCopy, PIECE } from './copy';
import type { Progress } from './child';

export interface FlattenOptions {
  force?: boolean;
  /** of the output: raw (default, sparse) or qcow2 (standalone v3, no backing file) */
  format?: 'raw' | 'qcow2';
  onProgress?: Progress;
}

export interface FlattenResult {
  out: string;
  format: 'raw' | 'qcow2';
  virtualSize: number;
  dataBytes: number;
}

/** The open file of every layer of the chain, by path. */
function layerFiles(img: Qcow2Image): Map<string, BlockFile> {
  const files = new Map<string, BlockFile>();
  for (let layer: BackingLayer | undefined = img; layer; layer = layer instanceof Qcow2Image ? layer.backing : undefined) {
    files.set(layer.path, layer.file);
  }
  return files;
}

/** Writes a standalone image of what `child` shows (temporary name, then rename). */
export async function flatten(child: string, outPath: string, opts: FlattenOptions = {}): Promise<FlattenResult> {
  const format = opts.format ?? 'raw';
  if (format !== 'raw' && format !== 'qcow2') throw invalid(`format must be raw or qcow2, not '${String(format)}'`);
  if (fs.existsSync(outPath) && same(child, outPath)) throw invalid(`the output ${outPath} is the child itself`, outPath);
  const img = Qcow2Image.open(child);
  try {
    const files = layerFiles(img);
    const extents = img.map();
    const total = extents.reduce((s, e) => s + (e.kind === 'data' ? e.length : 0), 0);
    let done = 0;
    const progress = (len: number): void => {
      done += len;
      opts.onProgress?.(done, total);
    };
    await writeAtomically(outPath, { force: opts.force, sync: true }, async (tmp) => {
      if (format === 'raw') return writeRaw(img, files, extents, tmp, progress);
      const raw = `${tmp}.raw`;
      try {
        await writeRaw(img, files, extents, raw, progress);
        rawToQcow2(raw, tmp, img.virtualSize);
      } finally {
        fs.rmSync(raw, { force: true });
      }
    });
    return { out: outPath, format, virtualSize: img.virtualSize, dataBytes: total };
  } finally {
    img.close();
  }
}

/** The raw flattened image into `tmp` (a new file): clones or copies, compressed clusters inflated. */
async function writeRaw(img: Qcow2Image, files: Map<string, BlockFile>, extents: ReturnType<Qcow2Image['map']>, tmp: string, progress: (len: number) => void): Promise<void> {
  const out = BlockFile.open(tmp, { create: true, exclusive: true });
  try {
    out.truncateSync(img.virtualSize);
    const jobs: CopyJob[] = [];
    for (const e of extents) {
      if (e.kind !== 'data') continue;
      const src = e.file !== undefined ? files.get(e.file) : undefined;
      if (src && e.hostOffset !== undefined) {
        jobs.push({ src, srcOffset: e.hostOffset, dstOffset: e.offset, length: e.length });
        continue;
      }
      // compressed clusters: inflate through the image; all-zero pieces stay holes
      for (let pos = 0; pos < e.length; pos += PIECE) {
        const len = Math.min(PIECE, e.length - pos);
        const b = Buffer.alloc(len);
        img.readAt(b, 0, len, e.offset + pos);
        if (!native().isZero(b)) out.writeSync(b, e.offset + pos);
        progress(len);
      }
    }
    await parallelCopy(jobs, out, progress);
  } finally {
    out.close();
  }
}
