import { closeSync, constants, mkdirSync, openSync } from "node:fs";
import { dirname } from "node:path";
import Database from "better-sqlite3";
import { M2mError } from "../../core/errors.js";
import { MIGRATIONS, SCHEMA_VERSION } from "./migrations.js";
import { matchHardware, refused, rotationRefusal, schemaNewer, sessionRefusal } from "./refusals.js";
import {
  type DeviceAttestationRow,
  type DeviceRow,
  deviceAttestationJson,
  deviceAttestationOf,
  deviceOf,
  type GroupRow,
  groupOf,
  groupParams,
  newDeviceParams,
  type PolicyRow,
  policyJson,
  policyOf,
  type RotationRow,
  reissueParams,
  replaceKeyParams,
  rotationOf,
  type SessionRow,
  sessionOf,
  type TokenRow,
  tokenOf,
  tokenParams,
} from "./rows.js";
import type {
  AttestationPolicy,
  AuditEvent,
  BootstrapTokenRecord,
  CommitEnrolment,
  CommitResult,
  DeviceAttestation,
  DeviceRecord,
  EnrolmentGroup,
  EnrolmentSession,
  NewAttestationPolicy,
  NewBootstrapToken,
  NewEnrolmentGroup,
  NewEnrolmentSession,
  PlanEnrolment,
  RegistrarStore,
  ReplaceDeviceKey,
  RevokedCertificate,
  RotationSessionRecord,
} from "./store.js";
import { isTokenRetry } from "./token-retry.js";

/**
 * SQLite registry (better-sqlite3 12): WAL journal, prepared statements, every decision in a
 * `BEGIN IMMEDIATE` transaction (so the check-then-write is atomic across processes too). The file is
 * created 0600 before SQLite opens it: it holds device records and token hashes.
 */
