import pg from "pg";
import { M2mError } from "../../core/errors.js";
import { Secret } from "../../core/secret.js";
import { MIGRATIONS, SCHEMA_VERSION } from "./migrations.js";
import {
  matchHardware as matchRules,
  refused,
  rotationRefusal,
  schemaNewer,
  sessionRefusal,
} from "./refusals.js";
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

export interface PgStoreOptions {
  /** Connections in this replica's pool (default 10). */
  readonly poolMax?: number;
  /** Apply pending migrations at open (under the advisory lock). Default false: `db migrate` does it. */
  readonly migrate?: boolean;
  /** Per-statement timeout (ms, default 15 000): a stuck query must not hold a request forever. */
  readonly statementTimeoutMs?: number;
  /** `application_name` shown in pg_stat_activity (default `m2m-registrar`). */
  readonly applicationName?: string;
}

/** LISTEN/NOTIFY channel carrying the deviceId of every device change. */
export const DEVICE_CHANNEL = "m2m_device";
/** Key of the advisory lock that serialises migrations across replicas. */
const MIGRATION_LOCK = 0x6d326d72; // "m2mr"

type Queryable = Pick<pg.PoolClient, "query">;

// BIGINT (int8, oid 20) columns hold epoch milliseconds: well inside 2^53, so parse as numbers.
const types = {
  getTypeParser: ((oid: number, format?: "text" | "binary") =>
    oid === 20
      ? (v: string) => Number(v)
      : pg.types.getTypeParser(oid, format)) as pg.CustomTypesConfig["getTypeParser"],
};

/** Redacts the password (and any query) of a connection URL for logs and errors. */
export function redactStoreUrl(url: string): string {
  try {
    const u = new URL(url);
    if (u.password !== "") u.password = "***";
    const host = u.searchParams.get("host");
    return `${u.protocol}//${u.username === "" ? "" : `${u.username}${u.password === "" ? "" : ":***"}@`}${u.host}${u.pathname}${host === null ? "" : `?host=${host}`}`;
  } catch {
    return "<unparseable store url>";
  }
}

function pgCode(err: unknown): string | undefined {
  if (typeof err !== "object" || err === null) return undefined;
  const c = (err as { code?: unknown }).code;
  return typeof c === "string" && /^[0-9A-Z]{5}$/.test(c) ? c : undefined;
}

/** Maps driver/database failures to coded errors; never includes the connection URL. */
function storeError(err: unknown): M2mError {
  if (err instanceof M2mError) return err;
  const code = pgCode(err);
  if (code === "40001" || code === "40P01") {
    return new M2mError("ERR_STORE_CONFLICT", "transient", "database transaction conflict", { cause: err });
  }
  if (code === undefined || code.startsWith("08") || code.startsWith("57") || code === "53300") {
    return new M2mError("ERR_STORE_UNAVAILABLE", "transient", "the registrar database is unavailable", {
      cause: err,
      hint: "check that PostgreSQL is running and [store] url is right",
    });
  }
  return new M2mError("ERR_STORE_QUERY", "permanent", `database error ${code}`, { cause: err });
}

/**
 * PostgreSQL registry (node-postgres): the store for several stateless registrar replicas. Every
 * decision is one atomic statement (INSERT ... ON CONFLICT, conditional UPDATE ... RETURNING) or a
 * short READ COMMITTED transaction whose races end in a unique-constraint violation that is mapped to
 * the same typed error the SQLite store gives, so concurrent replicas resolve in the database.
 * Device changes are announced with NOTIFY (channel `m2m_device`) in the same transaction.
 */
const INSERT_CERT =
  "INSERT INTO certificates (serial, device_id, not_after, issued_at) VALUES ($1, $2, $3, $4) ON CONFLICT (serial) DO NOTHING";

export class PgRegistrarStore implements RegistrarStore {
  readonly #pool: pg.Pool;
  readonly #config: pg.ClientConfig;
  readonly #auditBuffer: string[] = [];
  #auditTimer: NodeJS.Timeout | undefined;
  #auditFlush: Promise<void> = Promise.resolve();
  readonly #listeners = new Set<(deviceId: string) => void>();
  #listener: pg.Client | undefined;
  #listenerRetry: NodeJS.Timeout | undefined;
  #closed = false;
  /** What the last `migrate()` of this instance did (for `db migrate`'s report). */
  lastMigration: { from: number; to: number } | undefined;

