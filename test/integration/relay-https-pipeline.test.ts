import type { IncomingMessage, ServerResponse } from "node:http";
import { type AddressInfo, createServer } from "node:net";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { newMessageId } from "../../src/relay/ids.js";
import type { OutboxMessage } from "../../src/relay/outbox/outbox.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { Relay } from "../../src/relay/relay.js";
import { HttpsSink } from "../../src/relay/sinks/https/https-sink.js";
import { useIngestRig } from "./ingest-rig.js";
import { jsonOutboxMessages, TestTokenSource, until } from "./relay-helpers.js";

const enc = new TextEncoder();

const msgs = (n: number, from: number): OutboxMessage[] => jsonOutboxMessages(n, "p", from);

describe("HTTPS sink pipelining (next batch encoded during the POST; POSTs in order)", () => {
  let failNext = 0;
  let posts = 0;

  const rig = useIngestRig("m2m-https-pipe-", (_req: IncomingMessage, res: ServerResponse) => {
    posts++;
    if (failNext <= 0) return false;
    failNext--;
    res.writeHead(500).end();
    return true;
  });

  const sink = (): HttpsSink =>
    new HttpsSink({
      url: rig().host.url,
      caPem: rig().ca.caPem,
      tokens: rig().tokens(),
      dpop: rig().dpop.signer,
      deviceId: "device-a",
      maxBatch: 10,
    });

  it("two batches handed over at once: when the first fails, the second comes back untried (never overtakes it)", async () => {
    const s = sink();
    expect(s.maxInFlight).toBe(20);
    failNext = 1;
    posts = 0;
    const a = msgs(10, 1);
    const b = msgs(10, 11);
    const [ra, rb] = await Promise.all([s.deliver(a), s.deliver(b)]);
    // 500 (or a reset, if the server hangs up before undici reads the status): a retry either way.
    expect(ra.map((o) => o.kind)).toEqual(Array(10).fill("retry"));
    expect(rb.every((o) => o.kind === "retry" && o.code === "ERR_HTTPS_PREDECESSOR_FAILED")).toBe(true);
    expect(posts).toBe(1);
    for (const m of b) expect(rig().ingest.store.messages.has(m.id)).toBe(false);
    // Batches handed over after the failure flow normally, still one POST at a time, in order.
    const [ra2, rb2] = await Promise.all([s.deliver(a), s.deliver(b)]);
    expect([...ra2, ...rb2].every((o) => o.kind === "ok")).toBe(true);
    const order = [...rig().ingest.store.messages.keys()];
    expect(order.indexOf(a[9]?.id ?? "")).toBeLessThan(order.indexOf(b[0]?.id ?? ""));
    await s.close();
  });

  it("regression: POSTs go in call order even when a later, smaller batch finishes encoding first", async () => {
    const s = sink();
    failNext = 1;
    posts = 0;
    // A is slow to gzip (big, incompressible-ish payloads), B is tiny: B's encoding finishes first.
    const a = msgs(300, 1000).map((m, i) => ({
      ...m,
      payload: enc.encode(
        JSON.stringify({ n: i, r: Buffer.from(newMessageId().repeat(40)).toString("base64") }),
      ),
    }));
    const b = msgs(1, 2000);
    const [ra, rb] = await Promise.all([s.deliver(a), s.deliver(b)]);
    // A went first and failed; B was handed back untried instead of overtaking it.
    expect(ra.map((o) => o.kind)).toEqual(Array(300).fill("retry"));
    expect(rb[0]).toMatchObject({ kind: "retry", code: "ERR_HTTPS_PREDECESSOR_FAILED" });
    expect(posts).toBe(1);
    await s.close();
  });

  it("probe: true while the ingest host accepts TCP, false for a closed port (no request sent)", async () => {
    const s = sink();
    posts = 0;
    expect(await s.probe()).toBe(true);
    expect(posts).toBe(0);
    // A port that was open a moment ago and is closed now.
    const spare = createServer();
    await new Promise<void>((r) => spare.listen(0, "127.0.0.1", () => r()));
    const port = (spare.address() as AddressInfo).port;
    await new Promise<void>((r) => spare.close(() => r()));
    const closed = new HttpsSink({
      url: `https://127.0.0.1:${port}/v1/ingest`,
      caPem: rig().ca.caPem,
      tokens: new TestTokenSource(async () => {
        throw new Error("never asked");
      }),
      deviceId: "device-a",
    });
    expect(await closed.probe()).toBe(false);
    await closed.close();
    await s.close();
  });

  it("through the relay with 5xx faults: everything arrives, first arrivals in append order", async () => {
    const outbox = SqliteOutbox.open({ path: join(rig().dir, "pipe.db"), sinks: ["https"], ttlCheckMs: 0 });
    const s = sink();
    const relay = new Relay({
      outbox,
      sinks: [s],
      retry: { baseMs: 20, factor: 2, capMs: 100, deadlineMs: 1e9, maxAttempts: 1e9, maxRetryAfterMs: 1000 },
    });
    const ids = await outbox.append(
      Array.from({ length: 95 }, (_, i) => ({ channel: "p", payload: enc.encode(String(i)) })),
    );
    failNext = 3;
    relay.start();
    await until(() => outbox.stats().depth === 0, 20_000, "drain");
    await relay.stop();
    const seen = [...rig().ingest.store.messages.keys()].filter((id) => ids.includes(id));
    expect(seen).toEqual(ids);
    expect(relay.counters.https?.retried).toBeGreaterThan(0);
    await s.close();
    await outbox.close();
  });
});
