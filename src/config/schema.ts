import { z } from "zod";

/**
 * The agent's configuration schema (TOML keys are snake_case and so are the properties here: one
 * name per setting everywhere, in files, env overrides, errors and docs). Every object is strict:
 * an unknown key is an error naming the file and key, never silently ignored (typos in security
 * settings must not fall back to defaults).
 */

/** TPM persistent handles for device keys live in the owner range (TPM 2.0 Part 1, 29.2; EK is 0x8101xxxx). */
export const OWNER_HANDLE_MIN = 0x81000000;
export const OWNER_HANDLE_MAX = 0x8100ffff;

const SECRET_HINT =
  'secrets are given by reference: { file = "/path" }, { credential = "NAME" } (systemd LoadCredential) or { env = "VAR" }';

/** A reference to a secret; the value itself is never written into config. */
export type SecretRef =
  | { readonly file: string }
  | { readonly credential: string }
  | { readonly env: string };

/**
 * Secret references. A literal string is refused with a hint (a PIN in agent.toml would be readable
 * by everyone who can read the config, and ends up in backups and bug reports).
 */
export const secretRefSchema = z.unknown().transform((v, ctx): SecretRef => {
  if (typeof v === "string" || typeof v === "number") {
    ctx.addIssue({ code: "custom", message: `a literal secret value is not allowed; ${SECRET_HINT}` });
    return z.NEVER;
  }
  if (v === null || typeof v !== "object" || Array.isArray(v)) {
    ctx.addIssue({ code: "custom", message: `expected a secret reference; ${SECRET_HINT}` });
    return z.NEVER;
  }
  const entries = Object.entries(v);
  const [first] = entries;
  if (entries.length !== 1 || first === undefined) {
    ctx.addIssue({
      code: "custom",
      message: `expected exactly one of file, credential, env; ${SECRET_HINT}`,
    });
    return z.NEVER;
  }
  const [kind, value] = first;
  if (typeof value !== "string" || value.length === 0) {
    ctx.addIssue({ code: "custom", message: `${kind}: expected a non-empty string` });
    return z.NEVER;
  }
  switch (kind) {
    case "file":
      if (!value.startsWith("/")) {
        ctx.addIssue({ code: "custom", message: "file: expected an absolute path" });
        return z.NEVER;
      }
      return { file: value };
    case "credential":
      // A credential name is a file name inside $CREDENTIALS_DIRECTORY: no path tricks.
      if (!/^[A-Za-z0-9_.-]+$/.test(value) || value === "." || value === "..") {
        ctx.addIssue({ code: "custom", message: "credential: expected a plain credential name" });
        return z.NEVER;
      }
      return { credential: value };
    case "env":
      if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(value)) {
        ctx.addIssue({ code: "custom", message: "env: expected an environment variable name" });
        return z.NEVER;
      }
      return { env: value };
    default:
      ctx.addIssue({ code: "custom", message: `unknown secret reference kind "${kind}"; ${SECRET_HINT}` });
      return z.NEVER;
  }
});

/** Parses 0x-hex strings or integers (TOML has native 0x integers; env values are strings). */
function handleSchema(defaultValue: number) {
  return z
    .union([z.number(), z.string()])
    .transform((v, ctx): number => {
      const n =
        typeof v === "number" ? v : /^0x[0-9a-fA-F]{1,8}$/.test(v) ? Number.parseInt(v, 16) : Number.NaN;
      // Device keys must not land on EK/platform handles, where they would clobber provisioning.
      if (!Number.isInteger(n) || n < OWNER_HANDLE_MIN || n > OWNER_HANDLE_MAX) {
        ctx.addIssue({ code: "custom", message: "expected an owner-range handle 0x81000000-0x8100FFFF" });
        return z.NEVER;
      }
      return n;
    })
    .default(defaultValue);
}