  private constructor(config: pg.ClientConfig, poolMax: number) {
    this.#config = config;
    this.#pool = new pg.Pool({ ...config, max: poolMax, idleTimeoutMillis: 30_000 });
    // An idle client's error (server restart) must not crash the process; the next query reconnects.
    this.#pool.on("error", () => undefined);
  }

  /**
   * Connects (and migrates when asked).
   * @throws ERR_STORE_UNAVAILABLE, ERR_STORE_SCHEMA_OLD (not migrated and `migrate` false),
   *   ERR_STORE_SCHEMA_NEWER
   */
  static async open(url: Secret | string, options: PgStoreOptions = {}): Promise<PgRegistrarStore> {
    const connectionString = url instanceof Secret ? url.reveal() : url;
    const config: pg.ClientConfig = {
      connectionString,
      types,
      application_name: options.applicationName ?? "m2m-registrar",
      statement_timeout: options.statementTimeoutMs ?? 15_000,
      connectionTimeoutMillis: 10_000,
    };
    const store = new PgRegistrarStore(config, options.poolMax ?? 10);
    try {
      if (options.migrate === true) await store.migrate();
      const v = await store.schemaVersion();
      if (v > SCHEMA_VERSION) throw schemaNewer(v);
      if (v < SCHEMA_VERSION) {
        throw new M2mError(
          "ERR_STORE_SCHEMA_OLD",
          "permanent",
          `the database schema is at version ${v}, this registrar needs ${SCHEMA_VERSION}`,
          { hint: "run `m2m-registrar db migrate --config FILE` (or set [store] auto_migrate = true)" },
        );
      }
    } catch (err) {
      await store.#pool.end().catch(() => undefined);
      throw storeError(err);
    }
    return store;
  }

