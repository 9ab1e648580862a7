/**
 * Runs the compiled CLI (dist/src/cli/main.js) as a user would (the executable itself, whose
 * two lines of shell start node: src/cli/executable.ts), capturing everything.
 * Every JSON document the run printed is validated against its JSON Schema (schemas/, see
 * ./schemas.ts): a document that does not match fails the test that ran the command.
 */
import { spawn, spawnSync, SpawnSyncReturns } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { checkTraced } from './schemas';

export const ROOT = path.resolve(__dirname, '..', '..');
export const CLI = path.join(ROOT, 'dist', 'src', 'cli', 'main.js');

export interface CliResult {
  status: number | null;
  stdout: Buffer;
  stderr: string;
  out: string;
}

let traceSeq = 0;

/** A fresh DISKSNAP_DOCUMENT_TRACE file for one run (removed by the caller). */
export function traceFile(): string {
  return path.join(os.tmpdir(), `disksnap-doc-trace-${process.pid}-${++traceSeq}`);
}

export function cli(args: string[], opts: { input?: Buffer | string; env?: NodeJS.ProcessEnv; cwd?: string } = {}): CliResult {
  const trace = traceFile();
  try {
    const r: SpawnSyncReturns<Buffer> = spawnSync(CLI, args, {
      input: opts.input,
      env: { ...process.env, DISKSNAP_DOCUMENT_TRACE: trace, ...opts.env },
      cwd: opts.cwd,
      maxBuffer: 1 << 30,
    });
    if (r.error) throw r.error;
    const res = { status: r.status, stdout: r.stdout, stderr: r.stderr.toString(), out: r.stdout.toString() };
    checkTraced(trace, res.out, res.stderr);
    return res;
  } finally {
    fs.rmSync(trace, { force: true });
  }
}

/**
 * Runs the executable without blocking this process (a test that serves something to the
 * command, or runs two at once). `env` is laid over this process's environment; a key set to
 * undefined is left out.
 */
export function cliAsync(args: string[], env: NodeJS.ProcessEnv = {}): Promise<{ status: number | null; out: string; err: string }> {
  return new Promise((resolve, reject) => {
    const c = spawn(CLI, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    c.stdout.on('data', (d) => (out += d));
    c.stderr.on('data', (d) => (err += d));
    c.on('error', reject);
    c.on('close', (status) => resolve({ status, out, err }));
  });
}
