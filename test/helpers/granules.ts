/**
 * A small raw volume for the tests of pieces over granule change tags (snapshot-granules,
 * snapshot-packs): 24 MiB, 20 MiB of random data then a hole, in a store of 512 KiB blocks
 * (64 KiB granules); and the digest of a snapshot restored from it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import * as snap from '../../src/storage';

export const KiB = 1024;
export const MiB = 2 ** 20;
export const BS = 512 * KiB;
export const PS = 64 * KiB;
export const SIZE = 24 * MiB;

export const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** A raw volume with 20 MiB of random data and 4 MiB of hole at the end. */
export function makeVolume(file: string): void {
  fs.writeFileSync(file, randomBytes(20 * MiB));
  fs.truncateSync(file, SIZE);
}

/** The SHA-256 of snapshot `id` restored to a new file in `dir` (removed after). */
export async function restored(store: string, id: string, dir: string, key?: { keyFile: string }): Promise<string> {
  const out = path.join(dir, `r-${randomBytes(4).toString('hex')}.raw`);
  await snap.restoreSnapshot(id, { store, to: out, key });
  const digest = sha(fs.readFileSync(out));
  fs.rmSync(out);
  return digest;
}
