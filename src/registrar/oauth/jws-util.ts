import {
  constants,
  createHash,
  createPublicKey,
  type KeyObject,
  type VerifyKeyObjectInput,
  verify,
} from "node:crypto";
import type { JWK, ProtectedHeaderParameters } from "jose";
import { type OAuthErrorValue, refusal } from "./errors.js";

/** The only JWS algorithms accepted anywhere on the token path (no `none`, no HMAC). */
export const ALLOWED_ALGS = ["ES256", "RS256", "PS256"] as const;
export type AllowedAlg = (typeof ALLOWED_ALGS)[number];

export function isAllowedAlg(alg: unknown): alg is AllowedAlg {
  return typeof alg === "string" && (ALLOWED_ALGS as readonly string[]).includes(alg);
}

/** Header members that carry or point to a key. */
export const KEY_HEADER_MEMBERS = ["jwk", "jku", "x5c", "x5u", "x5t", "x5t#S256"] as const;

/** Strict unpadded base64url (RFC 7515 §2): Buffer's decoder alone would skip stray characters. */
const B64U = /^[A-Za-z0-9_-]*$/;
const SIGNING_INPUT = /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/;

function isB64u(part: string): boolean {
  return part.length % 4 !== 1 && B64U.test(part);
}

/**
 * Strict UTF-8 (as jose's own decoder): malformed byte sequences are an error, never U+FFFD. `ignoreBOM`
 * keeps a leading byte-order mark in the text, so JSON.parse refuses it (jose strips it: we are stricter).
 */
const STRICT_UTF8 = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });

/**
 * Decodes a compact JWS header and claims without verifying (verification follows).
 * @throws `${prefix}_MALFORMED` (not three strict-base64url segments, not JSON objects, too large),
 *   `${prefix}_UTF8` (header or claims bytes are not well-formed UTF-8).
 */
export function splitCompact(
  jws: string,
  prefix: "ERR_ASSERTION" | "ERR_DPOP",
): { header: ProtectedHeaderParameters; payload: Record<string, unknown> } {
  if (typeof jws !== "string" || jws.length > 16_384)
    throw refusal(`${prefix}_MALFORMED` as const, "invalid_request", "JWT too large");
  const parts = jws.split(".");
  if (parts.length !== 3)
    throw refusal(`${prefix}_MALFORMED` as const, "invalid_request", "not a compact JWS");
  const [h = "", p = "", s = ""] = parts;
  // Why: one canonical spelling per segment (no padding, whitespace or '+/'), so what is parsed is
  // exactly what was signed and the signature segment cannot be re-spelt. (An empty signature is left
  // to the alg / signature checks, which refuse it with their own codes.)
  if (h === "" || !isB64u(h) || !isB64u(p) || !isB64u(s)) {
    throw refusal(`${prefix}_MALFORMED` as const, "invalid_request", "JWT segments are not strict base64url");
  }
  let headerText: string;
  let payloadText: string;
  try {
    // Why: lenient decoding maps different byte strings to the same text (U+FFFD), so claims would
    // not be exactly what was signed; jose refuses them too.
    headerText = STRICT_UTF8.decode(Buffer.from(h, "base64url"));
    payloadText = STRICT_UTF8.decode(Buffer.from(p, "base64url"));
  } catch (err) {
    throw refusal(
      `${prefix}_UTF8` as const,
      "invalid_request",
      "JWT header or claims are not valid UTF-8",
      err,
    );
  }
  try {
    const header = JSON.parse(headerText) as unknown;
    const payload = JSON.parse(payloadText) as unknown;
    if (!isObject(header) || !isObject(payload)) throw new Error("not objects");
    return { header: header as ProtectedHeaderParameters, payload };
  } catch (err) {
    throw refusal(
      `${prefix}_MALFORMED` as const,
      "invalid_request",
      "JWT header or claims are not JSON objects",
      err,
    );
  }
}

/**
 * Refuses `crit` and `b64` (RFC 7515 §4.1.11, RFC 7797): we implement no extension, so a critical one
 * must be refused, never ignored; `b64` without `crit` is refused too (it could only confuse).
 * @throws `${prefix}_CRIT`.
 */
export function refuseExtensions(
  header: ProtectedHeaderParameters,
  prefix: "ERR_ASSERTION" | "ERR_DPOP",
  oauthError: OAuthErrorValue,
): void {
  // Why: b64:false changes what is signed; an unknown critical extension changes what is meant.
  if ("crit" in header || "b64" in header) {
    throw refusal(`${prefix}_CRIT`, oauthError, "JWS extensions (crit, b64) are not supported");
  }
}

