/**
 * Sizes and offsets as the command line accepts them, with qemu-img's grammar so that a size
 * that works with disksnap works with qemu-img: a number of bytes, optionally with a decimal
 * fraction and a suffix `k`, `M`, `G`, `T`, `P`, `E` (powers of 1024, either case): `512`,
 * `4k`, `64K`, `1.5G`. A fraction needs a unit and is rounded down to whole bytes, as
 * qemu-img does. Not sizes: `1GB`, `4KiB` (qemu-img refuses them), signs, hex, and two that
 * qemu-img tolerates but that are more likely slips than meant: surrounding spaces (`" 12"`)
 * and a `b` suffix (`12b`: a bare number already means bytes).
 */
import { invalid } from './errors';

const UNITS: Record<string, number> = { '': 1, k: 2 ** 10, m: 2 ** 20, g: 2 ** 30, t: 2 ** 40, p: 2 ** 50, e: 2 ** 60 };

export function parseSize(text: string, what = 'size'): number {
  const m = /^(\d+)(?:\.(\d+))?([kmgtpe]?)$/i.exec(String(text));
  const unit = m ? UNITS[m[3].toLowerCase()] : 0;
  if (!m || (m[2] !== undefined && unit === 1)) {
    throw invalid(`${what} '${text}' is not a size (examples: 512, 4k, 64K, 1.5G; suffixes k, M, G, T, P, E are powers of 1024)`);
  }
  const value = Number(m[1]) * unit + Math.floor(Number(`0.${m[2] ?? '0'}`) * unit);
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
