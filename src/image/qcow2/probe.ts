/**
 * Probing the format of a backing file whose child does not name it (no backing-format
 * header extension), as QEMU probes: by the magic of each format it knows. disksnap reads
 * raw and qcow2 parents; a file with the signature of another format is refused by that
 * format's name, never read as raw (its metadata would show up as guest data).
 *
 * Signatures (facts from each format's specification, as QEMU's probes test them):
 *   qcow2/qcow  "QFI\xfb" at 0          vmdk    "KDMV" or "COWD" at 0, or a text descriptor
 *   vhdx        "vhdxfile" at 0         vdi     0xbeda107f (little-endian) at 0x40
 *   qed         "QED\0" at 0            vpc     "conectix" at 0 (dynamic VHD)
 *   luks        "LUKS\xba\xbe" at 0     parallels "WithoutFreeSpace" / "WithouFreSpacExt" at 0
 *   bochs       "Bochs Virtual HD Image" at 0
 * Anything else is raw, as QEMU decides.
 */
import { BlockFile } from '../../engine/file';
import { DisksnapError } from '../../engine/errors';
import { QCOW2_MAGIC } from './format';

const SIGNATURES: { name: string; at: number; bytes: Buffer }[] = [
  { name: 'vmdk', at: 0, bytes: Buffer.from('KDMV') },
  { name: 'vmdk', at: 0, bytes: Buffer.from('COWD') },
  { name: 'vmdk', at: 0, bytes: Buffer.from('# Disk DescriptorFile') },
  { name: 'vhdx', at: 0, bytes: Buffer.from('vhdxfile') },
  { name: 'vdi', at: 0x40, bytes: Buffer.from([0x7f, 0x10, 0xda, 0xbe]) },
  { name: 'qed', at: 0, bytes: Buffer.from('QED\0', 'latin1') },
  { name: 'vpc', at: 0, bytes: Buffer.from('conectix') },
  { name: 'luks', at: 0, bytes: Buffer.from([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]) },
  { name: 'parallels', at: 0, bytes: Buffer.from('WithoutFreeSpace') },
  { name: 'parallels', at: 0, bytes: Buffer.from('WithouFreSpacExt') },
  { name: 'bochs', at: 0, bytes: Buffer.from('Bochs Virtual HD Image') },
];

/** The other format whose signature `head` (the file's first bytes) carries, if any. */
export function foreignFormat(head: Buffer): string | undefined {
  for (const s of SIGNATURES) {
    if (head.length >= s.at + s.bytes.length && head.subarray(s.at, s.at + s.bytes.length).equals(s.bytes)) return s.name;
  }
  return undefined;
}

/**
 * 'qcow2' or 'raw' for the backing file `backing` of `child`; EUNSUPPORTED naming the
 * format for a file of any other format disksnap recognises.
 */
export function probeBackingFormat(child: string, backing: string): 'qcow2' | 'raw' {
  const f = BlockFile.open(backing, { lock: 'none' });
  let head: Buffer;
  try {
    head = Buffer.alloc(512);
    head = head.subarray(0, f.readSync(head, 0));
  } finally {
    f.close();
  }
  if (head.length >= 4 && head.readUInt32BE(0) === QCOW2_MAGIC) return 'qcow2';
  const other = foreignFormat(head);
  if (other !== undefined) {
    throw new DisksnapError(
      `${child}: backing file ${backing} is a ${other} image (probed: the child names no backing format); disksnap reads raw and qcow2 backing files`,
      'EUNSUPPORTED',
      undefined,
      child,
    );
  }
  return 'raw';
}
