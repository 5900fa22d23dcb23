import { type ErrorCode, M2mError } from "../../core/errors.js";

/** RFC 6749 §5.2 / RFC 9449 §12.2 error values the token endpoint answers with. */
export type OAuthErrorValue =
  | "invalid_request"
  | "invalid_client"
  | "invalid_grant"
  | "unauthorized_client"
  | "unsupported_grant_type"
  | "invalid_scope"
  | "invalid_dpop_proof"
  | "use_dpop_nonce"
  | "use_attestation_nonce"
  | "attestation_failed"
  | "invalid_token"
  | "insufficient_scope"
  | "server_error";

/**
 * A refusal with a stable internal code (`ERR_ASSERTION_AUD`, …) for logs and tests, and the generic
 * OAuth error value that is all the client gets to see.
 */
export function refusal(
  code: ErrorCode,
  oauthError: OAuthErrorValue,
  message: string,
  cause?: unknown,
): M2mError {
  return new M2mError(code, "permanent", message, {
    details: { oauthError },
    ...(cause === undefined ? {} : { cause }),
  });
}

export function oauthErrorOf(err: unknown): OAuthErrorValue {
  if (err instanceof M2mError) {
    const v = err.details.oauthError;
    if (typeof v === "string") return v as OAuthErrorValue;
  }
  return "server_error";
}

/** Generic descriptions: nothing an attacker could use (no expected values). */
export const GENERIC_DESCRIPTION: Readonly<Record<OAuthErrorValue, string>> = {
  invalid_request: "the request is malformed",
  invalid_client: "client authentication failed",
  invalid_grant: "the grant is invalid",
  unauthorized_client: "the client is not authorized for this grant",
  unsupported_grant_type: "unsupported grant_type",
  invalid_scope: "the requested scope is not allowed",
  invalid_dpop_proof: "the DPoP proof is invalid",
  use_dpop_nonce: "a DPoP nonce is required",
  use_attestation_nonce: "a TPM quote with the attestation nonce is required",
  attestation_failed: "the TPM quote was refused",
  invalid_token: "the access token is invalid",
  insufficient_scope: "the access token lacks the required scope",
  server_error: "internal error",
};
