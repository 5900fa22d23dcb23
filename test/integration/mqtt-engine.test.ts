import { createPublicKey } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { execa } from "execa";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { isM2mError } from "../../src/core/errors.js";
import { engineTlsClient } from "../../src/keys/pkcs11/engine-tls.js";
import { newMessageId } from "../../src/relay/ids.js";
import { MqttSink } from "../../src/relay/sinks/mqtt/mqtt-sink.js";
import { startSubscriber } from "./relay-helpers.js";

const enc = new TextEncoder();

/**
 * mTLS to mosquitto with the device key INSIDE a SoftHSM token, used through Node's OpenSSL and the
 * pkcs11 engine (src/keys/pkcs11/engine-tls.ts). The key never leaves the token; the test CA
 * certifies the token's public key.
 */
describe("MQTT sink: mTLS with the device key in a PKCS#11 token (OpenSSL engine)", () => {
  let broker: Mosquitto;
  let hsm: SoftHsmHandle;
  let certPem: string;

  /** A sink on the mTLS listener with the token's "device" key through the engine. */
  const engineSink = (pinFile = hsm.pinFile): MqttSink =>
    new MqttSink({
      urls: [broker.mtlsUrl],
      caPem: broker.ca.caPem,
      auth: {
        kind: "mtls-key",
        identity: async () => ({
          certPem,
          keyId: "device",
          key: engineTlsClient({
            modulePath: hsm.modulePath,
            tokenLabel: hsm.tokenLabel,
            keyLabel: "device",
            pinFile,
          }),
        }),
      },
      deviceId: "dev-hsm",
    });
  const message = (seq: number, json: string) => ({
    id: newMessageId(),
    seq,
    channel: "engine",
    payload: enc.encode(json),
    contentType: "application/json",
    ts: 0,
    ingestedAt: 0,
    attempt: 1,
  });

  beforeAll(async () => {
    broker = await startMosquitto();
    hsm = await initSoftHsm({ label: "m2m-relay" });
    // SoftHSM reads its config when the engine first loads the module in this process.
    process.env.SOFTHSM2_CONF = hsm.env.SOFTHSM2_CONF;
    const env = { ...hsm.env };
    const tool = (args: readonly string[]) =>
      execa("pkcs11-tool", ["--module", hsm.modulePath, "--token-label", hsm.tokenLabel, ...args], {
        env,
        timeout: 30_000,
        stdin: "ignore",
      });
    // Test-only: pkcs11-tool takes the throwaway PIN of a throwaway token on argv.
    await tool([
      "--login",
      "--pin",
      hsm.pin.reveal(),
      "--keypairgen",
      "--key-type",
      "EC:prime256v1",
      "--label",
      "device",
      "--id",
      "01",
    ]);
    const pubDer = join(hsm.dir, "pub.der");
    await tool(["--read-object", "--type", "pubkey", "--label", "device", "-o", pubDer]);
    const publicKeyPem = createPublicKey({ key: await readFile(pubDer), format: "der", type: "spki" })
      .export({ format: "pem", type: "spki" })
      .toString();
    certPem = (await broker.ca.issueClient("dev-hsm", { publicKeyPem })).certPem;
  });
  afterAll(async () => {
    await broker?.cleanup();
    await hsm?.cleanup();
  });

  // First in the file on purpose: after a successful login libp11 keeps the token logged in for the
  // whole process, and a wrong PIN would then go unnoticed.
  it("a wrong PIN is tried once: later deliveries fail fast without another login (no token lockout)", async () => {
    const { writeFile } = await import("node:fs/promises");
    const wrongPin = join(hsm.dir, "wrong.pin");
    await writeFile(wrongPin, "9999", { mode: 0o600 });
    const sink = engineSink(wrongPin);
    const one = message(1, "1");
    for (let i = 0; i < 3; i++) {
      expect((await sink.deliver([one]))[0]).toMatchObject({ kind: "retry", code: "ERR_TLS_ENGINE_KEY" });
    }
    expect(sink.counters.engineLoads).toBe(1);
    await sink.close();
  });

  it("connects with the token-held key and delivers to its own topics (twice: a reconnect builds a new context)", async () => {
    const sub = await startSubscriber(broker.plainUrl, "devices/dev-hsm/#");
    const sink = engineSink();
    const batch = Array.from({ length: 5 }, (_, i) => message(i + 1, JSON.stringify({ i })));
    const out = await sink.deliver(batch);
    expect(out.map((o) => o.kind)).toEqual(["ok", "ok", "ok", "ok", "ok"]);
    await sub.waitFor((r) => r.length >= 5);
    expect(sub.received.map((r) => r.id)).toEqual(batch.map((m) => m.id));
    expect(sub.received[0]?.topic).toBe("devices/dev-hsm/engine");
    await sink.close();
    // A second sink (a reconnect after restart) works too: the engine is referenced by id, not path.
    const again = engineSink();
    expect((await again.deliver(batch.slice(0, 1)))[0]?.kind).toBe("ok");
    await again.close();
    await sub.close();
  });

  it("an unknown key label fails synchronously with ERR_TLS_ENGINE_KEY (permanent), surfaced as a retry outcome code", async () => {
    const { createEngineSecureContext } = await import("../../src/keys/pkcs11/engine-tls.js");
    let err: unknown;
    try {
      createEngineSecureContext({
        modulePath: hsm.modulePath,
        tokenLabel: hsm.tokenLabel,
        keyLabel: "no-such-key",
        pinFile: hsm.pinFile,
        certPem,
        caPem: broker.ca.caPem,
      });
    } catch (e) {
      err = e;
    }
    expect(isM2mError(err, "ERR_TLS_ENGINE_KEY")).toBe(true);
    expect(isM2mError(err) && err.retry).toBe("permanent");
  });
});
