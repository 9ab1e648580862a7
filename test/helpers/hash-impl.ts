/**
 * The addon's hashing has a fast path per CPU feature (SHA-NI; VPCLMULQDQ in 512-bit registers
 * with AVX-512, else 256-bit) and node's OpenSSL as the fallback, chosen once per process by
 * DISKSNAP_HASH_IMPL (`openssl`: the fallback for both; `avx2`: the 256-bit GHASH). Tests compare
 * them by running a script in a child process with each setting.
 */
import { spawnSync } from 'node:child_process';
import type { Test } from 'tap';

/** Runs `script` (node -e) with DISKSNAP_HASH_IMPL=`impl` (unset: the default) and parses its stdout as JSON. */
export function withHashImpl<T>(t: Test, script: string, impl: 'openssl' | 'avx2' | undefined): T {
  const env = { ...process.env };
  if (impl) env.DISKSNAP_HASH_IMPL = impl;
  else delete env.DISKSNAP_HASH_IMPL;
  const r = spawnSync(process.execPath, ['-e', script], { env, encoding: 'utf8' });
  t.equal(r.status, 0, `child (${impl ?? 'default'}) exits 0 ${r.stderr}`);
  return JSON.parse(r.stdout) as T;
}
