import { createHash, createPublicKey, type KeyObject } from "node:crypto";
import { guardDecode, malformed, TpmReader, TpmWriter } from "./bytes.js";
import {
  attributeNames,
  curveInfo,
  hashInfo,
  MAX_DIGEST_BYTES,
  MAX_ECC_KEY_BYTES,
  MAX_RSA_KEY_BYTES,
  TPM_ALG,
  TPM_ECC_CURVE,
} from "./constants.js";

/** TPMT_SYM_DEF_OBJECT. `keyBits` and `mode` are 0 when `algorithm` is TPM_ALG_NULL. */
export interface TpmtSymDefObject {
  readonly algorithm: number;
  readonly keyBits: number;
  readonly mode: number;
}

/**
 * TPMT_RSA_SCHEME / TPMT_ECC_SCHEME / TPMT_KDF_SCHEME. `hashAlg` is TPM_ALG_NULL when the scheme has no
 * details (NULL, RSAES); `count` only exists for ECDAA.
 */
export interface TpmtScheme {
  readonly scheme: number;
  readonly hashAlg: number;
  readonly count?: number;
}

export interface TpmsRsaParms {
  readonly symmetric: TpmtSymDefObject;
  readonly scheme: TpmtScheme;
  readonly keyBits: number;
  /** 0 means the default 65537. */
  readonly exponent: number;
}

export interface TpmsEccParms {
  readonly symmetric: TpmtSymDefObject;
  readonly scheme: TpmtScheme;
  readonly curveId: number;
  readonly kdf: TpmtScheme;
}

interface PublicBase {
  readonly nameAlg: number;
  readonly objectAttributes: number;
  readonly authPolicy: Uint8Array;
}

export interface TpmtPublicRsa extends PublicBase {
  readonly type: typeof TPM_ALG.RSA;
  readonly parameters: TpmsRsaParms;
  readonly unique: { readonly n: Uint8Array };
}

export interface TpmtPublicEcc extends PublicBase {
  readonly type: typeof TPM_ALG.ECC;
  readonly parameters: TpmsEccParms;
  readonly unique: { readonly x: Uint8Array; readonly y: Uint8Array };
}

/** TPMT_PUBLIC for the asymmetric key types this project handles (RSA, ECC). */
export type TpmtPublic = TpmtPublicRsa | TpmtPublicEcc;

const SYM_WITH_DETAILS: ReadonlySet<number> = new Set([TPM_ALG.AES, TPM_ALG.SM4, TPM_ALG.CAMELLIA]);
const SCHEME_WITH_HASH: ReadonlySet<number> = new Set([
  TPM_ALG.RSASSA,
  TPM_ALG.RSAPSS,
  TPM_ALG.OAEP,
  TPM_ALG.ECDSA,
  TPM_ALG.ECDH,
  TPM_ALG.SM2,
  TPM_ALG.ECSCHNORR,
  TPM_ALG.ECMQV,
]);
const RSA_SCHEMES: ReadonlySet<number> = new Set([
  TPM_ALG.NULL,
  TPM_ALG.RSASSA,
  TPM_ALG.RSAPSS,
  TPM_ALG.OAEP,
  TPM_ALG.RSAES,
]);
const ECC_SCHEMES: ReadonlySet<number> = new Set([
  TPM_ALG.NULL,
  TPM_ALG.ECDSA,
  TPM_ALG.ECDH,
  TPM_ALG.ECDAA,
  TPM_ALG.SM2,
  TPM_ALG.ECSCHNORR,
  TPM_ALG.ECMQV,
]);
const KDF_SCHEMES: ReadonlySet<number> = new Set([
  TPM_ALG.NULL,
  TPM_ALG.KDF1_SP800_56A,
  TPM_ALG.KDF2,
  TPM_ALG.KDF1_SP800_108,
  TPM_ALG.MGF1,
]);

function readSymDef(r: TpmReader, field: string): TpmtSymDefObject {
  const algorithm = r.u16(`${field}.algorithm`);
  if (algorithm === TPM_ALG.NULL) return { algorithm, keyBits: 0, mode: 0 };
  if (!SYM_WITH_DETAILS.has(algorithm)) {
    throw malformed(
      r.structure,
      `${field}.algorithm`,
      `0x${algorithm.toString(16)} is not a symmetric cipher`,
    );
  }
  const keyBits = r.u16(`${field}.keyBits`);
  const mode = r.u16(`${field}.mode`);
  return { algorithm, keyBits, mode };
}

