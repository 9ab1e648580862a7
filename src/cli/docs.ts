/**
 * What the command definitions say about themselves, in three forms generated from the one
 * commander tree (so none of them can drift from the real flags):
 *
 *   examples     an "Examples:" block at the end of every command's --help (EXAMPLES below;
 *                test/cli-docs.test.ts checks every command has one and that each example
 *                names only the command's own flags)
 *   completion   `disksnap completion bash|zsh`: a script that completes command words and
 *                each command's flags
 *   man page     `disksnap man`: roff for man(1), every command with its usage, description,
 *                flags and examples; `npm run build` writes it to dist/disksnap.1 (package.json
 *                "man")
 */
import { Argument, Command } from 'commander';
import { VERSION } from '../engine/root';
import { action } from './util';
import { writeOut } from '../engine/stdio';

/** Examples per command path ("snapshot create"), shown after its options in --help. */
export const EXAMPLES: Record<string, string[]> = {
  create: ['disksnap create disk.img 10G', 'disksnap create disk.img 1.5G --force --json'],
  info: ['disksnap info child.qcow2', 'disksnap info child.qcow2 --chain --json', 'disksnap info child.qcow2 --backing-chain --output=json'],
  map: ['disksnap map child.qcow2', 'disksnap map disk.img --json', 'disksnap map child.qcow2 --output json'],
  measure: ['disksnap measure child.qcow2 -O qcow2 --output json', 'disksnap measure --size 10G -O qcow2 --cluster-size 2M'],
  read: ['disksnap read child.qcow2 0 4k | xxd | head', 'disksnap read disk.img 1M 64k --to part.bin'],
  write: ['printf hello | disksnap write child.qcow2 0', 'disksnap write disk.img 1M -i part.bin --json'],
  bench: ['disksnap bench child.qcow2 -c 100000 -d 16', 'disksnap bench disk.img -w -s 64k -c 10000 --json'],
  'diff create': ['disksnap diff create base.img child.qcow2', 'disksnap diff create child.qcow2 grandchild.qcow2 --json'],
  'diff rollback': ['disksnap diff rollback child.qcow2', 'disksnap diff rollback child.qcow2 --recursive --dry-run'],
  'diff reset': ['disksnap diff reset child.qcow2 --accept-parent'],
  'diff commit': ['disksnap diff commit child.qcow2', 'disksnap diff commit child.qcow2 --keep-child --json', 'disksnap diff commit a.qcow2 --allow-sibling-change'],
  'diff flatten': ['disksnap diff flatten child.qcow2 standalone.img'],
  'diff check': ['disksnap diff check child.qcow2', 'disksnap diff check child.qcow2 --repair', 'disksnap diff check child.qcow2 --output json'],
  'diff accept-parent': ['disksnap diff accept-parent child.qcow2'],
  'diff children': ['disksnap diff children base.img --json'],
  'snapshot create': ['disksnap snapshot create disk.img --store /backups/store', 'DISKSNAP_STORE=s3://bucket/disks disksnap snapshot create vm.qcow2 --name nightly --tag env=ci', 'disksnap snapshot create vm.img --store /backups/store --cbw-limit 4G'],
  'snapshot list': ['disksnap snapshot list --store /backups/store', 'disksnap snapshot list --volume /dev/loop3 --tag env=ci --json'],
  'snapshot show': ['disksnap snapshot show 9e9c --store /backups/store'],
  'snapshot tag': ['disksnap snapshot tag snap-9e9c env=prod owner=qa --store /backups/store'],
  'snapshot untag': ['disksnap snapshot untag snap-9e9c owner --store /backups/store'],
  'snapshot prune': ['disksnap snapshot prune --keep-daily 7 --keep-weekly 4 --dry-run --store /backups/store'],
  'snapshot restore': ['disksnap snapshot restore 9e9c --to restored.img --store /backups/store', 'disksnap snapshot restore nightly --in-place disk.img --store /backups/store'],
  'snapshot delete': ['disksnap snapshot delete 9e9c --store /backups/store', 'disksnap snapshot delete nightly --dry-run --store /backups/store'],
  'snapshot lock': ['disksnap snapshot lock 9e9c --until 30d --store /backups/store', 'disksnap snapshot lock nightly --until 2027-01-31 --store /backups/store'],
  'snapshot unlock': ['disksnap snapshot unlock 9e9c --store /backups/store'],
  'snapshot undelete': ['disksnap snapshot undelete 9e9c --store /backups/store', 'disksnap snapshot undelete nightly --json'],
  'snapshot diff': ['disksnap snapshot diff snap-9e9c snap-12ab --store /backups/store --json'],
  'snapshot verify': ['disksnap snapshot verify 9e9c --store /backups/store'],
  'snapshot copy': ['disksnap snapshot copy 9e9c --store /backups/store --to-store s3://bucket/offsite', 'disksnap snapshot copy 9e9c --store /backups/store --to-store /vault --encrypt --key-file vault.key'],
  'volume register': ['disksnap volume register disk.img --store /backups/store --encrypted --key-file disk.key'],
  'volume list': ['disksnap volume list --store /backups/store --json'],
  'volume policy': ['disksnap volume policy disk.img --keep-daily 7 --keep-weekly 4 --store /backups/store', 'disksnap volume policy disk.img --clear --store /backups/store'],
  'key generate': ['disksnap key generate disk.key'],
  'store init': ['disksnap store init --store /backups/store'],
  'store bin': ['disksnap store bin --retention 7d --store /backups/store', 'disksnap store bin --off --store /backups/store'],
  'store gc': ['disksnap store gc --store /backups/store', 'disksnap store gc --dry-run --json --store /backups/store'],
  attach: ['disksnap attach child.qcow2', 'disksnap attach disk.img --read-only --json', 'disksnap attach vm.img --via fuse'],
  detach: ['disksnap detach child.qcow2'],
  compare: ['disksnap compare disk.img --html report.html', 'disksnap compare --generate 1G --workload sequential:10%:1m --dir /mnt/xfs/tmp'],
  'checkpoint create': ['disksnap checkpoint create vm.qcow2 before-upgrade', 'disksnap checkpoint create vm.qcow2 live-1 --qmp /run/vm.qmp'],
  'checkpoint list': ['disksnap checkpoint list vm.qcow2 --json'],
  'checkpoint revert': ['disksnap checkpoint revert vm.qcow2 before-upgrade', 'disksnap checkpoint revert vm.qcow2 before-upgrade --keep experiment'],
  'checkpoint delete': ['disksnap checkpoint delete vm.qcow2 before-upgrade', 'disksnap checkpoint delete vm.qcow2 before-upgrade --qmp /run/vm.qmp'],
  'checkpoint squash': ['disksnap checkpoint squash vm.qcow2 a c'],
  'checkpoint resume': ['disksnap checkpoint resume vm.qcow2'],
  completion: ['disksnap completion bash > /etc/bash_completion.d/disksnap', 'source <(disksnap completion bash)'],
  man: ['disksnap man > disksnap.1 && man ./disksnap.1'],
};

