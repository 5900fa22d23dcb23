import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { initSoftHsm } from "../../hw/softhsm.js";
import { fetchStatus } from "../../src/cli/agent/status.js";
import { useCleanup } from "../kit/cleanup.js";
import { startDaemon } from "./daemon-cli-kit.js";
import {
  cliEnv,
  createBootstrapToken,
  enrollAgent,
  ensureBuilt,
  hsmSensorAgent,
  mqttSinkToml,
  SENSORS_GROUP,
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
  const defer = useCleanup();
  let work: string;
  let broker: Mosquitto;
  let env: NodeJS.ProcessEnv;
  let agentConfig: string;
  let socketPath: string;

  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-relay-health-"));
    defer(() => rm(work, { recursive: true, force: true }));
    const hsm = await initSoftHsm({ label: "health-sensor" });
    defer(() => hsm.cleanup());
    env = cliEnv({ SOFTHSM2_CONF: hsm.env.SOFTHSM2_CONF });

    const setup = await setupRegistrar({
      work,
      env,
      extraConfig: ["[oauth.roles]", 'sensor = ["telemetry:write", "est"]'],
      groups: [SENSORS_GROUP],
    });
    const bootstrap = await createBootstrapToken(setup, "sensors");
    const registrar = await startRegistrarProcess(setup.regConfig, env);
    defer(() => registrar.stop());

    broker = await startMosquitto({ clientCaFile: setup.caCert });
    defer(() => broker.cleanup());
    socketPath = join(work, "api.sock");
    agentConfig = join(work, "agent.toml");
    await writeAgentToml(
      agentConfig,
      hsmSensorAgent({
        work,
        hsm,
        registrar: { url: registrar.url, caFile: setup.caCert },
        bootstrapToken: bootstrap,
        hardwareSerial: "HEALTH-1",
        agent: ["drain_timeout_ms = 5000"],
        sections: ["[relay]", "unhealthy_after_s = 1.5", ...mqttSinkToml(broker, 64)],
        apiMode0600: true,
      }),
    );
    await enrollAgent(agentConfig, env);
  }, 180_000);

  it("broker down with work waiting → degraded (relay.sink.mqtt, ERR_ code) → broker back → running, outbox drained", async () => {
    const d = startDaemon(["--config", agentConfig, "run"], env);
    defer(d.close);
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
