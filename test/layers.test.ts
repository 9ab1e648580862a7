/**
 * The layout holds: no import cycle in src/, nothing imports upward, the two strategy rooms
 * never import each other, and no lazy require() (except the addon loader) dodges any of it.
 * Type-only imports are allowed upward (they vanish at run time).
 */
import t from 'tap';
import * as fs from 'node:fs';
import * as path from 'node:path';
import * as ts from 'typescript';

const SRC = path.join(__dirname, '..', 'src');

/** Lower numbers are lower layers; a file may import values from its own rank or below. */
const LAYERS: Array<[string, number]> = [
  ['engine/', 0],
  ['image/', 1],
  ['host/', 2],
  ['strategy.ts', 3],
  ['differencing/', 4],
  ['storage/', 4],
  ['compare/', 5],
  ['cli/', 6],
  ['index.ts', 7],
];

function layerOf(rel: string): [string, number] {
  for (const [prefix, rank] of LAYERS) if (rel === prefix || rel.startsWith(prefix)) return [prefix, rank];
  throw new Error(`${rel} is in no layer: add it to LAYERS in test/layers.test.ts`);
}

function sourceFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...sourceFiles(p));
    else if (e.name.endsWith('.ts') && !e.name.endsWith('.d.ts')) out.push(p);
  }
  return out;
}

function resolveModule(from: string, spec: string): string | undefined {
  if (!spec.startsWith('.')) return undefined;
  const base = path.resolve(path.dirname(from), spec);
  for (const c of [base + '.ts', path.join(base, 'index.ts')]) if (fs.existsSync(c)) return c;
  throw new Error(`${path.relative(SRC, from)}: cannot resolve ${spec}`);
}

interface Edge {
  to: string;
  lazy: boolean;
}

/** Value imports of a file: static imports and re-exports that are not type-only, require() and import(). */
function valueImports(file: string): Edge[] {
  const sf = ts.createSourceFile(file, fs.readFileSync(file, 'utf8'), ts.ScriptTarget.ES2022, true);
  const edges: Edge[] = [];
  const add = (spec: string, lazy: boolean) => {
    const to = resolveModule(file, spec);
    if (to) edges.push({ to, lazy });
  };
  const visit = (n: ts.Node): void => {
    if (ts.isImportDeclaration(n) && ts.isStringLiteral(n.moduleSpecifier)) {
      const c = n.importClause;
      const typeOnly =
        c !== undefined &&
        (c.isTypeOnly ||
          (!c.name &&
            c.namedBindings !== undefined &&
            ts.isNamedImports(c.namedBindings) &&
            c.namedBindings.elements.length > 0 &&
            c.namedBindings.elements.every((e) => e.isTypeOnly)));
      if (!typeOnly) add(n.moduleSpecifier.text, false);
    } else if (ts.isExportDeclaration(n) && n.moduleSpecifier && ts.isStringLiteral(n.moduleSpecifier)) {
      if (!n.isTypeOnly) add(n.moduleSpecifier.text, false);
    } else if (ts.isCallExpression(n) && n.arguments.length === 1 && ts.isStringLiteral(n.arguments[0])) {
      const callee = n.expression;
      if ((ts.isIdentifier(callee) && callee.text === 'require') || callee.kind === ts.SyntaxKind.ImportKeyword) {
        add(n.arguments[0].text, true);
      }
    }
    ts.forEachChild(n, visit);
  };
  visit(sf);
  return edges;
}

const files = sourceFiles(SRC);
const graph = new Map<string, Edge[]>(files.map((f) => [f, valueImports(f)]));
const rel = (f: string) => path.relative(SRC, f);

t.test('the layer table covers every source file', async (t) => {
  for (const f of files) t.doesNotThrow(() => layerOf(rel(f)), rel(f));
});

/**
 * The places a deferred require() is wanted, for start-up time: the CLI loads only the command
 * group it runs, and a store loads its S3 backend (HTTP clients, node:net: ~5 ms) only for an
 * s3:// store. Their edges still count in the cycle check below.
 */
const LAZY_ALLOWED = new Set(['cli/program.ts', 'cli/main.ts', 'storage/store/store.ts']);

t.test('no lazy require() or import() between modules', async (t) => {
  const lazy = [...graph]
    .filter(([f]) => !LAZY_ALLOWED.has(rel(f)))
    .flatMap(([f, es]) => es.filter((e) => e.lazy).map((e) => `${rel(f)} -> ${rel(e.to)}`));
  t.same(lazy, [], 'every module is imported at the top, where a cycle would show');
});

t.test('nothing imports a value from a higher layer, and the two rooms do not import each other', async (t) => {
  const bad: string[] = [];
  for (const [f, es] of graph) {
    const [fromLayer, fromRank] = layerOf(rel(f));
    for (const e of es) {
      const [toLayer, toRank] = layerOf(rel(e.to));
      if (toRank > fromRank || (toRank === fromRank && toLayer !== fromLayer && fromRank === 4)) {
        bad.push(`${rel(f)} (${fromLayer}) -> ${rel(e.to)} (${toLayer})`);
      }
    }
  }
  t.same(bad, [], 'imports point down the layer table');
});

t.test('no import cycle in src/', async (t) => {
  const cycles: string[] = [];
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const dfs = (f: string): void => {
    state.set(f, 'open');
    stack.push(f);
    for (const { to } of graph.get(f) ?? []) {
      if (state.get(to) === 'open') cycles.push([...stack.slice(stack.indexOf(to)), to].map(rel).join(' -> '));
      else if (!state.has(to)) dfs(to);
    }
    stack.pop();
    state.set(f, 'done');
  };
  for (const f of files) if (!state.has(f)) dfs(f);
  t.same(cycles, [], 'the import graph is acyclic');
});

/** Sizes that keep a module readable: the limits the restructure set (issue: two rooms over one engine). */
const MAX_FILE_LINES = 600;
const MAX_FUNCTION_LINES = 120;

t.test(`no source file over ${MAX_FILE_LINES} lines`, async (t) => {
  const long = files
    .map((f) => [rel(f), fs.readFileSync(f, 'utf8').split('\n').length] as const)
    .filter(([, n]) => n > MAX_FILE_LINES)
    .map(([f, n]) => `${f}: ${n} lines`);
  t.same(long, [], 'every file fits');
});

/**
 * Function-like bodies (functions, methods, arrows) over the limit. A commander table (the
 * `register` function of a CLI group, which only declares commands) is declarative and exempt.
 */
function longFunctions(file: string): string[] {
  const sf = ts.createSourceFile(file, fs.readFileSync(file, 'utf8'), ts.ScriptTarget.ES2022, true);
  const out: string[] = [];
  const visit = (n: ts.Node): void => {
    if (ts.isFunctionLike(n) && 'body' in n && n.body) {
      const start = sf.getLineAndCharacterOfPosition(n.getStart(sf)).line;
      const end = sf.getLineAndCharacterOfPosition(n.end).line;
      const name = n.name && ts.isIdentifier(n.name) ? n.name.text : '(anonymous)';
      const exempt = rel(file).startsWith('cli/') && name === 'register';
      if (end - start + 1 > MAX_FUNCTION_LINES && !exempt) out.push(`${rel(file)}:${start + 1} ${name}: ${end - start + 1} lines`);
    }
    ts.forEachChild(n, visit);
  };
  visit(sf);
  return out;
}

t.test(`no function over ${MAX_FUNCTION_LINES} lines (CLI command tables aside)`, async (t) => {
  t.same(files.flatMap(longFunctions), [], 'every function fits');
});
