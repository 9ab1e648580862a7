import * as fs from 'node:fs';
import * as path from 'node:path';

/** The package root: above src/engine/ when run from sources, above dist/src/engine/ when compiled. */
export const PACKAGE_ROOT: string =
  [path.resolve(__dirname, '..', '..'), path.resolve(__dirname, '..', '..', '..')].find((dir) =>
    fs.existsSync(path.join(dir, 'package.json')),
  ) ?? path.resolve(__dirname, '..', '..', '..');

export const VERSION: string = (JSON.parse(fs.readFileSync(path.join(PACKAGE_ROOT, 'package.json'), 'utf8')) as { version: string }).version;
