import { createPublicKey, type JsonWebKey, randomBytes } from "node:crypto";
import { appendFileSync, closeSync, fsyncSync, openSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { isAbsolute, join } from "node:path";
import { jwtVerify } from "jose";
import { z } from "zod";
import { type Clock, systemClock } from "../core/clock.js";
import { M2mError } from "../core/errors.js";
import { type Logger, silentLogger } from "../core/log.js";
import { AttestationGate, QuoteNonceIssuer } from "./attestation/index.js";
import type { FleetCa } from "./ca/index.js";
import { parseDurationSeconds, type RegistrarConfig } from "./config.js";
import { keyIdentity } from "./enrolment/complete.js";
import { estRoutes } from "./est/est-service.js";
import { HttpError, type Route, type RouteContext, type RouteResponse } from "./http/router.js";
import { type IngestedMessage, InMemoryIngestStore, ingestRoutes } from "./ingest/routes.js";
import {
  DEFAULT_ASSERTION_POLICY,
  JWT_BEARER_ASSERTION_TYPE,
  verifyClientAssertion,
} from "./oauth/client-assertion.js";
import { CachedDeviceDirectory } from "./oauth/directory.js";
import { type ReplayGuard, StoreReplayGuard } from "./oauth/replay-cache.js";
import type { AbacRule } from "./oauth/scope-policy.js";
import { loadSigningKeySet } from "./oauth/signing-key.js";
import { oauthRoutes, publishedKeyResolver, TokenService } from "./oauth/token-service.js";
import { CrlPublisher, crlRoute, RevocationHook } from "./revocation/index.js";
import { rotationPolicyFrom, tpmRotationRoutes } from "./rotation/index.js";
import { type RunningRegistrar, startRegistrar } from "./server.js";
import type { RegistrarStore } from "./store/index.js";

/**
 * The registrar as `m2m-registrar serve` runs it: enrolment routes (server.ts) plus the OAuth token
 * service, EST, the reference ingest endpoint and device self-revocation, all configured from the
 * registrar TOML (`[oauth]`, `[ingest]`). Enrolment results point devices at these endpoints.
 */

/** Fixed route paths (the issuer is an origin; paths do not depend on the late-bound port). */
export const APP_PATHS = {
  token: "/oauth2/token",
  jwks: "/jwks",
  est: "/.well-known/est",
  ingest: "/v1/ingest",
  selfRevoke: "/v1/devices/self/revoke",
} as const;

/** Default scopes when `[oauth.roles]` and `[[oauth.rules]]` are both absent: every role gets these. */
export const DEFAULT_SCOPES = ["telemetry:write", "est"] as const;
export const DEFAULT_INGEST_AUDIENCE = "urn:m2m:ingest";
/** Default `oauth.access_token_ttl`. */
export const DEFAULT_ACCESS_TOKEN_TTL_SECONDS = 300;
export const DEFAULT_EST_AUDIENCE = "urn:m2m:est";
export const INGEST_LOG_FILE = "ingest.ndjson";
/**
 * Staleness bound of the token endpoint's device cache: a revocation (or key change) committed by
 * any replica is honoured by this one within this long even without change notifications.
 */
export const DEVICE_CACHE_TTL_MS = 1000;

const scopeToken = z.string().regex(/^[\x21\x23-\x5B\x5D-\x7E]{1,256}$/, "not a valid scope token");

export const registrarOauthSchema = z
  .object({
    /** Issuer identifier: an https origin; default `public_url`, else the listening URL. */
    issuer: z.url().max(2048).optional(),
    // 5 min: how long a revoked device's token still works at a resource server that does not look
    // the device up (docs/revocation.md); the agent refreshes before expiry, so it costs one token
    // request per device per ~4 min.
    access_token_ttl: z.union([z.string().max(32), z.number()]).default(DEFAULT_ACCESS_TOKEN_TTL_SECONDS),
    /** Extra `aud` values for resource servers elsewhere (API gateway, broker plugin). */
    audiences: z.array(z.string().min(1).max(512)).max(16).default([]),
    require_dpop: z.boolean().default(false),
    require_dpop_nonce: z.boolean().default(false),
    /** role → scopes (RBAC). */
    roles: z.record(z.string(), z.array(scopeToken).max(64)).optional(),
    /** Attribute rules (ABAC), e.g. `{ scope = "site:{site}:write", require = { type = "gw" } }`. */
    rules: z
      .array(
        z
          .object({
            scope: z.string().min(1).max(256),
            roles: z.array(z.string().min(1)).optional(),
            require: z.record(z.string(), z.union([z.string(), z.array(z.string())])).optional(),
            /** Only for token requests whose TPM quote was verified (docs/attestation.md). */
            attested: z.boolean().optional(),
          })
          .strict(),
      )
      .max(256)
      .optional(),
    est_audience: z.string().min(1).max(512).default(DEFAULT_EST_AUDIENCE),
  })
  .strict();

export const registrarIngestSchema = z
  .object({
    enabled: z.boolean().default(true),
    audience: z.string().min(1).max(512).default(DEFAULT_INGEST_AUDIENCE),
    scope: scopeToken.default("telemetry:write"),
    require_dpop: z.boolean().default(true),
    /** NDJSON of accepted messages (relative to data_dir); one line per new message id. */
    log_file: z.string().min(1).max(4096).default(INGEST_LOG_FILE),
  })
  .strict();

export interface AppSettings {
  readonly issuer: string | undefined;
  readonly accessTokenTtlSec: number;
  readonly audiences: readonly string[];
  readonly requireDpop: boolean;
  readonly requireDpopNonce: boolean;
  readonly roles: Readonly<Record<string, readonly string[]>>;
  readonly rules: readonly AbacRule[];
  readonly estAudience: string;
  readonly ingest: {
    readonly enabled: boolean;
    readonly audience: string;
    readonly scope: string;
    readonly requireDpop: boolean;
    readonly logFile: string;
  };
}

function invalid(file: string, section: string, err: z.ZodError): M2mError {
  const issue = err.issues[0];
  const key = [section, ...(issue?.path.map(String) ?? [])].join(".");
  return new M2mError("ERR_CONFIG_INVALID", "permanent", `${file}: invalid value for '${key}'`, {
    details: { file, key },
    hint: issue?.message ?? "see docs/registrar.md",
  });
}

/**
 * Validates the `[oauth]` and `[ingest]` tables of the registrar config.
 * @throws ERR_CONFIG_INVALID naming the file and key (never the value).
 */
export function appSettingsFrom(config: RegistrarConfig): AppSettings {
  const file = config.sections?.file ?? "<config>";
  const o = registrarOauthSchema.safeParse(config.sections?.oauth ?? {});
  if (!o.success) throw invalid(file, "oauth", o.error);
  const i = registrarIngestSchema.safeParse(config.sections?.ingest ?? {});
  if (!i.success) throw invalid(file, "ingest", i.error);
  let ttl: number;
  try {
    ttl = parseDurationSeconds(o.data.access_token_ttl);
  } catch (err) {
    throw new M2mError(
      "ERR_CONFIG_INVALID",
      "permanent",
      `${file}: invalid value for 'oauth.access_token_ttl'`,
      {
        cause: err,
        details: { file, key: "oauth.access_token_ttl" },
        hint: "a duration like 300, 90s, 10m",
      },
    );
  }
  if (ttl > 24 * 3600) {
    throw new M2mError(
      "ERR_CONFIG_INVALID",
      "permanent",
      `${file}: invalid value for 'oauth.access_token_ttl'`,
      {
        details: { file, key: "oauth.access_token_ttl" },
        hint: "access tokens are short-lived: at most 24h",
      },
    );
  }
  const explicit = o.data.roles !== undefined || o.data.rules !== undefined;
  const issuer = o.data.issuer ?? config.publicUrl;
  return {
    issuer: issuer?.replace(/\/+$/, ""),
    accessTokenTtlSec: ttl,
    audiences: o.data.audiences,
    requireDpop: o.data.require_dpop,
    requireDpopNonce: o.data.require_dpop_nonce,
    roles: o.data.roles ?? {},
    // Without an explicit policy every role gets the defaults (a rule without `roles` matches all roles).
    rules: explicit ? (o.data.rules ?? []) : DEFAULT_SCOPES.map((scope) => ({ scope })),
    estAudience: o.data.est_audience,
    ingest: {
      enabled: i.data.enabled,
      audience: i.data.audience,
      scope: i.data.scope,
      requireDpop: i.data.require_dpop,
      logFile: isAbsolute(i.data.log_file) ? i.data.log_file : join(config.dataDir, i.data.log_file),
    },
  };
}

/** How long the shared ingest dedup remembers a message id (the agent's outbox retries within this). */
export const INGEST_DEDUP_WINDOW_MS = 7 * 86_400_000;

/**
 * Appends each new ingested message to an NDJSON file (this replica's log). Dedup: with `shared`
 * (the registrar store) a message id is recorded in the store so a retry that lands on another
 * replica is still a duplicate; without it, an in-memory window of the newest ids (one process).
 */
export class LoggingIngestStore extends InMemoryIngestStore {
  readonly file: string;
  readonly #maxKept: number;
  readonly #shared: Pick<RegistrarStore, "consumeOnce" | "isConsumed"> | undefined;

  constructor(file: string, maxKept = 100_000, shared?: Pick<RegistrarStore, "consumeOnce" | "isConsumed">) {
    super();
    this.file = file;
    this.#maxKept = maxKept;
    this.#shared = shared;
    // 0600: payloads are device data, not for every local user.
    closeSync(openSync(file, "a", 0o600));
  }

  override async add(m: IngestedMessage): Promise<boolean> {
    if (this.#shared !== undefined) {
      const key = `i|${m.deviceId}|${m.id}`;
      const now = new Date(m.receivedAt);
      this.received++;
      if (await this.#shared.isConsumed(key, now)) {
        this.duplicates++;
        return false;
      }
      // Persist first, record after: a failed append must not leave the id marked as delivered (the
      // agent would then drop a message it was never acknowledged for). A concurrent replica may log
      // the same message too: at-least-once, never lost.
      this.#append(m);
      this.messages.set(m.id, m);
      await this.#shared.consumeOnce(key, new Date(m.receivedAt + INGEST_DEDUP_WINDOW_MS), now);
      this.#trim();
      return true;
    }
    const fresh = await super.add(m);
    if (!fresh) return false;
    this.#append(m);
    this.#trim();
    return true;
  }

  #append(m: IngestedMessage): void {
    const fd = openSync(this.file, "a", 0o600);
    try {
      appendFileSync(fd, `${JSON.stringify(m)}\n`);
      // Acknowledged upstream means durable here: the agent deletes its copy after our 2xx.
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }

  #trim(): void {
    // Bounded memory: the local window keeps the newest ids only.
    if (this.messages.size > this.#maxKept) {
      const oldest = this.messages.keys().next().value;
      if (oldest !== undefined) this.messages.delete(oldest);
    }
  }
}

