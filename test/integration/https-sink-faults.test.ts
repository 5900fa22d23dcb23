import type { IncomingMessage, ServerResponse } from "node:http";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { OutboxMessage } from "../../src/relay/outbox/outbox.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { Relay } from "../../src/relay/relay.js";
import { HttpsSink } from "../../src/relay/sinks/https/https-sink.js";
import { deadLetterReason } from "../../src/relay/sinks/sink.js";
import { INGEST_AUD, type IngestRig, useIngestRig } from "./ingest-rig.js";
import {
  createSoftwareDpop,
  jsonOutboxMessages,
  startRouteHost,
  TestTokenSource,
  until,
} from "./relay-helpers.js";

const enc = new TextEncoder();

const msgs = (n: number, channel = "temp"): OutboxMessage[] => jsonOutboxMessages(n, channel);

describe("HTTPS sink against a local HTTPS ingest server with fault injection", () => {
  let mode:
    | "ok"
    | "500"
    | "429"
    | "429-huge"
    | "slow-body"
    | "reset"
    | "redirect-other"
    | "redirect-same"
    | "big-response" = "ok";
  let faultsLeft = 0;
  let other: Awaited<ReturnType<typeof startRouteHost>>;
  const otherSeen: { authorization: string | undefined }[] = [];
  let lastHeaders: IncomingMessage["headers"] = {};

  const pre = (req: IncomingMessage, res: ServerResponse): boolean => {
    lastHeaders = req.headers;
    if (req.url === "/v1/old" && mode === "redirect-same") {
      res.writeHead(307, { location: "/v1/ingest" }).end();
      return true;
    }
    if (faultsLeft <= 0) return false;
    faultsLeft--;
    switch (mode) {
      case "500":
        res.writeHead(500).end();
        return true;
      case "429":
        res.writeHead(429, { "retry-after": "2" }).end();
        return true;
      case "429-huge":
        res.writeHead(429, { "retry-after": "86400" }).end();
        return true;
      case "slow-body":
        res.writeHead(200, { "content-type": "application/json" });
        res.write("{");
        // Never finishes: the sink's bodyTimeout must fire.
        return true;
      case "reset":
        req.socket.destroy();
        return true;
      case "redirect-other":
        res.writeHead(307, { location: `${other.origin}/v1/ingest` }).end();
        return true;
      case "big-response":
        req.resume();
        req.on("end", () => {
          res.writeHead(200, { "content-type": "application/json" });
          res.end(`{"pad":"${"x".repeat(1024 * 1024)}"}`);
        });
        return true;
      default:
        return false;
    }
  };

  const rig = useIngestRig("m2m-https-sink-", pre);
  beforeAll(async () => {
    other = await startRouteHost(rig().ca, [], (req, res) => {
      otherSeen.push({ authorization: req.headers.authorization });
      res.writeHead(200).end("{}");
      return true;
    });
  });
  afterAll(async () => {
    await other?.close();
  });

  const tokens: IngestRig["tokens"] = (o) => rig().tokens(o);

  const sink = (extra: Partial<ConstructorParameters<typeof HttpsSink>[0]> = {}): HttpsSink =>
    new HttpsSink({
      url: rig().host.url,
      caPem: rig().ca.caPem,
      tokens: tokens(),
      dpop: rig().dpop.signer,
      deviceId: "device-a",
      headersTimeoutMs: 2000,
      bodyTimeoutMs: 500,
      ...extra,
    });

  it("delivers a batch with DPoP, gzip and M2M-Message-Id; the endpoint stores each id once", async () => {
    mode = "ok";
    const s = sink();
    const batch = msgs(20);
    const out = await s.deliver(batch);
    expect(out.every((o) => o.kind === "ok")).toBe(true);
    expect(lastHeaders["content-encoding"]).toBe("gzip");
    expect(lastHeaders.authorization).toMatch(/^DPoP /);
    expect(typeof lastHeaders.dpop).toBe("string");
    expect(lastHeaders["m2m-message-id"]).toBe(batch.map((m) => m.id).join(","));
    for (const m of batch) expect(rig().ingest.store.messages.get(m.id)?.topic).toBe("devices/device-a/temp");
    // A redelivery (at-least-once) is recognised as a duplicate by id.
    const again = await s.deliver(batch);
    expect(again.every((o) => o.kind === "ok")).toBe(true);
    expect(rig().ingest.store.duplicates).toBeGreaterThanOrEqual(20);
    await s.close();
  });

  it("5xx → retry; the relay delivers everything once the server recovers", async () => {
    mode = "500";
    faultsLeft = 3;
    const outbox = SqliteOutbox.open({ path: join(rig().dir, "5xx.db"), sinks: ["https"], ttlCheckMs: 0 });
    const s = sink({ maxBatch: 10 });
    const relay = new Relay({
      outbox,
      sinks: [s],
      retry: { baseMs: 20, factor: 2, capMs: 100, deadlineMs: 1e9, maxAttempts: 1e9, maxRetryAfterMs: 1000 },
    });
    const ids = await outbox.append(
      Array.from({ length: 35 }, (_, i) => ({ channel: "fivexx", payload: enc.encode(String(i)) })),
    );
    relay.start();
    await until(() => outbox.stats().depth === 0, 20_000, "drain");
    await relay.stop();
    for (const id of ids) expect(rig().ingest.store.messages.has(id)).toBe(true);
    expect(relay.counters.https?.retried).toBeGreaterThan(0);
    await s.close();
    await outbox.close();
  });

  it("429 honours Retry-After; a huge Retry-After is capped", async () => {
    mode = "429";
    faultsLeft = 1;
    const s = sink({ maxRetryAfterMs: 60_000 });
    const out = await s.deliver(msgs(2));
    expect(out.map((o) => o.kind === "retry" && o.delayMs)).toEqual([2000, 2000]);
    mode = "429-huge";
    faultsLeft = 1;
    const capped = await s.deliver(msgs(1));
    expect(capped[0]).toMatchObject({ kind: "retry", delayMs: 60_000, code: "ERR_HTTPS_RATE_LIMITED" });
    await s.close();
  });

  it("a slow response body hits bodyTimeout → retry (never hangs)", async () => {
    mode = "slow-body";
    faultsLeft = 1;
    const s = sink();
    const out = await s.deliver(msgs(1));
    expect(out[0]).toMatchObject({ kind: "retry", code: "ERR_HTTPS_NETWORK" });
    await s.close();
  });

  it("a connection reset → retry", async () => {
    mode = "reset";
    faultsLeft = 1;
    const s = sink();
    const out = await s.deliver(msgs(1));
    expect(out[0]).toMatchObject({ kind: "retry", code: "ERR_HTTPS_NETWORK" });
    await s.close();
  });

  it("a redirect to another origin is not followed: that server never sees a request or the token", async () => {
    mode = "redirect-other";
    faultsLeft = 1;
    const s = sink();
    const out = await s.deliver(msgs(1));
    expect(out[0]).toMatchObject({ kind: "retry", code: "ERR_HTTPS_REDIRECT_REFUSED" });
    expect(otherSeen).toEqual([]);
    expect(s.counters.redirectsRefused).toBe(1);
    await s.close();
  });

  it("a same-origin redirect is followed with a proof for the new URL", async () => {
    mode = "redirect-same";
    const s = sink({ url: `${rig().host.origin}/v1/old` });
    const batch = msgs(2);
    const out = await s.deliver(batch);
    expect(out.every((o) => o.kind === "ok")).toBe(true);
    expect(rig().ingest.store.messages.has(batch[0]?.id ?? "")).toBe(true);
    await s.close();
  });

  it("401 → the token is refreshed exactly once and the batch goes through", async () => {
    mode = "ok";
    let first = true;
    const ts = new TestTokenSource(async () => {
      // The first token is for another audience: refused with 401.
      const aud = first ? "https://elsewhere" : INGEST_AUD;
      first = false;
      return {
        token: await rig().issuer.issue({
          sub: "device-a",
          scope: "telemetry:write",
          aud,
          jkt: rig().dpop.jkt,
          ttlSec: 300,
        }),
        expiresAt: new Date(Date.now() + 300_000),
      };
    });
    const s = sink({ tokens: ts });
    const out = await s.deliver(msgs(1));
    expect(out[0]?.kind).toBe("ok");
    expect(ts.invalidations).toBe(1);
    expect(s.counters.refreshes).toBe(1);
    await s.close();
  });

  it("a persistent 401 is retried later, not refreshed in a loop", async () => {
    const ts = new TestTokenSource(async () => ({
      token: await rig().issuer.issue({
        sub: "device-a",
        scope: "telemetry:write",
        aud: "https://elsewhere",
        jkt: rig().dpop.jkt,
        ttlSec: 300,
      }),
      expiresAt: new Date(Date.now() + 300_000),
    }));
    const s = sink({ tokens: ts });
    const out = await s.deliver(msgs(1));
    expect(out[0]).toMatchObject({ kind: "retry", code: "ERR_HTTPS_UNAUTHORIZED" });
    expect(ts.invalidations).toBe(1);
    await s.close();
  });

  it("other 4xx (403 insufficient scope) → dead-letter", async () => {
    const s = sink({ tokens: tokens({ scope: "telemetry:read" }) });
    const out = await s.deliver(msgs(2));
    expect(out.map((o) => o.kind === "dead-letter" && deadLetterReason(o))).toEqual([
      "ERR_HTTPS_REFUSED status=403",
      "ERR_HTTPS_REFUSED status=403",
    ]);
    await s.close();
  });

  it("a message for another device's namespace is rejected by the endpoint and dead-lettered; the rest is stored", async () => {
    const s = sink({ topicTemplate: "devices/{channel}" });
    const mine = msgs(1, "device-a/temp");
    const theirs = msgs(1, "device-b/temp");
    const out = await s.deliver([...mine, ...theirs]);
    expect(out[0]?.kind).toBe("ok");
    expect(out[1]).toMatchObject({ kind: "dead-letter", code: "ERR_INGEST_TOPIC_NOT_OWNED" });
    expect(rig().ingest.store.messages.has(theirs[0]?.id ?? "")).toBe(false);
    await s.close();
  });

  it("a stolen DPoP-bound token without the device's proof key is refused", async () => {
    const thief = await createSoftwareDpop();
    const s = sink({ dpop: thief.signer });
    const out = await s.deliver(msgs(1));
    expect(out[0]).toMatchObject({ kind: "retry", code: "ERR_HTTPS_UNAUTHORIZED" });
    await s.close();
  });

  it("an oversized 2xx response body is cut off and the batch still counts as delivered", async () => {
    mode = "big-response";
    faultsLeft = 1;
    const s = sink({ maxResponseBytes: 1024 });
    const out = await s.deliver(msgs(1));
    expect(out[0]?.kind).toBe("ok");
    await s.close();
  });

  it("time-bounded batching: messages trickling in within lingerMs go out in one POST", async () => {
    mode = "ok";
    const outbox = SqliteOutbox.open({ path: join(rig().dir, "linger.db"), sinks: ["https"], ttlCheckMs: 0 });
    // A generous linger and a batch of exactly 3: the batch leaves as soon as the third arrives.
    const s = sink({ lingerMs: 5000, maxBatch: 3 });
    const relay = new Relay({ outbox, sinks: [s] });
    relay.start();
    const ids: string[] = [];
    for (let i = 0; i < 3; i++) {
      ids.push(...(await outbox.append([{ channel: "linger", payload: enc.encode(String(i)) }])));
    }
    await until(() => outbox.stats().depth === 0, 10_000, "drain");
    expect(s.counters.requests).toBe(1);
    for (const id of ids) expect(rig().ingest.store.messages.has(id)).toBe(true);
    await relay.stop();
    await s.close();
    await outbox.close();
  });

  it("refuses a non-https URL", () => {
    expect(() => sink({ url: "http://127.0.0.1:1/v1/ingest" })).toThrow(
      expect.objectContaining({ code: "ERR_HTTPS_SINK_CONFIG" }),
    );
  });
});
