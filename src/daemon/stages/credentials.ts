import { X509Certificate } from "node:crypto";
import { readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import type { AgentConfig } from "../../config/index.js";
import { writeFileAtomic } from "../../core/atomic-file.js";
import { asM2mError, type M2mError } from "../../core/errors.js";
import type { DaemonRotation } from "../../credentials/est/daemon-rotation.js";
import type { CertificateRenewer, CertificateStatus } from "../../credentials/est/renewer.js";
import type { OAuthClient } from "../../credentials/oauth/client.js";
import type { AccessToken, DpopSigner, TokenSource } from "../../credentials/oauth/token-source.js";
import { type EnrolmentState, writeEnrolmentState } from "../../enroll/state.js";
import type { KeyProvider } from "../../keys/key-provider.js";
import type { AgentStage, StageContext, StageHandle } from "../compose.js";

/** The device certificate the renewer keeps current (seeded from the enrolment state). */
export const DEVICE_CERT_FILE = "device-cert.pem";

export function deviceCertPath(config: AgentConfig): string {
  return join(config.agent.state_dir, DEVICE_CERT_FILE);
}

/** A token source that also reports what it handed out (status, metrics) and drops on refusal. */
export type ObservedTokenSource = TokenSource & { invalidate(scope?: string): void };

/** Where the agent gets tokens: explicit `[credentials.oauth]`, else the enrolment's endpoints. */
export interface OAuthTarget {
  readonly clientId: string;
  readonly issuer?: string;
  readonly tokenEndpoint?: string;
  readonly scope: string;
  readonly dpop: boolean;
  readonly refreshFraction: number;
  readonly cacheFile?: string;
  /** Trust anchor for the authorization server's TLS (the fleet CA when it is our registrar). */
  readonly caPem?: string;
}

function sameOrigin(a: string | undefined, b: string | undefined): boolean {
  if (a === undefined || b === undefined) return false;
  try {
    return new URL(a).origin === new URL(b).origin;
  } catch {
    return false;
  }
}

/** The registrar's TLS anchors: `enroll.registrar_ca_file` plus the fleet CA chain from enrolment. */
export async function registrarCaPem(
  config: AgentConfig,
  enrolment: EnrolmentState | undefined,
): Promise<string | undefined> {
  const parts: string[] = [];
  if (config.enroll.registrar_ca_file !== undefined)
    parts.push(await readFile(config.enroll.registrar_ca_file, "utf8"));
  if (enrolment !== undefined) parts.push(...enrolment.caChainPem);
  return parts.length === 0 ? undefined : parts.join("\n");
}

/** Resolves the OAuth client settings. @returns undefined when there is no client identity yet. */
export async function oauthTarget(
  config: AgentConfig,
  enrolment: EnrolmentState | undefined,
): Promise<OAuthTarget | undefined> {
  const o = config.credentials.oauth;
  const clientId = o?.client_id ?? enrolment?.deviceId;
  if (clientId === undefined) return undefined;
  const ca = await registrarCaPem(config, enrolment);
  if (o !== undefined) {
    const ours = sameOrigin(o.issuer, enrolment?.registrarUrl ?? config.enroll.registrar_url);
    return {
      clientId,
      issuer: o.issuer,
      ...(o.token_endpoint === undefined ? {} : { tokenEndpoint: o.token_endpoint }),
      scope: o.scopes.join(" "),
      dpop: o.dpop,
      refreshFraction: o.refresh_fraction,
      ...(o.cache_file === undefined ? {} : { cacheFile: o.cache_file }),
      // Another authorization server is verified against the system store.
      ...(ours && ca !== undefined ? { caPem: ca } : {}),
    };
  }
  if (enrolment === undefined) return undefined;
  return {
    clientId,
    tokenEndpoint: enrolment.endpoints.token,
    scope: "",
    dpop: true,
    refreshFraction: 0.8,
    ...(ca === undefined ? {} : { caPem: ca }),
  };
}

/** The EST base URL (without `/.well-known/est`): `[credentials.est] url`, else the enrolment's. */
export function estBaseUrl(config: AgentConfig, enrolment: EnrolmentState): string {
  const url = config.credentials.est?.url ?? enrolment.endpoints.est;
  return url.replace(/\/+$/, "").replace(/\/\.well-known\/est$/, "");
}

/**
 * Writes the enrolment certificate to the renewer's file when that file is missing, belongs to
 * another key, or is older than the enrolment's (a fresh enrolment or re-attestation wins).
 */
export async function seedCertificate(path: string, enrolment: EnrolmentState): Promise<void> {
  const fromState = new X509Certificate(enrolment.certificatePem);
  let current: X509Certificate | undefined;
  try {
    current = new X509Certificate(await readFile(path, "utf8"));
  } catch {
    current = undefined;
  }
  // A NEWER certificate for another key is a key rotation whose enrolment-state update a crash cut
  // off: it wins (its key is the current one; the enrolment's key may already be destroyed).
  const newer = current !== undefined && new Date(current.validFrom) > new Date(fromState.validFrom);
  const stale =
    current === undefined ||
    (!newer && !current.publicKey.equals(fromState.publicKey)) ||
    new Date(current.validFrom) < new Date(fromState.validFrom);
  if (stale) await writeFileAtomic(path, `${enrolment.certificatePem.trim()}\n`, 0o600);
}

/** The PKCS#11 PIN as a file the OpenSSL engine can read (`pin-source=file:`), when there is one. */
export function pinFileOf(config: AgentConfig, env: NodeJS.ProcessEnv): string | undefined {
  const pin = config.keys.pkcs11.pin;
  if (pin === undefined) return undefined;
  if ("file" in pin) return pin.file;
  if ("credential" in pin && env.CREDENTIALS_DIRECTORY !== undefined)
    return join(env.CREDENTIALS_DIRECTORY, pin.credential);
  return undefined;
}

/** Sleeps on the injected clock; false when aborted. */
async function pause(ctx: StageContext, ms: number, signal: AbortSignal): Promise<boolean> {
  try {
    await ctx.clock.sleep(ms, signal);
    return true;
  } catch {
    return false;
  }
}

/** Waits until the wall clock is above the time floor: no credential decisions before that. */
async function clockTrusted(ctx: StageContext, signal: AbortSignal): Promise<boolean> {
  while (!ctx.clockSanity.check().trusted) {
    if (!(await pause(ctx, 5_000, signal))) return false;
  }
  return true;
}

interface TokenView {
  readonly type: AccessToken["tokenType"];
  readonly scope: string;
  readonly expiresAt: string;
}

/**
 * Credentials: an OAuth client (private_key_jwt + DPoP signed by the device key) kept fresh in the
 * background, `GET /v1/token` on the local API, and the device certificate renewed over EST
 * (mTLS with the PKCS#11 engine key, else an `est`-scoped token; TPM devices re-attest after an
 * expiry). Publishes "tokenSource" and "dpopSigner" for the relay.
 */
export const credentialsStage: AgentStage = {
  name: "credentials",
  sections: ["credentials"],
  // Always on: a device enrolled with `m2m-agent enroll` (and [enroll] disabled) still needs tokens.
  enabled: () => true,
  async start(ctx: StageContext): Promise<StageHandle> {
    const { config, enrolment } = ctx;
    const target = await oauthTarget(config, enrolment);
    if (target === undefined) {
      // A key-only agent (no enrolment, no [credentials.oauth]) has no client identity: idle.
      const configured = config.credentials.oauth !== undefined || config.enroll.enabled;
      if (configured)
        ctx.health.set(
          "credentials",
          "ERR_NOT_ENROLLED: no OAuth client identity: the device is not enrolled",
        );
      return {
        status: () => ({ active: false, reason: "not enrolled and no credentials.oauth.client_id" }),
        stop: async () => undefined,
      };
    }
    const { OAuthClient } = await import("../../credentials/oauth/client.js");
    const makeClient = (keys: KeyProvider): OAuthClient =>
      new OAuthClient(
        {
          clientId: target.clientId,
          ...(target.issuer === undefined ? {} : { issuer: target.issuer }),
          ...(target.tokenEndpoint === undefined ? {} : { tokenEndpoint: target.tokenEndpoint }),
          scope: target.scope,
          dpop: target.dpop,
          refreshFraction: target.refreshFraction,
          ...(target.cacheFile === undefined ? {} : { cacheFile: target.cacheFile }),
          ...(target.caPem === undefined ? {} : { caPem: target.caPem }),
        },
        { keys, clock: ctx.clock, log: ctx.log.child({ component: "oauth" }) },
      );
    // After a key rotation the client is rebuilt on the new key; `tokens` and `dpop` forward to it.
    let client: OAuthClient = makeClient(ctx.key.provider);
    let currentDpop: DpopSigner | undefined = await client.dpopSigner();
    const dpop: DpopSigner | undefined =
      currentDpop === undefined
        ? undefined
        : {
            proof: (method, url, token) => {
              if (currentDpop === undefined) throw new Error("unreachable: DPoP was on at start");
              return currentDpop.proof(method, url, token);
            },
            rememberNonce: (url, nonce) => currentDpop?.rememberNonce(url, nonce),
          };
    let lastToken: TokenView | undefined;
    let tokenHealth: { ok: boolean; code?: string; detail: string } = client.health();

    const noteFailure = (err: unknown): M2mError => {
      const e = asM2mError(err);
      tokenHealth = client.health();
      ctx.metrics.renewalsFailed.inc({ kind: "token" });
      if (e.retry !== "transient") {
        // Permanent (revoked device, refused client): say so in health; never retried in a loop.
        ctx.health.set("credentials.token", `${e.code}: ${e.message}`);
        ctx.metrics.authFailures.inc({ channel: "oauth" });
        ctx.anomalies.authFailure("oauth");
        void ctx.audit.record("auth_failure", { kind: "token", code: e.code }).catch(() => undefined);
      }
      return e;
    };
    const tokens: ObservedTokenSource = {
      async getToken(scope?: string): Promise<AccessToken> {
        try {
          const t = await client.getToken(scope);
          if (scope === undefined || scope === target.scope) {
            lastToken = { type: t.tokenType, scope: t.scope, expiresAt: t.expiresAt.toISOString() };
            ctx.metrics.tokenExpiry.set(Math.floor(t.expiresAt.getTime() / 1000));
          }
          tokenHealth = client.health();
          ctx.health.set("credentials.token", undefined);
          return t;
        } catch (err) {
          throw noteFailure(err);
        }
      },
      invalidate: (scope?: string) => client.invalidate(scope),
    };
    ctx.services.set("tokenSource", tokens);
    if (dpop !== undefined) ctx.services.set("dpopSigner", dpop);
    ctx.services.set("oauthClient", client);

    if (ctx.api !== undefined) {
      const { tokenRoutes } = await import("../../credentials/oauth/token-routes.js");
      for (const r of tokenRoutes(tokens, dpop === undefined ? {} : { dpop }))
        ctx.api.route(r.method, r.path, r.handler);
    }

    const controller = new AbortController();
    const signal = controller.signal;

    // Token upkeep: wake at a quarter of the remaining lifetime; the client refreshes at its
    // configured fraction (jittered, single-flight) and serves the cache in between.
    const tokenLoop = (async (): Promise<void> => {
      if (!(await clockTrusted(ctx, signal))) return;
      while (!signal.aborted) {
        let waitMs = 30_000;
        try {
          const t = await tokens.getToken();
          const left = t.expiresAt.getTime() - ctx.clock.now().getTime();
          waitMs = Math.min(300_000, Math.max(1_000, Math.floor(left / 4)));
        } catch (err) {
          const e = asM2mError(err);
          ctx.log.warn("access token unavailable", { code: e.code });
          // A refused client stays refused until an operator acts: stop asking in the background.
          if (e.retry !== "transient") return;
        }
        if (!(await pause(ctx, waitMs, signal))) return;
      }
    })();

    // Certificate upkeep over EST (enrolled devices only).
    let renewer: CertificateRenewer | undefined;
    let certStatus: CertificateStatus | undefined;
    let certHealth: { ok: boolean; code?: string; detail: string } | undefined;
    let estAuth: "mtls" | "token" | undefined;
    let rotating: DaemonRotation | undefined;
    let rotatedTo: KeyProvider | undefined;
    let certLoop: Promise<void> = Promise.resolve();
    if (enrolment !== undefined) {
      const certFile = deviceCertPath(config);
      await seedCertificate(certFile, enrolment);
      const caPem = (await registrarCaPem(config, enrolment)) ?? enrolment.caChainPem.join("\n");
      const { EstClient } = await import("../../credentials/est/est-client.js");
      const { CertificateRenewer } = await import("../../credentials/est/renewer.js");
      const p = config.keys.pkcs11;
      const pinFile = ctx.key.provider.kind === "pkcs11" ? pinFileOf(config, ctx.env) : undefined;
      let auth: ConstructorParameters<typeof EstClient>[1];
      const baseUrl = estBaseUrl(config, enrolment);
      if (config.credentials.est?.rotate_key === true) {
        const { daemonKeyRotation } = await import("../../credentials/est/daemon-rotation.js");
        rotating = await daemonKeyRotation({
          config,
          baseUrl,
          caPem,
          clock: ctx.clock,
          tokens,
          dpop,
          tokenClientFor: async (keys) => {
            const c = makeClient(keys);
            return { tokens: c, dpop: await c.dpopSigner(), close: () => c.close() };
          },
        });
      }
      const rot = rotating;
      if (pinFile !== undefined && p.module !== undefined && p.token_label !== undefined) {
        // TLS client auth with the current certificate; the key is used inside the token through
        // the OpenSSL engine (engine-tls.ts, the one module that knows about engines).
        const { createEngineSecureContext } = await import("../../relay/sinks/mqtt/engine-tls.js");
        const engine = { modulePath: p.module, tokenLabel: p.token_label, pinFile };
        auth = {
          kind: "mtls",
          certPem: () => readFile(certFile, "utf8"),
          // With rotation, the CURRENT label (from the rotation state) authenticates the handshake.
          secureContext: async (certPem) =>
            createEngineSecureContext({
              ...engine,
              keyLabel: (await rot?.currentLabel?.()) ?? p.key_label,
              certPem,
              caPem,
            }),
        };
        estAuth = "mtls";
      } else {
        // TPM keys cannot do TLS in Node: an `est`-scoped (DPoP-bound) token authenticates instead.
        auth = { kind: "token", tokens, ...(dpop === undefined ? {} : { dpop }), scope: "est" };
        estAuth = "token";
      }
      const est = new EstClient({ baseUrl, caPem }, auth, ctx.clock);
      const reenrol = ctx.services.get("reenrol") as (() => Promise<EnrolmentState>) | undefined;
      const enrolled = enrolment;
      renewer = new CertificateRenewer(
        {
          deviceId: enrolment.deviceId,
          certFile,
          caPem: enrolment.caChainPem.join("\n"),
          renewFraction: config.credentials.est?.renew_fraction ?? 2 / 3,
          ...(rot === undefined ? {} : { rotateKey: true }),
        },
        {
          keys: ctx.key.provider,
          ...(rot === undefined
            ? {}
            : {
                rotation: rot.rotation,
                ...(rot.issueWithNewKey === undefined ? {} : { issueWithNewKey: rot.issueWithNewKey }),
                issueForPendingKey: rot.issueForPendingKey,
                // The new certificate is in place and the old key destroyed: sign with the new key
                // from now on (tokens, DPoP, EST), record it in the enrolment state, drop old tokens.
                onRotated: async (next: KeyProvider, certPem: string) => {
                  rotatedTo = next;
                  const info = await next.open();
                  const old = client;
                  old.invalidate();
                  if (target.cacheFile !== undefined) await rm(target.cacheFile, { force: true });
                  client = makeClient(next);
                  currentDpop = await client.dpopSigner();
                  ctx.services.set("oauthClient", client);
                  await old.close().catch(() => undefined);
                  await writeEnrolmentState(config.agent.state_dir, {
                    ...enrolled,
                    certificatePem: certPem,
                    keyRef: info.ref,
                    keyThumbprint: info.thumbprint,
                  });
                  await ctx.audit.record("rotated", {
                    kind: "key",
                    ref: info.ref,
                    thumbprint: info.thumbprint,
                  });
                  ctx.log.info("device key rotated", { ref: info.ref });
                },
              }),
          est,
          clock: ctx.clock,
          log: ctx.log.child({ component: "est" }),
          ...(ctx.key.provider.kind === "tpm" && reenrol !== undefined
            ? {
                // Expired while offline: re-attest with EK/AK, then take the fresh certificate.
                reattest: async () => {
                  // After an in-process rotation the daemon's own provider holds the destroyed key:
                  // re-attest with the rotated one (a restart re-opens it from the rotation state).
                  const state =
                    rotatedTo === undefined
                      ? await reenrol()
                      : (
                          await (
                            await import("./enrol.js")
                          ).enrolFromConfig(config, rotatedTo, {
                            log: ctx.log,
                            clock: ctx.clock,
                            env: ctx.env,
                            force: true,
                          })
                        ).state;
                  await writeFileAtomic(certFile, `${state.certificatePem.trim()}\n`, 0o600);
                },
              }
            : {}),
        },
      );
      const r = renewer;
      certLoop = (async (): Promise<void> => {
        if (!(await clockTrusted(ctx, signal))) return;
        while (!signal.aborted) {
          let waitMs = 60_000;
          try {
            const outcome = await r.renewIfDue();
            if (outcome !== "not-due") {
              await ctx.audit.record(outcome === "renewed" ? "renewed" : "enrolled", { kind: "certificate" });
            }
            certStatus = await r.status();
            ctx.metrics.certExpiry.set(Math.floor(certStatus.notAfter.getTime() / 1000));
            ctx.health.set("credentials.certificate", undefined);
            waitMs = Math.max(
              1_000,
              Math.min(3_600_000, certStatus.renewAt.getTime() - ctx.clock.now().getTime()),
            );
          } catch (err) {
            const e = asM2mError(err);
            ctx.metrics.renewalsFailed.inc({ kind: "certificate" });
            await ctx.audit.record("renewal_failed", { code: e.code }).catch(() => undefined);
            ctx.log.warn("certificate renewal failed", { code: e.code });
            const st = await r.status().catch(() => undefined);
            // Still valid: keep serving and try again later; expired: the agent is degraded.
            if (st === undefined || st.notAfter <= ctx.clock.now())
              ctx.health.set("credentials.certificate", `${e.code}: ${e.message}`);
          }
          certHealth = r.health();
          if (!(await pause(ctx, waitMs, signal))) return;
        }
      })();
    }

    return {
      status: () => ({
        clientId: target.clientId,
        tokenEndpoint: target.tokenEndpoint ?? `(discovered from ${target.issuer ?? "?"})`,
        dpop: target.dpop,
        token: lastToken ?? null,
        tokenHealth,
        ...(renewer === undefined
          ? {}
          : {
              certificate:
                certStatus === undefined
                  ? null
                  : {
                      serial: certStatus.serial,
                      notBefore: certStatus.notBefore.toISOString(),
                      notAfter: certStatus.notAfter.toISOString(),
                      renewAt: certStatus.renewAt.toISOString(),
                    },
              certificateHealth: certHealth ?? renewer.health(),
              estAuth,
            }),
      }),
      async stop(): Promise<void> {
        controller.abort();
        await Promise.allSettled([tokenLoop, certLoop]);
        await client.close();
        await rotating?.close();
      },
    };
  },
};
