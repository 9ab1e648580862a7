/**
 * The recycle bin (as EBS's): with a retention set on the store (`store bin --retention 7d`),
 * `snapshot delete` moves a snapshot into `bin/` instead of removing it; `snapshot undelete`
 * moves it back, whole, until its time runs out; `store gc` keeps the blocks of everything in
 * the bin and purges what has expired. A snapshot in the bin is no snapshot to anything else
 * (list, restore, parents of incrementals, prune): it is out of `snapshots/`.
 *
 *   bin.json              {"retentionSeconds": N}: no file, no bin (delete removes at once)
 *   bin/<id>.json         the record as it was, plus "binnedAt" and "binExpires"
 *   bin/<id>.map, .tags   its manifest and change tags, byte for byte
 *
 * Order, so that a crash never loses a snapshot: into the bin, the manifest and tags are copied
 * first and the bin record last (it is what makes the entry count), then the snapshot's own
 * record is removed (from then on it is binned), then its manifest and tags. Out of the bin,
 * the reverse: manifest and tags back, the record back (the snapshot is live again), then the
 * bin entry goes. A crash in between leaves both: the live record wins (gc removes a bin entry
 * whose snapshot is live), and each step can be re-run.
 */
import { DisksnapError, invalid, isDisksnapError } from '../engine/errors';
import { ordinal } from '../engine/order';
import { Store } from './store/store';
import { tagsKey } from './store/tags';
import { packsKey } from './store/packs';
import { isSnapshotId, parseSnapshotRecord, SnapshotJson, snapshotJson } from './store/records';
import { StoreOptions, withStoreLock } from './common';

const CONFIG = 'bin.json';
const binKey = (id: string, ext: 'json' | 'map' | 'tags' | 'packs') => `bin/${id}.${ext}`;

export interface BinEntry {
  snapshot: SnapshotJson;
  binnedAt: string;
  /** after this time gc purges it; undelete is refused */
  binExpires: string;
}

/** The store's bin retention in seconds, or undefined when it has no bin. */
export async function binRetention(store: Store): Promise<number | undefined> {
  let text: Buffer;
  try {
    text = await store.backend.get(CONFIG);
  } catch (e) {
    if (isDisksnapError(e, 'ENOENT')) return undefined;
    throw e;
  }
  let v: unknown;
  try {
    v = (JSON.parse(text.toString('utf8')) as { retentionSeconds?: unknown }).retentionSeconds;
  } catch {
    v = undefined;
  }
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v <= 0) {
    throw new DisksnapError(`${store.backend.describe(CONFIG)}: retentionSeconds is ${JSON.stringify(v)}, expected a whole number of seconds above 0`, 'ECORRUPT');
  }
  return v;
}

/** `store bin`: the store's retention, null when it has no bin. */
export async function binSettings(opts: StoreOptions = {}): Promise<{ retentionSeconds: number | null }> {
  return { retentionSeconds: (await binRetention(await Store.open(opts.store))) ?? null };
}

/** `store bin --retention SECONDS` (null: no bin; what is in it stays until it expires). */
export async function setBinRetention(seconds: number | null, opts: StoreOptions = {}): Promise<{ retentionSeconds: number | null }> {
  if (seconds !== null && (!Number.isSafeInteger(seconds) || seconds <= 0)) throw invalid(`bin retention ${seconds} is not a whole number of seconds above 0`);
  const store = await Store.open(opts.store);
  if (seconds === null) await store.backend.delete(CONFIG);
  else await store.backend.put(CONFIG, Buffer.from(JSON.stringify({ retentionSeconds: seconds }) + '\n'));
  return { retentionSeconds: seconds };
}

async function copyIfPresent(store: Store, from: string, to: string): Promise<void> {
  let data: Buffer;
  try {
    data = await store.backend.get(from);
  } catch (e) {
    if (isDisksnapError(e, 'ENOENT')) return;
    throw e;
  }
  await store.backend.put(to, data);
}

/** Moves snapshot `id` (its record text given) into the bin; the caller holds the store lock. */
export async function moveToBin(store: Store, id: string, seconds: number): Promise<BinEntry> {
  await copyIfPresent(store, store.manifestKey(id), binKey(id, 'map'));
  await copyIfPresent(store, tagsKey(id), binKey(id, 'tags'));
  await copyIfPresent(store, packsKey(id), binKey(id, 'packs'));
  const rec = JSON.parse((await store.backend.get(store.snapshotKey(id))).toString('utf8')) as Record<string, unknown>;
  const now = new Date();
  const entry = { ...rec, binnedAt: now.toISOString(), binExpires: new Date(now.getTime() + seconds * 1000).toISOString() };
  await store.backend.put(binKey(id, 'json'), Buffer.from(JSON.stringify(entry, null, 2) + '\n'));
  await store.backend.delete(store.snapshotKey(id));
  await store.backend.delete(store.manifestKey(id));
  await store.backend.delete(tagsKey(id)).catch(() => false);
  await store.backend.delete(packsKey(id)).catch(() => false);
  return readEntry(store, id);
}

