/**
 * What a volume's mtime proves (src/storage/volume-times.ts): a write during a snapshot's read
 * must move the volume's times, however soon after the snapshot's first stat it comes.
 *   - native mtimeProbe tells how the filesystem keeps them: multigrain (a write right after a
 *     stat always moves them: Linux 6.13+ on ext4 and tmpfs), coarse, or in whole seconds;
 *   - on ext4 made with 128-byte inodes (times in whole seconds) a raw volume written during
 *     the read within the same second as its last write is still seen to move: the read waits
 *     for the next seconds first (it waited 9 ms before, and such a write went unseen).
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as snap from '../src/storage';
import { native } from '../src/engine/native';
import { withFaults } from '../src/storage/faults';
import { makeExt4, needLoop, scratch } from './helpers/loop';

const n = native();
const MiB = 1024 * 1024;
const [major, minor] = os.release().split('.').map(Number);
const multigrainKernel = major > 6 || (major === 6 && minor >= 13);

t.test('mtimeProbe: multigrain times on ext4 and tmpfs of a 6.13+ kernel, nothing left behind, null without a directory', async (t) => {
  for (const dir of [t.testdir({ keep: 'x' }), fs.mkdtempSync('/dev/shm/disksnap-times-')]) {
    t.teardown(() => dir.startsWith('/dev/shm/') && fs.rmSync(dir, { recursive: true, force: true }));
    const before = fs.readdirSync(dir);
    const p = n.mtimeProbe(dir);
    t.ok(p, `${dir}: probed`);
    if (!p) continue;
    t.equal(p.dev, fs.statSync(dir).dev, `${dir}: the directory's device`);
    t.equal(p.wholeSeconds, false, `${dir}: times with nanoseconds`);
    const fsType = fs.statfsSync(dir).type;
    if (multigrainKernel && (fsType === 0xef53 || fsType === 0x01021994)) t.equal(p.fine, true, `${dir}: multigrain on Linux ${os.release()}`);
    t.same(fs.readdirSync(dir), before, `${dir}: the probe left no file`);
    if (p.fine) {
      // the property the snapshot relies on, checked directly: 2000 back-to-back rounds
      const file = path.join(dir, 'rounds');
      const fd = fs.openSync(file, 'w+');
      let unmoved = 0;
      for (let i = 0; i < 2000; i++) {
        const a = n.fstat(fd).mtimeNs;
        fs.writeSync(fd, 'x', 0, 'utf8', i % 512);
        if (n.fstat(fd).mtimeNs === a) unmoved++;
      }
      fs.closeSync(fd);
      fs.unlinkSync(file);
      t.equal(unmoved, 0, `${dir}: every write right after a stat moved the mtime`);
    }
  }
  t.equal(n.mtimeProbe('/nonexistent-dir-of-disksnap'), null, 'no directory: null');
});

const skip = needLoop(['mkfs.ext4']);

t.test('ext4 with times in whole seconds: a write during the read is seen, and the snapshot is the volume after it', { skip }, async (t) => {
  const s = scratch();
  t.teardown(() => s.cleanup());
  const img = path.join(s.dir, 'fs.img');
  makeExt4(img, '64M', ['-I', '128']);
  const mp = path.join(s.dir, 'mnt');
  s.mount(img, mp, ['-o', 'loop']);
  const p = n.mtimeProbe(mp);
  t.match(p, { fine: false, wholeSeconds: true }, 'the probe sees whole seconds');

  const vol = path.join(mp, 'vol.raw');
  const store = path.join(s.dir, 'store');
  const data = Buffer.alloc(8 * MiB, 0x5a);
  fs.writeFileSync(vol, data);
  await snap.createSnapshot(vol, { store, blockSize: MiB });
  const logs: string[] = [];
  let writes = 0;
  const t0 = Date.now();
  // rewritten now, then written again during the read: within one second if nothing waits
  fs.writeFileSync(vol, Buffer.alloc(MiB, 0x6b), { flag: 'r+' });
  const s2 = await snap.createSnapshot(
    vol,
    withFaults({ store, blockSize: MiB, onLog: (m: string) => logs.push(m) }, {
      afterChunk: (attempt) => {
        if (attempt !== 1 || writes++) return;
        const fd = fs.openSync(vol, 'r+');
        fs.writeSync(fd, Buffer.alloc(4096, 0x7c), 0, 4096, 5 * MiB);
        fs.closeSync(fd);
      },
    }),
  );
  t.equal(writes, 1, 'the writer ran during the first read');
  t.ok(Date.now() - t0 >= 1000, `the read waited for the clock to pass the last write's second (${Date.now() - t0} ms)`);
  const out = path.join(s.dir, 'restored.raw');
  await snap.restoreSnapshot(s2.id, { store, to: out });
  t.ok(fs.readFileSync(out).equals(fs.readFileSync(vol)), 'the snapshot is the volume after the write');
  t.match(logs.join('\n'), /changed while it was being read.*starting over/, 'the write was seen');
});
