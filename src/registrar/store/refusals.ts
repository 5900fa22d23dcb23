import { type ErrorCode, M2mError } from "../../core/errors.js";
import { SCHEMA_VERSION } from "./migrations.js";
import type { DeviceRecord, PlanEnrolment } from "./store.js";

/**
 * Backend-neutral refusal rules of the registrar stores: each store reads the rows its own way (a
 * prepared statement in a `BEGIN IMMEDIATE`, or a `FOR UPDATE` query), then asks these rules, so the
 * SQLite and PostgreSQL registries refuse the same requests with the same codes.
 */

/** A permanent, coded refusal of a store operation. */
export const refused = (code: ErrorCode, message: string): M2mError =>
  new M2mError(code, "permanent", message);

/** The database was migrated by a newer registrar than this one. */
export function schemaNewer(version: number): M2mError {
  return new M2mError(
    "ERR_STORE_SCHEMA_NEWER",
    "permanent",
    `the database schema (version ${version}) is newer than this registrar understands (${SCHEMA_VERSION})`,
    { hint: "upgrade m2m-registrar on this host; every replica must run the same or a newer release" },
  );
}

/**
 * Finds the device this hardware already is, or refuses when the request would rebind an existing
 * identity to different hardware.
 * @param byEk the device registered under `input.ekHash`, if any
 * @param byKey the device registered under `input.thumbprint`, if any
 * @throws ERR_EK_ALREADY_REGISTERED, ERR_KEY_ALREADY_REGISTERED, ERR_HARDWARE_MISMATCH, ERR_DEVICE_REVOKED
 */
export function matchHardware(
  input: PlanEnrolment,
  byEk: DeviceRecord | undefined,
  byKey: DeviceRecord | undefined,
): DeviceRecord | undefined {
  // Security: one EK is one TPM; a different device key under a registered EK would let whoever
  // holds that TPM's AK swap the identity's key without proving possession of the old one.
  if (byEk !== undefined && byEk.thumbprint !== input.thumbprint)
    throw refused("ERR_EK_ALREADY_REGISTERED", "this endorsement key is already registered");
  // Security: a key registered through another method or under another EK is another device.
  if (byKey !== undefined && (byKey.ekHash !== input.ekHash || byKey.method !== input.method))
    throw refused("ERR_KEY_ALREADY_REGISTERED", "this device key is already registered");
  const existing = byEk ?? byKey;
  if (existing === undefined) return undefined;
  // Security: a self-asserted serial that differs means the request claims other hardware.
  if (existing.hardwareSerial !== input.hardwareSerial)
    throw refused("ERR_HARDWARE_MISMATCH", "hardware does not match the registered device");
  // Security: a revoked identity stays revoked; re-enrolment must not resurrect it.
  if (existing.status === "revoked") throw refused("ERR_DEVICE_REVOKED", "the device is revoked");
  return existing;
}

/**
 * Why a rotation session cannot be taken by `deviceId` at `now` (ms), or undefined when it can.
 * @returns ERR_SESSION_UNKNOWN, ERR_SESSION_CONSUMED, ERR_ROTATION_SESSION_DEVICE or ERR_SESSION_EXPIRED
 */
export function rotationRefusal(
  row: { device_id: string; expires_at: number; consumed_at: number | null } | undefined,
  deviceId: string,
  now: number,
): M2mError | undefined {
  if (row === undefined) return refused("ERR_SESSION_UNKNOWN", "session not found");
  // Security: a replayed finish must not get a second certificate.
  if (row.consumed_at !== null) return refused("ERR_SESSION_CONSUMED", "session used");
  // Security: the nonce is another device's challenge; it is not consumed by a stranger's attempt.
  if (row.device_id !== deviceId)
    return refused("ERR_ROTATION_SESSION_DEVICE", "session belongs to another device");
  // Security: a short-lived nonce bounds how long a certification can be held back and used.
  if (Number(row.expires_at) <= now) return refused("ERR_SESSION_EXPIRED", "session expired");
  return undefined;
}

/**
 * Why an enrolment session's proof does not count at `now` (ms), or undefined when it does.
 * @returns ERR_SESSION_UNKNOWN, ERR_SESSION_CONSUMED or ERR_SESSION_EXPIRED
 */
export function sessionRefusal(
  row: { expires_at: number; consumed_at: number | null } | undefined,
  now: number,
): M2mError | undefined {
  if (row === undefined) return refused("ERR_SESSION_UNKNOWN", "enrolment session not found");
  // Security: a session's proof (secret, nonce) counts once: replay and concurrent finishes lose.
  if (row.consumed_at !== null) return refused("ERR_SESSION_CONSUMED", "enrolment session already used");
  if (Number(row.expires_at) <= now) return refused("ERR_SESSION_EXPIRED", "enrolment session expired");
  return undefined;
}
