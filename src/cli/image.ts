/**
 * Image commands: create, info, map, measure, read, write, bench. info, map and measure take
 * `--output json` for qemu-img's JSON document (src/image/qemu.ts); `--json` keeps disksnap's own.
 */
import * as fs from 'node:fs';
import { Command, Option } from 'commander';
import { openImage, checkRange, ImageInfo, LayerInfo } from '../image';
import { createRawImage } from '../image/raw';
import { runBench } from '../image/bench';
import { writeAtomically } from '../engine/atomic';
import { attachmentOf } from '../host/attach';
import { invalid } from '../engine/errors';
import { formatSize } from '../engine/size';
import { formatQemuMap, measure, qemuInfo, qemuMap } from '../image/qemu';
import { action, intArg, OutputFormat, outputOption, outputStyle, powerOfTwoArg, printJson, printQemuJson, printLines, sizeArg, traceDocument, UsageError } from './util';
import { writeErr, writeOut } from '../engine/stdio';

const CHUNK = 4 * 2 ** 20;

export function register(program: Command): void {
  program
    .command('create')
    .description('create a sparse raw image')
    .argument('<file>', 'image to create')
    .argument('<size>', 'virtual size (bytes or 4k, 64K, 1M, 2G, ...)', sizeArg('size'))
    .option('-f, --force', 'overwrite an existing file')
    .option('--json', 'print {"file", "format", "virtualSize"}')
    .action(
      action(async (file: string, size: number, opts: { force?: boolean; json?: boolean }) => {
        await createRawImage(file, size, { force: opts.force });
        if (opts.json) printJson('image-create', { file, format: 'raw', virtualSize: size });
        else writeOut(`created ${file}: raw, ${formatSize(size)} (${size} bytes)\n`);
      }),
    );

  program
    .command('info')
    .description('format, virtual size and allocation of an image (format detected from its content)')
    .argument('<file>')
    .option('--chain', 'show every layer of a differencing chain')
    .option('--backing-chain', "the same as --chain (qemu-img's name)")
    .option('--json', "print disksnap's JSON document")
    .addOption(outputOption())
    .action(
      action((file: string, opts: { chain?: boolean; backingChain?: boolean; json?: boolean; output?: OutputFormat }) => {
        const style = outputStyle(opts);
        const chain = !!(opts.chain || opts.backingChain);
        if (style === 'peer') {
          // qemu-img's document: each layer's header read on its own, as qemu-img info reads it
          printQemuJson(chain ? 'qemu-info-chain' : 'qemu-info', qemuInfo(file, chain));
          return;
        }
        // No lock: info is for images in use too (a VM's, an attached child's), like qemu-img -U.
        const image = openImage(file, { ignoreParentGuard: true, readLock: 'none' });
        let info: ImageInfo;
        try {
          info = image.info(chain);
        } finally {
          image.close();
        }
        const a = attachmentOf(file);
        if (a) info.attached = { device: a.device, via: a.via, readOnly: a.readOnly, mountpoints: a.mountpoints };
        if (style === 'disksnap') printJson('image-info', info);
        else printInfo(info);
      }),
    );

  program
    .command('map')
    .description('data and zero extents of an image, and the layer each comes from')
    .argument('<file>')
    .option('--json', "print disksnap's JSON document")
    .addOption(outputOption())
    .action(
      action((file: string, opts: { json?: boolean; output?: OutputFormat }) => {
        const style = outputStyle(opts);
        if (style === 'peer') {
          const text = formatQemuMap(qemuMap(file));
          traceDocument('qemu-map', 'stdout');
          writeOut(text);
          return;
        }
        const image = openImage(file);
        try {
          const extents = image.map();
          if (style === 'disksnap') {
            // `start`, not `offset`: qemu-img's `offset` is the host offset (ours is hostOffset)
            printJson('image-map', {
              virtualSize: image.virtualSize,
              extents: extents.map(({ offset, ...rest }) => ({ start: offset, ...rest })),
            });
            return;
          }
          const rows = extents.map((e) => [
            String(e.offset),
            String(e.length),
            e.kind,
            String(e.depth),
            e.file ?? '-',
          ]);
          printTable(['start', 'length', 'kind', 'depth', 'file'], rows);
        } finally {
          image.close();
        }
      }),
    );

  program
    .command('measure')
    .description("bytes a new image needs for FILE's guest view, or for an empty disk of --size (qemu-img measure)")
    .argument('[file]', 'image to measure (with its backing chain)')
    .option('--size <size>', 'measure an empty disk of this size instead of a file', sizeArg('size'))
    .addOption(new Option('-O, --target-format <format>', 'format of the new image').choices(['raw', 'qcow2']).default('raw'))
    .option('--cluster-size <size>', 'qcow2 cluster size of the new image (default 64K)', powerOfTwoArg('cluster size', 512, 2 * 1024 * 1024))
    .addOption(outputOption())
    .option('--json', "print the figures as JSON (the same document as --output json: measure has no disksnap-only facts)")
    .action(
      action((file: string | undefined, opts: { size?: number; targetFormat: 'raw' | 'qcow2'; clusterSize?: number; output?: OutputFormat; json?: boolean }) => {
        if ((file === undefined) === (opts.size === undefined)) throw new UsageError('measure needs either FILE or --size SIZE (not both)');
        if (opts.clusterSize !== undefined && opts.targetFormat !== 'qcow2') throw new UsageError('--cluster-size needs -O qcow2');
        const m = measure({ file, size: opts.size, target: opts.targetFormat, clusterSize: opts.clusterSize });
        if (opts.output === 'json' || opts.json) printQemuJson('qemu-measure', m);
        else {
          const lines = [`required size: ${m.required}`, `fully allocated size: ${m['fully-allocated']}`];
          if (m.bitmaps !== undefined) lines.push(`bitmaps size: ${m.bitmaps}`);
          printLines(lines);
        }
      }),
    );

  program
    .command('read')
    .description('read bytes of the guest view (to stdout, or to a new file with --to)')
    .argument('<file>')
    .argument('<offset>', 'guest offset', sizeArg('offset'))
    .argument('<length>', 'bytes to read', sizeArg('length'))
    .option('--to <file>', 'write to this new file instead of stdout (was -o/--output: --output is the output format elsewhere)')
    .option('-f, --force', 'overwrite an existing output file')
    .option('--json', 'with --to: print {"file", "offset", "length", "to"}')
    .action(
      action(async (file: string, offset: number, length: number, opts: { to?: string; force?: boolean; json?: boolean }) => {
        if (opts.json && !opts.to) throw new UsageError('read --json needs --to FILE (without it the bytes themselves go to stdout)');
        const image = openImage(file);
        try {
          checkRange(image, offset, length);
          if (opts.to) {
            await writeAtomically(opts.to, { force: opts.force }, (tmp) => {
              const fd = fs.openSync(tmp, 'wx');
              try {
                copyOut(image, offset, length, (chunk) => fs.writeSync(fd, chunk));
              } finally {
                fs.closeSync(fd);
              }
            });
            if (opts.json) printJson('image-read', { file, offset, length, to: opts.to });
          } else {
            await copyOutAsync(image, offset, length, async (chunk) => writeOut(chunk));
          }
        } finally {
          image.close();
        }
      }),
    );

  program
    .command('write')
    .description('write bytes (from a file, or stdin) into the guest view at an offset')
    .argument('<file>')
    .argument('<offset>', 'guest offset', sizeArg('offset'))
    .option('-i, --input <in>', 'read the bytes from this file (default: stdin)')
    .option('--json', 'print {"file", "offset", "length"} on stdout')
    .action(
      action(async (file: string, offset: number, opts: { input?: string; json?: boolean }) => {
        const image = openImage(file, { write: true });
        try {
          // Everything is read and checked against the image's bounds before a byte is written.
          checkRange(image, offset, 0);
          const data = await readInput(opts.input, image.virtualSize - offset, file);
          checkRange(image, offset, data.length);
          for (let pos = 0; pos < data.length; pos += CHUNK) {
            const chunk = data.subarray(pos, Math.min(data.length, pos + CHUNK));
            image.writeSync(chunk, offset + pos);
          }
          image.flushSync();
          if (opts.json) printJson('image-write', { file, offset, length: data.length });
          else writeErr(`wrote ${data.length} bytes at offset ${offset} of ${file}\n`);
        } finally {
          image.close();
        }
      }),
    );

  program
    .command('bench')
    .description('I/O benchmark with the request pattern of `qemu-img bench`')
    .argument('<file>')
    .option('-w, --write', 'write requests (default: read)')
    .option('-s, --size <size>', 'request size', sizeArg('size'), 4096)
    .option('-c, --count <count>', 'number of requests', intArg('count', 1), 75000)
    .option('-d, --depth <depth>', 'requests in flight (issued as one batch)', intArg('depth', 1), 64)
    .option('-S, --step <step>', 'offset advance between requests (default: the request size)', sizeArg('step'))
    .option('-o, --offset <offset>', 'offset of the first request', sizeArg('offset'), 0)
    .option('--pattern <byte>', 'byte value written by write requests', intArg('pattern'), 0)
    .option('--random', 'random size-aligned offsets instead of sequential ones')
    .addOption(new Option('-n, --nocache', 'bypass the page cache (O_DIRECT)'))
    .option('--json', 'print JSON')
    .action(
      action(
        (
          file: string,
          opts: {
            write?: boolean;
            size: number;
            count: number;
            depth: number;
            step?: number;
            offset: number;
            pattern: number;
            random?: boolean;
            nocache?: boolean;
            json?: boolean;
          },
        ) => {
          if (opts.pattern > 255) throw invalid(`pattern ${opts.pattern} is not a byte value (0-255)`);
          const image = openImage(file, { write: !!opts.write, direct: !!opts.nocache });
          const banner = () => {
            if (opts.json) return;
            const step = opts.step ?? opts.size;
            writeErr(
              `Sending ${opts.count} ${opts.write ? 'write' : 'read'} requests, ${opts.size} bytes each, ` +
                `${opts.depth} in parallel (starting at offset ${opts.offset}, ${opts.random ? 'random offsets' : `step size ${step}`})\n`,
            );
          };
          try {
            const r = runBench(image, {
              onStart: banner,
              write: opts.write,
              size: opts.size,
              count: opts.count,
              depth: opts.depth,
              step: opts.step,
              offset: opts.offset,
              random: opts.random,
              pattern: opts.pattern,
            });
            if (opts.json) printJson('image-bench', { file, format: image.format, ...r });
            else
              writeOut(
                `Run completed in ${r.seconds.toFixed(3)} seconds: ${Math.round(r.iops)} requests/s, ` +
                  `${formatSize(r.bytesPerSecond)}/s` +
                  (r.operation === 'write' ? ` (final flush ${r.flushSeconds.toFixed(3)} s)` : '') +
                  '\n',
              );
          } finally {
            image.close();
          }
        },
      ),
    );
}

