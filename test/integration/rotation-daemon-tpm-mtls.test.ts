import { X509Certificate } from "node:crypto";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import type { SwtpmHandle } from "../../hw/swtpm.js";
import { KEY_ROTATION_STATE_FILE } from "../../src/keys/rotation.js";
import { TpmTlsKeys } from "../../src/keys/tpm/tls.js";
import { useCleanup } from "../kit/cleanup.js";
import { startDaemon } from "./daemon-cli-kit.js";
import { agentStatus, startTpmGateway } from "./e2e-kit.js";
import { arrivals, startNumberedProducer, startSubscriber, until } from "./relay-helpers.js";

/**
 * Issue 11, TPM half of "mTLS follows rotation": the built daemon on swtpm (behind tpm2-abrmd, the
 * test stand-in for the kernel resource manager) publishes over MQTT mTLS with its attested TPM key
 * (tpm2-pkcs11 → OpenSSL engine) to a mosquitto with `require_certificate`, `use_identity_as_username`
 * and a per-device ACL, at ≈ 500 msg/s, while `credentials.est.rotate_key` rotates the TPM key at
 * renewal (TPM2_Certify by the AK over a registrar nonce). Without a restart: every message the daemon
 * accepted arrives, the connection after the switch presents the new certificate (whose key is the
 * rotated TPM key), and the old key is gone from the TPM, the key blobs and the tpm2-pkcs11 token.
 */
