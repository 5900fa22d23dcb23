/**
 * Registrar-side verification of TPM enrolment evidence. Pure functions: no TPM, no IO (trust anchors
 * come in as PEM strings), no clock reads (`now` is passed in). Every check fails with its own stable
 * code from {@link TPM_VERIFY_ERRORS}; error messages stay generic (they cross the trust boundary),
 * details go to `cause`.
 *
 * Flow (see issue 3):
 *  1. begin:  `verifyEkCertificate` (or `checkEkAllowlisted`) → `checkEkPublic` → `checkAkPublic`
 *             → `beginActivation` (store `secret` and `nonce` with the session; send `blob`/`nonce`).
 *  2. finish: `verifyActivationAndCertify` with what the agent sent back.
 */
import "reflect-metadata";
import {
  createHash,
  type KeyObject,
  X509Certificate as NodeX509Certificate,
  randomBytes,
  timingSafeEqual,
} from "node:crypto";
import { X509Certificate } from "@peculiar/x509";
import { M2mError } from "../../core/errors.js";
import { Secret } from "../../core/secret.js";
import { decodeTpmsAttest, type TpmsAttest } from "../../tpm/attest.js";
import { ERR_TPM_STRUCT_MALFORMED } from "../../tpm/bytes.js";
import {
  attributeNames,
  TPM_ALG,
  TPM_ECC_CURVE,
  TPM_GENERATED_VALUE,
  TPM_RH_ENDORSEMENT,
  TPM_ST,
  TPMA_OBJECT,
} from "../../tpm/constants.js";
import { certificatePublicKey } from "../../tpm/ek-cert-key.js";
import { ERR_TPM_CREDENTIAL_UNSUPPORTED, makeCredential } from "../../tpm/make-credential.js";
import {
  computeName,
  computeQualifiedName,
  decodeTpm2bPublic,
  handleBytes,
  publicKeyObject,
  type TpmtPublic,
} from "../../tpm/public.js";
import { decodeTpmtSignature, verifyTpmSignature } from "../../tpm/signature.js";

/** Every code this verifier can fail with (all `permanent`). */
export const TPM_VERIFY_ERRORS = {
  /** EK certificate bytes are not a parsable X.509 certificate. */
  EK_CERT_MALFORMED: "ERR_EK_CERT_MALFORMED",
  /** EK certificate does not chain (by signature) to a configured trust anchor. */
  EK_CERT_UNTRUSTED: "ERR_EK_CERT_UNTRUSTED",
  /** EK certificate (or a certificate of its chain) is not valid at `now`. */
  EK_CERT_EXPIRED: "ERR_EK_CERT_EXPIRED",
  /** EK public sent by the agent differs from the key in the EK certificate. */
  EK_PUBLIC_MISMATCH: "ERR_EK_PUBLIC_MISMATCH",
  /** EK public is on no operator allowlist. */
  EK_NOT_ALLOWED: "ERR_EK_NOT_ALLOWED",
  /** EK is not usable as a credential protector (not a restricted AES-CFB decryption key). */
  EK_UNSUITABLE: "ERR_EK_UNSUITABLE",
  AK_ATTRIBUTES: "ERR_AK_ATTRIBUTES",
  AK_ALGORITHM: "ERR_AK_ALGORITHM",
  AK_NAMEALG: "ERR_AK_NAMEALG",
  CREDENTIAL_SECRET_MISMATCH: "ERR_CREDENTIAL_SECRET_MISMATCH",
  ATTEST_SIGNATURE: "ERR_ATTEST_SIGNATURE",
  ATTEST_MAGIC: "ERR_ATTEST_MAGIC",
  ATTEST_TYPE: "ERR_ATTEST_TYPE",
  ATTEST_NONCE: "ERR_ATTEST_NONCE",
  ATTEST_SIGNER: "ERR_ATTEST_SIGNER",
  ATTEST_NAME_MISMATCH: "ERR_ATTEST_NAME_MISMATCH",
  DEVICE_KEY_ATTRIBUTES: "ERR_DEVICE_KEY_ATTRIBUTES",
  DEVICE_KEY_ALGORITHM: "ERR_DEVICE_KEY_ALGORITHM",
  TPM_STRUCT_MALFORMED: ERR_TPM_STRUCT_MALFORMED,
} as const;

export type TpmVerifyErrorCode = (typeof TPM_VERIFY_ERRORS)[keyof typeof TPM_VERIFY_ERRORS];

