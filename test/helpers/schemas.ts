/**
 * The JSON Schemas of the CLI's documents (schemas/NAME.schema.json, one per name in
 * src/cli/documents.ts) and their check in tests.
 *
 * - generateSchemas(): the schemas, generated from the TypeScript types with
 *   ts-json-schema-generator (JSDoc @pattern/@format/@minimum become keywords; objects get
 *   additionalProperties: false, so a field the type does not declare fails the check).
 *   test/cli-schemas.test.ts compares them with the files and, with DISKSNAP_WRITE_SCHEMAS=1
 *   (`npm run schemas`), writes them.
 * - checkTraced(): what cli() (./cli.ts) calls after every run: the CLI, run with
 *   DISKSNAP_DOCUMENT_TRACE=FILE, names each document it printed (src/cli/util.ts
 *   traceDocument); each is validated with ajv against the schema of that name.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import Ajv, { ValidateFunction } from 'ajv';
import addFormats from 'ajv-formats';

export const ROOT = path.resolve(__dirname, '..', '..');
export const SCHEMA_DIR = path.join(ROOT, 'schemas');
const ID_BASE = 'https://disksnap.invalid/schemas/';

type Schema = { [k: string]: unknown };

/** Every $ref '#/definitions/X' reachable from a schema. */
function refsOf(node: unknown, out: Set<string>): void {
  if (Array.isArray(node)) for (const n of node) refsOf(n, out);
  else if (node && typeof node === 'object') {
    for (const [k, v] of Object.entries(node)) {
      if (k === '$ref' && typeof v === 'string' && v.startsWith('#/definitions/')) out.add(decodeURIComponent(v.slice('#/definitions/'.length)));
      else refsOf(v, out);
    }
  }
}

/** name -> schema, generated from src/cli/documents.ts (takes a few seconds: the TypeScript program). */
export function generateSchemas(): Map<string, Schema> {
  // a devDependency, loaded only here
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const tsj = require('ts-json-schema-generator') as typeof import('ts-json-schema-generator');
  const all = tsj
    .createGenerator({
      path: path.join(ROOT, 'src', 'cli', 'documents.ts'),
      tsconfig: path.join(ROOT, 'tsconfig.json'),
      type: 'Documents',
      skipTypeCheck: true,
      topRef: false,
      additionalProperties: false,
    })
    .createSchema('Documents') as Schema;
  const defs = (all.definitions ?? {}) as Record<string, Schema>;
  const props = (all.properties ?? {}) as Record<string, Schema>;
  const out = new Map<string, Schema>();
  for (const name of Object.keys(props).sort()) {
    const root = props[name];
    const need = new Set<string>();
    refsOf(root, need);
    for (let grew = true; grew; ) {
      grew = false;
      for (const d of [...need]) {
        const before = need.size;
        refsOf(defs[d], need);
        if (need.size > before) grew = true;
      }
    }
    const definitions: Record<string, Schema> = {};
    for (const d of [...need].sort()) definitions[d] = defs[d];
    out.set(name, {
      $schema: 'http://json-schema.org/draft-07/schema#',
      $id: `${ID_BASE}${name}.schema.json`,
      title: `disksnap document '${name}'`,
      ...root,
      ...(need.size ? { definitions } : {}),
    });
  }
  return out;
}

/** The files in schemas/, by name. */
export function schemaFiles(): Map<string, Schema> {
  const out = new Map<string, Schema>();
  for (const f of fs.readdirSync(SCHEMA_DIR).sort()) {
    const m = /^(.+)\.schema\.json$/.exec(f);
    if (m) out.set(m[1], JSON.parse(fs.readFileSync(path.join(SCHEMA_DIR, f), 'utf8')) as Schema);
  }
  return out;
}

let validators: Map<string, ValidateFunction> | undefined;

/** ajv validators of the shipped files (compiled once per test process). */
export function validatorOf(name: string): ValidateFunction {
  if (!validators) {
    const ajv = new Ajv({ allErrors: true, strict: true, allowUnionTypes: true });
    addFormats(ajv);
    validators = new Map();
    for (const [n, s] of schemaFiles()) validators.set(n, ajv.compile(s));
  }
  const v = validators.get(name);
  if (!v) throw new Error(`no schema schemas/${name}.schema.json for a document the CLI says it printed`);
  return v;
}

/** Throws, naming the document and the first errors, when `doc` does not match schema `name`. */
export function assertValid(name: string, doc: unknown, where: string): void {
  const v = validatorOf(name);
  if (!v(doc)) {
    const errs = (v.errors ?? []).slice(0, 5).map((e) => `${e.instancePath || '/'} ${e.message}${e.params ? ` ${JSON.stringify(e.params)}` : ''}`);
    throw new Error(`the '${name}' document on ${where} does not match schemas/${name}.schema.json: ${errs.join('; ')}`);
  }
}

/** Names of the documents validated in this process (cli-schemas.test checks its tour covers all). */
export const validated = new Set<string>();

/**
 * Validates what a CLI run printed, per the trace it wrote: one stdout document (parsed whole),
 * stderr progress lines (each JSON line), report files.
 */
export function checkTraced(traceFile: string, stdout: string, stderr: string): void {
  let text: string;
  try {
    text = fs.readFileSync(traceFile, 'utf8');
  } catch {
    return; // nothing printed as JSON
  }
  const lines = text.split('\n').filter(Boolean).map((l) => l.split('\t') as [string, string]);
  const onStdout = lines.filter(([, w]) => w === 'stdout');
  if (onStdout.length > 1) throw new Error(`the CLI printed ${onStdout.length} JSON documents on stdout (${onStdout.map(([n]) => n).join(', ')}); one is the contract`);
  for (const [name, where] of lines) {
    if (where === 'stdout') {
      assertValid(name, JSON.parse(stdout), 'stdout');
    } else if (where === 'stderr') {
      for (const l of stderr.split('\n')) if (l.startsWith('{')) assertValid(name, JSON.parse(l), 'stderr');
    } else {
      assertValid(name, JSON.parse(fs.readFileSync(where, 'utf8')), where);
    }
    validated.add(name);
  }
}
