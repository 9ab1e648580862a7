import { Command } from 'commander';
import { notBuilt } from './util';

export function register(program: Command): void {
  notBuilt(program, 'snapshot', 'EBS-style incremental storage snapshots');
  notBuilt(program, 'volume', 'volumes registered in a snapshot store');
  notBuilt(program, 'store', 'snapshot store maintenance (gc)');
}