export class SqliteRegistrarStore implements RegistrarStore {
  readonly #db: Database.Database;
  readonly #stmt: ReturnType<SqliteRegistrarStore["prepare"]>;
  readonly #auditBuffer: string[] = [];
  readonly #listeners = new Set<(deviceId: string) => void>();
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
    this.migrate();
    this.#stmt = this.prepare();
  }

  /**
   * Applies pending migrations (MIGRATIONS), each in a `BEGIN IMMEDIATE` transaction: the file's write
   * lock serialises processes opening the same database. Runs at every open (embedded database).
   * @throws ERR_STORE_SCHEMA_NEWER when the database was migrated by a newer registrar.
   */
  migrate(): { from: number; to: number } {
    const db = this.#db;
    db.exec(
      "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
    );
    const current = (): number =>
      (db.prepare("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations").get() as { v: number }).v;
    const from = current();
    if (from > SCHEMA_VERSION) throw schemaNewer(from);
    for (const m of MIGRATIONS) {
      db.transaction(() => {
        // Re-read under the write lock: another process may have applied it meanwhile.
        if (current() >= m.version) return;
        db.exec(m.sqlite);
        db.prepare("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?,?,?)").run(
          m.version,
          m.name,
          Date.now(),
        );
      }).immediate();
    }
    return { from, to: current() };
  }

  /** The applied schema version. */
  async schemaVersion(): Promise<number> {
    return (
      this.#db.prepare("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations").get() as { v: number }
    ).v;
  }

  private prepare() {
    const db = this.#db;
    return {
      insertGroup: db.prepare(
        "INSERT INTO groups (name, role, attributes, methods, ek_trust_dir, ek_allow, created_at) VALUES (?,?,?,?,?,?,?)",
      ),
      getGroup: db.prepare<[string], GroupRow>("SELECT * FROM groups WHERE name = ?"),
      listGroups: db.prepare<[], GroupRow>("SELECT * FROM groups ORDER BY name"),
      deleteGroupTokens: db.prepare("DELETE FROM bootstrap_tokens WHERE group_name = ?"),
      deleteGroup: db.prepare("DELETE FROM groups WHERE name = ?"),
      // The group's attestation policy goes with it (it references the group).
      deleteGroupPolicy: db.prepare("DELETE FROM attestation_policies WHERE group_name = ?"),
      listTokens: db.prepare<[], TokenRow>("SELECT * FROM bootstrap_tokens ORDER BY created_at DESC, hash"),
      revokeToken: db.prepare(
        "UPDATE bootstrap_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE hash = ? AND used_at IS NULL",
      ),
      failActivation: db.prepare(
        "UPDATE sessions SET failed_attempts = failed_attempts + 1, consumed_at = CASE WHEN failed_attempts + 1 >= ? THEN ? ELSE NULL END WHERE id = ? AND consumed_at IS NULL",
      ),
      insertToken: db.prepare(
        "INSERT INTO bootstrap_tokens (hash, group_name, expires_at, created_at) VALUES (?,?,?,?)",
      ),
      getToken: db.prepare<[string], TokenRow>("SELECT * FROM bootstrap_tokens WHERE hash = ?"),
      consumeToken: db.prepare(
        "UPDATE bootstrap_tokens SET used_at = ?, used_by = ? WHERE hash = ? AND used_at IS NULL AND revoked_at IS NULL AND expires_at > ?",
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
      releaseEk: db.prepare(
        "UPDATE devices SET status = 'revoked', revoked_at = COALESCE(revoked_at, ?), updated_at = ?, ek_hash = NULL WHERE device_id = ?",
      ),
      consumeOnce: db.prepare(
        `INSERT INTO once_keys (key, expires_at) VALUES (?, ?)
         ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at WHERE once_keys.expires_at < ?`,
      ),
      getOnce: db.prepare<[string], { expires_at: number }>("SELECT expires_at FROM once_keys WHERE key = ?"),
      purgeOnce: db.prepare("DELETE FROM once_keys WHERE expires_at < ?"),
      dropDeviceRotations: db.prepare(
        "DELETE FROM rotation_sessions WHERE device_id = ? AND consumed_at IS NULL",
      ),
      insertRotation: db.prepare(
        "INSERT INTO rotation_sessions (id, device_id, current_thumbprint, nonce, expires_at) VALUES (?,?,?,?,?)",
      ),
      getRotation: db.prepare<[string], RotationRow>("SELECT * FROM rotation_sessions WHERE id = ?"),
      takeRotation: db.prepare(
        "UPDATE rotation_sessions SET consumed_at = ? WHERE id = ? AND device_id = ? AND consumed_at IS NULL",
      ),
      purgeRotations: db.prepare("DELETE FROM rotation_sessions WHERE expires_at <= ?"),
      insertSecret: db.prepare(
        "INSERT INTO shared_secrets (name, value, created_at) VALUES (?,?,?) ON CONFLICT (name) DO NOTHING",
      ),
      getSecret: db.prepare<[string], { value: Buffer }>("SELECT value FROM shared_secrets WHERE name = ?"),
      insertCert: db.prepare(
        "INSERT OR IGNORE INTO certificates (serial, device_id, not_after, issued_at) VALUES (?,?,?,?)",
      ),
      revokedCerts: db.prepare<
        [number],
        { serial: string; device_id: string; not_after: number; revoked_at: number }
      >(
        `SELECT c.serial, c.device_id, c.not_after, d.revoked_at FROM devices d
           JOIN certificates c ON c.device_id = d.device_id
          WHERE d.status = 'revoked' AND c.not_after > ? ORDER BY c.serial`,
      ),
      insertAudit: db.prepare("INSERT INTO audit (event) VALUES (?)"),
      listAudit: db.prepare<[number], { event: string }>("SELECT event FROM audit ORDER BY id DESC LIMIT ?"),
    };
  }

  async addGroup(group: NewEnrolmentGroup): Promise<EnrolmentGroup> {
    if (this.#stmt.getGroup.get(group.name) !== undefined) {
      throw refused("ERR_GROUP_EXISTS", `enrolment group ${group.name} already exists`);
    }
    this.#stmt.insertGroup.run(groupParams(group));
    return group;
  }

  async getGroup(name: string): Promise<EnrolmentGroup | undefined> {
    const row = this.#stmt.getGroup.get(name);
    return row === undefined ? undefined : groupOf(row);
  }

  async listGroups(): Promise<EnrolmentGroup[]> {
    return this.#stmt.listGroups.all().map(groupOf);
  }

  async removeGroup(name: string): Promise<{ tokensRemoved: number }> {
    return this.#db
      .transaction(() => {
        if (this.#stmt.getGroup.get(name) === undefined)
          throw refused("ERR_GROUP_UNKNOWN", `enrolment group ${name} does not exist`);
        const tokensRemoved = this.#stmt.deleteGroupTokens.run(name).changes;
        this.#stmt.deleteGroupPolicy.run(name);
        this.#stmt.deleteGroup.run(name);
        return { tokensRemoved };
      })
      .immediate();
  }

  async listBootstrapTokens(): Promise<BootstrapTokenRecord[]> {
    return this.#stmt.listTokens.all().map(tokenOf);
  }

  async revokeBootstrapToken(hash: string, at: Date): Promise<BootstrapTokenRecord> {
    return this.#db
      .transaction((): BootstrapTokenRecord => {
        const row = this.#stmt.getToken.get(hash);
        if (row === undefined) throw refused("ERR_TOKEN_INVALID", "no such bootstrap token");
        if (row.used_at !== null)
          throw refused("ERR_TOKEN_USED", "bootstrap token already used: revoke the device it enrolled");
        this.#stmt.revokeToken.run(at.getTime(), hash);
        return tokenOf(this.#stmt.getToken.get(hash) as TokenRow);
      })
      .immediate();
  }

  async recordFailedActivation(
    id: string,
    maxAttempts: number,
    now: Date,
  ): Promise<{ attempts: number; discarded: boolean }> {
    return this.#db
      .transaction(() => {
        const row = this.#stmt.getSession.get(id);
        if (row === undefined) throw refused("ERR_SESSION_UNKNOWN", "enrolment session not found");
        if (row.consumed_at !== null)
          throw refused("ERR_SESSION_CONSUMED", "enrolment session already used or discarded");
        this.#stmt.failActivation.run(maxAttempts, now.getTime(), id);
        const after = this.#stmt.getSession.get(id) as SessionRow;
        return { attempts: after.failed_attempts, discarded: after.consumed_at !== null };
      })
      .immediate();
  }

  async addBootstrapToken(token: NewBootstrapToken): Promise<void> {
    if (this.#stmt.getGroup.get(token.group) === undefined) {
      throw refused("ERR_GROUP_UNKNOWN", `enrolment group ${token.group} does not exist`);
    }
    this.#stmt.insertToken.run(tokenParams(token));
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
    return row === undefined ? undefined : sessionOf(row);
  }

  async purgeExpiredSessions(now: Date): Promise<number> {
    const t = now.getTime();
    return this.#db.transaction(
      () =>
        this.#stmt.purgeSessions.run(t).changes +
        this.#stmt.purgeRotations.run(t).changes +
        this.#stmt.purgeOnce.run(t).changes,
    )();
  }

  async consumeOnce(key: string, expiresAt: Date, now: Date): Promise<boolean> {
    // Losing a replay record to a power cut (not a process crash: WAL) reopens at most the key's
    // remaining lifetime; the FULL fsync per token request is not worth it. Process restarts keep it.
    this.#db.pragma("synchronous = NORMAL");
    try {
      return this.#stmt.consumeOnce.run(key, expiresAt.getTime(), now.getTime()).changes === 1;
    } finally {
      this.#db.pragma("synchronous = FULL");
    }
  }

  async isConsumed(key: string, now: Date): Promise<boolean> {
    const row = this.#stmt.getOnce.get(key);
    return row !== undefined && row.expires_at >= now.getTime();
  }

  async createRotationSession(session: RotationSessionRecord): Promise<void> {
    this.#db
      .transaction(() => {
        this.#stmt.dropDeviceRotations.run(session.deviceId);
        this.#stmt.insertRotation.run(
          session.id,
          session.deviceId,
          session.currentThumbprint,
          session.nonce,
          session.expiresAt.getTime(),
        );
      })
      .immediate();
  }

  async takeRotationSession(id: string, deviceId: string, now: Date): Promise<RotationSessionRecord> {
    return this.#db
      .transaction((): RotationSessionRecord => {
        const row = this.#stmt.getRotation.get(id);
        const refusal = rotationRefusal(row, deviceId, now.getTime());
        if (refusal !== undefined || row === undefined) throw refusal;
        if (this.#stmt.takeRotation.run(now.getTime(), id, deviceId).changes !== 1)
          throw refused("ERR_SESSION_CONSUMED", "session used");
        return rotationOf(row);
      })
      .immediate();
  }

  async putAttestationPolicy(policy: NewAttestationPolicy): Promise<AttestationPolicy> {
    return this.#db
      .transaction((): AttestationPolicy => {
        if (this.#stmt.getGroup.get(policy.group) === undefined) {
          throw refused("ERR_GROUP_UNKNOWN", `enrolment group ${policy.group} does not exist`);
        }
        const prev = this.#db
          .prepare<[string], { version: number }>(
            "SELECT version FROM attestation_policies WHERE group_name = ?",
          )
          .get(policy.group);
        const version = (prev?.version ?? 0) + 1;
        this.#db
          .prepare(
            "INSERT INTO attestation_policies (group_name, version, policy, updated_at) VALUES (?,?,?,?) " +
              "ON CONFLICT (group_name) DO UPDATE SET version = excluded.version, policy = excluded.policy, updated_at = excluded.updated_at",
          )
          .run(policy.group, version, policyJson(policy), policy.updatedAt.getTime());
        return { ...policy, version };
      })
      .immediate();
  }

  async getAttestationPolicy(group: string): Promise<AttestationPolicy | undefined> {
    const row = this.#db
      .prepare<[string], PolicyRow>("SELECT * FROM attestation_policies WHERE group_name = ?")
      .get(group);
    return row === undefined ? undefined : policyOf(row);
  }

  async putDeviceAttestation(record: DeviceAttestation): Promise<void> {
    // One write per attested token request: like consumeOnce, WAL without an fsync per row (a power
    // cut loses at most the latest quote record; the next quote writes it again).
    this.#db.pragma("synchronous = NORMAL");
    try {
      this.#putAttestation(record);
    } finally {
      this.#db.pragma("synchronous = FULL");
    }
  }

  #putAttestation(record: DeviceAttestation): void {
    this.#db
      .prepare(
        "INSERT INTO device_attestation (device_id, record, updated_at) VALUES (?,?,?) " +
          "ON CONFLICT (device_id) DO UPDATE SET record = excluded.record, updated_at = excluded.updated_at",
      )
      .run(record.deviceId, deviceAttestationJson(record), record.at.getTime());
  }

  async getDeviceAttestation(deviceId: string): Promise<DeviceAttestation | undefined> {
    const row = this.#db
      .prepare<[string], DeviceAttestationRow>("SELECT * FROM device_attestation WHERE device_id = ?")
      .get(deviceId);
    return row === undefined ? undefined : deviceAttestationOf(row);
  }

  async sharedSecret(name: string, create: () => Buffer): Promise<Buffer> {
    const have = this.#stmt.getSecret.get(name);
    if (have !== undefined) return Buffer.from(have.value);
    this.#stmt.insertSecret.run(name, create(), Date.now());
    const row = this.#stmt.getSecret.get(name);
    if (row === undefined) throw new M2mError("ERR_INTERNAL", "permanent", "shared secret vanished");
    return Buffer.from(row.value);
  }

  onDeviceChange(listener: (deviceId: string) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  #changed(deviceId: string): void {
    for (const l of this.#listeners) {
      try {
        l(deviceId);
      } catch {
        // A listener's failure must not undo a committed change.
      }
    }
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

  /** The device this hardware already is (refusals.ts `matchHardware` says when it refuses). */
  #matchHardware(input: PlanEnrolment): DeviceRecord | undefined {
    const byEk = input.ekHash === undefined ? undefined : this.#deviceBy(this.#stmt.byEk.get(input.ekHash));
    return matchHardware(input, byEk, this.#deviceBy(this.#stmt.byThumb.get(input.thumbprint)));
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
        this.#stmt.reissueDevice.run(reissueParams(input, existing.deviceId, now));
        this.#stmt.insertCert.run(input.certSerial, existing.deviceId, input.certNotAfter.getTime(), now);
        return { device: this.#mustGet(existing.deviceId), reenrolled: true };
      }
      if (this.#stmt.getDevice.get(input.deviceId) !== undefined) {
        throw refused("ERR_KEY_ALREADY_REGISTERED", "device id already in use");
      }
      this.#stmt.insertDevice.run(...newDeviceParams(input, now), now);
      this.#stmt.insertCert.run(input.certSerial, input.deviceId, input.certNotAfter.getTime(), now);
      return { device: this.#mustGet(input.deviceId), reenrolled: false };
    });
    const result = tx.immediate();
    if (result.reenrolled) this.#changed(result.device.deviceId);
    return result;
  }

  #consumeProof(input: CommitEnrolment, now: number): void {
    const proof = input.proof;
    if (proof.kind === "token") {
      const row = this.#stmt.getToken.get(proof.hash);
      // Security: the token is bound to the group it was issued for.
      if (row === undefined || row.group_name !== input.group) {
        throw refused("ERR_TOKEN_INVALID", "bootstrap token not accepted");
      }
      // Security: an operator revoked it (leaked, or issued by mistake).
      if (row.revoked_at !== null) throw refused("ERR_TOKEN_REVOKED", "bootstrap token revoked");
      // Security: bootstrap tokens are single-use, except for the retry of the device that used it.
      if (row.used_at !== null) {
        if (isTokenRetry(row, this.#deviceBy(this.#stmt.getDevice.get(row.used_by ?? "")), input, now))
          return;
        throw refused("ERR_TOKEN_USED", "bootstrap token already used");
      }
      // Security: and expire.
      if (row.expires_at <= now) throw refused("ERR_TOKEN_EXPIRED", "bootstrap token expired");
      const changed = this.#stmt.consumeToken.run(now, input.deviceId, proof.hash, now).changes;
      if (changed !== 1) throw refused("ERR_TOKEN_USED", "bootstrap token already used");
      return;
    }
    const refusal = sessionRefusal(this.#stmt.getSession.get(proof.id), now);
    if (refusal !== undefined) throw refusal;
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
    this.#db
      .transaction(() => {
        this.#stmt.recordCert.run(cert.serial, cert.notAfter.getTime(), at.getTime(), deviceId);
        // Why: kept even when the device was revoked meanwhile, so the certificate reaches the CRL.
        this.#stmt.insertCert.run(cert.serial, deviceId, cert.notAfter.getTime(), at.getTime());
      })
      .immediate();
  }

  async listRevokedCertificates(now: Date): Promise<RevokedCertificate[]> {
    return this.#stmt.revokedCerts.all(now.getTime()).map((r) => ({
      serial: r.serial,
      deviceId: r.device_id,
      notAfter: new Date(r.not_after),
      revokedAt: new Date(r.revoked_at),
    }));
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
      const changed = this.#stmt.replaceKey.run(replaceKeyParams(input)).changes;
      if (changed !== 1) throw refused("ERR_ROTATION_CONFLICT", "the device key changed during the rotation");
      this.#stmt.insertCert.run(
        input.certSerial,
        input.deviceId,
        input.certNotAfter.getTime(),
        input.at.getTime(),
      );
      return this.#mustGet(input.deviceId);
    });
    const d = tx.immediate();
    this.#changed(d.deviceId);
    return d;
  }

  async revokeDevice(deviceId: string, at: Date): Promise<DeviceRecord> {
    const tx = this.#db.transaction((): DeviceRecord => {
      const d = this.#deviceBy(this.#stmt.getDevice.get(deviceId));
      if (d === undefined) throw refused("ERR_DEVICE_UNKNOWN", `no device ${deviceId}`);
      this.#stmt.revokeDevice.run(at.getTime(), at.getTime(), deviceId);
      return this.#mustGet(deviceId);
    });
    const d = tx.immediate();
    this.#changed(d.deviceId);
    return d;
  }

  async allowReenrolment(
    deviceId: string,
    at: Date,
  ): Promise<{ device: DeviceRecord; releasedEkHash: string | undefined }> {
    const tx = this.#db.transaction(() => {
      const d = this.#deviceBy(this.#stmt.getDevice.get(deviceId));
      if (d === undefined) throw refused("ERR_DEVICE_UNKNOWN", `no device ${deviceId}`);
      // Security: the old identity dies with the release (revoked: CRL, no tokens); only then may
      // the EK enrol again, so no moment exists in which two live identities share one TPM.
      this.#stmt.releaseEk.run(at.getTime(), at.getTime(), deviceId);
      return { device: this.#mustGet(deviceId), releasedEkHash: d.ekHash };
    });
    const r = tx.immediate();
    this.#changed(deviceId);
    return r;
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
