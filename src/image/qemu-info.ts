/**
 * qemu-img's info and check documents, computed by disksnap: `disksnap info --output json
 * [--backing-chain]` and `disksnap diff check --output json` print what `qemu-img info
 * --output=json [--backing-chain]` and `qemu-img check --output=json` print for the same
 * file (QEMU 7.2: block/qapi.c bdrv_query_image_info, block/qcow2.c qcow2_get_specific_info,
 * qemu-img.c collect_image_info_list and collect_image_check).
 *
 * As qemu-img does, info opens each file of a chain on its own (no backing file: a missing
 * grandparent does not stop the info of a child), names each backing file as QEMU combines
 * it (the child's name up to its last '/', then the backing name, unless that is absolute),
 * and takes its format from the backing format the child records, else from its content.
 * Only the header cluster, the bitmap directory and the snapshot table are read.
 */
import * as fs from 'node:fs';
import { BlockFile } from '../engine/file';
import { corrupt, DisksnapError } from '../engine/errors';
import { INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2, COMPAT_LAZY_REFCOUNTS, parseHeader, Qcow2Header } from './qcow2/format';
import { readHeaderCluster } from './qcow2/header';
import { probeFormat } from './qemu-map';
import { BitmapEntry, bitmapsState, readBitmapDirectory } from './qcow2/bitmaps';
import { readSnapshotTable } from './qcow2/snapshots';
import type { CheckResult } from './qcow2/check';

/** A value of qemu-img's JSON: only the keys qemu-img prints, with its meanings. */
export type QemuJson = { [key: string]: string | number | boolean | string[] | QemuJson | QemuJson[] };

/** `qemu-img info --output=json FILE` (chain: `--backing-chain`, an array, the image first). */
export function qemuInfo(filename: string, chain = false): QemuJson | QemuJson[] {
  const out: QemuJson[] = [];
  let next: { filename: string; format: 'raw' | 'qcow2' | undefined } | undefined = { filename, format: undefined };
  const seen = new Set<string>([realOr(filename)]);
  while (next !== undefined) {
    const { info, backing } = layerInfo(next.filename, next.format);
    out.push(info);
    if (!chain) return info;
    if (backing === undefined) break;
    const f = backing.format;
    if (f !== undefined && f !== 'raw' && f !== 'qcow2') {
      // the child itself was described; its parent is in a format disksnap does not read
      throw new DisksnapError(`${next.filename}: its backing file ${backing.filename} is a ${f} image; disksnap reads raw and qcow2`, 'EUNSUPPORTED', undefined, next.filename);
    }
    // QEMU refuses a chain that loops ("Backing file '...' creates an infinite loop").
    const real = realOr(backing.filename);
    if (seen.has(real)) throw corrupt(filename, `backing file '${backing.filename}' creates an infinite loop`);
    seen.add(real);
    next = { filename: backing.filename, format: f };
  }
  return out;
}

function realOr(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch {
    return p; // not there: opening it reports ENOENT next, naming it
  }
}

/** QEMU's bdrv_make_absolute_filename: the child's name up to its last '/', then the backing name. */
export function qemuBackingName(child: string, backing: string): string {
  if (backing.startsWith('/') || /^[a-z][a-z0-9+.-]*:/i.test(backing)) return backing;
  const slash = child.lastIndexOf('/');
  return child.slice(0, slash + 1) + backing;
}

function layerInfo(
  filename: string,
  format: 'raw' | 'qcow2' | undefined,
): { info: QemuJson; backing: { filename: string; format: string | undefined } | undefined } {
  const fmt = format ?? probeFormat(filename);
  const file = BlockFile.open(filename, { lock: 'none' });
  try {
    const st = file.stat();
    if (fmt === 'raw') {
      return { info: { 'virtual-size': Math.ceil(st.size / 512) * 512, filename, format: 'raw', 'actual-size': st.allocated, 'dirty-flag': false }, backing: undefined };
    }
    const h = parseHeader(filename, readHeaderCluster(file, st.size), st.size, { forCheck: true });
    const info: QemuJson = {};
    if (h.backingFormat !== undefined) info['backing-filename-format'] = h.backingFormat;
    const snapshots = snapshotsOf(filename, file, h, st.size);
    if (snapshots.length > 0) info.snapshots = snapshots;
    info['virtual-size'] = Math.floor(h.size / 512) * 512;
    info.filename = filename;
    info['cluster-size'] = h.clusterSize;
    info.format = 'qcow2';
    info['actual-size'] = st.allocated;
    info['format-specific'] = { type: 'qcow2', data: formatSpecific(filename, file, h, st.size) };
    let backing: { filename: string; format: string | undefined } | undefined;
    if (h.backingFile !== undefined && h.backingFile !== '') {
      const full = qemuBackingName(filename, h.backingFile);
      info['full-backing-filename'] = full;
      info['backing-filename'] = h.backingFile;
      backing = { filename: full, format: h.backingFormat };
    }
    info['dirty-flag'] = (h.incompatible & INCOMPAT_DIRTY) !== 0;
    return { info, backing };
  } finally {
    file.close();
  }
}

