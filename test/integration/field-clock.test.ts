import { execFileSync } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { connect, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import mqtt from "mqtt";
import { beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { useCleanup } from "../kit/cleanup.js";
import { startDaemon } from "./daemon-cli-kit.js";
import {
  AGENT_CLI,
  agentStatus,
  cliEnv,
  createBootstrapToken,
  enrollAgent,
  ensureBuilt,
  eventually,
  hsmSensorAgent,
  type RegistrarSetup,
  runNode,
  SENSORS_GROUP,
  setupRegistrar,
  startRegistrarProcess,
  writeAgentToml,
} from "./e2e-kit.js";

/**
 * Clock gating against the BUILT daemon under libfaketime (Debian `faketime`), SoftHSM2 and
 * mosquitto. Only the daemon runs with LD_PRELOAD; its wall clock is read from a timestamp file the
 * test rewrites (FAKETIME_NO_CACHE=1), and its monotonic clock stays real
 * (FAKETIME_DONT_FAKE_MONOTONIC=1), as with a real RTC/NTP step. Counting TCP proxies stand in front
 * of the registrar (enrolment, token endpoint, EST: `public_url` points at the proxy) and of the
 * broker's mTLS listener, so "sends nothing" is measured as accepted connections.
 *
 * 1. Enrolled (real time), then started in 2001: no connection at all for 8 s; `/v1/token` and
 *    `status` name the clock (so does `token --direct` under the same fake clock); `send` is
 *    accepted into the outbox.
 * 2. Clock corrected: running again and every held message at the subscriber within 10 s.
 * 3. Clock stepped two years forward: no timer storm (a bounded handful of connections in 15 s),
 *    the daemon stays up, logs the step, and keeps relaying on its open connection.
 */

/** libfaketime's preload library, from the Debian package (fails loudly when it is missing). */
function libfaketime(): string {
  const files = execFileSync("dpkg", ["-L", "libfaketime"], { encoding: "utf8" }).split("\n");
  const lib = files.find((f) => f.endsWith("/libfaketime.so.1"));
  if (lib === undefined || !existsSync(lib))
    throw new Error("libfaketime.so.1 not found (apt install faketime)");
  return lib;
}

/** A TCP forwarder that counts the connections it accepts (each one = something the agent sent). */
interface CountingProxy {
  readonly port: number;
  connections: number;
  target: number;
  close(): Promise<void>;
}

async function countingProxy(): Promise<CountingProxy> {
  const sockets = new Set<Socket>();
  const proxy: CountingProxy = {
    port: 0,
    connections: 0,
    target: 0,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
  const server: Server = createServer((inbound) => {
    proxy.connections++;
    const outbound = connect(proxy.target, "127.0.0.1");
    for (const s of [inbound, outbound]) {
      sockets.add(s);
      s.on("close", () => sockets.delete(s));
      s.on("error", () => undefined);
    }
    inbound.pipe(outbound).pipe(inbound);
    inbound.on("close", () => outbound.destroy());
    outbound.on("close", () => inbound.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const addr = server.address();
  (proxy as { port: number }).port = typeof addr === "object" && addr !== null ? addr.port : 0;
  return proxy;
}

interface StatusJson {
  readonly state: string;
  readonly reasons: Record<string, string>;
  readonly clock: { trusted: boolean };
  readonly stages: Record<string, unknown>;
}

describe("clock gating under libfaketime (built daemon, SoftHSM, mosquitto)", () => {
  let work: string;
  let hsm: SoftHsmHandle;
  let broker: Mosquitto;
  let setup: RegistrarSetup;
  let env: NodeJS.ProcessEnv;
  let config: string;
  let regProxy: CountingProxy;
  let mqttProxy: CountingProxy;
  let timeFile: string;
  const defer = useCleanup();

  const agent = (args: readonly string[], input?: string) =>
    runNode(AGENT_CLI, ["--config", config, ...args], env, input, 30_000);
  const status = (): Promise<StatusJson> => agentStatus<StatusJson>(config, env);
  const connections = () => ({ registrar: regProxy.connections, broker: mqttProxy.connections });
  const resetCounts = () => {
    regProxy.connections = 0;
    mqttProxy.connections = 0;
  };
  const setFakeTime = (spec: string) => writeFile(timeFile, `${spec}\n`);

  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-field-clock-"));
    defer(() => rm(work, { recursive: true, force: true }));
    hsm = await initSoftHsm({ label: "field-clock" });
    defer(() => hsm.cleanup());
    env = cliEnv({ SOFTHSM2_CONF: hsm.env.SOFTHSM2_CONF });
    regProxy = await countingProxy();
    defer(() => regProxy.close());
    mqttProxy = await countingProxy();
    defer(() => mqttProxy.close());
    setup = await setupRegistrar({
      work,
      env,
      // Every URL the registrar hands out (issuer, token endpoint, EST) goes through the proxy.
      topLevel: [`public_url = "https://127.0.0.1:${regProxy.port}"`],
      extraConfig: [
        "[oauth]",
        'access_token_ttl = "5m"',
        "[oauth.roles]",
        'sensor = ["telemetry:write", "est"]',
      ],
      groups: [SENSORS_GROUP],
    });
    const registrar = await startRegistrarProcess(setup.regConfig, env);
    defer(() => registrar.stop());
    regProxy.target = Number(new URL(registrar.url).port);
    broker = await startMosquitto({ clientCaFile: setup.caCert });
    defer(() => broker.cleanup());
    mqttProxy.target = Number(new URL(broker.mtlsUrl).port);
    config = join(work, "agent.toml");
    await writeAgentToml(
      config,
      hsmSensorAgent({
        work,
        hsm,
        registrar: { url: `https://127.0.0.1:${regProxy.port}`, caFile: setup.caCert },
        bootstrapToken: await createBootstrapToken(setup, "sensors"),
        hardwareSerial: "CLOCK-1",
        agent: ["drain_timeout_ms = 3000"],
        sections: [
          "[relay.mqtt]",
          `urls = ["mqtts://127.0.0.1:${mqttProxy.port}"]`,
          'auth = "mtls-pkcs11"',
          `ca_file = "${broker.ca.caCertPath}"`,
        ],
      }),
    );
    timeFile = join(work, "faketime");
  }, 300_000);

  it("untrusted clock: nothing sent, clock named; corrected: recovers within 10 s; +2 years: no storm", async () => {
    // Enrolment with the real clock (through the proxy: the proxy works).
    const enrolled = JSON.parse((await enrollAgent(config, env)).stdout) as { deviceId: string };
    expect(regProxy.connections).toBeGreaterThan(0);
    const deviceId = enrolled.deviceId;

    const sub = await mqtt.connectAsync(broker.plainUrl, { protocolVersion: 5 });
    const seen: string[] = [];
    sub.on("message", (_topic, payload) => seen.push(payload.toString()));
    await sub.subscribeAsync(`devices/${deviceId}/#`, { qos: 1 });
    try {
      // ---- 1. A gateway without RTC battery boots in 2001 ----
      await setFakeTime("@2001-01-01 00:00:00");
      resetCounts();
      const fake = {
        LD_PRELOAD: libfaketime(),
        FAKETIME_TIMESTAMP_FILE: timeFile,
        FAKETIME_NO_CACHE: "1",
        FAKETIME_DONT_FAKE_MONOTONIC: "1",
      };
      const d = startDaemon(["--config", config, "run"], { ...env, ...fake });
      defer(d.close);
      await d.waitLog((r) => r.msg === "local API listening", 30_000);
      // The daemon really runs in 2001 (libfaketime works for node): its log timestamps say so.
      expect(d.stderr()).toMatch(/"ts":"2001-01-01T/);
      const held = await eventually(async () => {
        const s = await status();
        return s.stages.relay !== undefined && s.reasons["relay.sink.mqtt"] !== undefined ? s : undefined;
      });
      expect(held.state).toBe("degraded");
      expect(held.clock.trusted).toBe(false);
      expect(held.reasons.clock).toMatch(/^ERR_CLOCK_UNTRUSTED: /);
      expect(held.reasons["relay.sink.mqtt"]).toMatch(/^ERR_CLOCK_UNTRUSTED: .*until the clock is trusted/);
      const human = await agent(["status"]);
      expect(human.stdout + human.stderr).toContain("ERR_CLOCK_UNTRUSTED");
      expect(human.stdout + human.stderr).not.toMatch(/unreachable/i);

      // GET /v1/token refuses naming the clock (503), and nothing is signed or sent.
      const tok = await agent(["--json", "token"]);
      expect(tok.code).not.toBe(0);
      expect(tok.stdout + tok.stderr).toContain("ERR_CLOCK_UNTRUSTED");
      expect(tok.stdout + tok.stderr).not.toMatch(/unreachable/i);

      // `token --direct` (the CLI signing with the key itself) refuses the same way, under the same clock.
      const direct = await runNode(
        AGENT_CLI,
        ["--config", config, "--json", "token", "--direct"],
        { ...env, ...fake },
        undefined,
        30_000,
      );
      expect(direct.code).not.toBe(0);
      expect(direct.stdout + direct.stderr).toContain("ERR_CLOCK_UNTRUSTED");

      // Messages are accepted into the outbox while held.
      const payloads = ["1", "2", "3"].map((n) => JSON.stringify({ held: Number(n) }));
      for (const p of payloads) {
        const s = await agent(["send", "--topic", "held", p]);
        expect(s.code, s.stderr).toBe(0);
      }
      await new Promise((r) => setTimeout(r, 8_000));
      expect(connections()).toEqual({ registrar: 0, broker: 0 });
      expect(seen).toEqual([]);

      // ---- 2. NTP corrects the clock ----
      const corrected = Date.now();
      await setFakeTime("+0");
      await eventually(
        async () => (payloads.every((p) => seen.includes(p)) ? true : undefined),
        15_000,
        "held messages delivered",
      );
      const deliveredAfterMs = Date.now() - corrected;
      const running = await eventually(async () => {
        const s = await status();
        return s.state === "running" ? s : undefined;
      }, 15_000);
      const recoveredAfterMs = Date.now() - corrected;
      expect(running.clock.trusted).toBe(true);
      expect(running.reasons).toEqual({});
      expect(deliveredAfterMs).toBeLessThanOrEqual(10_000);
      expect(recoveredAfterMs).toBeLessThanOrEqual(10_000);
      const tokOk = await agent(["--json", "token"]);
      expect(tokOk.code, tokOk.stderr + tokOk.stdout).toBe(0);
      console.log(
        `[field-clock] corrected clock: delivered after ${deliveredAfterMs} ms, running after ${recoveredAfterMs} ms, connections ${JSON.stringify(connections())}`,
      );

      // ---- 3. The clock steps two years forward ----
      resetCounts();
      await setFakeTime("+730d");
      await d.waitLog((r) => r.msg === "wall clock stepped", 10_000);
      // Load that would show a storm: local token requests and messages.
      for (let i = 0; i < 3; i++) await agent(["--json", "token"]);
      const after = JSON.stringify({ after: "step" });
      expect((await agent(["send", "--topic", "after", after])).code).toBe(0);
      await new Promise((r) => setTimeout(r, 15_000));
      const counted = connections();
      const st = await status();
      console.log(
        `[field-clock] +730 d: connections in 15 s ${JSON.stringify(counted)}, state ${st.state}, reasons ${JSON.stringify(st.reasons)}`,
      );
      // No storm: a bounded handful, not dozens (timers run on the monotonic clock).
      expect(counted.registrar).toBeLessThanOrEqual(3);
      expect(counted.broker).toBeLessThanOrEqual(3);
      expect(d.child.exitCode).toBeNull();
      expect(st.clock.trusted).toBe(true);
      // The open broker connection keeps working: the step does not touch what is already up.
      await eventually(
        async () => (seen.includes(after) ? true : undefined),
        10_000,
        "delivery after the step",
      );
      d.child.kill("SIGTERM");
      expect(await d.exited).toBe(0);
      // The floor persisted at stop did not take the step: corrected back, the device is not locked out.
      const floor = JSON.parse(await readFile(join(work, "state", "clock-floor.json"), "utf8")) as {
        lastSeen: string;
      };
      expect(new Date(floor.lastSeen).getTime()).toBeLessThan(Date.now() + 3_600_000);
    } finally {
      await sub.endAsync();
    }
  }, 240_000);
});