const absPath = z.string().refine((p) => p.startsWith("/"), "expected an absolute path");
const httpsUrl = z
  .string()
  .url()
  .refine((u) => /^https?:\/\//.test(u), "expected an http(s) URL");
const logLevel = z.enum(["debug", "info", "warn", "error"]);
const keyAlgorithm = z.enum(["ec-p256", "rsa-2048"]);
const fraction = z.number().gt(0).lt(1);
/** Octal file modes: TOML 0o660 (integer) or "0660" (string, env). */
const fileMode = z
  .union([z.number().int(), z.string().regex(/^0?[0-7]{3,4}$/)])
  .transform((v) => (typeof v === "number" ? v : Number.parseInt(v, 8)))
  .refine((m) => m >= 0 && m <= 0o777, "expected a file mode like 0o660")
  .refine((m) => (m & 0o007) === 0, "the API socket must not be accessible to others (no o+rwx bits)");

/** "127.0.0.1:9464", "[::1]:9464", "localhost:9464" or an absolute Unix socket path. */
const metricsListen = z.string().refine((s) => {
  if (s.startsWith("/")) return true;
  const m = /^(127\.0\.0\.1|localhost|\[::1\]):(\d{1,5})$/.exec(s);
  return m !== null && Number(m[2]) >= 0 && Number(m[2]) < 65536;
}, "expected a loopback address (127.0.0.1:PORT, [::1]:PORT) or an absolute Unix socket path; metrics are not exposed on the network");

const agentSection = z.strictObject({
  state_dir: absPath.default("/var/lib/m2m-agent"),
  runtime_dir: absPath.default("/run/m2m-agent"),
  log_level: logLevel.default("info"),
  /** SIGTERM: in-flight work gets this long to drain before the process exits anyway. */
  drain_timeout_ms: z.number().int().min(0).max(600_000).default(10_000),
  /** Audit log of identity events; default `<state_dir>/audit.log`. */
  audit_log: absPath.optional(),
});

const tpmSection = z.strictObject({
  tcti: z.string().min(1).default("device:/dev/tpmrm0"),
  srk_handle: handleSchema(0x81000001),
  key_handle: handleSchema(0x81000002),
  ak_handle: handleSchema(0x81000003),
  algorithm: keyAlgorithm.default("ec-p256"),
  timeout_ms: z.number().int().min(100).max(300_000).default(10_000),
  /**
   * Where a newly created device key keeps its TPM blobs (TLS through tpm2-pkcs11 needs them; see
   * docs/credentials.md "TPM key for mTLS"). Default `<state_dir>/tpm-key-blobs` when relay.mqtt.auth
   * is "mtls-tpm", else none.
   */
  key_blob_dir: absPath.optional(),
  /** tpm2-pkcs11 store for TLS with the TPM key. Default `<state_dir>/tpm2-pkcs11`. */
  tls_store_dir: absPath.optional(),
  /** File (0600) holding the tpm2-pkcs11 token's user PIN (required for relay.mqtt.auth = "mtls-tpm"). */
  tls_pin_file: absPath.optional(),
  /**
   * Auth value of the TPM's owner hierarchy, when the owner set one (`tpm2_changeauth -c owner`): a
   * file (0600) or systemd credential, read on every use and handed to tpm2-tools as `file:` (never on a
   * command line). Plain text, or `hex:` followed by hex digits. Unset: empty owner auth.
   */
  owner_auth: secretRefSchema.optional(),
});

const pkcs11Section = z.strictObject({
  module: absPath.optional(),
  token_label: z.string().min(1).max(32).optional(),
  key_label: z.string().min(1).default("m2m-device"),
  key_id: z
    .string()
    .regex(/^[0-9a-fA-F]{2,64}$/, "expected hex")
    .optional(),
  algorithm: keyAlgorithm.default("ec-p256"),
  pin: secretRefSchema.optional(),
});

const keysSection = z
  .strictObject({
    provider: z.enum(["tpm", "pkcs11"]).default("tpm"),
    tpm: tpmSection.prefault({}),
    pkcs11: pkcs11Section.prefault({}),
  })
  .superRefine((k, ctx) => {
    if (k.provider !== "pkcs11") return;
    if (k.pkcs11.module === undefined)
      ctx.addIssue({
        code: "custom",
        path: ["pkcs11", "module"],
        message: 'required when provider = "pkcs11"',
      });
    if (k.pkcs11.token_label === undefined)
      ctx.addIssue({
        code: "custom",
        path: ["pkcs11", "token_label"],
        message: 'required when provider = "pkcs11"',
      });
    if (k.pkcs11.pin === undefined)
      ctx.addIssue({ code: "custom", path: ["pkcs11", "pin"], message: 'required when provider = "pkcs11"' });
  });

const enrollSection = z
  .strictObject({
    enabled: z.boolean().default(false),
    registrar_url: httpsUrl.optional(),
    registrar_ca_file: absPath.optional(),
    method: z.enum(["tpm", "pkcs11"]).optional(),
    bootstrap_token: secretRefSchema.optional(),
    hardware_serial: z.string().min(1).max(128).optional(),
    group: z.string().min(1).max(128).optional(),
    requested_attributes: z.record(z.string(), z.string()).default({}),
  })
  .superRefine((e, ctx) => {
    if (e.enabled && e.registrar_url === undefined)
      ctx.addIssue({ code: "custom", path: ["registrar_url"], message: "required when enabled = true" });
  });

/**
 * An authorization server's URLs: https only (RFC 8414 §2: the issuer is an https URL; client
 * assertions, DPoP proofs and tokens must not cross a plaintext link).
 */
const asUrl = z
  .string()
  .url()
  .refine(
    (u) => u.startsWith("https://"),
    "must be an https:// URL: an authorization server is never reached over plain http (RFC 8414 §2); give its https issuer and, for a private CA, credentials.oauth.ca_file",
  );
/** RFC 8707 §2: an absolute URI without a fragment. */
const resourceIndicator = z
  .string()
  .url()
  .refine(
    (u) => !u.includes("#"),
    "a resource indicator is an absolute URI without a fragment (RFC 8707 §2)",
  );

const oauthSection = z.strictObject({
  issuer: asUrl,
  token_endpoint: asUrl.optional(),
  /**
   * PEM CA file for the authorization server's TLS. Default: the fleet CA when the issuer is the
   * registrar, else the system store.
   */
  ca_file: absPath.optional(),
  /** RFC 8707 resource indicators sent as `resource` in every token request (audience of the token). */
  resource: z.array(resourceIndicator).max(16).default([]),
  client_id: z.string().min(1).optional(),
  scopes: z.array(z.string().min(1)).default([]),
  dpop: z.boolean().default(true),
  refresh_fraction: fraction.default(0.8),
  cache_file: absPath.optional(),
});

/** Continuous attestation (docs/attestation.md): used only when the registrar asks for TPM quotes. */
const attestationSection = z.strictObject({
  /** Measured-boot event log sent with each quote when the file exists (absent file: PCR values alone). */
  event_log: absPath.default("/sys/kernel/security/tpm0/binary_bios_measurements"),
  /** First wait after a refused quote, seconds; doubles up to `retry_max_s` (never a tight TPM loop). */
  retry_base_s: z.number().int().min(1).max(3600).default(60),
  retry_max_s: z.number().int().min(1).max(86_400).default(900),
});

const estSection = z.strictObject({
  url: httpsUrl.optional(),
  renew_fraction: fraction.default(0.6667),
  rotate_key: z.boolean().default(false),
});

const outboxSection = z.strictObject({
  /** Default `<state_dir>/outbox.db`. */
  path: absPath.optional(),
  max_bytes: z
    .number()
    .int()
    .min(1024)
    .default(64 * 1024 * 1024),
  max_count: z.number().int().min(1).default(100_000),
  max_age_s: z
    .number()
    .int()
    .min(1)
    .default(7 * 24 * 3600),
  drop_policy: z.enum(["oldest", "refuse"]).default("oldest"),
  /**
   * Where the outbox's SQLite work runs: `main` (the daemon's event loop: least CPU and memory,
   * best throughput on a 2-core gateway) or `worker` (a worker thread, so the event loop only serves
   * sockets: lower ingest-ack latency when a core is idle). Measured in docs/outbox.md.
   */
  thread: z.enum(["main", "worker"]).default("main"),
});

const mqttSinkSection = z.strictObject({
  urls: z.array(z.string().regex(/^mqtts?:\/\//, "expected mqtt:// or mqtts:// URL")).min(1),
  auth: z.enum(["mtls-pkcs11", "mtls-tpm", "token"]).default("token"),
  topic_template: z.string().min(1).default("devices/{device_id}/{channel}"),
  qos: z.union([z.literal(0), z.literal(1), z.literal(2)]).default(1),
  inflight: z.number().int().min(1).max(65535).default(32),
  ca_file: absPath.optional(),
});

const httpsSinkSection = z.strictObject({
  url: httpsUrl,
  batch_max: z.number().int().min(1).max(10_000).default(100),
  batch_ms: z.number().int().min(0).max(600_000).default(1000),
});

const relaySection = z.strictObject({
  /**
   * A sink that delivered nothing for this long while it had work puts the agent in `degraded`
   * (status names the sink and its last error code); its next delivery clears it.
   */
  unhealthy_after_s: z.number().min(0.1).max(86_400).default(10),
  outbox: outboxSection.prefault({}),
  mqtt: mqttSinkSection.optional(),
  https: httpsSinkSection.optional(),
  sources: z
    .strictObject({
      mqtt: z
        .strictObject({
          url: z.string().regex(/^mqtts?:\/\//, "expected mqtt:// or mqtts:// URL"),
          topics: z.array(z.string().min(1)).min(1),
        })
        .optional(),
    })
    .prefault({}),
});

const apiSection = z.strictObject({
  socket: absPath.default("/run/m2m-agent/api.sock"),
  mode: fileMode.default(0o660),
  group: z.string().min(1).optional(),
});

const metricsSection = z.strictObject({
  enabled: z.boolean().default(false),
  listen: metricsListen.default("127.0.0.1:9464"),
});

export const agentConfigSchema = z.strictObject({
  agent: agentSection.prefault({}),
  keys: keysSection.prefault({}),
  enroll: enrollSection.prefault({}),
  credentials: z
    .strictObject({
      oauth: oauthSection.optional(),
      est: estSection.optional(),
      attestation: attestationSection.prefault({}),
    })
    .prefault({}),
  relay: relaySection.prefault({}),
  api: apiSection.prefault({}),
  metrics: metricsSection.prefault({}),
});

/** The one validated, typed agent configuration. */
export type AgentConfig = z.output<typeof agentConfigSchema>;
export type TpmConfig = AgentConfig["keys"]["tpm"];
export type Pkcs11Config = AgentConfig["keys"]["pkcs11"];
