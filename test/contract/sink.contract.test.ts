import { rm } from "node:fs/promises";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createTestCa, freePort, type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { Secret } from "../../src/core/secret.js";
import { ingestRoutes } from "../../src/registrar/ingest/routes.js";
import { newMessageId } from "../../src/relay/ids.js";
import type { OutboxMessage } from "../../src/relay/outbox/outbox.js";
import { HttpsSink } from "../../src/relay/sinks/https/https-sink.js";
import { MqttSink } from "../../src/relay/sinks/mqtt/mqtt-sink.js";
import type { Sink } from "../../src/relay/sinks/sink.js";
import {
  createSoftwareDpop,
  createTokenIssuer,
  startRouteHost,
  startSubscriber,
  TestTokenSource,
  until,
} from "../integration/relay-helpers.js";

/** One real upstream per Sink implementation; the suite below runs unchanged against each. */
interface SinkTarget {
  /** A sink for device "dev-c"; with `channelIsTopic` the channel names the device (to provoke refusals). */
  sink(opts?: { channelIsTopic?: boolean }): Sink;
  /** A sink pointed at a port nobody listens on. */
  unreachable(): Promise<Sink>;
  /** Message ids the upstream has received so far. */
  received(): Set<string>;
  cleanup(): Promise<void>;
}

interface SinkFactory {
  readonly name: string;
  setup(): Promise<SinkTarget>;
}

const enc = new TextEncoder();
function msgs(channels: readonly string[]): OutboxMessage[] {
  return channels.map((channel, i) => ({
    id: newMessageId(),
    seq: i + 1,
    channel,
    payload: enc.encode(JSON.stringify({ i })),
    contentType: "application/json",
    ts: 1_700_000_000_000 + i,
    ingestedAt: 0,
    attempt: 1,
  }));
}

const factories: SinkFactory[] = [
  {
    name: "MqttSink (mosquitto, mTLS + ACL)",
    async setup() {
      const broker: Mosquitto = await startMosquitto();
      const { certPem, keyPem } = await broker.ca.issueClient("dev-c");
      const sub = await startSubscriber(broker.plainUrl, "devices/#");
      const make = (url: string, channelIsTopic = false): MqttSink =>
        new MqttSink({
          urls: [url],
          caPem: broker.ca.caPem,
          auth: { kind: "mtls-file", certPem, keyPem: new Secret(keyPem ?? "") },
          deviceId: "dev-c",
          connectTimeoutMs: 2000,
          ...(channelIsTopic ? { topicTemplate: "devices/{channel}" } : {}),
        });
      return {
        sink: (o) => make(broker.mtlsUrl, o?.channelIsTopic),
        unreachable: async () => make(`mqtts://127.0.0.1:${await freePort()}`),
        received: () => new Set(sub.received.map((r) => r.id ?? "")),
        async cleanup() {
          await sub.close();
          await broker.cleanup();
        },
      };
    },
  },
  {
    name: "HttpsSink (reference ingest endpoint, DPoP)",
    async setup() {
      const ca = await createTestCa();
      const issuer = await createTokenIssuer();
      const dpop = await createSoftwareDpop();
      let publicUrl = "";
      const ingest = ingestRoutes({
        verifyAccessToken: (t) => issuer.verify(t),
        audience: "https://c",
        publicUrl: () => publicUrl,
      });
      const host = await startRouteHost(ca, ingest.routes);
      publicUrl = host.url;
      const tokens = new TestTokenSource(async () => ({
        token: await issuer.issue({
          sub: "dev-c",
          scope: "telemetry:write",
          aud: "https://c",
          jkt: dpop.jkt,
          ttlSec: 300,
        }),
        expiresAt: new Date(Date.now() + 300_000),
      }));
      const make = (url: string, channelIsTopic = false): HttpsSink =>
        new HttpsSink({
          url,
          caPem: ca.caPem,
          tokens,
          dpop: dpop.signer,
          deviceId: "dev-c",
          headersTimeoutMs: 2000,
          ...(channelIsTopic ? { topicTemplate: "devices/{channel}" } : {}),
        });
      return {
        sink: (o) => make(host.url, o?.channelIsTopic),
        unreachable: async () => make(`https://127.0.0.1:${await freePort()}/v1/ingest`),
        received: () => new Set(ingest.store.messages.keys()),
        async cleanup() {
          await host.close();
          await rm(ca.dir, { recursive: true, force: true });
        },
      };
    },
  },
];

for (const f of factories) {
  describe(`Sink contract: ${f.name}`, () => {
    let t: SinkTarget;
    beforeAll(async () => {
      t = await f.setup();
    });
    afterAll(async () => {
      await t?.cleanup();
    });

    it("delivers a batch: one `ok` per message, in order, and the upstream sees every stable id", async () => {
      const s = t.sink();
      const batch = msgs(["x", "y", "x", "z"]);
      const out = await s.deliver(batch);
      expect(out).toEqual(batch.map((m) => ({ id: m.id, kind: "ok" })));
      await until(() => batch.every((m) => t.received().has(m.id)), 10_000, "upstream received all");
      await s.close();
    });

    it("an empty batch yields no outcomes", async () => {
      const s = t.sink();
      expect(await s.deliver([])).toEqual([]);
      await s.close();
    });

    it("a message outside the device's namespace is dead-lettered; the rest of the batch is delivered", async () => {
      const s = t.sink({ channelIsTopic: true });
      const batch = msgs(["dev-c/ok", "other-device/nope", "dev-c/ok2"]);
      const out = await s.deliver(batch);
      expect(out.map((o) => o.kind)).toEqual(["ok", "dead-letter", "ok"]);
      expect(out.map((o) => o.id)).toEqual(batch.map((m) => m.id));
      await until(() => t.received().has(batch[2]?.id ?? ""), 10_000, "rest delivered");
      expect(t.received().has(batch[1]?.id ?? "")).toBe(false);
      await s.close();
    });

    it("an unreachable upstream yields `retry` outcomes (never a rejection, never `ok`)", async () => {
      const s = await t.unreachable();
      const batch = msgs(["x", "y"]);
      const out = await s.deliver(batch);
      expect(out.map((o) => [o.id, o.kind])).toEqual(batch.map((m) => [m.id, "retry"]));
      await s.close();
    });

    it("redelivering the same ids is accepted (at-least-once; receivers deduplicate by id)", async () => {
      const s = t.sink();
      const batch = msgs(["dup"]);
      expect((await s.deliver(batch))[0]?.kind).toBe("ok");
      expect((await s.deliver(batch))[0]?.kind).toBe("ok");
      await s.close();
    });
  });
}
