/**
 * node:child_process, loaded on its first use. The bundled CLI (package.json "build": esbuild's
 * --alias) takes this module wherever it or commander asks for node:child_process: loading that
 * module (and net, dgram and the rest it pulls in) cost ~5 ms at the start of every command,
 * and most commands (a snapshot of a raw file, a restore, a list) start no process. Every use
 * reads a property at the call (`cp.spawn(...)`), which this object answers from the module.
 */
import type * as ChildProcess from 'node:child_process';

let loaded: typeof ChildProcess | undefined;
// eslint-disable-next-line @typescript-eslint/no-require-imports
const load = (): typeof ChildProcess => (loaded ??= require('child_process') as typeof ChildProcess);

export = new Proxy({} as typeof ChildProcess, {
  get: (_target, key) => Reflect.get(load(), key),
  has: (_target, key) => Reflect.has(load(), key),
  ownKeys: () => Reflect.ownKeys(load()),
  getOwnPropertyDescriptor: (_target, key) => {
    const d = Reflect.getOwnPropertyDescriptor(load(), key);
    return d && { ...d, configurable: true };
  },
});
