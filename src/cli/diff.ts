import { Command } from 'commander';
import { notBuilt } from './util';

export function register(program: Command): void {
  notBuilt(program, 'diff', 'differencing disks: qcow2 children over read-only parents');
}
