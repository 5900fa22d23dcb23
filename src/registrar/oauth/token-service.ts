import { type KeyObject, randomUUID } from "node:crypto";
import type { IncomingMessage } from "node:http";
import type { Clock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import { type Logger, silentLogger } from "../../core/log.js";
import {
  ATTESTATION_FORM_PARAM,
  ATTESTATION_HEADERS,
  ATTESTATION_OAUTH_ERRORS,
  MAX_EVENT_LOG_BYTES,
} from "../../wire/v1/index.js";
import {
  type AttestationChallenge,
  type AttestationGate,
  challengeDetails,
  challengeOf,
} from "../attestation/gate.js";
import type { Route, RouteResponse } from "../http/router.js";
import { type AccessTokenCheck, type VerifiedAccessToken, verifyAccessToken } from "./access-token.js";
import {
  type AssertionPolicy,
  DEFAULT_ASSERTION_POLICY,
  JWT_BEARER_ASSERTION_TYPE,
  verifyClientAssertion,
} from "./client-assertion.js";
import type { DeviceDirectory, DirectoryDevice } from "./directory.js";
import { DpopNonceIssuer, verifyDpopProof } from "./dpop-verify.js";
import { GENERIC_DESCRIPTION, type OAuthErrorValue, oauthErrorOf, refusal } from "./errors.js";
import { ALLOWED_ALGS } from "./jws-util.js";
import { ReplayCache, type ReplayGuard } from "./replay-cache.js";
import { ScopePolicy, type ScopePolicyConfig } from "./scope-policy.js";
import { signJwtInPool, type TokenSigningKey } from "./signing-key.js";

export interface TokenServiceConfig {
  /** Issuer identifier (https URL, no trailing slash), e.g. `https://registrar.example:8443`. */
  readonly issuer: string;
  /** Default `${issuer}/oauth2/token`. */
  readonly tokenEndpoint?: string;
  /** Default `${issuer}/jwks`. */
  readonly jwksUri?: string;
  /** `aud` of issued access tokens (the resource servers). */
  readonly audiences: readonly string[];
  /** Access-token lifetime, seconds (default 300, as `oauth.access_token_ttl`). */
  readonly accessTokenTtlSec?: number;
  readonly scopes: ScopePolicyConfig;
  /** Refuse token requests without a DPoP proof. */
  readonly requireDpop?: boolean;
  /** Require a server nonce in DPoP proofs (RFC 9449 §8). */
  readonly requireDpopNonce?: boolean;
  readonly assertion?: Partial<Omit<AssertionPolicy, "audiences">>;
  /** Capacity of the assertion / DPoP jti replay cache (fails closed when full of live entries). */
  readonly replayCacheEntries?: number;
}

export interface TokenServiceDeps {
  readonly directory: DeviceDirectory;
  /** The key that signs new tokens. */
  readonly signingKey: TokenSigningKey;
  /** Every key /jwks publishes and verifyAccessToken accepts (rollover); default the signing key only. */
  readonly publishedKeys?: readonly TokenSigningKey[];
  /**
   * jti replay protection for assertions and DPoP proofs at the token endpoint, and for DPoP proofs at
   * co-located resource servers. Default: in-process caches (one process only; lost at restart).
   * The registrar passes store-backed guards so every replica shares them.
   */
  readonly replay?: ReplayGuard;
  readonly resourceReplay?: ReplayGuard;
  /** HMAC key of DPoP server nonces; shared by replicas so any replica accepts any replica's nonce. */
  readonly nonceSecret?: Buffer;
  readonly clock: Clock;
  readonly log?: Logger;
  /** Continuous attestation (docs/attestation.md); without it no group policy is enforced. */
  readonly attestation?: AttestationGate;
}

export interface IssuedToken {
  readonly access_token: string;
  readonly token_type: "Bearer" | "DPoP";
  readonly expires_in: number;
  readonly scope: string;
}

/** The token endpoint as a plain function, so it can be tested without HTTP. */
export interface TokenRequest {
  readonly form: URLSearchParams;
  /** The DPoP header value, if any. */
  readonly dpop?: string;
}

/**
 * The registrar's OAuth 2.0 token service: client_credentials with private_key_jwt (RFC 7523),
 * optional DPoP binding (RFC 9449), RFC 9068 JWT access tokens with least-privilege scopes.
 */
export class TokenService {
  readonly issuer: string;
  readonly tokenEndpoint: string;
  readonly jwksUri: string;
  readonly #config: TokenServiceConfig;
  readonly #deps: TokenServiceDeps;
  readonly #log: Logger;
  readonly #replay: ReplayGuard;
  readonly #resourceReplay: ReplayGuard;
  readonly #published: readonly TokenSigningKey[];
  readonly #policy: ScopePolicy;
  readonly #assertionPolicy: AssertionPolicy;
  readonly nonces: DpopNonceIssuer;

  constructor(config: TokenServiceConfig, deps: TokenServiceDeps) {
    this.#config = config;
    this.#deps = deps;
    this.#log = deps.log ?? silentLogger;
    this.issuer = config.issuer.replace(/\/+$/, "");
    this.tokenEndpoint = config.tokenEndpoint ?? `${this.issuer}/oauth2/token`;
    this.jwksUri = config.jwksUri ?? `${this.issuer}/jwks`;
    this.#policy = new ScopePolicy(config.scopes);
    this.#replay = deps.replay ?? new ReplayCache(config.replayCacheEntries ?? 100_000);
    this.#resourceReplay = deps.resourceReplay ?? new ReplayCache();
    this.#published = deps.publishedKeys ?? [deps.signingKey];
    this.#assertionPolicy = {
      ...DEFAULT_ASSERTION_POLICY,
      ...(config.assertion ?? {}),
      audiences: [this.tokenEndpoint, this.issuer],
    };
    this.nonces = new DpopNonceIssuer(deps.clock, 300, deps.nonceSecret);
  }

  /** RFC 8414 metadata. */
  metadata(): Record<string, unknown> {
    return {
      issuer: this.issuer,
      token_endpoint: this.tokenEndpoint,
      jwks_uri: this.jwksUri,
      grant_types_supported: ["client_credentials"],
      token_endpoint_auth_methods_supported: ["private_key_jwt"],
      token_endpoint_auth_signing_alg_values_supported: [...ALLOWED_ALGS],
      dpop_signing_alg_values_supported: [...ALLOWED_ALGS],
      scopes_supported: [...new Set(Object.values(this.#config.scopes.roles).flat())].sort(),
      response_types_supported: [],
    };
  }

  jwks(): { keys: unknown[] } {
    return { keys: this.#published.map((k) => k.publicJwk) };
  }

  /**
   * Handles one token request. @throws M2mError with `details.oauthError` (see errors.ts).
   * @returns the token response and the DPoP nonce to send back, if any.
   */
  async token(
    req: TokenRequest,
  ): Promise<{ body: IssuedToken; device: DirectoryDevice; challenge?: AttestationChallenge | undefined }> {
    const form = req.form;
    for (const name of [
      "grant_type",
      "client_assertion",
      "client_assertion_type",
      "client_id",
      "scope",
      ATTESTATION_FORM_PARAM,
    ]) {
      // Security: repeated parameters are ambiguous (RFC 6749 §3.2); refuse instead of picking one.
      if (form.getAll(name).length > 1)
        throw refusal("ERR_TOKEN_REQUEST", "invalid_request", `repeated ${name}`);
    }
    if (form.get("grant_type") !== "client_credentials") {
      throw refusal("ERR_TOKEN_GRANT_TYPE", "unsupported_grant_type", "only client_credentials is supported");
    }
    const gate = this.#deps.attestation;
    const evidence = form.get(ATTESTATION_FORM_PARAM);
    if (gate !== undefined && evidence === null) {
      // Before any signature is checked or jti consumed: a device that must quote learns the nonce and
      // the PCR selection in one cheap round trip (the agent may send this request unsigned).
      const challenge = await gate.challengeIfRequired(form.get("client_id"));
      if (challenge !== undefined) {
        throw new M2mError("ERR_QUOTE_NONCE_REQUIRED", "permanent", "a TPM quote is required", {
          details: { oauthError: ATTESTATION_OAUTH_ERRORS.useNonce, ...challengeDetails(challenge) },
        });
      }
    }
    const assertion = form.get("client_assertion");
    if (form.get("client_assertion_type") !== JWT_BEARER_ASSERTION_TYPE || assertion === null) {
      throw refusal(
        "ERR_TOKEN_CLIENT_AUTH",
        "invalid_client",
        "private_key_jwt client authentication required",
      );
    }
    const clock = this.#deps.clock;
    // The proof is checked first (a bad proof is refused before any assertion is consumed), but its
    // jti is recorded only after the client authenticated: an anonymous flood of self-signed proofs
    // must not be able to fill the replay cache.
    let proof: Awaited<ReturnType<typeof verifyDpopProof>> | undefined;
    if (req.dpop !== undefined) {
      proof = await verifyDpopProof(
        req.dpop,
        {
          method: "POST",
          url: this.tokenEndpoint,
          ...(this.#config.requireDpopNonce === true ? { nonces: this.nonces } : {}),
        },
        { replay: this.#replay, clock, deferReplay: true },
      );
    } else if (this.#config.requireDpop === true) {
      throw refusal("ERR_DPOP_REQUIRED", "invalid_dpop_proof", "a DPoP proof is required");
    }
    const device = await verifyClientAssertion(assertion, form.get("client_id") ?? undefined, {
      directory: this.#deps.directory,
      replay: this.#replay,
      clock,
      policy: this.#assertionPolicy,
    });
    await proof?.recordReplay();
    const jkt = proof?.jkt;
    const gated =
      gate === undefined ? undefined : await gate.evaluate(device.deviceId, device.group, evidence);
    const attested = gated?.claim;
    const granted = this.#policy.grant(form.get("scope") ?? undefined, device.role, device.attributes, {
      attested: attested !== undefined,
    });
    if (granted === undefined)
      throw refusal("ERR_TOKEN_SCOPE", "invalid_scope", "no requested scope is allowed");
    const ttl = this.#config.accessTokenTtlSec ?? 300;
    const now = clock.nowSeconds();
    const aud = this.#config.audiences.length === 1 ? this.#config.audiences[0] : [...this.#config.audiences];
    const claims: Record<string, unknown> = {
      client_id: device.deviceId,
      scope: granted.join(" "),
      ...(jkt === undefined ? {} : { cnf: { jkt } }),
      // Resource servers can require it: when the quote was verified and against which policy.
      ...(attested === undefined ? {} : { attested }),
    };
    const jwt = await signJwtInPool(
      this.#deps.signingKey,
      { typ: "at+jwt" },
      {
        iss: this.issuer,
        sub: device.deviceId,
        aud: aud ?? this.issuer,
        iat: now,
        exp: now + ttl,
        jti: randomUUID(),
        ...claims,
      },
    );
    return {
      body: {
        access_token: jwt,
        token_type: jkt === undefined ? "Bearer" : "DPoP",
        expires_in: ttl,
        scope: granted.join(" "),
      },
      device,
      challenge: gated?.challenge,
    };
  }

  /** For resource servers co-located with the registrar (the ingest endpoint). */
  verifyAccessToken(token: string, check: AccessTokenCheck): Promise<VerifiedAccessToken> {
    return verifyAccessToken(token, {
      ...check,
      issuer: this.issuer,
      keys: publishedKeyResolver(this.#published),
      clock: this.#deps.clock,
      replay: this.#resourceReplay,
    });
  }

  /**
   * POST /oauth2/token as a registrar route. Never throws: every refusal is an RFC 6749 §5.2 body
   * (`{error, error_description}`, generic), the specific code goes to the log only.
   */
  async handleToken(ctx: {
    readonly rawBody: Buffer;
    readonly req: IncomingMessage;
  }): Promise<RouteResponse> {
    const nonceHeader: Record<string, string> =
      this.#config.requireDpopNonce === true ? { "dpop-nonce": this.nonces.current() } : {};
    try {
      const dpopHeader = ctx.req.headers.dpop;
      if (Array.isArray(dpopHeader))
        throw refusal("ERR_DPOP_MALFORMED", "invalid_dpop_proof", "one DPoP header only");
      const { body, device, challenge } = await this.token({
        form: new URLSearchParams(ctx.rawBody.toString("utf8")),
        ...(dpopHeader === undefined ? {} : { dpop: dpopHeader }),
      });
      this.#log.debug("token issued", {
        deviceId: device.deviceId,
        scope: body.scope,
        tokenType: body.token_type,
      });
      return {
        status: 200,
        json: body,
        headers: {
          "cache-control": "no-store",
          pragma: "no-cache",
          ...nonceHeader,
          ...challengeHeaders(challenge),
        },
      };
    } catch (err) {
      const error: OAuthErrorValue = oauthErrorOf(err);
      const code = err instanceof M2mError ? err.code : "ERR_INTERNAL";
      if (error === "server_error") this.#log.error("token endpoint failed", { error: err });
      else this.#log.info("token refused", { code, error });
      const status = error === "invalid_client" ? 401 : error === "server_error" ? 500 : 400;
      const challenge = challengeOf(err);
      const headers: Record<string, string> = {
        "cache-control": "no-store",
        ...nonceHeader,
        ...challengeHeaders(challenge),
      };
      if (error === "invalid_client") headers["www-authenticate"] = 'Bearer error="invalid_client"';
      // A refused quote says why in one line (which PCRs, never expected values): the device shows it
      // to its operator; every other refusal stays generic.
      const description =
        error === "attestation_failed" && err instanceof M2mError ? err.message : GENERIC_DESCRIPTION[error];
      return { status, json: { error, error_description: description }, headers };
    }
  }
}

function challengeHeaders(c: AttestationChallenge | undefined): Record<string, string> {
  if (c === undefined) return {};
  return {
    [ATTESTATION_HEADERS.nonce]: c.nonce,
    [ATTESTATION_HEADERS.pcrs]: c.pcrs,
    [ATTESTATION_HEADERS.maxAge]: String(c.maxAgeSec),
  };
}

/** Body cap of the token endpoint: a quote, PCR values and a measured-boot event log (base64url). */
export const TOKEN_MAX_BODY_BYTES = 16_384 + Math.ceil((MAX_EVENT_LOG_BYTES * 4) / 3);

/**
 * Picks the verification key by the token's `kid` among the published keys (rollover: a token signed
 * by another replica's newer or older key verifies here too). An unknown kid is refused.
 */
export function publishedKeyResolver(
  keys: readonly TokenSigningKey[],
): (header: { kid?: string }) => KeyObject {
  return (header) => {
    const k = keys.find((x) => x.kid === header.kid);
    // Security: only keys this registrar publishes verify its tokens; no kid-less fallback.
    if (k === undefined) throw new M2mError("ERR_TOKEN_KID", "permanent", "unknown token signing key");
    return k.publicKey;
  };
}

/**
 * The token-service routes for the registrar server (`extraRoutes`): token endpoint, RFC 8414
 * metadata, JWKS.
 */
export function oauthRoutes(deps: { tokenService: TokenService }): Route[] {
  const svc = deps.tokenService;
  const path = (u: string): string => new URL(u).pathname;
  return [
    {
      method: "POST",
      path: path(svc.tokenEndpoint),
      contentTypes: ["application/x-www-form-urlencoded"],
      maxBodyBytes: TOKEN_MAX_BODY_BYTES,
      handle: (ctx) => svc.handleToken(ctx),
    },
    {
      method: "GET",
      path: "/.well-known/oauth-authorization-server",
      handle: async () => ({
        status: 200,
        json: svc.metadata(),
        headers: { "cache-control": "max-age=300" },
      }),
    },
    {
      method: "GET",
      path: path(svc.jwksUri),
      handle: async () => ({
        status: 200,
        body: JSON.stringify(svc.jwks()),
        contentType: "application/jwk-set+json",
        headers: { "cache-control": "max-age=300" },
      }),
    },
  ];
}
