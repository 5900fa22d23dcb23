import { randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import { base64url } from "jose";
import * as oauth from "oauth4webapi";
import { Agent, fetch as undiciFetch } from "undici";
import { writeFileAtomic } from "../../core/atomic-file.js";
import type { Clock } from "../../core/clock.js";
import { asM2mError, M2mError } from "../../core/errors.js";
import { type Logger, silentLogger } from "../../core/log.js";
import { defaultRetryPolicy, parseRetryAfter, type RetryPolicy, withRetry } from "../../core/retry.js";
import { Secret } from "../../core/secret.js";
import { type TrustSource, tlsVerifyError } from "../../core/tls-diagnosis.js";
import { signCompactJws } from "../../keys/jws.js";
import type { KeyInfo, KeyProvider } from "../../keys/key-provider.js";
import {
  ATTESTATION_FORM_PARAM,
  ATTESTATION_HEADERS,
  ATTESTATION_OAUTH_ERRORS,
  type AttestationStatus,
  formatPcrSelection,
  type PcrSelection,
  parsePcrSelection,
} from "../../wire/v1/index.js";
import type { AttestationEvidenceSource } from "./attestation.js";
import { HardwareDpopSigner } from "./dpop.js";
import type { AccessToken, CredentialHealth, DpopSigner, TokenSource } from "./token-source.js";

export interface OAuthClientConfig {
  /** client_id registered at the authorization server (our registrar: the device ID). */
  readonly clientId: string;
  /** Issuer identifier for discovery (RFC 8414 / OpenID discovery). */
  readonly issuer?: string;
  /** Token endpoint; when set, no discovery request is made. */
  readonly tokenEndpoint?: string;
  /** Which metadata document to read; "auto" tries RFC 8414 then OpenID (default). */
  readonly discovery?: "auto" | "oauth2" | "oidc";
  /** Default scopes (space separated) when `getToken()` is called without one. */
  readonly scope?: string;
  /** Bind tokens with DPoP proofs signed by the hardware key. */
  readonly dpop?: boolean;
  /** PEM trust anchor(s) for the authorization server's TLS; system store when omitted. */
  readonly caPem?: string;
  /** `aud` of the client assertion (default: the token endpoint; "issuer" per RFC 7523bis). */
  readonly assertionAudience?: "token_endpoint" | "issuer";
  /** Client assertion lifetime, seconds (capped at 60). */
  readonly assertionLifetimeSec?: number;
  /** Refresh when this fraction of the lifetime has passed (default 0.8). */
  readonly refreshFraction?: number;
  /** ± jitter around the refresh point as a fraction of the lifetime (default 0.05). */
  readonly refreshJitter?: number;
  /** When set, tokens are cached in this file (0600, atomic). Off by default: tokens stay in memory. */
  readonly cacheFile?: string;
  readonly requestTimeoutMs?: number;
  readonly maxResponseBytes?: number;
  /** What `caPem` is, for a TLS verification failure's message (default: "the configured CA" / system store). */
  readonly trust?: TrustSource;
  /** RFC 8707 resource indicators: one `resource` parameter each in every token request. */
  readonly resource?: readonly string[];
  /** Test rigs only: permits http:// endpoints. */
  readonly allowInsecureHttp?: boolean;
}

export interface OAuthClientDeps {
  readonly keys: KeyProvider;
  readonly clock: Clock;
  readonly log?: Logger;
  readonly retry?: RetryPolicy;
  readonly random?: () => number;
  /**
   * TPM quotes for continuous attestation (docs/attestation.md): when the authorization server asks
   * (`use_attestation_nonce`), each token request carries a quote over the PCRs it names.
   */
  readonly attestation?: AttestationEvidenceSource;
}

/** The latest attestation challenge from the authorization server. */
interface Challenge {
  readonly nonce: string;
  readonly selection: PcrSelection;
  readonly maxAgeSec: number;
  readonly receivedMono: number;
}

interface CacheEntry {
  readonly token: AccessToken;
  /** Monotonic ms after which a refresh is due. */
  readonly refreshAtMono: number;
  /** Monotonic ms after which the token must no longer be handed out. */
  readonly hardExpiryMono: number;
}

interface DiskEntry {
  token: string;
  tokenType: "Bearer" | "DPoP";
  scope: string;
  issuedAt: number;
  expiresAt: number;
}

const PERMANENT_CLIENT_ERRORS = new Set(["invalid_client", "unauthorized_client", "access_denied"]);

/**
 * OAuth 2.0 client_credentials with private_key_jwt (RFC 7523) signed by the device key, optional
 * DPoP (RFC 9449), discovery (RFC 8414 / OIDC), and a single-flight refreshing cache.
 *
 * oauth4webapi does discovery, the token request and response validation; what it cannot do with a
 * non-CryptoKey signer is done here: the client assertion (a custom `ClientAuth` that signs with the
 * KeyProvider) and the DPoP proof (HardwareDpopSigner, passed as a plain `dpop` header).
 */
export class OAuthClient implements TokenSource {
  readonly #config: OAuthClientConfig;
  readonly #deps: OAuthClientDeps;
  readonly #log: Logger;
  readonly #cache = new Map<string, CacheEntry>();
  readonly #inflight = new Map<string, Promise<AccessToken>>();
  #as: oauth.AuthorizationServer | undefined;
  #info: KeyInfo | undefined;
  #dpop: HardwareDpopSigner | undefined;
  #health: CredentialHealth = { ok: true, detail: "no token requested yet" };
  #dispatcher: Agent | undefined;
  #diskLoaded = false;
  #challenge: Challenge | undefined;
  /** The server asked for quotes at least once: fetch a nonce first when the cached one is stale. */
  #attestationSeen = false;
  /** The latest quote and what the token endpoint made of it (status / operator visibility). */
  #attestationStatus: AttestationStatus | undefined;

  constructor(config: OAuthClientConfig, deps: OAuthClientDeps) {
    if (config.issuer === undefined && config.tokenEndpoint === undefined) {
      throw new M2mError("ERR_CONFIG", "permanent", "oauth: issuer or token_endpoint is required", {
        details: { key: "oauth.issuer" },
      });
    }
    this.#config = config;
    this.#deps = deps;
    this.#log = deps.log ?? silentLogger;
    if (config.caPem !== undefined) this.#dispatcher = new Agent({ connect: { ca: config.caPem } });
  }

  /** Health for the daemon/doctor: a refused client (revoked device) is reported here. */
  health(): CredentialHealth {
    return this.#health;
  }

  /**
   * The agent's latest TPM quote and its outcome (`stages.credentials.attestation` of /v1/status);
   * undefined until the authorization server first asked for a quote.
   */
  attestationStatus(): AttestationStatus | undefined {
    return this.#attestationStatus;
  }

  /** The DPoP signer (for resource requests with a DPoP-bound token); undefined when DPoP is off. */
  async dpopSigner(): Promise<DpopSigner | undefined> {
    if (this.#config.dpop !== true) return undefined;
    return this.#signer();
  }

  async getToken(scope?: string): Promise<AccessToken> {
    const key = normaliseScope(scope ?? this.#config.scope ?? "");
    await this.#loadDisk();
    const now = this.#deps.clock.monotonicMs();
    const cached = this.#cache.get(key);
    if (cached !== undefined && now < cached.refreshAtMono) return cached.token;
    let flight = this.#inflight.get(key);
    if (flight === undefined) {
      flight = this.#refresh(key).finally(() => this.#inflight.delete(key));
      this.#inflight.set(key, flight);
    }
    try {
      return await flight;
    } catch (err) {
      // A transient outage near the end of a token's life: keep using the still-valid token.
      const still = this.#cache.get(key);
      if (
        err instanceof M2mError &&
        err.retry === "transient" &&
        still !== undefined &&
        this.#deps.clock.monotonicMs() < still.hardExpiryMono
      ) {
        return still.token;
      }
      throw err;
    }
  }

  /** Drops cached tokens (e.g. after a resource server answered 401 invalid_token). */
  invalidate(scope?: string): void {
    if (scope === undefined) this.#cache.clear();
    else this.#cache.delete(normaliseScope(scope));
  }

  /**
   * Keeps the default-scope token fresh in the background until `signal` aborts: sleeps until the
   * refresh point (monotonic), refreshes, repeats. Failures are retried by getToken's policy.
   */
  async run(signal: AbortSignal): Promise<void> {
    const clock = this.#deps.clock;
    while (!signal.aborted) {
      try {
        await this.getToken();
      } catch (err) {
        this.#log.warn("token refresh failed", { error: err });
        if (err instanceof M2mError && err.retry !== "transient") return;
      }
      const entry = this.#cache.get(normaliseScope(this.#config.scope ?? ""));
      const wait = entry === undefined ? 30_000 : Math.max(1000, entry.refreshAtMono - clock.monotonicMs());
      try {
        await clock.sleep(wait, signal);
      } catch {
        return;
      }
    }
  }

  async close(): Promise<void> {
    await this.#dispatcher?.close();
  }

  async #signer(): Promise<HardwareDpopSigner> {
    if (this.#dpop === undefined)
      this.#dpop = new HardwareDpopSigner(this.#deps.keys, await this.#keyInfo(), this.#deps.clock);
    return this.#dpop;
  }

  async #keyInfo(): Promise<KeyInfo> {
    if (this.#info === undefined) this.#info = await this.#deps.keys.open();
    return this.#info;
  }

  async #refresh(key: string): Promise<AccessToken> {
    const policy: RetryPolicy = this.#deps.retry ?? {
      ...defaultRetryPolicy,
      deadlineMs: 60_000,
      maxAttempts: 6,
    };
    try {
      const token = await withRetry(policy, () => this.#requestOnce(key), {
        clock: this.#deps.clock,
        ...(this.#deps.random === undefined ? {} : { random: this.#deps.random }),
        onRetry: ({ attempt, delayMs, error }) =>
          this.#log.warn("token request failed, retrying", { attempt, delayMs, code: error.code }),
      });
      this.#health = { ok: true, detail: `token valid until ${token.expiresAt.toISOString()}` };
      return token;
    } catch (err) {
      const e =
        err instanceof M2mError
          ? err
          : new M2mError("ERR_OAUTH_TOKEN", "transient", "token request failed", { cause: err });
      this.#health = { ok: false, code: e.code, detail: e.message };
      throw e;
    }
  }

  async #requestOnce(key: string): Promise<AccessToken> {
    const as = await this.#discover();
    const client: oauth.Client = {
      client_id: this.#config.clientId,
      token_endpoint_auth_method: "private_key_jwt",
    };
    const params = new URLSearchParams();
    if (key !== "") params.set("scope", key);
    // RFC 8707: the resources the token is meant for (a third-party AS sets the audience from them).
    for (const r of this.#config.resource ?? []) params.append("resource", r);
    const tokenEndpoint = as.token_endpoint ?? "";
    const signer = this.#config.dpop === true ? await this.#signer() : undefined;
    let response: Response | undefined;
    const source = this.#deps.attestation;
    // The nonce round trip (only when the cached nonce is stale) overlaps the DPoP proof and the client
    // assertion, which do not depend on it; the quote waits for it.
    const fetching =
      source !== undefined && this.#attestationSeen && this.#freshChallenge() === undefined
        ? this.#fetchChallenge(as, tokenEndpoint)
        : undefined;
    let dpopRetried = false;
    let attestRetried = false;
    // RFC 9449 §8: a server may demand a nonce; we retry exactly once with the one it sent. Likewise once
    // for an attestation nonce (the quote is made only with a nonce in hand: no TPM time wasted).
    for (let attempt = 0; attempt < 3; attempt++) {
      const headers: Record<string, string> = {};
      if (signer !== undefined) headers.dpop = await signer.proof("POST", tokenEndpoint);
      const assertion = await this.#signAssertion(as, client, tokenEndpoint);
      if (attempt === 0) await fetching;
      const body = new URLSearchParams(params);
      const challenge = source === undefined ? undefined : this.#freshChallenge();
      let quoted: { at: Date; selection: string } | undefined;
      if (source !== undefined && challenge !== undefined) {
        // Single use: whatever the answer, the next request needs the nonce that answer carries.
        this.#challenge = undefined;
        quoted = { at: this.#deps.clock.now(), selection: formatPcrSelection(challenge.selection) };
        let evidence: Awaited<ReturnType<typeof source.evidence>>;
        try {
          evidence = await source.evidence(challenge.nonce, challenge.selection);
        } catch (err) {
          const e = asM2mError(err);
          this.#noteQuote(quoted, "quote-failed", e.code, e.message);
          throw err;
        }
        body.set(ATTESTATION_FORM_PARAM, base64url.encode(JSON.stringify(evidence)));
      }
      try {
        response = await oauth.clientCredentialsGrantRequest(as, client, this.#clientAuth(assertion), body, {
          headers,
          ...this.#httpOptions(),
        });
      } catch (err) {
        if (quoted !== undefined)
          this.#noteQuote(quoted, "unanswered", undefined, "token endpoint unreachable");
        // Key errors (TPM busy, wrong PIN, …) keep their own code and retry class.
        if (err instanceof M2mError) throw err;
        throw (
          tlsVerifyError(err, tokenEndpoint, this.#trust()) ??
          new M2mError(
            "ERR_OAUTH_TOKEN",
            "transient",
            `token endpoint ${originOf(tokenEndpoint)} unreachable`,
            {
              cause: err,
            },
          )
        );
      }
      const nonce = response.headers.get("dpop-nonce");
      if (signer !== undefined && nonce !== null) signer.rememberNonce(tokenEndpoint, nonce);
      this.#rememberChallenge(response);
      if (quoted !== undefined) await this.#noteAnswer(quoted, response);
      if (response.status === 400 || response.status === 401) {
        const rbody = (await response
          .clone()
          .json()
          .catch(() => ({}))) as { error?: unknown };
        const www = response.headers.get("www-authenticate") ?? "";
        if (signer !== undefined && nonce !== null && !dpopRetried) {
          if (rbody.error === "use_dpop_nonce" || /use_dpop_nonce/.test(www)) {
            dpopRetried = true;
            continue;
          }
        }
        if (rbody.error === ATTESTATION_OAUTH_ERRORS.useNonce) {
          if (source === undefined) {
            throw new M2mError(
              "ERR_ATTESTATION_UNSUPPORTED",
              "permanent",
              "the authorization server requires a TPM quote and this device key cannot quote",
            );
          }
          if (!attestRetried && this.#freshChallenge() !== undefined) {
            attestRetried = true;
            continue;
          }
        }
      }
      break;
    }
    if (response === undefined) throw new M2mError("ERR_OAUTH_TOKEN", "transient", "no response");
    if (response.status === 429 || response.status >= 500) {
      throw new M2mError("ERR_OAUTH_TOKEN", "transient", `token endpoint answered ${response.status}`, {
        details: { status: response.status, ...retryAfter(response, this.#deps.clock) },
      });
    }
    let result: oauth.TokenEndpointResponse;
    try {
      result = await oauth.processClientCredentialsResponse(as, client, response);
    } catch (err) {
      throw classify(err);
    }
    const tokenType = result.token_type === "dpop" ? "DPoP" : "Bearer";
    // Security: asked for DPoP but got a Bearer token: the server ignored the binding; refuse it.
    if (signer !== undefined && tokenType !== "DPoP") {
      throw new M2mError(
        "ERR_OAUTH_DPOP_NOT_BOUND",
        "permanent",
        "server issued a Bearer token to a DPoP request",
      );
    }
    const lifetimeSec =
      typeof result.expires_in === "number" && result.expires_in > 0 ? result.expires_in : 300;
    const token: AccessToken = {
      token: new Secret(result.access_token),
      expiresAt: new Date(this.#deps.clock.now().getTime() + lifetimeSec * 1000),
      tokenType,
      scope: typeof result.scope === "string" ? result.scope : key,
    };
    this.#store(key, token, lifetimeSec, lifetimeSec);
    await this.#saveDisk();
    this.#log.info("access token obtained", { scope: token.scope, tokenType, expiresIn: lifetimeSec });
    return token;
  }

  /** The cached challenge if it can still be used (15 s margin for the round trip and the quote). */
  #freshChallenge(): Challenge | undefined {
    const c = this.#challenge;
    if (c === undefined) return undefined;
    const ageMs = this.#deps.clock.monotonicMs() - c.receivedMono;
    return ageMs < Math.max(1, c.maxAgeSec - 15) * 1000 ? c : undefined;
  }

  #rememberChallenge(response: Response): void {
    const nonce = response.headers.get(ATTESTATION_HEADERS.nonce);
    const pcrs = response.headers.get(ATTESTATION_HEADERS.pcrs);
    if (nonce === null || pcrs === null || nonce.length > 128) return;
    const selection = parsePcrSelection(pcrs);
    if (selection === undefined) return;
    const maxAge = Number(response.headers.get(ATTESTATION_HEADERS.maxAge) ?? "60");
    this.#attestationSeen = true;
    this.#challenge = {
      nonce,
      selection,
      maxAgeSec: Number.isFinite(maxAge) && maxAge > 0 ? Math.min(maxAge, 86_400) : 60,
      receivedMono: this.#deps.clock.monotonicMs(),
    };
  }

  /**
   * A fresh nonce without spending a signature: an unsigned request naming only the client; the
   * server answers `use_attestation_nonce` with the challenge headers before any client check.
   */
  async #fetchChallenge(as: oauth.AuthorizationServer, tokenEndpoint: string): Promise<void> {
    const f = this.#httpOptions()[oauth.customFetch];
    try {
      const res = await f(tokenEndpoint, {
        method: "POST",
        headers: { "content-type": "application/x-www-form-urlencoded", accept: "application/json" },
        body: new URLSearchParams({
          grant_type: "client_credentials",
          client_id: this.#config.clientId,
        }).toString(),
      });
      this.#rememberChallenge(res);
    } catch (err) {
      this.#log.debug("attestation challenge request failed", { error: err, issuer: as.issuer });
    }
  }

  #store(key: string, token: AccessToken, lifetimeSec: number, remainingSec: number): void {
    const fraction = this.#config.refreshFraction ?? 0.8;
    const jitter = this.#config.refreshJitter ?? 0.05;
    const random = this.#deps.random ?? Math.random;
    const lifeMs = lifetimeSec * 1000;
    const elapsedMs = (lifetimeSec - remainingSec) * 1000;
    const refreshInMs = Math.max(0, lifeMs * fraction + (random() * 2 - 1) * jitter * lifeMs - elapsedMs);
    const mono = this.#deps.clock.monotonicMs();
    // Bounded: scope sets come from local callers too; the oldest entry goes first.
    this.#cache.delete(key);
    if (this.#cache.size >= 64) {
      const oldest = this.#cache.keys().next().value;
      if (oldest !== undefined) this.#cache.delete(oldest);
    }
    this.#cache.set(key, {
      token,
      refreshAtMono: mono + Math.min(refreshInMs, remainingSec * 1000 - 5000),
      hardExpiryMono: mono + remainingSec * 1000 - 5000,
    });
  }

  /**
   * The private_key_jwt client assertion (RFC 7523), signed by the device key (oauth4webapi's
   * PrivateKeyJwt needs a CryptoKey); single use (jti). Signed before the request is built, so it can
   * overlap a nonce round trip.
   */
  async #signAssertion(
    as: oauth.AuthorizationServer,
    client: oauth.Client,
    tokenEndpoint: string,
  ): Promise<string> {
    const info = await this.#keyInfo();
    const now = this.#deps.clock.nowSeconds();
    const lifetime = Math.min(60, Math.max(10, this.#config.assertionLifetimeSec ?? 60));
    const aud = this.#config.assertionAudience === "issuer" ? as.issuer : tokenEndpoint;
    return signCompactJws(
      this.#deps.keys,
      info,
      { typ: "JWT" },
      {
        iss: client.client_id,
        sub: client.client_id,
        aud,
        jti: base64url.encode(randomBytes(18)),
        iat: now,
        exp: now + lifetime,
      },
    );
  }

  /** Client authentication with an assertion signed beforehand (see #signAssertion). */
  #clientAuth(assertion: string): oauth.ClientAuth {
    return async (_as, client, body) => {
      body.set("client_id", client.client_id);
      body.set("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
      body.set("client_assertion", assertion);
    };
  }

  #noteQuote(
    quoted: { at: Date; selection: string },
    result: AttestationStatus["result"],
    code: string | undefined,
    detail: string | undefined,
  ): void {
    const prev = this.#attestationStatus?.lastVerifiedAt;
    const lastVerifiedAt = result === "verified" ? quoted.at.toISOString() : prev;
    this.#attestationStatus = {
      lastQuoteAt: quoted.at.toISOString(),
      selection: quoted.selection,
      result,
      ...(code === undefined ? {} : { code }),
      ...(detail === undefined ? {} : { detail: detail.slice(0, 200) }),
      ...(lastVerifiedAt === undefined ? {} : { lastVerifiedAt }),
    };
  }

  /** What the token endpoint made of a request that carried a quote. */
  async #noteAnswer(quoted: { at: Date; selection: string }, response: Response): Promise<void> {
    if (response.status === 200) {
      this.#noteQuote(quoted, "verified", undefined, undefined);
      return;
    }
    const rbody = (await response
      .clone()
      .json()
      .catch(() => ({}))) as { error?: unknown; error_description?: unknown };
    const desc = typeof rbody.error_description === "string" ? rbody.error_description : undefined;
    if (rbody.error === ATTESTATION_OAUTH_ERRORS.failed) {
      this.#noteQuote(quoted, "refused", ATTESTATION_OAUTH_ERRORS.failed, desc);
    } else if (rbody.error === ATTESTATION_OAUTH_ERRORS.useNonce) {
      this.#noteQuote(quoted, "nonce-refused", ATTESTATION_OAUTH_ERRORS.useNonce, desc);
    } else {
      const code = typeof rbody.error === "string" ? rbody.error.slice(0, 64) : `HTTP_${response.status}`;
      this.#noteQuote(quoted, "unanswered", code, desc);
    }
  }

  #httpOptions(): { [oauth.customFetch]: typeof fetch; [oauth.allowInsecureRequests]?: boolean } {
    const timeout = this.#config.requestTimeoutMs ?? 10_000;
    const cap = this.#config.maxResponseBytes ?? 65_536;
    const dispatcher = this.#dispatcher;
    const customFetchFn = async (input: string | URL, init?: RequestInit): Promise<Response> => {
      const r = await undiciFetch(String(input), {
        ...(init as object),
        redirect: "manual",
        signal: AbortSignal.timeout(timeout),
        ...(dispatcher === undefined ? {} : { dispatcher }),
      } as Parameters<typeof undiciFetch>[1]);
      const bytes = await readCapped(r.body, cap);
      return new Response(r.status === 204 || r.status === 304 ? null : bytes, {
        status: r.status,
        headers: r.headers as unknown as Headers,
      });
    };
    return {
      [oauth.customFetch]: customFetchFn as typeof fetch,
      ...(this.#config.allowInsecureHttp === true ? { [oauth.allowInsecureRequests]: true } : {}),
    };
  }

  #trust(): TrustSource {
    return (
      this.#config.trust ??
      (this.#config.caPem === undefined
        ? { description: "the system CA store", key: "credentials.oauth.ca_file" }
        : { description: "the configured CA", key: "credentials.oauth.ca_file" })
    );
  }

  async #discover(): Promise<oauth.AuthorizationServer> {
    if (this.#as !== undefined) return this.#as;
    const { tokenEndpoint, issuer } = this.#config;
    if (tokenEndpoint !== undefined) {
      this.#as = { issuer: issuer ?? new URL(tokenEndpoint).origin, token_endpoint: tokenEndpoint };
      return this.#as;
    }
    const issuerUrl = new URL(issuer ?? "");
    const mode = this.#config.discovery ?? "auto";
    const algorithms: ("oauth2" | "oidc")[] = mode === "auto" ? ["oauth2", "oidc"] : [mode];
    let lastErr: unknown;
    for (const algorithm of algorithms) {
      try {
        const res = await oauth.discoveryRequest(issuerUrl, { algorithm, ...this.#httpOptions() });
        if (res.status === 404 && algorithm !== algorithms[algorithms.length - 1]) continue;
        if (res.status === 429 || res.status >= 500) {
          throw new M2mError("ERR_OAUTH_DISCOVERY", "transient", `discovery answered ${res.status}`, {
            details: retryAfter(res, this.#deps.clock),
          });
        }
        // Security: processDiscoveryResponse checks that the document's issuer is the one we asked.
        const as = await oauth.processDiscoveryResponse(issuerUrl, res);
        if (as.token_endpoint === undefined) {
          throw new M2mError("ERR_OAUTH_DISCOVERY", "permanent", "metadata has no token_endpoint");
        }
        this.#as = as;
        return as;
      } catch (err) {
        lastErr = err;
        if (err instanceof M2mError) throw err;
        const tls = tlsVerifyError(err, issuerUrl.href, this.#trust());
        if (tls !== undefined) throw tls;
        // A document that fails validation (wrong issuer, bad JSON, not https) will fail the same
        // way next time: a misconfiguration or an impostor, not an outage.
        if (err instanceof oauth.OperationProcessingError) {
          throw new M2mError("ERR_OAUTH_DISCOVERY", "permanent", "authorization server metadata refused", {
            cause: err,
            hint: "check credentials.oauth.issuer: the metadata must name exactly this issuer",
          });
        }
      }
    }
    throw new M2mError("ERR_OAUTH_DISCOVERY", "transient", "authorization server metadata unavailable", {
      cause: lastErr,
      hint: "check credentials.oauth.issuer and the network path to the authorization server",
    });
  }

  async #loadDisk(): Promise<void> {
    if (this.#diskLoaded || this.#config.cacheFile === undefined) return;
    this.#diskLoaded = true;
    try {
      const data = JSON.parse(await readFile(this.#config.cacheFile, "utf8")) as Record<string, DiskEntry>;
      const now = this.#deps.clock.nowSeconds();
      for (const [k, e] of Object.entries(data)) {
        const remaining = e.expiresAt - now;
        if (remaining <= 10 || e.issuedAt > now) continue;
        const token: AccessToken = {
          token: new Secret(e.token),
          expiresAt: new Date(e.expiresAt * 1000),
          tokenType: e.tokenType,
          scope: e.scope,
        };
        this.#store(k, token, e.expiresAt - e.issuedAt, remaining);
      }
    } catch {
      // Missing or unreadable cache: just fetch new tokens.
    }
  }

  async #saveDisk(): Promise<void> {
    const file = this.#config.cacheFile;
    if (file === undefined) return;
    const out: Record<string, DiskEntry> = {};
    const now = this.#deps.clock.nowSeconds();
    for (const [k, e] of this.#cache) {
      const expiresAt = Math.floor(e.token.expiresAt.getTime() / 1000);
      out[k] = {
        token: e.token.token.reveal(),
        tokenType: e.token.tokenType,
        scope: e.token.scope,
        issuedAt: now,
        expiresAt,
      };
    }
    // 0600 from the first byte: the file holds bearer credentials.
    await writeFileAtomic(file, JSON.stringify(out), 0o600);
  }
}

function normaliseScope(scope: string): string {
  return [...new Set(scope.split(" ").filter((s) => s !== ""))].sort().join(" ");
}

function retryAfter(res: Response, clock: Clock): { retryAfterMs?: number } {
  const ms = parseRetryAfter(res.headers.get("retry-after"), clock.now().getTime());
  return ms === undefined ? {} : { retryAfterMs: ms };
}

/** Maps oauth4webapi errors to our codes and retry classes. */
function classify(err: unknown): M2mError {
  let error: string | undefined;
  if (err instanceof oauth.ResponseBodyError) error = err.error;
  else if (err instanceof oauth.WWWAuthenticateChallengeError) {
    error = err.cause.map((c) => c.parameters.error).find((e) => e !== undefined);
  }
  if (error !== undefined && PERMANENT_CLIENT_ERRORS.has(error)) {
    return new M2mError(
      "ERR_OAUTH_CLIENT_REVOKED",
      "permanent",
      `authorization server refused the client (${error})`,
      {
        cause: err,
        hint: "the device may be revoked or not registered as a client: check with the fleet operator",
      },
    );
  }
  if (error === ATTESTATION_OAUTH_ERRORS.failed) {
    // The registrar's one-line reason ("PCR 7 differs from the policy") is what the operator needs.
    const raw = err instanceof oauth.ResponseBodyError ? err.error_description : undefined;
    const reason =
      typeof raw === "string" ? raw.replace(/[^\x20-\x7e]/g, "").slice(0, 200) : "no reason given";
    return new M2mError("ERR_ATTESTATION_REFUSED", "permanent", `attestation refused: ${reason}`, {
      cause: err,
      details: { reason },
      hint: "the fleet operator reviews `m2m-registrar attestation show <device>` and approves new values if planned",
    });
  }
  if (error === "invalid_scope") {
    return new M2mError("ERR_OAUTH_SCOPE", "permanent", "requested scope not allowed", { cause: err });
  }
  if (error === "invalid_dpop_proof" || error === "use_dpop_nonce") {
    return new M2mError("ERR_OAUTH_DPOP", "permanent", `DPoP proof refused (${error})`, { cause: err });
  }
  if (error !== undefined) {
    return new M2mError("ERR_OAUTH_TOKEN_REFUSED", "permanent", `token request refused (${error})`, {
      cause: err,
    });
  }
  return new M2mError("ERR_OAUTH_TOKEN_RESPONSE", "transient", "invalid token endpoint response", {
    cause: err,
  });
}

async function readCapped(body: ReadableStream<Uint8Array> | null, cap: number): Promise<Uint8Array> {
  if (body === null) return new Uint8Array(0);
  const chunks: Uint8Array[] = [];
  let size = 0;
  for await (const chunk of body as unknown as AsyncIterable<Uint8Array>) {
    size += chunk.length;
    if (size > cap) {
      throw new M2mError(
        "ERR_OAUTH_RESPONSE_TOO_LARGE",
        "transient",
        "authorization server response too large",
      );
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks);
}

function originOf(url: string): string {
  try {
    return new URL(url).origin;
  } catch {
    return url;
  }
}
