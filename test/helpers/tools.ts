/**
 * Tests that need a system tool or root skip with a reason where it is missing, except when
 * DISKSNAP_REQUIRE_TOOLS=1 (set by .ci/run): then a missing tool fails the test, so that CI
 * runs every test.
 */
import { spawnSync } from 'node:child_process';

export const REQUIRE_TOOLS = process.env.DISKSNAP_REQUIRE_TOOLS === '1';

export function hasCommand(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

export function isRoot(): boolean {
  return typeof process.getuid === 'function' && process.getuid() === 0;
}

/**
 * Returns a skip reason for tap's `{ skip }` option, or false when everything is present.
 * Under DISKSNAP_REQUIRE_TOOLS=1 a missing need throws instead, which fails the test file
 * with the reason.
 */
export function missing(needs: { commands?: string[]; root?: boolean }): string | false {
  const lacks: string[] = [];
  for (const c of needs.commands ?? []) if (!hasCommand(c)) lacks.push(`command '${c}'`);
  if (needs.root && !isRoot()) lacks.push('root');
  if (lacks.length === 0) return false;
  const reason = `needs ${lacks.join(', ')}`;
  if (REQUIRE_TOOLS) {
    throw new Error(`${reason}, and DISKSNAP_REQUIRE_TOOLS=1 forbids skipping (.ci/run installs them)`);
  }
  return reason;
}
