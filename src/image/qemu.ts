/**
 * qemu-img's JSON documents, computed by disksnap (`--output json` of info, map, diff check
 * and measure): the same keys, meanings and shapes as `qemu-img ... --output=json` (QEMU 7.2).
 */
export { qemuInfo, qemuCheck, qemuBackingName, formatQemuJson } from './qemu-info';
export type { QemuJson } from './qemu-info';
export { qemuMap, qemuMapEntries, formatQemuMap, qemuLength, openLayer } from './qemu-map';
export type { QemuMapEntry } from './qemu-map';
export { measure } from './qemu-measure';
export type { MeasureOptions } from './qemu-measure';
