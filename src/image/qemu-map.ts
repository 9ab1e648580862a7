/**
 * qemu-img's map, computed by disksnap: `disksnap map --output json` prints what
 * `qemu-img map --output=json` prints for the same file, key for key and byte for byte
 * (QEMU 7.2: qemu-img.c get_block_status and entry_mergeable, block/io.c bdrv_co_block_status).
 *
 * The model, per guest byte, walking the chain from the top (depth 0):
 *
 *   layer stores the byte (data, compressed, zero cluster; any byte of a raw file)
 *       -> present at this depth: data or zero, with the host offset where QEMU has one
 *          (none for a compressed or a plain zero cluster; a raw file's hole has one)
 *   layer does not store it
 *       -> no backing file, or the byte lies at or past the backing file's end:
 *          "zero, not present" at THIS layer's depth
 *       -> otherwise the backing file answers, one depth further down
 *
 * Runs whose answers agree (and whose host offsets continue) are merged, as qemu-img merges
 * them; since merging is by value, where QEMU happens to split its block-status queries (L2
 * tables, 1 GiB probes) cannot show in the result. One heuristic of QEMU's is reproduced as
 * well: a qcow2 file with more clusters in use than allocated blocks is taken to be
 * metadata-preallocated, and its data clusters that are holes in the file report zero too.
 */
import { BlockFile } from '../engine/file';
import { DisksnapError } from '../engine/errors';
import { ImageOpenOptions } from './view';
import { foreignFormat } from './qcow2/probe';
import { detectFormat } from './open';
import { Qcow2Image } from './qcow2/image';
import { BackingLayer, OwnStatus, RawLayer } from './qcow2/layer';

/** One entry of `qemu-img map --output=json`. */
export interface QemuMapEntry {
  /**
   * guest offset
   * @minimum 0
   */
  start: number;
  /** @minimum 0 */
  length: number;
  /**
   * layer that answers: 0 the image itself, 1 its backing file, ...
   * @minimum 0
   */
  depth: number;
  /** the answering layer stores the range (false: nothing in the chain stores it) */
  present: boolean;
  /** reads as zeros */
  zero: boolean;
  /** stored data (a compressed cluster too) */
  data: boolean;
  /**
   * host offset in the answering layer's file, where QEMU reports one
   * @minimum 0
   */
  offset?: number;
}

/**
 * The guest size QEMU sees, in whole sectors (bs->total_sectors): a qcow2 header's size rounded
 * down, a raw file's size rounded up (the bytes past its end read as zeros, a hole).
 */
export function qemuLength(layer: { format: 'raw' | 'qcow2'; virtualSize: number }): number {
  return layer.format === 'qcow2' ? Math.floor(layer.virtualSize / 512) * 512 : Math.ceil(layer.virtualSize / 512) * 512;
}

/** Opens a file with its backing chain as QEMU would for map and measure (format probed from content). */
export function openLayer(path: string, opts: ImageOpenOptions = {}): BackingLayer {
  return probeFormat(path) === 'qcow2' ? Qcow2Image.open(path, opts) : new RawLayer(path);
}

/** The format qemu-img would probe: qcow2, raw, or a format disksnap does not read (refused by name, never shown as raw). */
export function probeFormat(filename: string): 'raw' | 'qcow2' {
  if (detectFormat(filename) === 'qcow2') return 'qcow2';
  const f = BlockFile.open(filename, { lock: 'none' });
  try {
    let head = Buffer.alloc(512);
    head = head.subarray(0, f.readSync(head, 0));
    const other = foreignFormat(head);
    if (other !== undefined) throw new DisksnapError(`${filename}: is a ${other} image; disksnap reads raw and qcow2 (use qemu-img info)`, 'EUNSUPPORTED', undefined, filename);
  } finally {
    f.close();
  }
  return 'raw';
}


/** `qemu-img map --output=json FILE`: opens FILE and its chain (shared lock, parent guards checked). */
export function qemuMap(file: string): QemuMapEntry[] {
  const l = openLayer(file);
  try {
    return qemuMapEntries(l);
  } finally {
    l.close();
  }
}

