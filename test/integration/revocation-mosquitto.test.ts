import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { execa } from "execa";
import mqtt, { type MqttClient } from "mqtt";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { runRegistrarCli } from "../../src/cli/m2m-registrar.js";
import { type RunningRegistrarApp, startRegistrarApp } from "../../src/registrar/app.js";
import { FleetCa } from "../../src/registrar/ca/index.js";
import type { RegistrarConfig } from "../../src/registrar/config.js";
import { SqliteRegistrarStore } from "../../src/registrar/store/index.js";
import {
  addTestGroup,
  capturingLogger,
  deviceClient,
  registerDevice,
  revocationConfig,
  type TestDevice,
  tryConnect,
} from "./revocation-kit.js";

/**
 * Revocation that reaches the edge, against a real mosquitto 2.0 (require_certificate,
 * use_identity_as_username, crlfile) and the real registrar app:
 *  - without the hook: the CRL is published, but mosquitto only reads crlfile on (re)load, and a live
 *    session continues after the reload until the device reconnects;
 *  - with the shipped hook (service/hooks/mosquitto-revoke): revoke → last message accepted ≤ 5 s.
 */

const HOOK = resolve(import.meta.dirname, "../../service/hooks/mosquitto-revoke");
/** The default `revocation.check_interval_ms`: the figures below are for an unmodified config. */
const CHECK_INTERVAL_MS = 1000;

const quiet = { out: () => undefined, err: () => undefined };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Subscribes (plain local listener) to every device topic; records arrival times per device. */
async function watch(
  broker: Mosquitto,
): Promise<{ last(deviceId: string): number; count(deviceId: string): number; close(): Promise<void> }> {
  const sub = await mqtt.connectAsync(broker.plainUrl, {
    protocolVersion: 5,
    clientId: `watch-${process.pid}`,
  });
  await sub.subscribeAsync("devices/#", { qos: 0 });
  const seen = new Map<string, number[]>();
  sub.on("message", (topic) => {
    const id = topic.split("/")[1] ?? "";
    const list = seen.get(id) ?? [];
    list.push(Date.now());
    seen.set(id, list);
  });
  return {
    last: (d) => seen.get(d)?.at(-1) ?? 0,
    count: (d) => seen.get(d)?.length ?? 0,
    close: () => sub.endAsync(),
  };
}

/** Publishes QoS 1 every `everyMs` while connected. */
function publishSteadily(client: MqttClient, deviceId: string, everyMs: number): () => void {
  let seq = 0;
  const t = setInterval(() => {
    if (client.connected)
      client.publishAsync(`devices/${deviceId}/t`, String(seq++), { qos: 1 }).catch(() => undefined);
  }, everyMs);
  return () => clearInterval(t);
}

async function crlSerials(
  url: string,
): Promise<{ status: number; type: string | null; serials: string[]; der: Buffer }> {
  const res = await fetch(`${url}/v1/crl`);
  const der = Buffer.from(await res.arrayBuffer());
  const { stdout } = await execa("openssl", ["crl", "-inform", "DER", "-noout", "-text"], {
    input: der,
    timeout: 10_000,
  });
  const serials = [...stdout.matchAll(/Serial Number: ([0-9A-F]+)/g)].map((m) => (m[1] ?? "").toLowerCase());
  return { status: res.status, type: res.headers.get("content-type"), serials, der };
}

async function waitFor(cond: () => Promise<boolean> | boolean, timeoutMs: number): Promise<number> {
  const t0 = Date.now();
  for (;;) {
    if (await cond()) return Date.now() - t0;
    if (Date.now() - t0 > timeoutMs) throw new Error("condition not met in time");
    await sleep(50);
  }
}

