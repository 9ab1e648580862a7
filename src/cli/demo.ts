/**
 * `npm start`: the README's "run the main job". Compares the strategies on a generated
 * 256 MiB demo image in a new temporary directory and leaves the reports there:
 *
 *   $TMPDIR/disksnap-demo-XXXXXX/report.html   open it in a browser (no network needed)
 *   $TMPDIR/disksnap-demo-XXXXXX/report.json   the figures, in DESIGN.md's shape
 *   $TMPDIR/disksnap-demo-XXXXXX/report.svg    every chart in one image
 *
 * The working copies live in that directory while the run lasts and are removed after it.
 * Extra arguments go to `disksnap compare`: `npm start -- --generate 1G --workload fs:128M`.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { buildProgram } from './program';
import { writeErr, writeOut } from '../engine/stdio';

async function main(): Promise<void> {
  const out = fs.mkdtempSync(path.join(os.tmpdir(), 'disksnap-demo-'));
  const files = { html: path.join(out, 'report.html'), json: path.join(out, 'report.json'), svg: path.join(out, 'report.svg') };
  writeErr(`disksnap demo: comparing the strategies on a generated image; reports go to ${out}\n`);
  const argv = ['compare', '--generate', '256M', '--dir', out, '--html', files.html, '--json', files.json, '--svg', files.svg, ...process.argv.slice(2)];
  await buildProgram().parseAsync(argv, { from: 'user' });
  writeOut(`\nreport: ${files.html}\n        ${files.json}\n        ${files.svg}\n`);
}

void main();
