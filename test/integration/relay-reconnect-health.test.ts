import { mkdtemp, rm } from "node:fs/promises";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import type { RetryPolicy } from "../../src/core/retry.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { Relay } from "../../src/relay/relay.js";
import { fileKeyDevice, startSubscriber, until } from "./relay-helpers.js";

const enc = new TextEncoder();
/** A backoff so long that only the probe can explain a prompt drain (jitter pinned near the cap). */
const slow: RetryPolicy = {
  baseMs: 60_000,
  factor: 2,
  capMs: 60_000,
  deadlineMs: 1e12,
  maxAttempts: 1e12,
  maxRetryAfterMs: 60_000,
};

describe("relay: reconnect probe after an outage, and sink health", () => {
  let broker: Mosquitto;
  let dir: string;
  let device: Awaited<ReturnType<typeof fileKeyDevice>>;
  beforeAll(async () => {
    broker = await startMosquitto({ persistence: true });
    dir = await mkdtemp(join(tmpdir(), "m2m-reconnect-"));
    device = await fileKeyDevice(broker, "dev-rc");
  });
  afterAll(async () => {
    await broker?.cleanup();
    await rm(dir, { recursive: true, force: true });
  });

  it("broker down (sink reported unhealthy with the error code) → back → the backlog drains without waiting out a 60 s backoff; health clears", async () => {
    const sub = await startSubscriber(broker.plainUrl, "devices/dev-rc/#", "observer-rc");
    const outbox = SqliteOutbox.open({ path: join(dir, "a.db"), sinks: ["mqtt"], ttlCheckMs: 0 });
    const sink = device.sink(broker.mtlsUrl);
    const relay = new Relay({
      outbox,
      sinks: [sink],
      retry: slow,
      random: () => 0.99,
      probeIntervalMs: 200,
      unhealthyAfterMs: 1000,
    });
    relay.start();
    await outbox.append([{ channel: "a", payload: enc.encode('{"n":0}') }]);
    await until(() => outbox.stats().depth === 0, 15_000, "first delivery");
    expect(relay.unhealthy()).toEqual([]);

    await broker.stop();
    await until(() => !sink.connected, 10_000, "sink notices the outage");
    await outbox.append(
      Array.from({ length: 200 }, (_, i) => ({ channel: "a", payload: enc.encode(`{"n":${i + 1}}`) })),
    );
    // The sink has work and cannot deliver: after the threshold it is reported, with the error code.
    await until(() => relay.unhealthy().length === 1, 20_000, "sink reported unhealthy");
    const trouble = relay.unhealthy()[0];
    expect(trouble?.sink).toBe("mqtt");
    expect(trouble?.code).toMatch(/^ERR_MQTT_/);
    expect(trouble?.forMs).toBeGreaterThanOrEqual(1000);
    // It is in a long backoff now (the delay is ≈ 59 s with this policy and jitter).
    expect(relay.counters.mqtt?.backoffLevel).toBeGreaterThanOrEqual(1);

    await broker.start();
    const back = Date.now();
    await until(() => outbox.stats().depth === 0, 30_000, "backlog drained after the broker returned");
    // Generous bound: the pause would last ≈ 59 s; the probe ended it shortly after the broker returned.
    expect(Date.now() - back).toBeLessThan(30_000);
    expect(relay.counters.mqtt?.probeWakeups).toBeGreaterThanOrEqual(1);
    await sub.waitFor((r) => new Set(r.map((x) => x.id)).size >= 201, 20_000);
    expect(relay.unhealthy()).toEqual([]);
    expect(relay.counters.mqtt?.failingSince).toBeUndefined();
    await relay.stop();
    await sink.close();
    await outbox.close();
    await sub.close();
  }, 90_000);

  it("an upstream that accepts TCP but fails the MQTT connect is not hammered: the probe never shortens that backoff", async () => {
    // Accepts and hangs up at once: reachable, but the TLS/MQTT handshake always fails.
    const rude: Server = createServer((s) => s.destroy());
    await new Promise<void>((r) => rude.listen(0, "127.0.0.1", () => r()));
    const port = (rude.address() as { port: number }).port;
    const outbox = SqliteOutbox.open({ path: join(dir, "b.db"), sinks: ["mqtt"], ttlCheckMs: 0 });
    const sink = device.sink(`mqtts://127.0.0.1:${port}`);
    const relay = new Relay({
      outbox,
      sinks: [sink],
      retry: slow,
      random: () => 0.99,
      probeIntervalMs: 100,
      unhealthyAfterMs: 500,
    });
    relay.start();
    await outbox.append([{ channel: "x", payload: enc.encode("{}") }]);
    await until(() => (relay.counters.mqtt?.failures ?? 0) >= 1, 15_000, "first failure");
    await until(() => relay.unhealthy().length === 1, 10_000, "reported unhealthy");
    // Well past many probe intervals: still the single attempt of the first pass.
    await new Promise((r) => setTimeout(r, 1500));
    expect(sink.counters.connectFailures).toBe(1);
    expect(relay.counters.mqtt?.probeWakeups).toBe(0);
    await relay.stop();
    await sink.close();
    await outbox.close();
    await new Promise<void>((r) => rude.close(() => r()));
  }, 60_000);
});