/**
 * Verifies a compact JWS signature with node:crypto on a cached public KeyObject: the same checks
 * jose's compactVerify makes for our inputs, without jose/WebCrypto's per-call algorithm
 * normalisation and key handling (≈40% of the token endpoint's CPU before). The caller has already
 * decoded the header with `splitCompact`, allowlisted `alg` and matched it to the key (`algFitsKey`).
 * @throws Error (mapped by the caller to its `*_SIGNATURE` code) when the signature does not verify.
 */
export async function verifyCompactSignature(
  jws: string,
  header: ProtectedHeaderParameters,
  alg: AllowedAlg,
  key: KeyObject,
): Promise<void> {
  // Security: a `crit` extension (e.g. b64:false, which changes what is signed) we do not implement
  // must be refused, never ignored (RFC 7515 §4.1.11).
  if ("crit" in header || "b64" in header) throw new Error("unsupported crit / b64 header");
  // Security: never verify with anything but the allowlisted algorithm on a key of its own type.
  if (header.alg !== alg || !algFitsKey(alg, key)) throw new Error("alg does not fit the key");
  const dot = jws.lastIndexOf(".");
  const signingInput = jws.slice(0, dot);
  const sigPart = jws.slice(dot + 1);
  // Security: exactly header.payload.signature in strict base64url, whatever the caller checked.
  if (!SIGNING_INPUT.test(signingInput)) throw new Error("JWS is not compact base64url");
  if (sigPart === "" || !isB64u(sigPart)) throw new Error("signature is not base64url");
  const sig = Buffer.from(sigPart, "base64url");
  const data = Buffer.from(signingInput, "latin1");
  let opts: VerifyKeyObjectInput;
  if (alg === "ES256") {
    // Security: JWS ES256 signatures are exactly r‖s (64 bytes); DER or other lengths are refused.
    if (sig.length !== 64) throw new Error("ES256 signature must be 64 bytes");
    opts = { key, dsaEncoding: "ieee-p1363" };
  } else if (alg === "RS256") {
    opts = { key, padding: constants.RSA_PKCS1_PADDING };
  } else {
    opts = { key, padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: constants.RSA_PSS_SALTLEN_DIGEST };
  }
  // The callback form runs in libuv's thread pool: the event loop keeps parsing and answering
  // other requests meanwhile (the token endpoint is otherwise bound to one core).
  const ok = await new Promise<boolean>((resolve, reject) =>
    verify("sha256", data, opts, sig, (err, good) => (err === null ? resolve(good) : reject(err))),
  );
  if (!ok) throw new Error("signature verification failed");
}

export function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

const keyCache = new Map<string, KeyObject>();

/** Public KeyObject for a JWK (small cache keyed by the JWK's public members). */
export function publicKeyOf(jwk: JWK): KeyObject {
  const id = `${jwk.kty}|${jwk.crv ?? ""}|${jwk.x ?? ""}|${jwk.y ?? ""}|${jwk.n ?? ""}|${jwk.e ?? ""}`;
  let key = keyCache.get(id);
  if (key === undefined) {
    const bare: JWK =
      jwk.kty === "EC"
        ? { kty: "EC", crv: jwk.crv, x: jwk.x, y: jwk.y }
        : { kty: jwk.kty, n: jwk.n, e: jwk.e };
    key = createPublicKey({ key: bare as import("node:crypto").JsonWebKey, format: "jwk" });
    if (keyCache.size > 10_000) keyCache.clear();
    keyCache.set(id, key);
  }
  return key;
}

/** Whether `alg` fits the key type (ES256 ↔ EC P-256, RS256/PS256 ↔ RSA ≥ 2048). */
export function algFitsKey(alg: AllowedAlg, key: KeyObject): boolean {
  if (alg === "ES256")
    return key.asymmetricKeyType === "ec" && key.asymmetricKeyDetails?.namedCurve === "prime256v1";
  return key.asymmetricKeyType === "rsa" && (key.asymmetricKeyDetails?.modulusLength ?? 0) >= 2048;
}

export function sha256b64u(data: string): string {
  return createHash("sha256").update(data).digest("base64url");
}

/**
 * RFC 7638 SHA-256 JWK thumbprint (EC / RSA public members, lexicographic order), computed with
 * node:crypto synchronously: jose's calculateJwkThumbprint goes through WebCrypto's async digest.
 * @throws Error when a required member is missing or not a string.
 */
export function jwkThumbprint(jwk: JWK): string {
  const str = (v: unknown): string => {
    if (typeof v !== "string" || v === "") throw new Error("JWK member missing");
    return v;
  };
  const canonical =
    jwk.kty === "EC"
      ? JSON.stringify({ crv: str(jwk.crv), kty: "EC", x: str(jwk.x), y: str(jwk.y) })
      : jwk.kty === "RSA"
        ? JSON.stringify({ e: str(jwk.e), kty: "RSA", n: str(jwk.n) })
        : undefined;
  if (canonical === undefined) throw new Error("unsupported JWK kty");
  return createHash("sha256").update(canonical, "utf8").digest("base64url");
}