  /**
   * Applies pending migrations, each in its own transaction, holding a session-level advisory lock
   * so replicas starting at once migrate exactly once (the others wait, then find nothing to do).
   */
  async migrate(): Promise<{ from: number; to: number }> {
    const c = await this.#pool.connect().catch((err: unknown) => {
      throw storeError(err);
    });
    try {
      await c.query("SELECT pg_advisory_lock($1)", [MIGRATION_LOCK]);
      try {
        await c.query(
          "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
        );
        const from = await currentVersion(c);
        if (from > SCHEMA_VERSION) throw schemaNewer(from);
        for (const m of MIGRATIONS) {
          if (m.version <= from) continue;
          await c.query("BEGIN");
          try {
            await c.query(m.postgres);
            await c.query("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)", [
              m.version,
              m.name,
              Date.now(),
            ]);
            await c.query("COMMIT");
          } catch (err) {
            await c.query("ROLLBACK").catch(() => undefined);
            throw new M2mError("ERR_STORE_MIGRATION", "permanent", `migration ${m.version} failed`, {
              cause: err,
            });
          }
        }
        this.lastMigration = { from, to: await currentVersion(c) };
        return this.lastMigration;
      } finally {
        await c.query("SELECT pg_advisory_unlock($1)", [MIGRATION_LOCK]).catch(() => undefined);
      }
    } catch (err) {
      throw storeError(err);
    } finally {
      c.release();
    }
  }

  async schemaVersion(): Promise<number> {
    const r = await this.#q<{ t: string | null }>("SELECT to_regclass('schema_migrations')::text AS t");
    if (r.rows[0]?.t === null || r.rows[0]?.t === undefined) return 0;
    return currentVersion(this.#pool);
  }

  async #q<R extends pg.QueryResultRow>(sql: string, params: unknown[] = []): Promise<pg.QueryResult<R>> {
    try {
      return await this.#pool.query<R>(sql, params);
    } catch (err) {
      throw storeError(err);
    }
  }

  async #tx<T>(fn: (c: pg.PoolClient) => Promise<T>): Promise<T> {
    let c: pg.PoolClient;
    try {
      c = await this.#pool.connect();
    } catch (err) {
      throw storeError(err);
    }
    try {
      await c.query("BEGIN");
      const out = await fn(c);
      await c.query("COMMIT");
      return out;
    } catch (err) {
      await c.query("ROLLBACK").catch(() => undefined);
      throw storeError(err);
    } finally {
      c.release();
    }
  }

  // --- groups and tokens ----------------------------------------------------------------------------

  async addGroup(group: NewEnrolmentGroup): Promise<EnrolmentGroup> {
    const r = await this.#q(
      `INSERT INTO groups (name, role, attributes, methods, ek_trust_dir, ek_allow, created_at)
       VALUES ($1,$2,$3,$4,$5,$6,$7) ON CONFLICT (name) DO NOTHING`,
      groupParams(group),
    );
    if (r.rowCount !== 1) throw refused("ERR_GROUP_EXISTS", `enrolment group ${group.name} already exists`);
    return group;
  }

  async getGroup(name: string): Promise<EnrolmentGroup | undefined> {
    const row = (await this.#q<GroupRow>("SELECT * FROM groups WHERE name = $1", [name])).rows[0];
    return row === undefined ? undefined : groupOf(row);
  }

  async listGroups(): Promise<EnrolmentGroup[]> {
    return (await this.#q<GroupRow>("SELECT * FROM groups ORDER BY name")).rows.map(groupOf);
  }

  async addBootstrapToken(token: NewBootstrapToken): Promise<void> {
    try {
      await this.#pool.query(
        "INSERT INTO bootstrap_tokens (hash, group_name, expires_at, created_at) VALUES ($1,$2,$3,$4)",
        tokenParams(token),
      );
    } catch (err) {
      if (pgCode(err) === "23503")
        throw refused("ERR_GROUP_UNKNOWN", `enrolment group ${token.group} does not exist`);
      throw storeError(err);
    }
  }

  async removeGroup(name: string): Promise<{ tokensRemoved: number }> {
    return this.#tx(async (c) => {
      const g = await c.query("SELECT name FROM groups WHERE name = $1 FOR UPDATE", [name]);
      if (g.rowCount !== 1) throw refused("ERR_GROUP_UNKNOWN", `enrolment group ${name} does not exist`);
      const t = await c.query("DELETE FROM bootstrap_tokens WHERE group_name = $1", [name]);
      // The group's attestation policy goes with it (it references the group).
      await c.query("DELETE FROM attestation_policies WHERE group_name = $1", [name]);
      await c.query("DELETE FROM groups WHERE name = $1", [name]);
      return { tokensRemoved: t.rowCount ?? 0 };
    });
  }

  async listBootstrapTokens(): Promise<BootstrapTokenRecord[]> {
    return (
      await this.#q<TokenRow>("SELECT * FROM bootstrap_tokens ORDER BY created_at DESC, hash")
    ).rows.map(tokenOf);
  }

  async revokeBootstrapToken(hash: string, at: Date): Promise<BootstrapTokenRecord> {
    return this.#tx(async (c) => {
      const row = (
        await c.query<TokenRow>("SELECT * FROM bootstrap_tokens WHERE hash = $1 FOR UPDATE", [hash])
      ).rows[0];
      if (row === undefined) throw refused("ERR_TOKEN_INVALID", "no such bootstrap token");
      if (row.used_at !== null)
        throw refused("ERR_TOKEN_USED", "bootstrap token already used: revoke the device it enrolled");
      const r = await c.query<TokenRow>(
        "UPDATE bootstrap_tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE hash = $2 RETURNING *",
        [at.getTime(), hash],
      );
      return tokenOf(r.rows[0] as TokenRow);
    });
  }

  async recordFailedActivation(
    id: string,
    maxAttempts: number,
    now: Date,
  ): Promise<{ attempts: number; discarded: boolean }> {
    // One statement: concurrent failures at several replicas each count, and the one reaching the
    // limit discards the session.
    const r = await this.#q<SessionRow>(
      `UPDATE sessions SET failed_attempts = failed_attempts + 1,
         consumed_at = CASE WHEN failed_attempts + 1 >= $1 THEN $2::bigint ELSE NULL END
       WHERE id = $3 AND consumed_at IS NULL RETURNING *`,
      [maxAttempts, now.getTime(), id],
    );
    const row = r.rows[0];
    if (row !== undefined)
      return { attempts: Number(row.failed_attempts), discarded: row.consumed_at !== null };
    const exists = (await this.#q("SELECT 1 FROM sessions WHERE id = $1", [id])).rowCount === 1;
    throw exists
      ? refused("ERR_SESSION_CONSUMED", "enrolment session already used or discarded")
      : refused("ERR_SESSION_UNKNOWN", "enrolment session not found");
  }

  async getBootstrapToken(hash: string): Promise<BootstrapTokenRecord | undefined> {
    const row = (await this.#q<TokenRow>("SELECT * FROM bootstrap_tokens WHERE hash = $1", [hash])).rows[0];
    return row === undefined ? undefined : tokenOf(row);
  }

  // --- enrolment sessions ---------------------------------------------------------------------------

  async createSession(session: NewEnrolmentSession): Promise<void> {
    await this.#q("INSERT INTO sessions (id, data, created_at, expires_at) VALUES ($1,$2,$3,$4)", [
      session.id,
      JSON.stringify(session.data),
      session.createdAt.getTime(),
      session.expiresAt.getTime(),
    ]);
  }

  async getSession(id: string): Promise<EnrolmentSession | undefined> {
    const row = (await this.#q<SessionRow>("SELECT * FROM sessions WHERE id = $1", [id])).rows[0];
    return row === undefined ? undefined : sessionOf(row);
  }

  async purgeExpiredSessions(now: Date): Promise<number> {
    const t = now.getTime();
    let n = 0;
    n += (await this.#q("DELETE FROM sessions WHERE expires_at <= $1", [t])).rowCount ?? 0;
    n += (await this.#q("DELETE FROM rotation_sessions WHERE expires_at <= $1", [t])).rowCount ?? 0;
    n += (await this.#q("DELETE FROM once_keys WHERE expires_at < $1", [t])).rowCount ?? 0;
    return n;
  }

  // --- devices --------------------------------------------------------------------------------------

  async getDevice(deviceId: string): Promise<DeviceRecord | undefined> {
    const row = (await this.#q<DeviceRow>("SELECT * FROM devices WHERE device_id = $1", [deviceId])).rows[0];
    return row === undefined ? undefined : deviceOf(row);
  }

  async findDeviceByEkHash(ekHash: string): Promise<DeviceRecord | undefined> {
    const row = (await this.#q<DeviceRow>("SELECT * FROM devices WHERE ek_hash = $1", [ekHash])).rows[0];
    return row === undefined ? undefined : deviceOf(row);
  }

  async findDeviceByThumbprint(thumbprint: string): Promise<DeviceRecord | undefined> {
    const row = (await this.#q<DeviceRow>("SELECT * FROM devices WHERE thumbprint = $1", [thumbprint]))
      .rows[0];
    return row === undefined ? undefined : deviceOf(row);
  }

  async listDevices(): Promise<DeviceRecord[]> {
    return (await this.#q<DeviceRow>("SELECT * FROM devices ORDER BY created_at, device_id")).rows.map(
      deviceOf,
    );
  }

  async planEnrolment(input: PlanEnrolment): Promise<{ deviceId: string; existing: boolean }> {
    const existing = await matchHardware(this.#pool, input, false);
    return existing === undefined
      ? { deviceId: input.proposedDeviceId, existing: false }
      : { deviceId: existing.deviceId, existing: true };
  }

  async commitEnrolment(input: CommitEnrolment): Promise<CommitResult> {
    try {
      return await this.#tx(async (c): Promise<CommitResult> => {
        const now = input.now.getTime();
        await consumeProof(c, input, now);
        // FOR UPDATE: a re-issue and a concurrent revocation or rotation of the same device serialise.
        const existing = await matchHardware(c, input, true);
        if (existing !== undefined) {
          // The certificate was issued for the planned deviceId; a concurrent enrolment changed it.
          if (existing.deviceId !== input.deviceId)
            throw refused("ERR_KEY_ALREADY_REGISTERED", "this device key is already registered");
          const r = await c.query<DeviceRow>(
            `UPDATE devices SET group_name = $1, role = $2, attributes = $3, evidence = $4, cert_serial = $5,
               cert_not_after = $6, updated_at = $7 WHERE device_id = $8 AND status = 'active' RETURNING *`,
            reissueParams(input, existing.deviceId, now),
          );
          const row = r.rows[0];
          // Security: revoked between the match and the update (cannot happen under FOR UPDATE; belt and braces).
          if (row === undefined) throw refused("ERR_DEVICE_REVOKED", "the device is revoked");
          await c.query(INSERT_CERT, [
            input.certSerial,
            existing.deviceId,
            input.certNotAfter.getTime(),
            now,
          ]);
          await c.query("SELECT pg_notify($1, $2)", [DEVICE_CHANNEL, existing.deviceId]);
          return { device: deviceOf(row), reenrolled: true };
        }
        // Security: a concurrent enrolment of the same EK or key (another replica) inserted first: the
        // unique constraints refuse this one and the whole transaction (proof included) rolls back.
        const r = await c.query<DeviceRow>(
          `INSERT INTO devices (device_id, method, status, group_name, role, attributes, public_jwk, thumbprint,
             ek_hash, hardware_serial, evidence, cert_serial, cert_not_after, created_at, updated_at)
           VALUES ($1, $2, 'active', $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13) RETURNING *`,
          newDeviceParams(input, now),
        );
        const row = r.rows[0];
        if (row === undefined)
          throw new M2mError("ERR_INTERNAL", "permanent", "device insert returned nothing");
        await c.query(INSERT_CERT, [input.certSerial, input.deviceId, input.certNotAfter.getTime(), now]);
        return { device: deviceOf(row), reenrolled: false };
      });
    } catch (err) {
      throw uniqueViolation(err) ?? err;
    }
  }

  async revokeDevice(deviceId: string, at: Date): Promise<DeviceRecord> {
    return this.#tx(async (c) => {
      const t = at.getTime();
      await c.query(
        "UPDATE devices SET status = 'revoked', revoked_at = $1, updated_at = $1 WHERE device_id = $2 AND status = 'active'",
        [t, deviceId],
      );
      const row = (await c.query<DeviceRow>("SELECT * FROM devices WHERE device_id = $1", [deviceId]))
        .rows[0];
      if (row === undefined) throw refused("ERR_DEVICE_UNKNOWN", `no device ${deviceId}`);
      // Delivered at commit, to every replica LISTENing: their caches drop the device at once.
      await c.query("SELECT pg_notify($1, $2)", [DEVICE_CHANNEL, deviceId]);
      return deviceOf(row);
    });
  }

  async allowReenrolment(
    deviceId: string,
    at: Date,
  ): Promise<{ device: DeviceRecord; releasedEkHash: string | undefined }> {
    return this.#tx(async (c) => {
      const t = at.getTime();
      const before = (
        await c.query<DeviceRow>("SELECT * FROM devices WHERE device_id = $1 FOR UPDATE", [deviceId])
      ).rows[0];
      if (before === undefined) throw refused("ERR_DEVICE_UNKNOWN", `no device ${deviceId}`);
      // Security: the old identity dies with the release (revoked: CRL, no tokens); only then may
      // the EK enrol again, so no moment exists in which two live identities share one TPM.
      const row = (
        await c.query<DeviceRow>(
          "UPDATE devices SET status = 'revoked', revoked_at = COALESCE(revoked_at, $1), updated_at = $1, ek_hash = NULL WHERE device_id = $2 RETURNING *",
          [t, deviceId],
        )
      ).rows[0];
      if (row === undefined) throw refused("ERR_DEVICE_UNKNOWN", `no device ${deviceId}`);
      await c.query("SELECT pg_notify($1, $2)", [DEVICE_CHANNEL, deviceId]);
      return { device: deviceOf(row), releasedEkHash: deviceOf(before).ekHash };
    });
  }

  async recordCertificate(
    deviceId: string,
    cert: { serial: string; notAfter: Date },
    at: Date,
  ): Promise<void> {
    await this.#tx(async (c) => {
      await c.query(
        "UPDATE devices SET cert_serial = $1, cert_not_after = $2, updated_at = $3 WHERE device_id = $4 AND status = 'active'",
        [cert.serial, cert.notAfter.getTime(), at.getTime(), deviceId],
      );
      // Why: kept even when the device was revoked meanwhile, so the certificate reaches the CRL.
      await c.query(INSERT_CERT, [cert.serial, deviceId, cert.notAfter.getTime(), at.getTime()]);
    });
  }

  async listRevokedCertificates(now: Date): Promise<RevokedCertificate[]> {
    const r = await this.#q<{ serial: string; device_id: string; not_after: string; revoked_at: string }>(
      `SELECT c.serial, c.device_id, c.not_after, d.revoked_at FROM devices d
         JOIN certificates c ON c.device_id = d.device_id
        WHERE d.status = 'revoked' AND c.not_after > $1 ORDER BY c.serial`,
      [now.getTime()],
    );
    return r.rows.map((x) => ({
      serial: x.serial,
      deviceId: x.device_id,
      notAfter: new Date(Number(x.not_after)),
      revokedAt: new Date(Number(x.revoked_at)),
    }));
  }

  async replaceDeviceKey(input: ReplaceDeviceKey): Promise<DeviceRecord> {
    try {
      return await this.#tx(async (c) => {
        const d = (
          await c.query<DeviceRow>("SELECT * FROM devices WHERE device_id = $1 FOR UPDATE", [input.deviceId])
        ).rows[0];
        if (d === undefined) throw refused("ERR_DEVICE_UNKNOWN", `no device ${input.deviceId}`);
        // Security: a revoked identity gets no new key.
        if (d.status !== "active") throw refused("ERR_DEVICE_REVOKED", "the device is revoked");
        // Security: the rotation was authorised by the key the device had then; a concurrent rotation wins.
        if (d.thumbprint !== input.previousThumbprint)
          throw refused("ERR_ROTATION_CONFLICT", "the device key changed during the rotation");
        const other = await c.query("SELECT 1 FROM devices WHERE thumbprint = $1", [input.thumbprint]);
        // Security: a key registered to any device (this one included) is never accepted as "new".
        if ((other.rowCount ?? 0) > 0)
          throw refused("ERR_KEY_ALREADY_REGISTERED", "this device key is already registered");
        const r = await c.query<DeviceRow>(
          `UPDATE devices SET public_jwk = $1, thumbprint = $2, evidence = $3, cert_serial = $4, cert_not_after = $5,
             updated_at = $6 WHERE device_id = $7 AND thumbprint = $8 AND status = 'active' RETURNING *`,
          replaceKeyParams(input),
        );
        const row = r.rows[0];
        if (row === undefined)
          throw refused("ERR_ROTATION_CONFLICT", "the device key changed during the rotation");
        await c.query(INSERT_CERT, [
          input.certSerial,
          input.deviceId,
          input.certNotAfter.getTime(),
          input.at.getTime(),
        ]);
        await c.query("SELECT pg_notify($1, $2)", [DEVICE_CHANNEL, input.deviceId]);
        return deviceOf(row);
      });
    } catch (err) {
      throw uniqueViolation(err) ?? err;
    }
  }

  // --- one-time keys, rotation sessions, shared secrets ----------------------------------------------

  async consumeOnce(key: string, expiresAt: Date, now: Date): Promise<boolean> {
    // One statement: the conflicting row is locked, so of two replicas inserting one key exactly one
    // gets a row back (an expired record is taken over; a live one is a replay).
    const r = await this.#q(
      `INSERT INTO once_keys (key, expires_at) VALUES ($1, $2)
       ON CONFLICT (key) DO UPDATE SET expires_at = EXCLUDED.expires_at WHERE once_keys.expires_at < $3`,
      [key, expiresAt.getTime(), now.getTime()],
    );
    return r.rowCount === 1;
  }

  async isConsumed(key: string, now: Date): Promise<boolean> {
    const r = await this.#q("SELECT 1 FROM once_keys WHERE key = $1 AND expires_at >= $2", [
      key,
      now.getTime(),
    ]);
    return (r.rowCount ?? 0) > 0;
  }

  async createRotationSession(session: RotationSessionRecord): Promise<void> {
    await this.#tx(async (c) => {
      await c.query("DELETE FROM rotation_sessions WHERE device_id = $1 AND consumed_at IS NULL", [
        session.deviceId,
      ]);
      await c.query(
        "INSERT INTO rotation_sessions (id, device_id, current_thumbprint, nonce, expires_at) VALUES ($1,$2,$3,$4,$5)",
        [session.id, session.deviceId, session.currentThumbprint, session.nonce, session.expiresAt.getTime()],
      );
    });
  }

  async takeRotationSession(id: string, deviceId: string, now: Date): Promise<RotationSessionRecord> {
    const t = now.getTime();
    const r = await this.#q<RotationRow>(
      `UPDATE rotation_sessions SET consumed_at = $1
       WHERE id = $2 AND device_id = $3 AND consumed_at IS NULL AND expires_at > $1 RETURNING *`,
      [t, id, deviceId],
    );
    const row = r.rows[0];
    if (row !== undefined) return rotationOf(row);
    const s = (await this.#q<RotationRow>("SELECT * FROM rotation_sessions WHERE id = $1", [id])).rows[0];
    // The conditional UPDATE matched nothing: say which rule refused it.
    throw rotationRefusal(s, deviceId, t) ?? refused("ERR_SESSION_EXPIRED", "session expired");
  }

  async putAttestationPolicy(policy: NewAttestationPolicy): Promise<AttestationPolicy> {
    try {
      // One statement: the version bump is atomic under concurrent operators.
      const r = await this.#pool.query<{ version: number }>(
        "INSERT INTO attestation_policies (group_name, version, policy, updated_at) VALUES ($1, 1, $2, $3) " +
          "ON CONFLICT (group_name) DO UPDATE SET version = attestation_policies.version + 1, " +
          "policy = EXCLUDED.policy, updated_at = EXCLUDED.updated_at RETURNING version",
        [policy.group, policyJson(policy), policy.updatedAt.getTime()],
      );
      return { ...policy, version: Number(r.rows[0]?.version ?? 1) };
    } catch (err) {
      if (pgCode(err) === "23503")
        throw refused("ERR_GROUP_UNKNOWN", `enrolment group ${policy.group} does not exist`);
      throw storeError(err);
    }
  }

  async getAttestationPolicy(group: string): Promise<AttestationPolicy | undefined> {
    const row = (
      await this.#q<PolicyRow>("SELECT * FROM attestation_policies WHERE group_name = $1", [group])
    ).rows[0];
    return row === undefined ? undefined : policyOf(row);
  }

  async putDeviceAttestation(record: DeviceAttestation): Promise<void> {
    await this.#q(
      "INSERT INTO device_attestation (device_id, record, updated_at) VALUES ($1, $2, $3) " +
        "ON CONFLICT (device_id) DO UPDATE SET record = EXCLUDED.record, updated_at = EXCLUDED.updated_at",
      [record.deviceId, deviceAttestationJson(record), record.at.getTime()],
    );
  }

  async getDeviceAttestation(deviceId: string): Promise<DeviceAttestation | undefined> {
    const row = (
      await this.#q<DeviceAttestationRow>("SELECT * FROM device_attestation WHERE device_id = $1", [deviceId])
    ).rows[0];
    return row === undefined ? undefined : deviceAttestationOf(row);
  }

  async sharedSecret(name: string, create: () => Buffer): Promise<Buffer> {
    const have = (
      await this.#q<{ value: Buffer }>("SELECT value FROM shared_secrets WHERE name = $1", [name])
    ).rows[0];
    if (have !== undefined) return have.value;
    // First writer wins; everyone then reads the winner's value.
    await this.#q(
      "INSERT INTO shared_secrets (name, value, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
      [name, create(), Date.now()],
    );
    const row = (await this.#q<{ value: Buffer }>("SELECT value FROM shared_secrets WHERE name = $1", [name]))
      .rows[0];
    if (row === undefined) throw new M2mError("ERR_INTERNAL", "permanent", "shared secret vanished");
    return row.value;
  }

  // --- change notification --------------------------------------------------------------------------

  onDeviceChange(listener: (deviceId: string) => void): () => void {
    this.#listeners.add(listener);
    if (this.#listener === undefined && this.#listenerRetry === undefined) this.#listen();
    return () => this.#listeners.delete(listener);
  }

  /** Whether the LISTEN connection is up (tests; caches fall back to their TTL while it is down). */
  get listening(): boolean {
    return this.#listener !== undefined;
  }

  #listen(): void {
    if (this.#closed) return;
    const client = new pg.Client(this.#config);
    const retry = (): void => {
      if (this.#listener === client) this.#listener = undefined;
      client.removeAllListeners();
      client.on("error", () => undefined);
      client.end().catch(() => undefined);
      if (this.#closed || this.#listenerRetry !== undefined) return;
      // Reconnect after a second; meanwhile caches rely on their TTL (the poll fallback).
      this.#listenerRetry = setTimeout(() => {
        this.#listenerRetry = undefined;
        this.#listen();
      }, 1000);
      this.#listenerRetry.unref();
    };
    client.on("error", retry);
    client.on("end", retry);
    client.on("notification", (msg) => {
      if (msg.channel !== DEVICE_CHANNEL || msg.payload === undefined) return;
      for (const l of this.#listeners) {
        try {
          l(msg.payload);
        } catch {
          // A cache's failure must not stop the others being told.
        }
      }
    });
    client
      .connect()
      .then(() => client.query(`LISTEN ${DEVICE_CHANNEL}`))
      .then(() => {
        if (this.#closed) {
          void client.end().catch(() => undefined);
          return;
        }
        this.#listener = client;
      })
      .catch(retry);
  }

  // --- audit ----------------------------------------------------------------------------------------

  /** Buffered, written in batches within ~50 ms (the JSON-lines file is the primary audit trail). */
  async appendAudit(event: AuditEvent): Promise<void> {
    this.#auditBuffer.push(JSON.stringify(event));
    if (this.#auditTimer === undefined) {
      this.#auditTimer = setTimeout(() => {
        void this.#flushAudit().catch(() => undefined);
      }, 50);
      this.#auditTimer.unref();
    }
  }

  #flushAudit(): Promise<void> {
    if (this.#auditTimer !== undefined) clearTimeout(this.#auditTimer);
    this.#auditTimer = undefined;
    const rows = this.#auditBuffer.splice(0);
    const run = async (): Promise<void> => {
      if (rows.length === 0) return;
      await this.#q("INSERT INTO audit (event) SELECT unnest($1::text[])", [rows]);
    };
    this.#auditFlush = this.#auditFlush.then(run, run);
    return this.#auditFlush;
  }

  async listAudit(limit: number): Promise<AuditEvent[]> {
    await this.#flushAudit();
    const r = await this.#q<{ event: string }>("SELECT event FROM audit ORDER BY id DESC LIMIT $1", [limit]);
    return r.rows.map((row) => JSON.parse(row.event) as AuditEvent).reverse();
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    await this.#flushAudit().catch(() => undefined);
    this.#closed = true;
    if (this.#listenerRetry !== undefined) clearTimeout(this.#listenerRetry);
    const l = this.#listener;
    this.#listener = undefined;
    if (l !== undefined) {
      l.removeAllListeners();
      l.on("error", () => undefined);
      await l.end().catch(() => undefined);
    }
    await this.#pool.end();
  }
}

