import { rm } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { Secret } from "../../src/core/secret.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { Relay } from "../../src/relay/relay.js";
import { MqttSink } from "../../src/relay/sinks/mqtt/mqtt-sink.js";
import { useTempDir } from "../kit/temp-dir.js";
import { jsonOutboxMessages, startSubscriber, until } from "./relay-helpers.js";

const enc = new TextEncoder();

describe("MQTT sink against mosquitto (mTLS, use_identity_as_username, ACL devices/%u/#)", () => {
  let broker: Mosquitto;
  const dir = useTempDir("m2m-mqtt-acl-");
  beforeAll(async () => {
    broker = await startMosquitto();
  });
  afterAll(async () => {
    await broker?.cleanup();
  });

  it("device A delivers to its own topics; a publish to device B's topic is refused (0x87), dead-lettered, and the stream continues", async () => {
    const { certPem, keyPem } = await broker.ca.issueClient("device-a");
    const sub = await startSubscriber(broker.plainUrl);
    const outbox = SqliteOutbox.open({ path: join(dir(), "acl.db"), sinks: ["mqtt"], ttlCheckMs: 0 });
    // Test-only template: the channel names the device, so one stream can address A's and B's topics.
    const sink = new MqttSink({
      urls: [broker.mtlsUrl],
      caPem: broker.ca.caPem,
      auth: { kind: "mtls-file", certPem, keyPem: new Secret(keyPem ?? "") },
      deviceId: "device-a",
      topicTemplate: "devices/{channel}",
      maxInFlight: 8,
    });
    const relay = new Relay({ outbox, sinks: [sink] });
    relay.start();
    const ids = await outbox.append([
      { channel: "device-a/temp", payload: enc.encode("1") },
      { channel: "device-b/temp", payload: enc.encode("2") },
      { channel: "device-a/temp", payload: enc.encode("3") },
      { channel: "device-a/hum", payload: enc.encode("4") },
    ]);
    await sub.waitFor((r) => r.length >= 3);
    await until(() => outbox.stats().depth === 0, 15_000, "outbox drained");
    await relay.stop();

    expect(sub.received.map((r) => [r.topic, r.payload, r.id])).toEqual([
      ["devices/device-a/temp", "1", ids[0]],
      ["devices/device-a/temp", "3", ids[2]],
      ["devices/device-a/hum", "4", ids[3]],
    ]);
    const dl = await outbox.deadLetters();
    expect(dl.map((d) => [d.id, d.reason])).toEqual([[ids[1], "ERR_MQTT_NOT_AUTHORIZED reasonCode=0x87"]]);
    expect(relay.counters.mqtt?.deadLettered).toBe(1);
    await sink.close();
    await outbox.close();
    await sub.close();
  });

  it("refuses to connect to a broker whose certificate does not chain to the configured CA", async () => {
    const other = await import("../../hw/mosquitto.js").then((m) => m.createTestCa());
    const { certPem, keyPem } = await broker.ca.issueClient("device-a");
    const sink = new MqttSink({
      urls: [broker.mtlsUrl],
      caPem: other.caPem,
      auth: { kind: "mtls-file", certPem, keyPem: new Secret(keyPem ?? "") },
      deviceId: "device-a",
      connectTimeoutMs: 3000,
    });
    const msgs = jsonOutboxMessages(1, "t");
    const out = await sink.deliver(msgs);
    // Said as what it is (the broker certificate is not trusted), not as "cannot connect".
    expect(out).toEqual([{ id: msgs[0]?.id, kind: "retry", code: "ERR_TLS_VERIFY" }]);
    expect(sink.connected).toBe(false);
    await sink.close();
    await rm(other.dir, { recursive: true, force: true });
  });

  it("rejects plain mqtt:// URLs at construction", () => {
    expect(
      () =>
        new MqttSink({
          urls: ["mqtt://127.0.0.1:1883"],
          caPem: "",
          auth: { kind: "mtls-file", certPem: "", keyPem: new Secret("") },
          deviceId: "d",
        }),
    ).toThrow(expect.objectContaining({ code: "ERR_MQTT_CONFIG" }));
  });
});

describe("MQTT sink failover across broker URLs", () => {
  it("skips a dead broker URL, delivers through the next, and prefers the good one afterwards", async () => {
    const broker = await startMosquitto({ persistence: true });
    try {
      const { freePort } = await import("../../hw/mosquitto.js");
      const dead = `mqtts://127.0.0.1:${await freePort()}`;
      const { certPem, keyPem } = await broker.ca.issueClient("dev-fo");
      const sub = await startSubscriber(broker.plainUrl, "devices/dev-fo/#", "fo-observer");
      const sink = new MqttSink({
        urls: [dead, broker.mtlsUrl],
        caPem: broker.ca.caPem,
        auth: { kind: "mtls-file", certPem, keyPem: new Secret(keyPem ?? "") },
        deviceId: "dev-fo",
        connectTimeoutMs: 2000,
      });
      const m = (id: string) => ({
        id,
        seq: 1,
        channel: "fo",
        payload: enc.encode("1"),
        contentType: "application/json",
        ts: 0,
        ingestedAt: 0,
        attempt: 1,
      });
      expect((await sink.deliver([m("00000000-0000-7000-8000-000000000001")]))[0]?.kind).toBe("ok");
      expect(sink.counters.connectFailures).toBe(1);
      // A broker restart: the sink reconnects to the URL that worked last, without trying the dead one first.
      await broker.stop();
      await until(() => !sink.connected, 10_000, "disconnect noticed");
      await broker.start();
      expect((await sink.deliver([m("00000000-0000-7000-8000-000000000002")]))[0]?.kind).toBe("ok");
      expect(sink.counters.connectFailures).toBe(1);
      await sub.waitFor((r) => r.length >= 2);
      await sink.close();
      await sub.close();
    } finally {
      await broker.cleanup();
    }
  });
});
