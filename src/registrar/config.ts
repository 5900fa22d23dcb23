import { readFile } from "node:fs/promises";
import { dirname, isAbsolute, join, resolve } from "node:path";
import { parse as parseToml } from "smol-toml";
import { z } from "zod";
import { M2mError } from "../core/errors.js";

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

const fileSchema = z
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
    cert_lifetime: duration.default(7 * 86_400),
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
    /** Token service, EST and ingest settings: parsed by src/registrar/app.ts (`serve`). */
    oauth: z.record(z.string(), z.unknown()).optional(),
    ingest: z.record(z.string(), z.unknown()).optional(),
    /** Key rotation policy (validated by registrar/rotation/policy.ts). */
    rotation: z.record(z.string(), z.unknown()).optional(),
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
  /** Raw `[oauth]` / `[ingest]` tables (validated by src/registrar/app.ts) and the file they came from. */
  readonly sections?: {
    readonly file: string;
    readonly oauth?: Readonly<Record<string, unknown>>;
    readonly ingest?: Readonly<Record<string, unknown>>;
    readonly rotation?: Readonly<Record<string, unknown>>;
  };
}

export const REGISTRAR_DB_FILE = "registrar.db";

/**
 * Builds a RegistrarConfig from the parsed TOML object. Relative paths resolve against `baseDir`.
 * @throws ERR_CONFIG_INVALID naming the key (never the value).
 */
export function registrarConfigFrom(raw: unknown, baseDir: string, file = "<config>"): RegistrarConfig {
  const r = fileSchema.safeParse(raw);
  if (!r.success) {
    const issue = r.error.issues[0];
    const key = issue === undefined ? "" : issue.path.map(String).join(".");
    throw new M2mError("ERR_CONFIG_INVALID", "permanent", `${file}: invalid value for '${key}'`, {
      details: { file, key },
      hint: issue?.message ?? "see docs",
    });
  }
  const c = r.data;
  const abs = (p: string): string => (isAbsolute(p) ? p : resolve(baseDir, p));
  const dataDir = abs(c.data_dir);
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
    caDir: c.ca_dir === undefined ? join(dataDir, "ca") : abs(c.ca_dir),
    publicUrl: c.public_url,
    sessionTtlSeconds: c.session_ttl,
    certLifetimeSeconds: c.cert_lifetime,
    auditLog: c.audit_log === undefined ? join(dataDir, "audit.log") : abs(c.audit_log),
    defaultEkTrustDir:
      c.trust.default_ek_trust_dir === undefined ? undefined : abs(c.trust.default_ek_trust_dir),
    endpoints: c.endpoints,
    maxBodyBytes: c.limits.max_body_bytes,
    requestTimeoutMs: c.limits.request_timeout_ms,
    maxInFlight: c.limits.max_in_flight,
    retryAfterMaxSeconds: c.limits.retry_after_max_s,
    sections: { file, oauth: c.oauth, ingest: c.ingest, rotation: c.rotation },
  };
}

/** Reads and validates a registrar TOML file. @throws ERR_CONFIG_READ, ERR_CONFIG_INVALID */
export async function loadRegistrarConfig(file: string): Promise<RegistrarConfig> {
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
  return registrarConfigFrom(raw, dirname(resolve(file)), file);
}
