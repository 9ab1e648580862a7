/** Runs the compiled CLI (dist/src/cli/main.js) as a user would, capturing everything. */
import { spawnSync, SpawnSyncReturns } from 'node:child_process';
import * as path from 'node:path';

export const ROOT = path.resolve(__dirname, '..', '..');
export const CLI = path.join(ROOT, 'dist', 'src', 'cli', 'main.js');

export interface CliResult {
  status: number | null;
  stdout: Buffer;
  stderr: string;
  out: string;
}

export function cli(args: string[], opts: { input?: Buffer | string; env?: NodeJS.ProcessEnv; cwd?: string } = {}): CliResult {
  const r: SpawnSyncReturns<Buffer> = spawnSync(process.execPath, [CLI, ...args], {
    input: opts.input,
    env: { ...process.env, ...opts.env },
    cwd: opts.cwd,
    maxBuffer: 1 << 30,
  });
  if (r.error) throw r.error;
  return { status: r.status, stdout: r.stdout, stderr: r.stderr.toString(), out: r.stdout.toString() };
}
