import { createPublicKey } from "node:crypto";
import { M2mError } from "../../core/errors.js";

/** DER of the named-curve OID 1.2.840.10045.3.1.7 (P-256): the value of CKA_EC_PARAMS. */
export const P256_EC_PARAMS: Buffer = Buffer.from("06082a8648ce3d030107", "hex");

/** SubjectPublicKeyInfo header for an uncompressed P-256 point (id-ecPublicKey, prime256v1, BIT STRING). */
const P256_SPKI_PREFIX = Buffer.from("3059301306072a8648ce3d020106082a8648ce3d030107034200", "hex");

/**
 * Extracts the 65-byte uncompressed point from CKA_EC_POINT. PKCS#11 says it is a DER OCTET STRING
 * (`04 41 04…`); some modules return the raw point (`04…`, 65 bytes): both are accepted, nothing else.
 * @throws ERR_KEY_PUBLIC_INVALID
 */
export function ecPointFromAttribute(value: Uint8Array): Buffer {
  const v = Buffer.from(value);
  if (v.length === 67 && v[0] === 0x04 && v[1] === 0x41 && v[2] === 0x04) return v.subarray(2);
  if (v.length === 65 && v[0] === 0x04) return v;
  throw new M2mError("ERR_KEY_PUBLIC_INVALID", "permanent", "the token returned an unexpected CKA_EC_POINT", {
    details: { length: v.length },
  });
}

/** SPKI (DER) of a P-256 public key from its CKA_EC_POINT attribute. */
export function spkiFromEcPoint(ecPointAttr: Uint8Array): Buffer {
  return Buffer.concat([P256_SPKI_PREFIX, ecPointFromAttribute(ecPointAttr)]);
}

/** SPKI (DER) of an RSA public key from CKA_MODULUS and CKA_PUBLIC_EXPONENT (big-endian bytes). */
export function spkiFromRsa(modulus: Uint8Array, exponent: Uint8Array): Buffer {
  const strip = (b: Uint8Array): Buffer => {
    let i = 0;
    while (i < b.length - 1 && b[i] === 0) i++;
    return Buffer.from(b.subarray(i));
  };
  try {
    const key = createPublicKey({
      key: { kty: "RSA", n: strip(modulus).toString("base64url"), e: strip(exponent).toString("base64url") },
      format: "jwk",
    });
    return key.export({ format: "der", type: "spki" });
  } catch (err) {
    throw new M2mError(
      "ERR_KEY_PUBLIC_INVALID",
      "permanent",
      "the token returned an unusable RSA public key",
      {
        cause: err,
      },
    );
  }
}
