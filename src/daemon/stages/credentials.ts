import { readFile, rm } from "node:fs/promises";
import { writeFileAtomic } from "../../core/atomic-file.js";
import { asM2mError, M2mError } from "../../core/errors.js";
import type { RotationIssuers } from "../../credentials/est/daemon-rotation.js";
import { deviceCertPath, estBaseUrl, seedCertificate } from "../../credentials/est/device-cert.js";
import type { CertificateRenewer, CertificateStatus } from "../../credentials/est/renewer.js";
import type { OAuthClient } from "../../credentials/oauth/client.js";
import { oauthClientSettings, oauthTarget } from "../../credentials/oauth/target.js";
import type { AccessToken, DpopSigner, TokenSource } from "../../credentials/oauth/token-source.js";
import { registrarCaPem } from "../../credentials/registrar-ca.js";
import { writeEnrolmentState } from "../../enroll/state.js";
import type { KeyProvider } from "../../keys/key-provider.js";
import type { AgentStage, StageContext, StageStarted } from "../stage-types.js";

/** A token source that also reports what it handed out (status, metrics) and drops on refusal. */
export type ObservedTokenSource = TokenSource & { invalidate(scope?: string): void };

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
    // 1 s: a corrected clock is noticed within seconds (the check is a comparison, no I/O).
    if (!(await pause(ctx, 1_000, signal))) return false;
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
/** What the credentials stage provides to later stages (the relay's sinks). */
export interface CredentialsProvides {
  readonly tokens: ObservedTokenSource;
  /** Present when the client is DPoP-bound; follows the key across rotations. */
  readonly dpop: DpopSigner | undefined;
}