function readScheme(r: TpmReader, field: string, allowed: ReadonlySet<number>, isKdf = false): TpmtScheme {
  const scheme = r.u16(`${field}.scheme`);
  if (!allowed.has(scheme)) {
    throw malformed(r.structure, `${field}.scheme`, `0x${scheme.toString(16)} is not allowed here`);
  }
  if (scheme === TPM_ALG.ECDAA) {
    const hashAlg = r.u16(`${field}.hashAlg`);
    const count = r.u16(`${field}.count`);
    return { scheme, hashAlg, count };
  }
  if (SCHEME_WITH_HASH.has(scheme) || (isKdf && scheme !== TPM_ALG.NULL)) {
    return { scheme, hashAlg: r.u16(`${field}.hashAlg`) };
  }
  return { scheme, hashAlg: TPM_ALG.NULL };
}

function writeSymDef(w: TpmWriter, s: TpmtSymDefObject): void {
  w.u16(s.algorithm);
  if (s.algorithm !== TPM_ALG.NULL) w.u16(s.keyBits).u16(s.mode);
}

function writeScheme(w: TpmWriter, s: TpmtScheme, isKdf: boolean): void {
  w.u16(s.scheme);
  if (s.scheme === TPM_ALG.ECDAA) {
    w.u16(s.hashAlg).u16(s.count ?? 0);
  } else if (SCHEME_WITH_HASH.has(s.scheme) || (isKdf && s.scheme !== TPM_ALG.NULL)) {
    w.u16(s.hashAlg);
  }
}

/** Reads one TPMT_PUBLIC from `r` (does not require `r` to end afterwards). */
export function readTpmtPublic(r: TpmReader): TpmtPublic {
  const type = r.u16("type");
  const nameAlg = r.u16("nameAlg");
  const objectAttributes = r.u32("objectAttributes");
  const authPolicy = r.tpm2b("authPolicy", MAX_DIGEST_BYTES);
  if (type === TPM_ALG.RSA) {
    const symmetric = readSymDef(r, "parameters.symmetric");
    const scheme = readScheme(r, "parameters.scheme", RSA_SCHEMES);
    const keyBits = r.u16("parameters.keyBits");
    const exponent = r.u32("parameters.exponent");
    const n = r.tpm2b("unique.rsa", MAX_RSA_KEY_BYTES);
    return {
      type,
      nameAlg,
      objectAttributes,
      authPolicy,
      parameters: { symmetric, scheme, keyBits, exponent },
      unique: { n },
    };
  }
  if (type === TPM_ALG.ECC) {
    const symmetric = readSymDef(r, "parameters.symmetric");
    const scheme = readScheme(r, "parameters.scheme", ECC_SCHEMES);
    const curveId = r.u16("parameters.curveID");
    const kdf = readScheme(r, "parameters.kdf", KDF_SCHEMES, true);
    const x = r.tpm2b("unique.ecc.x", MAX_ECC_KEY_BYTES);
    const y = r.tpm2b("unique.ecc.y", MAX_ECC_KEY_BYTES);
    return {
      type,
      nameAlg,
      objectAttributes,
      authPolicy,
      parameters: { symmetric, scheme, curveId, kdf },
      unique: { x, y },
    };
  }
  throw malformed(r.structure, "type", `0x${type.toString(16)} is not RSA or ECC`);
}

/**
 * Decodes a bare TPMT_PUBLIC (e.g. `tpm2_readpublic -f tpmt`). The whole input must be consumed.
 * @throws ERR_TPM_STRUCT_MALFORMED
 */
export function decodeTpmtPublic(bytes: Uint8Array): TpmtPublic {
  return guardDecode("TPMT_PUBLIC", bytes, (buf) => {
    const r = new TpmReader(buf, "TPMT_PUBLIC");
    const pub = readTpmtPublic(r);
    r.end();
    return pub;
  });
}

/** Reads a TPM2B_PUBLIC from `r`: u16 size, then exactly that many bytes of TPMT_PUBLIC. */
export function readTpm2bPublic(r: TpmReader): TpmtPublic {
  const size = r.u16("size");
  if (size === 0) throw malformed(r.structure, "size", "is zero");
  const inner = r.sub(size, "publicArea", "TPM2B_PUBLIC");
  const pub = readTpmtPublic(inner);
  inner.end("publicArea");
  return pub;
}

/**
 * Decodes a TPM2B_PUBLIC (e.g. `tpm2_readpublic -o`, the agent's wire format). The whole input must be
 * consumed. @throws ERR_TPM_STRUCT_MALFORMED
 */
export function decodeTpm2bPublic(bytes: Uint8Array): TpmtPublic {
  return guardDecode("TPM2B_PUBLIC", bytes, (buf) => {
    const r = new TpmReader(buf, "TPM2B_PUBLIC");
    const pub = readTpm2bPublic(r);
    r.end();
    return pub;
  });
}

