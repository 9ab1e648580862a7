/**
 * Types for buffer-layout 1.x (the package ships none): the subset disksnap uses to
 * describe on-disk structures. A `Layout<T>` decodes a `T` from a Buffer at an offset and
 * encodes one back; `span` is its size in bytes (negative when it depends on the value).
 */
declare module 'buffer-layout' {
  export class Layout<T = unknown> {
    constructor(span: number, property?: string);
    readonly span: number;
    readonly property: string | undefined;
    decode(b: Buffer, offset?: number): T;
    encode(src: T, b: Buffer, offset?: number): number;
    getSpan(b?: Buffer, offset?: number): number;
    replicate(property: string): this;
  }

  export class Structure<T = Record<string, unknown>> extends Layout<T> {
    readonly fields: Layout<unknown>[];
    /** byte offset of the named field within the structure, undefined for a variable span */
    offsetOf(property: string): number | undefined;
    layoutFor(property: string): Layout<unknown> | undefined;
  }

  export class Sequence<T> extends Layout<T[]> {}
  export class Blob extends Layout<Buffer> {}
  export class Constant<T> extends Layout<T> {}

  export function struct<T = Record<string, unknown>>(fields: Layout<any>[], property?: string, decodePrefixes?: boolean): Structure<T>;
  export function seq<T>(elementLayout: Layout<T>, count: number | Layout<number>, property?: string): Sequence<T>;
  export function blob(length: number | Layout<number>, property?: string): Blob;
  export function greedy(elementSpan?: number, property?: string): Layout<number>;
  export function offset<T>(layout: Layout<T>, offset?: number, property?: string): Layout<T>;
  export function cstr(property?: string): Layout<string>;
  export function utf8(maxSpan?: number, property?: string): Layout<string>;

  export function u8(property?: string): Layout<number>;
  export function u16(property?: string): Layout<number>;
  export function u24(property?: string): Layout<number>;
  export function u32(property?: string): Layout<number>;
  export function u40(property?: string): Layout<number>;
  export function u48(property?: string): Layout<number>;
  /** 64-bit little-endian, decoded to the nearest Number (exact below 2^53) */
  export function nu64(property?: string): Layout<number>;
  export function u16be(property?: string): Layout<number>;
  export function u24be(property?: string): Layout<number>;
  export function u32be(property?: string): Layout<number>;
  export function u40be(property?: string): Layout<number>;
  export function u48be(property?: string): Layout<number>;
  /** 64-bit big-endian, decoded to the nearest Number (exact below 2^53) */
  export function nu64be(property?: string): Layout<number>;
  export function s8(property?: string): Layout<number>;
  export function s16be(property?: string): Layout<number>;
  export function s32be(property?: string): Layout<number>;
  export function ns64be(property?: string): Layout<number>;
}