describe("daemon TPM key rotation with MQTT mTLS through tpm2-pkcs11 (built CLIs, swtpm + abrmd)", () => {
  const defer = useCleanup();
  let work: string;
  let tpm: SwtpmHandle;
  let broker: Mosquitto;
  let env: NodeJS.ProcessEnv;
  let config: string;
  let pinFile: string;
  const stateDir = (): string => join(work, "agent");

  beforeAll(async () => {
    ({ work, tpm, env, config } = await startTpmGateway(defer, {
      prefix: "m2m-rot-tpm-mtls-",
      swtpm: { resourceManager: "abrmd" },
      // The tabrmd TCTI finds the broker on this bus: the daemon, its tools and the tpm2-pkcs11 module.
      env: (t) => ({ DBUS_SESSION_BUS_ADDRESS: t.dbusAddress ?? "" }),
      // Certificates start 60 s back; renewal (and with it rotation) at half of 160 s ± 5 %: 12–28 s.
      registrar: { topLevel: ['cert_lifetime = "100s"'], extraConfig: ["[rotation]", 'tpm = "tpm-certify"'] },
      agent: {
        stateDir: "agent",
        hardwareSerial: "GW-ROT-MTLS",
        sections: async ({ work, setup }) => {
          // The broker trusts the fleet CA for client certificates; ACL: devices/%u/# with %u = cert CN.
          broker = await startMosquitto({ clientCaFile: setup.caCert });
          defer(() => broker.cleanup());
          pinFile = join(work, "tpm-token.pin");
          await writeFile(pinFile, "tpm-rot-pin-5521", { mode: 0o600 });
          return [
            `tls_pin_file = "${pinFile}"`,
            "[credentials.est]",
            "rotate_key = true",
            "renew_fraction = 0.5",
            "[relay.mqtt]",
            `urls = ["${broker.mtlsUrl}"]`,
            'auth = "mtls-tpm"',
            `ca_file = "${broker.ca.caCertPath}"`,
            "inflight = 200",
          ];
        },
      },
    }));
    process.env.DBUS_SESSION_BUS_ADDRESS = env.DBUS_SESSION_BUS_ADDRESS;
    // tls_pin_file belongs to [keys.tpm]: move it there (the kit writes sections after [enroll]).
    const text = (await readFile(config, "utf8"))
      .replace(`tls_pin_file = "${pinFile}"\n`, "")
      .replace(
        `[keys.tpm]\ntcti = "${tpm.tcti}"\n`,
        `[keys.tpm]\ntcti = "${tpm.tcti}"\ntls_pin_file = "${pinFile}"\n`,
      );
    await writeFile(config, text, { mode: 0o600 });
  }, 300_000);

  it("publishes ≈ 500 msg/s, rotates the TPM key mid-stream, loses nothing, the broker sees the new certificate", async () => {
    const state = async () =>
      JSON.parse(await readFile(join(stateDir(), "enrolment.json"), "utf8")) as {
        deviceId: string;
        keyRef: string;
        keyThumbprint: string;
        certificatePem: string;
      };
    // Hex serials without leading zeros (X509Certificate and TLSSocket.getCertificate() differ there).
    const norm = (hex: unknown): string => String(hex).toUpperCase().replace(/^0+/, "");
    const serialOf = (pem: string): string => norm(new X509Certificate(pem).serialNumber);
    const sub = await startSubscriber(broker.plainUrl, "devices/#");
    const d = startDaemon(["--config", config, "run"], env);
    defer(d.close);
    await d.waitLog((r) => r.msg === "device enrolled", 90_000);
    const before = await state();
    expect(before.keyRef).toContain("handle=0x81000002");
    // ≈ 500 msg/s through the local API until 3 s after the rotation.
    const producer = startNumberedProducer(join(work, "api.sock"), "rot");
    const accepted = producer.accepted;
    // The sink connects on the first message: that connection presents the enrolment certificate
    // (TPM key at 0x81000002), before the rotation (due 12–28 s after the issue).
    const firstConn = await d.waitLog((r) => r.msg === "broker connected", 60_000);
    expect(norm(firstConn.certSerial)).toBe(serialOf(before.certificatePem));
    expect(d.stderr()).not.toContain('"msg":"device key switched"');
    await d.waitLog((r) => r.msg === "device key rotated", 90_000);
    // Read now: with 100 s certificates the next rotation is due 12–28 s after this one.
    const after = await state();
    const acceptedAtRotation = accepted.size;
    await producer.stop(3_000);
    const missingOf = arrivals(sub, "rot");
    await sub.waitFor(() => missingOf(accepted).length === 0, 60_000).catch(() => undefined);
    const missing = missingOf(accepted);
    expect(
      missing.length,
      `missing ${missing.length} of ${accepted.size}; daemon log tail:\n${d.stderr().slice(-4000)}`,
    ).toBe(0);
    expect(accepted.size).toBeGreaterThan(1_000);
    expect(accepted.size - acceptedAtRotation).toBeGreaterThan(500); // the stream went on after the switch

    expect(after.keyRef).toContain("handle=0x81000004");
    expect(after.keyThumbprint).not.toBe(before.keyThumbprint);
    expect(JSON.parse(await readFile(join(stateDir(), KEY_ROTATION_STATE_FILE), "utf8"))).toEqual({
      v: 1,
      current: "0x81000004",
    });
    const newSerial = serialOf(after.certificatePem);
    expect(newSerial).not.toBe(serialOf(before.certificatePem));
    // The certificate on disk is for the rotated key, and the registrar certified that key.
    const onDisk = new X509Certificate(await readFile(join(stateDir(), "device-cert.pem"), "utf8"));
    expect(norm(onDisk.serialNumber)).toBe(newSerial);

    // The sink moved make-before-break: a connection presenting the NEW certificate was accepted by the
    // broker (require_certificate: it verified the handshake signature of the new TPM key) BEFORE the
    // old key was destroyed, and logged in under the certificate identity (use_identity_as_username).
    // The sink's switch (make-before-break) ran beside the credentials stage's switch: wait for it.
    await d.waitLog(
      (r) => r.msg === "broker connected" && norm(r.certSerial) === serialOf(after.certificatePem),
      60_000,
    );
    // One TLS child per live connection: the one that held the old key exited with its connection.
    const pid = d.child.pid ?? -1;
    const tunnels = (): string[] =>
      readdirSync("/proc")
        .filter((e) => /^\d+$/.test(e))
        .filter((e) => {
          try {
            const stat = readFileSync(`/proc/${e}/stat`, "utf8");
            const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
            return ppid === pid && readFileSync(`/proc/${e}/cmdline`, "utf8").includes("tls-tunnel-child");
          } catch {
            return false;
          }
        });
    await until(() => tunnels().length === 1, 15_000).catch(() => undefined);
    expect(tunnels()).toHaveLength(1);
    const lines = d
      .stderr()
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    const idx = (pred: (r: Record<string, unknown>) => boolean): number => lines.findIndex(pred);
    const switched = idx((r) => r.msg === "device key switched");
    const rotated = idx((r) => r.msg === "device key rotated");
    const newConnIdx = idx((r) => r.msg === "broker connected" && norm(r.certSerial) === newSerial);
    expect(switched).toBeGreaterThanOrEqual(0);
    expect(lines.filter((r) => r.msg === "device key rotated")).toHaveLength(1);
    const trail = JSON.stringify(
      lines.filter((r) => /broker|switched|rotated|rekey|renewed/.test(String(r.msg))),
    );
    expect(newConnIdx, `no connection presented the new certificate ${newSerial}: ${trail}`).toBeGreaterThan(
      switched,
    );
    expect(rotated).toBeGreaterThan(switched);
    // The owner destroys the old key only after every subscriber switched (bounded: on a timeout or a
    // failure it would say so): the sink's switch completed, so the old key outlived its connection.
    expect(
      lines.filter((r) => /key change subscriber|rekey: new connection failed/.test(String(r.msg))),
    ).toEqual([]);
    // No connection with the OLD certificate after the switch: nothing published over the destroyed key.
    const oldSerial = serialOf(before.certificatePem);
    expect(
      lines.slice(switched).filter((r) => r.msg === "broker connected" && norm(r.certSerial) === oldSerial),
    ).toEqual([]);
    const newConn = lines[newConnIdx] ?? {};
    const log = await broker.log();
    const accepts = [...log.matchAll(/New client connected from \S+ as (\S+) \([^)]*u'([^']*)'\)/g)];
    expect(accepts.find((m) => m[1] === newConn.clientId)?.[2]).toBe(before.deviceId);

    const st = await agentStatus<{ stages: { relay: { sinks: { mqtt: { deadLettered: number } } } } }>(
      config,
      env,
    );
    expect(st.stages.relay.sinks.mqtt.deadLettered).toBe(0);
    d.child.kill("SIGTERM");
    expect(await d.exited).toBe(0);
    await sub.close();

    // The old key is gone everywhere a copy lived: TPM handle evicted, kept blobs deleted, token object
    // unlinked; the new key is linked.
    await expect(tpm.tpm("tpm2_readpublic", ["-c", "0x81000002"])).rejects.toBeDefined();
    const blobs = join(stateDir(), "tpm-key-blobs");
    expect(existsSync(join(blobs, "key-0x81000002.priv"))).toBe(false);
    expect(existsSync(join(blobs, "key-0x81000004.priv"))).toBe(true);
    const token = new TpmTlsKeys({
      storeDir: join(stateDir(), "tpm2-pkcs11"),
      tcti: tpm.tcti,
      userPinFile: pinFile,
    });
    expect(await token.isLinked(0x81000002)).toBe(false);
    expect(await token.isLinked(0x81000004)).toBe(true);
  }, 300_000);
});