export interface RegistrarAppDeps {
  readonly store: RegistrarStore;
  readonly ca: FleetCa;
  readonly clock?: Clock;
  readonly logger?: Logger;
}

export interface RunningRegistrarApp extends RunningRegistrar {
  /** The issuer identifier (also the base of every endpoint handed to devices). */
  readonly issuer: string;
  readonly tokenService: TokenService;
  readonly ingest: LoggingIngestStore | undefined;
  readonly settings: AppSettings;
  /** The fleet CA's CRL (`GET /v1/crl`, `revocation.crl_file`) and the revocation hook. */
  readonly crl: CrlPublisher;
}

/**
 * Starts the full registrar: enrolment + token service + EST + ingest + self-revocation.
 * The signing key is created in `data_dir` on first start (0600) and reused afterwards.
 * @throws ERR_CONFIG_INVALID, ERR_OAUTH_SIGNING_KEY, listen errors.
 */
export async function startRegistrarApp(
  config: RegistrarConfig,
  deps: RegistrarAppDeps,
): Promise<RunningRegistrarApp> {
  const settings = appSettingsFrom(config);
  const rotation = rotationPolicyFrom(config.sections?.rotation, config.sections?.file);
  const clock = deps.clock ?? systemClock;
  const log = deps.logger ?? silentLogger;
  // With a database server nothing else creates data_dir (audit log, ingest log, default signing key).
  await mkdir(config.dataDir, { recursive: true, mode: 0o700 });
  const keySet = await loadSigningKeySet(config);
  const signingKey = keySet.signing;
  // Everything a request depends on is in the store (shared by replicas): jti replay records, the
  // DPoP nonce key, sessions. The only cache is the device directory below (bounded staleness).
  const nonceSecret = await deps.store.sharedSecret("dpop-nonce-hmac", () => randomBytes(32));
  const quoteNonceSecret = await deps.store.sharedSecret("attestation-nonce-hmac", () => randomBytes(32));
  const directory = new CachedDeviceDirectory(deps.store, {
    ttlMs: DEVICE_CACHE_TTL_MS,
    monotonicMs: () => clock.monotonicMs(),
  });
  const attestation = new AttestationGate({
    store: deps.store,
    directory,
    nonces: new QuoteNonceIssuer(clock, quoteNonceSecret),
    clock,
    log: log.child({ component: "attestation" }),
  });
  const tokenReplay: ReplayGuard = new StoreReplayGuard(deps.store, "t|");
  const resourceReplay: ReplayGuard = new StoreReplayGuard(deps.store, "r|");

  // The issuer may depend on the port the server got (listen.port = 0): bind late.
  let base = settings.issuer ?? "";
  const issuer = (): string => base;
  let service: TokenService | undefined;
  const svc = (): TokenService => {
    if (service === undefined) throw new HttpError(503, "ERR_NOT_READY", "service starting");
    return service;
  };
  const audiences = [
    ...new Set([
      ...(settings.ingest.enabled ? [settings.ingest.audience] : []),
      settings.estAudience,
      ...settings.audiences,
    ]),
  ];
  const makeService = (iss: string): TokenService =>
    new TokenService(
      {
        issuer: iss,
        tokenEndpoint: `${iss}${APP_PATHS.token}`,
        jwksUri: `${iss}${APP_PATHS.jwks}`,
        audiences,
        accessTokenTtlSec: settings.accessTokenTtlSec,
        scopes: { roles: settings.roles, rules: settings.rules },
        requireDpop: settings.requireDpop,
        requireDpopNonce: settings.requireDpopNonce,
      },
      {
        directory,
        signingKey,
        publishedKeys: keySet.published,
        replay: tokenReplay,
        resourceReplay,
        nonceSecret,
        clock,
        log: log.child({ component: "oauth" }),
        attestation,
      },
    );

  // Route shapes come from a placeholder service; each delegates to the real one at request time.
  const oauthShapes = oauthRoutes({ tokenService: makeService("https://issuer.invalid") });
  // Built once, on the first request after the service exists (the issuer is bound after listen).
  let realRoutes: Route[] | undefined;
  const oauth: Route[] = oauthShapes.map((shape) => ({
    ...shape,
    handle: (ctx: RouteContext) => {
      realRoutes ??= oauthRoutes({ tokenService: svc() });
      const real = realRoutes.find((r) => r.method === shape.method && r.path === shape.path);
      if (real === undefined) throw new HttpError(404, "ERR_NOT_FOUND", "not found");
      return real.handle(ctx);
    },
  }));

  const est = estRoutes({
    directory: deps.store,
    ca: deps.ca,
    clock,
    certLifetimeSeconds: config.certLifetimeSeconds,
    publicUrl: issuer,
    accessTokens: { verifyAccessToken: (t, check) => svc().verifyAccessToken(t, check) },
    tokenAudience: settings.estAudience,
    renewalQuoteMaxAge: async (device) => {
      const policy = await deps.store.getAttestationPolicy(device.group);
      return policy?.requireForRenewal === true ? policy.maxQuoteAgeSec : undefined;
    },
    onRenewalRefused: (device, info) =>
      deps.store.appendAudit({
        ts: clock.now().toISOString(),
        event: "attestation.renewal_refused",
        outcome: "failure",
        code: "ERR_ATTESTATION_RENEWAL",
        deviceId: device.deviceId,
        group: device.group,
        via: info.via,
        reason:
          info.attestedAt === undefined
            ? "no attested token"
            : `attested ${clock.nowSeconds() - info.attestedAt} s ago (max ${info.maxAgeSec} s)`,
      }),
    // The registry shows the certificate a device holds now, not the one from its enrolment.
    onIssued: (deviceId, cert) => deps.store.recordCertificate(deviceId, cert, clock.now()),
    // PKCS#11 key rotation over simplereenroll (CSR signed by the new key, request by the current
    // one); TPM devices rotate only through /v1/rotate/tpm/* (AK certification).
    allowKeyRotation: async (device) => {
      const d = await deps.store.getDevice(device.deviceId);
      return d !== undefined && d.method !== "tpm" && rotation.modeFor(d) === "allow";
    },
    onKeyRotated: async (deviceId, jwk, cert) => {
      const d = await deps.store.getDevice(deviceId);
      if (d === undefined) throw new M2mError("ERR_DEVICE_UNKNOWN", "permanent", "no such device");
      const id = await keyIdentity(
        createPublicKey({ key: jwk as JsonWebKey, format: "jwk" }).export({ format: "der", type: "spki" }),
      );
      await deps.store.replaceDeviceKey({
        deviceId,
        previousThumbprint: d.thumbprint,
        publicJwk: id.jwk,
        thumbprint: id.thumbprint,
        evidence:
          d.evidence === undefined ? undefined : { ...d.evidence, rotatedAt: clock.now().toISOString() },
        certSerial: cert.serial,
        certNotAfter: cert.notAfter,
        at: clock.now(),
      });
    },
    log: log.child({ component: "est" }),
  });
  const rotate = tpmRotationRoutes({
    store: deps.store,
    ca: deps.ca,
    clock,
    policy: rotation,
    certLifetimeSeconds: config.certLifetimeSeconds,
    publicUrl: issuer,
    accessTokens: { verifyAccessToken: (t, check) => svc().verifyAccessToken(t, check) },
    tokenAudience: settings.estAudience,
    log: log.child({ component: "rotation" }),
  });

  let ingestStore: LoggingIngestStore | undefined;
  let ingest: Route[] = [];
  if (settings.ingest.enabled) {
    ingestStore = new LoggingIngestStore(settings.ingest.logFile, 100_000, deps.store);
    ingest = ingestRoutes({
      // Signature, issuer, type and expiry; audience, scope and DPoP binding are checked by the route.
      verifyAccessToken: async (t) => {
        const { payload } = await jwtVerify(t, publishedKeyResolver(keySet.published), {
          issuer: issuer(),
          typ: "at+jwt",
          algorithms: ["ES256"],
          clockTolerance: 30,
          currentDate: clock.now(),
        });
        const device = typeof payload.sub === "string" ? await deps.store.getDevice(payload.sub) : undefined;
        // Security: this resource server shares the registry, so a revoked device's unexpired token
        // stops working here at once (elsewhere it lasts until `exp`: docs/revocation.md).
        if (device?.status !== "active")
          throw new M2mError("ERR_DEVICE_REVOKED", "permanent", "the token's device is not active");
        return payload;
      },
      audience: settings.ingest.audience,
      scope: settings.ingest.scope,
      requireDpop: settings.ingest.requireDpop,
      publicUrl: () => `${issuer()}${APP_PATHS.ingest}`,
      store: ingestStore,
      replay: new StoreReplayGuard(deps.store, "ingest|"),
      clock,
    }).routes;
  }

  const rv = config.revocation;
  const hook =
    rv.hook === undefined
      ? undefined
      : new RevocationHook(
          { command: rv.hook, timeoutMs: rv.hookTimeoutSeconds * 1000 },
          { clock, log: log.child({ component: "revocation-hook" }) },
        );
  const crl = new CrlPublisher({
    store: deps.store,
    ca: deps.ca,
    clock,
    log: log.child({ component: "crl" }),
    file: rv.crlFile,
    validitySeconds: rv.crlValiditySeconds,
    refreshSeconds: rv.crlRefreshSeconds,
    checkIntervalMs: rv.checkIntervalMs,
    hook,
  });
  // Before listening: the CRL file exists (a broker's crlfile) before any device is served.
  await crl.start();

  const revoke = selfRevokeRoute({
    store: deps.store,
    replay: new StoreReplayGuard(deps.store, "revoke|"),
    clock,
    audiences: () => [`${issuer()}${APP_PATHS.selfRevoke}`, issuer()],
    log,
    onRevoked: () => crl.trigger(),
  });

  // Devices are told where everything is; operator overrides in [endpoints] win.
  const endpoints: { token?: string; est?: string; mqtt?: string; ingest?: string } = {
    ...config.endpoints,
  };
  const appConfig: RegistrarConfig = { ...config, endpoints };
  let running: RunningRegistrar;
  try {
    running = await startRegistrar(appConfig, {
      store: deps.store,
      ca: deps.ca,
      clock,
      logger: log,
      extraRoutes: [...oauth, ...est, ...rotate, ...ingest, revoke, crlRoute(crl)],
    });
  } catch (err) {
    await crl.close();
    throw err;
  }
  if (base === "") base = (config.publicUrl ?? running.url).replace(/\/+$/, "");
  service = makeService(base);
  endpoints.token ??= service.tokenEndpoint;
  if (settings.ingest.enabled) endpoints.ingest ??= `${base}${APP_PATHS.ingest}`;
  // endpointsFor() uses `publicUrl ?? baseUrl` for `registrar`; keep the issuer consistent with it.
  log.info("registrar services mounted", {
    issuer: base,
    tokenEndpoint: endpoints.token,
    est: endpoints.est,
    ingest: endpoints.ingest,
  });
  return {
    ...running,
    close: async () => {
      directory.close();
      await crl.close();
      await running.close();
    },
    issuer: base,
    tokenService: service,
    ingest: ingestStore,
    settings,
    crl,
  };
}

