import { promisify } from "node:util";
import { gunzip as gunzipCb } from "node:zlib";
import type { JWTPayload } from "jose";
import { type Clock, systemClock } from "../../core/clock.js";
import { type ErrorCode, isM2mError } from "../../core/errors.js";
import { HttpError, type Route, type RouteContext, type RouteResponse } from "../http/router.js";
import { parseAuthorization } from "../oauth/access-token.js";
import { verifyDpopProof } from "../oauth/dpop-verify.js";
import { ReplayCache, type ReplayGuard } from "../oauth/replay-cache.js";

const gunzip = promisify(gunzipCb);

/** One message as the reference ingest endpoint stored it. */
export interface IngestedMessage {
  readonly id: string;
  readonly deviceId: string;
  readonly topic: string;
  readonly channel: string;
  readonly ts: number;
  readonly contentType: string;
  /** The payload as received: a JSON value, or base64 text (`payload_b64`). */
  readonly payload: unknown;
  readonly receivedAt: number;
}

/** Where the endpoint keeps what arrived, deduplicated by message id (tests read it). */
export class InMemoryIngestStore {
  readonly messages = new Map<string, IngestedMessage>();
  received = 0;
  duplicates = 0;
  requests = 0;

  add(m: IngestedMessage): boolean | Promise<boolean> {
    this.received++;
    if (this.messages.has(m.id)) {
      this.duplicates++;
      return false;
    }
    this.messages.set(m.id, m);
    return true;
  }
}

export interface IngestRoutesOptions {
  /**
   * Verifies the access token's signature, issuer, expiry and type (e.g. jose `jwtVerify` with the
   * registrar's JWKS) and returns its claims. Throw to refuse.
   */
  readonly verifyAccessToken: (token: string) => Promise<JWTPayload>;
  /** Expected `aud`. */
  readonly audience: string;
  /** Required scope. Default `telemetry:write`. */
  readonly scope?: string;
  /** The public URL of the endpoint as clients call it (DPoP `htu`); a function when the port is late-bound. */
  readonly publicUrl: string | (() => string);
  /** Refuse Bearer (un-bound) tokens. Default true. */
  readonly requireDpop?: boolean;
  readonly store?: InMemoryIngestStore;
  /** DPoP proof jti store (default: in this process). The registrar passes its shared store. */
  readonly replay?: ReplayGuard;
  readonly clock?: Clock;
  readonly maxBodyBytes?: number;
  readonly maxInflatedBytes?: number;
  readonly maxMessages?: number;
  /** Test hook: answer the next requests with these statuses before processing (fault injection). */
  readonly faults?: () => RouteResponse | undefined;
}

const ID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const CHANNEL_RE = /^[A-Za-z0-9_-]+(\/[A-Za-z0-9_-]+)*$/;

function bearerChallenge(code: ErrorCode, message: string, oauthError: string): HttpError {
  const e = new HttpError(401, code, message);
  (e as { challenge?: string }).challenge = oauthError;
  return e;
}

/**
 * The reference ingest endpoint, `POST /v1/ingest` (routes for `startRegistrar({ extraRoutes })`).
 * Checks, in order: an access token (verified by the injected function), audience, scope, the DPoP
 * binding (`cnf.jkt` = thumbprint of the proof key; htm/htu/iat/jti/ath), and that every message's
 * topic lies under `devices/{sub}/`. Messages outside the device's namespace are listed in `rejected`
 * (the rest are stored): `200 { accepted, duplicates, rejected: [{id, code}] }`.
 */
