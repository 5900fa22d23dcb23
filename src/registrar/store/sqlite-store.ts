import { closeSync, constants, mkdirSync, openSync } from "node:fs";
import { dirname } from "node:path";
import Database from "better-sqlite3";
import { M2mError } from "../../core/errors.js";
import type { Attributes, EnrolmentMethod } from "../../wire/v1/index.js";
import type {
  AuditEvent,
  BootstrapTokenRecord,
  CommitEnrolment,
  CommitResult,
  DeviceRecord,
  EnrolmentGroup,
  EnrolmentSession,
  NewEnrolmentGroup,
  NewEnrolmentSession,
  PlanEnrolment,
  RegistrarStore,
  ReplaceDeviceKey,
  SessionData,
} from "./store.js";

const SCHEMA = `
CREATE TABLE IF NOT EXISTS groups (
  name TEXT PRIMARY KEY,
  role TEXT NOT NULL,
  attributes TEXT NOT NULL,
  methods TEXT NOT NULL,
  ek_trust_dir TEXT,
  ek_allow TEXT NOT NULL,
  created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS bootstrap_tokens (
  hash TEXT PRIMARY KEY,
  group_name TEXT NOT NULL REFERENCES groups(name),
  expires_at INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  used_at INTEGER,
  used_by TEXT
);
CREATE TABLE IF NOT EXISTS sessions (
  id TEXT PRIMARY KEY,
  data TEXT NOT NULL,
  created_at INTEGER NOT NULL,
  expires_at INTEGER NOT NULL,
  consumed_at INTEGER
);
CREATE TABLE IF NOT EXISTS devices (
  device_id TEXT PRIMARY KEY,
  method TEXT NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('active','revoked')),
  group_name TEXT NOT NULL,
  role TEXT NOT NULL,
  attributes TEXT NOT NULL,
  public_jwk TEXT NOT NULL,
  thumbprint TEXT NOT NULL UNIQUE,
  ek_hash TEXT UNIQUE,
  hardware_serial TEXT NOT NULL,
  evidence TEXT,
  cert_serial TEXT NOT NULL,
  cert_not_after INTEGER NOT NULL,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL,
  revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS audit (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  event TEXT NOT NULL
);
`;

interface GroupRow {
  name: string;
  role: string;
  attributes: string;
  methods: string;
  ek_trust_dir: string | null;
  ek_allow: string;
  created_at: number;
}
interface TokenRow {
  hash: string;
  group_name: string;
  expires_at: number;
  created_at: number;
  used_at: number | null;
  used_by: string | null;
}
interface SessionRow {
  id: string;
  data: string;
  created_at: number;
  expires_at: number;
  consumed_at: number | null;
}
interface DeviceRow {
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

const refused = (code: string, message: string): M2mError => new M2mError(code, "permanent", message);

/**
 * SQLite registry (better-sqlite3 12): WAL journal, prepared statements, every decision in a
 * `BEGIN IMMEDIATE` transaction (so the check-then-write is atomic across processes too). The file is
 * created 0600 before SQLite opens it: it holds device records and token hashes.
 */
export class SqliteRegistrarStore implements RegistrarStore {
  readonly #db: Database.Database;
  readonly #stmt: ReturnType<SqliteRegistrarStore["prepare"]>;
  readonly #auditBuffer: string[] = [];
  #auditTimer: NodeJS.Timeout | undefined;

  constructor(path: string) {
    if (path !== ":memory:") {
      mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
      // Create with 0600 from the first byte; SQLite's -wal/-shm files inherit these permissions.
      closeSync(openSync(path, constants.O_RDWR | constants.O_CREAT, 0o600));
    }
    this.#db = new Database(path);
    this.#db.pragma("journal_mode = WAL");
    this.#db.pragma("synchronous = FULL");
    this.#db.pragma("foreign_keys = ON");
    this.#db.pragma("busy_timeout = 5000");
    this.#db.exec(SCHEMA);
    this.#stmt = this.prepare();
  }

