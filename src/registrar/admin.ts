import { randomBytes } from "node:crypto";
import { resolve } from "node:path";
import { type Clock, systemClock } from "../core/clock.js";
import { M2mError } from "../core/errors.js";
import { Secret } from "../core/secret.js";
import { attributesSchema, type EnrolmentMethod } from "../wire/v1/index.js";
import { hashBootstrapToken } from "./enrolment/pkcs11-route.js";
import type { BootstrapTokenRecord, DeviceRecord, EnrolmentGroup, RegistrarStore } from "./store/index.js";

/**
 * Operator actions shared by the `m2m-registrar` CLI, tests and demos. The store enforces
 * atomicity; these functions validate operator input and generate secrets.
 */

export interface AddGroupInput {
  readonly name: string;
  readonly role: string;
  readonly attributes?: Record<string, string>;
  readonly methods: readonly EnrolmentMethod[];
  readonly ekTrustDir?: string | undefined;
  readonly ekAllow?: readonly string[];
}

const NAME = /^[A-Za-z0-9._:@/+-]{1,64}$/;

/** @throws ERR_GROUP_INVALID, ERR_GROUP_EXISTS */
export async function addEnrolmentGroup(
  store: RegistrarStore,
  input: AddGroupInput,
  clock: Clock = systemClock,
): Promise<EnrolmentGroup> {
  const bad = (m: string): M2mError => new M2mError("ERR_GROUP_INVALID", "permanent", m);
  if (!NAME.test(input.name)) throw bad("group name must be 1-64 printable characters without spaces");
  if (!NAME.test(input.role)) throw bad("role must be 1-64 printable characters without spaces");
  if (input.methods.length === 0) throw bad("at least one enrolment method is required");
  const attributes = attributesSchema.safeParse(input.attributes ?? {});
  if (!attributes.success) throw bad("attributes: at most 32, keys printable, values ≤ 256 characters");
  const ekAllow = (input.ekAllow ?? []).map((h) => h.trim().toLowerCase());
  for (const h of ekAllow)
    if (!/^[0-9a-f]{64}$/.test(h)) throw bad("--ek-allow takes SHA-256 hex fingerprints");
  if (input.methods.includes("tpm") && input.ekTrustDir === undefined && ekAllow.length === 0) {
    throw bad("a TPM group needs --ek-trust-dir or --ek-allow");
  }
  return await store.addGroup({
    name: input.name,
    role: input.role,
    attributes: attributes.data,
    methods: [...new Set(input.methods)],
    // Stored absolute: the server may run with another working directory than the operator's shell.
    ekTrustDir: input.ekTrustDir === undefined ? undefined : resolve(input.ekTrustDir),
    ekAllow,
    createdAt: clock.now(),
  });
}

/**
 * Creates a one-time bootstrap token bound to a group. The token is returned once (as a Secret);
 * only its SHA-256 is stored.
 * @throws ERR_GROUP_UNKNOWN, ERR_TOKEN_TTL
 */
export async function createBootstrapToken(
  store: RegistrarStore,
  group: string,
  ttlSeconds: number,
  clock: Clock = systemClock,
): Promise<{ token: Secret; record: BootstrapTokenRecord }> {
  if (!Number.isFinite(ttlSeconds) || ttlSeconds <= 0 || ttlSeconds > 366 * 86_400) {
    throw new M2mError("ERR_TOKEN_TTL", "permanent", "token TTL must be between 1 s and 366 days");
  }
  if ((await store.getGroup(group)) === undefined) {
    throw new M2mError("ERR_GROUP_UNKNOWN", "permanent", `enrolment group ${group} does not exist`);
  }
  // 256 bits of randomness; base64url so it survives files, env vars and systemd credentials.
  const value = `m2mbt_${randomBytes(32).toString("base64url")}`;
  const now = clock.now();
  const hash = hashBootstrapToken(value);
  const expiresAt = new Date(now.getTime() + ttlSeconds * 1000);
  await store.addBootstrapToken({ hash, group, expiresAt, createdAt: now });
  return {
    token: new Secret(value),
    record: {
      hash,
      group,
      expiresAt,
      createdAt: now,
      usedAt: undefined,
      usedBy: undefined,
      revokedAt: undefined,
    },
  };
}

