import { Command } from 'commander';
import { notBuilt } from './util';

export function register(program: Command): void {
  notBuilt(program, 'attach', 'attach an image to a loop device');
  notBuilt(program, 'detach', 'release a loop device');
}
