import type { Attributes, EnrolmentMethod, PcrSelection } from "../../wire/v1/index.js";

/**
 * The registrar's persistence seam. `SqliteRegistrarStore` is the embedded implementation; every
 * method is asynchronous so a shared database (PostgreSQL, `pg-store.ts`) implements the same
 * interface without touching the verifier or the routes.
 *
 * Every method that decides something security-relevant (consuming a token or a session, registering
 * a device) is atomic: the check and the write happen in one transaction, so of two concurrent callers
 * exactly one wins and the other gets a typed error.
 */
export interface RegistrarStore {
  // --- enrolment groups -------------------------------------------------------------------------
  /** @throws ERR_GROUP_EXISTS when the name is taken. */
  addGroup(group: NewEnrolmentGroup): Promise<EnrolmentGroup>;
  getGroup(name: string): Promise<EnrolmentGroup | undefined>;
  listGroups(): Promise<EnrolmentGroup[]>;
  /**
   * Removes a group and its bootstrap tokens (used or not): no new enrolment into it. Devices
   * enrolled through it keep their records (revoke them separately). @throws ERR_GROUP_UNKNOWN
   */
  removeGroup(name: string): Promise<{ tokensRemoved: number }>;

  // --- bootstrap tokens (only the SHA-256 of the token is ever stored) ---------------------------
  /** @throws ERR_GROUP_UNKNOWN */
  addBootstrapToken(token: NewBootstrapToken): Promise<void>;
  /** Read-only lookup of a token (the CLI, and pre-checks that must not consume). */
  getBootstrapToken(hash: string): Promise<BootstrapTokenRecord | undefined>;
  /** Every bootstrap token (hashes only), newest first. */
  listBootstrapTokens(): Promise<BootstrapTokenRecord[]>;
  /**
   * Marks an unused token revoked: commitEnrolment refuses it (ERR_TOKEN_REVOKED). Idempotent.
   * @throws ERR_TOKEN_INVALID (no such token), ERR_TOKEN_USED (already consumed: revoke the device)
   */
  revokeBootstrapToken(hash: string, at: Date): Promise<BootstrapTokenRecord>;

  // --- enrolment sessions (TPM begin → finish) ---------------------------------------------------
  createSession(session: NewEnrolmentSession): Promise<void>;
  getSession(id: string): Promise<EnrolmentSession | undefined>;
  /**
   * Counts one failed credential activation on an open session and, at `maxAttempts`, discards it
   * (marks it consumed) in the same atomic step. Callers count only failures from the device itself.
   * @throws ERR_SESSION_UNKNOWN, ERR_SESSION_CONSUMED
   */
  recordFailedActivation(
    id: string,
    maxAttempts: number,
    now: Date,
  ): Promise<{ attempts: number; discarded: boolean }>;
  /**
   * Removes enrolment and rotation sessions and one-time keys that expired before `now`
   * (housekeeping; never needed for correctness). Returns the number of rows removed.
   */
  purgeExpiredSessions(now: Date): Promise<number>;

