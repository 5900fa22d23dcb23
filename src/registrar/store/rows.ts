import type { Attributes, EnrolmentMethod } from "../../wire/v1/index.js";
import type {
  AttestationPolicy,
  BootstrapTokenRecord,
  CommitEnrolment,
  DeviceAttestation,
  DeviceRecord,
  EnrolmentGroup,
  EnrolmentSession,
  NewBootstrapToken,
  NewEnrolmentGroup,
  ReplaceDeviceKey,
  RotationSessionRecord,
  SessionData,
} from "./store.js";

/**
 * Row shapes, row → record mapping and record → statement parameters shared by the SQLite and
 * PostgreSQL stores (both keep timestamps as integer milliseconds and JSON as text). The parameter
 * builders return values in the column order of the statements named in their TSDoc; both stores
 * write those statements with the same column order.
 */

export interface GroupRow {
  name: string;
  role: string;
  attributes: string;
  methods: string;
  ek_trust_dir: string | null;
  ek_allow: string;
  created_at: number;
}
export interface TokenRow {
  hash: string;
  group_name: string;
  expires_at: number;
  created_at: number;
  used_at: number | null;
  used_by: string | null;
  revoked_at: number | null;
}
export interface SessionRow {
  id: string;
  data: string;
  created_at: number;
  expires_at: number;
  consumed_at: number | null;
  failed_attempts: number;
}
export interface RotationRow {
  id: string;
  device_id: string;
  current_thumbprint: string;
  nonce: Buffer;
  expires_at: number;
  consumed_at: number | null;
}
export interface DeviceRow {
  device_id: string;
  method: string;
  status: string;
  group_name: string;
  role: string;
  attributes: string;
  public_jwk: string;
  thumbprint: string;
  ek_hash: string | null;
  hardware_serial: string;
  evidence: string | null;
  cert_serial: string;
  cert_not_after: number;
  created_at: number;
  updated_at: number;
  revoked_at: number | null;
}

export function rotationOf(row: RotationRow): RotationSessionRecord {
  return {
    id: row.id,
    deviceId: row.device_id,
    currentThumbprint: row.current_thumbprint,
    nonce: Buffer.from(row.nonce),
    // Expiry is checked by the caller's clock (the session is consumed either way).
    expiresAt: new Date(row.expires_at),
  };
}

export function groupOf(row: GroupRow): EnrolmentGroup {
  return {
    name: row.name,
    role: row.role,
    attributes: JSON.parse(row.attributes) as Attributes,
    methods: JSON.parse(row.methods) as EnrolmentMethod[],
    ekTrustDir: row.ek_trust_dir ?? undefined,
    ekAllow: JSON.parse(row.ek_allow) as string[],
    createdAt: new Date(row.created_at),
  };
}

export function tokenOf(row: TokenRow): BootstrapTokenRecord {
  return {
    hash: row.hash,
    group: row.group_name,
    expiresAt: new Date(row.expires_at),
    createdAt: new Date(row.created_at),
    usedAt: row.used_at === null ? undefined : new Date(row.used_at),
    usedBy: row.used_by ?? undefined,
    revokedAt: row.revoked_at === null ? undefined : new Date(Number(row.revoked_at)),
  };
}

export function deviceOf(row: DeviceRow): DeviceRecord {
  return {
    deviceId: row.device_id,
    method: row.method as EnrolmentMethod,
    status: row.status === "revoked" ? "revoked" : "active",
    group: row.group_name,
    role: row.role,
    attributes: JSON.parse(row.attributes) as Attributes,
    publicJwk: JSON.parse(row.public_jwk) as Record<string, string>,
    thumbprint: row.thumbprint,
    ekHash: row.ek_hash ?? undefined,
    hardwareSerial: row.hardware_serial,
    evidence: row.evidence === null ? undefined : (JSON.parse(row.evidence) as Record<string, unknown>),
    certSerial: row.cert_serial,
    certNotAfter: new Date(row.cert_not_after),
    createdAt: new Date(row.created_at),
    updatedAt: new Date(row.updated_at),
    revokedAt: row.revoked_at === null ? undefined : new Date(row.revoked_at),
  };
}

export function sessionOf(row: SessionRow): EnrolmentSession {
  return {
    id: row.id,
    data: JSON.parse(row.data) as SessionData,
    createdAt: new Date(row.created_at),
    expiresAt: new Date(row.expires_at),
    consumedAt: row.consumed_at === null ? undefined : new Date(row.consumed_at),
    failedAttempts: Number(row.failed_attempts),
  };
}

export interface PolicyRow {
  group_name: string;
  version: number;
  policy: string;
  updated_at: number;
}
export interface DeviceAttestationRow {
  device_id: string;
  record: string;
  updated_at: number;
}

/** The fields of a policy kept in the row's JSON document (group, version, updated_at are columns). */
const POLICY_FIELDS = [
  "selection",
  "golden",
  "goldenEventLog",
  "goldenSource",
  "maxQuoteAgeSec",
  "requireForTokens",
  "requireForRenewal",
  "nonAttestable",
] as const satisfies readonly (keyof AttestationPolicy)[];
type PolicyDocument = Pick<AttestationPolicy, (typeof POLICY_FIELDS)[number]>;

