import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { fetchStatus } from "../../src/cli/agent/status.js";
import { type Daemon, startDaemon } from "./daemon-cli-kit.js";
import {
  cliEnv,
  createBootstrapToken,
  enrollAgent,
  ensureBuilt,
  mqttSinkToml,
  type RegistrarProcess,
  setupRegistrar,
  startRegistrarProcess,
  writeAgentToml,
} from "./e2e-kit.js";
import { postMessages, until } from "./relay-helpers.js";

/**
 * The built daemon (SoftHSM key, PKCS#11-engine mTLS to mosquitto) with a short sink-health threshold:
 * broker stopped while messages wait → degraded with a reason naming the sink and the error code;
 * broker back → the backlog drains and the agent returns to running.
 */
describe("daemon: a sink that cannot deliver degrades the agent; delivery resuming clears it", () => {
  let work: string;
  let hsm: SoftHsmHandle;
  let broker: Mosquitto;
  let registrar: RegistrarProcess;
  let env: NodeJS.ProcessEnv;
  let agentConfig: string;
  let socketPath: string;
  let daemon: Daemon | undefined;

  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-relay-health-"));
    hsm = await initSoftHsm({ label: "health-sensor" });
    env = cliEnv({ SOFTHSM2_CONF: hsm.env.SOFTHSM2_CONF });

    const setup = await setupRegistrar({
      work,
      env,
      extraConfig: ["[oauth.roles]", 'sensor = ["telemetry:write", "est"]'],
      groups: [{ name: "sensors", role: "sensor", methods: "pkcs11" }],
    });
    const bootstrap = await createBootstrapToken(setup, "sensors");
    registrar = await startRegistrarProcess(setup.regConfig, env);

    broker = await startMosquitto({ clientCaFile: setup.caCert });
    socketPath = join(work, "api.sock");
    agentConfig = join(work, "agent.toml");
    await writeAgentToml(agentConfig, {
      stateDir: join(work, "state"),
      runtimeDir: join(work, "run"),
      agent: ['log_level = "info"', "drain_timeout_ms = 5000"],
      keys: { hsm },
      enroll: {
        registrarUrl: registrar.url,
        caFile: setup.caCert,
        bootstrapToken: bootstrap,
        hardwareSerial: "HEALTH-1",
      },
      sections: ["[relay]", "unhealthy_after_s = 1.5", ...mqttSinkToml(broker, 64)],
      api: { socket: socketPath, mode0600: true },
    });
    await enrollAgent(agentConfig, env);
  }, 180_000);

  afterAll(async () => {
    daemon?.kill();
    await daemon?.exited;
    await registrar?.stop();
    await broker?.cleanup();
    await hsm?.cleanup();
    if (work !== undefined) await rm(work, { recursive: true, force: true });
  });

  it("broker down with work waiting → degraded (relay.sink.mqtt, ERR_ code) → broker back → running, outbox drained", async () => {
    const d = startDaemon(["--config", agentConfig, "run"], env);
    daemon = d;
    await d.waitLog((r) => r.msg === "lifecycle transition" && r.to === "running", 60_000);
    const body = (n: number): string =>
      JSON.stringify(Array.from({ length: n }, (_, i) => ({ channel: "h", payload: { i } })));
    expect(await postMessages(socketPath, body(5))).toBe(200);
    await until(async () => (await fetchStatus(socketPath)).state === "running", 20_000, "running");

    await broker.stop();
    expect(await postMessages(socketPath, body(50))).toBe(200);
    const degraded = await d.waitLog(
      (r) =>
        r.msg === "lifecycle transition" &&
        r.to === "degraded" &&
        String(r.status).includes("relay.sink.mqtt"),
      60_000,
    );
    expect(String(degraded.status)).toMatch(/ERR_[A-Z0-9_]+: sink mqtt cannot deliver/);
    const st = await fetchStatus(socketPath);
    expect(st.state).toBe("degraded");
    expect(st.reasons["relay.sink.mqtt"]).toMatch(/^ERR_MQTT_[A-Z_]+: sink mqtt cannot deliver/);

    await broker.start();
    await until(
      async () => {
        const s = await fetchStatus(socketPath);
        const depth = (s as unknown as { stages?: { relay?: { outbox?: { depth?: number } } } }).stages?.relay
          ?.outbox?.depth;
        return s.state === "running" && s.reasons["relay.sink.mqtt"] === undefined && depth === 0;
      },
      60_000,
      "back to running once the sink delivers",
    );
  }, 150_000);
});