async function currentVersion(c: Queryable | pg.Pool): Promise<number> {
  const r = await c.query<{ v: number | null }>("SELECT MAX(version) AS v FROM schema_migrations");
  return r.rows[0]?.v ?? 0;
}

/** A unique-constraint violation from a concurrent enrolment/rotation, as the typed refusal. */
function uniqueViolation(err: unknown): M2mError | undefined {
  const cause = err instanceof M2mError ? err.cause : err;
  if (pgCode(cause) !== "23505") return undefined;
  const constraint = (cause as { constraint?: string }).constraint ?? "";
  return constraint.includes("ek_hash")
    ? refused("ERR_EK_ALREADY_REGISTERED", "this endorsement key is already registered")
    : refused("ERR_KEY_ALREADY_REGISTERED", "this device key is already registered");
}

async function consumeProof(c: Queryable, input: CommitEnrolment, now: number): Promise<void> {
  const proof = input.proof;
  if (proof.kind === "token") {
    const r = await c.query(
      `UPDATE bootstrap_tokens SET used_at = $1, used_by = $2
       WHERE hash = $3 AND group_name = $4 AND used_at IS NULL AND revoked_at IS NULL AND expires_at > $1`,
      [now, input.deviceId, proof.hash, input.group],
    );
    if (r.rowCount === 1) return;
    const row = (await c.query<TokenRow>("SELECT * FROM bootstrap_tokens WHERE hash = $1", [proof.hash]))
      .rows[0];
    // Security: the token is bound to the group it was issued for.
    if (row === undefined || row.group_name !== input.group)
      throw refused("ERR_TOKEN_INVALID", "bootstrap token not accepted");
    // Security: an operator revoked it (leaked, or issued by mistake).
    if (row.revoked_at !== null) throw refused("ERR_TOKEN_REVOKED", "bootstrap token revoked");
    // Security: bootstrap tokens are single-use (a concurrent use at another replica lost here),
    // except for the retry of the device that used it (token-retry.ts).
    if (row.used_at !== null) {
      const byRow =
        row.used_by === null
          ? undefined
          : (await c.query<DeviceRow>("SELECT * FROM devices WHERE device_id = $1 FOR UPDATE", [row.used_by]))
              .rows[0];
      if (isTokenRetry(row, byRow === undefined ? undefined : deviceOf(byRow), input, now)) return;
      throw refused("ERR_TOKEN_USED", "bootstrap token already used");
    }
    throw refused("ERR_TOKEN_EXPIRED", "bootstrap token expired");
  }
  const r = await c.query(
    "UPDATE sessions SET consumed_at = $1 WHERE id = $2 AND consumed_at IS NULL AND expires_at > $1",
    [now, proof.id],
  );
  if (r.rowCount === 1) return;
  const row = (await c.query<SessionRow>("SELECT * FROM sessions WHERE id = $1", [proof.id])).rows[0];
  // The conditional UPDATE matched nothing: say which rule refused it.
  throw sessionRefusal(row, now) ?? refused("ERR_SESSION_EXPIRED", "enrolment session expired");
}

/** Reads the devices under the request's EK and key (locked when `lock`), then applies refusals.ts. */
async function matchHardware(
  c: Queryable | pg.Pool,
  input: PlanEnrolment,
  lock: boolean,
): Promise<DeviceRecord | undefined> {
  const forUpdate = lock ? " FOR UPDATE" : "";
  const by = async (column: "ek_hash" | "thumbprint", value: string): Promise<DeviceRecord | undefined> => {
    try {
      const row = (
        await c.query<DeviceRow>(`SELECT * FROM devices WHERE ${column} = $1${forUpdate}`, [value])
      ).rows[0];
      return row === undefined ? undefined : deviceOf(row);
    } catch (err) {
      throw storeError(err);
    }
  };
  const byEk = input.ekHash === undefined ? undefined : await by("ek_hash", input.ekHash);
  return matchRules(input, byEk, await by("thumbprint", input.thumbprint));
}