export function writeTpmtPublic(w: TpmWriter, p: TpmtPublic): void {
  w.u16(p.type).u16(p.nameAlg).u32(p.objectAttributes).tpm2b(p.authPolicy, "authPolicy");
  writeSymDef(w, p.parameters.symmetric);
  writeScheme(w, p.parameters.scheme, false);
  if (p.type === TPM_ALG.RSA) {
    w.u16(p.parameters.keyBits).u32(p.parameters.exponent);
    w.tpm2b(p.unique.n, "unique.rsa");
  } else {
    w.u16(p.parameters.curveId);
    writeScheme(w, p.parameters.kdf, true);
    w.tpm2b(p.unique.x, "unique.ecc.x").tpm2b(p.unique.y, "unique.ecc.y");
  }
}

/** Marshals a TPMT_PUBLIC (the bytes the Name is computed over). */
export function encodeTpmtPublic(p: TpmtPublic): Uint8Array {
  const w = new TpmWriter();
  writeTpmtPublic(w, p);
  return w.finish();
}

/** Marshals a TPM2B_PUBLIC. */
export function encodeTpm2bPublic(p: TpmtPublic): Uint8Array {
  return new TpmWriter().tpm2b(encodeTpmtPublic(p), "TPM2B_PUBLIC").finish();
}

/** Digest helper over a TPM hash algorithm. @throws ERR_TPM_STRUCT_MALFORMED for an unsupported hash. */
export function tpmHash(alg: number, ...parts: Uint8Array[]): Uint8Array {
  const h = hashInfo(alg);
  if (h === undefined) throw malformed("TPMI_ALG_HASH", "hashAlg", `0x${alg.toString(16)} is not supported`);
  const hash = createHash(h.name);
  for (const p of parts) hash.update(p);
  return new Uint8Array(hash.digest());
}

function concatBytes(...parts: Uint8Array[]): Uint8Array {
  const w = new TpmWriter();
  for (const p of parts) w.raw(p);
  return w.finish();
}

/**
 * The object's Name: nameAlg (u16) ‖ H_nameAlg(TPMT_PUBLIC). Works for sha1/sha256/sha384/sha512.
 * @throws ERR_TPM_STRUCT_MALFORMED when nameAlg is not a supported hash.
 */
export function computeName(p: TpmtPublic): Uint8Array {
  const head = Uint8Array.of((p.nameAlg >>> 8) & 0xff, p.nameAlg & 0xff);
  return concatBytes(head, tpmHash(p.nameAlg, encodeTpmtPublic(p)));
}

/**
 * Qualified name of an object under `parentQualifiedName`:
 * QN = nameAlg ‖ H_nameAlg(QN(parent) ‖ Name(object)). For a primary key the parent QN is the
 * 4-byte hierarchy handle (e.g. TPM_RH_ENDORSEMENT 0x4000000b).
 */
export function computeQualifiedName(parentQualifiedName: Uint8Array, p: TpmtPublic): Uint8Array {
  const head = Uint8Array.of((p.nameAlg >>> 8) & 0xff, p.nameAlg & 0xff);
  return concatBytes(head, tpmHash(p.nameAlg, parentQualifiedName, computeName(p)));
}

/** The 4-byte big-endian encoding of a hierarchy handle, as used as a parent QN. */
export function handleBytes(handle: number): Uint8Array {
  return new TpmWriter().u32(handle).finish();
}

/** Names of the attribute bits set in the object (for logs and error causes). */
export function objectAttributeNames(p: TpmtPublic): string[] {
  return attributeNames(p.objectAttributes);
}

function b64url(b: Uint8Array): string {
  return Buffer.from(b).toString("base64url");
}

function leftPad(b: Uint8Array, size: number, field: string): Uint8Array {
  let start = 0;
  while (b.length - start > size && b[start] === 0) start++;
  const v = b.subarray(start);
  if (v.length > size) throw malformed("TPMT_PUBLIC", field, `is longer than the curve's ${size} bytes`);
  const out = new Uint8Array(size);
  out.set(v, size - v.length);
  return out;
}

/**
 * The public key as a Node KeyObject (RSA any size the decoder accepts; ECC P-256/P-384/P-521).
 * @throws ERR_TPM_STRUCT_MALFORMED when the unique field is not a valid key for the parameters.
 */