/** qcow2_get_specific_info: version 2 images report compat, compression type and refcount bits only. */
function formatSpecific(path: string, file: BlockFile, h: Qcow2Header, fileSize: number): QemuJson {
  const compression = 'zlib'; // parseHeader refuses zstd (compression_type 1)
  if (h.version === 2) return { compat: '0.10', 'compression-type': compression, 'refcount-bits': 2 ** h.refcountOrder };
  const data: QemuJson = {
    compat: '1.1',
    'compression-type': compression,
    'lazy-refcounts': (h.compatible & COMPAT_LAZY_REFCOUNTS) !== 0,
  };
  const bitmaps = bitmapsOf(path, file, h, fileSize);
  if (bitmaps.length > 0) {
    data.bitmaps = bitmaps.map((b) => {
      const flags: string[] = [];
      if (b.inUse) flags.push('in-use');
      if (b.auto) flags.push('auto');
      return { flags, name: b.name, granularity: b.granularity };
    });
  }
  data['refcount-bits'] = 2 ** h.refcountOrder;
  data.corrupt = (h.incompatible & INCOMPAT_CORRUPT) !== 0;
  data['extended-l2'] = (h.incompatible & INCOMPAT_EXTL2) !== 0;
  return data;
}

/** The persistent bitmaps QEMU loads: none when the extension is missing or stale (autoclear bit clear). */
export function bitmapsOf(path: string, file: BlockFile, h: Qcow2Header, fileSize: number): BitmapEntry[] {
  const state = bitmapsState(path, h, fileSize);
  if (state.ext === undefined) return [];
  return readBitmapDirectory(path, (b, o) => file.readFullSync(b, o), state.ext, h.clusterSize, h.size, fileSize);
}

function snapshotsOf(path: string, file: BlockFile, h: Qcow2Header, fileSize: number): QemuJson[] {
  if (h.nbSnapshots === 0) return [];
  const table = readSnapshotTable(path, h, fileSize, (b, o) => file.readFullSync(b, o), () => undefined);
  return table.snapshots.map((s) => {
    const e: QemuJson = {};
    if (s.icount !== undefined) e.icount = s.icount;
    e['vm-clock-nsec'] = s.vmClockNsec % 1e9;
    e.name = s.name;
    e['date-sec'] = s.dateSec;
    e['date-nsec'] = s.dateNsec;
    e['vm-clock-sec'] = Math.floor(s.vmClockNsec / 1e9);
    e.id = s.id;
    e['vm-state-size'] = s.vmStateSize;
    return e;
  });
}

/**
 * `qemu-img check --output=json` of a qcow2 check (collect_image_check): counts that are 0
 * are left out, as qemu-img leaves them out; check-errors is always 0 (a check disksnap
 * cannot finish fails with exit 1 instead of reporting a partial result).
 */
export function qemuCheck(r: CheckResult): QemuJson {
  const o: QemuJson = {};
  const opt = (key: string, n: number): void => {
    if (n !== 0) o[key] = n;
  };
  opt('image-end-offset', r.imageEndOffset);
  opt('total-clusters', r.totalClusters);
  o['check-errors'] = 0;
  opt('allocated-clusters', r.allocatedClusters);
  o.filename = r.filename;
  o.format = r.format;
  opt('fragmented-clusters', r.fragmentedClusters);
  opt('compressed-clusters', r.compressedClusters);
  opt('corruptions', r.corruptions);
  opt('leaks', r.leaks);
  opt('corruptions-fixed', r.corruptionsFixed);
  opt('leaks-fixed', r.leaksFixed);
  return o;
}

/** JSON as qemu-img prints it: four-space indentation. */
export function formatQemuJson(value: QemuJson | QemuJson[]): string {
  return JSON.stringify(value, null, 4) + '\n';
}
