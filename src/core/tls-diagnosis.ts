import { M2mError } from "./errors.js";

/**
 * Tells a TLS verification failure apart from "unreachable". Node (OpenSSL) reports a refused peer
 * certificate with these codes somewhere in the error's cause chain (undici wraps them in
 * `TypeError: fetch failed`, mqtt.js passes them through).
 */
const VERIFY_REASONS: Readonly<Record<string, string>> = {
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: "the server certificate is not signed by a trusted CA",
  UNABLE_TO_GET_ISSUER_CERT: "the server certificate's issuer is not among the trusted CAs",
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "the server certificate's issuer is not among the trusted CAs",
  SELF_SIGNED_CERT_IN_CHAIN: "the server's chain ends in a CA that is not trusted",
  DEPTH_ZERO_SELF_SIGNED_CERT: "the server certificate is self-signed and not trusted",
  CERT_HAS_EXPIRED: "the server certificate has expired",
  CERT_NOT_YET_VALID: "the server certificate is not valid yet (check the clock)",
  CERT_SIGNATURE_FAILURE: "the server certificate's signature is invalid",
  CERT_REVOKED: "the server certificate is revoked",
  ERR_TLS_CERT_ALTNAME_INVALID: "the server certificate does not name this host",
  HOSTNAME_MISMATCH: "the server certificate does not name this host",
};

export interface TlsVerifyFailure {
  /** OpenSSL / Node code, e.g. UNABLE_TO_VERIFY_LEAF_SIGNATURE. */
  readonly code: string;
  readonly reason: string;
}

/** The verification failure inside `err` (its cause chain, AggregateError members), if any. */
export function tlsVerifyFailure(err: unknown): TlsVerifyFailure | undefined {
  const seen = new Set<unknown>();
  const queue: unknown[] = [err];
  while (queue.length > 0) {
    const e = queue.shift();
    if (e === null || typeof e !== "object" || seen.has(e)) continue;
    seen.add(e);
    const code = (e as { code?: unknown }).code;
    if (typeof code === "string" && VERIFY_REASONS[code] !== undefined)
      return { code, reason: VERIFY_REASONS[code] };
    queue.push((e as { cause?: unknown }).cause);
    const members = (e as { errors?: unknown }).errors;
    if (Array.isArray(members)) queue.push(...members);
  }
  return undefined;
}

/** What the agent trusted for a connection, for messages: the config key and its file, or the system store. */
export interface TrustSource {
  /** e.g. "enroll.registrar_ca_file /etc/m2m-agent/fleet-ca.pem + the enrolment's CA chain". */
  readonly description: string;
  /** The config key to fix. */
  readonly key: string;
}

/**
 * ERR_TLS_VERIFY naming the host, the reason and the trust used, when `err` is a verification
 * failure; undefined otherwise (the caller keeps its "unreachable" error).
 */
export function tlsVerifyError(err: unknown, url: string, trust: TrustSource): M2mError | undefined {
  const f = tlsVerifyFailure(err);
  if (f === undefined) return undefined;
  let host = url;
  try {
    host = new URL(url).host;
  } catch {
    // keep the raw string
  }
  return new M2mError(
    "ERR_TLS_VERIFY",
    "transient",
    `TLS verification of ${host} failed: ${f.reason} (${f.code}); trusted: ${trust.description}`,
    {
      cause: err,
      hint: `set ${trust.key} to the CA that issued ${host}'s certificate (\`m2m-agent doctor\` shows its issuer)`,
      details: { host, tlsCode: f.code },
    },
  );
}
