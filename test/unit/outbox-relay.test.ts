import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { expandTopic, isValidChannel, validateChannel } from "../../src/relay/channel.js";
import { isMessageId, newMessageId } from "../../src/relay/ids.js";
import type { OutboxMessage } from "../../src/relay/outbox/outbox.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { Relay } from "../../src/relay/relay.js";
import { parseRetryAfter } from "../../src/relay/sinks/https/https-sink.js";
import { classifyPublishError } from "../../src/relay/sinks/mqtt/mqtt-sink.js";
import type { DeliveryOutcome, Sink } from "../../src/relay/sinks/sink.js";
import { useTempDir } from "../kit/temp-dir.js";
import { until } from "../kit/until.js";

/** A sink following a script of outcomes, one entry per deliver call. */
class ScriptedSink implements Sink {
  readonly name = "s";
  readonly maxBatch = 1;
  readonly maxInFlight = 1;
  readonly delivered: string[] = [];
  calls = 0;
  constructor(readonly script: ("ok" | "retry" | "dead")[]) {}
  async deliver(batch: readonly OutboxMessage[]): Promise<DeliveryOutcome[]> {
    const k = this.script[this.calls++] ?? "ok";
    return batch.map((m): DeliveryOutcome => {
      if (k === "ok") {
        this.delivered.push(Buffer.from(m.payload).toString());
        return { id: m.id, kind: "ok" };
      }
      if (k === "dead")
        return { id: m.id, kind: "dead-letter", code: "ERR_MQTT_NOT_AUTHORIZED", detail: "test" };
      return { id: m.id, kind: "retry", code: "ERR_MQTT_CONNECTION_LOST" };
    });
  }
  async close(): Promise<void> {}
}

describe("Relay backoff", () => {
  const dir = useTempDir("m2m-relay-unit-");

  it("a flap (one success between failures) does not reset the backoff; sustained success does; order is kept", async () => {
    const clock = new ManualClock();
    const outbox = SqliteOutbox.open({ path: join(dir(), "flap.db"), sinks: ["s"], ttlCheckMs: 0, clock });
    const sink = new ScriptedSink(["retry", "retry", "retry", "ok", "retry", "ok"]);
    const relay = new Relay({
      outbox,
      sinks: [sink],
      clock,
      random: () => 0.5,
      retry: { baseMs: 100, factor: 2, capMs: 10_000, deadlineMs: 0, maxAttempts: 0, maxRetryAfterMs: 1000 },
      stableAfterMs: 5000,
    });
    const enc = new TextEncoder();
    await outbox.append(["1", "2", "3", "4"].map((p) => ({ channel: "c", payload: enc.encode(p) })));
    relay.start();
    const levels: number[] = [];
    for (let call = 1; call <= 5; call++) {
      // Move time in small steps so that exactly one more delivery happens.
      for (let i = 0; i < 1000 && sink.calls < call; i++) {
        await clock.advance(10);
        await new Promise((r) => setTimeout(r, 1));
      }
      await until(() => sink.calls >= call, `call ${call}`);
      // Let the outcome be recorded before reading the level.
      await until(() => (relay.counters.s?.inFlight ?? 1) === 0, "settled");
      levels.push(relay.counters.s?.backoffLevel ?? -1);
    }
    // 3 failures → level 3; the success (call 4) is followed at once by the next message failing
    // (call 5): level 4. Had the success reset the backoff, it would read 1.
    expect(levels).toEqual([1, 2, 3, 4, 4]);
    expect(sink.calls).toBe(5);
    // Sustained success (> stableAfterMs since the last failure) resets the level.
    for (let i = 0; i < 1000 && sink.delivered.length < 4; i++) {
      await clock.advance(50);
      await new Promise((r) => setTimeout(r, 1));
    }
    await until(() => sink.delivered.length >= 4, "all delivered");
    // Successes right after the last failure keep the level; one after a stable period resets it.
    expect(relay.counters.s?.backoffLevel).toBe(4);
    await clock.advance(6000);
    await outbox.append([{ channel: "c", payload: enc.encode("5") }]);
    await until(() => sink.delivered.length >= 5, "fifth delivered");
    await until(() => (relay.counters.s?.backoffLevel ?? -1) === 0, "reset after stable period");
    expect(sink.delivered).toEqual(["1", "2", "3", "4", "5"]);
    await relay.stop();
    await outbox.close();
  });

  it("a dead-lettered message leaves the queue and the next one flows", async () => {
    const outbox = SqliteOutbox.open({ path: join(dir(), "dead.db"), sinks: ["s"], ttlCheckMs: 0 });
    const sink = new ScriptedSink(["dead", "ok"]);
    const relay = new Relay({ outbox, sinks: [sink] });
    const enc = new TextEncoder();
    await outbox.append([
      { channel: "c", payload: enc.encode("a") },
      { channel: "c", payload: enc.encode("b") },
    ]);
    relay.start();
    await until(() => outbox.stats().depth === 0, "drained");
    expect(sink.delivered).toEqual(["b"]);
    expect((await outbox.deadLetters()).map((d) => d.reason)).toEqual(["ERR_MQTT_NOT_AUTHORIZED test"]);
    await relay.stop();
    await outbox.close();
  });
});

