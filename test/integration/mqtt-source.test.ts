import { join } from "node:path";
import mqtt from "mqtt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { MqttSource } from "../../src/relay/sources/mqtt/mqtt-source.js";
import { useTempDir } from "../kit/temp-dir.js";
import { until } from "./relay-helpers.js";

describe("MQTT source: local broker → outbox, PUBACK only after durable", () => {
  let broker: Mosquitto;
  const dir = useTempDir("m2m-source-");
  beforeAll(async () => {
    broker = await startMosquitto();
  });
  afterAll(async () => {
    await broker?.cleanup();
  });

  it("relays QoS 1 publishes into the outbox with the topic as channel; the publisher's PUBACK follows storage", async () => {
    const outbox = SqliteOutbox.open({ path: join(dir(), "s.db"), sinks: ["mqtt"], ttlCheckMs: 0 });
    const source = new MqttSource({
      url: broker.plainUrl,
      topics: ["sensors/#"],
      outbox,
      stripPrefix: "sensors/",
      clientId: "src-1",
    });
    await source.start();
    const pub = await mqtt.connectAsync(broker.plainUrl, { protocolVersion: 5 });
    for (let i = 0; i < 30; i++) {
      await pub.publishAsync("sensors/temp", JSON.stringify({ i }), {
        qos: 1,
        properties: { contentType: "application/json" },
      });
    }
    await until(() => outbox.stats().depth === 30, 10_000, "30 stored");
    const leased = await outbox.lease("mqtt", 100);
    expect(leased.map((m) => m.channel)).toEqual(Array(30).fill("temp"));
    expect(leased.map((m) => JSON.parse(Buffer.from(m.payload).toString()).i)).toEqual(
      Array.from({ length: 30 }, (_, i) => i),
    );
    expect(leased[0]?.contentType).toBe("application/json");
    expect(source.counters.accepted).toBe(30);
    await pub.endAsync();
    await source.stop();
    await outbox.close();
  });

  it("a topic that cannot be a channel is refused (counted), others flow", async () => {
    const outbox = SqliteOutbox.open({ path: join(dir(), "s2.db"), sinks: ["mqtt"], ttlCheckMs: 0 });
    const source = new MqttSource({ url: broker.plainUrl, topics: ["raw/#"], outbox, clientId: "src-2" });
    await source.start();
    const pub = await mqtt.connectAsync(broker.plainUrl, { protocolVersion: 5 });
    await pub.publishAsync("raw/bad topic", "1", { qos: 1 });
    await pub.publishAsync("raw/good", "2", { qos: 1 });
    await until(
      () => outbox.stats().depth === 1 && source.counters.invalidTopic === 1,
      10_000,
      "one stored, one refused",
    );
    expect((await outbox.lease("mqtt", 10))[0]?.channel).toBe("raw/good");
    await pub.endAsync();
    await source.stop();
    await outbox.close();
  });
});
