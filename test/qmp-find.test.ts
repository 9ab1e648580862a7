/**
 * The command-line half of QMP socket discovery (src/host/qmp-find.ts): which arguments of a
 * QEMU command line are QMP unix sockets. The lock half is tested with a real QEMU in
 * live-qmp.test.ts.
 */
import t from 'tap';
import { parseQmpSockets, splitQemuOpts } from '../src/host/qmp-find';

t.test('splitQemuOpts: commas split, a doubled comma is a literal one', async (t) => {
  t.same(splitQemuOpts('socket,id=m,path=/a,,b,server=on'), ['socket', 'id=m', 'path=/a,b', 'server=on']);
  t.same(splitQemuOpts('unix:/x'), ['unix:/x']);
});

t.test('parseQmpSockets: the forms QEMU and libvirt use', async (t) => {
  t.same(parseQmpSockets(['-qmp', 'unix:/run/a.sock,server=on,wait=off']), ['/run/a.sock'], '-qmp unix:PATH,...');
  t.same(parseQmpSockets(['-qmp', 'unix:/run/a.sock']), ['/run/a.sock'], '-qmp unix:PATH');
  t.same(parseQmpSockets(['--qmp', 'unix:/run/b.sock,server,nowait']), ['/run/b.sock'], '--qmp and the old server,nowait flags');
  t.same(parseQmpSockets(['-qmp-pretty', 'unix:/run/p.sock,server=on']), ['/run/p.sock'], '-qmp-pretty');
  t.same(parseQmpSockets(['-qmp', 'unix:path=/run/c.sock,server=on']), ['/run/c.sock'], 'unix:path=PATH');
  t.same(parseQmpSockets(['-qmp', 'unix:rel.sock,server=on'], '/srv/vm'), ['/srv/vm/rel.sock'], "a relative path from QEMU's cwd");
  t.same(parseQmpSockets(['-qmp', 'tcp:localhost:4444,server=on']), [], 'tcp is not a unix socket');
  t.same(parseQmpSockets(['-qmp', 'unix:/run/a,,b.sock,server=on']), ['/run/a,b.sock'], 'an escaped comma in the path');
  // libvirt: a chardev and a control-mode monitor on it
  const libvirt = ['-name', 'guest=vm1', '-chardev', 'socket,id=charmonitor,fd=30,server=on,wait=off', '-mon', 'chardev=charmonitor,id=monitor,mode=control'];
  t.same(parseQmpSockets(libvirt), [], 'a chardev passed as an fd has no path');
  const chardev = ['-chardev', 'socket,id=mon0,path=/var/lib/vm/qmp.sock,server=on,wait=off', '-mon', 'chardev=mon0,mode=control'];
  t.same(parseQmpSockets(chardev), ['/var/lib/vm/qmp.sock'], '-chardev socket,path + -mon chardev=,mode=control');
  t.same(parseQmpSockets(['-mon', 'chardev=mon0,mode=control', '-chardev', 'socket,path=/q.sock,id=mon0,server=on']), ['/q.sock'], 'in any order, keys in any order');
  t.same(parseQmpSockets(['-chardev', 'socket,id=h,path=/hmp.sock,server=on', '-mon', 'chardev=h']), [], 'a readline (HMP) monitor is not QMP');
  t.same(parseQmpSockets(['-chardev', 'socket,id=h,path=/hmp.sock,server=on', '-mon', 'chardev=h,mode=readline']), [], 'mode=readline is not QMP');
  t.same(parseQmpSockets(['-chardev', 'socket,id=c,path=/client.sock', '-mon', 'chardev=c,mode=control']), [], 'a client chardev (no server) is not ours to connect to');
  t.same(parseQmpSockets(['-chardev', 'socket,id=s,path=/s.sock,server=on', '-serial', 'chardev:s']), [], 'a chardev with no monitor on it');
  t.same(parseQmpSockets(['-qmp', 'unix:/a.sock,server=on', '-chardev', 'socket,id=m,path=/b.sock,server=on', '-mon', 'm,mode=control']), ['/a.sock', '/b.sock'], 'both, -mon NAME short form');
  t.same(parseQmpSockets(['-qmp', 'unix:/a.sock,server=on', '-qmp', 'unix:/a.sock,server=on']), ['/a.sock'], 'no duplicates');
  t.same(parseQmpSockets(['-drive', 'file=/x.qcow2', '-qmp']), [], 'a trailing -qmp without a value');
});