export function ingestRoutes(options: IngestRoutesOptions): { routes: Route[]; store: InMemoryIngestStore } {
  const store = options.store ?? new InMemoryIngestStore();
  const clock = options.clock ?? systemClock;
  const replay: ReplayGuard = options.replay ?? new ReplayCache();
  const scope = options.scope ?? "telemetry:write";
  const route: Route = {
    method: "POST",
    path: "/v1/ingest",
    contentTypes: ["application/json"],
    maxBodyBytes: options.maxBodyBytes ?? 2 * 1024 * 1024,
    handle: async (ctx: RouteContext): Promise<RouteResponse> => {
      store.requests++;
      const fault = options.faults?.();
      if (fault !== undefined) return fault;
      try {
        return await handle(ctx);
      } catch (err) {
        if (err instanceof HttpError && err.status === 401) {
          const challenge = (err as { challenge?: string }).challenge ?? "invalid_token";
          return {
            status: 401,
            json: { v: 1, error: { code: err.code, message: err.message } },
            headers: { "www-authenticate": `DPoP error="${challenge}", algs="ES256 RS256 PS256"` },
          };
        }
        throw err;
      }
    },
  };

  const handle = async (ctx: RouteContext): Promise<RouteResponse> => {
    const auth = parseAuthorization(ctx.req.headers.authorization);
    if (auth === undefined)
      throw bearerChallenge("ERR_INGEST_NO_TOKEN", "access token required", "invalid_token");
    let claims: JWTPayload;
    try {
      claims = await options.verifyAccessToken(auth.token);
    } catch (err) {
      const code = isM2mError(err) ? err.code : "ERR_ACCESS_TOKEN_INVALID";
      throw bearerChallenge(code, "access token rejected", "invalid_token");
    }
    // Security: a token minted for another resource server must not work here.
    const aud = claims.aud;
    const audOk = Array.isArray(aud) ? aud.includes(options.audience) : aud === options.audience;
    if (!audOk)
      throw bearerChallenge("ERR_INGEST_AUDIENCE", "access token not for this endpoint", "invalid_token");
    // Security: least privilege: a token without telemetry:write cannot write telemetry.
    const scopes = typeof claims.scope === "string" ? claims.scope.split(" ") : [];
    if (!scopes.includes(scope)) throw new HttpError(403, "ERR_INGEST_SCOPE", "insufficient scope");
    const sub = claims.sub;
    if (
      typeof sub !== "string" ||
      sub === "" ||
      sub.includes("/") ||
      sub.includes("+") ||
      sub.includes("#")
    ) {
      throw bearerChallenge("ERR_INGEST_SUBJECT", "access token subject unusable", "invalid_token");
    }
    const jkt = (claims.cnf as { jkt?: unknown } | undefined)?.jkt;
    if (typeof jkt === "string") {
      // Security: a bound token proves nothing without a proof by the bound key (a stolen token alone fails).
      if (auth.scheme !== "DPoP")
        throw bearerChallenge("ERR_INGEST_DPOP_SCHEME", "DPoP-bound token sent as Bearer", "invalid_token");
      const proof = ctx.req.headers.dpop;
      if (typeof proof !== "string")
        throw bearerChallenge("ERR_INGEST_DPOP_MISSING", "DPoP proof required", "invalid_dpop_proof");
      const publicUrl = typeof options.publicUrl === "function" ? options.publicUrl() : options.publicUrl;
      let proven: { jkt: string };
      try {
        // htm/htu/iat/jti (replay)/ath are checked inside; the proof key must be the token's key.
        proven = await verifyDpopProof(
          proof,
          { method: "POST", url: publicUrl, accessToken: auth.token },
          { replay, clock },
        );
      } catch (err) {
        throw bearerChallenge(
          isM2mError(err) ? err.code : "ERR_DPOP_INVALID",
          "DPoP proof rejected",
          "invalid_dpop_proof",
        );
      }
      // Security: the proof must come from the key the token was issued to.
      if (proven.jkt !== jkt)
        throw bearerChallenge(
          "ERR_DPOP_KEY_MISMATCH",
          "DPoP proof key is not the token's key",
          "invalid_dpop_proof",
        );
    } else if (options.requireDpop !== false) {
      throw bearerChallenge("ERR_INGEST_DPOP_REQUIRED", "a DPoP-bound token is required", "invalid_token");
    }

    let raw = ctx.rawBody;
    const encoding = String(ctx.req.headers["content-encoding"] ?? "identity").toLowerCase();
    if (encoding === "gzip") {
      try {
        // Bounded inflation: a small gzip body must not expand into memory exhaustion.
        raw = await gunzip(raw, { maxOutputLength: options.maxInflatedBytes ?? 8 * 1024 * 1024 });
      } catch {
        throw new HttpError(400, "ERR_INGEST_ENCODING", "body could not be decompressed");
      }
    } else if (encoding !== "identity") {
      throw new HttpError(415, "ERR_CONTENT_TYPE", "unsupported content encoding");
    }
    let body: unknown;
    try {
      body = JSON.parse(raw.toString("utf8"));
    } catch {
      throw new HttpError(400, "ERR_BAD_JSON", "request body is not valid JSON");
    }
    const messages = (body as { messages?: unknown } | null)?.messages;
    if (
      !Array.isArray(messages) ||
      messages.length === 0 ||
      messages.length > (options.maxMessages ?? 1000)
    ) {
      throw new HttpError(400, "ERR_SCHEMA", "request body does not match the schema", { field: "messages" });
    }
    const prefix = `devices/${sub}/`;
    const rejected: { id: string; code: string }[] = [];
    let accepted = 0;
    let duplicates = 0;
    const now = clock.now().getTime();
    for (const [i, m] of messages.entries()) {
      const o = m as Record<string, unknown> | null;
      if (
        o === null ||
        typeof o !== "object" ||
        typeof o.id !== "string" ||
        !ID_RE.test(o.id) ||
        typeof o.topic !== "string" ||
        typeof o.channel !== "string" ||
        !CHANNEL_RE.test(o.channel) ||
        typeof o.ts !== "number" ||
        typeof o.content_type !== "string" ||
        (!("payload" in o) && typeof o.payload_b64 !== "string")
      ) {
        throw new HttpError(400, "ERR_SCHEMA", "request body does not match the schema", {
          field: `messages[${i}]`,
        });
      }
      // Security: a device writes only under its own namespace (devices/{sub}/...), like the broker ACL.
      if (
        !o.topic.startsWith(prefix) ||
        o.topic.length === prefix.length ||
        o.topic.includes("+") ||
        o.topic.includes("#")
      ) {
        rejected.push({ id: o.id, code: "ERR_INGEST_TOPIC_NOT_OWNED" });
        continue;
      }
      const fresh = await store.add({
        id: o.id,
        deviceId: sub,
        topic: o.topic,
        channel: o.channel,
        ts: o.ts,
        contentType: o.content_type,
        payload: "payload" in o ? o.payload : o.payload_b64,
        receivedAt: now,
      });
      if (fresh) accepted++;
      else duplicates++;
    }
    return { status: 200, json: { accepted, duplicates, rejected } };
  };

  return { routes: [route], store };
}
