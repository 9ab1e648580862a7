/**
 * The directory backend: one file per object under the store directory.
 *
 * Objects that are written once (`putIfAbsent`: block objects, key records, store.json) are
 * written into an unnamed file (O_TMPFILE; a `.tmp-<pid>-<rand>` name where the filesystem
 * has none), fdatasynced, and linked under their key only if it is free — one trip through
 * the thread pool (native/object.cc). They leave the directory fsync to `flush()`, so a
 * snapshot of N new blocks costs N data syncs, issued concurrently so the filesystem can
 * commit them together, and one fsync per touched directory at the end. Objects that change
 * (`put`: records, manifests) go to a temporary name, are fsynced, renamed onto their key, and
 * sync their directory at once.
 *
 * Block objects filled into buffers from `allocBuffer` are written with O_DIRECT where the
 * filesystem takes it (src/storage/store/direct.ts says why; the addon falls back to the page
 * cache where it is refused, with no probe first); everything else goes through the page cache. Those
 * buffers start on a page boundary: O_DIRECT from memory 512 bytes off a page made every
 * object write several times slower on this project's VM (issue 18; native/object.cc has the
 * measurements).
 *
 * Temporary files left by a killed writer are listed with `temporary: true`; only gc, under
 * the exclusive store lock (so no writer is alive), removes them.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { DisksnapError, fromNodeError } from '../../engine/errors';
import { ObjectData, dataBytes } from './backend';
import type { ListOptions, ObjectInfo, ObjectReader, ObjectWriter, StoreBackend } from './backend';
import { DirectIo, bigBuffer } from './direct';
import { NativeAddon, native } from '../../engine/native';

const TMP_PREFIX = '.tmp-';

function tmpName(dir: string): string {
  return path.join(dir, `${TMP_PREFIX}${process.pid}-${randomBytes(6).toString('hex')}`);
}

async function fsyncDir(dir: string): Promise<void> {
  const fh = await fs.promises.open(dir, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

function wrap(e: unknown, file: string, what: string): DisksnapError {
  const err = fromNodeError(e, file);
  if (err.code === 'ENOSPC') return new DisksnapError(`${file}: no space left on device while ${what}`, 'ENOSPC', err.errno, file);
  if (!err.message.includes(file)) return new DisksnapError(`${file}: ${what}: ${err.message}`, err.code, err.errno, file);
  return err;
}

/** What getSmallMany reads of one record at most (records are a few KB; a snapshot's sealed metadata a few more). */
const MAX_RECORD_BYTES = 16 << 20;

export class DirectoryBackend implements StoreBackend {
  readonly location: string;
  private readonly dirtyDirs = new Set<string>();
  /** undefined: not probed yet; null: O_DIRECT unavailable here */
  private direct: DirectIo | null | undefined;

  constructor(root: string) {
    this.location = path.resolve(root);
  }

  describe(key: string): string {
    return path.join(this.location, key);
  }

  private file(key: string): string {
    if (key.startsWith('/') || key.split('/').some((p) => p === '..' || p === '')) {
      throw new DisksnapError(`bad store key '${key}'`, 'EINVALID');
    }
    return path.join(this.location, key);
  }

  async get(key: string, into?: Buffer): Promise<Buffer> {
    const file = this.file(key);
    // One trip through the pool (native/object.cc: open, fstat, read, close); again with a
    // buffer of the right size when the object did not fit.
    let buf = into ?? Buffer.allocUnsafe(64 * 1024);
    try {
      for (let attempt = 0; ; attempt++) {
        const size = await native().readObjectAsync(file, buf);
        if (size <= buf.length) return buf.subarray(0, size);
        if (attempt === 3) throw new DisksnapError(`${file} keeps growing while it is read`, 'EIO', undefined, file);
        buf = Buffer.allocUnsafe(size);
      }
    } catch (e) {
      throw wrap(e, file, 'reading');
    }
  }