describe("classification and small parts", () => {
  it.each([
    [0x87, "dead-letter", "ERR_MQTT_NOT_AUTHORIZED"],
    [0x90, "dead-letter", "ERR_MQTT_TOPIC_NAME_INVALID"],
    [0x95, "dead-letter", "ERR_MQTT_PACKET_TOO_LARGE"],
    [0x99, "dead-letter", "ERR_MQTT_PAYLOAD_FORMAT_INVALID"],
    [0x97, "retry", "ERR_MQTT_QUOTA_EXCEEDED"],
    [0x89, "retry", "ERR_MQTT_SERVER_BUSY"],
    [0x96, "retry", "ERR_MQTT_RATE_TOO_HIGH"],
    [0x80, "retry", "ERR_MQTT_PUBACK_REFUSED"],
  ])("PUBACK reason 0x%s → %s %s (catalogue code; the reason code only in the detail)", (code, kind, ec) => {
    const o = classifyPublishError("id", Object.assign(new Error("x"), { code }));
    expect(o).toMatchObject({ kind, code: ec });
    if (o.kind === "dead-letter") expect(o.detail).toBe(`reasonCode=0x${code.toString(16)}`);
  });

  it("a connection error (no reason code) → retry", () => {
    expect(classifyPublishError("id", new Error("connection closed"))).toEqual({
      id: "id",
      kind: "retry",
      code: "ERR_MQTT_CONNECTION_LOST",
    });
  });

  it("Retry-After: seconds, HTTP date, garbage", () => {
    const now = new Date("2026-01-01T00:00:00Z");
    expect(parseRetryAfter("7", now)).toBe(7000);
    expect(parseRetryAfter("Thu, 01 Jan 2026 00:00:30 GMT", now)).toBe(30_000);
    expect(parseRetryAfter("soon", now)).toBeUndefined();
    expect(parseRetryAfter(undefined, now)).toBeUndefined();
  });

  it("channels: wildcards, empty levels, leading/trailing slash and length are refused", () => {
    for (const ok of ["a", "a/b", "sensors/temp-1", "x_y/z"]) expect(isValidChannel(ok)).toBe(true);
    for (const bad of ["", "/a", "a/", "a//b", "a/+", "#", "a b", "ä", "x".repeat(129)]) {
      expect(isValidChannel(bad)).toBe(false);
      expect(() => validateChannel(bad)).toThrow(expect.objectContaining({ code: "ERR_CHANNEL_INVALID" }));
    }
    expect(expandTopic("devices/{deviceId}/{channel}", { deviceId: "d", channel: "c" })).toBe("devices/d/c");
    expect(() => expandTopic("{nope}", {})).toThrow(expect.objectContaining({ code: "ERR_TOPIC_TEMPLATE" }));
  });

  it("message ids are UUIDv7, unique and strictly increasing within a millisecond", () => {
    const ids = Array.from({ length: 5000 }, () => newMessageId(1_700_000_000_000));
    expect(new Set(ids).size).toBe(5000);
    expect([...ids].sort()).toEqual(ids);
    for (const id of ids.slice(0, 10)) {
      expect(isMessageId(id)).toBe(true);
      expect(id[14]).toBe("7");
    }
  });
});