/** The JSON document of a policy row; an absent optional is written as null. */
export function policyJson(p: Omit<AttestationPolicy, "version">): string {
  return JSON.stringify(Object.fromEntries(POLICY_FIELDS.map((k) => [k, p[k] ?? null])));
}

export function policyOf(row: PolicyRow): AttestationPolicy {
  const j = JSON.parse(row.policy) as Record<string, unknown>;
  const doc = Object.fromEntries(POLICY_FIELDS.map((k) => [k, j[k] ?? undefined])) as PolicyDocument;
  return {
    group: row.group_name,
    version: Number(row.version),
    ...doc,
    updatedAt: new Date(Number(row.updated_at)),
  };
}

export function deviceAttestationJson(r: DeviceAttestation): string {
  return JSON.stringify({
    ...r,
    at: r.at.getTime(),
    lastVerifiedAt: r.lastVerifiedAt?.getTime() ?? null,
    anomaly: r.anomaly === undefined ? null : { ...r.anomaly, at: r.anomaly.at.getTime() },
  });
}

export function deviceAttestationOf(row: DeviceAttestationRow): DeviceAttestation {
  const j = JSON.parse(row.record) as Record<string, unknown> & {
    at: number;
    lastVerifiedAt: number | null;
    anomaly: { code: string; reason: string; at: number } | null;
  };
  const opt = <T>(v: unknown): T | undefined => (v === null || v === undefined ? undefined : (v as T));
  return {
    deviceId: row.device_id,
    at: new Date(j.at),
    outcome: j.outcome === "verified" ? "verified" : "refused",
    code: opt<string>(j.code),
    reason: opt<string>(j.reason),
    policyVersion: Number(j.policyVersion ?? 0),
    bank: opt<string>(j.bank),
    pcrs: opt<Record<string, string>>(j.pcrs),
    differing: (j.differing as number[] | undefined) ?? [],
    clock: opt<DeviceAttestation["clock"]>(j.clock),
    eventLog: opt<string>(j.eventLog),
    lastVerifiedAt: j.lastVerifiedAt === null ? undefined : new Date(j.lastVerifiedAt),
    anomaly: j.anomaly === null ? undefined : { ...j.anomaly, at: new Date(j.anomaly.at) },
    reboots: Number(j.reboots ?? 0),
  };
}

// --- record → statement parameters ------------------------------------------------------------------

const jsonOrNull = (v: Record<string, unknown> | undefined): string | null =>
  v === undefined ? null : JSON.stringify(v);

/** `INSERT INTO groups (name, role, attributes, methods, ek_trust_dir, ek_allow, created_at)`. */
export function groupParams(g: NewEnrolmentGroup): unknown[] {
  return [
    g.name,
    g.role,
    JSON.stringify(g.attributes),
    JSON.stringify(g.methods),
    g.ekTrustDir ?? null,
    JSON.stringify(g.ekAllow),
    g.createdAt.getTime(),
  ];
}

/** `INSERT INTO bootstrap_tokens (hash, group_name, expires_at, created_at)`. */
export function tokenParams(t: NewBootstrapToken): unknown[] {
  return [t.hash, t.group, t.expiresAt.getTime(), t.createdAt.getTime()];
}

/**
 * `INSERT INTO devices (device_id, method, status = 'active', group_name, role, attributes, public_jwk,
 * thumbprint, ek_hash, hardware_serial, evidence, cert_serial, cert_not_after, created_at)`; the
 * caller binds `updated_at` to the same `now`.
 */
export function newDeviceParams(input: CommitEnrolment, now: number): unknown[] {
  return [
    input.deviceId,
    input.method,
    input.group,
    input.role,
    JSON.stringify(input.attributes),
    JSON.stringify(input.publicJwk),
    input.thumbprint,
    input.ekHash ?? null,
    input.hardwareSerial,
    jsonOrNull(input.evidence),
    input.certSerial,
    input.certNotAfter.getTime(),
    now,
  ];
}

/**
 * `UPDATE devices SET group_name, role, attributes, evidence, cert_serial, cert_not_after, updated_at
 * WHERE device_id = ? AND status = 'active'` (a re-enrolment of known hardware).
 */
export function reissueParams(input: CommitEnrolment, deviceId: string, now: number): unknown[] {
  return [
    input.group,
    input.role,
    JSON.stringify(input.attributes),
    jsonOrNull(input.evidence),
    input.certSerial,
    input.certNotAfter.getTime(),
    now,
    deviceId,
  ];
}

/**
 * `UPDATE devices SET public_jwk, thumbprint, evidence, cert_serial, cert_not_after, updated_at
 * WHERE device_id = ? AND thumbprint = ? AND status = 'active'` (a key rotation).
 */
export function replaceKeyParams(input: ReplaceDeviceKey): unknown[] {
  return [
    JSON.stringify(input.publicJwk),
    input.thumbprint,
    jsonOrNull(input.evidence),
    input.certSerial,
    input.certNotAfter.getTime(),
    input.at.getTime(),
    input.deviceId,
    input.previousThumbprint,
  ];
}
