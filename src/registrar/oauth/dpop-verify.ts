import { createHmac, randomBytes } from "node:crypto";
import { base64url, type JWK } from "jose";
import type { Clock } from "../../core/clock.js";
import { refusal } from "./errors.js";
import {
  algFitsKey,
  isAllowedAlg,
  isObject,
  jwkThumbprint,
  publicKeyOf,
  refuseExtensions,
  sha256b64u,
  splitCompact,
  verifyCompactSignature,
} from "./jws-util.js";
import type { ReplayGuard } from "./replay-cache.js";

export interface DpopCheck {
  readonly method: string;
  /** The request URL as the server sees it (query and fragment are ignored). */
  readonly url: string;
  /** The access token presented with the proof (resource requests): `ath` must match. */
  readonly accessToken?: string;
  /** When set, `nonce` must be one this issuer accepts. */
  readonly nonces?: DpopNonceIssuer;
}

export interface DpopPolicy {
  /** How old a proof's iat may be, seconds. */
  readonly maxAgeSec: number;
  readonly skewSec: number;
}

export const DEFAULT_DPOP_POLICY: DpopPolicy = { maxAgeSec: 60, skewSec: 30 };

/**
 * Stateless server nonces (RFC 9449 §8): HMAC of the time window; the current and previous windows
 * are accepted so a nonce stays good for at least one full window.
 */
export class DpopNonceIssuer {
  readonly #secret: Buffer;
  readonly #clock: Clock;
  readonly #windowSec: number;

  /** `secret`: shared by every replica (from the store) so a nonce from one is accepted by all. */
  constructor(clock: Clock, windowSec = 300, secret: Buffer = randomBytes(32)) {
    this.#clock = clock;
    this.#windowSec = windowSec;
    this.#secret = secret;
  }

