/**
 * Refusals that need both the differencing room and the host layer: an image attached to a
 * loop device must not be rolled back, reset, committed, repaired or re-headered, since the
 * kernel would keep using the old bytes. (Qcow2Image.open does not ask: the FUSE view of an
 * attached child opens the child itself.)
 */
import { busy } from '../engine/errors';
import { assertNotAttached, attachmentsOf } from '../host/attach';

export { assertNotAttached };

/** Refuses only a writable attachment (a parent attached read-only may get children). */
export function assertNotAttachedWritable(path: string, what: string): void {
  const writable = attachmentsOf(path).find((a) => !a.readOnly);
  if (writable) {
    throw busy(
      `${path} is attached read-write to ${writable.device}; the kernel could change it under its children. Detach it (\`disksnap detach ${writable.device}\`) first, then ${what} it`,
      path,
    );
  }
}
