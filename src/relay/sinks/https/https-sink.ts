import { promisify } from "node:util";
import { gzip as gzipCb } from "node:zlib";
import { Agent, type Dispatcher, request } from "undici";
import { type Clock, systemClock } from "../../../core/clock.js";
import { type ErrorCode, isErrorCode } from "../../../core/error-codes.js";
import { asM2mError, M2mError } from "../../../core/errors.js";
import { type Logger, silentLogger } from "../../../core/log.js";
import { tlsVerifyError } from "../../../core/tls-diagnosis.js";
import {
  ingestBodyJson,
  ingestChannelPart,
  ingestMessageJson,
  ingestResponseSchema,
} from "../../../wire/v1/ingest.js";
import { expandTopic } from "../../channel.js";
import type { OutboxMessage } from "../../outbox/outbox.js";
import { isJsonContentType } from "../../sources/api/parse.js";
import { urlReachable } from "../probe.js";
import type { DeliveryOutcome, DpopSigner, RefreshableTokenSource, Sink } from "../sink.js";

const gzip = promisify(gzipCb);

export interface HttpsSinkOptions {
  readonly name?: string;
  /** Ingest endpoint, e.g. `https://registrar.example/v1/ingest`. Must be https. */
  readonly url: string;
  /** CA bundle for the server certificate (default: Node's bundled roots). Verification is always on. */
  readonly caPem?: string;
  readonly tokens: RefreshableTokenSource;
  /** With a signer every request carries `Authorization: DPoP` + a fresh `DPoP` proof; without, Bearer. */
  readonly dpop?: DpopSigner;
  readonly deviceId: string;
  readonly topicTemplate?: string;
  /** Messages per POST (the relay leases up to this many). Default 100, at most 500. */
  readonly maxBatch?: number;
  /** Payload bytes per POST. Default 512 KiB. */
  readonly maxBatchBytes?: number;
  /** A partial batch waits at most this long for more messages (time-bounded batching). Default 0. */
  readonly lingerMs?: number;
  /** Concurrent POSTs. Default 1 (keeps per-channel order). */
  readonly concurrency?: number;
  readonly gzip?: boolean;
  /**
   * zlib level. Default 1: on JSON telemetry it compresses nearly as well as the default 6 for a
   * fraction of the CPU, which a gateway's small cores need for ingest and TLS.
   */
  readonly gzipLevel?: number;
  /**
   * With `concurrency` 1: batches handed over at once (default 2). The next batch is encoded while
   * the previous POST is in flight; POSTs still go one at a time, in order, and a batch queued behind
   * a failed one is handed back untried (per-channel order holds).
   */
  readonly pipeline?: number;
  readonly headersTimeoutMs?: number;
  readonly bodyTimeoutMs?: number;
  readonly maxResponseBytes?: number;
  /** Retry-After above this is clamped. Default 5 min. */
  readonly maxRetryAfterMs?: number;
  /** Same-origin redirects followed at most this often (never cross-origin). Default 3. */
  readonly maxRedirects?: number;
  readonly clock?: Clock;
  readonly logger?: Logger;
  /** Test hook / custom transport. Default: an undici Agent verifying TLS with `caPem`. */
  readonly dispatcher?: Dispatcher;
}

interface Attempt {
  readonly status: number;
  readonly headers: Record<string, string | string[] | undefined>;
  readonly body: Buffer | undefined;
}

/** Parses Retry-After (delta-seconds or HTTP-date) to ms; undefined when absent or garbage. */
export function parseRetryAfter(v: string | string[] | undefined, now: Date): number | undefined {
  const s = Array.isArray(v) ? v[0] : v;
  if (s === undefined || s.trim() === "") return undefined;
  if (/^\d{1,10}$/.test(s.trim())) return Number(s.trim()) * 1000;
  const at = Date.parse(s);
  if (Number.isNaN(at)) return undefined;
  return Math.max(0, at - now.getTime());
}

/**
 * HTTPS sink (undici): batched, gzip'd JSON POSTs. Each message's stable id travels in the body item
 * and in `M2M-Message-Id` (comma-separated for a batch). 2xx → delivered (minus items the server lists
 * in `rejected`, which are dead-lettered); 401 → one token refresh and retry; 429/503 → Retry-After
 * (capped); other 4xx → dead-letter; 5xx, timeouts, resets → retry. Redirects: same origin only, and
 * credentials are re-minted for the new URL; another origin is refused without being contacted.
 */