  #at(window: number): string {
    return base64url.encode(createHmac("sha256", this.#secret).update(String(window)).digest());
  }

  current(): string {
    return this.#at(Math.floor(this.#clock.nowSeconds() / this.#windowSec));
  }

  accepts(nonce: string): boolean {
    const w = Math.floor(this.#clock.nowSeconds() / this.#windowSec);
    return nonce === this.#at(w) || nonce === this.#at(w - 1);
  }
}

/**
 * Refuses an embedded DPoP key whose own metadata forbids verifying this proof with it (RFC 7517
 * §4.2-4.4: `use`, `key_ops`, `alg` restrict what a key may be used for), and a malformed `ext`.
 * @throws ERR_DPOP_JWK_USE, ERR_DPOP_JWK_KEY_OPS, ERR_DPOP_JWK_ALG, ERR_DPOP_JWK.
 */
function checkJwkUsage(jwk: Record<string, unknown>, headerAlg: string): void {
  // Why: a key published for encryption (use "enc") must not authenticate anything.
  if (jwk.use !== undefined && jwk.use !== "sig") {
    throw refusal("ERR_DPOP_JWK_USE", "invalid_dpop_proof", 'proof jwk "use" is not "sig"');
  }
  const ops = jwk.key_ops;
  // Why: key_ops lists what the key may do; a public key may only verify, and only once-listed
  // (jose/WebCrypto refuse duplicates, other operations, and a list without "verify").
  if (ops !== undefined && !(Array.isArray(ops) && ops.length === 1 && ops[0] === "verify")) {
    throw refusal(
      "ERR_DPOP_JWK_KEY_OPS",
      "invalid_dpop_proof",
      'proof jwk "key_ops" does not allow "verify"',
    );
  }
  // Why: a key bound to one algorithm must not be used with another (cross-algorithm attacks).
  if (jwk.alg !== undefined && jwk.alg !== headerAlg) {
    throw refusal("ERR_DPOP_JWK_ALG", "invalid_dpop_proof", 'proof jwk "alg" does not match the header alg');
  }
  // Why: a malformed member means a malformed key; jose refuses a non-boolean ext.
  if (jwk.ext !== undefined && typeof jwk.ext !== "boolean") {
    throw refusal("ERR_DPOP_JWK", "invalid_dpop_proof", 'proof jwk "ext" is not a boolean');
  }
}

/**
 * Normalises a URL for htu comparison (WHATWG URL parsing: scheme/host case, default port, dot
 * segments, percent-encoding): the whole URI without query and fragment.
 */
export function htuOf(url: string | URL): string {
  const u = new URL(url.toString());
  // Why: RFC 9449 §4.3 ignores only query and fragment; userinfo is part of the URI and must match.
  u.search = "";
  u.hash = "";
  return u.href;
}

/**
 * Verifies a DPoP proof JWT (RFC 9449 §4.3) and returns the JWK thumbprint of its key. Each failure
 * has its own code (`ERR_DPOP_*`); a missing or stale nonce maps to use_dpop_nonce.
 */
export async function verifyDpopProof(
  proof: string,
  check: DpopCheck,
  deps: {
    replay: ReplayGuard;
    clock: Clock;
    policy?: DpopPolicy;
    /**
     * Do not record the jti yet: the caller calls `recordReplay()` once the request is otherwise
     * authenticated, so unauthenticated floods of self-signed proofs cannot fill the replay cache.
     */
    deferReplay?: boolean;
  },
): Promise<{ jkt: string; jwk: JWK; recordReplay: () => Promise<void> }> {
  const policy = deps.policy ?? DEFAULT_DPOP_POLICY;
  const { header, payload } = splitCompact(proof, "ERR_DPOP");
  // Security: the typ keeps other JWTs (assertions, access tokens) from passing as proofs.
  if (header.typ !== "dpop+jwt") throw refusal("ERR_DPOP_TYP", "invalid_dpop_proof", "typ must be dpop+jwt");
  // Security: explicit allowlist: no `none`, no HMAC (a proof must be asymmetric to prove possession).
  if (!isAllowedAlg(header.alg)) throw refusal("ERR_DPOP_ALG", "invalid_dpop_proof", "proof alg not allowed");
  const jwk = header.jwk;
  // Security: the embedded public JWK is the one place a key may come from; private parts are refused.
  if (!isObject(jwk) || "d" in jwk || "p" in jwk || "k" in jwk || (jwk.kty !== "EC" && jwk.kty !== "RSA")) {
    throw refusal("ERR_DPOP_JWK", "invalid_dpop_proof", "proof jwk missing or not a public key");
  }
  // Security: only the embedded jwk is allowed; a pointer to a key (jku/x5u/x5c) is ambiguous.
  if ("jku" in header || "x5c" in header || "x5u" in header) {
    throw refusal("ERR_DPOP_HEADER_KEY", "invalid_dpop_proof", "proof header carries a key reference");
  }
  refuseExtensions(header, "ERR_DPOP", "invalid_dpop_proof");
  checkJwkUsage(jwk, header.alg);
  let key: ReturnType<typeof publicKeyOf>;
  try {
    key = publicKeyOf(jwk as JWK);
  } catch (err) {
    throw refusal("ERR_DPOP_JWK", "invalid_dpop_proof", "proof jwk unusable", err);
  }
  if (!algFitsKey(header.alg, key))
    throw refusal("ERR_DPOP_ALG", "invalid_dpop_proof", "alg does not fit jwk");
  try {
    await verifyCompactSignature(proof, header, header.alg, key);
  } catch (err) {
    throw refusal("ERR_DPOP_SIGNATURE", "invalid_dpop_proof", "proof signature invalid", err);
  }
  // Security: a proof is bound to one method and one URL; elsewhere it is worthless.
  if (payload.htm !== check.method.toUpperCase())
    throw refusal("ERR_DPOP_HTM", "invalid_dpop_proof", "htm mismatch");
  let htuOk = false;
  try {
    htuOk = typeof payload.htu === "string" && htuOf(payload.htu) === htuOf(check.url);
  } catch {
    htuOk = false;
  }
  if (!htuOk) throw refusal("ERR_DPOP_HTU", "invalid_dpop_proof", "htu mismatch");
  const now = deps.clock.nowSeconds();
  const exp = payload.exp;
  // Why: RFC 9449 makes exp optional, but a proof its signer declared expired must not be honoured
  // while its iat is still fresh (jose refuses it too; same tolerance as iat).
  if (exp !== undefined && typeof exp !== "number") {
    throw refusal("ERR_DPOP_EXP", "invalid_dpop_proof", "proof exp is not a number");
  }
  if (exp !== undefined && exp <= now - policy.skewSec) {
    throw refusal("ERR_DPOP_EXPIRED", "invalid_dpop_proof", "proof expired (exp)");
  }
  const nbf = payload.nbf;
  // Why: a proof whose signer said "not before" a future time is not yet valid (precomputed proofs).
  if (nbf !== undefined && (typeof nbf !== "number" || nbf > now + policy.skewSec)) {
    throw refusal("ERR_DPOP_NBF", "invalid_dpop_proof", "proof not yet valid (nbf)");
  }
  const iat = payload.iat;
  // Security: proofs are short-lived; an old or future-dated one could have been captured/precomputed.
  if (
    typeof iat !== "number" ||
    iat > now + policy.skewSec ||
    iat < now - policy.maxAgeSec - policy.skewSec
  ) {
    throw refusal("ERR_DPOP_IAT", "invalid_dpop_proof", "proof iat outside the accepted window");
  }
  const jti = payload.jti;
  if (typeof jti !== "string" || jti.length < 8 || jti.length > 256) {
    throw refusal("ERR_DPOP_JTI", "invalid_dpop_proof", "proof jti missing or malformed");
  }
  if (check.accessToken !== undefined) {
    // Security: ath binds the proof to this access token, so a proof cannot be paired with another.
    if (payload.ath !== sha256b64u(check.accessToken)) {
      throw refusal("ERR_DPOP_ATH", "invalid_dpop_proof", "ath does not match the access token");
    }
  }
  if (check.nonces !== undefined) {
    // Security: server nonces bound how far in advance a stolen-key holder can precompute proofs.
    if (typeof payload.nonce !== "string" || !check.nonces.accepts(payload.nonce)) {
      throw refusal("ERR_DPOP_NONCE", "use_dpop_nonce", "proof nonce missing or stale");
    }
  }
  const jkt = jwkThumbprint(jwk as JWK);
  const recordReplay = async (): Promise<void> => {
    // Security: each proof is single-use within its acceptance window.
    if (
      !(await deps.replay.checkAndRecord(
        `p|${jkt}|${jti}`,
        iat + policy.maxAgeSec + policy.skewSec,
        deps.clock.nowSeconds(),
      ))
    ) {
      throw refusal("ERR_DPOP_REPLAY", "invalid_dpop_proof", "proof already used");
    }
  };
  if (deps.deferReplay !== true) await recordReplay();
  else if (await deps.replay.has(`p|${jkt}|${jti}`, now)) {
    throw refusal("ERR_DPOP_REPLAY", "invalid_dpop_proof", "proof already used");
  }
  return { jkt, jwk: jwk as JWK, recordReplay };
}