function printInfo(info: ImageInfo): void {
  const layerLines = (l: LayerInfo, indent: string): string[] => {
    const lines = [
      `${indent}image: ${l.path}`,
      `${indent}format: ${l.format}`,
      `${indent}virtual size: ${formatSize(l.virtualSize)} (${l.virtualSize} bytes)`,
      `${indent}allocated: ${formatSize(l.allocatedBytes)} (${l.allocatedBytes} bytes)`,
    ];
    if (l.clusterSize !== undefined) lines.push(`${indent}cluster size: ${l.clusterSize}`);
    if (l.backing !== undefined) lines.push(`${indent}backing file: ${l.backing}`);
    if (l.parentGuard !== undefined) lines.push(`${indent}parent guard: ${l.parentGuard}`);
    for (const [k, v] of Object.entries(l)) {
      if (['path', 'format', 'virtualSize', 'allocatedBytes', 'clusterSize', 'backing', 'parentGuard', 'chain', 'attached'].includes(k)) continue;
      if (v === undefined || typeof v === 'object') continue;
      lines.push(`${indent}${k}: ${String(v)}`);
    }
    return lines;
  };
  const attached = info.attached
    ? [
        `attached: ${info.attached.device} (${info.attached.via}${info.attached.readOnly ? ', read-only' : ''})` +
          (info.attached.mountpoints.length ? `, mounted on ${info.attached.mountpoints.join(', ')}` : ', not mounted'),
      ]
    : [];
  if (info.chain && info.chain.length > 0) {
    const out: string[] = [];
    info.chain.forEach((layer, i) => {
      out.push(`layer ${i}${i === 0 ? ' (top)' : ''}:`, ...layerLines(layer, '  '));
    });
    printLines([...attached, ...out]);
  } else {
    printLines([...layerLines(info, ''), ...attached]);
  }
}

