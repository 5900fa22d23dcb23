import { readFile } from "node:fs/promises";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { parse as parseToml } from "smol-toml";
import { z } from "zod";
import { M2mError } from "../core/errors.js";
import { Secret } from "../core/secret.js";

/** Default device certificate lifetime (`cert_lifetime`). */
export const DEFAULT_CERT_LIFETIME_SECONDS = 86_400;
/** Default CRL file name inside data_dir (`revocation.crl_file`). */
export const CRL_FILE = "crl.pem";

/** Parses `90s`, `15m`, `24h`, `7d` (or a bare number of seconds) into seconds. */
export function parseDurationSeconds(text: string | number): number {
  if (typeof text === "number") {
    if (!Number.isFinite(text) || text <= 0) throw new Error("duration must be positive");
    return Math.floor(text);
  }
  const m = /^(\d{1,9})\s*(s|m|h|d)?$/.exec(text.trim());
  if (m?.[1] === undefined) throw new Error("duration must look like 90s, 15m, 24h or 7d");
  const n = Number(m[1]);
  const unit = m[2] ?? "s";
  const mult = unit === "d" ? 86_400 : unit === "h" ? 3_600 : unit === "m" ? 60 : 1;
  if (n <= 0) throw new Error("duration must be positive");
  return n * mult;
}

const duration = z.union([z.string().max(32), z.number()]).transform((v, ctx) => {
  try {
    return parseDurationSeconds(v);
  } catch (err) {
    ctx.addIssue({ code: "custom", message: (err as Error).message });
    return z.NEVER;
  }
});

/**
 * Default admission limit per registrar process (`[limits] max_in_flight`). Measured with
 * `npm run bench:fleet` on 2 cores (docs/fleet-load.md): past ~32 concurrent requests throughput no
 * longer rises, only latency does; 64 keeps p99 bounded while leaving room for I/O waits (PostgreSQL).
 */
export const DEFAULT_MAX_IN_FLIGHT = 64;