/** `qemu-img map --output=json` of an open image, entries merged as qemu-img merges them. */
export function qemuMapEntries(top: BackingLayer): QemuMapEntry[] {
  const raw: QemuMapEntry[] = [];
  const preallocated = new Map<BackingLayer, boolean>();
  statusOf(top, 0, qemuLength(top), 0, raw, preallocated);
  const out: QemuMapEntry[] = [];
  for (const e of raw) {
    const c = out[out.length - 1];
    if (c !== undefined && mergeable(c, e)) c.length += e.length;
    else out.push({ ...e });
  }
  // An empty image: qemu-img prints its initial, empty entry.
  if (out.length === 0) out.push({ start: 0, length: 0, depth: 0, present: false, zero: false, data: false });
  return out;
}

/** qemu-img's own text for the entries (one per line), so that even a diff of the output is empty. */
export function formatQemuMap(entries: QemuMapEntry[]): string {
  const line = (e: QemuMapEntry): string =>
    `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}` +
    (e.offset !== undefined ? `, "offset": ${e.offset}` : '') +
    '}';
  return `[${entries.map(line).join(',\n')}]\n`;
}

/** qemu-img.c entry_mergeable. */
function mergeable(c: QemuMapEntry, n: QemuMapEntry): boolean {
  if (c.length === 0) return false;
  if (c.zero !== n.zero || c.data !== n.data || c.depth !== n.depth || c.present !== n.present) return false;
  if ((c.offset === undefined) !== (n.offset === undefined)) return false;
  return c.offset === undefined || c.offset + c.length === n.offset;
}

function statusOf(
  layer: BackingLayer,
  start: number,
  length: number,
  depth: number,
  out: QemuMapEntry[],
  preallocated: Map<BackingLayer, boolean>,
): void {
  if (length <= 0) return;
  const own: OwnStatus[] = [];
  layer.ownStatus(start, length, own);
  for (const r of own) {
    if (r.kind === 'unallocated') {
      const b = layer instanceof Qcow2Image ? layer.backing : undefined;
      const part = b === undefined ? 0 : Math.max(0, Math.min(r.length, qemuLength(b) - r.start));
      if (b !== undefined && part > 0) statusOf(b, r.start, part, depth + 1, out, preallocated);
      if (part < r.length) out.push({ start: r.start + part, length: r.length - part, depth, present: false, zero: true, data: false });
      continue;
    }
    if (r.kind === 'data' && r.host !== undefined && layer instanceof Qcow2Image && isPreallocated(layer, preallocated)) {
      dataOverFile(layer, r, r.host, depth, out);
      continue;
    }
    out.push({ start: r.start, length: r.length, depth, present: true, zero: r.kind === 'zero', data: r.kind === 'data', offset: r.host });
  }
}

function isPreallocated(layer: Qcow2Image, cache: Map<BackingLayer, boolean>): boolean {
  let v = cache.get(layer);
  if (v === undefined) {
    v = layer.metadataPreallocated();
    cache.set(layer, v);
  }
  return v;
}

/** A data run of a metadata-preallocated qcow2 file: holes of the file (and what lies past its end) read as zero. */
function dataOverFile(layer: Qcow2Image, r: OwnStatus, host: number, depth: number, out: QemuMapEntry[]): void {
  const end = host + r.length;
  const fileEnd = Math.min(end, layer.file.size());
  const push = (from: number, to: number, zero: boolean): void => {
    if (to > from) out.push({ start: r.start + (from - host), length: to - from, depth, present: true, zero, data: true, offset: from });
  };
  let pos = host;
  if (fileEnd > host) {
    for (const e of layer.file.extents(host, fileEnd - host)) {
      const s = Math.max(e.offset, host);
      const t = Math.min(e.offset + e.length, fileEnd);
      if (t <= s) continue;
      push(pos, s, true);
      push(s, t, false);
      pos = t;
    }
  }
  push(pos, end, true);
}
