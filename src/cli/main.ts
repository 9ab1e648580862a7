#!/usr/bin/env node
/**
 * The `disksnap` executable: a commander program, one file per command group.
 * Results go to stdout, progress and logs to stderr; exit 0 success, 1 failure, 2 usage.
 */
import { Command, CommanderError } from 'commander';
import * as image from './image';
import * as diff from './diff';
import * as snapshot from './snapshot';
import * as loop from './loop';
import * as compare from './compare';
import { fail } from './util';
import { VERSION } from '../root';

export function buildProgram(): Command {
  const program = new Command();
  program
    .name('disksnap')
    .description('Differencing disks and storage snapshots for local disk images, side by side')
    .version(VERSION)
    .showHelpAfterError('(run with --help for usage)')
    .exitOverride();
  image.register(program);
  diff.register(program);
  snapshot.register(program);
  loop.register(program);
  compare.register(program);
  return program;
}

async function main(argv: string[]): Promise<void> {
  const program = buildProgram();
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

if (require.main === module) void main(process.argv);
