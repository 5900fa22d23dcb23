import type { Attributes, EnrolmentMethod } from "../../wire/v1/index.js";
import type {
  BootstrapTokenRecord,
  DeviceRecord,
  EnrolmentGroup,
  EnrolmentSession,
  RotationSessionRecord,
  SessionData,
} from "./store.js";

/**
 * Row shapes and row → record mapping shared by the SQLite and PostgreSQL stores (both keep
 * timestamps as integer milliseconds and JSON as text).
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
