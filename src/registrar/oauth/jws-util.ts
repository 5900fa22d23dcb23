import { createHash, createPublicKey, type KeyObject, type webcrypto } from "node:crypto";
import { base64url, importJWK, type JWK, type ProtectedHeaderParameters } from "jose";
import { refusal } from "./errors.js";

/** The only JWS algorithms accepted anywhere on the token path (no `none`, no HMAC). */
export const ALLOWED_ALGS = ["ES256", "RS256", "PS256"] as const;
export type AllowedAlg = (typeof ALLOWED_ALGS)[number];

export function isAllowedAlg(alg: unknown): alg is AllowedAlg {
  return typeof alg === "string" && (ALLOWED_ALGS as readonly string[]).includes(alg);
}

/** Header members that carry or point to a key. */
export const KEY_HEADER_MEMBERS = ["jwk", "jku", "x5c", "x5u", "x5t", "x5t#S256"] as const;

/** Decodes a compact JWS header and claims without verifying (verification follows). */
export function splitCompact(
  jws: string,
  prefix: string,
): { header: ProtectedHeaderParameters; payload: Record<string, unknown> } {
  if (typeof jws !== "string" || jws.length > 16_384)
    throw refusal(`${prefix}_MALFORMED`, "invalid_request", "JWT too large");
  const parts = jws.split(".");
  if (parts.length !== 3) throw refusal(`${prefix}_MALFORMED`, "invalid_request", "not a compact JWS");
  try {
    const header = JSON.parse(new TextDecoder().decode(base64url.decode(parts[0] ?? ""))) as unknown;
    const payload = JSON.parse(new TextDecoder().decode(base64url.decode(parts[1] ?? ""))) as unknown;
    if (!isObject(header) || !isObject(payload)) throw new Error("not objects");
    return { header: header as ProtectedHeaderParameters, payload };
  } catch (err) {
    throw refusal(`${prefix}_MALFORMED`, "invalid_request", "JWT header or claims are not JSON objects", err);
  }
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
  return base64url.encode(createHash("sha256").update(data).digest());
}

const cryptoKeyCache = new Map<string, Promise<webcrypto.CryptoKey | Uint8Array>>();

/**
 * The WebCrypto key jose verifies with, imported once per (key, alg): jose converts a KeyObject on
 * every call otherwise, which costs as much as the verification itself.
 */
export function verificationKeyOf(jwk: JWK, alg: AllowedAlg): Promise<webcrypto.CryptoKey | Uint8Array> {
  const id = `${alg}|${jwk.kty}|${jwk.crv ?? ""}|${jwk.x ?? ""}|${jwk.y ?? ""}|${jwk.n ?? ""}|${jwk.e ?? ""}`;
  let key = cryptoKeyCache.get(id);
  if (key === undefined) {
    const bare: JWK =
      jwk.kty === "EC"
        ? { kty: "EC", crv: jwk.crv, x: jwk.x, y: jwk.y }
        : { kty: jwk.kty, n: jwk.n, e: jwk.e };
    key = importJWK(bare, alg);
    // Do not keep a failed import around.
    key.catch(() => cryptoKeyCache.delete(id));
    if (cryptoKeyCache.size > 10_000) cryptoKeyCache.clear();
    cryptoKeyCache.set(id, key);
  }
  return key;
}