describe("revocation reaches mosquitto (CRL + hook)", () => {
  let dir: string;
  let configFile: string;
  let config: RegistrarConfig;
  let store: SqliteRegistrarStore;
  let ca: FleetCa;
  let broker: Mosquitto;
  let app: RunningRegistrarApp | undefined;
  const devices: TestDevice[] = [];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-revocation-"));
    const made = await revocationConfig(dir, {});
    config = made.config;
    configFile = made.file;
    ca = await FleetCa.load(made.caDir);
    store = new SqliteRegistrarStore(join(config.dataDir, "registrar.db"));
    await addTestGroup(store);
    for (let i = 0; i < 4; i++) devices.push(await registerDevice(store, ca, i, 1));
    // The broker's crlfile must exist before it starts: the operator command writes the first CRL.
    expect(await runRegistrarCli(["crl", "--config", configFile], quiet)).toBe(0);
    broker = await startMosquitto({
      clientCaFile: join(made.caDir, "ca.pem"),
      crlFile: config.revocation.crlFile,
      controlSocket: true,
    });
  }, 60_000);

  afterAll(async () => {
    await app?.close();
    store?.close();
    await broker?.cleanup();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  it("publishes a signed CRL at GET /v1/crl (DER) and in crl_file (PEM)", async () => {
    app = await startRegistrarApp(config, { store, ca });
    const crl = await crlSerials(app.url);
    expect(crl.status).toBe(200);
    expect(crl.type).toBe("application/pkix-crl");
    expect(crl.serials).toEqual([]);
    const pem = await readFile(config.revocation.crlFile, "utf8");
    const { stdout } = await execa(
      "openssl",
      ["crl", "-in", config.revocation.crlFile, "-CAfile", join(config.caDir, "ca.pem"), "-noout", "-text"],
      { timeout: 10_000, all: true },
    );
    expect(pem).toMatch(/^-----BEGIN X509 CRL-----/);
    expect(stdout).toMatch(/X509v3 CRL Number/);
    expect(stdout).toMatch(/X509v3 Authority Key Identifier/);
    expect(stdout).toMatch(/Next Update: /);
  });

  it("without the hook: mosquitto keeps the old CRL until reloaded, and a live session outlives the reload until the device reconnects", async () => {
    const [a, b] = devices as [TestDevice, TestDevice];
    const w = await watch(broker);
    const dev = deviceClient(broker.mtlsUrl, broker.ca.caPem, a);
    const stop = publishSteadily(dev.client, a.deviceId, 100);
    try {
      await waitFor(() => w.count(a.deviceId) > 3, 10_000);
      const t0 = Date.now();
      expect(await runRegistrarCli(["devices", "revoke", a.deviceId, "--config", configFile], quiet)).toBe(0);
      // The running registrar sees the CLI's revocation within check_interval_ms.
      const published = await waitFor(() => app?.crl.current?.serials.length === 2, CHECK_INTERVAL_MS + 2000);
      const listed = (await crlSerials(app?.url ?? "")).serials;
      // Both certificates of the device are listed: the enrolment one and the renewed one.
      const norm = (x: string) => x.replace(/^0+/, "");
      expect(listed.map(norm).sort()).toEqual(a.certs.map((c) => norm(c.serial)).sort());
      console.log(`[revocation] CLI revoke → CRL published by the running registrar: ${published} ms`);

      // Measured: mosquitto does not re-read crlfile by itself; a new handshake is still accepted.
      expect(await tryConnect(broker.mtlsUrl, broker.ca.caPem, a, 1)).toBe("connected");
      await broker.reload();
      // After SIGHUP, new handshakes with either certificate of the device are refused...
      expect(await tryConnect(broker.mtlsUrl, broker.ca.caPem, a, 1)).toMatch(/certificate revoked/);
      expect(await tryConnect(broker.mtlsUrl, broker.ca.caPem, a, 0)).toMatch(/certificate revoked/);
      expect(await tryConnect(broker.mtlsUrl, broker.ca.caPem, b, 1)).toBe("connected");
      // ...but the live session goes on: messages still arrive 2 s after the reload.
      const afterReload = Date.now();
      await sleep(2000);
      expect(w.last(a.deviceId)).toBeGreaterThan(afterReload + 1500);
      console.log(
        `[revocation] without the hook: the revoked device's live session still delivered messages ${((w.last(a.deviceId) - t0) / 1000).toFixed(1)} s after the revocation`,
      );
      // Once the device reconnects (here: its TCP connection drops), it is refused for good.
      dev.client.stream.destroy();
      const cut = Date.now();
      await sleep(2500);
      expect(w.last(a.deviceId)).toBeLessThan(cut + 200);
      expect(dev.errors.some((e) => /certificate revoked/.test(e))).toBe(true);
    } finally {
      stop();
      dev.client.end(true);
      await w.close();
    }
  }, 60_000);

  it("with the mosquitto hook: revoke → last message accepted from the device within 5 s", async () => {
    await app?.close();
    const { logger, lines } = capturingLogger();
    const withHook: RegistrarConfig = {
      ...config,
      revocation: {
        ...config.revocation,
        hook: [HOOK, "--pid-file", broker.pidFile, "--control-socket", broker.controlSocket ?? ""],
      },
    };
    app = await startRegistrarApp(withHook, { store, ca, logger });
    const [, , c, d] = devices as [TestDevice, TestDevice, TestDevice, TestDevice];
    const w = await watch(broker);
    const devC = deviceClient(broker.mtlsUrl, broker.ca.caPem, c);
    const devD = deviceClient(broker.mtlsUrl, broker.ca.caPem, d);
    const stopC = publishSteadily(devC.client, c.deviceId, 50);
    const stopD = publishSteadily(devD.client, d.deviceId, 50);
    try {
      await waitFor(() => w.count(c.deviceId) > 5 && w.count(d.deviceId) > 5, 10_000);
      const t0 = Date.now();
      expect(await runRegistrarCli(["devices", "revoke", c.deviceId, "--config", configFile], quiet)).toBe(0);
      await sleep(8000);
      const lastMs = w.last(c.deviceId) - t0;
      console.log(
        `[revocation] with the mosquitto hook: revoke → last message accepted from the device: ${lastMs} ms (check_interval_ms ${CHECK_INTERVAL_MS})`,
      );
      expect(lastMs).toBeLessThanOrEqual(5000);
      // The device tried to come back and the TLS handshake refused it.
      expect(devC.errors.some((e) => /certificate revoked/.test(e))).toBe(true);
      // Nobody else was disturbed: D kept publishing through the whole window.
      expect(w.last(d.deviceId)).toBeGreaterThan(Date.now() - 500);
      expect(devD.connects).toHaveLength(1);
      const ran = lines.find((l) => l.msg === "revocation hook ran" && l.event === "revoked");
      expect(ran).toMatchObject({ deviceId: c.deviceId, exitCode: 0 });
    } finally {
      stopC();
      stopD();
      devC.client.end(true);
      devD.client.end(true);
      await w.close();
    }
  }, 60_000);
});