  /**
   * A record read synchronously: a store of 300 snapshots reads 300 records per listing, and
   * a read through the thread pool cost ~0.1-0.15 ms each here against ~0.01 ms for this.
   */
  async getSmall(key: string): Promise<Buffer> {
    const file = this.file(key);
    try {
      return fs.readFileSync(file);
    } catch (e) {
      throw wrap(e, file, 'reading');
    }
  }

  /**
   * Records whole, each directory's in one native call (native/records.cc): ~13 us a record
   * where getSmall's readFileSync took ~15-30 us of the main thread and a Buffer each (a
   * store of 655 snapshots: 8.5 ms against 8-19 ms). A link is not followed (ELOOP): the
   * trust check refuses them.
   */
  async getSmallMany(keys: string[]): Promise<Array<Buffer | DisksnapError>> {
    const out: Array<Buffer | DisksnapError> = new Array(keys.length);
    const byDir = new Map<string, number[]>();
    keys.forEach((key, i) => {
      const dir = path.dirname(this.file(key));
      const at = byDir.get(dir);
      if (at) at.push(i);
      else byDir.set(dir, [i]);
    });
    for (const [dir, at] of byDir) {
      let got: ReturnType<NativeAddon['readFiles']>;
      try {
        got = native().readFiles(dir, at.map((i) => path.basename(keys[i])), MAX_RECORD_BYTES);
      } catch (e) {
        const err = wrap(e, dir, 'reading');
        if (err.code !== 'ENOENT') throw err;
        for (const i of at) out[i] = err; // the directory is gone: so is each record
        continue;
      }
      const { data, ends, failed } = got;
      at.forEach((i, k) => (out[i] = data.subarray(k ? ends[k - 1] : 0, ends[k])));
      for (let f = 0; f < failed.length; f += 2) {
        const i = at[failed[f] as number];
        out[i] = wrap(failed[f + 1], path.join(dir, path.basename(keys[i])), 'reading');
      }
    }
    return out;
  }

  async stat(key: string): Promise<number | undefined> {
    const file = this.file(key);
    try {
      return (await fs.promises.stat(file)).size;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw wrap(e, file, 'checking');
    }
  }

  /** Writes `data` to a temporary file in `dir` and syncs it; returns its name. */
  private async writeTemp(dir: string, data: Uint8Array, dataOnly: boolean): Promise<string> {
    const tmp = tmpName(dir);
    let fh: fs.promises.FileHandle | undefined;
    try {
      fh = await fs.promises.open(tmp, 'wx', 0o644);
      let done = 0;
      while (done < data.length) {
        const { bytesWritten } = await fh.write(data, done, data.length - done, done);
        done += bytesWritten;
      }
      if (dataOnly) await fh.datasync();
      else await fh.sync();
      await fh.close();
      fh = undefined;
      return tmp;
    } catch (e) {
      if (fh) await fh.close().catch(() => undefined);
      await fs.promises.unlink(tmp).catch(() => undefined);
      throw wrap(e, tmp, 'writing');
    }
  }

  localFile(key: string): string {
    return this.file(key);
  }

  allocBuffer(size: number, bulk = false): Buffer {
    if (this.direct === undefined) this.direct = DirectIo.forObjects() ?? null;
    return this.direct ? this.direct.alloc(size, bulk) : bigBuffer(size, false, bulk);
  }