export class HttpsSink implements Sink {
  readonly name: string;
  readonly maxBatch: number;
  readonly maxInFlight: number;
  readonly maxBatchBytes: number;
  readonly lingerMs: number;
  readonly #o: HttpsSinkOptions;
  readonly #url: URL;
  readonly #dispatcher: Dispatcher;
  readonly #ownDispatcher: boolean;
  readonly #clock: Clock;
  readonly #log: Logger;
  readonly counters = { requests: 0, refreshes: 0, redirectsRefused: 0 };
  /** The previous ordered POST (concurrency 1): the next one waits for it. */
  #chain: Promise<void> = Promise.resolve();
  /** Bumped when an ordered POST fails: batches queued behind it are handed back, not sent. */
  #failEpoch = 0;
  readonly #channelParts = new Map<string, string>();

  constructor(options: HttpsSinkOptions) {
    const url = new URL(options.url);
    // Tokens and data never travel in clear.
    if (url.protocol !== "https:")
      throw new M2mError("ERR_HTTPS_SINK_CONFIG", "permanent", "ingest URL must be https://");
    this.#o = options;
    this.#url = url;
    this.name = options.name ?? "https";
    this.maxBatch = Math.min(500, options.maxBatch ?? 100);
    this.maxBatchBytes = options.maxBatchBytes ?? 512 * 1024;
    this.lingerMs = options.lingerMs ?? 0;
    const concurrency = options.concurrency ?? 1;
    this.maxInFlight =
      this.maxBatch * (concurrency === 1 ? Math.max(1, Math.min(8, options.pipeline ?? 2)) : concurrency);
    this.#clock = options.clock ?? systemClock;
    this.#log = (options.logger ?? silentLogger).child({ sink: this.name });
    this.#ownDispatcher = options.dispatcher === undefined;
    this.#dispatcher =
      options.dispatcher ??
      new Agent({
        connect: { ...(options.caPem === undefined ? {} : { ca: options.caPem }), rejectUnauthorized: true },
        headersTimeout: options.headersTimeoutMs ?? 15_000,
        bodyTimeout: options.bodyTimeoutMs ?? 15_000,
        connections: options.concurrency ?? 1,
      });
  }

