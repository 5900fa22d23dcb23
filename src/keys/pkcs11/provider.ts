import { createHash, randomBytes } from "node:crypto";
import { join } from "node:path";
import pkcs11js from "pkcs11js";
import { type Clock, systemClock } from "../../core/clock.js";
import { type ErrorCode, isM2mError, M2mError } from "../../core/errors.js";
import { type Logger, silentLogger } from "../../core/log.js";
import { type RetryPolicy, withRetry } from "../../core/retry.js";
import type { TlsClientKey } from "../capabilities.js";
import type {
  JwsAlgorithm,
  KeyAlgorithm,
  KeyEvidence,
  KeyHealth,
  KeyInfo,
  KeyProvider,
} from "../key-provider.js";
import { keyInfoFromSpki } from "../public-key.js";
import { engineTlsClient } from "./engine-tls.js";
import { ckrOf, isCkr, loadModule, PIN_FATAL, SESSION_LOST } from "./module.js";
import { describePinSource, type PinSource, readPin } from "./pin.js";
import { P256_EC_PARAMS, spkiFromEcPoint, spkiFromRsa } from "./public-key.js";
import { formatPkcs11Uri } from "./uri.js";

type Handle = pkcs11js.Handle;

export interface Pkcs11KeyProviderConfig {
  /** Path of the token's PKCS#11 module (e.g. /usr/lib/softhsm/libsofthsm2.so). */
  readonly modulePath: string;
  /** Token label (slot IDs are not stable: the token is found by label). At most 32 bytes. */
  readonly tokenLabel: string;
  /** CKA_LABEL of the device key pair. Default "m2m-device". */
  readonly keyLabel?: string;
  /** CKA_ID (hex). Optional: when absent a random 16-byte id is given to a generated key. */
  readonly keyId?: string;
  /** Default "ec-p256". */
  readonly algorithm?: KeyAlgorithm;
  readonly pin: PinSource;
  /** Sessions in the signing pool (one operation per session). Default 4. */
  readonly sessions?: number;
  /**
   * Milliseconds of synchronous signing allowed per event-loop turn before falling back to the
   * asynchronous (thread-pool) path. The sync path is ~3× cheaper per signature on SoftHSM; the budget
   * keeps the loop responsive during batches. 0 = always async. Default 2.
   */
  readonly syncBudgetMs?: number;
  readonly clock?: Clock;
  readonly logger?: Logger;
  /** Environment used to resolve `pin: { env }` and `{ credential }` (default process.env). */
  readonly env?: Readonly<Record<string, string | undefined>>;
}

interface Session {
  handle: Handle;
}

/** The sessions of one connection; replaced as a whole when the connection is rebuilt. */
class SessionPool {
  readonly #idle: Session[] = [];
  readonly #waiters: Array<{ resolve: (s: Session) => void; reject: (e: unknown) => void }> = [];
  #closed = false;

  constructor(
    readonly lib: pkcs11js.PKCS11,
    readonly slot: Handle,
    sessions: readonly Session[],
  ) {
    this.#idle.push(...sessions);
    this.size = sessions.length;
  }

  readonly size: number;

  get closed(): boolean {
    return this.#closed;
  }

  /** True when no session is in use (nothing else in flight on this pool). */
  get allIdle(): boolean {
    return this.#idle.length === this.size;
  }

