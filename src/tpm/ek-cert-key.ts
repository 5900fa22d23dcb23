import { createPublicKey, type KeyObject } from "node:crypto";

/**
 * The public key of an EK certificate's SubjectPublicKeyInfo, including RSA EK certificates whose key
 * is labelled id-RSAES-OAEP (1.2.840.113549.1.1.7) instead of rsaEncryption (1.2.840.113549.1.1.1).
 * Some TPM vendors (and TPM 1.2-era CAs) issue those: the key is an ordinary RSAPublicKey, the OID only
 * says "use it with OAEP" — which is exactly how TPM2_MakeCredential uses an RSA EK. OpenSSL 3 (Node's
 * `X509Certificate.publicKey`, `createPublicKey`) refuses that OID, so the SPKI is relabelled as
 * rsaEncryption (the key bits are kept byte for byte) before it is imported.
 */

const OID_RSAES_OAEP = Buffer.from("06092a864886f70d010107", "hex");
/** AlgorithmIdentifier { rsaEncryption, NULL }. */
const ALG_RSA_ENCRYPTION = Buffer.from("300d06092a864886f70d0101010500", "hex");

interface Tlv {
  readonly tag: number;
  /** Offset of the value. */
  readonly start: number;
  /** Offset just past the value. */
  readonly end: number;
}

function readTlv(b: Uint8Array, at: number, limit: number): Tlv {
  if (at + 2 > limit) throw new Error("DER: truncated header");
  const tag = b[at] ?? 0;
  let len = b[at + 1] ?? 0;
  let start = at + 2;
  if (len & 0x80) {
    const n = len & 0x7f;
    if (n < 1 || n > 3 || start + n > limit) throw new Error("DER: bad length");
    len = 0;
    for (let i = 0; i < n; i++) len = len * 256 + (b[start + i] ?? 0);
    start += n;
  }
  if (start + len > limit) throw new Error("DER: value beyond its parent");
  return { tag, start, end: start + len };
}

function derLength(n: number): Buffer {
  if (n < 0x80) return Buffer.from([n]);
  if (n < 0x100) return Buffer.from([0x81, n]);
  if (n < 0x10000) return Buffer.from([0x82, n >> 8, n & 0xff]);
  return Buffer.from([0x83, n >> 16, (n >> 8) & 0xff, n & 0xff]);
}

/** True when the SPKI's algorithm OID is id-RSAES-OAEP. @throws Error when `spki` is not a SPKI. */
export function isRsaesOaepSpki(spki: Uint8Array): boolean {
  const outer = readTlv(spki, 0, spki.length);
  if (outer.tag !== 0x30) throw new Error("SPKI: not a SEQUENCE");
  const alg = readTlv(spki, outer.start, outer.end);
  if (alg.tag !== 0x30) throw new Error("SPKI: algorithm is not a SEQUENCE");
  const oid = readTlv(spki, alg.start, alg.end);
  if (oid.tag !== 0x06) throw new Error("SPKI: no algorithm OID");
  return Buffer.from(spki.subarray(alg.start, oid.end)).equals(OID_RSAES_OAEP);
}

/**
 * The SPKI with an id-RSAES-OAEP algorithm replaced by rsaEncryption (the subjectPublicKey BIT STRING
 * unchanged); any other SPKI is returned as is. @throws Error on malformed DER.
 */
export function normalizeRsaesOaepSpki(spki: Uint8Array): Uint8Array {
  if (!isRsaesOaepSpki(spki)) return spki;
  const outer = readTlv(spki, 0, spki.length);
  const alg = readTlv(spki, outer.start, outer.end);
  const bits = readTlv(spki, alg.end, outer.end);
  if (bits.tag !== 0x03 || bits.end !== outer.end) throw new Error("SPKI: no subjectPublicKey");
  const keyTlv = Buffer.from(spki.subarray(alg.end, bits.end));
  const body = Buffer.concat([ALG_RSA_ENCRYPTION, keyTlv]);
  return new Uint8Array(Buffer.concat([Buffer.from([0x30]), derLength(body.length), body]));
}

/**
 * The subjectPublicKeyInfo DER of an X.509 certificate (DER), located structurally:
 * Certificate → tbsCertificate → [version] serial sigAlg issuer validity subject SPKI.
 * @throws Error on malformed DER.
 */
export function certificateSpki(certDer: Uint8Array): Uint8Array {
  const cert = readTlv(certDer, 0, certDer.length);
  const tbs = readTlv(certDer, cert.start, cert.end);
  if (cert.tag !== 0x30 || tbs.tag !== 0x30) throw new Error("certificate: not a SEQUENCE");
  let at = tbs.start;
  let field = readTlv(certDer, at, tbs.end);
  if (field.tag === 0xa0) {
    at = field.end;
    field = readTlv(certDer, at, tbs.end);
  }
  // serial, signature, issuer, validity, subject
  for (let i = 0; i < 5; i++) {
    at = field.end;
    field = readTlv(certDer, at, tbs.end);
  }
  if (field.tag !== 0x30) throw new Error("certificate: no subjectPublicKeyInfo");
  return certDer.subarray(at, field.end);
}

/**
 * The public key of a certificate (DER), accepting id-RSAES-OAEP RSA keys (see the module comment).
 * @throws Error when the certificate or its key cannot be parsed.
 */
export function certificatePublicKey(certDer: Uint8Array): KeyObject {
  const spki = normalizeRsaesOaepSpki(certificateSpki(certDer));
  return createPublicKey({ key: Buffer.from(spki), format: "der", type: "spki" });
}