  /** The ingest body (wire v1, `ingestRequestSchema`), written without an object per message. */
  #body(batch: readonly OutboxMessage[]): string {
    return ingestBodyJson(
      batch.map((m) =>
        ingestMessageJson(
          m.id,
          this.#channelPart(m.channel),
          m.ts,
          m.contentType,
          // A view, not a copy: the payload is only read here.
          Buffer.from(m.payload.buffer, m.payload.byteOffset, m.payload.byteLength),
          // JSON payloads were validated at ingest and are embedded as is; anything else goes base64.
          isJsonContentType(m.contentType),
        ),
      ),
    );
  }

  /** `"topic":…,"channel":…` per channel, cached (channels are few; bounded like the MQTT sink's). */
  #channelPart(channel: string): string {
    let part = this.#channelParts.get(channel);
    if (part === undefined) {
      const template = this.#o.topicTemplate ?? "devices/{deviceId}/{channel}";
      const topic = expandTopic(template, { deviceId: this.#o.deviceId, channel });
      part = ingestChannelPart(topic, channel);
      if (this.#channelParts.size >= 4096) this.#channelParts.clear();
      this.#channelParts.set(channel, part);
    }
    return part;
  }

  /** JSON + gzip of a batch; undefined (logged) when it cannot be encoded. Never rejects. */
  async #encode(batch: readonly OutboxMessage[]): Promise<Buffer | undefined> {
    try {
      const json = Buffer.from(this.#body(batch), "utf8");
      return this.#o.gzip === false ? json : await gzip(json, { level: this.#o.gzipLevel ?? 1 });
    } catch (err) {
      this.#log.error("cannot encode batch", { err: asM2mError(err) });
      return undefined;
    }
  }

  async deliver(batch: readonly OutboxMessage[]): Promise<DeliveryOutcome[]> {
    if (batch.length === 0) return [];
    const retryAll = (code: ErrorCode): DeliveryOutcome[] =>
      batch.map((m) => ({ id: m.id, kind: "retry", code }));
    const ordered = (this.#o.concurrency ?? 1) === 1;
    // Taken synchronously at the call, before any await: POSTs go in call order (= lease order)
    // whatever order the encodings finish in, and a failure seen later is a failure ahead of us.
    const epoch = this.#failEpoch;
    const prev = this.#chain;
    let release: () => void = () => undefined;
    if (ordered) {
      this.#chain = new Promise<void>((r) => {
        release = r;
      });
    }
    try {
      // Encoding starts now: it overlaps the POST still in flight ahead of this batch.
      const encoding = this.#encode(batch);
      if (ordered) await prev;
      const payload = await encoding;
      // The batch before this one failed and will be retried: sending this one now would overtake it.
      if (ordered && epoch !== this.#failEpoch) return retryAll("ERR_HTTPS_PREDECESSOR_FAILED");
      const out =
        payload === undefined
          ? retryAll("ERR_HTTPS_ENCODE")
          : await this.#send(batch, payload, batch.map((m) => m.id).join(","));
      if (ordered && out.some((o) => o.kind === "retry")) this.#failEpoch++;
      return out;
    } finally {
      release();
    }
  }

  async #send(batch: readonly OutboxMessage[], payload: Buffer, ids: string): Promise<DeliveryOutcome[]> {
    const retryAll = (code: ErrorCode, delayMs?: number): DeliveryOutcome[] =>
      batch.map((m) => ({ id: m.id, kind: "retry", code, ...(delayMs === undefined ? {} : { delayMs }) }));
    const deadAll = (code: ErrorCode, detail: string): DeliveryOutcome[] =>
      batch.map((m) => ({ id: m.id, kind: "dead-letter", code, detail }));

    let url = this.#url;
    let refreshed = false;
    let nonceRetried = false;
    for (let hop = 0; hop <= (this.#o.maxRedirects ?? 3) + 2; hop++) {
      let res: Attempt;
      try {
        res = await this.#post(url, payload, ids);
      } catch (err) {
        // A refused certificate is not "network": the health reason says which host and why.
        const e =
          tlsVerifyError(err, url.href, {
            description: "the fleet CA and the system store",
            key: "relay.https.url",
          }) ?? asM2mError(err, "ERR_HTTPS_NETWORK");
        this.#log.warn("ingest request failed", { err: e });
        return retryAll(
          e.code === "ERR_HTTPS_AUTH" || e.code === "ERR_TLS_VERIFY" ? e.code : "ERR_HTTPS_NETWORK",
        );
      }
      const s = res.status;
      if (s >= 200 && s < 300) return this.#accepted(batch, res.body);
      if (s === 401) {
        const wwwAuth = String(res.headers["www-authenticate"] ?? "");
        if (/use_dpop_nonce/.test(wwwAuth) && !nonceRetried) {
          nonceRetried = true;
          continue;
        }
        if (!refreshed) {
          // The token may have been revoked or expired early: refresh exactly once per batch.
          refreshed = true;
          this.counters.refreshes++;
          this.#o.tokens.invalidate?.();
          continue;
        }
        return retryAll("ERR_HTTPS_UNAUTHORIZED");
      }
      if (s === 429 || s === 503) {
        const ra = parseRetryAfter(res.headers["retry-after"], this.#clock.now());
        const capped = ra === undefined ? undefined : Math.min(ra, this.#o.maxRetryAfterMs ?? 300_000);
        return retryAll(s === 429 ? "ERR_HTTPS_RATE_LIMITED" : "ERR_HTTPS_UNAVAILABLE", capped);
      }
      if (s >= 300 && s < 400) {
        const loc = res.headers.location;
        const target = typeof loc === "string" ? safeUrl(loc, url) : undefined;
        // Security: credentials (token + proof) only ever go to the configured origin; a redirect
        // elsewhere is not followed at all.
        if (target === undefined || target.origin !== this.#url.origin) {
          this.counters.redirectsRefused++;
          this.#log.warn("refused a redirect to another origin", { status: s });
          return retryAll("ERR_HTTPS_REDIRECT_REFUSED");
        }
        url = target;
        continue;
      }
      if (s === 408 || s >= 500) {
        this.#log.warn("ingest server error", { status: s });
        return retryAll("ERR_HTTPS_SERVER");
      }
      // Any other 4xx: the server refuses this content for good.
      return deadAll("ERR_HTTPS_REFUSED", `status=${s}`);
    }
    return retryAll("ERR_HTTPS_REDIRECT_LOOP");
  }

  #accepted(batch: readonly OutboxMessage[], body: Buffer | undefined): DeliveryOutcome[] {
    const rejected = new Map<string, string>();
    if (body !== undefined && body.length > 0) {
      let json: unknown;
      try {
        json = JSON.parse(body.toString("utf8"));
      } catch {
        // A 2xx with an unparsable body still means the server took the batch.
      }
      const parsed = ingestResponseSchema.safeParse(json);
      if (parsed.success) for (const r of parsed.data.rejected) rejected.set(r.id, r.code);
      else if (json !== undefined) this.#log.warn("ingest answer does not match wire v1; taken as accepted");
    }
    return batch.map((m) => {
      const code = rejected.get(m.id);
      if (code === undefined) return { id: m.id, kind: "ok" };
      // A code this agent's catalogue does not know (newer server) is kept as the detail.
      return isErrorCode(code)
        ? { id: m.id, kind: "dead-letter", code }
        : { id: m.id, kind: "dead-letter", code: "ERR_INGEST_REJECTED", detail: `ingestCode=${code}` };
    });
  }

  async #post(url: URL, payload: Buffer, ids: string): Promise<Attempt> {
    let auth: Record<string, string>;
    try {
      const t = await this.#o.tokens.getToken();
      // A DPoP-bound token needs a proof; a plain Bearer token (server did not bind it) goes as Bearer.
      if (this.#o.dpop !== undefined && t.tokenType !== "Bearer") {
        auth = {
          authorization: `DPoP ${t.token.reveal()}`,
          dpop: await this.#o.dpop.proof("POST", url.toString(), t.token),
        };
      } else {
        auth = { authorization: `Bearer ${t.token.reveal()}` };
      }
    } catch (err) {
      throw new M2mError("ERR_HTTPS_AUTH", "transient", "no access token available", { cause: err });
    }
    this.counters.requests++;
    const res = await request(url, {
      method: "POST",
      dispatcher: this.#dispatcher,
      headers: {
        "content-type": "application/json",
        ...(this.#o.gzip === false ? {} : { "content-encoding": "gzip" }),
        "m2m-message-id": ids,
        ...auth,
      },
      body: payload,
      headersTimeout: this.#o.headersTimeoutMs ?? 15_000,
      bodyTimeout: this.#o.bodyTimeoutMs ?? 15_000,
    });
    const nonce = res.headers["dpop-nonce"];
    if (typeof nonce === "string") this.#o.dpop?.rememberNonce(url.toString(), nonce);
    const body = await readCapped(res.body, this.#o.maxResponseBytes ?? 64 * 1024);
    return { status: res.statusCode, headers: res.headers, body };
  }

  /**
   * TCP reachability of the ingest host (no TLS, no request): lets the relay notice the server coming
   * back during a long backoff. A server that answers 429/503 is reachable, so its Retry-After holds.
   */
  probe(): Promise<boolean> {
    return urlReachable(this.#url.toString(), 443, Math.min(this.#o.headersTimeoutMs ?? 15_000, 2000));
  }

  async close(): Promise<void> {
    if (this.#ownDispatcher) await this.#dispatcher.close();
  }
}

function safeUrl(loc: string, base: URL): URL | undefined {
  try {
    return new URL(loc, base);
  } catch {
    return undefined;
  }
}

/** Reads at most `cap` bytes; a longer body is cut off (the connection is destroyed), never buffered. */
async function readCapped(body: Dispatcher.ResponseData["body"], cap: number): Promise<Buffer | undefined> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of body as AsyncIterable<Buffer>) {
    size += chunk.length;
    if (size > cap) {
      body.destroy();
      return undefined;
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks, size);
}
