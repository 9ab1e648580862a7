/**
 * Sizes and offsets as the command line accepts them: plain bytes or a binary suffix
 * (`512`, `4k`, `64K`, `1M`, `2G`, `1T`, optionally followed by `B` or `iB`: `4KiB`).
 */
import { invalid } from './errors';

const UNITS: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+)\s*([kmgtpe]?)(i?b)?\s*$/i.exec(String(text));
  if (!m || (m[3] !== undefined && m[2] === '' && m[3].toLowerCase() !== 'b')) {
    throw invalid(`${what} '${text}' is not a number of bytes (examples: 512, 4k, 64K, 1M, 2G)`);
  }
  const value = Number(m[1]) * UNITS[m[2].toLowerCase()];
  if (!Number.isSafeInteger(value)) throw invalid(`${what} '${text}' is too large`);
  return value;
}

/** 1536 -> "1.5 KiB"; exact bytes under 1 KiB. */
export function formatSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return i === 0 ? `${bytes} B` : `${v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)} ${units[i]}`;
}