/** Caps on certificate input (the HTTP layer caps bodies too; these keep the verifier safe on its own). */
export const MAX_EK_CERT_BYTES = 16_384;
/** Operator trust stores of several manufacturers plus client-sent chains: generous, but bounded. */
export const MAX_INTERMEDIATES = 256;

/** Size of the activation secret and of the certify nonce (bytes). */
export const ACTIVATION_SECRET_BYTES = 32;
export const NONCE_BYTES = 32;

/** A generic, value-free failure; `detail` only travels in `cause` (for the registrar's own log). */
function reject(code: TpmVerifyErrorCode, message: string, detail?: string, cause?: unknown): M2mError {
  const inner = detail === undefined ? cause : new Error(detail, cause === undefined ? undefined : { cause });
  return new M2mError(code, "permanent", message, inner === undefined ? {} : { cause: inner });
}

/** Decodes with the codec, keeping ERR_TPM_STRUCT_MALFORMED but with a generic message and the detail as cause. */
function decodeOrReject<T>(what: string, fn: () => T): T {
  try {
    return fn();
  } catch (err) {
    throw reject(TPM_VERIFY_ERRORS.TPM_STRUCT_MALFORMED, `${what} is malformed`, undefined, err);
  }
}

const hex = (b: Uint8Array): string => Buffer.from(b).toString("hex");

function bytesEqual(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && timingSafeEqual(a, b);
}

// ───────────────────────────── EK ─────────────────────────────

/**
 * The leading DER certificate of `b`: NV indices of some TPMs are larger than the certificate and padded,
 * so trailing bytes after the outer SEQUENCE are dropped (the SEQUENCE itself is parsed strictly).
 */
function leadingDer(b: Uint8Array): Uint8Array {
  if (b.length < 4 || b[0] !== 0x30) return b;
  const first = b[1] ?? 0;
  let len = first;
  let header = 2;
  if (first & 0x80) {
    const n = first & 0x7f;
    if (n < 1 || n > 3 || b.length < 2 + n) return b;
    len = 0;
    for (let i = 0; i < n; i++) len = len * 256 + (b[2 + i] ?? 0);
    header = 2 + n;
  }
  return header + len <= b.length ? b.subarray(0, header + len) : b;
}

function parseCert(input: Uint8Array | string, what: string): X509Certificate {
  try {
    return new X509Certificate(typeof input === "string" ? input : Buffer.from(leadingDer(input)));
  } catch (err) {
    throw reject(TPM_VERIFY_ERRORS.EK_CERT_MALFORMED, `${what} is not a valid certificate`, undefined, err);
  }
}

/** Result of a successful EK certificate check. */
export interface VerifiedEkCertificate {
  /** The EK public key from the certificate. */
  readonly publicKey: KeyObject;
  /** Leaf first, trust anchor last (DER). */
  readonly chainDer: readonly Uint8Array[];
  readonly subject: string;
  readonly serialNumber: string;
}

/**
 * Verifies an EK certificate against the operator's TPM manufacturer trust anchors.
 *
 * Builds the path with `X509ChainBuilder`, then verifies every link's signature with the issuer's key,
 * requires the path to end at one of `trustAnchorsPem` (byte-exact), intermediates to be CAs, and every
 * certificate of the path to be valid at `now`. Unusual critical extensions of EK certificates (the SAN
 * dirName with TPM manufacturer OIDs 2.23.133.2.1–3, TPM-specific policies) are deliberately not refused.
 *
 * @param cert DER bytes (trailing NV padding ignored) or PEM text of the EK certificate (e.g. NV 0x01c00002).
 * @throws ERR_EK_CERT_MALFORMED, ERR_EK_CERT_UNTRUSTED, ERR_EK_CERT_EXPIRED
 */