async function readEntry(store: Store, id: string): Promise<BinEntry> {
  const key = binKey(id, 'json');
  const text = await store.backend.get(key);
  const o = JSON.parse(text.toString('utf8')) as Record<string, unknown>;
  const binnedAt = o.binnedAt;
  const binExpires = o.binExpires;
  if (typeof binnedAt !== 'string' || typeof binExpires !== 'string' || Number.isNaN(Date.parse(binnedAt)) || Number.isNaN(Date.parse(binExpires))) {
    throw new DisksnapError(`${store.backend.describe(key)}: binnedAt/binExpires are not times`, 'ECORRUPT');
  }
  delete o.binnedAt;
  delete o.binExpires;
  const rec = parseSnapshotRecord(store.backend.describe(key), Buffer.from(JSON.stringify(o)));
  return { snapshot: snapshotJson(rec), binnedAt, binExpires };
}

/** Everything in the bin, oldest first; unreadable entries are reported, not thrown. */
export async function listBin(opts: StoreOptions = {}): Promise<{ entries: BinEntry[]; damaged: Array<{ id: string; error: DisksnapError }> }> {
  const store = await Store.open(opts.store);
  return binOf(store);
}

export async function binOf(store: Store): Promise<{ entries: BinEntry[]; damaged: Array<{ id: string; error: DisksnapError }> }> {
  const entries: BinEntry[] = [];
  const damaged: Array<{ id: string; error: DisksnapError }> = [];
  for await (const o of store.backend.list('bin/')) {
    if (o.temporary || !o.key.endsWith('.json')) continue;
    const id = o.key.slice('bin/'.length, -'.json'.length);
    try {
      entries.push(await readEntry(store, id));
    } catch (e) {
      if (isDisksnapError(e, 'ENOENT')) continue;
      damaged.push({ id, error: e instanceof DisksnapError ? e : new DisksnapError(String((e as Error).message), 'ECORRUPT') });
    }
  }
  entries.sort((a, b) => ordinal(a.binnedAt, b.binnedAt));
  return { entries, damaged };
}

/** Removes a bin entry's objects (record last-but-one: the record first, so it never counts half-gone). */
export async function purgeEntry(store: Store, id: string): Promise<void> {
  await store.backend.delete(binKey(id, 'json'));
  await store.backend.delete(binKey(id, 'map'));
  await store.backend.delete(binKey(id, 'tags')).catch(() => false);
  await store.backend.delete(binKey(id, 'packs')).catch(() => false);
}

/** The manifest keys of bin entries gc must keep (not expired), and the ids it purges. */
export async function binForGc(store: Store, live: Set<string>, now = Date.now()): Promise<{ keep: string[]; purge: string[] }> {
  const keep: string[] = [];
  const purge: string[] = [];
  const { entries, damaged } = await binOf(store);
  for (const e of entries) {
    // a live snapshot of the same id: an undelete (or delete) a crash interrupted; the live record wins
    if (live.has(e.snapshot.id) || Date.parse(e.binExpires) <= now) purge.push(e.snapshot.id);
    else keep.push(binKey(e.snapshot.id, 'map'));
  }
  // a damaged entry is kept whole (its manifest marks its blocks) until someone looks at it
  for (const d of damaged) keep.push(binKey(d.id, 'map'));
  return { keep, purge };
}

/** `snapshot undelete ID`: back from the bin, whole, before it expires. */
export async function undeleteSnapshot(ref: string, opts: StoreOptions = {}): Promise<SnapshotJson> {
  const store = await Store.open(opts.store);
  return withStoreLock(store, 'shared', opts, async () => {
    const { entries } = await binOf(store);
    const id = ref.startsWith('snap-') ? ref : `snap-${ref}`;
    const matches = entries.filter((e) => e.snapshot.id === ref || (ref.length >= 4 && e.snapshot.id.startsWith(id)) || (e.snapshot.name !== '' && e.snapshot.name === ref));
    if (matches.length === 0) throw new DisksnapError(`no snapshot ${ref} in the recycle bin${isSnapshotId(ref) ? ' (expired and purged, or never deleted)' : ''}`, 'ENOENT');
    if (matches.length > 1) throw invalid(`${ref} matches ${matches.length} snapshots in the bin: give more of the id`);
    const e = matches[0];
    if (Date.parse(e.binExpires) <= Date.now()) throw new DisksnapError(`snapshot ${e.snapshot.id} expired in the bin at ${e.binExpires}; the next store gc purges it`, 'ENOENT');
    const sid = e.snapshot.id;
    await copyIfPresent(store, binKey(sid, 'map'), store.manifestKey(sid));
    await copyIfPresent(store, binKey(sid, 'tags'), tagsKey(sid));
    await copyIfPresent(store, binKey(sid, 'packs'), packsKey(sid));
    const o = JSON.parse((await store.backend.get(binKey(sid, 'json'))).toString('utf8')) as Record<string, unknown>;
    delete o.binnedAt;
    delete o.binExpires;
    await store.backend.put(store.snapshotKey(sid), Buffer.from(JSON.stringify(o, null, 2) + '\n'));
    await purgeEntry(store, sid);
    return snapshotJson(await store.readSnapshot(sid));
  });
}