/** Every command of the tree with its full path, leaves and groups alike, in --help order. */
export function commandsOf(program: Command): Array<{ path: string; cmd: Command }> {
  const out: Array<{ path: string; cmd: Command }> = [];
  const walk = (c: Command, prefix: string) => {
    for (const s of c.commands) {
      const p = prefix ? `${prefix} ${s.name()}` : s.name();
      out.push({ path: p, cmd: s });
      walk(s, p);
    }
  };
  walk(program, '');
  return out;
}

/** Adds the Examples block to every command that has examples. */
export function addExamples(program: Command): void {
  for (const { path, cmd } of commandsOf(program)) {
    const ex = EXAMPLES[path];
    if (ex) cmd.addHelpText('after', `\nExamples:\n${ex.map((e) => `  $ ${e}`).join('\n')}`);
  }
}

/** The flags of a command, long and short, as a shell completes them. */
function flagsOf(cmd: Command): string[] {
  const out = ['--help'];
  for (const o of cmd.options) {
    if (o.hidden) continue;
    if (o.long) out.push(o.long);
    if (o.short) out.push(o.short);
  }
  return out;
}

/** A bash completion script: command words first, then the flags of the command typed so far (files otherwise). */
export function bashCompletion(program: Command): string {
  const all = commandsOf(program);
  const cases = all
    .map(({ path, cmd }) => {
      const words = [...cmd.commands.map((c) => c.name()), ...flagsOf(cmd)].join(' ');
      return `    "${path}") words="${words}" files=${cmd.commands.length ? 0 : 1} ;;`;
    })
    .join('\n');
  const top = program.commands.map((c) => c.name()).join(' ');
  return `# bash completion for disksnap (generated by \`disksnap completion bash\`)
_disksnap() {
  local cur cmdpath="" i w words files=0
  cur="\${COMP_WORDS[COMP_CWORD]}"
  for ((i = 1; i < COMP_CWORD; i++)); do
    w="\${COMP_WORDS[i]}"
    [[ $w == -* ]] && continue
    case "\${cmdpath:+$cmdpath }$w" in
      ${all.map(({ path }) => `"${path}"`).join('|')}) cmdpath="\${cmdpath:+$cmdpath }$w" ;;
      *) break ;;
    esac
  done
  case "$cmdpath" in
    "") words="${top} --help --version" ;;
${cases}
  esac
  COMPREPLY=($(compgen -W "$words" -- "$cur"))
  # a command's arguments are mostly files: offered beside its flags
  if [[ $cur != -* && $files == 1 ]]; then COMPREPLY+=($(compgen -f -- "$cur")); fi
}
complete -o filenames -F _disksnap disksnap
`;
}