export async function verifyEkCertificate(
  cert: Uint8Array | string,
  trustAnchorsPem: readonly string[],
  intermediatesPem: readonly string[],
  now: Date,
): Promise<VerifiedEkCertificate> {
  // Why: bounded input keeps ASN.1 parsing and path building cheap for whatever a client sends.
  if (cert.length > MAX_EK_CERT_BYTES || intermediatesPem.length > MAX_INTERMEDIATES) {
    throw reject(TPM_VERIFY_ERRORS.EK_CERT_MALFORMED, "EK certificate input is too large");
  }
  const leafParsed = parseCert(cert, "EK certificate");
  const leaf = certEntry(Buffer.from(leafParsed.rawData), "EK certificate");
  // Trust-store certificates are parsed once and cached (keyed by their PEM): the folder's anchors and
  // intermediates are the same for every enrolment of a group.
  const anchors = trustAnchorsPem.map((p) => cachedCert(p, "trust anchor"));
  const intermediates = intermediatesPem.map((p) => cachedCert(p, "intermediate certificate"));
  if (anchors.length === 0) {
    throw reject(
      TPM_VERIFY_ERRORS.EK_CERT_UNTRUSTED,
      "EK certificate is not trusted",
      "no trust anchors configured",
    );
  }
  const isAnchor = (c: CertEntry): boolean => anchors.some((a) => a.raw.equals(c.raw));
  // Why: a certificate presented as its own anchor proves no manufacturer origin.
  if (isAnchor(leaf)) {
    throw reject(
      TPM_VERIFY_ERRORS.EK_CERT_UNTRUSTED,
      "EK certificate is not trusted",
      "leaf is a trust anchor",
    );
  }
  const path = buildPath(leaf, [...intermediates, ...anchors], isAnchor);
  // Why: a path that never reaches an operator-configured anchor through valid signatures is
  // attacker-made, however well-formed (buildPath follows only links whose signature verifies).
  if (path === undefined) {
    throw reject(
      TPM_VERIFY_ERRORS.EK_CERT_UNTRUSTED,
      "EK certificate is not trusted",
      "path ends at no trust anchor",
    );
  }
  for (let i = 1; i < path.length; i++) {
    // Why: only a CA may issue certificates; a leaf key signing an "EK cert" would bypass the manufacturer.
    if (!path[i]?.cert.ca) {
      throw reject(
        TPM_VERIFY_ERRORS.EK_CERT_UNTRUSTED,
        "EK certificate is not trusted",
        `issuer ${i} is not a CA`,
      );
    }
  }
  for (const [i, c] of path.entries()) {
    // Why: an expired or not-yet-valid certificate (leaf or CA) carries no assurance at `now`.
    if (now.getTime() < c.notBefore || now.getTime() > c.notAfter) {
      throw reject(
        TPM_VERIFY_ERRORS.EK_CERT_EXPIRED,
        "EK certificate is outside its validity period",
        `cert ${i}`,
      );
    }
  }
  let publicKey: KeyObject;
  try {
    // RSA EK certificates labelled id-RSAES-OAEP instead of rsaEncryption are accepted (the key is the
    // same RSAPublicKey; OpenSSL alone refuses the OID): see src/tpm/ek-cert-key.ts.
    publicKey = certificatePublicKey(new Uint8Array(leaf.raw));
  } catch (err) {
    throw reject(TPM_VERIFY_ERRORS.EK_CERT_MALFORMED, "EK certificate key is unusable", undefined, err);
  }
  return {
    publicKey,
    chainDer: path.map((c) => new Uint8Array(c.raw)),
    subject: leafParsed.subject,
    serialNumber: leafParsed.serialNumber,
  };
}

/** A parsed certificate with what path building needs, computed once. */
interface CertEntry {
  readonly cert: NodeX509Certificate;
  readonly raw: Buffer;
  /** undefined when the key cannot be used (then it issues nothing). */
  readonly publicKey: KeyObject | undefined;
  readonly notBefore: number;
  readonly notAfter: number;
}

function certEntry(input: Buffer | string, what: string): CertEntry {
  let cert: NodeX509Certificate;
  try {
    cert = new NodeX509Certificate(input);
  } catch (err) {
    throw reject(TPM_VERIFY_ERRORS.EK_CERT_MALFORMED, `${what} is not a valid certificate`, undefined, err);
  }
  let publicKey: KeyObject | undefined;
  try {
    publicKey = cert.publicKey;
  } catch {
    publicKey = undefined;
  }
  return {
    cert,
    raw: cert.raw,
    publicKey,
    notBefore: Date.parse(cert.validFrom),
    notAfter: Date.parse(cert.validTo),
  };
}

const CERT_CACHE_MAX = 512;
const certCache = new Map<string, CertEntry>();

/** Parses a PEM certificate once; bounded (cleared when full, so client-sent chains cannot grow it). */
function cachedCert(pem: string, what: string): CertEntry {
  const hit = certCache.get(pem);
  if (hit !== undefined) return hit;
  const entry = certEntry(pem, what);
  if (certCache.size >= CERT_CACHE_MAX) certCache.clear();
  certCache.set(pem, entry);
  return entry;
}

