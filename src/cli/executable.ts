/**
 * The first two lines of the `disksnap` executable, dist/src/cli/main.js, which `npm run build`
 * writes by running this file. They are a shell script for the shell and a string and a comment
 * for JavaScript:
 *
 *   #!/bin/sh
 *   ':' //; export DISKSNAP_NODE_EXTRA_CA_CERTS="${NODE_EXTRA_CA_CERTS-}"; unset NODE_EXTRA_CA_CERTS; exec node "$0" "$@"
 *
 * The shell starts node without NODE_EXTRA_CA_CERTS, which node 20 parses as it starts (~40 ms
 * with Debian's bundle), and passes its value on (../engine/extra-ca.ts). Only POSIX sh is
 * needed: `env -S` would do it on one line, but busybox's env (Alpine) has no -S. `exec`
 * replaces the shell, so the process is node's, with the same pid. (V8's flag is not given
 * here: ./main.ts setCliFlags has why.) Run as `node main.js`, node
 * skips the first line and reads the second as a string and a comment. The compiled file puts
 * "use strict" after them, still in the directive prologue.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { MOVED_EXTRA_CA } from '../engine/extra-ca';

export const LAUNCHER = `#!/bin/sh\n':' //; export ${MOVED_EXTRA_CA}="\${NODE_EXTRA_CA_CERTS-}"; unset NODE_EXTRA_CA_CERTS; exec node "$0" "$@"\n`;

/** Puts LAUNCHER in place of `file`'s #! line (once), executable, through a temporary name. */
export function writeLauncher(file: string): void {
  const text = fs.readFileSync(file, 'utf8');
  if (text.startsWith(LAUNCHER)) return;
  if (!text.startsWith('#!')) throw new Error(`${file} does not start with a #! line`);
  const tmp = `${file}.${process.pid}.tmp`;
  fs.writeFileSync(tmp, LAUNCHER + text.slice(text.indexOf('\n') + 1), { mode: 0o755 });
  fs.chmodSync(tmp, 0o755); // whatever the umask
  fs.renameSync(tmp, file);
}

if (require.main === module) writeLauncher(path.join(__dirname, 'main.js'));
