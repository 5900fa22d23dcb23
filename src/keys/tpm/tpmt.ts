import type { KeyObject } from "node:crypto";
import { isM2mError, M2mError } from "../../core/errors.js";
import {
  attributeNames,
  computeName,
  decodeTpmtPublic,
  decodeTpmtSignature,
  publicKeyObject,
  TPM_ALG,
  TPM_ECC_CURVE,
  TPMA_OBJECT,
  type TpmtPublic,
} from "../../tpm/index.js";

/**
 * The TPM provider's view of its own objects, as a thin adapter over the project's one set of TPM
 * codecs (src/tpm/, the same bounds-checked, fuzzed decoders the registrar uses on hostile input).
 * It keeps the flat shape the provider's checks read (`curveId`, `keyBits`, `unique[]`, raw `bytes`).
 */

export const ALG = {
  RSA: TPM_ALG.RSA,
  SHA256: TPM_ALG.SHA256,
  NULL: TPM_ALG.NULL,
  RSASSA: TPM_ALG.RSASSA,
  RSAPSS: TPM_ALG.RSAPSS,
  ECDSA: TPM_ALG.ECDSA,
  ECC: TPM_ALG.ECC,
  AES: TPM_ALG.AES,
  CFB: TPM_ALG.CFB,
} as const;

export const CURVE = { P256: TPM_ECC_CURVE.NIST_P256, P384: TPM_ECC_CURVE.NIST_P384 } as const;

/** TPMA_OBJECT bits (TPM 2.0 Part 2, 8.3). */
export const ATTR = TPMA_OBJECT;

export const attrNames = attributeNames;

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
  /** The decoded structure (for the shared codecs: names, key objects). */
  readonly decoded: TpmtPublic;
}

/**
 * Parses a TPMT_PUBLIC (RSA or ECC) as written by `tpm2_readpublic -f tpmt`.
 * @throws ERR_TPM_STRUCT_MALFORMED
 */
export function parseTpmtPublic(bytes: Uint8Array): ParsedPublic {
  const d = decodeTpmtPublic(bytes);
  const base = {
    type: d.type,
    nameAlg: d.nameAlg,
    objectAttributes: d.objectAttributes,
    authPolicy: d.authPolicy,
    symmetric: d.parameters.symmetric,
    scheme: { scheme: d.parameters.scheme.scheme, hashAlg: d.parameters.scheme.hashAlg },
    bytes: Uint8Array.from(bytes),
    decoded: d,
  };
  return d.type === TPM_ALG.RSA
    ? { ...base, keyBits: d.parameters.keyBits, exponent: d.parameters.exponent, unique: [d.unique.n] }
    : { ...base, curveId: d.parameters.curveId, unique: [d.unique.x, d.unique.y] };
}

/** Name = nameAlg ‖ H_nameAlg(TPMT_PUBLIC) (sha256; sha384/512 for high-range EKs). */
export function objectName(pub: ParsedPublic): Uint8Array {
  return computeName(pub.decoded);
}

/** The public key as a Node KeyObject (ECC P-256/P-384, RSA). */
export function publicKeyOf(pub: ParsedPublic): KeyObject {
  return publicKeyObject(pub.decoded);
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
  const fail = (why: string, cause?: unknown) =>
    new M2mError(
      "ERR_TPM_SIGNATURE_FORMAT",
      "permanent",
      `unexpected TPMT_SIGNATURE from tpm2_sign: ${why}`,
      {
        cause,
      },
    );
  let decoded: ReturnType<typeof decodeTpmtSignature>;
  try {
    decoded = decodeTpmtSignature(sig);
  } catch (err) {
    throw fail(isM2mError(err) ? err.message : "undecodable", err);
  }
  if (decoded.sigAlg !== TPM_ALG.ECDSA) throw fail("not ECDSA");
  const { r, s } = decoded;
  if (r.length > size) throw fail("bad r");
  if (s.length > size) throw fail("bad s");
  const out = new Uint8Array(2 * size);
  out.set(r, size - r.length);
  out.set(s, 2 * size - s.length);
  return out;
}
