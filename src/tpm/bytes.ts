import { M2mError } from "../core/errors.js";

/** Stable code for every structural problem in TPM bytes (lengths, unknown selectors, trailing bytes). */
export const ERR_TPM_STRUCT_MALFORMED = "ERR_TPM_STRUCT_MALFORMED";

/** Hard ceiling on any TPM structure this codebase accepts (a TPM2B size is a u16 anyway). */
export const MAX_TPM_STRUCT_BYTES = 8192;

/** A permanent `ERR_TPM_STRUCT_MALFORMED` naming the structure and field (never the bytes). */
export function malformed(structure: string, field: string, problem: string, cause?: unknown): M2mError {
  return new M2mError(ERR_TPM_STRUCT_MALFORMED, "permanent", `malformed ${structure}: ${field} ${problem}`, {
    ...(cause === undefined ? {} : { cause }),
    details: { structure, field },
  });
}

/**
 * Bounds-checked big-endian reader over a byte range. Every read checks the remaining length first and
 * throws `ERR_TPM_STRUCT_MALFORMED` naming the field; nothing here can throw RangeError/TypeError or
 * allocate more than the input length.
 */
export class TpmReader {
  readonly #buf: Uint8Array;
  readonly #end: number;
  #off: number;
  /** Structure name used in error messages. */
  readonly structure: string;

  constructor(buf: Uint8Array, structure: string, start = 0, end = buf.length) {
    this.#buf = buf;
    this.#off = start;
    this.#end = end;
    this.structure = structure;
  }

  get offset(): number {
    return this.#off;
  }

  get remaining(): number {
    return this.#end - this.#off;
  }

  #need(n: number, field: string): void {
    if (n > this.#end - this.#off) {
      throw malformed(this.structure, field, `needs ${n} bytes, ${this.#end - this.#off} left`);
    }
  }

  u8(field: string): number {
    this.#need(1, field);
    const v = this.#buf[this.#off] ?? 0;
    this.#off += 1;
    return v;
  }

  u16(field: string): number {
    this.#need(2, field);
    const b = this.#buf;
    const o = this.#off;
    this.#off += 2;
    return ((b[o] ?? 0) << 8) | (b[o + 1] ?? 0);
  }

  u32(field: string): number {
    this.#need(4, field);
    const b = this.#buf;
    const o = this.#off;
    this.#off += 4;
    return (((b[o] ?? 0) << 24) | ((b[o + 1] ?? 0) << 16) | ((b[o + 2] ?? 0) << 8) | (b[o + 3] ?? 0)) >>> 0;
  }

  u64(field: string): bigint {
    const hi = this.u32(field);
    const lo = this.u32(field);
    return (BigInt(hi) << 32n) | BigInt(lo);
  }

  /** A copy of the next `n` bytes. */
  bytes(n: number, field: string): Uint8Array {
    this.#need(n, field);
    // Uint8Array.prototype.slice copies even when the input is a Buffer (Buffer#slice would alias it).
    const out = Uint8Array.prototype.slice.call(this.#buf, this.#off, this.#off + n);
    this.#off += n;
    return out;
  }

  /** A TPM2B: u16 size then that many bytes; the size is checked against `max` and the remaining input. */
  tpm2b(field: string, max: number, min = 0): Uint8Array {
    const size = this.u16(`${field}.size`);
    if (size > max) throw malformed(this.structure, field, `size ${size} exceeds maximum ${max}`);
    if (size < min) throw malformed(this.structure, field, `size ${size} below minimum ${min}`);
    return this.bytes(size, field);
  }

  /** A reader over the next `n` bytes (which this reader skips). */
  sub(n: number, field: string, structure = this.structure): TpmReader {
    this.#need(n, field);
    const r = new TpmReader(this.#buf, structure, this.#off, this.#off + n);
    this.#off += n;
    return r;
  }

  /** Refuses trailing bytes: a structure must be consumed exactly. */
  end(field = "end"): void {
    if (this.#off !== this.#end) {
      throw malformed(this.structure, field, `has ${this.#end - this.#off} trailing bytes`);
    }
  }
}

/** Big-endian writer that collects chunks (encode side: tests, tamper tables, MakeCredential). */
export class TpmWriter {
  readonly #chunks: Uint8Array[] = [];
  #length = 0;

  get length(): number {
    return this.#length;
  }

  u8(v: number): this {
    return this.raw(Uint8Array.of(v & 0xff));
  }

  u16(v: number): this {
    return this.raw(Uint8Array.of((v >>> 8) & 0xff, v & 0xff));
  }

  u32(v: number): this {
    return this.raw(Uint8Array.of((v >>> 24) & 0xff, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff));
  }

  u64(v: bigint): this {
    this.u32(Number((v >> 32n) & 0xffffffffn));
    return this.u32(Number(v & 0xffffffffn));
  }

  raw(b: Uint8Array): this {
    this.#chunks.push(b);
    this.#length += b.length;
    return this;
  }

  /** u16 size then the bytes. @throws ERR_TPM_STRUCT_MALFORMED when longer than 65535 bytes. */
  tpm2b(b: Uint8Array, field = "tpm2b"): this {
    if (b.length > 0xffff) throw malformed("TPM2B", field, "longer than 65535 bytes");
    this.u16(b.length);
    return this.raw(b);
  }

  finish(): Uint8Array {
    const out = new Uint8Array(this.#length);
    let off = 0;
    for (const c of this.#chunks) {
      out.set(c, off);
      off += c.length;
    }
    return out;
  }
}

/** Marshals `b` as a TPM2B (u16 size ‖ bytes). */
export function tpm2b(b: Uint8Array, field = "tpm2b"): Uint8Array {
  return new TpmWriter().tpm2b(b, field).finish();
}

/** Runs a decoder and turns any stray non-M2mError exception into ERR_TPM_STRUCT_MALFORMED. */
export function guardDecode<T>(structure: string, input: unknown, fn: (buf: Uint8Array) => T): T {
  if (!(input instanceof Uint8Array)) {
    throw malformed(structure, "input", "is not a byte array");
  }
  if (input.length > MAX_TPM_STRUCT_BYTES) {
    throw malformed(structure, "input", `is ${input.length} bytes, over the ${MAX_TPM_STRUCT_BYTES} limit`);
  }
  try {
    return fn(input);
  } catch (err) {
    if (err instanceof Error && (err as { code?: unknown }).code === ERR_TPM_STRUCT_MALFORMED) throw err;
    throw malformed(structure, "input", "could not be decoded", err);
  }
}