/** A zsh completion script: bash's, through zsh's bashcompinit (one definition for both shells). */
export function zshCompletion(program: Command): string {
  return `#compdef disksnap
# zsh completion for disksnap (generated by \`disksnap completion zsh\`)
autoload -U +X bashcompinit && bashcompinit
${bashCompletion(program).split('\n').slice(1).join('\n')}`;
}

function roff(s: string): string {
  return s.replace(/\\/g, '\\e').replace(/^([.'])/gm, '\\&$1').replace(/-/g, '\\-');
}

/** The man page, section 1. */
export function manPage(program: Command, version: string): string {
  const lines: string[] = [
    `.TH DISKSNAP 1 "" "disksnap ${version}" "User Commands"`,
    '.SH NAME',
    `disksnap \\- ${roff(program.description())}`,
    '.SH SYNOPSIS',
    '.B disksnap',
    '.I command',
    '[\\fIoptions\\fR] [\\fIarguments\\fR]',
    '.SH DESCRIPTION',
    roff(
      'disksnap implements both ways of snapshotting a disk image: differencing disks (qcow2 children over a read-only parent; rollback discards the child, commit merges it back) and storage snapshots (EBS-style: blocks copied into a store, later snapshots only the changed ones, restorable after the volume is gone, in a directory or an S3 bucket). Results go to standard output, progress and messages to standard error.',
    ),
    '.SH COMMANDS',
  ];
  for (const { path, cmd } of commandsOf(program)) {
    if (cmd.commands.length) continue;
    const usage = `disksnap ${path} ${cmd.usage()}`.trim();
    lines.push('.TP', `.B ${roff(usage)}`, roff(cmd.description()));
    for (const o of cmd.options) {
      if (o.hidden) continue;
      lines.push('.RS', '.TP', `.B ${roff(o.flags)}`, roff(o.description), '.RE');
    }
    const ex = EXAMPLES[path];
    if (ex) {
      lines.push('.RS', 'Examples:', '.nf');
      for (const e of ex) lines.push(`  ${roff(e)}`);
      lines.push('.fi', '.RE');
    }
  }
  lines.push(
    '.SH EXIT STATUS',
    '0 success; 1 failure (the message names the problem); 2 usage error. \\fBdiff check\\fR uses qemu\\-img check\'s codes: 2 corruption, 3 leaks only, 63 a raw image.',
    '.SH ENVIRONMENT',
    '.TP',
    '.B DISKSNAP_STORE',
    'the store of the snapshot commands when \\fB\\-\\-store\\fR is not given (a directory or s3://BUCKET[/PREFIX]).',
    '.TP',
    '.B AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_PROFILE',
    'credentials and endpoint of an S3 store, as the AWS SDK reads them.',
    '.SH SEE ALSO',
    'qemu\\-img(1), restic(1)',
    '',
  );
  return lines.join('\n');
}

/** `full` builds the program with every group (this group may have been loaded alone). */
export function register(program: Command, full: () => Command): void {
  program
    .command('completion')
    .description('print a shell completion script (bash or zsh), generated from the command definitions')
    .addArgument(new Argument('<shell>', 'the shell').choices(['bash', 'zsh']))
    .action(
      action(async (shell: string) => {
        writeOut(shell === 'zsh' ? zshCompletion(full()) : bashCompletion(full()));
      }),
    );
  program
    .command('man')
    .description('print the man page (roff), generated from the command definitions')
    .action(
      action(async () => {
        writeOut(manPage(full(), VERSION));
      }),
    );
}
