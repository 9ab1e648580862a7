/** `diff check`: refcount and L1/L2 consistency of a qcow2 image (src/image/qcow2/check.ts). */
import { checkImage, CheckResult } from '../image/qcow2/check';
import { assertNotAttached } from './attached';

export type { CheckResult };

/** `repair` (leaks only) refuses an attached image: the kernel would keep using the old bytes. */
export function check(path: string, opts: { repair?: boolean } = {}): CheckResult {
  if (opts.repair) assertNotAttached(path, 'repair');
  return checkImage(path, opts);
}