/**
 * `POST /v1/devices/self/revoke`: a device decommissions itself. Authenticated like the token
 * endpoint, with a private_key_jwt assertion (RFC 7523) signed by the device key whose `aud` is this
 * URL; afterwards the device gets no tokens, no EST certificates and cannot enrol again.
 */
export function selfRevokeRoute(deps: {
  readonly store: RegistrarStore;
  /** Assertion jti records (the registrar passes the store-backed guard). */
  readonly replay: ReplayGuard;
  readonly clock: Clock;
  readonly audiences: () => readonly string[];
  readonly log: Logger;
  /** Called after a revocation is committed (the CRL publisher re-checks at once). */
  readonly onRevoked?: () => Promise<void>;
}): Route {
  const replay = deps.replay;
  return {
    method: "POST",
    path: APP_PATHS.selfRevoke,
    contentTypes: ["application/x-www-form-urlencoded"],
    maxBodyBytes: 16_384,
    audit: "device.self_revoke",
    handle: async (ctx: RouteContext): Promise<RouteResponse> => {
      const form = new URLSearchParams(ctx.rawBody.toString("utf8"));
      for (const name of ["client_assertion", "client_assertion_type", "client_id"]) {
        // Security: repeated parameters are ambiguous; refuse instead of picking one.
        if (form.getAll(name).length > 1) throw new HttpError(400, "ERR_BAD_REQUEST", "bad request");
      }
      const assertion = form.get("client_assertion");
      if (form.get("client_assertion_type") !== JWT_BEARER_ASSERTION_TYPE || assertion === null)
        throw new HttpError(401, "ERR_UNAUTHENTICATED", "device authentication required");
      let deviceId: string;
      try {
        // Security: only the device itself (its registered key) may revoke itself; replays are refused.
        const device = await verifyClientAssertion(assertion, form.get("client_id") ?? undefined, {
          directory: deps.store,
          replay,
          clock: deps.clock,
          policy: { ...DEFAULT_ASSERTION_POLICY, maxLifetimeSec: 120, audiences: deps.audiences() },
        });
        deviceId = device.deviceId;
      } catch (err) {
        const code = err instanceof M2mError ? err.code : "ERR_INTERNAL";
        deps.log.info("self-revocation refused", { code });
        throw new HttpError(401, "ERR_UNAUTHENTICATED", "device authentication failed", { cause: err });
      }
      ctx.auditFields({ deviceId });
      const d = await deps.store.revokeDevice(deviceId, deps.clock.now());
      deps.log.info("device revoked itself (decommission)", { deviceId });
      await deps.onRevoked?.();
      return {
        status: 200,
        json: { v: 1, deviceId: d.deviceId, status: d.status, revokedAt: d.revokedAt?.toISOString() },
      };
    },
  };
}
