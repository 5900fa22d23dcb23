import { X509Certificate } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { writeFileAtomic } from "../../src/core/atomic-file.js";
import { DeviceKeyOwner, type DeviceKeySlots } from "../../src/keys/device-key.js";
import type { KeyProvider } from "../../src/keys/key-provider.js";
import { Pkcs11KeyProvider } from "../../src/keys/pkcs11/index.js";
import { KEY_ROTATION_STATE_FILE, pkcs11RotationLabels } from "../../src/keys/rotation.js";
import type { NewMessage } from "../../src/relay/outbox/outbox.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { currentIdentity } from "../../src/relay/sinks/mqtt/device-identity.js";
import { MqttSink } from "../../src/relay/sinks/mqtt/mqtt-sink.js";
import { startRelayStack } from "../../src/relay/stack.js";
import { startSubscriber, until } from "./relay-helpers.js";

/**
 * Regression for issue 11: after an in-process rotation the MQTT mTLS sink paired the new certificate
 * with the destroyed key. Here the device publishes steadily (≈ 500 msg/s) to a mosquitto that
 * requires a client certificate, takes the identity from it and allows each device only its own
 * topics; mid-stream the DeviceKeyOwner rotates the key. Every message the outbox acknowledged must
 * arrive, the live connection must already use the new certificate when the old key is destroyed,
 * and the broker must have accepted a connection presenting the new certificate.
 *
 * The key backend is a parameter: a TPM backend (tpm2-pkcs11 → engine) adds a `KeyBackend` entry.
 */
interface KeyBackend {
  readonly name: string;
  /** Slots for a device key that rotates between two names, plus the cleanup of the backend. */
  setup(stateDir: string): Promise<{ slots: DeviceKeySlots; cleanup(): Promise<void> }>;
}

const softhsm: KeyBackend = {
  name: "PKCS#11 (SoftHSM2, OpenSSL engine)",
  async setup(stateDir) {
    const hsm: SoftHsmHandle = await initSoftHsm({ label: "m2m-mqtt-rot" });
    // SoftHSM reads its config when the engine first loads the module in this process.
    process.env.SOFTHSM2_CONF = hsm.env.SOFTHSM2_CONF;
    const names = pkcs11RotationLabels("device");
    return {
      slots: {
        kind: "pkcs11",
        home: names[0],
        names,
        stateFile: join(stateDir, KEY_ROTATION_STATE_FILE),
        make: (label) =>
          new Pkcs11KeyProvider({
            modulePath: hsm.modulePath,
            tokenLabel: hsm.tokenLabel,
            keyLabel: label,
            pin: { file: hsm.pinFile },
            env: hsm.env,
          }),
      },
      cleanup: () => hsm.cleanup(),
    };
  },
};

const DEVICE = "dev-rot";
const enc = new TextEncoder();
const serialOf = (pem: string): string => new X509Certificate(pem).serialNumber.toUpperCase();