/** Longest path considered (leaf, intermediates, anchor) and signature checks per path search. */
const MAX_PATH_LENGTH = 8;
const MAX_SIGNATURE_CHECKS = 64;

/**
 * Depth-first path building from `leaf` to a certificate `isAnchor` accepts, following only links
 * where the candidate's name/key identifiers match the child's issuer (`checkIssued`) AND the child's
 * signature verifies with the candidate's key. Bounded in depth and in signature checks, so a client
 * sending many same-named certificates cannot make it expensive.
 * @returns leaf first, anchor last; undefined when no such path exists.
 */
function buildPath(
  leaf: CertEntry,
  pool: readonly CertEntry[],
  isAnchor: (c: CertEntry) => boolean,
): CertEntry[] | undefined {
  const path: CertEntry[] = [leaf];
  let checks = 0;
  const extend = (child: CertEntry): boolean => {
    if (path.length > 1 && isAnchor(child)) return true;
    if (path.length >= MAX_PATH_LENGTH) return false;
    for (const candidate of pool) {
      if (candidate.publicKey === undefined || path.some((p) => p.raw.equals(candidate.raw))) continue;
      if (!child.cert.checkIssued(candidate.cert)) continue;
      if (++checks > MAX_SIGNATURE_CHECKS) return false;
      let signed = false;
      try {
        // Why: every link must be signed by the next certificate's key, or the path is forged.
        signed = child.cert.verify(candidate.publicKey);
      } catch {
        signed = false;
      }
      if (!signed) continue;
      path.push(candidate);
      if (extend(candidate)) return true;
      path.pop();
    }
    return false;
  };
  return extend(leaf) ? path : undefined;
}

function jwkOf(k: KeyObject): Record<string, unknown> {
  return k.export({ format: "jwk" }) as Record<string, unknown>;
}

/**
 * True when the TPM2B_PUBLIC/TPMT_PUBLIC EK and the certificate key are the same key: RSA modulus and
 * exponent, or EC curve and point, compared exactly.
 * @throws ERR_TPM_STRUCT_MALFORMED when `ekPublic` is not a valid key.
 */
export function ekPublicMatchesCert(ekPublic: TpmtPublic, certPublicKey: KeyObject): boolean {
  const a = jwkOf(decodeOrReject("EK public", () => publicKeyObject(ekPublic)));
  const b = jwkOf(certPublicKey);
  if (a.kty !== b.kty) return false;
  if (a.kty === "RSA") return a.n === b.n && a.e === b.e;
  return a.crv === b.crv && a.x === b.x && a.y === b.y;
}

/**
 * Decodes the agent's EK TPM2B_PUBLIC and, when a certificate key is given, requires it to match.
 * @throws ERR_TPM_STRUCT_MALFORMED, ERR_EK_PUBLIC_MISMATCH
 */
export function checkEkPublic(ekTpm2bPublic: Uint8Array, certPublicKey?: KeyObject): TpmtPublic {
  const ek = decodeOrReject("EK public", () => decodeTpm2bPublic(ekTpm2bPublic));
  // Why: the credential is encrypted to THIS key; it must be the one the manufacturer certified.
  if (certPublicKey !== undefined && !ekPublicMatchesCert(ek, certPublicKey)) {
    throw reject(TPM_VERIFY_ERRORS.EK_PUBLIC_MISMATCH, "EK public does not match the EK certificate");
  }
  return ek;
}

/** SHA-256 (lower-case hex) of the EK's SubjectPublicKeyInfo DER: the operator allowlist entry format. */
export function ekFingerprint(ek: TpmtPublic | KeyObject): string {
  const key =
    "type" in ek && typeof ek.type === "number" ? publicKeyObject(ek as TpmtPublic) : (ek as KeyObject);
  return createHash("sha256")
    .update(key.export({ type: "spki", format: "der" }))
    .digest("hex");
}

/**
 * Allowlist alternative to an EK certificate (TPMs without one).
 * @param allowlistHex SHA-256 hex of EK SPKI DER (case-insensitive; `openssl pkey -pubin -outform der | sha256sum`).
 * @throws ERR_EK_NOT_ALLOWED
 */
export function checkEkAllowlisted(ek: TpmtPublic, allowlistHex: readonly string[]): string {
  const fp = ekFingerprint(ek);
  // Why: without a manufacturer certificate, only an operator's explicit listing vouches for the EK.
  if (!allowlistHex.some((h) => h.trim().toLowerCase() === fp)) {
    throw reject(TPM_VERIFY_ERRORS.EK_NOT_ALLOWED, "EK is not on the allowlist");
  }
  return fp;
}