export const registrarFileSchema = z
  .object({
    listen: z
      .object({
        host: z.string().max(255).default("127.0.0.1"),
        port: z.number().int().min(0).max(65535).default(8443),
      })
      .strict()
      .default({ host: "127.0.0.1", port: 8443 }),
    tls: z
      .object({
        cert: z.string().max(4096).optional(),
        key: z.string().max(4096).optional(),
        /** Plain HTTP: tests on loopback only; must be spelled out. */
        insecure_http: z.boolean().default(false),
      })
      .strict()
      .default({ insecure_http: false }),
    data_dir: z.string().min(1).max(4096),
    ca_dir: z.string().max(4096).optional(),
    public_url: z.url().max(2048).optional(),
    session_ttl: duration.default(120),
    /**
     * Failed credential activations (wrong secret with a valid AK signature: only the device can
     * make these) before an enrolment session is discarded; the device then starts again.
     */
    max_activation_attempts: z.number().int().min(1).max(100).default(3),
    // 24 h: bounds how long a revoked device's certificate works at a relying party that does not
    // consume the CRL (see docs/revocation.md); the agent renews at 2/3 of the lifetime.
    cert_lifetime: duration.default(DEFAULT_CERT_LIFETIME_SECONDS),
    audit_log: z.string().max(4096).optional(),
    trust: z
      .object({
        /** Used for TPM groups that name neither a trust folder nor an allowlist. */
        default_ek_trust_dir: z.string().max(4096).optional(),
      })
      .strict()
      .default({}),
    endpoints: z
      .object({
        token: z.url().max(2048).optional(),
        est: z.url().max(2048).optional(),
        mqtt: z.url().max(2048).optional(),
        ingest: z.url().max(2048).optional(),
      })
      .strict()
      .default({}),
    /** The fleet CA's CRL and the revocation hook (docs/revocation.md). */
    revocation: z
      .object({
        /** PEM CRL written atomically on every change (relative to data_dir). */
        crl_file: z.string().min(1).max(4096).default(CRL_FILE),
        /** nextUpdate - thisUpdate. */
        crl_validity: duration.default(7 * 86_400),
        /** A CRL older than this is signed again even when nothing changed. */
        crl_refresh: duration.default(86_400),
        /** How often the store is polled for revocations made elsewhere (CLI, other replicas). */
        check_interval_ms: z.number().int().min(100).max(600_000).default(1_000),
        /** CRL distribution point URLs written into issued device certificates (optional). */
        crl_urls: z.array(z.url().max(2048)).max(4).default([]),
        /** argv of a command run on every revocation and CRL update (never through a shell). */
        hook: z.array(z.string().min(1).max(4096)).min(1).max(64).optional(),
        hook_timeout: duration.default(10),
      })
      .strict()
      .default({
        crl_file: CRL_FILE,
        crl_validity: 7 * 86_400,
        crl_refresh: 86_400,
        check_interval_ms: 1_000,
        crl_urls: [],
        hook_timeout: 10,
      }),
    /** Token service, EST and ingest settings: parsed by src/registrar/app.ts (`serve`). */
    oauth: z.record(z.string(), z.unknown()).optional(),
    ingest: z.record(z.string(), z.unknown()).optional(),
    /** Key rotation policy (validated by registrar/rotation/policy.ts). */
    rotation: z.record(z.string(), z.unknown()).optional(),
    /** Registry database; absent = SQLite in data_dir. */
    store: z
      .object({
        /** `postgresql://user[:password]@host[:port]/db[?host=/socket/dir]`; env M2M_REGISTRAR_STORE_URL wins. */
        url: z.string().min(1).max(4096).optional(),
        pool_max: z.number().int().min(1).max(500).default(10),
        auto_migrate: z.boolean().default(true),
        statement_timeout_ms: z.number().int().min(100).max(600_000).default(15_000),
      })
      .strict()
      .default({ pool_max: 10, auto_migrate: true, statement_timeout_ms: 15_000 }),
    /** Token signing keys (rollover: docs/registrar-scale.md). */
    keys: z
      .object({
        /** PEM (PKCS#8, EC P-256) that signs access tokens; default data_dir/oauth-signing-key.pem (created). */
        signing_key: z.string().min(1).max(4096).optional(),
        /** Further keys /jwks publishes (rollover overlap); never used to sign. */
        published_keys: z.array(z.string().min(1).max(4096)).max(8).default([]),
      })
      .strict()
      .default({ published_keys: [] }),
    limits: z
      .object({
        max_body_bytes: z
          .number()
          .int()
          .min(1024)
          .max(16 * 1024 * 1024)
          .default(64 * 1024),
        request_timeout_ms: z.number().int().min(100).max(600_000).default(15_000),
        /** Requests handled at once by this process; beyond it: 429 + Retry-After (load shedding). */
        max_in_flight: z.number().int().min(1).max(100_000).default(DEFAULT_MAX_IN_FLIGHT),
        /** Upper bound of the Retry-After (seconds) sent with a 429. */
        retry_after_max_s: z.number().int().min(1).max(3600).default(30),
      })
      .strict()
      .default({
        max_body_bytes: 64 * 1024,
        request_timeout_ms: 15_000,
        max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        retry_after_max_s: 30,
      }),
  })
  .strict();

/** The registrar's one validated configuration object (paths absolute). */
export interface RegistrarConfig {
  readonly listen: { readonly host: string; readonly port: number };
  readonly tls:
    | { readonly kind: "https"; readonly certFile: string; readonly keyFile: string }
    | { readonly kind: "insecure-http" };
  readonly dataDir: string;
  readonly caDir: string;
  readonly publicUrl: string | undefined;
  readonly sessionTtlSeconds: number;
  readonly maxActivationAttempts: number;
  readonly certLifetimeSeconds: number;
  readonly auditLog: string;
  readonly defaultEkTrustDir: string | undefined;
  readonly endpoints: {
    readonly token?: string | undefined;
    readonly est?: string | undefined;
    readonly mqtt?: string | undefined;
    readonly ingest?: string | undefined;
  };
  readonly maxBodyBytes: number;
  readonly requestTimeoutMs: number;
  /** Admission limit: requests beyond this many in flight are shed with 429 + Retry-After. */
  readonly maxInFlight: number;
  /** Cap on the Retry-After (seconds) of a shed request. */
  readonly retryAfterMaxSeconds: number;
  /** Where the registry lives. The PostgreSQL URL may hold a password: a Secret, never logged. */
  readonly store: StoreConfig;
  /** Token signing key files (absolute); undefined signingKey = data_dir/oauth-signing-key.pem. */
  readonly keys: { readonly signingKey: string | undefined; readonly publishedKeys: readonly string[] };
  readonly revocation: RevocationConfig;
  /** Raw `[oauth]` / `[ingest]` tables (validated by src/registrar/app.ts) and the file they came from. */
  readonly sections?: {
    readonly file: string;
    readonly oauth?: Readonly<Record<string, unknown>>;
    readonly ingest?: Readonly<Record<string, unknown>>;
    readonly rotation?: Readonly<Record<string, unknown>>;
  };
}

