/**
 * Test hooks: the places where crash, race and retry tests stop an operation, change the
 * volume under it, or replace its point-in-time capture. They are one internal `faults`
 * object beside the options, kept out of the public option types: a caller of the library
 * never sees them; a test attaches them with `withFaults(opts, { ... })` (or, from a child
 * process running plain JavaScript, as a `faults` property).
 */

export interface Faults {
  /**
   * createSnapshot: after each chunk of an attempt was read and hashed, once the record writes
   * begun so far (the pending record first) have landed. The pending record is written beside
   * the first reads, not before them, and a fast first chunk can finish first: a test that
   * kills the writer here expects to find that record.
   */
  afterChunk?: (attempt: number, chunk: number) => void | Promise<void>;
  /**
   * createSnapshot: replaces the automatic point-in-time capture. Called before each attempt
   * reads the volume; the function it returns is called after the attempt. The snapshot is
   * recorded as 'frozen' when it returned one, else 'not-mounted'.
   */
  freeze?: (volumePath: string) => Promise<(() => Promise<void>) | void>;
  /**
   * createSnapshot: prove one moment with the second read pass even where the volume's
   * filesystem moves mtime on every write (the pass a block device or tmpfs file needs)
   */
  proveByReading?: boolean;
  /** createLiveSnapshot: once QEMU runs on the temporary overlay, before the copy */
  afterSwitch?: () => void | Promise<void>;
  /** createLiveSnapshot: after the copy, before the overlay is merged back */
  beforeCommitBack?: () => void | Promise<void>;
  /** restoreSnapshot in place: before each write batch of pass 2 */
  beforeWrite?: (batch: number) => void | Promise<void>;
  /** copySnapshot: after each batch of blocks was copied */
  afterBatch?: (batch: number) => void | Promise<void>;
  /** deleteSnapshot: between removing the record and the manifest */
  betweenSteps?: () => void | Promise<void>;
  /** gc: before each deletion */
  beforeDelete?: (key: string) => void | Promise<void>;
}

/** `opts` with test hooks attached (the returned object has the options' own type). */
export function withFaults<T extends object>(opts: T, faults: Faults): T {
  return { ...opts, faults } as T;
}

/** The test hooks attached to `opts`, or none. */
export function faultsOf(opts: object): Faults {
  return (opts as { faults?: Faults }).faults ?? {};
}
