/**
 * The `disksnap` program: commander, one file per command group (./main.ts launches it).
 * Results go to stdout, progress and logs to stderr; exit 0 success, 1 failure, 2 usage.
 */
import { Command, CommanderError } from 'commander';
import { fail } from './util';
import { VERSION } from '../engine/root';
import { addExamples } from './docs';
import { setQuiet } from './progress';
import { tuneProcessMemory } from '../engine/native';
import { writeErr, writeOut } from '../engine/stdio';

interface Group {
  /** `full`: the program with every group, for commands that describe all of them */
  register(program: Command, full: () => Command): void;
}

/**
 * Command groups, in the order --help lists them, with the top-level names each registers.
 * A command loads only its own group (and the libraries behind it): start-up is a good
 * part of a short command's time.
 */
const GROUPS: Array<[string[], () => Group]> = [
  [['create', 'info', 'map', 'measure', 'read', 'write', 'bench'], () => require('./image') as Group],
  [['diff'], () => require('./diff') as Group],
  [['snapshot'], () => require('./snapshot') as Group],
  [['volume', 'store', 'key'], () => require('./store') as Group],
  [['attach', 'detach'], () => require('./loop') as Group],
  [['compare'], () => require('./compare') as Group],
  [['checkpoint'], () => require('./checkpoint') as Group],
  [['completion', 'man'], () => require('./docs') as Group],
];

/**
 * The program with every group, with only the group of `command` when it names one, or with
 * none (`null`: for `--version`, which needs no command's code).
 */
export function buildProgram(command?: string | null): Command {
  const program = new Command();
  program
    .name('disksnap')
    .description('Differencing disks and storage snapshots for local disk images, side by side')
    .version(VERSION)
    .option('-q, --quiet', 'no progress on stderr (also DISKSNAP_QUIET=1)')
    .on('option:quiet', () => setQuiet(true))
    .showHelpAfterError('(run with --help for usage)')
    // help, version and usage errors by write(2) too (../engine/stdio.ts), set before the groups
    // add their commands, which take it over
    .configureOutput({ writeOut, writeErr })
    .exitOverride();
  const only = GROUPS.find(([names]) => typeof command === 'string' && names.includes(command));
  for (const group of command === null ? [] : only ? [only] : GROUPS) group[1]().register(program, () => buildProgram());
  addExamples(program);
  return program;
}

/** Runs the command line `argv` (as process.argv: node, script, arguments). */
export async function main(argv: string[]): Promise<void> {
  tuneProcessMemory();
  const args = argv.slice(2);
  const versionOnly = args.length === 1 && (args[0] === '--version' || args[0] === '-V');
  const program = buildProgram(versionOnly ? null : args.find((a) => !a.startsWith('-')));
  try {
    await program.parseAsync(argv);
  } catch (e) {
    if (e instanceof CommanderError) {
      // help and version exit 0; every parse error is a usage error
      process.exit(e.exitCode === 0 ? 0 : 2);
    }
    fail(e);
  }
}

