/**
 * Ordinal order of strings (by UTF-16 code unit), for the ISO 8601 times and ids that records
 * are sorted by: for those, the same order as a locale's.
 *
 * Not `localeCompare`: its first call in a process loads ICU's collation data, ~8 ms on the
 * bench's VM, which every `snapshot create` paid to sort the store's records.
 */
export function ordinal(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