export type StoreConfig =
  | { readonly kind: "sqlite"; readonly path: string }
  | {
      readonly kind: "postgres";
      readonly url: Secret;
      readonly poolMax: number;
      readonly autoMigrate: boolean;
      readonly statementTimeoutMs: number;
    };

export const REGISTRAR_DB_FILE = "registrar.db";
export const STORE_URL_ENV = "M2M_REGISTRAR_STORE_URL";

/**
 * Resolves a configured path: `credential:NAME` is the systemd credential NAME
 * (`$CREDENTIALS_DIRECTORY/NAME`, `credential:` alone the directory itself), anything else is a path
 * relative to `baseDir`.
 * @throws ERR_CONFIG_INVALID when a credential is named but no credentials directory is set.
 */
export function resolveConfigPath(
  p: string,
  baseDir: string,
  env: Readonly<Record<string, string | undefined>>,
  file: string,
  key: string,
): string {
  if (p.startsWith("credential:")) {
    const dir = env.CREDENTIALS_DIRECTORY;
    const name = p.slice("credential:".length);
    if (dir === undefined || dir === "" || name.includes("/") || name === "..") {
      throw new M2mError("ERR_CONFIG_INVALID", "permanent", `${file}: invalid value for '${key}'`, {
        details: { file, key },
        hint:
          dir === undefined || dir === ""
            ? "credential: paths need $CREDENTIALS_DIRECTORY (systemd LoadCredential= / SetCredentialEncrypted=)"
            : "a credential name has no '/'",
      });
    }
    return name === "" ? dir : join(dir, name);
  }
  return isAbsolute(p) ? p : resolve(baseDir, p);
}

function storeConfigFrom(
  c: { url?: string | undefined; pool_max: number; auto_migrate: boolean; statement_timeout_ms: number },
  dataDir: string,
  env: Readonly<Record<string, string | undefined>>,
  file: string,
): StoreConfig {
  const fromEnv = env[STORE_URL_ENV];
  const url = fromEnv !== undefined && fromEnv !== "" ? fromEnv : c.url;
  const key = fromEnv !== undefined && fromEnv !== "" ? STORE_URL_ENV : "store.url";
  if (url === undefined) return { kind: "sqlite", path: join(dataDir, REGISTRAR_DB_FILE) };
  let parsed: URL | undefined;
  try {
    parsed = new URL(url);
  } catch {
    parsed = undefined;
  }
  // Never echo the value: it may carry a password.
  if (parsed === undefined || (parsed.protocol !== "postgresql:" && parsed.protocol !== "postgres:")) {
    throw new M2mError("ERR_CONFIG_INVALID", "permanent", `${file}: invalid value for '${key}'`, {
      details: { file, key },
      hint: "a PostgreSQL URL: postgresql://user@host:5432/db (or ?host=/run/postgresql for a socket); omit for SQLite",
    });
  }
  return {
    kind: "postgres",
    url: new Secret(url),
    poolMax: c.pool_max,
    autoMigrate: c.auto_migrate,
    statementTimeoutMs: c.statement_timeout_ms,
  };
}

/** `[revocation]`: the CRL and the revocation hook (docs/revocation.md). Paths absolute. */
export interface RevocationConfig {
  readonly crlFile: string;
  readonly crlValiditySeconds: number;
  readonly crlRefreshSeconds: number;
  readonly checkIntervalMs: number;
  readonly crlUrls: readonly string[];
  /** argv (file first) of the revocation hook; undefined when none is configured. */
  readonly hook: readonly string[] | undefined;
  readonly hookTimeoutSeconds: number;
}

/**
 * Builds a RegistrarConfig from the parsed TOML object. Relative paths resolve against `baseDir`.
 * @throws ERR_CONFIG_INVALID naming the key (never the value).
 */
