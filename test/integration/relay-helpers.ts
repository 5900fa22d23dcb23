import mqtt, { type MqttClient } from "mqtt";

export interface Received {
  readonly topic: string;
  readonly payload: string;
  readonly id: string | undefined;
}

/** A subscriber on the broker's plain local listener that records everything under `filter`. */
export async function startSubscriber(
  url: string,
  filter = "devices/#",
  /** A fixed client id with a persistent session: survives broker restarts (with broker persistence). */
  persistentId?: string,
): Promise<{
  client: MqttClient;
  received: Received[];
  waitFor(pred: (r: Received[]) => boolean, timeoutMs?: number): Promise<void>;
  close(): Promise<void>;
}> {
  const client = await mqtt.connectAsync(url, {
    protocolVersion: 5,
    reconnectPeriod: 200,
    ...(persistentId === undefined
      ? { clean: true }
      : { clean: false, clientId: persistentId, properties: { sessionExpiryInterval: 600 } }),
  });
  const received: Received[] = [];
  client.on("message", (topic, payload, packet) => {
    const up = packet.properties?.userProperties?.["m2m-id"];
    received.push({ topic, payload: payload.toString("utf8"), id: Array.isArray(up) ? up[0] : up });
  });
  await client.subscribeAsync(filter, { qos: 1 });
  return {
    client,
    received,
    async waitFor(pred, timeoutMs = 30_000) {
      const deadline = Date.now() + timeoutMs;
      while (!pred(received)) {
        if (Date.now() > deadline) throw new Error(`timed out waiting; received ${received.length}`);
        await new Promise((r) => setTimeout(r, 25));
      }
    },
    async close() {
      await client.endAsync(true);
    },
  };
}

