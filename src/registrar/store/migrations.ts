/**
 * Versioned schema migrations for both registrar store backends. Each migration has a number, a name
 * and one script per dialect; `schema_migrations` records what was applied. Migrations only ever get
 * appended (never edited once released): a database at version N is upgraded by running N+1... in
 * order, each in its own transaction, under a lock (PostgreSQL: pg_advisory_lock; SQLite: BEGIN
 * IMMEDIATE, i.e. the database file's write lock), so replicas starting together migrate once.
 *
 * Timestamps are integer milliseconds since the epoch in both dialects (BIGINT in PostgreSQL), so
 * the row mapping code is shared.
 */
export interface Migration {
  readonly version: number;
  readonly name: string;
  readonly sqlite: string;
  readonly postgres: string;
}

export const MIGRATIONS: readonly Migration[] = [
  {
    version: 1,
    name: "registry: groups, bootstrap tokens, enrolment sessions, devices, audit",
    // IF NOT EXISTS: SQLite databases created before migrations existed already have these tables.
    sqlite: `
CREATE TABLE IF NOT EXISTS groups (
  name TEXT PRIMARY KEY, role TEXT NOT NULL, attributes TEXT NOT NULL, methods TEXT NOT NULL,
  ek_trust_dir TEXT, ek_allow TEXT NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS bootstrap_tokens (
  hash TEXT PRIMARY KEY, group_name TEXT NOT NULL REFERENCES groups(name), expires_at INTEGER NOT NULL,
  created_at INTEGER NOT NULL, used_at INTEGER, used_by TEXT
);
CREATE TABLE IF NOT EXISTS sessions (
  id TEXT PRIMARY KEY, data TEXT NOT NULL, created_at INTEGER NOT NULL, expires_at INTEGER NOT NULL,
  consumed_at INTEGER
);
CREATE TABLE IF NOT EXISTS devices (
  device_id TEXT PRIMARY KEY, method TEXT NOT NULL, status TEXT NOT NULL CHECK (status IN ('active','revoked')),
  group_name TEXT NOT NULL, role TEXT NOT NULL, attributes TEXT NOT NULL, public_jwk TEXT NOT NULL,
  thumbprint TEXT NOT NULL UNIQUE, ek_hash TEXT UNIQUE, hardware_serial TEXT NOT NULL, evidence TEXT,
  cert_serial TEXT NOT NULL, cert_not_after INTEGER NOT NULL, created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL, revoked_at INTEGER
);
CREATE TABLE IF NOT EXISTS audit (id INTEGER PRIMARY KEY AUTOINCREMENT, event TEXT NOT NULL);
`,
    postgres: `
CREATE TABLE groups (
  name TEXT PRIMARY KEY, role TEXT NOT NULL, attributes TEXT NOT NULL, methods TEXT NOT NULL,
  ek_trust_dir TEXT, ek_allow TEXT NOT NULL, created_at BIGINT NOT NULL
);
CREATE TABLE bootstrap_tokens (
  hash TEXT PRIMARY KEY, group_name TEXT NOT NULL REFERENCES groups(name), expires_at BIGINT NOT NULL,
  created_at BIGINT NOT NULL, used_at BIGINT, used_by TEXT
);
CREATE TABLE sessions (
  id TEXT PRIMARY KEY, data TEXT NOT NULL, created_at BIGINT NOT NULL, expires_at BIGINT NOT NULL,
  consumed_at BIGINT
);
CREATE INDEX sessions_expires ON sessions (expires_at);
CREATE TABLE devices (
  device_id TEXT PRIMARY KEY, method TEXT NOT NULL, status TEXT NOT NULL CHECK (status IN ('active','revoked')),
  group_name TEXT NOT NULL, role TEXT NOT NULL, attributes TEXT NOT NULL, public_jwk TEXT NOT NULL,
  thumbprint TEXT NOT NULL UNIQUE, ek_hash TEXT UNIQUE, hardware_serial TEXT NOT NULL, evidence TEXT,
  cert_serial TEXT NOT NULL, cert_not_after BIGINT NOT NULL, created_at BIGINT NOT NULL,
  updated_at BIGINT NOT NULL, revoked_at BIGINT
);
CREATE INDEX devices_created ON devices (created_at, device_id);
CREATE TABLE audit (id BIGSERIAL PRIMARY KEY, event TEXT NOT NULL);
`,
  },
  {
    version: 2,
    name: "stateless replicas: one-time keys (jti, ingest dedup), rotation sessions, shared secrets",
    sqlite: `
CREATE TABLE once_keys (key TEXT PRIMARY KEY, expires_at INTEGER NOT NULL);
CREATE INDEX once_keys_expires ON once_keys (expires_at);
CREATE TABLE rotation_sessions (
  id TEXT PRIMARY KEY, device_id TEXT NOT NULL, current_thumbprint TEXT NOT NULL, nonce BLOB NOT NULL,
  expires_at INTEGER NOT NULL, consumed_at INTEGER
);
CREATE INDEX rotation_sessions_device ON rotation_sessions (device_id);
CREATE TABLE shared_secrets (name TEXT PRIMARY KEY, value BLOB NOT NULL, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS sessions_expires ON sessions (expires_at);
`,
    postgres: `
CREATE TABLE once_keys (key TEXT PRIMARY KEY, expires_at BIGINT NOT NULL);
CREATE INDEX once_keys_expires ON once_keys (expires_at);
CREATE TABLE rotation_sessions (
  id TEXT PRIMARY KEY, device_id TEXT NOT NULL, current_thumbprint TEXT NOT NULL, nonce BYTEA NOT NULL,
  expires_at BIGINT NOT NULL, consumed_at BIGINT
);
CREATE INDEX rotation_sessions_device ON rotation_sessions (device_id);
CREATE TABLE shared_secrets (name TEXT PRIMARY KEY, value BYTEA NOT NULL, created_at BIGINT NOT NULL);
`,
  },
  {
    version: 3,
    name: "revocation: every certificate issued to a device, for the CRL",
    // Filled from devices.cert_serial for databases that predate this table.
    sqlite: `
CREATE TABLE certificates (
  serial TEXT PRIMARY KEY, device_id TEXT NOT NULL, not_after INTEGER NOT NULL, issued_at INTEGER NOT NULL
);
CREATE INDEX certificates_device ON certificates (device_id);
CREATE INDEX IF NOT EXISTS devices_status ON devices (status);
INSERT OR IGNORE INTO certificates (serial, device_id, not_after, issued_at)
  SELECT cert_serial, device_id, cert_not_after, updated_at FROM devices;
`,
    postgres: `
CREATE TABLE certificates (
  serial TEXT PRIMARY KEY, device_id TEXT NOT NULL, not_after BIGINT NOT NULL, issued_at BIGINT NOT NULL
);
CREATE INDEX certificates_device ON certificates (device_id);
CREATE INDEX devices_status ON devices (status);
INSERT INTO certificates (serial, device_id, not_after, issued_at)
  SELECT cert_serial, device_id, cert_not_after, updated_at FROM devices ON CONFLICT (serial) DO NOTHING;
`,
  },
  {
    version: 4,
    name: "operator commands: revoked bootstrap tokens, failed activation attempts per enrolment session",
    sqlite: `
ALTER TABLE bootstrap_tokens ADD COLUMN revoked_at INTEGER;
ALTER TABLE sessions ADD COLUMN failed_attempts INTEGER NOT NULL DEFAULT 0;
`,
    postgres: `
ALTER TABLE bootstrap_tokens ADD COLUMN revoked_at BIGINT;
ALTER TABLE sessions ADD COLUMN failed_attempts INTEGER NOT NULL DEFAULT 0;
`,
  },
  {
    version: 5,
    name: "continuous attestation: per-group policy, per-device latest quote",
    // Policies and quote records are read and written whole: JSON documents, keyed like their owners.
    sqlite: `
CREATE TABLE attestation_policies (
  group_name TEXT PRIMARY KEY REFERENCES groups(name), version INTEGER NOT NULL, policy TEXT NOT NULL,
  updated_at INTEGER NOT NULL
);
CREATE TABLE device_attestation (
  device_id TEXT PRIMARY KEY, record TEXT NOT NULL, updated_at INTEGER NOT NULL
);
`,
    postgres: `
CREATE TABLE attestation_policies (
  group_name TEXT PRIMARY KEY REFERENCES groups(name), version INTEGER NOT NULL, policy TEXT NOT NULL,
  updated_at BIGINT NOT NULL
);
CREATE TABLE device_attestation (
  device_id TEXT PRIMARY KEY, record TEXT NOT NULL, updated_at BIGINT NOT NULL
);
`,
  },
];

/** The schema version this build of the registrar expects. */
export const SCHEMA_VERSION = MIGRATIONS[MIGRATIONS.length - 1]?.version ?? 0;