export function registrarConfigFrom(
  raw: unknown,
  baseDir: string,
  file = "<config>",
  env: Readonly<Record<string, string | undefined>> = {},
): RegistrarConfig {
  const r = registrarFileSchema.safeParse(raw);
  if (!r.success) {
    const issue = r.error.issues[0];
    const key = issue === undefined ? "" : issue.path.map(String).join(".");
    throw new M2mError("ERR_CONFIG_INVALID", "permanent", `${file}: invalid value for '${key}'`, {
      details: { file, key },
      hint: issue?.message ?? "see docs",
    });
  }
  const c = r.data;
  const abs = (p: string, key = "path"): string => resolveConfigPath(p, baseDir, env, file, key);
  const dataDir = abs(c.data_dir);
  const rv = c.revocation;
  if (rv.crl_refresh >= rv.crl_validity) {
    throw new M2mError(
      "ERR_CONFIG_INVALID",
      "permanent",
      `${file}: invalid value for 'revocation.crl_refresh'`,
      {
        details: { file, key: "revocation.crl_refresh" },
        hint: "crl_refresh must be shorter than crl_validity, or relying parties see an expired CRL",
      },
    );
  }
  const hook = rv.hook;
  if (hook !== undefined && !isAbsolute(hook[0] ?? "")) {
    throw new M2mError("ERR_CONFIG_INVALID", "permanent", `${file}: invalid value for 'revocation.hook'`, {
      details: { file, key: "revocation.hook" },
      hint: "the hook's first element must be an absolute path to an executable (it is run without a shell)",
    });
  }
  let tls: RegistrarConfig["tls"];
  if (c.tls.insecure_http) {
    tls = { kind: "insecure-http" };
  } else {
    if (c.tls.cert === undefined || c.tls.key === undefined) {
      throw new M2mError("ERR_CONFIG_INVALID", "permanent", `${file}: tls.cert and tls.key are required`, {
        details: { file, key: "tls" },
        hint: "run `m2m-registrar ca init --dir DIR` and point tls.cert/tls.key at server.pem/server.key.pem",
      });
    }
    tls = { kind: "https", certFile: abs(c.tls.cert), keyFile: abs(c.tls.key) };
  }
  return {
    listen: c.listen,
    tls,
    dataDir,
    caDir: c.ca_dir === undefined ? join(dataDir, "ca") : abs(c.ca_dir, "ca_dir"),
    publicUrl: c.public_url,
    sessionTtlSeconds: c.session_ttl,
    maxActivationAttempts: c.max_activation_attempts,
    certLifetimeSeconds: c.cert_lifetime,
    auditLog: c.audit_log === undefined ? join(dataDir, "audit.log") : abs(c.audit_log),
    defaultEkTrustDir:
      c.trust.default_ek_trust_dir === undefined ? undefined : abs(c.trust.default_ek_trust_dir),
    endpoints: c.endpoints,
    maxBodyBytes: c.limits.max_body_bytes,
    requestTimeoutMs: c.limits.request_timeout_ms,
    maxInFlight: c.limits.max_in_flight,
    retryAfterMaxSeconds: c.limits.retry_after_max_s,
    store: storeConfigFrom(c.store, dataDir, env, file),
    keys: {
      signingKey: c.keys.signing_key === undefined ? undefined : abs(c.keys.signing_key, "keys.signing_key"),
      publishedKeys: c.keys.published_keys.map((k) => abs(k, "keys.published_keys")),
    },
    revocation: {
      // Relative to data_dir, like the database (not to the config file's folder).
      crlFile: isAbsolute(rv.crl_file) ? rv.crl_file : join(dataDir, rv.crl_file),
      crlValiditySeconds: rv.crl_validity,
      crlRefreshSeconds: rv.crl_refresh,
      checkIntervalMs: rv.check_interval_ms,
      crlUrls: rv.crl_urls,
      hook,
      hookTimeoutSeconds: rv.hook_timeout,
    },
    sections: { file, oauth: c.oauth, ingest: c.ingest, rotation: c.rotation },
  };
}

/**
 * Reads and validates a registrar TOML file; `env` supplies M2M_REGISTRAR_STORE_URL and
 * CREDENTIALS_DIRECTORY. @throws ERR_CONFIG_READ, ERR_CONFIG_INVALID
 */
export async function loadRegistrarConfig(
  file: string,
  env: Readonly<Record<string, string | undefined>> = process.env,
): Promise<RegistrarConfig> {
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (err) {
    throw new M2mError("ERR_CONFIG_READ", "permanent", `cannot read ${file}`, { cause: err });
  }
  let raw: unknown;
  try {
    raw = parseToml(text);
  } catch (err) {
    throw new M2mError("ERR_CONFIG_INVALID", "permanent", `${file}: not valid TOML`, {
      cause: err,
      details: { file },
    });
  }
  return registrarConfigFrom(raw, dirname(resolve(file)), file, env);
}