// ───────────────────────────── AK ─────────────────────────────

/** A checked AK: its decoded public area and Name. */
export interface CheckedAk {
  readonly public: TpmtPublic;
  readonly name: Uint8Array;
}

const has = (attrs: number, bit: number): boolean => (attrs & bit) !== 0;

/**
 * Checks that an AK TPM2B_PUBLIC describes a TPM-resident restricted signing key: fixedTPM, fixedParent,
 * sensitiveDataOrigin, restricted, sign set, decrypt clear; ECC P-256 with ECDSA-SHA256 or RSA-2048 with
 * RSASSA/RSAPSS-SHA256; nameAlg SHA-256. Returns its Name.
 * @throws ERR_TPM_STRUCT_MALFORMED, ERR_AK_NAMEALG, ERR_AK_ATTRIBUTES, ERR_AK_ALGORITHM
 */
export function checkAkPublic(akTpm2bPublic: Uint8Array | TpmtPublic): CheckedAk {
  const ak =
    akTpm2bPublic instanceof Uint8Array
      ? decodeOrReject("AK public", () => decodeTpm2bPublic(akTpm2bPublic))
      : akTpm2bPublic;
  const a = ak.objectAttributes;
  const attrFail = (why: string) =>
    reject(
      TPM_VERIFY_ERRORS.AK_ATTRIBUTES,
      "AK attributes are not acceptable",
      `${why}; attributes=${attributeNames(a).join("|")}`,
    );
  // Why: the Name binds every field; a weak or unknown nameAlg would let another public area share it.
  if (ak.nameAlg !== TPM_ALG.SHA256) {
    throw reject(
      TPM_VERIFY_ERRORS.AK_NAMEALG,
      "AK name algorithm is not acceptable",
      `nameAlg=0x${ak.nameAlg.toString(16)}`,
    );
  }
  // Why: fixedTPM means the private key can never leave this TPM (no duplication).
  if (!has(a, TPMA_OBJECT.fixedTPM)) throw attrFail("fixedTPM clear");
  // Why: fixedParent keeps the key under the parent it was certified under.
  if (!has(a, TPMA_OBJECT.fixedParent)) throw attrFail("fixedParent clear");
  // Why: sensitiveDataOrigin means the TPM generated the key; it was not imported from outside.
  if (!has(a, TPMA_OBJECT.sensitiveDataOrigin)) throw attrFail("sensitiveDataOrigin clear");
  // Why: only a restricted key refuses to sign data that starts with TPM_GENERATED_VALUE, so only then
  // is a TPMS_ATTEST it signed really produced by the TPM.
  if (!has(a, TPMA_OBJECT.restricted)) throw attrFail("restricted clear");
  // Why: an attestation key must be a signing key.
  if (!has(a, TPMA_OBJECT.sign)) throw attrFail("sign clear");
  // Why: a key that also decrypts could be used as a storage/decryption oracle; AKs must be single-purpose.
  if (has(a, TPMA_OBJECT.decrypt)) throw attrFail("decrypt set");
  const algFail = (why: string) =>
    reject(TPM_VERIFY_ERRORS.AK_ALGORITHM, "AK algorithm is not acceptable", why);
  const p = ak.parameters;
  // Why: a restricted signing key has no symmetric part; anything else is a different kind of object.
  if (p.symmetric.algorithm !== TPM_ALG.NULL) throw algFail("symmetric is not NULL");
  if (ak.type === TPM_ALG.ECC) {
    // Why: only P-256 with ECDSA-SHA256 is in the profile; other curves/schemes are weaker or unverified here.
    if (p.scheme.scheme !== TPM_ALG.ECDSA || p.scheme.hashAlg !== TPM_ALG.SHA256)
      throw algFail("ECC scheme is not ECDSA-SHA256");
    if (ak.parameters.curveId !== TPM_ECC_CURVE.NIST_P256) throw algFail("ECC curve is not P-256");
    if (ak.parameters.kdf.scheme !== TPM_ALG.NULL) throw algFail("ECC kdf is not NULL");
  } else {
    // Why: RSA AKs must be 2048-bit with a SHA-256 signature scheme; smaller keys or SHA-1 are too weak.
    const okScheme = p.scheme.scheme === TPM_ALG.RSASSA || p.scheme.scheme === TPM_ALG.RSAPSS;
    if (!okScheme || p.scheme.hashAlg !== TPM_ALG.SHA256)
      throw algFail("RSA scheme is not RSASSA/RSAPSS-SHA256");
    if (ak.parameters.keyBits !== 2048) throw algFail("RSA key size is not 2048");
    if (ak.parameters.exponent !== 0 && ak.parameters.exponent !== 65537)
      throw algFail("RSA exponent is not 65537");
  }
  // Why: the unique field must be a real point/modulus for the declared parameters.
  decodeOrReject("AK public", () => publicKeyObject(ak));
  return { public: ak, name: computeName(ak) };
}

