import type { Secret } from "../../core/secret.js";

/**
 * Seams between the credential layer and its consumers (relay sinks, local API, CLI). Consumers
 * depend on these interfaces only; `OAuthClient` (client.ts) implements both.
 */

/** An access token as handed to a consumer. The token itself never prints (Secret). */
export interface AccessToken {
  readonly token: Secret;
  /** Absolute expiry (wall clock) as announced by the server (`expires_in`). */
  readonly expiresAt: Date;
  /** "Bearer" or "DPoP" (RFC 9449 §5); a DPoP token must be sent with a fresh proof per request. */
  readonly tokenType: "Bearer" | "DPoP";
  /** Granted scopes (space separated), as returned by the server or as requested when omitted. */
  readonly scope: string;
}

export interface TokenSource {
  /**
   * Returns a valid access token for `scope` (default: the configured scopes), from cache when it is
   * still fresh; concurrent callers share one request.
   * @throws ERR_OAUTH_CLIENT_REVOKED (permanent) when the server refused the device as a client;
   *   ERR_OAUTH_TOKEN (transient) when the server could not be reached after retries.
   */
  getToken(scope?: string): Promise<AccessToken>;
  /** Drops the cached token(s) so the next getToken asks the server (optional). */
  invalidate?(scope?: string): void;
}

export interface DpopSigner {
  /**
   * A DPoP proof JWT (RFC 9449 §4) for one request, signed by the device key. `url` is reduced to
   * origin + path (no query, no fragment); `accessToken` adds `ath`. The latest server nonce for the
   * URL's origin is included automatically.
   */
  proof(method: string, url: string | URL, accessToken?: Secret | string): Promise<string>;
  /** Records a `DPoP-Nonce` the server sent (from any response), keyed by origin. */
  rememberNonce(url: string | URL, nonce: string): void;
}

/** Health as reported by the credential layer to the daemon's health/doctor. */
export interface CredentialHealth {
  readonly ok: boolean;
  /** Stable error code when not ok (e.g. ERR_OAUTH_CLIENT_REVOKED). */
  readonly code?: string;
  readonly detail: string;
}

/**
 * Builds the Authorization (and DPoP) headers for a protected-resource request. Convenience for
 * sinks: `{ authorization: "DPoP <at>", dpop: "<proof>" }` or `{ authorization: "Bearer <at>" }`.
 * The returned record holds the token in clear: put it on the wire, never in a log.
 */
export async function authorizationHeaders(
  token: AccessToken,
  dpop: DpopSigner | undefined,
  method: string,
  url: string | URL,
): Promise<Record<string, string>> {
  if (token.tokenType === "DPoP") {
    if (dpop === undefined) throw new TypeError("a DPoP-bound token needs a DpopSigner");
    return {
      authorization: `DPoP ${token.token.reveal()}`,
      dpop: await dpop.proof(method, url, token.token),
    };
  }
  return { authorization: `Bearer ${token.token.reveal()}` };
}