/** Polls until `pred()` is true (integration tests wait on observable state, never on fixed sleeps). */
export async function until(
  pred: () => boolean | Promise<boolean>,
  timeoutMs = 30_000,
  what = "condition",
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

// ---------- HTTPS ingest server, token issuer, token source (HTTPS sink tests) ----------

import { readFile } from "node:fs/promises";
import { request as httpRequest, type IncomingMessage, type ServerResponse } from "node:http";
import { createServer as createHttpsServer, type Server as HttpsServer } from "node:https";
import type { AddressInfo } from "node:net";
import { generateKeyPair, type JWTPayload, jwtVerify, SignJWT } from "jose";
import type { Mosquitto, TestCa } from "../../hw/mosquitto.js";
import { callAgent } from "../../src/cli/agent/local-api.js";
import { systemClock } from "../../src/core/clock.js";
import { Secret } from "../../src/core/secret.js";
import { HardwareDpopSigner } from "../../src/credentials/oauth/dpop.js";
import type { AccessToken } from "../../src/credentials/oauth/token-source.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";
import { HttpError, type Route, type RouteResponse } from "../../src/registrar/http/router.js";
import { newMessageId } from "../../src/relay/ids.js";
import type { OutboxMessage } from "../../src/relay/outbox/outbox.js";
import { MqttSink } from "../../src/relay/sinks/mqtt/mqtt-sink.js";
import { MESSAGES_PATH } from "../../src/wire/v1/local-api.js";

/**
 * A client certificate for `deviceId` from the broker's test CA, key in a file; `sink(url)` makes an
 * mTLS MQTT sink with it (50 in flight, 2 s connect timeout) to `url`, the broker's mTLS listener
 * unless told otherwise.
 */
export async function fileKeyDevice(
  broker: Pick<Mosquitto, "ca" | "mtlsUrl">,
  deviceId: string,
): Promise<{ sink(url?: string): MqttSink }> {
  const c = await broker.ca.issueClient(deviceId);
  const keyPem = c.keyPem ?? "";
  return {
    sink: (url = broker.mtlsUrl) =>
      new MqttSink({
        urls: [url],
        caPem: broker.ca.caPem,
        auth: { kind: "mtls-file", certPem: c.certPem, keyPem: new Secret(keyPem) },
        deviceId,
        maxInFlight: 50,
        connectTimeoutMs: 2000,
      }),
  };
}

/** Minimal host for registrar `Route`s on HTTPS (the full registrar needs a store and a fleet CA). */
export async function startRouteHost(
  ca: TestCa,
  routes: readonly Route[],
  pre?: (req: IncomingMessage, res: ServerResponse) => boolean,
): Promise<{ url: string; origin: string; server: HttpsServer; close(): Promise<void> }> {
  const { certPath, keyPath } = await ca.issueServer();
  const server = createHttpsServer(
    { cert: await readFile(certPath), key: await readFile(keyPath) },
    (req, res) => {
      if (pre?.(req, res) === true) return;
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        const url = new URL(req.url ?? "/", "https://127.0.0.1");
        const route = routes.find((r) => r.method === req.method && r.path === url.pathname);
        const send = (r: RouteResponse): void => {
          const body = "json" in r ? JSON.stringify(r.json) : r.body;
          res.writeHead(r.status, {
            "content-type": "json" in r ? "application/json" : r.contentType,
            ...(r.headers ?? {}),
          });
          res.end(body);
        };
        if (route === undefined) return send({ status: 404, json: { error: "not found" } });
        const rawBody = Buffer.concat(chunks);
        route
          .handle({
            req,
            url,
            rawBody,
            contentType: (req.headers["content-type"] ?? "").split(";")[0] ?? "",
            remote: "",
            json: () => JSON.parse(rawBody.toString("utf8")),
            peerCertificateDer: () => undefined,
            auditFields: () => undefined,
          })
          .then(send, (err: unknown) => {
            const status = err instanceof HttpError ? err.status : 500;
            send({ status, json: { error: { code: (err as { code?: string }).code ?? "ERR_INTERNAL" } } });
          });
      });
    },
  );
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  const port = (server.address() as AddressInfo).port;
  return {
    url: `https://127.0.0.1:${port}/v1/ingest`,
    origin: `https://127.0.0.1:${port}`,
    server,
    close: () =>
      new Promise<void>((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}

/** Issues RFC 9068-style access tokens (ES256) and verifies them: the test's authorization server. */
export async function createTokenIssuer(issuer = "https://registrar.test") {
  const { privateKey, publicKey } = await generateKeyPair("ES256");
  return {
    async issue(claims: {
      sub: string;
      scope: string;
      aud: string;
      jkt?: string;
      ttlSec: number;
    }): Promise<string> {
      const now = Math.floor(Date.now() / 1000);
      return new SignJWT({
        scope: claims.scope,
        client_id: claims.sub,
        ...(claims.jkt === undefined ? {} : { cnf: { jkt: claims.jkt } }),
      })
        .setProtectedHeader({ alg: "ES256", typ: "at+jwt" })
        .setIssuer(issuer)
        .setSubject(claims.sub)
        .setAudience(claims.aud)
        .setIssuedAt(now)
        .setExpirationTime(now + claims.ttlSec)
        .setJti(crypto.randomUUID())
        .sign(privateKey);
    },
    async verify(token: string): Promise<JWTPayload> {
      const { payload } = await jwtVerify(token, publicKey, {
        issuer,
        typ: "at+jwt",
        algorithms: ["ES256"],
        requiredClaims: ["exp", "sub"],
      });
      return payload;
    },
  };
}

/** A device's DPoP signer on a software key (FakeKeyProvider + signCompactJws via HardwareDpopSigner). */
export async function createSoftwareDpop(): Promise<{ signer: HardwareDpopSigner; jkt: string }> {
  const provider = new FakeKeyProvider();
  const info = await provider.createOrOpen();
  return { signer: new HardwareDpopSigner(provider, info, systemClock), jkt: info.thumbprint };
}

/** A TokenSource handing out tokens from `mint`, cached until `refreshBeforeMs` before expiry. */
export class TestTokenSource {
  issued = 0;
  invalidations = 0;
  #cached: AccessToken | undefined;
  readonly #mint: () => Promise<{ token: string; expiresAt: Date }>;
  readonly #refreshBeforeMs: number;
  readonly #type: "Bearer" | "DPoP";

  constructor(
    mint: () => Promise<{ token: string; expiresAt: Date }>,
    refreshBeforeMs = 0,
    type: "Bearer" | "DPoP" = "DPoP",
  ) {
    this.#mint = mint;
    this.#refreshBeforeMs = refreshBeforeMs;
    this.#type = type;
  }

  async getToken(): Promise<AccessToken> {
    const c = this.#cached;
    if (c !== undefined && c.expiresAt.getTime() - this.#refreshBeforeMs > Date.now()) return c;
    const { token, expiresAt } = await this.#mint();
    this.issued++;
    this.#cached = { token: new Secret(token), expiresAt, tokenType: this.#type, scope: "telemetry:write" };
    return this.#cached;
  }

  invalidate(): void {
    this.invalidations++;
    this.#cached = undefined;
  }
}

// ---------- local API client ----------

export interface Reply {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  json: { ids?: string[]; error?: { code: string; details?: Record<string, unknown> } } & Record<
    string,
    unknown
  >;
}

export function call(
  socketPath: string,
  method: string,
  path: string,
  body?: string | Buffer,
  contentType = "application/json",
): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = httpRequest(
      {
        socketPath,
        method,
        path,
        headers:
          body === undefined
            ? {}
            : { "content-type": contentType, "content-length": Buffer.byteLength(body) },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on("data", (c: Buffer) => chunks.push(c));
        res.on("end", () => {
          const text = Buffer.concat(chunks).toString("utf8");
          resolve({
            status: res.statusCode ?? 0,
            headers: res.headers,
            json: text === "" ? {} : JSON.parse(text),
          });
        });
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

/** `POST /v1/messages` on the local API socket (the CLI's client); resolves with the status (10 s timeout). */
export async function postMessages(socketPath: string, body: string): Promise<number> {
  const answer = await callAgent({
    socketPath,
    method: "POST",
    path: MESSAGES_PATH,
    body,
    timeoutMs: 10_000,
  });
  return answer.status;
}

// ---------- child processes running TypeScript entry points ----------

export { bundleEntry } from "./child-bundle.js";

/** `n` leased JSON messages `{"n": from + i}` on `channel`, as a sink receives them from the outbox. */
export function jsonOutboxMessages(n: number, channel: string, from = 0): OutboxMessage[] {
  const enc = new TextEncoder();
  return Array.from({ length: n }, (_, i) => ({
    id: newMessageId(),
    seq: from + i + 1,
    channel,
    payload: enc.encode(JSON.stringify({ n: from + i })),
    contentType: "application/json",
    ts: 1_700_000_000_000 + i,
    ingestedAt: 0,
    attempt: 1,
  }));
}

/** A producer of numbered messages running against a daemon's local API. */
export interface NumberedProducer {
  /** Every `n` the daemon answered 200 for (it owes the sink exactly these). */
  readonly accepted: Set<number>;
  /** Keeps producing for `graceMs` more, then resolves when the last batch is answered. */
  stop(graceMs: number): Promise<void>;
}

/**
 * Posts `{ channel, payload: { n } }` with n = 0, 1, 2, … to the local API at `socket`, 50 a batch
 * every 100 ms (≈ 500 msg/s), until `stop()`. A refused or failed batch is simply not accepted.
 */
export function startNumberedProducer(socket: string, channel: string): NumberedProducer {
  const accepted = new Set<number>();
  let seq = 0;
  let stopAt = Number.POSITIVE_INFINITY;
  const loop = (async () => {
    while (Date.now() < stopAt) {
      const batch = Array.from({ length: 50 }, () => seq++);
      const status = await postMessages(
        socket,
        JSON.stringify(batch.map((n) => ({ channel, payload: { n } }))),
      ).catch(() => 0);
      if (status === 200) for (const n of batch) accepted.add(n);
      await new Promise((r) => setTimeout(r, 100));
    }
  })();
  return {
    accepted,
    stop(graceMs) {
      stopAt = Date.now() + graceMs;
      return loop;
    },
  };
}

/**
 * The numbers in `accepted` that have not arrived at `sub` (messages on topics ending `/CHANNEL`, as
 * `startNumberedProducer` posts them). Scans incrementally: re-parsing everything per poll would be
 * quadratic in the message count (~10^4 messages took minutes) and starve the event loop.
 */
export function arrivals(
  sub: { readonly received: readonly Received[] },
  channel: string,
): (accepted: ReadonlySet<number>) => number[] {
  const arrived = new Set<number>();
  let scanned = 0;
  return (accepted) => {
    for (; scanned < sub.received.length; scanned++) {
      const m = sub.received[scanned];
      if (m?.topic.endsWith(`/${channel}`) === true) arrived.add((JSON.parse(m.payload) as { n: number }).n);
    }
    return [...accepted].filter((n) => !arrived.has(n));
  };
}