// ───────────────────────────── activation ─────────────────────────────

/** What `beginActivation` hands out: keep `secret` and `nonce`; send `blob` (or its parts) and `nonce`. */
export interface ActivationChallenge {
  /** The credential the TPM must recover; compare with `verifyActivationAndCertify`. */
  readonly secret: Secret<Uint8Array>;
  /** tpm2-tools credential file (BADCC0DE…), for `tpm2_activatecredential -i`. */
  readonly blob: Uint8Array;
  /** TPM2B_ID_OBJECT contents. */
  readonly idObject: Uint8Array;
  /** TPM2B_ENCRYPTED_SECRET contents. */
  readonly encryptedSecret: Uint8Array;
  /** Fresh nonce the agent must use as TPM2_Certify qualifying data. */
  readonly nonce: Uint8Array;
}

/**
 * Creates a fresh activation challenge: a random 32-byte secret protected with MakeCredential to the EK
 * and the AK Name, plus a random 32-byte nonce. Single use: store it with a short-lived session.
 * @throws ERR_EK_UNSUITABLE when the EK cannot protect a credential; ERR_TPM_STRUCT_MALFORMED.
 */
export function beginActivation(ekPublic: TpmtPublic, akName: Uint8Array): ActivationChallenge {
  const secret = randomBytes(ACTIVATION_SECRET_BYTES);
  const nonce = randomBytes(NONCE_BYTES);
  try {
    const m = makeCredential(ekPublic, akName, secret);
    return {
      secret: new Secret(new Uint8Array(secret)),
      blob: m.blob,
      idObject: m.idObject,
      encryptedSecret: m.encryptedSecret,
      nonce: new Uint8Array(nonce),
    };
  } catch (err) {
    if (err instanceof M2mError && err.code === ERR_TPM_CREDENTIAL_UNSUPPORTED) {
      throw reject(
        TPM_VERIFY_ERRORS.EK_UNSUITABLE,
        "EK cannot be used for credential activation",
        undefined,
        err,
      );
    }
    throw reject(TPM_VERIFY_ERRORS.TPM_STRUCT_MALFORMED, "EK public is malformed", undefined, err);
  }
}

/**
 * QN(AK) for an AK created directly under the EK in the endorsement hierarchy:
 * QN(EK) = ekNameAlg ‖ H(4000000b ‖ Name(EK)); QN(AK) = akNameAlg ‖ H(QN(EK) ‖ Name(AK)).
 */
export function akQualifiedNameUnderEk(ekPublic: TpmtPublic, akPublic: TpmtPublic): Uint8Array {
  const qnEk = computeQualifiedName(handleBytes(TPM_RH_ENDORSEMENT), ekPublic);
  return computeQualifiedName(qnEk, akPublic);
}

export interface ActivationEvidence {
  /** From `beginActivation` (stored in the session). */
  readonly expectedSecret: Secret<Uint8Array> | Uint8Array;
  /** What the agent says its TPM recovered with TPM2_ActivateCredential. */
  readonly recoveredSecret: Uint8Array;
  /** The EK the challenge was made for (TPMT_PUBLIC, as decoded at begin). */
  readonly ekPublic: TpmtPublic;
  /** The AK TPM2B_PUBLIC (as received at begin). */
  readonly akPublic: Uint8Array;
  /** The nonce handed out at begin. */
  readonly nonce: Uint8Array;
  /** TPMS_ATTEST bytes exactly as the TPM signed them (TPM2_Certify `certifyInfo` contents). */
  readonly attestBytes: Uint8Array;
  /** TPMT_SIGNATURE over `attestBytes` by the AK. */
  readonly signatureBytes: Uint8Array;
  /** The device key TPM2B_PUBLIC the agent wants enrolled. */
  readonly devicePublic: Uint8Array;
}

