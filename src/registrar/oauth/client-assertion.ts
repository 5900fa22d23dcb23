import type { Clock } from "../../core/clock.js";
import type { DeviceDirectory, DirectoryDevice } from "./directory.js";
import { refusal } from "./errors.js";
import {
  ALLOWED_ALGS,
  algFitsKey,
  isAllowedAlg,
  KEY_HEADER_MEMBERS,
  publicKeyOf,
  refuseExtensions,
  splitCompact,
  verifyCompactSignature,
} from "./jws-util.js";
import type { ReplayGuard } from "./replay-cache.js";

export const JWT_BEARER_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

export interface AssertionPolicy {
  /** Accepted `aud` values: the token endpoint URL and the issuer identifier. */
  readonly audiences: readonly string[];
  /** Longest accepted exp − now (and exp − iat), seconds. */
  readonly maxLifetimeSec: number;
  /** Clock tolerance, seconds. */
  readonly skewSec: number;
}

export const DEFAULT_ASSERTION_POLICY: Omit<AssertionPolicy, "audiences"> = {
  maxLifetimeSec: 300,
  skewSec: 30,
};

/**
 * Verifies an RFC 7523 client assertion (private_key_jwt) against the device's registered key and
 * returns the device. Each failure has its own code (`ERR_ASSERTION_*`); all map to invalid_client.
 */
export async function verifyClientAssertion(
  assertion: string,
  clientIdParam: string | undefined,
  deps: { directory: DeviceDirectory; replay: ReplayGuard; clock: Clock; policy: AssertionPolicy },
): Promise<DirectoryDevice> {
  const { header, payload } = splitCompact(assertion, "ERR_ASSERTION");
  // Security: an explicit allowlist shuts out `none`, HMAC-with-the-public-key and exotic algorithms.
  if (!isAllowedAlg(header.alg)) {
    throw refusal("ERR_ASSERTION_ALG", "invalid_client", `assertion alg not in ${ALLOWED_ALGS.join(",")}`);
  }
  // Security: the key comes from the registry only; a key named by the attacker proves nothing.
  if (KEY_HEADER_MEMBERS.some((m) => m in header)) {
    throw refusal("ERR_ASSERTION_HEADER_KEY", "invalid_client", "assertion header carries a key");
  }
  refuseExtensions(header, "ERR_ASSERTION", "invalid_client");
  // Security: a DPoP proof or an access token must not be accepted as a client assertion.
  if (typeof header.typ === "string" && /^(dpop\+jwt|at\+jwt|application\/at\+jwt)$/i.test(header.typ)) {
    throw refusal("ERR_ASSERTION_TYP", "invalid_client", "wrong JWT type for a client assertion");
  }
  const sub = payload.sub;
  if (typeof sub !== "string" || sub === "")
    throw refusal("ERR_ASSERTION_SUB", "invalid_client", "sub missing");
  // Security: RFC 7523 §3: iss and sub are the client itself; the form client_id must agree.
  if (payload.iss !== sub) throw refusal("ERR_ASSERTION_ISS", "invalid_client", "iss must equal sub");
  if (clientIdParam !== undefined && clientIdParam !== sub) {
    throw refusal("ERR_ASSERTION_CLIENT_ID", "invalid_client", "client_id does not match the assertion");
  }
  const device = await deps.directory.getDevice(sub);
  if (device === undefined) throw refusal("ERR_ASSERTION_UNKNOWN_CLIENT", "invalid_client", "unknown client");
  const key = publicKeyOf(device.publicJwk);
  if (!algFitsKey(header.alg, key)) {
    throw refusal("ERR_ASSERTION_ALG", "invalid_client", "assertion alg does not fit the registered key");
  }
  try {
    // Security: only a signature by the registered key (cached KeyObject, keyed by its public
    // members, so a re-registered key is a new entry) authenticates the client.
    await verifyCompactSignature(assertion, header, header.alg, key);
  } catch (err) {
    throw refusal("ERR_ASSERTION_SIGNATURE", "invalid_client", "assertion signature invalid", err);
  }
  // Security: a revoked device must stop getting tokens immediately, whatever it signs.
  if (device.status !== "active") throw refusal("ERR_DEVICE_REVOKED", "invalid_client", "client is revoked");

  const now = deps.clock.nowSeconds();
  const { skewSec, maxLifetimeSec } = deps.policy;
  const aud = payload.aud;
  const auds = typeof aud === "string" ? [aud] : Array.isArray(aud) ? aud : [];
  // Security: an assertion made for another server must not be replayable here.
  if (!auds.some((a) => typeof a === "string" && deps.policy.audiences.includes(a))) {
    throw refusal("ERR_ASSERTION_AUD", "invalid_client", "assertion audience is not this server");
  }
  const exp = payload.exp;
  if (typeof exp !== "number" || !Number.isFinite(exp))
    throw refusal("ERR_ASSERTION_EXP", "invalid_client", "exp missing");
  // Security: expired assertions are dead; long-lived ones would defeat the bounded replay cache.
  if (exp + skewSec <= now) throw refusal("ERR_ASSERTION_EXPIRED", "invalid_client", "assertion expired");
  if (exp - now > maxLifetimeSec + skewSec) {
    throw refusal("ERR_ASSERTION_EXP_TOO_LONG", "invalid_client", "assertion lifetime too long");
  }
  const iat = payload.iat;
  if (typeof iat !== "number" || !Number.isFinite(iat))
    throw refusal("ERR_ASSERTION_IAT", "invalid_client", "iat missing");
  // Security: an assertion from the future or from long ago is refused (small explicit tolerance).
  if (iat > now + skewSec || iat < now - maxLifetimeSec - skewSec || exp - iat > maxLifetimeSec + skewSec) {
    throw refusal("ERR_ASSERTION_IAT", "invalid_client", "assertion iat outside the accepted window");
  }
  const nbf = payload.nbf;
  if (nbf !== undefined && (typeof nbf !== "number" || nbf > now + skewSec)) {
    throw refusal("ERR_ASSERTION_NBF", "invalid_client", "assertion not yet valid");
  }
  const jti = payload.jti;
  if (typeof jti !== "string" || jti.length < 8 || jti.length > 256) {
    throw refusal("ERR_ASSERTION_JTI", "invalid_client", "jti missing or malformed");
  }
  // Security: each assertion is single-use for as long as it could be accepted.
  if (!(await deps.replay.checkAndRecord(`a|${sub}|${jti}`, exp + skewSec, now))) {
    throw refusal("ERR_ASSERTION_REPLAY", "invalid_client", "assertion already used");
  }
  return device;
}