  // --- devices -----------------------------------------------------------------------------------
  getDevice(deviceId: string): Promise<DeviceRecord | undefined>;
  findDeviceByEkHash(ekHash: string): Promise<DeviceRecord | undefined>;
  findDeviceByThumbprint(thumbprint: string): Promise<DeviceRecord | undefined>;
  listDevices(): Promise<DeviceRecord[]>;
  /**
   * Atomically consumes the proof (a bootstrap token or an enrolment session), then registers the
   * device or re-issues for the same hardware. Nothing is written unless every check passes.
   * @throws ERR_TOKEN_INVALID, ERR_TOKEN_USED, ERR_TOKEN_EXPIRED, ERR_SESSION_UNKNOWN,
   *   ERR_SESSION_CONSUMED, ERR_SESSION_EXPIRED, ERR_EK_ALREADY_REGISTERED, ERR_KEY_ALREADY_REGISTERED,
   *   ERR_HARDWARE_MISMATCH, ERR_DEVICE_REVOKED
   */
  commitEnrolment(input: CommitEnrolment): Promise<CommitResult>;
  /** Resolves which deviceId an enrolment would get (existing same hardware, or the proposed one). */
  planEnrolment(input: PlanEnrolment): Promise<{ deviceId: string; existing: boolean }>;
  /** @throws ERR_DEVICE_UNKNOWN. Idempotent for an already revoked device. */
  revokeDevice(deviceId: string, at: Date): Promise<DeviceRecord>;
  /**
   * Re-provisioning (operator action after a device lost its key: TPM cleared, replaced, token reset):
   * revokes the device (its certificates reach the CRL, it gets no more tokens) and releases its EK,
   * so that the same TPM can enrol again, as a NEW device. Idempotent. Returns the device and the EK
   * hash that was released (undefined when none was bound).
   * @throws ERR_DEVICE_UNKNOWN
   */
  allowReenrolment(
    deviceId: string,
    at: Date,
  ): Promise<{ device: DeviceRecord; releasedEkHash: string | undefined }>;
  /**
   * Records a certificate issued outside enrolment (EST renewal). The device record shows it only
   * while the device is active; the serial is kept in the issued-certificate list in every case, so
   * a certificate issued in a race with a revocation still reaches the CRL.
   */
  recordCertificate(deviceId: string, cert: { serial: string; notAfter: Date }, at: Date): Promise<void>;
  /**
   * Every certificate issued to a revoked device that has not expired at `now` (enrolment, EST
   * renewals and rotations alike): the entries of the fleet CA's CRL. Ordered by serial.
   */
  listRevokedCertificates(now: Date): Promise<RevokedCertificate[]>;
  /**
   * Key rotation: replaces an active device's key (JWK, thumbprint, evidence) and records the
   * certificate issued for the new key, in one transaction, only if the device still has the key
   * `previousThumbprint` (a concurrent rotation loses). Call only after the request proved both the
   * current key and the new one.
   * @throws ERR_DEVICE_UNKNOWN, ERR_DEVICE_REVOKED, ERR_ROTATION_CONFLICT, ERR_KEY_ALREADY_REGISTERED
   */
  replaceDeviceKey(input: ReplaceDeviceKey): Promise<DeviceRecord>;

  // --- one-time keys: jti replay protection and ingest dedup, shared by every replica -------------
  /**
   * Records `key` as used until `expiresAt` (inclusive). Returns false when it is already recorded and
   * still live (a replay). Atomic in the database: of two replicas presenting one key, one wins.
   * Keys are namespaced by the caller (`a|sub|jti` assertions, `p|jkt|jti` DPoP proofs, `i|dev|id` ingest).
   */
  consumeOnce(key: string, expiresAt: Date, now: Date): Promise<boolean>;
  /** Whether `key` is recorded and live (a read-only pre-check; record with consumeOnce). */
  isConsumed(key: string, now: Date): Promise<boolean>;

  // --- TPM key-rotation sessions (begin → finish, possibly at another replica) ---------------------
  /** Stores a session; any other unconsumed session of the same device is dropped (one live per device). */
  createRotationSession(session: RotationSessionRecord): Promise<void>;
  /**
   * Takes the session out (single use, whether the finish then succeeds or not) if it belongs to
   * `deviceId`; a stranger's attempt does not consume it.
   * @throws ERR_SESSION_UNKNOWN, ERR_SESSION_CONSUMED, ERR_SESSION_EXPIRED, ERR_ROTATION_SESSION_DEVICE
   */
  takeRotationSession(id: string, deviceId: string, now: Date): Promise<RotationSessionRecord>;

  // --- shared secrets (e.g. the DPoP nonce HMAC key, so every replica accepts every nonce) --------
  /** Returns the secret `name`, creating it from `create()` if absent (first writer wins). */
  sharedSecret(name: string, create: () => Buffer): Promise<Buffer>;

  // --- change notification (caches) ----------------------------------------------------------------
  /**
   * Subscribes to device changes (revocation, key replacement, re-enrolment) made through ANY store
   * instance on the same database where the backend can tell (PostgreSQL LISTEN/NOTIFY), else through
   * this instance only (SQLite). Caches must still bound their staleness themselves (fallback).
   * Returns the unsubscribe function.
   */
  onDeviceChange(listener: (deviceId: string) => void): () => void;

  // --- continuous attestation (docs/attestation.md) -----------------------------------------------
  /**
   * Creates or replaces a group's attestation policy; the version goes up by one atomically (it is
   * part of the policy identity in tokens). @throws ERR_GROUP_UNKNOWN
   */
  putAttestationPolicy(policy: NewAttestationPolicy): Promise<AttestationPolicy>;
  getAttestationPolicy(group: string): Promise<AttestationPolicy | undefined>;
  /** Records the outcome of a device's latest quote (upsert; last writer wins). */
  putDeviceAttestation(record: DeviceAttestation): Promise<void>;
  getDeviceAttestation(deviceId: string): Promise<DeviceAttestation | undefined>;