/** A verified device key: the enrolment may proceed with it. */
export interface VerifiedDeviceKey {
  readonly akName: Uint8Array;
  readonly deviceName: Uint8Array;
  readonly devicePublic: TpmtPublic;
  /** The device public key (for the certificate the registrar issues). */
  readonly deviceKey: KeyObject;
  readonly attest: TpmsAttest;
}

/**
 * Finishes TPM enrolment: checks the recovered credential secret and a TPM2_Certify of the device key by
 * the AK. Checks run in this order, each with its own code: secret; AK public (as in `checkAkPublic`);
 * structures decode; signature by the AK with the AK's scheme; magic; type == certify; extraData ==
 * nonce; qualifiedSigner == QN(AK under the EK) (exactly; a bare Name(AK) is refused, since a TPM always
 * reports the qualified name: the agent must create its AK directly under the EK); attested name ==
 * Name(device public); device key attributes; device key algorithm.
 *
 * @throws ERR_CREDENTIAL_SECRET_MISMATCH, ERR_AK_*, ERR_TPM_STRUCT_MALFORMED, ERR_ATTEST_SIGNATURE,
 *   ERR_ATTEST_MAGIC, ERR_ATTEST_TYPE, ERR_ATTEST_NONCE, ERR_ATTEST_SIGNER, ERR_ATTEST_NAME_MISMATCH,
 *   ERR_DEVICE_KEY_ATTRIBUTES, ERR_DEVICE_KEY_ALGORITHM
 */
export function verifyActivationAndCertify(ev: ActivationEvidence): VerifiedDeviceKey {
  const expected = ev.expectedSecret instanceof Secret ? ev.expectedSecret.reveal() : ev.expectedSecret;
  // Why: only the TPM holding the EK private key AND the AK with this Name can recover the secret; the
  // length is checked first because timingSafeEqual needs equal lengths.
  if (
    expected.length === 0 ||
    ev.recoveredSecret.length !== expected.length ||
    !timingSafeEqual(expected, ev.recoveredSecret)
  ) {
    throw reject(TPM_VERIFY_ERRORS.CREDENTIAL_SECRET_MISMATCH, "credential activation failed");
  }
  const ak = checkAkPublic(ev.akPublic);
  const devicePublic = decodeOrReject("device public", () => decodeTpm2bPublic(ev.devicePublic));
  const sig = decodeOrReject("attestation signature", () => decodeTpmtSignature(ev.signatureBytes));
  const attest = decodeOrReject("attestation", () => decodeTpmsAttest(ev.attestBytes));

  // Why: the attestation is only evidence if the activated (restricted) AK signed exactly these bytes.
  const v = verifyTpmSignature(ak.public, ev.attestBytes, sig);
  if (!v.ok) throw reject(TPM_VERIFY_ERRORS.ATTEST_SIGNATURE, "attestation signature is invalid", v.reason);
  // Why: TPM_GENERATED_VALUE marks data the TPM built itself (a restricted AK refuses to sign it otherwise).
  if (attest.magic !== TPM_GENERATED_VALUE) {
    throw reject(TPM_VERIFY_ERRORS.ATTEST_MAGIC, "attestation is not TPM-generated");
  }
  // Why: a quote or another attestation type says nothing about the device key.
  if (attest.type !== TPM_ST.ATTEST_CERTIFY || attest.attested.kind !== "certify") {
    throw reject(
      TPM_VERIFY_ERRORS.ATTEST_TYPE,
      "attestation is not a certification",
      `type=0x${attest.type.toString(16)}`,
    );
  }
  // Why: extraData must be this session's nonce, or an old certification could be replayed.
  if (ev.nonce.length === 0 || !bytesEqual(attest.extraData, ev.nonce)) {
    throw reject(TPM_VERIFY_ERRORS.ATTEST_NONCE, "attestation is not for this session");
  }
  // Why: the TPM names the signer by its qualified name; it must be the activated AK under this EK.
  const expectedSigner = akQualifiedNameUnderEk(ev.ekPublic, ak.public);
  if (!bytesEqual(attest.qualifiedSigner, expectedSigner)) {
    throw reject(
      TPM_VERIFY_ERRORS.ATTEST_SIGNER,
      "attestation signer is not the activated AK",
      `got ${hex(attest.qualifiedSigner)}`,
    );
  }
  const deviceName = decodeOrReject("device public", () => computeName(devicePublic));
  // Why: the certified object must be exactly the public key the agent asks us to enrol.
  if (!bytesEqual(attest.attested.name, deviceName)) {
    throw reject(TPM_VERIFY_ERRORS.ATTEST_NAME_MISMATCH, "certified key is not the submitted device key");
  }
  checkDeviceKey(devicePublic);
  return {
    akName: ak.name,
    deviceName,
    devicePublic,
    deviceKey: decodeOrReject("device public", () => publicKeyObject(devicePublic)),
    attest,
  };
}

