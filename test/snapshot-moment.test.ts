/**
 * A snapshot read from the live volume (no freeze, no clone) is of one moment, even when a
 * process writes the volume through a shared mmap: stores into pages that are already dirty
 * move neither mtime nor ctime, so the stat check cannot see them. Here such a writer moves
 * two markers, one in the first chunk and one in the last, after the first chunk was read:
 * the snapshot must not keep the old first marker beside the new last one. It is retried
 * (and then holds the later moment), or it ends `error` — never `completed` and torn. Both
 * proofs are run: clean pages (the volume's fdatasync write-protects the mapping, so the
 * store faults and moves mtime) and the second read pass (forced by a test hook).
 */
import t from 'tap';
import type { Test } from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { spawn } from 'node:child_process';
import * as snap from '../src/storage';
import { withFaults } from '../src/storage/faults';
import { MiB, makeImage } from '../fixtures/store/helpers';
import { missing } from './helpers/tools';

const BS = 64 * 1024;
const SIZE = 40 * MiB; // three 16 MiB read chunks
const MARKS = [4096, 36 * MiB + 8192]; // a page in the first chunk, a page in the last

/** A child process that maps `file` shared and, on each line `n`, stores n at every marker. */
function mmapWriter(file: string): { set: (n: number) => Promise<void>; close: () => void } {
  const py = `
import mmap, struct, sys
f = open(sys.argv[1], 'r+b')
m = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
marks = [int(x) for x in sys.argv[2].split(',')]
for line in sys.stdin:
    n = int(line)
    for off in marks:
        m[off:off + 8] = struct.pack('<Q', n)
    sys.stdout.write('ok\\n'); sys.stdout.flush()
`;
  const child = spawn('python3', ['-c', py, file, MARKS.join(',')], { stdio: ['pipe', 'pipe', 'inherit'] });
  let waiting: (() => void)[] = [];
  child.stdout!.on('data', (d: Buffer) => {
    for (let i = 0; i < d.toString().split('ok').length - 1; i++) waiting.shift()?.();
  });
  return {
    set: (n) =>
      new Promise<void>((resolve) => {
        waiting.push(resolve);
        child.stdin!.write(`${n}\n`);
      }),
    close: () => {
      waiting = [];
      child.stdin!.end();
    },
  };
}

function markers(file: string): number[] {
  const fd = fs.openSync(file, 'r');
  try {
    return MARKS.map((off) => {
      const b = Buffer.alloc(8);
      fs.readSync(fd, b, 0, 8, off);
      return Number(b.readBigUInt64LE());
    });
  } finally {
    fs.closeSync(fd);
  }
}

async function twoMoments(t: Test, proveByReading: boolean): Promise<void> {
  const dir = t.testdir();
  const store = path.join(dir, 'store');
  const vol = path.join(dir, 'vol.img');
  makeImage(vol, SIZE, [{ offset: 0, length: SIZE, seed: 3 }]);
  const w = mmapWriter(vol);
  t.teardown(w.close);
  await w.set(1); // dirties both pages (the fault moves mtime now, not later)
  await new Promise((r) => setTimeout(r, 200));
  const logs: string[] = [];
  const opts = withFaults(
    { store, blockSize: BS, changeTags: true, onLog: (m: string) => logs.push(m) },
    {
      afterChunk: async (attempt, chunk) => {
        if (attempt === 1 && chunk === 0) await w.set(2); // the first marker was read as 1
      },
      proveByReading,
    },
  );
  const s = await snap.createSnapshot(vol, opts).catch((e: Error) => e);
  if (s instanceof Error) {
    t.match(s.message, /changed while it was being read/, 'or it fails, saying why');
    return;
  }
  t.equal(s.state, 'completed');
  const out = path.join(dir, 'out.img');
  await snap.restoreSnapshot(s.id, { store, to: out });
  const got = markers(out);
  t.same(got, [got[0], got[0]], `every marker from one moment (got ${got.join(', ')})`);
  t.same(got, [2, 2], 'the moment after the write: the attempt that saw it was thrown away');
  t.match(logs.join('\n'), /changed while it was being read.*starting over/, 'the retry is logged');

  // An incremental snapshot has the same guarantee.
  const opts2 = withFaults(
    { store, onLog: (m: string) => logs.push(m) },
    {
      afterChunk: async (attempt, chunk) => {
        if (attempt === 1 && chunk === 0) await w.set(3);
      },
      proveByReading,
    },
  );
  const s2 = await snap.createSnapshot(vol, opts2);
  t.equal(s2.state, 'completed');
  await snap.restoreSnapshot(s2.id, { store, to: out, force: true });
  const again = markers(out);
  t.same(again, [again[0], again[0]], `the incremental is of one moment too (got ${again.join(', ')})`);
}

const skip = missing({ commands: ['python3'] });
// On ext4/xfs/btrfs (the test directory's filesystem here) by clean pages: the fdatasync
// write-protects the mapping, the writer's store faults and moves mtime.
t.test('a write through a shared mmap during the read does not give a completed snapshot of two moments', { skip }, (t) => twoMoments(t, false));
t.test('the same, proven by the second read pass (block devices, tmpfs)', { skip }, (t) => twoMoments(t, true));