/**
 * Revokes a device (operator action). From the commit on, the device gets no token, no certificate
 * and cannot enrol again; the running registrar lists its unexpired certificates on the CRL and runs
 * the revocation hook within `revocation.check_interval_ms` (docs/revocation.md).
 * Idempotent for an already revoked device.
 * @throws ERR_DEVICE_UNKNOWN
 */
export async function revokeDevice(
  store: RegistrarStore,
  deviceId: string,
  clock: Clock = systemClock,
): Promise<DeviceRecord> {
  if (!NAME.test(deviceId)) {
    throw new M2mError("ERR_DEVICE_UNKNOWN", "permanent", "no such device", {
      hint: "device ids look like dev-<hex>: see `m2m-registrar devices list`",
    });
  }
  return store.revokeDevice(deviceId, clock.now());
}

/**
 * `m2m-registrar devices allow-reenrol`: lets a device that lost its key (TPM cleared or replaced,
 * token reset) enrol again. The old identity is revoked in the same transaction (its certificates
 * reach the CRL, its key gets no tokens) and its EK is released, so the device's next enrolment
 * (`m2m-agent enroll --force`) registers it as a NEW device id (docs/operations.md says why).
 * Recorded in the registry's audit trail. Idempotent.
 * @throws ERR_DEVICE_UNKNOWN
 */
export async function allowReenrolment(
  store: RegistrarStore,
  deviceId: string,
  options: { clock?: Clock; actor?: string } = {},
): Promise<{ device: DeviceRecord; releasedEkHash: string | undefined }> {
  if (!NAME.test(deviceId)) {
    throw new M2mError("ERR_DEVICE_UNKNOWN", "permanent", "no such device", {
      hint: "device ids look like dev-<hex>: see `m2m-registrar devices list`",
    });
  }
  const at = (options.clock ?? systemClock).now();
  const r = await store.allowReenrolment(deviceId, at);
  await store.appendAudit({
    ts: at.toISOString(),
    event: "device.reenrol_allowed",
    outcome: "success",
    deviceId,
    ...(r.releasedEkHash === undefined ? {} : { ekHash: r.releasedEkHash }),
    ...(options.actor === undefined ? {} : { actor: options.actor }),
  });
  return r;
}

/** The id operators see for a bootstrap token: the first 16 hex digits of its SHA-256 (never the token). */
export function bootstrapTokenId(record: BootstrapTokenRecord): string {
  return record.hash.slice(0, 16);
}

/** unused / used / expired / revoked, at `now`. */
export function bootstrapTokenState(record: BootstrapTokenRecord, now: Date): string {
  if (record.revokedAt !== undefined) return "revoked";
  if (record.usedAt !== undefined) return "used";
  return record.expiresAt.getTime() <= now.getTime() ? "expired" : "unused";
}

/**
 * Revokes an unused bootstrap token named by its id (`token list`) or a longer prefix of its hash.
 * @throws ERR_TOKEN_INVALID (no match, or the prefix matches several), ERR_TOKEN_USED
 */
export async function revokeBootstrapToken(
  store: RegistrarStore,
  id: string,
  clock: Clock = systemClock,
): Promise<BootstrapTokenRecord> {
  const prefix = id.toLowerCase();
  if (!/^[0-9a-f]{8,64}$/.test(prefix))
    throw new M2mError("ERR_TOKEN_INVALID", "permanent", "a token id is 8-64 hex digits", {
      hint: "see `m2m-registrar enrollment token list`",
    });
  const matches = (await store.listBootstrapTokens()).filter((t) => t.hash.startsWith(prefix));
  const [only] = matches;
  if (only === undefined || matches.length > 1)
    throw new M2mError(
      "ERR_TOKEN_INVALID",
      "permanent",
      matches.length === 0 ? `no bootstrap token ${id}` : `${id} matches ${matches.length} tokens`,
      { hint: "see `m2m-registrar enrollment token list`" },
    );
  return store.revokeBootstrapToken(only.hash, clock.now());
}