  async putIfAbsent(key: string, data: ObjectData): Promise<boolean> {
    const file = this.file(key);
    const dir = path.dirname(file);
    // One trip through the pool (native/object.cc): an unnamed file (O_TMPFILE) written with
    // O_DIRECT where the data is aligned, fdatasynced, then linked under its key only if the
    // key is free (If-None-Match semantics, also for store.json, where a second writer must
    // lose).
    const parts = data instanceof Uint8Array ? [data] : data;
    const head = parts.length === 1 ? parts[0] : parts.length === 2 ? parts[0] : dataBytes(data);
    const tail = parts.length === 2 ? parts[1] : undefined;
    const put = () => native().putObjectAsync(dir, path.basename(file), head, tail);
    let existed: number;
    try {
      try {
        existed = await put();
      } catch (e) {
        if ((e as DisksnapError).code !== 'ENOENT') throw e;
        // a prefix directory's first object: a store makes blocks/<xx> as objects need them (all
        // 256 made with the store, one by one, cost a first snapshot ~21 ms on this project's
        // VM, 80 us a mkdir); the new directory's own name is made durable by `flush`
        if ((await fs.promises.mkdir(dir, { recursive: true })) !== undefined) this.dirtyDirs.add(path.dirname(dir));
        existed = await put();
      }
    } catch (e) {
      throw wrap(e, file, 'writing');
    }
    if (existed) return false;
    this.dirtyDirs.add(dir);
    return true;
  }

  /**
   * Many objects as putIfAbsent writes each, in one native job (putObjectsAsync: up to 8 in
   * flight on threads of its own). A missing prefix directory is made there; where its parent
   * is missing too, the object is put again alone (putIfAbsent makes the directories).
   */
  async putManyIfAbsent(items: Array<{ key: string; data: Uint8Array }>): Promise<boolean[]> {
    const files = items.map((it) => this.file(it.key));
    let status: Int32Array;
    try {
      status = await native().putObjectsAsync(files.map((f) => path.dirname(f)), files.map((f) => path.basename(f)), items.map((it) => it.data));
    } catch (e) {
      const file = (e as DisksnapError).path ?? this.location;
      throw wrap(e, file, 'writing');
    }
    const out: boolean[] = new Array(items.length);
    for (let i = 0; i < items.length; i++) {
      const s = status[i];
      if (s < 0) {
        out[i] = await this.putIfAbsent(items[i].key, items[i].data); // (makes the missing directories)
        continue;
      }
      if (s & 2) this.dirtyDirs.add(path.dirname(path.dirname(files[i]))); // a directory made
      if ((out[i] = (s & 1) === 0)) this.dirtyDirs.add(path.dirname(files[i]));
    }
    return out;
  }

  async put(key: string, data: Uint8Array): Promise<void> {
    const file = this.file(key);
    const dir = path.dirname(file);
    // a prefix newer than the store (bin/ of the recycle bin) is made on first use, durably
    if ((await fs.promises.mkdir(dir, { recursive: true }).catch((e) => { throw wrap(e, dir, 'creating'); })) !== undefined) await fsyncDir(path.dirname(dir));
    const tmp = await this.writeTemp(dir, data, false);
    try {
      await fs.promises.rename(tmp, file);
      await fsyncDir(dir);
    } catch (e) {
      await fs.promises.unlink(tmp).catch(() => undefined);
      throw wrap(e, file, 'replacing');
    }
  }

  async create(key: string): Promise<ObjectWriter> {
    const file = this.file(key);
    const dir = path.dirname(file);
    const tmp = tmpName(dir);
    let fh: fs.promises.FileHandle | undefined;
    try {
      fh = await fs.promises.open(tmp, 'wx', 0o644);
    } catch (e) {
      throw wrap(e, tmp, 'creating');
    }
    let offset = 0;
    let done = false;
    const h = fh;
    return {
      async write(data: Uint8Array): Promise<void> {
        try {
          let w = 0;
          while (w < data.length) {
            const { bytesWritten } = await h.write(data, w, data.length - w, offset + w);
            w += bytesWritten;
          }
          offset += data.length;
        } catch (e) {
          throw wrap(e, tmp, 'writing');
        }
      },
      async commit(): Promise<void> {
        try {
          await h.sync();
          await h.close();
          done = true;
          await fs.promises.rename(tmp, file);
          await fsyncDir(dir);
        } catch (e) {
          if (!done) await h.close().catch(() => undefined);
          await fs.promises.unlink(tmp).catch(() => undefined);
          throw wrap(e, file, 'writing');
        }
      },
      async abort(): Promise<void> {
        if (!done) await h.close().catch(() => undefined);
        done = true;
        await fs.promises.unlink(tmp).catch(() => undefined);
      },
    };
  }

