import type { KeyObject } from "node:crypto";
import { type JWTPayload, type JWTVerifyGetKey, jwtVerify } from "jose";
import type { Clock } from "../../core/clock.js";
import { type DpopNonceIssuer, verifyDpopProof } from "./dpop-verify.js";
import { refusal } from "./errors.js";
import { ALLOWED_ALGS } from "./jws-util.js";
import { ReplayCache, type ReplayGuard } from "./replay-cache.js";

export interface VerifiedAccessToken {
  readonly sub: string;
  readonly clientId: string;
  readonly scopes: readonly string[];
  readonly expiresAt: Date;
  /** Present when the token is DPoP-bound (cnf.jkt) and the proof was checked. */
  readonly jkt?: string;
  readonly claims: JWTPayload;
}

export interface AccessTokenTrust {
  readonly issuer: string;
  /** The issuer's key(s): a KeyObject, or a JWKS getter (jose createLocalJWKSet / createRemoteJWKSet). */
  readonly keys: KeyObject | JWTVerifyGetKey;
  readonly clock: Clock;
  /** DPoP proof replay cache of this resource server. */
  readonly replay?: ReplayGuard;
  readonly skewSec?: number;
}

export interface AccessTokenCheck {
  readonly audience: string;
  readonly requiredScope?: string;
  /** The request's DPoP proof, method and URL; required when the token is DPoP-bound. */
  readonly dpop?: {
    readonly proof: string;
    readonly method: string;
    readonly url: string;
    readonly nonces?: DpopNonceIssuer;
  };
}

const defaultReplay = new ReplayCache();

/**
 * Verifies an RFC 9068 access token for a resource server (the ingest endpoint, an API gateway).
 * Failures carry `ERR_ACCESS_TOKEN_*` / `ERR_DPOP_*` codes and an OAuth error value
 * (invalid_token, insufficient_scope, invalid_dpop_proof, use_dpop_nonce) in `details.oauthError`.
 */
export async function verifyAccessToken(
  token: string,
  check: AccessTokenCheck & AccessTokenTrust,
): Promise<VerifiedAccessToken> {
  const skew = check.skewSec ?? 30;
  let payload: JWTPayload;
  try {
    // Security: typ at+jwt (RFC 9068 §4) keeps ID tokens / assertions from passing as access tokens;
    // algorithms are allowlisted; iss, aud, exp are checked with a small explicit tolerance.
    const opts = {
      algorithms: [...ALLOWED_ALGS],
      typ: "at+jwt",
      issuer: check.issuer,
      audience: check.audience,
      currentDate: check.clock.now(),
      clockTolerance: skew,
      requiredClaims: ["exp", "iat", "sub", "jti", "client_id"],
    };
    const keys = check.keys;
    const result =
      typeof keys === "function" ? await jwtVerify(token, keys, opts) : await jwtVerify(token, keys, opts);
    payload = result.payload;
  } catch (err) {
    const code =
      (err as { code?: string }).code === "ERR_JWT_EXPIRED"
        ? "ERR_ACCESS_TOKEN_EXPIRED"
        : "ERR_ACCESS_TOKEN_INVALID";
    throw refusal(code, "invalid_token", "access token rejected", err);
  }
  const scopes = typeof payload.scope === "string" ? payload.scope.split(" ").filter((s) => s !== "") : [];
  // Security: least privilege is enforced here too: a token without the scope is refused.
  if (check.requiredScope !== undefined && !scopes.includes(check.requiredScope)) {
    throw refusal("ERR_ACCESS_TOKEN_SCOPE", "insufficient_scope", "access token lacks the required scope");
  }
  const cnf = payload.cnf as { jkt?: unknown } | undefined;
  let jkt: string | undefined;
  if (cnf !== undefined && typeof cnf.jkt === "string") {
    // Security: a DPoP-bound token is useless without a proof by the bound key (stolen token ≠ access).
    if (check.dpop === undefined) {
      throw refusal(
        "ERR_ACCESS_TOKEN_DPOP_REQUIRED",
        "invalid_token",
        "DPoP-bound token used without a proof",
      );
    }
    const proof = await verifyDpopProof(
      check.dpop.proof,
      {
        method: check.dpop.method,
        url: check.dpop.url,
        accessToken: token,
        ...(check.dpop.nonces === undefined ? {} : { nonces: check.dpop.nonces }),
      },
      { replay: check.replay ?? defaultReplay, clock: check.clock },
    );
    if (proof.jkt !== cnf.jkt)
      throw refusal("ERR_DPOP_KEY_MISMATCH", "invalid_dpop_proof", "proof key is not the token's key");
    jkt = proof.jkt;
  }
  return {
    sub: String(payload.sub),
    clientId: String(payload.client_id),
    scopes,
    expiresAt: new Date((payload.exp ?? 0) * 1000),
    ...(jkt === undefined ? {} : { jkt }),
    claims: payload,
  };
}

/** Parses `Authorization: Bearer x` / `DPoP x`. */
export function parseAuthorization(
  header: string | undefined,
): { scheme: "Bearer" | "DPoP"; token: string } | undefined {
  const m = /^(Bearer|DPoP) ([A-Za-z0-9\-._~+/]+=*)$/i.exec(header ?? "");
  if (m === null || m[1] === undefined || m[2] === undefined) return undefined;
  return { scheme: m[1].toLowerCase() === "dpop" ? "DPoP" : "Bearer", token: m[2] };
}
