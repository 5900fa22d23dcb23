import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import type { RetryPolicy } from "../../src/core/retry.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { Relay } from "../../src/relay/relay.js";
import { fileKeyDevice, type Received, startSubscriber, until } from "./relay-helpers.js";

const enc = new TextEncoder();
const fast: RetryPolicy = {
  baseMs: 50,
  factor: 2,
  capMs: 400,
  deadlineMs: 1e12,
  maxAttempts: 1e12,
  maxRetryAfterMs: 2000,
};

/** Per channel, the sequence of `n` in order of first arrival (duplicates after a reconnect dropped). */
function firstArrivals(received: readonly Received[]): Map<string, number[]> {
  const seen = new Set<string>();
  const out = new Map<string, number[]>();
  for (const r of received) {
    if (r.id === undefined || seen.has(r.id)) continue;
    seen.add(r.id);
    const list = out.get(r.topic) ?? [];
    list.push((JSON.parse(r.payload) as { n: number }).n);
    out.set(r.topic, list);
  }
  return out;
}

describe("relay through a broker outage (mosquitto stopped and restarted)", () => {
  let broker: Mosquitto;
  let dir: string;
  let device: Awaited<ReturnType<typeof fileKeyDevice>>;
  beforeAll(async () => {
    broker = await startMosquitto({ persistence: true });
    dir = await mkdtemp(join(tmpdir(), "m2m-outage-"));
    device = await fileKeyDevice(broker, "dev-out");
  });
  afterAll(async () => {
    await broker?.cleanup();
    await rm(dir, { recursive: true, force: true });
  });

  /** An outbox for the MQTT sink in the test dir, holding at most `maxCount` messages (no TTL sweeps). */
  const openOutbox = (file: string, maxCount: number) =>
    SqliteOutbox.open({ path: join(dir, file), sinks: ["mqtt"], ttlCheckMs: 0, limits: { maxCount } });

  it("backlog builds within limits while the broker is down, then drains completely, in order per channel", async () => {
    const sub = await startSubscriber(broker.plainUrl, "devices/dev-out/#", "observer-outage");
    const outbox = openOutbox("a.db", 10_000);
    const sink = device.sink();
    const relay = new Relay({ outbox, sinks: [sink], retry: fast, stableAfterMs: 60_000 });
    relay.start();
    const channels = ["a", "b", "c"];
    let n = 0;
    const appendSome = async (count: number): Promise<void> => {
      for (let i = 0; i < count; i += 50) {
        await outbox.append(
          Array.from({ length: 50 }, () => {
            const k = n++;
            return { channel: channels[k % 3] as string, payload: enc.encode(JSON.stringify({ n: k })) };
          }),
        );
      }
    };
    await appendSome(150);
    await until(() => outbox.stats().depth === 0, 15_000, "first drain");

    await broker.stop();
    await until(() => !sink.connected, 10_000, "sink notices the outage");
    await appendSome(3000);
    // The relay keeps trying (with backoff) and the backlog stays within limits, nothing dropped.
    await until(() => (relay.counters.mqtt?.failures ?? 0) >= 2, 15_000, "retries during the outage");
    expect(outbox.stats().depth).toBe(3000);
    expect(outbox.stats().drops).toEqual({ max_bytes: 0, max_count: 0, ttl: 0, refused: 0 });

    await broker.start();
    await until(() => outbox.stats().depth === 0, 60_000, "backlog drained");
    await sub.waitFor((r) => new Set(r.map((x) => x.id)).size >= 3150, 30_000);
    const arrivals = firstArrivals(sub.received);
    for (const [topic, list] of arrivals) {
      const sorted = [...list].sort((a, b) => a - b);
      expect(list, `order on ${topic}`).toEqual(sorted);
      expect(list.length).toBe(1050);
    }
    await relay.stop();
    await sink.close();
    await outbox.close();
    await sub.close();
  }, 120_000);

  it("count limit reached during an outage: oldest dropped and counted; the newest drain when the broker is back", async () => {
    const sub = await startSubscriber(broker.plainUrl, "devices/dev-out/lim", "observer-limit");
    const outbox = openOutbox("b.db", 100);
    await broker.stop();
    const sink = device.sink();
    const relay = new Relay({ outbox, sinks: [sink], retry: fast });
    relay.start();
    for (let i = 0; i < 150; i += 10) {
      await outbox.append(
        Array.from({ length: 10 }, (_, j) => ({
          channel: "lim",
          payload: enc.encode(JSON.stringify({ n: i + j })),
        })),
      );
    }
    expect(outbox.stats().depth).toBe(100);
    expect(outbox.stats().drops.max_count).toBe(50);
    await broker.start();
    await until(() => outbox.stats().depth === 0, 30_000, "drain after limit");
    await sub.waitFor((r) => new Set(r.map((x) => x.id)).size >= 100);
    const got = [...new Set(sub.received.map((r) => (JSON.parse(r.payload) as { n: number }).n))].sort(
      (a, b) => a - b,
    );
    expect(got).toEqual(Array.from({ length: 100 }, (_, i) => i + 50));
    await relay.stop();
    await sink.close();
    await outbox.close();
    await sub.close();
  }, 60_000);
});
