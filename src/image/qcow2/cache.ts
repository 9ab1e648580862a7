/**
 * A bounded LRU of cluster-sized metadata tables (L2 tables, refcount blocks), keyed by
 * their host offset. Dirty tables are written back by their owners (refcounts.ts,
 * clusters.ts), which know the ordering a write-back must respect; the cache only says who
 * is least recently used.
 * A Map keeps insertion order, so "touch" is delete + set, and the first key is the LRU.
 */
export interface CachedTable {
  offset: number;
  buf: Buffer;
  dirty: boolean;
}

export class TableCache {
  private readonly map = new Map<number, CachedTable>();

  constructor(readonly capacity: number) {
    if (!Number.isSafeInteger(capacity) || capacity < 1) throw new RangeError(`cache capacity ${capacity} must be a positive integer`);
  }

  get size(): number {
    return this.map.size;
  }

  /** The table at `offset`, made most recently used; undefined when not cached. */
  get(offset: number): CachedTable | undefined {
    const e = this.map.get(offset);
    if (e !== undefined) {
      this.map.delete(offset);
      this.map.set(offset, e);
    }
    return e;
  }

  peek(offset: number): CachedTable | undefined {
    return this.map.get(offset);
  }

  /** The entry to evict before inserting one more, if the cache is full. */
  victim(): CachedTable | undefined {
    if (this.map.size < this.capacity) return undefined;
    return this.map.values().next().value;
  }

  insert(e: CachedTable): void {
    this.map.delete(e.offset);
    this.map.set(e.offset, e);
  }

  delete(offset: number): void {
    this.map.delete(offset);
  }

  /** Dirty tables in host-offset order (sequential write-back). */
  dirty(): CachedTable[] {
    const out: CachedTable[] = [];
    for (const e of this.map.values()) if (e.dirty) out.push(e);
    return out.sort((a, b) => a.offset - b.offset);
  }

  clear(): void {
    this.map.clear();
  }
}