  private prepare() {
    const db = this.#db;
    return {
      insertGroup: db.prepare(
        "INSERT INTO groups (name, role, attributes, methods, ek_trust_dir, ek_allow, created_at) VALUES (?,?,?,?,?,?,?)",
      ),
      getGroup: db.prepare<[string], GroupRow>("SELECT * FROM groups WHERE name = ?"),
      listGroups: db.prepare<[], GroupRow>("SELECT * FROM groups ORDER BY name"),
      insertToken: db.prepare(
        "INSERT INTO bootstrap_tokens (hash, group_name, expires_at, created_at) VALUES (?,?,?,?)",
      ),
      getToken: db.prepare<[string], TokenRow>("SELECT * FROM bootstrap_tokens WHERE hash = ?"),
      consumeToken: db.prepare(
        "UPDATE bootstrap_tokens SET used_at = ?, used_by = ? WHERE hash = ? AND used_at IS NULL AND expires_at > ?",
      ),
      insertSession: db.prepare("INSERT INTO sessions (id, data, created_at, expires_at) VALUES (?,?,?,?)"),
      getSession: db.prepare<[string], SessionRow>("SELECT * FROM sessions WHERE id = ?"),
      consumeSession: db.prepare(
        "UPDATE sessions SET consumed_at = ? WHERE id = ? AND consumed_at IS NULL AND expires_at > ?",
      ),
      purgeSessions: db.prepare("DELETE FROM sessions WHERE expires_at <= ?"),
      getDevice: db.prepare<[string], DeviceRow>("SELECT * FROM devices WHERE device_id = ?"),
      byEk: db.prepare<[string], DeviceRow>("SELECT * FROM devices WHERE ek_hash = ?"),
      byThumb: db.prepare<[string], DeviceRow>("SELECT * FROM devices WHERE thumbprint = ?"),
      listDevices: db.prepare<[], DeviceRow>("SELECT * FROM devices ORDER BY created_at, device_id"),
      insertDevice: db.prepare(
        `INSERT INTO devices (device_id, method, status, group_name, role, attributes, public_jwk, thumbprint,
          ek_hash, hardware_serial, evidence, cert_serial, cert_not_after, created_at, updated_at)
         VALUES (?, ?, 'active', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      ),
      reissueDevice: db.prepare(
        `UPDATE devices SET group_name = ?, role = ?, attributes = ?, evidence = ?, cert_serial = ?,
          cert_not_after = ?, updated_at = ? WHERE device_id = ? AND status = 'active'`,
      ),
      recordCert: db.prepare(
        "UPDATE devices SET cert_serial = ?, cert_not_after = ?, updated_at = ? WHERE device_id = ? AND status = 'active'",
      ),
      replaceKey: db.prepare(
        `UPDATE devices SET public_jwk = ?, thumbprint = ?, evidence = ?, cert_serial = ?, cert_not_after = ?,
          updated_at = ? WHERE device_id = ? AND thumbprint = ? AND status = 'active'`,
      ),
      revokeDevice: db.prepare(
        "UPDATE devices SET status = 'revoked', revoked_at = ?, updated_at = ? WHERE device_id = ? AND status = 'active'",
      ),
      insertAudit: db.prepare("INSERT INTO audit (event) VALUES (?)"),
      listAudit: db.prepare<[number], { event: string }>("SELECT event FROM audit ORDER BY id DESC LIMIT ?"),
    };
  }

  async addGroup(group: NewEnrolmentGroup): Promise<EnrolmentGroup> {
    if (this.#stmt.getGroup.get(group.name) !== undefined) {
      throw refused("ERR_GROUP_EXISTS", `enrolment group ${group.name} already exists`);
    }
    this.#stmt.insertGroup.run(
      group.name,
      group.role,
      JSON.stringify(group.attributes),
      JSON.stringify(group.methods),
      group.ekTrustDir ?? null,
      JSON.stringify(group.ekAllow),
      group.createdAt.getTime(),
    );
    return group;
  }

  async getGroup(name: string): Promise<EnrolmentGroup | undefined> {
    const row = this.#stmt.getGroup.get(name);
    return row === undefined ? undefined : groupOf(row);
  }

  async listGroups(): Promise<EnrolmentGroup[]> {
    return this.#stmt.listGroups.all().map(groupOf);
  }

  async addBootstrapToken(token: {
    hash: string;
    group: string;
    expiresAt: Date;
    createdAt: Date;
  }): Promise<void> {
    if (this.#stmt.getGroup.get(token.group) === undefined) {
      throw refused("ERR_GROUP_UNKNOWN", `enrolment group ${token.group} does not exist`);
    }
    this.#stmt.insertToken.run(token.hash, token.group, token.expiresAt.getTime(), token.createdAt.getTime());
  }

  async getBootstrapToken(hash: string): Promise<BootstrapTokenRecord | undefined> {
    const row = this.#stmt.getToken.get(hash);
    return row === undefined ? undefined : tokenOf(row);
  }

  async createSession(session: NewEnrolmentSession): Promise<void> {
    // A session lost to a power cut only makes that enrolment retry: skip the WAL fsync here (the
    // next FULL commit syncs these frames too). Consuming proofs and registering devices stay FULL.
    this.#db.pragma("synchronous = NORMAL");
    try {
      this.#stmt.insertSession.run(
        session.id,
        JSON.stringify(session.data),
        session.createdAt.getTime(),
        session.expiresAt.getTime(),
      );
    } finally {
      this.#db.pragma("synchronous = FULL");
    }
  }

  async getSession(id: string): Promise<EnrolmentSession | undefined> {
    const row = this.#stmt.getSession.get(id);
    if (row === undefined) return undefined;
    return {
      id: row.id,
      data: JSON.parse(row.data) as SessionData,
      createdAt: new Date(row.created_at),
      expiresAt: new Date(row.expires_at),
      consumedAt: row.consumed_at === null ? undefined : new Date(row.consumed_at),
    };
  }

  async purgeExpiredSessions(now: Date): Promise<number> {
    return this.#stmt.purgeSessions.run(now.getTime()).changes;
  }

  async getDevice(deviceId: string): Promise<DeviceRecord | undefined> {
    const row = this.#stmt.getDevice.get(deviceId);
    return row === undefined ? undefined : deviceOf(row);
  }

  async findDeviceByEkHash(ekHash: string): Promise<DeviceRecord | undefined> {
    const row = this.#stmt.byEk.get(ekHash);
    return row === undefined ? undefined : deviceOf(row);
  }

  async findDeviceByThumbprint(thumbprint: string): Promise<DeviceRecord | undefined> {
    const row = this.#stmt.byThumb.get(thumbprint);
    return row === undefined ? undefined : deviceOf(row);
  }

  async listDevices(): Promise<DeviceRecord[]> {
    return this.#stmt.listDevices.all().map(deviceOf);
  }

  async planEnrolment(input: PlanEnrolment): Promise<{ deviceId: string; existing: boolean }> {
    const existing = this.#matchHardware(input);
    return existing === undefined
      ? { deviceId: input.proposedDeviceId, existing: false }
      : { deviceId: existing.deviceId, existing: true };
  }

  /**
   * Finds the device this hardware already is, or refuses when the request would rebind an existing
   * identity to different hardware.
   */
  #matchHardware(input: PlanEnrolment): DeviceRecord | undefined {
    const byEk = input.ekHash === undefined ? undefined : this.#deviceBy(this.#stmt.byEk.get(input.ekHash));
    // Security: one EK is one TPM; a different device key under a registered EK would let whoever
    // holds that TPM's AK swap the identity's key without proving possession of the old one.
    if (byEk !== undefined && byEk.thumbprint !== input.thumbprint) {
      throw refused("ERR_EK_ALREADY_REGISTERED", "this endorsement key is already registered");
    }
    const byKey = this.#deviceBy(this.#stmt.byThumb.get(input.thumbprint));
    // Security: a key registered through another method or under another EK is another device.
    if (byKey !== undefined && (byKey.ekHash !== input.ekHash || byKey.method !== input.method)) {
      throw refused("ERR_KEY_ALREADY_REGISTERED", "this device key is already registered");
    }
    const existing = byEk ?? byKey;
    if (existing === undefined) return undefined;
    // Security: a self-asserted serial that differs means the request claims other hardware.
    if (existing.hardwareSerial !== input.hardwareSerial) {
      throw refused("ERR_HARDWARE_MISMATCH", "hardware does not match the registered device");
    }
    // Security: a revoked identity stays revoked; re-enrolment must not resurrect it.
    if (existing.status === "revoked") {
      throw refused("ERR_DEVICE_REVOKED", "the device is revoked");
    }
    return existing;
  }

  async commitEnrolment(input: CommitEnrolment): Promise<CommitResult> {
    const tx = this.#db.transaction((): CommitResult => {
      const now = input.now.getTime();
      this.#consumeProof(input, now);
      const existing = this.#matchHardware(input);
      if (existing !== undefined) {
        // The certificate was issued for the planned deviceId; a concurrent enrolment changed it.
        if (existing.deviceId !== input.deviceId) {
          throw refused("ERR_KEY_ALREADY_REGISTERED", "this device key is already registered");
        }
        this.#stmt.reissueDevice.run(
          input.group,
          input.role,
          JSON.stringify(input.attributes),
          input.evidence === undefined ? null : JSON.stringify(input.evidence),
          input.certSerial,
          input.certNotAfter.getTime(),
          now,
          existing.deviceId,
        );
        return { device: this.#mustGet(existing.deviceId), reenrolled: true };
      }
      if (this.#stmt.getDevice.get(input.deviceId) !== undefined) {
        throw refused("ERR_KEY_ALREADY_REGISTERED", "device id already in use");
      }
      this.#stmt.insertDevice.run(
        input.deviceId,
        input.method,
        input.group,
        input.role,
        JSON.stringify(input.attributes),
        JSON.stringify(input.publicJwk),
        input.thumbprint,
        input.ekHash ?? null,
        input.hardwareSerial,
        input.evidence === undefined ? null : JSON.stringify(input.evidence),
        input.certSerial,
        input.certNotAfter.getTime(),
        now,
        now,
      );
      return { device: this.#mustGet(input.deviceId), reenrolled: false };
    });
    return tx.immediate();
  }

  #consumeProof(input: CommitEnrolment, now: number): void {
    const proof = input.proof;
    if (proof.kind === "token") {
      const row = this.#stmt.getToken.get(proof.hash);
      // Security: the token is bound to the group it was issued for.
      if (row === undefined || row.group_name !== input.group) {
        throw refused("ERR_TOKEN_INVALID", "bootstrap token not accepted");
      }
      // Security: bootstrap tokens are single-use.
      if (row.used_at !== null) throw refused("ERR_TOKEN_USED", "bootstrap token already used");
      // Security: and expire.
      if (row.expires_at <= now) throw refused("ERR_TOKEN_EXPIRED", "bootstrap token expired");
      const changed = this.#stmt.consumeToken.run(now, input.deviceId, proof.hash, now).changes;
      if (changed !== 1) throw refused("ERR_TOKEN_USED", "bootstrap token already used");
      return;
    }
    const row = this.#stmt.getSession.get(proof.id);
    if (row === undefined) throw refused("ERR_SESSION_UNKNOWN", "enrolment session not found");
    // Security: a session's proof (secret, nonce) counts once: replay and concurrent finishes lose.
    if (row.consumed_at !== null) throw refused("ERR_SESSION_CONSUMED", "enrolment session already used");
    if (row.expires_at <= now) throw refused("ERR_SESSION_EXPIRED", "enrolment session expired");
    const changed = this.#stmt.consumeSession.run(now, proof.id, now).changes;
    if (changed !== 1) throw refused("ERR_SESSION_CONSUMED", "enrolment session already used");
  }

  #deviceBy(row: DeviceRow | undefined): DeviceRecord | undefined {
    return row === undefined ? undefined : deviceOf(row);
  }

  #mustGet(deviceId: string): DeviceRecord {
    const d = this.#deviceBy(this.#stmt.getDevice.get(deviceId));
    if (d === undefined) throw new M2mError("ERR_INTERNAL", "permanent", "device vanished in transaction");
    return d;
  }

  async recordCertificate(
    deviceId: string,
    cert: { serial: string; notAfter: Date },
    at: Date,
  ): Promise<void> {
    this.#stmt.recordCert.run(cert.serial, cert.notAfter.getTime(), at.getTime(), deviceId);
  }

  async replaceDeviceKey(input: ReplaceDeviceKey): Promise<DeviceRecord> {
    const tx = this.#db.transaction((): DeviceRecord => {
      const d = this.#deviceBy(this.#stmt.getDevice.get(input.deviceId));
      if (d === undefined) throw refused("ERR_DEVICE_UNKNOWN", `no device ${input.deviceId}`);
      // Security: a revoked identity gets no new key.
      if (d.status !== "active") throw refused("ERR_DEVICE_REVOKED", "the device is revoked");
      // Security: the rotation was authorised by the key the device had then; if it changed meanwhile
      // (a concurrent rotation), this one must not overwrite it.
      if (d.thumbprint !== input.previousThumbprint)
        throw refused("ERR_ROTATION_CONFLICT", "the device key changed during the rotation");
      const other = this.#stmt.byThumb.get(input.thumbprint);
      // Security: a key registered to any device (this one included) is never accepted as "new".
      if (other !== undefined)
        throw refused("ERR_KEY_ALREADY_REGISTERED", "this device key is already registered");
      const changed = this.#stmt.replaceKey.run(
        JSON.stringify(input.publicJwk),
        input.thumbprint,
        input.evidence === undefined ? null : JSON.stringify(input.evidence),
        input.certSerial,
        input.certNotAfter.getTime(),
        input.at.getTime(),
        input.deviceId,
        input.previousThumbprint,
      ).changes;
      if (changed !== 1) throw refused("ERR_ROTATION_CONFLICT", "the device key changed during the rotation");
      return this.#mustGet(input.deviceId);
    });
    return tx.immediate();
  }

  async revokeDevice(deviceId: string, at: Date): Promise<DeviceRecord> {
    const tx = this.#db.transaction((): DeviceRecord => {
      const d = this.#deviceBy(this.#stmt.getDevice.get(deviceId));
      if (d === undefined) throw refused("ERR_DEVICE_UNKNOWN", `no device ${deviceId}`);
      this.#stmt.revokeDevice.run(at.getTime(), at.getTime(), deviceId);
      return this.#mustGet(deviceId);
    });
    return tx.immediate();
  }

  /**
   * Audit rows are buffered and written in one transaction shortly after (the JSON-lines file is the
   * primary audit trail): a synchronous fsync per request would stall the event loop for every
   * enrolment attempt. `listAudit` and `close` flush first.
   */
  async appendAudit(event: AuditEvent): Promise<void> {
    this.#auditBuffer.push(JSON.stringify(event));
    if (this.#auditTimer === undefined) {
      this.#auditTimer = setTimeout(() => this.#flushAudit(), 50);
      this.#auditTimer.unref();
    }
  }

  #flushAudit(): void {
    if (this.#auditTimer !== undefined) clearTimeout(this.#auditTimer);
    this.#auditTimer = undefined;
    if (this.#auditBuffer.length === 0 || !this.#db.open) return;
    const rows = this.#auditBuffer.splice(0);
    this.#db.transaction(() => {
      for (const r of rows) this.#stmt.insertAudit.run(r);
    })();
  }

  async listAudit(limit: number): Promise<AuditEvent[]> {
    this.#flushAudit();
    return this.#stmt.listAudit
      .all(limit)
      .map((r) => JSON.parse(r.event) as AuditEvent)
      .reverse();
  }

  async close(): Promise<void> {
    this.#flushAudit();
    if (this.#db.open) this.#db.close();
  }
}

function groupOf(row: GroupRow): EnrolmentGroup {
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

function tokenOf(row: TokenRow): BootstrapTokenRecord {
  return {
    hash: row.hash,
    group: row.group_name,
    expiresAt: new Date(row.expires_at),
    createdAt: new Date(row.created_at),
    usedAt: row.used_at === null ? undefined : new Date(row.used_at),
    usedBy: row.used_by ?? undefined,
  };
}

function deviceOf(row: DeviceRow): DeviceRecord {
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
