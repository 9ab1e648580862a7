import { Command } from 'commander';
import { notBuilt } from './util';

export function register(program: Command): void {
  notBuilt(program, 'compare', 'compare differencing disks and storage snapshots on one image');
}
