/**
 * A set of 32-byte digests in one Buffer (open addressing, linear probing): gc's mark set.
 * 32 bytes per slot at load <= 1/2, so ~64 bytes per distinct digest — 2 Mi distinct blocks
 * (1 TiB of data at 512 KiB) take 128 MiB, where a JS Set of hex strings would take ~4x that.
 * Digests are uniformly distributed, so their first 4 bytes are the hash. The all-zero digest
 * marks an empty slot and is tracked by a flag of its own.
 */
const SLOT = 32;

export class DigestSet {
  private table: Buffer;
  private mask: number;
  private count = 0;
  private hasZero = false;

  constructor(expected = 1024) {
    let cap = 1024;
    while (cap < expected * 2) cap *= 2;
    this.table = Buffer.alloc(cap * SLOT);
    this.mask = cap - 1;
  }

  get size(): number {
    return this.count + (this.hasZero ? 1 : 0);
  }

  private static isZero(d: Uint8Array, o: number): boolean {
    for (let i = 0; i < SLOT; i++) if (d[o + i] !== 0) return false;
    return true;
  }

  private find(d: Uint8Array, o: number): [number, boolean] {
    const t = this.table;
    let slot = ((d[o] | (d[o + 1] << 8) | (d[o + 2] << 16) | (d[o + 3] << 24)) >>> 0) & this.mask;
    for (;;) {
      const base = slot * SLOT;
      if (DigestSet.isZero(t, base)) return [slot, false];
      let eq = true;
      for (let i = 0; i < SLOT; i++) {
        if (t[base + i] !== d[o + i]) {
          eq = false;
          break;
        }
      }
      if (eq) return [slot, true];
      slot = (slot + 1) & this.mask;
    }
  }

  add(d: Uint8Array, offset = 0): void {
    if (DigestSet.isZero(d, offset)) {
      this.hasZero = true;
      return;
    }
    const [slot, found] = this.find(d, offset);
    if (found) return;
    this.table.set(d.subarray(offset, offset + SLOT), slot * SLOT);
    this.count++;
    if (this.count * 2 > this.mask + 1) this.grow();
  }

  has(d: Uint8Array, offset = 0): boolean {
    if (DigestSet.isZero(d, offset)) return this.hasZero;
    return this.find(d, offset)[1];
  }

  private grow(): void {
    const old = this.table;
    this.table = Buffer.alloc(old.length * 2);
    this.mask = (this.mask + 1) * 2 - 1;
    this.count = 0;
    for (let base = 0; base < old.length; base += SLOT) {
      if (!DigestSet.isZero(old, base)) this.add(old, base);
    }
  }
}
