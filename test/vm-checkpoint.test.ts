/**
 * Checkpoint trees under a real guest: the guest writes a file per boot, checkpoints are taken
 * between boots, IMAGE is reverted to an inner node (keeping the current state as a branch),
 * and each branch boots showing exactly its own files. Split from vm-live.test.ts to keep each
 * file well inside tap's per-file timeout on a loaded machine.
 */
import t from 'tap';
import * as path from 'node:path';
import * as diff from '../src/differencing';
import * as cp from '../src/differencing/checkpoint';
import { qemuCheck } from './helpers/qemu';
import { bootGuest, jobOk, makeRootfs, needGuest } from './helpers/guest';

const skip = needGuest();

t.test('checkpoint revert to an inner node; each branch boots with its own files', { skip }, async (t) => {
  const dir = t.testdir();
  const base = path.join(dir, 'base.raw');
  makeRootfs(base);
  const image = path.join(dir, 'vm.qcow2');
  await diff.createChild(base, image);
  const step = (name: string) => `echo ${name} > /data/${name} && sync && echo "WROTE ${name}"\n`;
  const list = `for f in one two three branch; do if [ -f /data/$f ]; then echo "HAS $f"; fi; done\n`;
  jobOk(t, await bootGuest({ disk: image, job: step('one') }), 'boot 1 writes one');
  await cp.create(image, 'one');
  jobOk(t, await bootGuest({ disk: image, job: step('two') }), 'boot 2 writes two');
  await cp.create(image, 'two');
  jobOk(t, await bootGuest({ disk: image, job: step('three') }), 'boot 3 writes three');
  // back to the inner node 'one', keeping the current state as a branch
  await cp.revert(image, 'one', { keep: 'three' });
  const r = await bootGuest({ disk: image, job: step('branch') + list });
  jobOk(t, r, 'boot on the reverted IMAGE');
  t.same([...r.output.matchAll(/^HAS (\S+)$/gm)].map((m) => m[1]), ['one', 'branch'], 'after revert to one: one, and the new branch file');
  for (const n of ['one', 'two', 'three']) t.equal(qemuCheck(cp.nodePath(image, n)).status, 0, `node ${n} clean`);
  await cp.revert(image, 'three', { keep: 'branch' });
  const r2 = await bootGuest({ disk: image, job: list });
  jobOk(t, r2, 'boot on the other branch');
  t.same([...r2.output.matchAll(/^HAS (\S+)$/gm)].map((m) => m[1]), ['one', 'two', 'three'], 'branch three shows one, two, three');
});