describe.each([softhsm])("MQTT mTLS across a key rotation: $name", (backend) => {
  let broker: Mosquitto;
  let dir: string;
  let cleanup: () => Promise<void>;
  let slots: DeviceKeySlots;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-mqtt-rot-"));
    broker = await startMosquitto();
    ({ slots, cleanup } = await backend.setup(dir));
  }, 120_000);

  afterAll(async () => {
    await broker?.stop();
    await cleanup?.();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  it("publishes at ~500 msg/s, rotates mid-stream, loses nothing, never publishes over a destroyed key", async () => {
    const atDestroy: { name: string; live: ReturnType<MqttSink["liveConnections"]> }[] = [];
    let sink: MqttSink | undefined;
    // Watch the destruction of keys: the live connections at that moment must use the new certificate.
    const watched: DeviceKeySlots = {
      ...slots,
      make: (name): KeyProvider => {
        const p = slots.make(name);
        return {
          kind: p.kind,
          createOrOpen: () => p.createOrOpen(),
          open: () => p.open(),
          sign: (data, alg) => p.sign(data, alg),
          evidence: () => p.evidence(),
          health: () => p.health(),
          close: () => p.close(),
          tlsClient: p.tlsClient,
          destroy: async () => {
            atDestroy.push({ name, live: sink?.liveConnections() ?? [] });
            await p.destroy();
          },
        };
      },
    };
    const owner = await DeviceKeyOwner.open(watched);
    const certFile = join(dir, "device-cert.pem");
    const issueFor = async (key: KeyProvider): Promise<string> => {
      const info = await key.createOrOpen();
      const { certPem } = await broker.ca.issueClient(DEVICE, { publicKeyPem: info.spkiPem });
      await writeFileAtomic(certFile, certPem, 0o600);
      return certPem;
    };
    const oldCert = await issueFor(owner.current);
    const oldThumb = (await owner.info()).thumbprint;

    const mqttSink = new MqttSink({
      urls: [broker.mtlsUrl],
      caPem: broker.ca.caPem,
      auth: { kind: "mtls-key", identity: () => currentIdentity(owner, certFile) },
      deviceId: DEVICE,
      maxInFlight: 200,
    });
    sink = mqttSink;
    owner.subscribe(() => mqttSink.rekey());
    const outbox = SqliteOutbox.open({ path: join(dir, "outbox.db"), sinks: [mqttSink.name] });
    const sub = await startSubscriber(broker.plainUrl, `devices/${DEVICE}/#`);
    const stack = await startRelayStack({ outbox, sinks: [mqttSink] });

    // Producer paced at 500 msg/s until 3 s after the switch (each append catches up with the schedule, so a slow fsync
    // does not lower the rate); `acked` is what the outbox accepted.
    const acked: string[] = [];
    let seq = 0;
    const started = Date.now();
    let stopAt = Number.POSITIVE_INFINITY;
    const producer = (async () => {
      while (Date.now() < stopAt) {
        const batch: NewMessage[] = [];
        const due = Math.min(100, Math.floor((Date.now() - started) / 2) - seq);
        for (let i = 0; i < due; i++)
          batch.push({
            channel: "telemetry",
            payload: enc.encode(JSON.stringify({ seq: seq++ })),
            contentType: "application/json",
            ts: Date.now(),
          });
        if (batch.length > 0) acked.push(...(await outbox.append(batch)));
        await new Promise((r) => setTimeout(r, 5));
      }
    })();

    // Mid-stream rotation, the way the renewer does it: new key → its certificate on disk → commit.
    await until(() => sub.received.length >= 500, 20_000);
    const next = await owner.prepare();
    const newCert = await issueFor(next);
    const ackedBeforeSwitch = acked.length;
    await owner.commit(next);
    const ackedAtSwitch = acked.length;
    stopAt = Date.now() + 3_000;
    await producer;

    await sub.waitFor((r) => new Set(r.map((m) => m.id)).size >= acked.length, 60_000);
    const got = new Set(sub.received.map((m) => m.id));
    // Every acknowledged message arrived (at least once; a resend after the switch keeps its id).
    expect(acked.filter((id) => !got.has(id))).toEqual([]);
    expect(acked.length).toBeGreaterThan(2_000); // ≈ 500 msg/s: ≥ 1 s before and 3 s after the switch
    expect(ackedAtSwitch).toBeGreaterThanOrEqual(ackedBeforeSwitch);
    expect(acked.length - ackedAtSwitch).toBeGreaterThan(500); // the stream went on after the switch
    expect(stack.relay.counters[mqttSink.name]?.deadLettered ?? 0).toBe(0); // ACL never refused us

    // The old key was destroyed only once the live connection used the new certificate.
    // (prepare() first destroys a leftover under the other label: empty here, nothing was live on it.)
    const oldDestroyed = atDestroy.filter((d) => d.name === "device");
    expect(oldDestroyed).toHaveLength(1);
    const liveThen = oldDestroyed[0]?.live ?? [];
    expect(liveThen.length).toBeGreaterThanOrEqual(1);
    expect(liveThen.map((c) => c.certSerial?.toUpperCase())).toEqual(liveThen.map(() => serialOf(newCert)));
    expect(mqttSink.counters.rekeys).toBe(1);
    expect((await owner.info()).thumbprint).not.toBe(oldThumb);
    await expect(slots.make("device").open()).rejects.toMatchObject({ code: "ERR_KEY_NOT_FOUND" });

    // Broker side: the connection it accepted after the switch is the one presenting the new
    // certificate (require_certificate: it verified the handshake signature of that key), logged in
    // under the certificate identity (use_identity_as_username).
    const live = mqttSink.liveConnections();
    expect(live.map((c) => c.certSerial?.toUpperCase())).toEqual([serialOf(newCert)]);
    expect(serialOf(newCert)).not.toBe(serialOf(oldCert));
    const log = await readFile(join(broker.dir, "mosquitto.log"), "utf8");
    const accepted = [...log.matchAll(/New client connected from \S+ as (\S+) \([^)]*u'([^']*)'\)/g)];
    const newConn = accepted.find((m) => m[1] === live[0]?.clientId);
    expect(newConn?.[2]).toBe(DEVICE);

    // The original defect showed on the next connect: a broker restart forces a fresh handshake,
    // which must pair the new certificate with the new key (not the destroyed one).
    await broker.stop();
    await broker.start();
    await until(() => sub.client.connected, 20_000);
    const after = await outbox.append(
      Array.from({ length: 100 }, (_, i) => ({
        channel: "telemetry",
        payload: enc.encode(JSON.stringify({ after: i })),
        contentType: "application/json",
        ts: Date.now(),
      })),
    );
    await sub.waitFor((r) => after.every((id) => r.some((m) => m.id === id)), 60_000);
    expect(mqttSink.liveConnections().map((c) => c.certSerial?.toUpperCase())).toEqual([serialOf(newCert)]);

    await sub.close();
    await stack.stop();
    await owner.close();
  }, 120_000);
});
