/**
 * A "worked-in machine" for the benchmarks (issue 18): the state a user's machine is usually
 * in, not a freshly started one. `prepare()` runs before each measured operation:
 *
 *   1. the page cache filled with other data: a large sparse "ballast" file, as big as the
 *      machine's memory, is read once at the start (holes cost no I/O but take page-cache pages
 *      like any data), then a further 1 GiB slice of it before each operation;
 *   2. a few GiB written, synced and deleted (1 GiB in 16 MiB files; quick: 128 MiB): freed
 *      extents (discarded on a `-o discard` mount), recently deleted inodes, metadata to write;
 *   3. a background reader and writer at a low rate beside the measured operation: a child
 *      process that writes 1 MiB and reads 1 MiB (O_DIRECT, from its own file, so the device
 *      serves it) every 200 ms, syncing once a second. It stops by itself after `maxSeconds`,
 *      when the bench's stdin pipe to it closes, or when `stop()` kills it.
 *
 * Everything it creates lives in its own directory under the bench's and is removed by `close()`.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { spawn, ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { GiB, MiB, fillRandom, run } from './util';

const FILE_JS = path.resolve(__dirname, '..', 'src', 'engine', 'file.js');
const DIRECT_JS = path.resolve(__dirname, '..', 'src', 'storage', 'store', 'direct.js');

/** The background reader/writer: argv dir, maxSeconds. */
const BACKGROUND = `
const fs = require('fs'), path = require('path');
const { BlockFile } = require(${JSON.stringify(FILE_JS)});
const { DirectIo } = require(${JSON.stringify(DIRECT_JS)});
const [dir, maxSeconds] = [process.argv[1], Number(process.argv[2])];
const file = path.join(dir, 'background.dat');
const SPAN = 64 * 2 ** 20, STEP = 2 ** 20;
const w = fs.openSync(file, 'r+');
const dio = DirectIo.probe(dir);
const r = BlockFile.open(file, { direct: !!dio, lock: 'none' });
const buf = dio ? dio.alloc(STEP) : Buffer.alloc(STEP);
const out = Buffer.alloc(STEP, 0x5a);
let k = 0;
const end = Date.now() + maxSeconds * 1000;
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
const tick = () => {
  if (Date.now() > end) process.exit(0);
  out.writeUInt32LE(k, 0);
  fs.writeSync(w, out, 0, STEP, ((k * 7) % (SPAN / STEP)) * STEP);
  r.readSync(buf, ((k * 13 + 5) % (SPAN / STEP)) * STEP);
  if (++k % 5 === 0) fs.fdatasyncSync(w);
  setTimeout(tick, 200);
};
tick();
`;

export class WorkedIn {
  private readonly root: string;
  private readonly ballast: string;
  private readonly ballastBytes: number;
  private readonly churnBytes: number;
  private cursor = 0;
  private bg: ChildProcess | undefined;
  private readonly data = randomBytes(16 * MiB);

  constructor(dir: string, quick: boolean) {
    this.root = path.join(dir, 'worked-in');
    fs.mkdirSync(this.root, { recursive: true });
    this.ballast = path.join(this.root, 'ballast');
    this.ballastBytes = quick ? 2 * GiB : Math.min(32 * GiB, Math.ceil(os.totalmem() / GiB) * GiB);
    this.churnBytes = quick ? 128 * MiB : GiB;
    fs.writeFileSync(this.ballast, '');
    fs.truncateSync(this.ballast, this.ballastBytes);
    fillRandom(path.join(this.root, 'background.dat'), 0, 64 * MiB);
    run('sh', ['-c', 'cat "$1" > /dev/null', 'sh', this.ballast]);
  }

  /** Brings the machine into the worked-in state and starts the background I/O. */
  prepare(): void {
    this.stop();
    // 1. 1 GiB more of other data through the page cache (quick: 128 MiB), round the ballast.
    const slice = Math.min(this.ballastBytes, this.churnBytes);
    const mib = slice / MiB;
    const skip = (this.cursor % Math.max(1, this.ballastBytes / slice)) * mib;
    this.cursor++;
    run('dd', [`if=${this.ballast}`, 'of=/dev/null', 'bs=1M', `skip=${skip}`, `count=${mib}`, 'status=none']);
    // 2. written, synced, deleted
    const churn = path.join(this.root, 'churn');
    fs.mkdirSync(churn, { recursive: true });
    const piece = 16 * MiB;
    for (let i = 0; i * piece < this.churnBytes; i++) {
      this.data.writeUInt32LE(i, 0);
      const fd = fs.openSync(path.join(churn, `f${i}`), 'w');
      try {
        fs.writeSync(fd, this.data);
        fs.fdatasyncSync(fd);
      } finally {
        fs.closeSync(fd);
      }
    }
    fs.rmSync(churn, { recursive: true, force: true });
    // 3. background reader/writer, bounded
    this.bg = spawn(process.execPath, ['-e', BACKGROUND, this.root, '600'], { stdio: ['pipe', 'ignore', 'inherit'] });
  }

  /** Stops the background reader/writer (if running). */
  stop(): void {
    if (!this.bg) return;
    const bg = this.bg;
    this.bg = undefined;
    if (bg.exitCode === null && bg.pid !== undefined) bg.kill('SIGTERM');
    bg.stdin?.destroy();
  }

  close(): void {
    this.stop();
    fs.rmSync(this.root, { recursive: true, force: true });
  }
}
