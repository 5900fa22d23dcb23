import { createHash, createPublicKey, type KeyObject } from "node:crypto";
import { M2mError } from "../../core/errors.js";

/**
 * Minimal TPMT_PUBLIC / TPMT_SIGNATURE parsing for the agent's own TPM objects (keys it reads back
 * from its own TPM). The registrar verifies attacker-supplied structures with the full codecs in
 * src/tpm/; this file only needs what the provider checks before trusting a handle.
 */

export const ALG = {
  RSA: 0x0001,
  SHA256: 0x000b,
  NULL: 0x0010,
  RSASSA: 0x0014,
  RSAPSS: 0x0016,
  ECDSA: 0x0018,
  ECC: 0x0023,
  AES: 0x0006,
  CFB: 0x0043,
} as const;

export const CURVE = { P256: 0x0003, P384: 0x0004 } as const;

/** TPMA_OBJECT bits (TPM 2.0 Part 2, 8.3). */
export const ATTR = {
  fixedTPM: 0x00000002,
  stClear: 0x00000004,
  fixedParent: 0x00000010,
  sensitiveDataOrigin: 0x00000020,
  userWithAuth: 0x00000040,
  adminWithPolicy: 0x00000080,
  noDA: 0x00000400,
  encryptedDuplication: 0x00000800,
  restricted: 0x00010000,
  decrypt: 0x00020000,
  sign: 0x00040000,
} as const;

export function attrNames(attrs: number): string[] {
  return Object.entries(ATTR)
    .filter(([, bit]) => (attrs & bit) !== 0)
    .map(([name]) => name);
}

export interface ParsedPublic {
  readonly type: number;
  readonly nameAlg: number;
  readonly objectAttributes: number;
  readonly authPolicy: Uint8Array;
  readonly symmetric: { readonly algorithm: number; readonly keyBits: number; readonly mode: number };
  readonly scheme: { readonly scheme: number; readonly hashAlg: number };
  /** ECC only. */
  readonly curveId?: number;
  /** RSA only. */
  readonly keyBits?: number;
  /** RSA only; 0 means 65537. */
  readonly exponent?: number;
  /** ECC: x, y; RSA: n. */
  readonly unique: readonly Uint8Array[];
  /** The exact bytes parsed (TPMT_PUBLIC). */
  readonly bytes: Uint8Array;
}

function bad(problem: string): M2mError {
  return new M2mError("ERR_TPM_STRUCT_MALFORMED", "permanent", `TPMT_PUBLIC from the TPM: ${problem}`);
}