export const credentialsStage: AgentStage<void, CredentialsProvides> = {
  name: "credentials",
  sections: ["credentials"],
  // Always on: a device enrolled with `m2m-agent enroll` (and [enroll] disabled) still needs tokens.
  enabled: () => true,
  async start(ctx: StageContext): Promise<StageStarted<CredentialsProvides>> {
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
    const { tpmEvidenceSource } = await import("../../credentials/oauth/attestation.js");
    const attCfg = config.credentials.attestation;
    const makeClient = (keys: KeyProvider): OAuthClient =>
      new OAuthClient(oauthClientSettings(target), {
        keys,
        clock: ctx.clock,
        log: ctx.log.child({ component: "oauth" }),
        // A key that can quote answers the registrar's attestation challenges (docs/attestation.md).
        ...(keys.attestation === undefined
          ? {}
          : {
              attestation: tpmEvidenceSource(keys.attestation, {
                eventLogPath: attCfg.event_log,
                log: ctx.log.child({ component: "attestation" }),
              }),
            }),
      });
    // After a key rotation the client is rebuilt on the new key; `tokens` and `dpop` forward to it.
    let client: OAuthClient = makeClient(ctx.keys.current);
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
        // Why: a client assertion signed below the time floor carries a false iat/exp, and an expiry
        // judged on that clock is wrong; refuse before anything is signed or sent (every caller: the
        // token loop, GET /v1/token, the HTTPS/MQTT sinks, EST token auth). Transient: NTP fixes it.
        ctx.clockSanity.assertTrusted();
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
      let refusals = 0;
      while (!signal.aborted) {
        // Every round, not only the first: a clock stepped back while running holds the loop too.
        if (!(await clockTrusted(ctx, signal))) return;
        let waitMs = 30_000;
        try {
          const t = await tokens.getToken();
          refusals = 0;
          const left = t.expiresAt.getTime() - ctx.clock.now().getTime();
          // left ≤ 0 with a token in hand: the wall clock stepped forward (the client refreshes on
          // the monotonic clock and served its cache); asking every second would gain nothing.
          waitMs = left <= 0 ? 30_000 : Math.min(300_000, Math.max(1_000, Math.floor(left / 4)));
        } catch (err) {
          const e = asM2mError(err);
          if (e.code === "ERR_CLOCK_UNTRUSTED") continue; // stepped back since the check: wait above
          ctx.log.warn("access token unavailable", { code: e.code, reason: e.message });
          if (e.code === "ERR_ATTESTATION_REFUSED") {
            // Refused platform state: degraded with the reason (noteFailure), then ask again later, on
            // an exponential schedule — one quote per attempt, never a loop burning TPM time. It
            // recovers by itself once the operator approves new values.
            const base = attCfg.retry_base_s * 1000;
            const cap = Math.max(base, attCfg.retry_max_s * 1000);
            const exp = Math.min(cap, base * 2 ** Math.min(refusals, 20));
            refusals++;
            waitMs = Math.round(exp * (0.8 + 0.4 * Math.random()));
            if (!(await pause(ctx, waitMs, signal))) return;
            continue;
          }
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
    let rotating: RotationIssuers | undefined;
    let certLoop: Promise<void> = Promise.resolve();
    let unsubscribe = (): void => undefined;
    if (enrolment !== undefined) {
      const certFile = deviceCertPath(config);
      await seedCertificate(certFile, enrolment);
      const caPem = (await registrarCaPem(config, enrolment)) ?? enrolment.caChainPem.join("\n");
      const { EstClient } = await import("../../credentials/est/est-client.js");
      const { CertificateRenewer } = await import("../../credentials/est/renewer.js");
      let auth: ConstructorParameters<typeof EstClient>[1];
      const baseUrl = estBaseUrl(config, enrolment);
      if (ctx.keys.rotates) {
        const { rotationIssuers } = await import("../../credentials/est/daemon-rotation.js");
        rotating = rotationIssuers({
          key: ctx.keys.current,
          baseUrl,
          caPem,
          clock: ctx.clock,
          gate: () => ctx.clockSanity.untrusted(),
          tokens,
          dpop,
          tokenClientFor: async (keys) => {
            const c = makeClient(keys);
            return { tokens: c, dpop: await c.dpopSigner(), close: () => c.close() };
          },
        });
      }
      const rot = rotating;
      if (ctx.keys.current.tlsClient !== undefined) {
        // TLS client auth with the current certificate and the CURRENT key (asked of the owner at
        // every request: after a rotation the next EST connection uses the new key and certificate).
        auth = {
          kind: "mtls",
          certPem: () => readFile(certFile, "utf8"),
          secureContext: async (certPem) => {
            const tls = ctx.keys.current.tlsClient;
            if (tls === undefined)
              throw new M2mError("ERR_TLS_KEY_UNAVAILABLE", "permanent", "the device key cannot do TLS");
            return tls.secureContext({ certPem, caPem });
          },
        };
        estAuth = "mtls";
      } else {
        // A key without the TLS capability: an `est`-scoped (DPoP-bound) token authenticates instead.
        auth = { kind: "token", tokens, ...(dpop === undefined ? {} : { dpop }), scope: "est" };
        estAuth = "token";
      }
      // Why: EST (mTLS or token) opens TLS and presents a certificate judged on our clock: gated.
      const est = new EstClient({ baseUrl, caPem, gate: () => ctx.clockSanity.untrusted() }, auth, ctx.clock);
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
          keys: ctx.keys.current,
          ...(rot === undefined
            ? {}
            : {
                // The owner runs the switch; its subscribers (below, and the relay's sinks) move
                // to the new key before the old one is destroyed.
                rotation: ctx.keys,
                ...(rot.issueWithNewKey === undefined ? {} : { issueWithNewKey: rot.issueWithNewKey }),
                issueForPendingKey: rot.issueForPendingKey,
              }),
          est,
          clock: ctx.clock,
          log: ctx.log.child({ component: "est" }),
          ...(ctx.keys.current.attestation !== undefined
            ? {
                // Expired while offline: re-attest with EK/AK (the owner's CURRENT key), then take
                // the fresh certificate.
                reattest: async () => {
                  const state = await ctx.reenroll();
                  await writeFileAtomic(certFile, `${state.certificatePem.trim()}\n`, 0o600);
                },
              }
            : {}),
        },
      );
      // A committed rotation: sign with the new key from now on (tokens, DPoP), record it in the
      // enrolment state, drop tokens bound to the old key. Runs before the old key is destroyed.
      unsubscribe = ctx.keys.subscribe(async ({ key, current: info }) => {
        const old = client;
        old.invalidate();
        if (target.cacheFile !== undefined) await rm(target.cacheFile, { force: true });
        client = makeClient(key);
        currentDpop = await client.dpopSigner();
        await old.close().catch(() => undefined);
        await writeEnrolmentState(config.agent.state_dir, {
          ...enrolled,
          certificatePem: await readFile(certFile, "utf8"),
          keyRef: info.ref,
          keyThumbprint: info.thumbprint,
        });
        await ctx.audit.record("rotated", { kind: "key", ref: info.ref, thumbprint: info.thumbprint });
        ctx.log.info("device key rotated", { ref: info.ref });
      });
      const r = renewer;
      certLoop = (async (): Promise<void> => {
        let failures = 0;
        while (!signal.aborted) {
          // Why: renewal judges expiry on the wall clock and opens TLS to EST; below the floor neither.
          if (!(await clockTrusted(ctx, signal))) return;
          let waitMs = 60_000;
          try {
            const outcome = await r.renewIfDue();
            if (outcome !== "not-due") {
              await ctx.audit.record(outcome === "renewed" ? "renewed" : "enrolled", { kind: "certificate" });
            }
            certStatus = await r.status();
            ctx.metrics.certExpiry.set(Math.floor(certStatus.notAfter.getTime() / 1000));
            ctx.health.set("credentials.certificate", undefined);
            failures = 0;
            waitMs = Math.max(
              1_000,
              Math.min(3_600_000, certStatus.renewAt.getTime() - ctx.clock.now().getTime()),
            );
          } catch (err) {
            const e = asM2mError(err);
            ctx.metrics.renewalsFailed.inc({ kind: "certificate" });
            await ctx.audit.record("renewal_failed", { code: e.code }).catch(() => undefined);
            // Exponential (1 min → 1 h, jittered): a certificate that keeps failing (e.g. it looks
            // expired after the wall clock stepped years forward) costs the registrar a request an
            // hour, not one a minute. The renewer's own retries run inside one round.
            waitMs = Math.round(
              Math.min(3_600_000, 60_000 * 2 ** Math.min(failures, 6)) * (0.8 + 0.4 * Math.random()),
            );
            failures++;
            ctx.log.warn("certificate renewal failed", { code: e.code, retryInS: Math.round(waitMs / 1000) });
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
      provides: { tokens, dpop },
      status: () => ({
        clientId: target.clientId,
        tokenEndpoint: target.tokenEndpoint ?? `(discovered from ${target.issuer ?? "?"})`,
        dpop: target.dpop,
        token: lastToken ?? null,
        tokenHealth,
        // Continuous attestation: the latest quote and what the registrar made of it (null: none asked).
        ...(ctx.keys.current.attestation === undefined
          ? {}
          : { attestation: client.attestationStatus() ?? null }),
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
        unsubscribe();
        await Promise.allSettled([tokenLoop, certLoop]);
        await client.close();
      },
    };
  },
};