/**
 * Device key policy: fixedTPM, fixedParent, sensitiveDataOrigin, sign, userWithAuth set; restricted and
 * decrypt clear; ECC P-256 (scheme NULL or ECDSA-SHA256) or RSA-2048 (scheme NULL, RSASSA or RSAPSS with
 * SHA-256); nameAlg SHA-256.
 * @throws ERR_DEVICE_KEY_ATTRIBUTES, ERR_DEVICE_KEY_ALGORITHM, ERR_TPM_STRUCT_MALFORMED
 */
export function checkDeviceKey(k: TpmtPublic): void {
  const a = k.objectAttributes;
  const attrFail = (why: string) =>
    reject(
      TPM_VERIFY_ERRORS.DEVICE_KEY_ATTRIBUTES,
      "device key attributes are not acceptable",
      `${why}; attributes=${attributeNames(a).join("|")}`,
    );
  // Why: fixedTPM: the device identity can never be exported or duplicated to another TPM.
  if (!has(a, TPMA_OBJECT.fixedTPM)) throw attrFail("fixedTPM clear");
  // Why: fixedParent: the key cannot be re-parented (duplicated) under another key.
  if (!has(a, TPMA_OBJECT.fixedParent)) throw attrFail("fixedParent clear");
  // Why: sensitiveDataOrigin: generated inside the TPM, never known outside it.
  if (!has(a, TPMA_OBJECT.sensitiveDataOrigin)) throw attrFail("sensitiveDataOrigin clear");
  // Why: the device identity key signs (JWS, CSRs, TLS).
  if (!has(a, TPMA_OBJECT.sign)) throw attrFail("sign clear");
  // Why: a restricted key cannot sign external digests (JWS/TLS); it would also blur AK and device roles.
  if (has(a, TPMA_OBJECT.restricted)) throw attrFail("restricted set");
  // Why: a single-purpose signing key cannot be abused as a decryption oracle.
  if (has(a, TPMA_OBJECT.decrypt)) throw attrFail("decrypt set");
  // Why: the agent uses the key with its auth value; a policy-only key would not be usable as enrolled.
  if (!has(a, TPMA_OBJECT.userWithAuth)) throw attrFail("userWithAuth clear");
  const algFail = (why: string) =>
    reject(TPM_VERIFY_ERRORS.DEVICE_KEY_ALGORITHM, "device key algorithm is not acceptable", why);
  // Why: the certified Name is only as strong as its hash; SHA-256 is the profile.
  if (k.nameAlg !== TPM_ALG.SHA256) throw algFail(`nameAlg=0x${k.nameAlg.toString(16)}`);
  const p = k.parameters;
  if (p.symmetric.algorithm !== TPM_ALG.NULL) throw algFail("symmetric is not NULL");
  if (k.type === TPM_ALG.ECC) {
    // Why: ES256 (P-256, SHA-256) is what the relay and the CA accept.
    if (k.parameters.curveId !== TPM_ECC_CURVE.NIST_P256) throw algFail("ECC curve is not P-256");
    const s = p.scheme;
    if (!(s.scheme === TPM_ALG.NULL || (s.scheme === TPM_ALG.ECDSA && s.hashAlg === TPM_ALG.SHA256))) {
      throw algFail("ECC scheme is not NULL or ECDSA-SHA256");
    }
  } else {
    // Why: RSA below 2048 bits is too weak; larger sizes are not in the profile.
    if (k.parameters.keyBits !== 2048) throw algFail("RSA key size is not 2048");
    if (k.parameters.exponent !== 0 && k.parameters.exponent !== 65537)
      throw algFail("RSA exponent is not 65537");
    const s = p.scheme;
    const ok =
      s.scheme === TPM_ALG.NULL ||
      ((s.scheme === TPM_ALG.RSASSA || s.scheme === TPM_ALG.RSAPSS) && s.hashAlg === TPM_ALG.SHA256);
    if (!ok) throw algFail("RSA scheme is not NULL or RSASSA/RSAPSS-SHA256");
  }
  decodeOrReject("device public", () => publicKeyObject(k));
}