  // --- audit ---------------------------------------------------------------------------------------
  appendAudit(event: AuditEvent): Promise<void>;
  listAudit(limit: number): Promise<AuditEvent[]>;

  /** The applied schema version (see migrations.ts). */
  schemaVersion(): Promise<number>;

  /** Flushes buffered audit rows and releases the database. */
  close(): Promise<void>;
}

/** What a group's devices must prove at token time (docs/attestation.md). */
export interface NewAttestationPolicy {
  readonly group: string;
  readonly selection: PcrSelection;
  /** Approved golden values, PCR index (decimal string) → lower-case hex; undefined until approved. */
  readonly golden: Readonly<Record<string, string>> | undefined;
  /** Event log (base64url) of the device whose values were approved: lets `show` name the event that differs. */
  readonly goldenEventLog: string | undefined;
  /** Who/what the golden values came from: `operator` or `device:<id>`. */
  readonly goldenSource: string | undefined;
  /** Maximum age of the nonce a quote is qualified with, seconds (bounds the quote's age). */
  readonly maxQuoteAgeSec: number;
  /** Token requests must carry a verified quote. */
  readonly requireForTokens: boolean;
  /** EST renewals need a token whose quote was verified within maxQuoteAgeSec. */
  readonly requireForRenewal: boolean;
  /** Devices that cannot quote (PKCS#11, no AK on record): tokens without the claim, or none. */
  readonly nonAttestable: "claimless" | "refuse";
  readonly updatedAt: Date;
}
export interface AttestationPolicy extends NewAttestationPolicy {
  readonly version: number;
}

/** The clock state of a quote (TPMS_CLOCK_INFO; `clock` as a decimal string, it is a u64). */
export interface QuoteClockRecord {
  readonly clock: string;
  readonly resetCount: number;
  readonly restartCount: number;
  readonly safe: boolean;
}

/** A device's latest quote and what the registrar concluded. */
export interface DeviceAttestation {
  readonly deviceId: string;
  readonly at: Date;
  readonly outcome: "verified" | "refused";
  /** Code and one-line reason of a refusal. */
  readonly code: string | undefined;
  readonly reason: string | undefined;
  readonly policyVersion: number;
  /** PCR values of the latest authentic quote (signature, nonce and digest verified), index → hex. */
  readonly bank: string | undefined;
  readonly pcrs: Readonly<Record<string, string>> | undefined;
  /** PCR indices that differed from the golden values. */
  readonly differing: readonly number[];
  /** Clock state of the latest authentic quote (the next quote must not go backwards). */
  readonly clock: QuoteClockRecord | undefined;
  /** The latest authentic event log (base64url), if the device sends one. */
  readonly eventLog: string | undefined;
  readonly lastVerifiedAt: Date | undefined;
  /** Set on a refusal, cleared by the next verified quote: the fleet view's "look at this device". */
  readonly anomaly: { readonly code: string; readonly reason: string; readonly at: Date } | undefined;
  /** Reboots (TPM resets/restarts) seen between authentic quotes. */
  readonly reboots: number;
}

export interface RotationSessionRecord {
  readonly id: string;
  readonly deviceId: string;
  /** Thumbprint of the key that authenticated `begin` (the current key then). */
  readonly currentThumbprint: string;
  readonly nonce: Buffer;
  readonly expiresAt: Date;
}

export interface NewEnrolmentGroup {
  readonly name: string;
  readonly role: string;
  readonly attributes: Attributes;
  readonly methods: readonly EnrolmentMethod[];
  /** Folder of PEM CA certificates an EK certificate must chain to (TPM groups). */
  readonly ekTrustDir?: string | undefined;
  /** SHA-256 (hex) of allowed EK SubjectPublicKeyInfo DER (`ekFingerprint`), for TPMs without an EK cert. */
  readonly ekAllow: readonly string[];
  readonly createdAt: Date;
}
export type EnrolmentGroup = NewEnrolmentGroup;

/** A bootstrap token as issued (its hash only; the token itself is shown once and never stored). */
export interface NewBootstrapToken {
  readonly hash: string;
  readonly group: string;
  readonly expiresAt: Date;
  readonly createdAt: Date;
}

