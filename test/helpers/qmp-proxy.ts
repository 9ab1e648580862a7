/**
 * A QMP proxy for tests: disksnap talks to QEMU through it, and a test sees (and may hold back
 * or rewrite) each command on its way: to make a race's window deterministic, or to have QEMU
 * itself refuse a step.
 */
import * as net from 'node:net';

export type QmpCommand = { execute: string; arguments?: Record<string, unknown> };

/**
 * A QMP proxy on `listen` to QEMU's socket `upstream`: records each command's name, and runs
 * `before(cmd)` (synchronously) before forwarding a command; `false` from it drops the command,
 * and changes it makes to `cmd` are what QEMU gets.
 */
export function qmpProxy(listen: string, upstream: string, before: (cmd: QmpCommand) => boolean | void): { commands: string[]; close(): void } {
  const commands: string[] = [];
  const server = net.createServer((client) => {
    const up = net.connect(upstream);
    up.pipe(client);
    let buf = '';
    client.on('data', (b) => {
      buf += b.toString('utf8');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl + 1);
        buf = buf.slice(nl + 1);
        const cmd = JSON.parse(line) as QmpCommand;
        commands.push(cmd.execute);
        if (before(cmd) !== false) up.write(`${JSON.stringify(cmd)}\n`);
      }
    });
    client.on('close', () => up.end());
    client.on('error', () => up.destroy()); // a killed client resets its connection
    up.on('error', () => client.destroy());
  });
  server.listen(listen);
  return { commands, close: () => server.close() };
}