  async open(key: string): Promise<ObjectReader> {
    const file = this.file(key);
    let fh: fs.promises.FileHandle;
    try {
      fh = await fs.promises.open(file, 'r');
    } catch (e) {
      throw wrap(e, file, 'opening');
    }
    const size = (await fh.stat()).size;
    return {
      size,
      async read(offset: number, length: number): Promise<Buffer> {
        const buf = Buffer.allocUnsafe(Math.max(0, Math.min(length, size - offset)));
        let done = 0;
        try {
          while (done < buf.length) {
            const { bytesRead } = await fh.read(buf, done, buf.length - done, offset + done);
            if (bytesRead === 0) break;
            done += bytesRead;
          }
        } catch (e) {
          throw wrap(e, file, 'reading');
        }
        return buf.subarray(0, done);
      },
      async close(): Promise<void> {
        await fh.close().catch(() => undefined);
      },
    };
  }

  async getRange(key: string, offset: number, length: number): Promise<Buffer> {
    const file = this.file(key);
    let fh: fs.promises.FileHandle | undefined;
    try {
      fh = await fs.promises.open(file, 'r');
      const buf = Buffer.allocUnsafe(length);
      let done = 0;
      while (done < length) {
        const { bytesRead } = await fh.read(buf, done, length - done, offset + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      return buf.subarray(0, done);
    } catch (e) {
      throw wrap(e, file, 'reading');
    } finally {
      await fh?.close().catch(() => undefined);
    }
  }

  async *list(prefix: string, opts: ListOptions = {}): AsyncIterable<ObjectInfo & { temporary: boolean }> {
    const rel = prefix === '' ? '' : prefix.replace(/\/?$/, '/');
    // keys are built as the walk goes (a path.join and a path.relative a file were ~10 us each)
    const stack: Array<{ dir: string; rel: string }> = [{ dir: rel === '' ? this.location : this.file(rel.slice(0, -1)), rel }];
    while (stack.length) {
      const at = stack.pop()!;
      let entries: fs.Dirent[];
      try {
        entries = await fs.promises.readdir(at.dir, { withFileTypes: true });
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw wrap(e, at.dir, 'listing');
      }
      for (const ent of entries) {
        const full = `${at.dir}/${ent.name}`;
        if (ent.isDirectory()) {
          stack.push({ dir: full, rel: `${at.rel}${ent.name}/` });
          continue;
        }
        if (!ent.isFile()) continue;
        // A synchronous stat: the inode was just read by readdir, so it costs microseconds,
        // where one trip through the thread pool per entry cost ~0.15 ms, one after the
        // other (a store of 300 snapshots lists ~900 files under snapshots/ each
        // `snapshot create`: 135 ms of its listing). Records are listed without sizes (they
        // are read whole): no stat at all, ~20 us a file (a record that went away since
        // readdir is then found missing when it is read).
        let size = -1;
        if (opts.sizes !== false) {
          let st: fs.Stats | undefined;
          try {
            st = fs.statSync(full, { throwIfNoEntry: false });
          } catch (e) {
            throw wrap(e, full, 'listing');
          }
          if (!st) continue; // removed since readdir
          size = st.size;
        }
        yield { key: `${at.rel}${ent.name}`, size, temporary: ent.name.startsWith(TMP_PREFIX) };
      }
    }
  }

  async delete(key: string): Promise<boolean> {
    const file = this.file(key);
    try {
      await fs.promises.unlink(file);
      return true;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw wrap(e, file, 'deleting');
    }
  }

  async flush(): Promise<void> {
    const dirs = [...this.dirtyDirs];
    this.dirtyDirs.clear();
    try {
      // one trip through the pool for all of them (native/object.cc syncDirsAsync)
      if (dirs.length) await native().syncDirsAsync(dirs);
    } catch (e) {
      for (const d of dirs) this.dirtyDirs.add(d);
      throw wrap(e, this.location, 'syncing directories');
    }
  }
}
