/**
 * NODE_EXTRA_CA_CERTS, trusted from the first TLS connection instead of from the start.
 *
 * Node 20 reads the file named by NODE_EXTRA_CA_CERTS as it starts, before any JavaScript
 * runs, and parses every certificate in it, whether or not the process ever opens a TLS
 * connection. With Debian's bundle (/etc/ssl/certs/ca-certificates.crt, 144 certificates),
 * which these machines name there, that is ~40 ms of `node -e 0`'s ~100 ms, and it made a
 * snapshot command ~60 ms slower (README, "Design"). Only an S3 store over https ever opens
 * a TLS connection here. So the executable's first two lines, shell (../cli/executable.ts),
 * start node without the variable and pass its value on as DISKSNAP_NODE_EXTRA_CA_CERTS:
 *
 *   ':' //; export DISKSNAP_NODE_EXTRA_CA_CERTS="${NODE_EXTRA_CA_CERTS-}"; unset NODE_EXTRA_CA_CERTS; exec node "$0" "$@"
 *
 *   deferExtraCa()   (the launcher, first thing) puts NODE_EXTRA_CA_CERTS back in
 *                    process.env, so child processes see the user's environment unchanged,
 *                    and notes the file as not yet trusted
 *   trustExtraCa()   (the S3 backend, before it makes its agents) reads the file once and,
 *                    from then on, adds its certificates to every TLS context made with
 *                    node's default roots: what node does with the variable at start
 *
 * The launcher and the bundle each load their own copy of this module, so the state is one
 * property of globalThis. A file that cannot be read is a warning, as node makes it.
 */
import * as fs from 'node:fs';
import type * as TlsModule from 'node:tls';

/** The variable the executable's shell lines move NODE_EXTRA_CA_CERTS to. */
export const MOVED_EXTRA_CA = 'DISKSNAP_NODE_EXTRA_CA_CERTS';

const STATE = Symbol.for('disksnap.extraCaCerts');

interface Deferred {
  file: string;
  trusted: boolean;
}

function state(): Deferred | undefined {
  return (globalThis as { [STATE]?: Deferred })[STATE];
}

/**
 * Takes over the value the executable's shell lines moved aside (no-op when the process was
 * started some other way): back under its own name for child processes, and noted for
 * `trustExtraCa`. Returns the file, or undefined when there is none to defer.
 */
export function deferExtraCa(env: NodeJS.ProcessEnv = process.env): string | undefined {
  const file = env[MOVED_EXTRA_CA];
  if (file === undefined) return undefined;
  delete env[MOVED_EXTRA_CA];
  if (file === '') return undefined; // the user had none
  env.NODE_EXTRA_CA_CERTS = file;
  (globalThis as { [STATE]?: Deferred })[STATE] = { file, trusted: false };
  return file;
}

/** The PEM certificates of `text`, each from its BEGIN line to its END line. */
export function pemCertificates(text: string): string[] {
  return text.match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g) ?? [];
}

/**
 * Trusts the deferred NODE_EXTRA_CA_CERTS from now on (once; no-op when node read the variable
 * itself at start, or there is none). Call before the first TLS connection.
 */
export function trustExtraCa(): void {
  const s = state();
  if (!s || s.trusted) return;
  s.trusted = true;
  let pems: string[];
  try {
    pems = pemCertificates(fs.readFileSync(s.file, 'latin1'));
  } catch (e) {
    process.emitWarning(`Ignoring extra certs from \`${s.file}\`, load failed: ${(e as Error).message}`);
    return;
  }
  if (pems.length === 0) {
    process.emitWarning(`Ignoring extra certs from \`${s.file}\`: no PEM certificate in it`);
    return;
  }
  const tls = require('node:tls') as typeof TlsModule;
  const create = tls.createSecureContext;
  // node's https and tls.connect make their contexts through this export. A context given its
  // own `ca` replaces the default roots, as it would with the variable read at start.
  tls.createSecureContext = function createSecureContext(options?: TlsModule.SecureContextOptions): TlsModule.SecureContext {
    const ctx = create(options);
    if (!options?.ca) {
      const native = (ctx as unknown as { context: { addCACert(pem: string): void } }).context;
      for (const pem of pems) native.addCACert(pem);
    }
    return ctx;
  };
}
