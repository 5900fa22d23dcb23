import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { fetchStatus } from "../../src/cli/agent/status.js";
import { type Daemon, startDaemon } from "./daemon-cli-kit.js";
import {
  AGENT_CLI,
  ensureBuilt,
  REGISTRAR_CLI,
  type RegistrarProcess,
  runNode,
  startRegistrarProcess,
} from "./e2e-kit.js";
import { until } from "./relay-helpers.js";

function postMessages(socketPath: string, body: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath,
        path: "/v1/messages",
        method: "POST",
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) },
        timeout: 10_000,
      },
      (res) => {
        res.resume();
        res.on("end", () => resolve(res.statusCode ?? 0));
      },
    );
    req.on("timeout", () => req.destroy(new Error("request timeout")));
    req.on("error", reject);
    req.end(body);
  });
}

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
    env = { ...process.env, SOFTHSM2_CONF: hsm.env.SOFTHSM2_CONF };
    delete env.NOTIFY_SOCKET;

    const caDir = join(work, "ca");
    const init = await runNode(REGISTRAR_CLI, ["--json", "ca", "init", "--dir", caDir], env);
    expect(init.code, init.stderr).toBe(0);
    const paths = JSON.parse(init.stdout) as { caCert: string; serverCert: string; serverKey: string };
    const regConfig = join(work, "registrar.toml");
    await writeFile(
      regConfig,
      [
        `data_dir = "${join(work, "registrar-data")}"`,
        `ca_dir = "${caDir}"`,
        "[listen]",
        'host = "127.0.0.1"',
        "port = 0",
        "[tls]",
        `cert = "${paths.serverCert}"`,
        `key = "${paths.serverKey}"`,
        "[oauth.roles]",
        'sensor = ["telemetry:write", "est"]',
        "",
      ].join("\n"),
    );
    const reg = (args: readonly string[]) =>
      runNode(REGISTRAR_CLI, ["--json", ...args, "--config", regConfig], env);
    const g = await reg(["enrollment", "group", "add", "sensors", "--role", "sensor", "--methods", "pkcs11"]);
    expect(g.code, g.stderr + g.stdout).toBe(0);
    const tok = await reg(["enrollment", "token", "create", "--group", "sensors", "--ttl", "10m"]);
    expect(tok.code, tok.stderr).toBe(0);
    const bootstrap = join(work, "bootstrap-token");
    await writeFile(bootstrap, (JSON.parse(tok.stdout) as { token: string }).token, { mode: 0o600 });
    registrar = await startRegistrarProcess(regConfig, env);

    broker = await startMosquitto({ clientCaFile: paths.caCert });
    socketPath = join(work, "api.sock");
    agentConfig = join(work, "agent.toml");
    await writeFile(
      agentConfig,
      [
        "[agent]",
        `state_dir = "${join(work, "state")}"`,
        `runtime_dir = "${join(work, "run")}"`,
        'log_level = "info"',
        "drain_timeout_ms = 5000",
        "[keys]",
        'provider = "pkcs11"',
        "[keys.pkcs11]",
        `module = "${hsm.modulePath}"`,
        `token_label = "${hsm.tokenLabel}"`,
        `pin = { file = "${hsm.pinFile}" }`,
        "[enroll]",
        "enabled = true",
        `registrar_url = "${registrar.url}"`,
        `registrar_ca_file = "${paths.caCert}"`,
        'method = "pkcs11"',
        `bootstrap_token = { file = "${bootstrap}" }`,
        'hardware_serial = "HEALTH-1"',
        "[relay]",
        "unhealthy_after_s = 1.5",
        "[relay.mqtt]",
        `urls = ["${broker.mtlsUrl}"]`,
        'auth = "mtls-pkcs11"',
        `ca_file = "${broker.ca.caCertPath}"`,
        "inflight = 64",
        "[api]",
        `socket = "${socketPath}"`,
        "mode = 0o600",
        "",
      ].join("\n"),
      { mode: 0o600 },
    );
    const enrolled = await runNode(AGENT_CLI, ["--config", agentConfig, "--json", "enroll"], env);
    expect(enrolled.code, enrolled.stderr + enrolled.stdout).toBe(0);
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
    expect(String(degraded.status)).toMatch(/sink mqtt cannot deliver \(ERR_[A-Z0-9_]+\)/);
    const st = await fetchStatus(socketPath);
    expect(st.state).toBe("degraded");
    expect(st.reasons["relay.sink.mqtt"]).toMatch(/^sink mqtt cannot deliver \(ERR_/);

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