class Reader {
  #off = 0;
  constructor(readonly b: Uint8Array) {}
  u16(): number {
    if (this.#off + 2 > this.b.length) throw bad("truncated");
    const v = ((this.b[this.#off] ?? 0) << 8) | (this.b[this.#off + 1] ?? 0);
    this.#off += 2;
    return v;
  }
  u32(): number {
    return ((this.u16() << 16) | this.u16()) >>> 0;
  }
  tpm2b(max: number): Uint8Array {
    const n = this.u16();
    if (n > max || this.#off + n > this.b.length) throw bad("bad TPM2B size");
    const v = this.b.subarray(this.#off, this.#off + n);
    this.#off += n;
    return v;
  }
  get rest(): number {
    return this.b.length - this.#off;
  }
}

/** Parses a TPMT_PUBLIC (RSA or ECC) as written by `tpm2_readpublic -f tpmt`. */
export function parseTpmtPublic(bytes: Uint8Array): ParsedPublic {
  const r = new Reader(bytes);
  const type = r.u16();
  const nameAlg = r.u16();
  const objectAttributes = r.u32();
  const authPolicy = r.tpm2b(64);
  if (type !== ALG.RSA && type !== ALG.ECC) throw bad(`unsupported type 0x${type.toString(16)}`);
  const symAlg = r.u16();
  const symmetric =
    symAlg === ALG.NULL
      ? { algorithm: symAlg, keyBits: 0, mode: 0 }
      : { algorithm: symAlg, keyBits: r.u16(), mode: r.u16() };
  const schemeAlg = r.u16();
  const scheme = { scheme: schemeAlg, hashAlg: schemeAlg === ALG.NULL ? ALG.NULL : r.u16() };
  if (type === ALG.RSA) {
    const keyBits = r.u16();
    const exponent = r.u32();
    const n = r.tpm2b(512);
    if (r.rest !== 0) throw bad("trailing bytes");
    return {
      type,
      nameAlg,
      objectAttributes,
      authPolicy,
      symmetric,
      scheme,
      keyBits,
      exponent,
      unique: [n],
      bytes,
    };
  }
  const curveId = r.u16();
  const kdf = r.u16();
  if (kdf !== ALG.NULL) r.u16();
  const x = r.tpm2b(128);
  const y = r.tpm2b(128);
  if (r.rest !== 0) throw bad("trailing bytes");
  return { type, nameAlg, objectAttributes, authPolicy, symmetric, scheme, curveId, unique: [x, y], bytes };
}

const NAME_HASHES: ReadonlyMap<number, string> = new Map([
  [ALG.SHA256, "sha256"],
  [0x000c, "sha384"],
  [0x000d, "sha512"],
]);

/** Name = nameAlg ‖ H_nameAlg(TPMT_PUBLIC) (sha256; sha384/512 for high-range EKs). */
export function objectName(pub: ParsedPublic): Uint8Array {
  const hash = NAME_HASHES.get(pub.nameAlg);
  if (hash === undefined) throw bad(`unsupported nameAlg 0x${pub.nameAlg.toString(16)}`);
  const head = Buffer.from([(pub.nameAlg >> 8) & 0xff, pub.nameAlg & 0xff]);
  return Buffer.concat([head, createHash(hash).update(pub.bytes).digest()]);
}

function leftPad(b: Uint8Array, size: number): Buffer {
  if (b.length > size) throw bad("coordinate too long");
  const out = Buffer.alloc(size);
  out.set(b, size - b.length);
  return out;
}

/** The public key as a Node KeyObject (ECC P-256/P-384, RSA). */
export function publicKeyOf(pub: ParsedPublic): KeyObject {
  if (pub.type === ALG.ECC) {
    const [x = new Uint8Array(), y = new Uint8Array()] = pub.unique;
    const crv = pub.curveId === CURVE.P256 ? "P-256" : pub.curveId === CURVE.P384 ? "P-384" : undefined;
    if (crv === undefined) throw bad("unsupported curve");
    const size = crv === "P-256" ? 32 : 48;
    return createPublicKey({
      key: {
        kty: "EC",
        crv,
        x: leftPad(x, size).toString("base64url"),
        y: leftPad(y, size).toString("base64url"),
      },
      format: "jwk",
    });
  }
  const [n = new Uint8Array()] = pub.unique;
  const exp = pub.exponent === 0 || pub.exponent === undefined ? 65537 : pub.exponent;
  const e = Buffer.alloc(4);
  e.writeUInt32BE(exp);
  let s = 0;
  while (s < 3 && e[s] === 0) s++;
  return createPublicKey({
    key: { kty: "RSA", n: Buffer.from(n).toString("base64url"), e: e.subarray(s).toString("base64url") },
    format: "jwk",
  });
}

/** TPM2B_PUBLIC = u16 size ‖ TPMT_PUBLIC. */
export function toTpm2bPublic(tpmt: Uint8Array): Uint8Array {
  const out = new Uint8Array(2 + tpmt.length);
  out[0] = (tpmt.length >> 8) & 0xff;
  out[1] = tpmt.length & 0xff;
  out.set(tpmt, 2);
  return out;
}

/**
 * Converts an ECDSA TPMT_SIGNATURE (`0018 hash TPM2B r TPM2B s`) into JWS r‖s, each left-padded
 * to `size` bytes (the TPM strips leading zero bytes).
 * @throws ERR_TPM_SIGNATURE_FORMAT when it is not an ECDSA signature of the expected shape.
 */
export function ecdsaTpmtToRaw(sig: Uint8Array, size = 32): Uint8Array {
  const fail = (why: string) =>
    new M2mError("ERR_TPM_SIGNATURE_FORMAT", "permanent", `unexpected TPMT_SIGNATURE from tpm2_sign: ${why}`);
  if (sig.length < 8) throw fail("too short");
  const u16 = (o: number) => ((sig[o] ?? 0) << 8) | (sig[o + 1] ?? 0);
  if (u16(0) !== ALG.ECDSA) throw fail("not ECDSA");
  const rLen = u16(4);
  const sOff = 6 + rLen;
  if (rLen > size || sOff + 2 > sig.length) throw fail("bad r");
  const sLen = u16(sOff);
  if (sLen > size || sOff + 2 + sLen !== sig.length) throw fail("bad s");
  const out = new Uint8Array(2 * size);
  out.set(sig.subarray(6, 6 + rLen), size - rLen);
  out.set(sig.subarray(sOff + 2, sOff + 2 + sLen), 2 * size - sLen);
  return out;
}