export function printTable(header: string[], rows: string[][]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === cells.length - 1 ? c : c.padEnd(widths[i]))).join('  ');
  writeOut([line(header), ...rows.map(line)].join('\n') + '\n');
}

function copyOut(image: ReturnType<typeof openImage>, offset: number, length: number, sink: (b: Buffer) => void): void {
  const buf = Buffer.allocUnsafe(Math.min(CHUNK, Math.max(1, length)));
  for (let pos = 0; pos < length; pos += buf.length) {
    const chunk = buf.subarray(0, Math.min(buf.length, length - pos));
    image.readSync(chunk, offset + pos);
    sink(chunk);
  }
}

async function copyOutAsync(
  image: ReturnType<typeof openImage>,
  offset: number,
  length: number,
  sink: (b: Buffer) => Promise<void>,
): Promise<void> {
  for (let pos = 0; pos < length; pos += CHUNK) {
    const chunk = Buffer.allocUnsafe(Math.min(CHUNK, length - pos));
    image.readSync(chunk, offset + pos);
    await sink(chunk);
  }
}

/** Reads all of `input` (or stdin), failing as soon as it exceeds `limit` bytes. */
async function readInput(input: string | undefined, limit: number, image: string): Promise<Buffer> {
  const tooLong = () =>
    invalid(`the input is longer than the ${limit} bytes between the offset and the end of ${image}; nothing was written`, image);
  if (input !== undefined) {
    const st = fs.statSync(input);
    if (st.isFile() && st.size > limit) throw tooLong();
  }
  const stream = input === undefined ? process.stdin : fs.createReadStream(input);
  const chunks: Buffer[] = [];
  let total = 0;
  for await (const c of stream) {
    const b = c as Buffer;
    total += b.length;
    if (total > limit) {
      stream.destroy();
      throw tooLong();
    }
    chunks.push(b);
  }
  return Buffer.concat(chunks, total);
}