  tryAcquire(): Session | undefined {
    if (this.#closed) return undefined;
    return this.#idle.pop();
  }

  acquire(): Promise<Session> {
    if (this.#closed) return Promise.reject(poolClosedError(this.#closedBy));
    const s = this.#idle.pop();
    if (s !== undefined) return Promise.resolve(s);
    return new Promise((resolve, reject) => this.#waiters.push({ resolve, reject }));
  }

  /**
   * Returns a session to the pool. `stuck`: an operation may still be active on it (CKR_OPERATION_ACTIVE);
   * PKCS#11 2.x has no way to cancel it, so the session is replaced by a fresh one (which inherits the
   * application's login state).
   */
  release(s: Session, stuck = false): void {
    if (this.#closed) {
      closeQuietly(this.lib, s.handle);
      return;
    }
    if (stuck) {
      closeQuietly(this.lib, s.handle);
      try {
        s.handle = this.lib.C_OpenSession(this.slot, SESSION_FLAGS);
      } catch {
        // Cannot replace it now: the pool shrinks by one; a reconnect restores the full size.
        return;
      }
    }
    const w = this.#waiters.shift();
    if (w !== undefined) w.resolve(s);
    else this.#idle.push(s);
  }

  /**
   * Closes idle sessions now, busy ones when released. Waiters fail: after a rebuild with a transient
   * error (they retry on the new pool), after `close()` with ERR_PKCS11_CLOSED.
   */
  close(by: "rebuild" | "close"): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#closedBy = by;
    for (const s of this.#idle.splice(0)) closeQuietly(this.lib, s.handle);
    for (const w of this.#waiters.splice(0)) w.reject(poolClosedError(by));
  }

  #closedBy: "rebuild" | "close" = "rebuild";
}

function closeQuietly(lib: pkcs11js.PKCS11, h: Handle): void {
  try {
    lib.C_CloseSession(h);
  } catch {
    // The session is already gone (token removed, all sessions closed): nothing to release.
  }
}

function poolClosedError(by: "rebuild" | "close"): M2mError {
  if (by === "close") {
    return new M2mError("ERR_PKCS11_CLOSED", "permanent", "the PKCS#11 key provider was closed");
  }
  return new M2mError("ERR_PKCS11_SESSION", "transient", "PKCS#11 session pool was rebuilt", {
    details: { reason: "pool-rebuilt" },
  });
}

const SESSION_FLAGS = pkcs11js.CKF_SERIAL_SESSION | pkcs11js.CKF_RW_SESSION;

interface Connection {
  readonly lib: pkcs11js.PKCS11;
  readonly slot: Handle;
  readonly pool: SessionPool;
  readonly generation: number;
}

interface OpenKey {
  readonly conn: Connection;
  readonly priv: Handle;
  readonly id: Buffer;
  readonly algorithm: KeyAlgorithm;
  readonly info: KeyInfo;
  readonly sigLen: number;
}

/**
 * Synchronous signing budget, shared by every provider in the process (the event loop is shared).
 * Reset by a setImmediate once the loop gets a turn.
 */
const syncBudget = { spentMs: 0, resetScheduled: false };

function chargeSync(ms: number): void {
  syncBudget.spentMs += ms;
  if (!syncBudget.resetScheduled) {
    syncBudget.resetScheduled = true;
    setImmediate(() => {
      syncBudget.spentMs = 0;
      syncBudget.resetScheduled = false;
    });
  }
}

/** In-process lock per token+label: two providers in one process never both generate the key. */
const createLocks = new Map<string, Promise<unknown>>();

async function withLock<T>(key: string, fn: () => Promise<T>): Promise<T> {
  const prev = createLocks.get(key) ?? Promise.resolve();
  const run = prev.then(fn, fn);
  const tail = run.catch(() => undefined);
  createLocks.set(key, tail);
  try {
    return await run;
  } finally {
    if (createLocks.get(key) === tail) createLocks.delete(key);
  }
}

/**
 * PINs that failed C_Login, per module+token, as SHA-256 fingerprints (never the PIN). The same PIN is
 * never offered twice: every wrong attempt brings the token closer to locking. A changed PIN source
 * (operator fixed the file) is tried again.
 */
const failedPins = new Map<string, string>();

const sessionRetry: RetryPolicy = {
  baseMs: 0,
  factor: 1,
  capMs: 0,
  deadlineMs: 30_000,
  maxAttempts: 2,
  maxRetryAfterMs: 0,
  retryOn: (err) => isSessionLost(err),
};

function isSessionLost(err: unknown): boolean {
  if (err instanceof M2mError) return err.code === "ERR_PKCS11_SESSION";
  return isCkr(err, ...SESSION_LOST);
}

const TRANSIENT_CKR = new Set([
  "CKR_DEVICE_MEMORY",
  "CKR_HOST_MEMORY",
  "CKR_DEVICE_ERROR",
  "CKR_SESSION_COUNT",
  "CKR_OPERATION_ACTIVE",
  "CKR_FUNCTION_CANCELED",
]);

/** Maps a raw pkcs11js failure of `what` to an M2mError (session loss → ERR_PKCS11_SESSION transient). */
function wrap(err: unknown, code: ErrorCode, what: string): M2mError {
  if (err instanceof M2mError) return err;
  const ckr = ckrOf(err);
  const name = ckr?.name ?? "unknown";
  if (isCkr(err, ...SESSION_LOST)) {
    return new M2mError("ERR_PKCS11_SESSION", "transient", `${what}: PKCS#11 session lost (${name})`, {
      cause: err,
      hint: "check that the token is present; the agent reopens the session and retries",
      details: { ckr: name },
    });
  }
  return new M2mError(code, TRANSIENT_CKR.has(name) ? "transient" : "permanent", `${what} failed (${name})`, {
    cause: err,
    details: { ckr: name },
  });
}

/** Token labels are blank-padded to 32 bytes (some modules pad with NULs). */
function trimPadding(label: string): string {
  let end = label.length;
  while (end > 0 && (label[end - 1] === " " || label.charCodeAt(end - 1) === 0)) end--;
  return label.slice(0, end);
}

function boolAttr(v: Buffer | undefined): boolean {
  return v !== undefined && v.length > 0 && v[0] !== 0;
}

function ulongAttr(v: Buffer | undefined): number {
  if (v === undefined || v.length === 0) return -1;
  return v.length >= 8 ? Number(v.readBigUInt64LE(0)) : v.readUInt32LE(0);
}

const CKS_RO_USER_FUNCTIONS = 1;
const CKS_RW_USER_FUNCTIONS = 3;

/**
 * A KeyProvider whose key lives in a PKCS#11 token (SoftHSM2, smartcard-HSM, YubiHSM, a TPM through
 * tpm2-pkcs11). The private key is generated on the token (SENSITIVE, non-EXTRACTABLE, sign-only) and
 * never leaves it. Sessions are pooled; login happens once per connection.
 *
 * Error codes: ERR_PKCS11_MODULE, ERR_PKCS11_TOKEN_NOT_FOUND, ERR_PKCS11_PIN (fatal, never retried),
 * ERR_PKCS11_SESSION (transient, after one transparent reopen), ERR_PKCS11_SIGN, ERR_PKCS11_KEYGEN,
 * ERR_PKCS11_CLOSED (queued work when `close()` ran), ERR_PKCS11_CONFIG (constructor),
 * ERR_KEY_NOT_FOUND, ERR_KEY_MISMATCH, ERR_KEY_AMBIGUOUS, ERR_KEY_UNPROTECTED, ERR_KEY_ALG_UNSUPPORTED,
 * ERR_PIN_* (see readPin).
 *
 * `close()` closes sessions only. It never calls C_Finalize (a TLS engine in this process may share the
 * module): use `finalizeModule()` at process exit in tests and CLI commands.
 */
export class Pkcs11KeyProvider implements KeyProvider {
  readonly kind = "pkcs11" as const;
  readonly #cfg: Required<Omit<Pkcs11KeyProviderConfig, "keyId" | "env">> & {
    keyId: Buffer | undefined;
    env: Readonly<Record<string, string | undefined>>;
  };
  readonly #log: Logger;
  #conn: Connection | undefined;
  #connecting: Promise<Connection> | undefined;
  #generation = 0;
  #everConnected = false;
  #key: OpenKey | undefined;

  constructor(config: Pkcs11KeyProviderConfig) {
    const keyId = config.keyId === undefined ? undefined : Buffer.from(config.keyId, "hex");
    if (config.keyId !== undefined && (keyId?.length === 0 || !/^([0-9a-fA-F]{2})+$/.test(config.keyId))) {
      throw new M2mError("ERR_PKCS11_CONFIG", "permanent", "keyId must be an even-length hex string", {
        details: { key: "keyId" },
      });
    }
    if (Buffer.byteLength(config.tokenLabel, "utf8") > 32 || config.tokenLabel.length === 0) {
      throw new M2mError("ERR_PKCS11_CONFIG", "permanent", "tokenLabel must be 1–32 bytes", {
        details: { key: "tokenLabel" },
      });
    }
    const sessions = config.sessions ?? 4;
    if (!Number.isInteger(sessions) || sessions < 1 || sessions > 64) {
      throw new M2mError("ERR_PKCS11_CONFIG", "permanent", "sessions must be an integer in 1..64", {
        details: { key: "sessions" },
      });
    }
    this.#cfg = {
      modulePath: config.modulePath,
      tokenLabel: config.tokenLabel,
      keyLabel: config.keyLabel ?? "m2m-device",
      keyId,
      algorithm: config.algorithm ?? "ec-p256",
      pin: config.pin,
      sessions,
      syncBudgetMs: config.syncBudgetMs ?? 2,
      clock: config.clock ?? systemClock,
      logger: config.logger ?? silentLogger,
      env: config.env ?? process.env,
    };
    this.#log = this.#cfg.logger.child({ component: "pkcs11", token: config.tokenLabel });
  }

  /**
   * Capability: TLS client handshakes with this key through the OpenSSL pkcs11 engine. Only when the
   * PIN is in a file (or a systemd credential, which is a file): the engine reads the PIN itself, so
   * it never passes through this process or argv.
   */
  get tlsClient(): TlsClientKey | undefined {
    const pin = this.#cfg.pin;
    const dir = this.#cfg.env.CREDENTIALS_DIRECTORY;
    const pinFile =
      "file" in pin
        ? pin.file
        : "credential" in pin && dir !== undefined
          ? join(dir, pin.credential)
          : undefined;
    if (pinFile === undefined) return undefined;
    return engineTlsClient({
      modulePath: this.#cfg.modulePath,
      tokenLabel: this.#cfg.tokenLabel,
      keyLabel: this.#cfg.keyLabel,
      pinFile,
    });
  }

  // ---------------------------------------------------------------------------------------------
  // Connection: module → token (by label) → session pool → login

  #tokenKey(): string {
    return `${this.#cfg.modulePath}\u0000${this.#cfg.tokenLabel}`;
  }

  async #connection(): Promise<Connection> {
    if (this.#conn !== undefined && !this.#conn.pool.closed) return this.#conn;
    if (this.#connecting === undefined) {
      this.#connecting = this.#connect().finally(() => {
        this.#connecting = undefined;
      });
    }
    return this.#connecting;
  }

  async #connect(): Promise<Connection> {
    const lib = loadModule(this.#cfg.modulePath);
    const slot = this.#findSlot(lib);
    const sessions: Session[] = [];
    try {
      for (let i = 0; i < this.#cfg.sessions; i++) {
        try {
          sessions.push({ handle: lib.C_OpenSession(slot, SESSION_FLAGS) });
        } catch (err) {
          // Small tokens (smartcards) allow few sessions: run with what we got rather than not at all.
          if (sessions.length === 0 || !isCkr(err, "CKR_SESSION_COUNT")) throw err;
          this.#log.warn("pkcs11 token limits sessions; pool is smaller", { sessions: sessions.length });
          break;
        }
      }
      const first = sessions[0];
      if (first === undefined) throw new Error("unreachable: sessions >= 1");
      await this.#login(lib, slot, first.handle);
    } catch (err) {
      for (const s of sessions) closeQuietly(lib, s.handle);
      throw wrap(err, "ERR_PKCS11_SESSION_OPEN", "opening PKCS#11 sessions");
    }
    const conn: Connection = {
      lib,
      slot,
      pool: new SessionPool(lib, slot, sessions),
      generation: ++this.#generation,
    };
    this.#conn = conn;
    this.#everConnected = true;
    this.#log.debug("pkcs11 connected", { sessions: sessions.length, generation: conn.generation });
    return conn;
  }

  #findSlot(lib: pkcs11js.PKCS11): Handle {
    let slots: Handle[];
    try {
      slots = lib.C_GetSlotList(true);
    } catch (err) {
      throw wrap(err, "ERR_PKCS11_TOKEN_NOT_FOUND", "listing PKCS#11 slots");
    }
    const labels: string[] = [];
    for (const slot of slots) {
      let label: string;
      try {
        label = trimPadding(lib.C_GetTokenInfo(slot).label);
      } catch {
        continue; // A slot whose token vanished between the two calls is not ours.
      }
      labels.push(label);
      if (label === this.#cfg.tokenLabel) return slot;
    }
    // Seen before and gone now: removed (may come back, transient). Never seen: misconfiguration.
    const removed = this.#everConnected;
    throw new M2mError(
      "ERR_PKCS11_TOKEN_NOT_FOUND",
      removed ? "transient" : "permanent",
      `no PKCS#11 token labelled "${this.#cfg.tokenLabel}" in ${this.#cfg.modulePath}`,
      {
        hint: removed
          ? "the token was removed: plug it back in; the agent reconnects on the next operation"
          : "check keys.pkcs11.token_label (labels found are in details), that the token is plugged in and initialised",
        details: {
          modulePath: this.#cfg.modulePath,
          labelsFound: labels.join(", "),
          slots: slots.length,
          reason: removed ? "removed" : "unknown-label",
        },
      },
    );
  }

  async #login(lib: pkcs11js.PKCS11, slot: Handle, session: Handle): Promise<void> {
    const tokenFlags = lib.C_GetTokenInfo(slot).flags;
    if ((tokenFlags & pkcs11js.CKF_LOGIN_REQUIRED) === 0) return;
    // A locked user PIN cannot be fixed by the agent; trying again only adds noise to the audit log.
    if ((tokenFlags & pkcs11js.CKF_USER_PIN_LOCKED) !== 0) {
      throw new M2mError("ERR_PKCS11_PIN", "fatal", "the token's user PIN is locked", {
        hint: "unblock the user PIN with the SO PIN (e.g. pkcs11-tool --init-pin --login-type so), then restart",
        details: { reason: "locked" },
      });
    }
    // One attempt left: an unattended daemon must not be the one that locks the token.
    if ((tokenFlags & pkcs11js.CKF_USER_PIN_FINAL_TRY) !== 0) {
      throw new M2mError(
        "ERR_PKCS11_PIN",
        "fatal",
        "the token allows one more PIN attempt only; not trying",
        {
          hint: "verify the PIN manually (pkcs11-tool --login --test), then restart the agent",
          details: { reason: "final-try" },
        },
      );
    }
    const pin = await readPin(this.#cfg.pin, this.#cfg.env);
    const fp = createHash("sha256").update(pin.reveal()).digest("hex");
    // The same wrong PIN is never offered twice (each failure counts towards locking the token).
    if (failedPins.get(this.#tokenKey()) === fp) {
      throw new M2mError("ERR_PKCS11_PIN", "fatal", "the configured PIN was already refused by the token", {
        hint: `fix the PIN in ${describePinSource(this.#cfg.pin)}; it is not retried until it changes`,
        details: { reason: "known-wrong" },
      });
    }
    this.#log.info("pkcs11 login", { pinSource: describePinSource(this.#cfg.pin) });
    try {
      lib.C_Login(session, pkcs11js.CKU_USER, pin.reveal());
    } catch (err) {
      // Login state is per token and application: another session of this process already logged in.
      if (isCkr(err, "CKR_USER_ALREADY_LOGGED_IN")) return;
      if (isCkr(err, ...PIN_FATAL)) {
        failedPins.set(this.#tokenKey(), fp);
        const name = ckrOf(err)?.name ?? "unknown";
        this.#log.error("pkcs11 login refused", { ckr: name });
        // No cause: nothing from the login call (which had the PIN as argument) travels further.
        throw new M2mError("ERR_PKCS11_PIN", "fatal", `the token refused the user PIN (${name})`, {
          hint: `fix the PIN in ${describePinSource(this.#cfg.pin)}; the agent does not retry a refused PIN (retries lock the token)`,
          details: { ckr: name },
        });
      }
      throw wrap(err, "ERR_PKCS11_LOGIN", "C_Login");
    }
    failedPins.delete(this.#tokenKey());
  }

  /** Drops the connection of `generation` (if still current) so that the next call rebuilds it. */
  #invalidate(generation: number): void {
    if (this.#conn?.generation !== generation) return;
    this.#log.warn("pkcs11 session lost; reopening", { generation });
    this.#conn.pool.close("rebuild");
    this.#conn = undefined;
    if (this.#key?.conn.generation === generation) this.#key = undefined;
  }

  /**
   * Runs `fn` once, and once more on a fresh connection if the session was lost (token re-plugged,
   * sessions closed under us). A second loss surfaces as ERR_PKCS11_SESSION (transient); other failures
   * are mapped to `code`.
   */
  async #withReopen<T>(
    fn: (conn: Connection) => Promise<T>,
    code: ErrorCode = "ERR_PKCS11",
    what = "PKCS#11 operation",
  ): Promise<T> {
    return withRetry(
      sessionRetry,
      async () => {
        const conn = await this.#connection();
        try {
          return await fn(conn);
        } catch (err) {
          if (isSessionLost(err)) this.#invalidate(conn.generation);
          throw err;
        }
      },
      { clock: this.#cfg.clock },
    ).catch((err: unknown) => {
      throw wrap(err, code, what);
    });
  }

  async #withSession<T>(conn: Connection, fn: (s: Handle) => T | Promise<T>): Promise<T> {
    const s = await conn.pool.acquire();
    try {
      return await fn(s.handle);
    } finally {
      conn.pool.release(s);
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Key lookup

  #find(lib: pkcs11js.PKCS11, session: Handle, template: pkcs11js.Template): Handle[] {
    lib.C_FindObjectsInit(session, template);
    try {
      const out: Handle[] = [];
      for (;;) {
        const batch = lib.C_FindObjects(session, 16);
        out.push(...batch);
        if (batch.length < 16) return out;
      }
    } finally {
      lib.C_FindObjectsFinal(session);
    }
  }

  #labelTemplate(cls?: number, id?: Buffer): pkcs11js.Template {
    const t: pkcs11js.Template = [
      { type: pkcs11js.CKA_TOKEN, value: true },
      { type: pkcs11js.CKA_LABEL, value: this.#cfg.keyLabel },
    ];
    if (cls !== undefined) t.push({ type: pkcs11js.CKA_CLASS, value: cls });
    const keyId = id ?? this.#cfg.keyId;
    if (keyId !== undefined) t.push({ type: pkcs11js.CKA_ID, value: keyId });
    return t;
  }

  #ref(id: Buffer): string {
    return formatPkcs11Uri({ token: this.#cfg.tokenLabel, object: this.#cfg.keyLabel, id, type: "private" });
  }

  /** Finds and validates the key; undefined when no object with the label exists at all. */
  async #lookup(conn: Connection, created: boolean): Promise<OpenKey | undefined> {
    const { lib } = conn;
    return this.#withSession(conn, async (s) => {
      const privs = this.#find(lib, s, this.#labelTemplate(pkcs11js.CKO_PRIVATE_KEY));
      if (privs.length === 0) {
        const others = this.#find(lib, s, this.#labelTemplate()).filter((h) => {
          const cls = ulongAttr(lib.C_GetAttributeValue(s, h, [{ type: pkcs11js.CKA_CLASS }])[0]?.value);
          return cls === pkcs11js.CKO_PUBLIC_KEY || cls === pkcs11js.CKO_SECRET_KEY;
        });
        // Never create a second key beside a leftover object of the same label: the operator decides.
        if (others.length > 0) {
          throw new M2mError(
            "ERR_KEY_MISMATCH",
            "permanent",
            `token has a key object labelled "${this.#cfg.keyLabel}" that is not a usable private key`,
            { hint: "remove the leftover object (`m2m-agent keys destroy`) or choose another keyLabel" },
          );
        }
        return undefined;
      }
      if (privs.length > 1) {
        throw new M2mError(
          "ERR_KEY_AMBIGUOUS",
          "permanent",
          `${privs.length} private keys labelled "${this.#cfg.keyLabel}" on the token`,
          { hint: "set keys.pkcs11.key_id to pick one" },
        );
      }
      const priv = privs[0] as Handle; // length checked above
      const a = lib.C_GetAttributeValue(s, priv, [
        { type: pkcs11js.CKA_KEY_TYPE },
        { type: pkcs11js.CKA_ID },
        { type: pkcs11js.CKA_SIGN },
        { type: pkcs11js.CKA_SENSITIVE },
        { type: pkcs11js.CKA_EXTRACTABLE },
      ]);
      const keyType = ulongAttr(a[0]?.value);
      const id = Buffer.from(a[1]?.value ?? Buffer.alloc(0));
      const algorithm: KeyAlgorithm | undefined =
        keyType === pkcs11js.CKK_EC ? "ec-p256" : keyType === pkcs11js.CKK_RSA ? "rsa-2048" : undefined;
      // A key of another type under our label must not be silently used or replaced.
      if (algorithm !== this.#cfg.algorithm) {
        throw new M2mError(
          "ERR_KEY_MISMATCH",
          "permanent",
          `key "${this.#cfg.keyLabel}" on the token is not ${this.#cfg.algorithm}`,
          {
            hint: "set keys.pkcs11.algorithm to match the existing key, or destroy it first",
            details: { keyType },
          },
        );
      }
      // A device identity key must be sign-capable and unreadable; anything else is not hardware-bound.
      if (!boolAttr(a[2]?.value) || !boolAttr(a[3]?.value) || boolAttr(a[4]?.value)) {
        throw new M2mError(
          "ERR_KEY_UNPROTECTED",
          "permanent",
          `key "${this.#cfg.keyLabel}" is extractable, not sensitive, or cannot sign`,
          { hint: "destroy it and let the agent generate a key on the token" },
        );
      }
      const spki = this.#publicSpki(lib, s, priv, id, algorithm);
      // The token must hold exactly the algorithm we asked for (curve or modulus size included).
      const info = await keyInfoFromSpki(spki, this.#ref(id), created).catch((err: unknown) => {
        throw isM2mError(err, "ERR_KEY_ALGORITHM") ? this.#sizeMismatch(err) : err;
      });
      if (info.algorithm !== algorithm) throw this.#sizeMismatch(undefined);
      return { conn, priv, id, algorithm, info, sigLen: algorithm === "ec-p256" ? 64 : 256 };
    });
  }

  #sizeMismatch(cause: unknown): M2mError {
    return new M2mError(
      "ERR_KEY_MISMATCH",
      "permanent",
      `key "${this.#cfg.keyLabel}" on the token has the wrong size or curve for ${this.#cfg.algorithm}`,
      { cause, hint: "destroy it and let the agent generate a new key, or choose another keyLabel" },
    );
  }

  #publicSpki(lib: pkcs11js.PKCS11, s: Handle, priv: Handle, id: Buffer, algorithm: KeyAlgorithm): Buffer {
    const pubs = this.#find(lib, s, this.#labelTemplate(pkcs11js.CKO_PUBLIC_KEY, id));
    const pub = pubs[0];
    if (algorithm === "ec-p256") {
      if (pub === undefined) {
        throw new M2mError("ERR_KEY_PUBLIC_MISSING", "permanent", "the EC public key object is missing", {
          hint: "destroy the key pair and let the agent generate a new one",
        });
      }
      const a = lib.C_GetAttributeValue(s, pub, [
        { type: pkcs11js.CKA_EC_PARAMS },
        { type: pkcs11js.CKA_EC_POINT },
      ]);
      // Only P-256 is a supported device key curve; anything else would sign with the wrong curve.
      if (!P256_EC_PARAMS.equals(a[0]?.value ?? Buffer.alloc(0))) {
        throw new M2mError("ERR_KEY_MISMATCH", "permanent", `key "${this.#cfg.keyLabel}" is not on P-256`);
      }
      return spkiFromEcPoint(a[1]?.value ?? Buffer.alloc(0));
    }
    // RSA: the private key object carries the public modulus and exponent too.
    const a = lib.C_GetAttributeValue(s, pub ?? priv, [
      { type: pkcs11js.CKA_MODULUS },
      { type: pkcs11js.CKA_PUBLIC_EXPONENT },
    ]);
    return spkiFromRsa(a[0]?.value ?? Buffer.alloc(0), a[1]?.value ?? Buffer.alloc(0));
  }

  async #generate(conn: Connection): Promise<void> {
    const { lib } = conn;
    const id = this.#cfg.keyId ?? randomBytes(16);
    const common: pkcs11js.Template = [
      { type: pkcs11js.CKA_TOKEN, value: true },
      { type: pkcs11js.CKA_LABEL, value: this.#cfg.keyLabel },
      { type: pkcs11js.CKA_ID, value: id },
    ];
    const ec = this.#cfg.algorithm === "ec-p256";
    const pubTemplate: pkcs11js.Template = [
      ...common,
      { type: pkcs11js.CKA_PRIVATE, value: false },
      { type: pkcs11js.CKA_VERIFY, value: true },
      { type: pkcs11js.CKA_ENCRYPT, value: false },
      { type: pkcs11js.CKA_WRAP, value: false },
      ...(ec
        ? [{ type: pkcs11js.CKA_EC_PARAMS, value: P256_EC_PARAMS }]
        : [
            { type: pkcs11js.CKA_MODULUS_BITS, value: 2048 },
            { type: pkcs11js.CKA_PUBLIC_EXPONENT, value: Buffer.from([1, 0, 1]) },
          ]),
    ];
    // Sign-only, never leaves the token. SoftHSM defaults DECRYPT/UNWRAP/DERIVE to true: say false.
    const privTemplate: pkcs11js.Template = [
      ...common,
      { type: pkcs11js.CKA_PRIVATE, value: true },
      { type: pkcs11js.CKA_SENSITIVE, value: true },
      { type: pkcs11js.CKA_EXTRACTABLE, value: false },
      { type: pkcs11js.CKA_SIGN, value: true },
      { type: pkcs11js.CKA_DECRYPT, value: false },
      { type: pkcs11js.CKA_UNWRAP, value: false },
      { type: pkcs11js.CKA_DERIVE, value: false },
    ];
    const mechanism = { mechanism: ec ? pkcs11js.CKM_EC_KEY_PAIR_GEN : pkcs11js.CKM_RSA_PKCS_KEY_PAIR_GEN };
    await this.#withSession(conn, async (s) => {
      try {
        // Async: RSA-2048 generation takes hundreds of ms and must not stall the event loop.
        await lib.C_GenerateKeyPairAsync(s, mechanism, pubTemplate, privTemplate);
      } catch (err) {
        throw wrap(err, "ERR_PKCS11_KEYGEN", "generating the device key on the token");
      }
    });
    this.#log.info("pkcs11 device key generated", {
      algorithm: this.#cfg.algorithm,
      ref: this.#ref(id),
    });
  }

  // ---------------------------------------------------------------------------------------------
  // KeyProvider

  async createOrOpen(): Promise<KeyInfo> {
    return withLock(`${this.#tokenKey()}\u0000${this.#cfg.keyLabel}`, () =>
      this.#withReopen(async (conn) => {
        const existing = await this.#lookup(conn, false);
        if (existing !== undefined) {
          this.#key = existing;
          return existing.info;
        }
        await this.#generate(conn);
        const made = await this.#lookup(conn, true);
        if (made === undefined) {
          throw new M2mError("ERR_PKCS11_KEYGEN", "permanent", "generated key not found on the token");
        }
        this.#key = made;
        return made.info;
      }),
    );
  }

  async open(): Promise<KeyInfo> {
    return (await this.#openKey()).info;
  }

  async #openKey(): Promise<OpenKey> {
    const cached = this.#key;
    if (cached !== undefined && !cached.conn.pool.closed) return cached;
    return this.#withReopen(async (conn) => {
      const k = await this.#lookup(conn, false);
      if (k === undefined) {
        throw new M2mError(
          "ERR_KEY_NOT_FOUND",
          "permanent",
          `no device key "${this.#cfg.keyLabel}" on token "${this.#cfg.tokenLabel}"`,
          { hint: "run `m2m-agent keys init` to generate it" },
        );
      }
      this.#key = k;
      return k;
    });
  }

  async sign(data: Uint8Array, alg?: JwsAlgorithm): Promise<Uint8Array> {
    let key = this.#key;
    if (key === undefined || key.conn.pool.closed) key = await this.#openKey();
    const use = alg ?? (key.algorithm === "ec-p256" ? "ES256" : "RS256");
    if (!key.info.jwsAlgorithms.includes(use)) {
      throw new M2mError("ERR_KEY_ALG_UNSUPPORTED", "permanent", `the device key cannot sign ${use}`);
    }
    const mech = mechanismFor(use);
    // ECDSA on SoftHSM has no CKM_ECDSA_SHA256: hash here, the token signs the digest.
    const input = use === "ES256" ? createHash("sha256").update(data).digest() : Buffer.from(data);
    // Fast path: no retry machinery when the cached key and an idle session are there.
    try {
      return await this.#signWith(key, mech, input);
    } catch (err) {
      if (!isSessionLost(err)) throw wrap(err, "ERR_PKCS11_SIGN", `${use} signing`);
      this.#invalidate(key.conn.generation);
    }
    return this.#withReopen(
      async () => this.#signWith(await this.#openKey(), mech, input),
      "ERR_PKCS11_SIGN",
      `${use} signing`,
    );
  }

  async #signWith(key: OpenKey, mech: pkcs11js.Mechanism, input: Buffer): Promise<Uint8Array> {
    const { lib, pool } = key.conn;
    // A lone caller (nothing else in flight) that used up the budget: one loop turn (setImmediate, a few
    // µs) is much cheaper than a thread-pool round trip, and lets timers and I/O run just the same.
    if (syncBudget.spentMs >= this.#cfg.syncBudgetMs && this.#cfg.syncBudgetMs > 0 && pool.allIdle) {
      await new Promise<void>((resolve) => setImmediate(resolve));
    }
    const idle = pool.tryAcquire();
    if (idle !== undefined && syncBudget.spentMs < this.#cfg.syncBudgetMs) {
      const t0 = performance.now();
      let stuck = false;
      try {
        lib.C_SignInit(idle.handle, mech, key.priv);
        return checkSig(lib.C_Sign(idle.handle, input, Buffer.allocUnsafe(key.sigLen)), key);
      } catch (err) {
        stuck = isCkr(err, "CKR_OPERATION_ACTIVE", "CKR_BUFFER_TOO_SMALL");
        throw err;
      } finally {
        pool.release(idle, stuck);
        chargeSync(performance.now() - t0);
      }
    }
    const s = idle ?? (await pool.acquire());
    let stuck = false;
    try {
      lib.C_SignInit(s.handle, mech, key.priv);
      return checkSig(await lib.C_SignAsync(s.handle, input, Buffer.allocUnsafe(key.sigLen)), key);
    } catch (err) {
      stuck = isCkr(err, "CKR_OPERATION_ACTIVE", "CKR_BUFFER_TOO_SMALL");
      throw err;
    } finally {
      pool.release(s, stuck);
    }
  }

  async evidence(): Promise<KeyEvidence> {
    return this.#withReopen(async () => {
      const key = await this.#openKey();
      const a = await this.#withSession(key.conn, (s) =>
        key.conn.lib.C_GetAttributeValue(s, key.priv, [
          { type: pkcs11js.CKA_LOCAL },
          { type: pkcs11js.CKA_NEVER_EXTRACTABLE },
          { type: pkcs11js.CKA_ALWAYS_SENSITIVE },
          { type: pkcs11js.CKA_EXTRACTABLE },
          { type: pkcs11js.CKA_SENSITIVE },
        ]),
      );
      return {
        kind: "pkcs11",
        local: boolAttr(a[0]?.value),
        neverExtractable: boolAttr(a[1]?.value),
        alwaysSensitive: boolAttr(a[2]?.value),
        extractable: boolAttr(a[3]?.value),
        sensitive: boolAttr(a[4]?.value),
        selfAsserted: true,
      };
    });
  }

  async destroy(): Promise<void> {
    await withLock(`${this.#tokenKey()}\u0000${this.#cfg.keyLabel}`, () =>
      this.#withReopen(async (conn) => {
        this.#key = undefined;
        await this.#withSession(conn, (s) => {
          const { lib } = conn;
          // Private first: once it is gone the identity is crypto-erased even if we stop half-way.
          const privs = this.#find(lib, s, this.#labelTemplate(pkcs11js.CKO_PRIVATE_KEY));
          const pubs = this.#find(lib, s, this.#labelTemplate(pkcs11js.CKO_PUBLIC_KEY));
          for (const h of [...privs, ...pubs]) {
            try {
              lib.C_DestroyObject(s, h);
            } catch (err) {
              // Gone already (another process destroyed it): that is the state we want.
              if (!isCkr(err, "CKR_OBJECT_HANDLE_INVALID")) {
                throw wrap(err, "ERR_PKCS11_DESTROY", "destroying the device key");
              }
            }
          }
          if (privs.length + pubs.length > 0)
            this.#log.info("pkcs11 device key destroyed", { objects: privs.length + pubs.length });
        });
      }),
    );
  }

  async health(): Promise<KeyHealth> {
    try {
      return await this.#withReopen(async (conn) => {
        const { lib } = conn;
        return this.#withSession(conn, async (s): Promise<KeyHealth> => {
          lib.C_GetTokenInfo(conn.slot); // throws CKR_TOKEN_NOT_PRESENT when the token is gone
          const state = lib.C_GetSessionInfo(s).state;
          if (state !== CKS_RO_USER_FUNCTIONS && state !== CKS_RW_USER_FUNCTIONS) {
            const flags = lib.C_GetTokenInfo(conn.slot).flags;
            if ((flags & pkcs11js.CKF_LOGIN_REQUIRED) !== 0) {
              return { ok: false, code: "ERR_PKCS11_SESSION", detail: "PKCS#11 session is not logged in" };
            }
          }
          const privs = this.#find(lib, s, this.#labelTemplate(pkcs11js.CKO_PRIVATE_KEY));
          if (privs.length === 0) {
            return { ok: false, code: "ERR_KEY_NOT_FOUND", detail: `no device key "${this.#cfg.keyLabel}"` };
          }
          return { ok: true, detail: `token "${this.#cfg.tokenLabel}" present, logged in, key found` };
        });
      });
    } catch (err) {
      const e = wrap(err, "ERR_PKCS11", "health check");
      return { ok: false, code: e.code, detail: e.message };
    }
  }

  async close(): Promise<void> {
    const conn = this.#conn;
    this.#conn = undefined;
    this.#key = undefined;
    conn?.pool.close("close");
  }
}

function mechanismFor(alg: JwsAlgorithm): pkcs11js.Mechanism {
  switch (alg) {
    case "ES256":
      return { mechanism: pkcs11js.CKM_ECDSA };
    case "RS256":
      return { mechanism: pkcs11js.CKM_SHA256_RSA_PKCS };
    case "PS256":
      return {
        mechanism: pkcs11js.CKM_SHA256_RSA_PKCS_PSS,
        parameter: {
          type: pkcs11js.CK_PARAMS_RSA_PSS,
          hashAlg: pkcs11js.CKM_SHA256,
          mgf: pkcs11js.CKG_MGF1_SHA256,
          saltLen: 32,
        } as pkcs11js.RsaPSS,
      };
  }
}

function checkSig(sig: Buffer, key: OpenKey): Uint8Array {
  // JWS wants exactly r‖s (64 bytes) or a full-modulus RSA signature; anything else is a token bug.
  if (sig.length !== key.sigLen) {
    throw new M2mError("ERR_PKCS11_SIGN", "permanent", `token returned a ${sig.length}-byte signature`, {
      details: { expected: key.sigLen },
    });
  }
  return new Uint8Array(sig);
}