export interface BootstrapTokenRecord {
  readonly hash: string;
  readonly group: string;
  readonly expiresAt: Date;
  readonly createdAt: Date;
  readonly usedAt: Date | undefined;
  readonly usedBy: string | undefined;
  /** Set by `m2m-registrar enrollment token revoke`: the token no longer enrols anything. */
  readonly revokedAt: Date | undefined;
}

/** What `begin` remembers for `finish`. The expected secret is stored as its SHA-256 only. */
export interface SessionData {
  readonly group: string;
  readonly secretHash: string;
  /** base64url */
  readonly nonce: string;
  readonly ekHash: string;
  /** base64url TPM2B_PUBLIC of AK and device key, as sent in begin. */
  readonly akPublic: string;
  readonly ekPublic: string;
  readonly devicePublic: string;
  readonly hardwareSerial: string;
  readonly requestedAttributes: Attributes;
}

export interface NewEnrolmentSession {
  readonly id: string;
  readonly data: SessionData;
  readonly createdAt: Date;
  readonly expiresAt: Date;
}
export interface EnrolmentSession extends NewEnrolmentSession {
  readonly consumedAt: Date | undefined;
  /** Failed credential activations by the device (see `recordFailedActivation`). */
  readonly failedAttempts: number;
}

export type DeviceStatus = "active" | "revoked";

export interface DeviceRecord {
  readonly deviceId: string;
  readonly method: EnrolmentMethod;
  readonly status: DeviceStatus;
  readonly group: string;
  readonly role: string;
  readonly attributes: Attributes;
  readonly publicJwk: Record<string, string>;
  readonly thumbprint: string;
  /** SHA-256 hex of the EK SubjectPublicKeyInfo DER (TPM devices only). */
  readonly ekHash: string | undefined;
  readonly hardwareSerial: string;
  /** PKCS#11 self-asserted evidence, recorded as such. */
  readonly evidence: Record<string, unknown> | undefined;
  readonly certSerial: string;
  readonly certNotAfter: Date;
  readonly createdAt: Date;
  readonly updatedAt: Date;
  readonly revokedAt: Date | undefined;
}

export type EnrolmentProof =
  | { readonly kind: "token"; readonly hash: string }
  | { readonly kind: "session"; readonly id: string };

export interface PlanEnrolment {
  readonly method: EnrolmentMethod;
  readonly thumbprint: string;
  readonly ekHash: string | undefined;
  readonly hardwareSerial: string;
  /** Used when no existing record matches. */
  readonly proposedDeviceId: string;
}

export interface CommitEnrolment extends PlanEnrolment {
  readonly proof: EnrolmentProof;
  readonly now: Date;
  /** The deviceId the certificate was issued for (from planEnrolment). */
  readonly deviceId: string;
  readonly group: string;
  readonly role: string;
  readonly attributes: Attributes;
  readonly publicJwk: Record<string, string>;
  readonly evidence: Record<string, unknown> | undefined;
  readonly certSerial: string;
  readonly certNotAfter: Date;
}

export interface CommitResult {
  readonly device: DeviceRecord;
  /** True when an existing device (same hardware) was re-issued a certificate. */
  readonly reenrolled: boolean;
}

export interface ReplaceDeviceKey {
  readonly deviceId: string;
  readonly previousThumbprint: string;
  readonly publicJwk: Record<string, string>;
  readonly thumbprint: string;
  /** Replaces the evidence (TPM: the new key's TPM2B_PUBLIC and Name; AK/EK kept by the caller). */
  readonly evidence: Record<string, unknown> | undefined;
  readonly certSerial: string;
  readonly certNotAfter: Date;
  readonly at: Date;
}

/** One CRL entry: a certificate issued to a revoked device, not yet expired. */
export interface RevokedCertificate {
  /** Hex serial, as issued (`randomSerial`). */
  readonly serial: string;
  readonly deviceId: string;
  readonly notAfter: Date;
  readonly revokedAt: Date;
}

export interface AuditEvent {
  readonly ts: string;
  readonly event: string;
  readonly outcome: "success" | "failure";
  readonly code?: string;
  readonly method?: string;
  readonly deviceId?: string;
  readonly group?: string;
  readonly remote?: string;
  readonly [k: string]: unknown;
}
