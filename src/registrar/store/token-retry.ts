import type { TokenRow } from "./rows.js";
import type { CommitEnrolment, DeviceRecord } from "./store.js";

/**
 * Whether a commit presenting an ALREADY USED bootstrap token is the retry of the enrolment that used
 * it: a PKCS#11 device that crashed (or lost the answer) after the registrar committed its enrolment
 * asks again with the same token and the same key. Such a retry is answered like a re-enrolment (same
 * device id, role and attributes; a fresh certificate for the same key, since the first one may never
 * have arrived) instead of `ERR_TOKEN_USED`, so no device is stranded by one lost response.
 *
 * Both stores call this inside the commit transaction, with the device the token's `used_by` names.
 * The store's hardware match that follows still refuses a revoked device or another serial.
 */
export function isTokenRetry(
  token: TokenRow,
  usedBy: DeviceRecord | undefined,
  input: CommitEnrolment,
  nowMs: number,
): boolean {
  // Security: the token counts only for the group it was issued for.
  if (token.group_name !== input.group) return false;
  // Security: only the device the token enrolled may retry with it: proven by the same key (the route
  // verified the CSR signature, i.e. possession of that key); anyone else's key is a second use.
  if (usedBy === undefined || usedBy.method !== "pkcs11" || input.method !== "pkcs11") return false;
  if (usedBy.deviceId !== input.deviceId || usedBy.thumbprint !== input.thumbprint) return false;
  // Security: retries end with the token's lifetime, as the first use would have.
  return Number(token.expires_at) > nowMs;
}