export function publicKeyObject(p: TpmtPublic): KeyObject {
  try {
    if (p.type === TPM_ALG.RSA) {
      const bits = p.parameters.keyBits;
      if (bits === 0 || bits % 8 !== 0 || p.unique.n.length !== bits / 8) {
        throw malformed("TPMT_PUBLIC", "unique.rsa", "size does not match parameters.keyBits");
      }
      if ((p.unique.n[0] ?? 0) < 0x80) throw malformed("TPMT_PUBLIC", "unique.rsa", "has its top bit clear");
      const exp = p.parameters.exponent === 0 ? 65537 : p.parameters.exponent;
      if (exp < 3 || exp % 2 === 0)
        throw malformed("TPMT_PUBLIC", "parameters.exponent", "is not a valid exponent");
      const e = new TpmWriter().u32(exp).finish();
      let s = 0;
      while (e[s] === 0) s++;
      return createPublicKey({
        key: { kty: "RSA", n: b64url(p.unique.n), e: b64url(e.subarray(s)) },
        format: "jwk",
      });
    }
    const curve = curveInfo(p.parameters.curveId);
    if (curve === undefined) {
      throw malformed(
        "TPMT_PUBLIC",
        "parameters.curveID",
        `0x${p.parameters.curveId.toString(16)} is not supported`,
      );
    }
    const x = leftPad(p.unique.x, curve.coordBytes, "unique.ecc.x");
    const y = leftPad(p.unique.y, curve.coordBytes, "unique.ecc.y");
    return createPublicKey({
      key: { kty: "EC", crv: curve.jwkCrv, x: b64url(x), y: b64url(y) },
      format: "jwk",
    });
  } catch (err) {
    if (err instanceof Error && (err as { code?: unknown }).code === "ERR_TPM_STRUCT_MALFORMED") throw err;
    throw malformed("TPMT_PUBLIC", "unique", "is not a valid public key", err);
  }
}

/** SubjectPublicKeyInfo (DER) of the key. @throws ERR_TPM_STRUCT_MALFORMED */
export function toSpki(p: TpmtPublic): Uint8Array {
  return new Uint8Array(publicKeyObject(p).export({ type: "spki", format: "der" }));
}

/** Fields a caller chooses when wrapping a Node key as a TPMT_PUBLIC (tests, software "TPM" keys). */
export interface PublicAreaOptions {
  readonly nameAlg?: number;
  readonly objectAttributes: number;
  readonly authPolicy?: Uint8Array;
  readonly symmetric?: TpmtSymDefObject;
  readonly scheme?: TpmtScheme;
  readonly kdf?: TpmtScheme;
}

const NULL_SYM: TpmtSymDefObject = { algorithm: TPM_ALG.NULL, keyBits: 0, mode: 0 };
const NULL_SCHEME: TpmtScheme = { scheme: TPM_ALG.NULL, hashAlg: TPM_ALG.NULL };

/**
 * Wraps a Node public key (RSA, or EC P-256/P-384/P-521) as a TPMT_PUBLIC with the given attributes.
 * Used to synthesize evidence in tests and to compare keys; a real TPM builds its own.
 */
export function publicAreaFromKey(key: KeyObject, opts: PublicAreaOptions): TpmtPublic {
  const jwk = key.export({ format: "jwk" });
  const base = {
    nameAlg: opts.nameAlg ?? TPM_ALG.SHA256,
    objectAttributes: opts.objectAttributes >>> 0,
    authPolicy: opts.authPolicy ?? new Uint8Array(0),
  };
  if (jwk.kty === "RSA" && typeof jwk.n === "string" && typeof jwk.e === "string") {
    const n = new Uint8Array(Buffer.from(jwk.n, "base64url"));
    const e = Buffer.from(jwk.e, "base64url");
    let exponent = 0;
    for (const b of e) exponent = exponent * 256 + b;
    return {
      type: TPM_ALG.RSA,
      ...base,
      parameters: {
        symmetric: opts.symmetric ?? NULL_SYM,
        scheme: opts.scheme ?? NULL_SCHEME,
        keyBits: n.length * 8,
        exponent: exponent === 65537 ? 0 : exponent,
      },
      unique: { n },
    };
  }
  if (jwk.kty === "EC" && typeof jwk.x === "string" && typeof jwk.y === "string") {
    const curveId =
      jwk.crv === "P-256"
        ? TPM_ECC_CURVE.NIST_P256
        : jwk.crv === "P-384"
          ? TPM_ECC_CURVE.NIST_P384
          : jwk.crv === "P-521"
            ? TPM_ECC_CURVE.NIST_P521
            : 0;
    if (curveId === 0) throw malformed("TPMT_PUBLIC", "parameters.curveID", "unsupported curve");
    return {
      type: TPM_ALG.ECC,
      ...base,
      parameters: {
        symmetric: opts.symmetric ?? NULL_SYM,
        scheme: opts.scheme ?? NULL_SCHEME,
        curveId,
        kdf: opts.kdf ?? NULL_SCHEME,
      },
      unique: {
        x: new Uint8Array(Buffer.from(jwk.x, "base64url")),
        y: new Uint8Array(Buffer.from(jwk.y, "base64url")),
      },
    };
  }
  throw malformed("TPMT_PUBLIC", "type", "key is not RSA or EC");
}
