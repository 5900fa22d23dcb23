import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { Relay } from "../../src/relay/relay.js";
import { MqttSink } from "../../src/relay/sinks/mqtt/mqtt-sink.js";
import { useTempDir } from "../kit/temp-dir.js";
import { jsonOutboxMessages, startSubscriber, TestTokenSource, until } from "./relay-helpers.js";

const enc = new TextEncoder();

describe("MQTT sink with token auth: short-lived tokens renewed make-before-break", () => {
  let broker: Mosquitto;
  const dir = useTempDir("m2m-token-");
  beforeAll(async () => {
    broker = await startMosquitto({ passwordListener: true });
  });
  afterAll(async () => {
    await broker?.cleanup();
  });

  it("several token expiries during a long session: no failed delivery, no loss", async () => {
    // Each token lives 3 s. mosquitto cannot validate JWTs, and on a password-file reload it drops
    // connected clients whose password changed, so the broker holds one device secret and the test
    // token source hands it out with short expiries: every renewal is a new CONNECT with a token
    // fetched from the source shortly before the old one expires.
    const secret = randomBytes(16).toString("hex");
    await broker.setPassword("dev-tok", secret);
    const tokens = new TestTokenSource(
      async () => ({ token: secret, expiresAt: new Date(Date.now() + 3000) }),
      1600,
    );
    const sub = await startSubscriber(broker.plainUrl, "devices/dev-tok/#");
    const outbox = SqliteOutbox.open({ path: join(dir(), "t.db"), sinks: ["mqtt"], ttlCheckMs: 0 });
    const sink = new MqttSink({
      urls: [broker.passwordUrl ?? ""],
      caPem: broker.ca.caPem,
      auth: { kind: "token", username: "dev-tok", tokens },
      deviceId: "dev-tok",
      renewBeforeMs: 1500,
      maxInFlight: 20,
    });
    const relay = new Relay({ outbox, sinks: [sink] });
    relay.start();
    let n = 0;
    const started = Date.now();
    while (Date.now() - started < 8000) {
      await outbox.append(
        Array.from({ length: 10 }, () => ({ channel: "t", payload: enc.encode(JSON.stringify({ n: n++ })) })),
      );
      await new Promise((r) => setTimeout(r, 40));
    }
    await until(() => outbox.stats().depth === 0, 20_000, "drain");
    await sub.waitFor((r) => new Set(r.map((x) => x.id)).size >= n);
    const got = new Set(sub.received.map((r) => (JSON.parse(r.payload) as { n: number }).n));
    expect(got.size).toBe(n);
    expect(sink.counters.renewals).toBeGreaterThanOrEqual(3);
    expect(tokens.issued).toBeGreaterThanOrEqual(4);
    // No gap: not one delivery failed across the switch-overs.
    expect(relay.counters.mqtt?.failures).toBe(0);
    expect(sink.counters.connectFailures).toBe(0);
    await relay.stop();
    await sink.close();
    await outbox.close();
    await sub.close();
  }, 60_000);

  it("a wrong token is refused by the broker (CONNACK) → retry outcome, after one forced refresh", async () => {
    const bad = new TestTokenSource(async () => ({
      token: "not-the-password",
      expiresAt: new Date(Date.now() + 60_000),
    }));
    const sink = new MqttSink({
      urls: [broker.passwordUrl ?? ""],
      caPem: broker.ca.caPem,
      auth: { kind: "token", username: "dev-tok", tokens: bad },
      deviceId: "dev-tok",
    });
    const out = await sink.deliver(jsonOutboxMessages(1, "t"));
    expect(out[0]).toMatchObject({ kind: "retry", code: "ERR_MQTT_AUTH" });
    expect(bad.invalidations).toBe(1);
    await sink.close();
  });
});
