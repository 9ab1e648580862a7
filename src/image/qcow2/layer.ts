/**
 * What a qcow2 child needs from the layer below it (its backing file): bytes at guest
 * offsets, which layer provides each extent, and a description for `info --chain`.
 * Implemented by Qcow2Image (a qcow2 parent) and RawLayer (a raw parent, read-only).
 */
import { BlockFile } from '../../engine/file';
import { LayerInfo, MapExtent } from '../view';

/**
 * One run of a layer's own block status, as QEMU's drivers report it (qemu-map.ts): data
 * (host offset valid, except for compressed clusters), zero (host offset for a preallocated
 * zero cluster and for a hole of a raw file), or unallocated (the backing file's business).
 */
export interface OwnStatus {
  start: number;
  length: number;
  kind: 'data' | 'zero' | 'unallocated';
  /** host offset of `start` in this layer's file, where QEMU reports one */
  host?: number;
}

export interface BackingLayer {
  readonly path: string;
  readonly format: 'raw' | 'qcow2';
  readonly virtualSize: number;
  /** the open file of this layer (the parent guard fingerprints it) */
  readonly file: BlockFile;
  /** reads [guest, guest+len) into buf[bufOff..]; the range lies inside virtualSize */
  readAt(buf: Buffer, bufOff: number, len: number, guest: number): void;
  /** extents of [offset, offset+length) with depth counted from `depth` for this layer */
  mapRange(offset: number, length: number, depth: number, out: MapExtent[]): void;
  /** this layer's own status of [offset, offset+length), without looking below it */
  ownStatus(offset: number, length: number, out: OwnStatus[]): void;
  /** this layer and the ones below it */
  chainInfo(): LayerInfo[];
  close(): void;
}

/** A raw backing file: opened read-only with a shared lock, so no one writes it under us. */
export class RawLayer implements BackingLayer {
  readonly format = 'raw' as const;
  readonly path: string;
  readonly virtualSize: number;
  readonly file: BlockFile;

  constructor(path: string) {
    this.file = BlockFile.open(path, { lock: 'shared' });
    this.path = path;
    this.virtualSize = this.file.size();
  }

  readAt(buf: Buffer, bufOff: number, len: number, guest: number): void {
    this.file.readFullSync(buf.subarray(bufOff, bufOff + len), guest);
  }

  mapRange(offset: number, length: number, depth: number, out: MapExtent[]): void {
    let pos = offset;
    const end = offset + length;
    for (const e of this.file.extents(offset, length)) {
      const s = Math.max(e.offset, offset);
      const t = Math.min(e.offset + e.length, end);
      if (t <= s) continue;
      if (s > pos) out.push({ offset: pos, length: s - pos, kind: 'zero', depth });
      out.push({ offset: s, length: t - s, kind: 'data', depth, file: this.path, hostOffset: s });
      pos = t;
    }
    if (pos < end) out.push({ offset: pos, length: end - pos, kind: 'zero', depth });
  }

  /** As QEMU's file driver reports a raw file: every byte present, holes as zero, host offset = guest offset. */
  ownStatus(offset: number, length: number, out: OwnStatus[]): void {
    const extents: MapExtent[] = [];
    this.mapRange(offset, length, 0, extents);
    for (const e of extents) out.push({ start: e.offset, length: e.length, kind: e.kind, host: e.offset });
  }

  chainInfo(): LayerInfo[] {
    const st = this.file.stat();
    return [{ path: this.path, format: 'raw', virtualSize: this.virtualSize, allocatedBytes: st.allocated }];
  }

  close(): void {
    this.file.close();
  }
}
