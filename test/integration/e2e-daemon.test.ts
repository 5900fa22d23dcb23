import { randomBytes, X509Certificate } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import mqtt from "mqtt";
import { Agent, fetch } from "undici";
import { beforeAll, describe, expect, it } from "vitest";
import { freePort, type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { type SwtpmHandle, startSwtpm, writeEkTrustDir } from "../../hw/swtpm.js";
import { signCompactJws } from "../../src/keys/jws.js";
import { TpmKeyProvider } from "../../src/keys/tpm/tpm-provider.js";
import { useCleanup } from "../kit/cleanup.js";
import { postClientAssertion } from "../kit/token-request.js";
import { type Daemon, startDaemon } from "./daemon-cli-kit.js";
import {
  AGENT_CLI,
  agentStatus,
  agentToml,
  cliEnv,
  createBootstrapToken,
  enrollAgent,
  ensureBuilt,
  eventually,
  jwtClaims,
  mqttSinkToml,
  type RegistrarProcess,
  type RegistrarSetup,
  runNode,
  setupRegistrar,
  startRegistrarProcess,
  writeAgentToml,
} from "./e2e-kit.js";

/**
 * The whole story through the BUILT programs, as an operator runs them: `m2m-registrar ca init`,
 * `enrollment group add`, `serve`; `m2m-agent run` on a swtpm enrols with TPM attestation, gets a
 * DPoP-bound token and relays what `m2m-agent send` hands it to the registrar's ingest endpoint;
 * SIGHUP reloads, SIGTERM exits 0, a restart keeps the identity; `decommission --yes` revokes it and
 * the registrar refuses the device from then on. A SoftHSM device enrols with a bootstrap token
 * through `m2m-agent enroll` and relays over MQTT with mTLS (key inside the token) to mosquitto.
 */
interface AgentStatusJson {
  readonly state: string;
  readonly enrolment: unknown;
  readonly stages: Record<string, unknown>;
}

describe("end to end: registrar + agent daemon (built CLIs, swtpm, SoftHSM, mosquitto)", () => {
  const defer = useCleanup();
  let work: string;
  let tpm: SwtpmHandle;
  let hsm: SoftHsmHandle;
  let broker: Mosquitto;
  let registrar: RegistrarProcess;
  let env: NodeJS.ProcessEnv;
  let setup: RegistrarSetup;
  let caCert: string;
  let agentConfig: string;
  let ingestLog: string;
  let metricsPort = 0;
  const daemons: Daemon[] = [];

  const reg = (args: readonly string[]) => setup.reg(args);
  const agent = (config: string, args: readonly string[], input?: string) =>
    runNode(AGENT_CLI, ["--config", config, ...args], env, input);
  const run = (config: string): Daemon => {
    const d = startDaemon(["--config", config, "run"], env);
    daemons.push(d);
    defer(d.close);
    return d;
  };
  const statusOf = (config: string): Promise<AgentStatusJson> => agentStatus<AgentStatusJson>(config, env);
  const ingested = async (): Promise<{ id: string; deviceId: string; topic: string; payload: unknown }[]> => {
    const text = await readFile(ingestLog, "utf8").catch(() => "");
    return text
      .split("\n")
      .filter((l) => l !== "")
      .map((l) => JSON.parse(l) as { id: string; deviceId: string; topic: string; payload: unknown });
  };

  const tpmAgentToml = (o: { logLevel: string; registrarUrl: string }): string =>
    agentToml({
      stateDir: join(work, "agent-tpm"),
      runtimeDir: join(work, "run-tpm"),
      agent: [`log_level = "${o.logLevel}"`, "drain_timeout_ms = 5000"],
      keys: { tcti: tpm.tcti },
      enroll: {
        registrarUrl: o.registrarUrl,
        caFile: caCert,
        group: "gateways",
        hardwareSerial: "GW-E2E-1",
      },
      sections: ["[relay.https]", `url = "${o.registrarUrl}/v1/ingest"`, "batch_ms = 50"],
      api: { socket: join(work, "tpm-api.sock"), mode0600: true },
      tail: ["[metrics]", "enabled = true", `listen = "127.0.0.1:${metricsPort}"`],
    });

  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-e2e-"));
    defer(() => rm(work, { recursive: true, force: true }));
    tpm = await startSwtpm();
    defer(() => tpm.stop());
    hsm = await initSoftHsm({ label: "e2e-sensor" });
    defer(() => hsm.cleanup());
    env = cliEnv({ SOFTHSM2_CONF: hsm.env.SOFTHSM2_CONF });

    // The registrar trusts this TPM maker's EK CA (swtpm's local CA: root + intermediate).
    const ekTrust = await writeEkTrustDir(tpm, work);

    metricsPort = await freePort();
    ingestLog = join(work, "registrar-data", "ingest.ndjson");
    setup = await setupRegistrar({
      work,
      env,
      // Short-lived device certificates: the daemon renews them over EST while the test runs.
      topLevel: ['cert_lifetime = "60s"'],
      extraConfig: [
        "[oauth]",
        'access_token_ttl = "5m"',
        "[oauth.roles]",
        'gateway = ["telemetry:write", "est"]',
        'sensor = ["telemetry:write", "est"]',
        "[[oauth.rules]]",
        'scope = "site:{site}:read"',
        'require = { site = "lab" }',
      ],
      groups: [
        { name: "gateways", role: "gateway", attr: "site=lab", methods: "tpm", ekTrustDir: ekTrust },
        { name: "sensors", role: "sensor", methods: "pkcs11" },
      ],
    });
    caCert = setup.caCert;
    registrar = await startRegistrarProcess(setup.regConfig, env);
    defer(() => registrar.stop());
    agentConfig = join(work, "agent-tpm.toml");
    await writeFile(agentConfig, tpmAgentToml({ logLevel: "info", registrarUrl: registrar.url }), {
      mode: 0o600,
    });
  }, 300_000);

  let deviceId = "";

  it("TPM gateway: `run` enrols with attestation, holds a DPoP-bound token, relays `send` to the registrar", async () => {
    const d = run(agentConfig);
    const enrolled = await d.waitLog((r) => r.msg === "device enrolled", 60_000);
    deviceId = String(enrolled.deviceId);
    expect(enrolled.method).toBe("tpm");
    await d.waitLog((r) => r.msg === "access token obtained", 30_000);

    const st = await eventually(async () => {
      const s = await statusOf(agentConfig);
      const cred = s.stages.credentials as { token: unknown } | undefined;
      return s.state === "running" && cred?.token !== null && cred !== undefined ? s : undefined;
    });
    expect(st.enrolment).toMatchObject({ enrolled: true, deviceId });
    const cred = st.stages.credentials as Record<string, unknown>;
    expect(cred.estAuth).toBe("token");
    expect(cred.certificate).toMatchObject({ serial: expect.any(String) });

    // `m2m-agent token` asks the running daemon; the token is RFC 9068, DPoP-bound, least privilege.
    const tok = await agent(agentConfig, ["--json", "token"]);
    expect(tok.code, tok.stderr).toBe(0);
    const body = JSON.parse(tok.stdout) as { access_token: string; token_type: string; scope: string };
    expect(body.token_type).toBe("DPoP");
    const claims = jwtClaims(body.access_token);
    expect(claims.sub).toBe(deviceId);
    expect(claims.iss).toBe(registrar.issuer);
    expect((claims.cnf as { jkt?: string }).jkt).toMatch(/^[A-Za-z0-9_-]{43}$/);
    // RBAC (role gateway) + ABAC (attribute site=lab from the enrolment group).
    expect(String(claims.scope).split(" ").sort()).toEqual(["est", "site:lab:read", "telemetry:write"]);

    const ids: string[] = [];
    for (const c of [21, 22]) {
      const s = await agent(agentConfig, ["send", "--topic", "temp", JSON.stringify({ c })]);
      expect(s.code, s.stderr).toBe(0);
      ids.push(s.stdout.trim());
    }
    const viaStdin = await agent(agentConfig, ["send", "--topic", "humidity", "-"], '{"rh":40}');
    expect(viaStdin.code, viaStdin.stderr).toBe(0);
    ids.push(viaStdin.stdout.trim());
    const got = await eventually(async () => {
      const rows = await ingested();
      return ids.every((id) => rows.some((r) => r.id === id)) ? rows : undefined;
    });
    const byId = new Map(got.map((r) => [r.id, r]));
    expect(byId.get(ids[0] ?? "")).toMatchObject({
      deviceId,
      topic: `devices/${deviceId}/temp`,
      payload: { c: 21 },
    });
    expect(byId.get(ids[2] ?? "")).toMatchObject({
      topic: `devices/${deviceId}/humidity`,
      payload: { rh: 40 },
    });

    // The certificate (60 s) is renewed over EST with an `est`-scoped DPoP token (TPM keys do no TLS).
    const first = (cred.certificate as { serial: string }).serial;
    const renewed = await d.waitLog((r) => r.msg === "device certificate renewed", 60_000);
    expect(renewed.serial).not.toBe(first);
    const after = await eventually(async () => {
      const c = (await statusOf(agentConfig)).stages.credentials as { certificate: { serial: string } };
      return c.certificate.serial === renewed.serial ? c : undefined;
    });
    expect(after.certificate.serial).toBe(renewed.serial);
    // The registry records the certificate the device holds now.
    const norm = (x: unknown): string => String(x).toLowerCase().replace(/^0+/, "");
    const shownNow = JSON.parse((await reg(["devices", "show", deviceId])).stdout) as { certSerial: string };
    expect(norm(shownNow.certSerial)).toBe(norm(renewed.serial));

    // Prometheus: token and certificate expiry, messages relayed per sink.
    const metrics = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    const value = (name: string): number => {
      const line = metrics.split("\n").find((l) => l.startsWith(name));
      return Number(line?.split(" ").pop());
    };
    const nowS = Date.now() / 1000;
    expect(value("m2m_agent_token_expiry_timestamp_seconds")).toBeGreaterThan(nowS);
    expect(value("m2m_agent_certificate_expiry_timestamp_seconds")).toBeGreaterThan(nowS);
    expect(value('m2m_agent_relayed_total{sink="https"}')).toBeGreaterThanOrEqual(3);

    const devices = await reg(["devices", "list"]);
    const list = JSON.parse(devices.stdout) as { deviceId: string; status: string; method: string }[];
    expect(list).toEqual([expect.objectContaining({ deviceId, status: "active", method: "tpm" })]);
  }, 180_000);

  it("SIGHUP reloads, SIGTERM exits 0, a restart keeps the identity without re-enrolling", async () => {
    const d = daemons[daemons.length - 1] as Daemon;
    await writeFile(agentConfig, tpmAgentToml({ logLevel: "debug", registrarUrl: registrar.url }));
    d.child.kill("SIGHUP");
    const reloaded = await d.waitLog((r) => r.msg === "configuration reloaded");
    expect(reloaded.applied).toContain("agent.log_level");
    expect((await statusOf(agentConfig)).state).toBe("running");
    d.child.kill("SIGTERM");
    expect(await d.exited).toBe(0);

    const again = run(agentConfig);
    await again.waitLog((r) => r.msg === "access token obtained", 30_000);
    const st = await eventually(async () => {
      const s = await statusOf(agentConfig);
      return s.state === "running" ? s : undefined;
    });
    expect(st.enrolment).toMatchObject({ enrolled: true, deviceId });
    expect(again.stderr()).not.toContain('"device enrolled"');
    const s = await agent(agentConfig, ["send", "--topic", "temp", '{"c":23}']);
    expect(s.code, s.stderr).toBe(0);
    const id = s.stdout.trim();
    await eventually(async () => ((await ingested()).some((r) => r.id === id) ? true : undefined));
    const list = JSON.parse((await reg(["devices", "list"])).stdout) as unknown[];
    expect(list).toHaveLength(1);
    again.child.kill("SIGTERM");
    expect(await again.exited).toBe(0);
  }, 180_000);

  it("a certificate that expired while the agent was stopped is recovered by TPM re-attestation", async () => {
    // Let the (60 s) certificate on disk expire while nothing runs.
    const certFile = join(work, "agent-tpm", "device-cert.pem");
    const notAfter = new Date(new X509Certificate(await readFile(certFile, "utf8")).validTo).getTime();
    await new Promise((r) => setTimeout(r, Math.max(0, notAfter - Date.now() + 1500)));

    const d = run(agentConfig);
    await d.waitLog((r) => r.msg === "device certificate expired or missing: re-attesting", 60_000);
    const again = await d.waitLog((r) => r.msg === "device enrolled", 60_000);
    // Same TPM, same key: the registrar re-issues to the same device (no new identity).
    expect(again.deviceId).toBe(deviceId);
    // The renewer then takes the fresh certificate (written atomically after the enrolment).
    await eventually(async () => {
      const cert = new X509Certificate(await readFile(certFile, "utf8"));
      return new Date(cert.validTo).getTime() > Date.now() ? cert : undefined;
    });
    const st = await eventually(async () => {
      const s = await statusOf(agentConfig);
      return s.state === "running" ? s : undefined;
    });
    expect(st.enrolment).toMatchObject({ deviceId });
    d.child.kill("SIGTERM");
    expect(await d.exited).toBe(0);
  }, 180_000);

  it("decommission --yes revokes the device: its token requests get invalid_client, its TPM cannot re-enrol", async () => {
    // A client assertion signed by the device key before it is destroyed (what a clone would replay).
    const provider = new TpmKeyProvider({ tcti: tpm.tcti });
    const info = await provider.open();
    const tokenEndpoint = `${registrar.issuer}/oauth2/token`;
    const now = Math.floor(Date.now() / 1000);
    const assertion = await signCompactJws(
      provider,
      info,
      { typ: "JWT" },
      {
        iss: deviceId,
        sub: deviceId,
        aud: tokenEndpoint,
        jti: randomBytes(16).toString("hex"),
        iat: now,
        exp: now + 120,
      },
    );
    await provider.close();

    const unconfirmed = await agent(agentConfig, ["--json", "decommission"]);
    expect(unconfirmed.code).not.toBe(0);
    expect(unconfirmed.stdout).toContain("ERR_CONFIRMATION_REQUIRED");

    const dec = await agent(agentConfig, ["--json", "decommission", "--yes"]);
    expect(dec.code, dec.stderr + dec.stdout).toBe(0);
    expect(JSON.parse(dec.stdout)).toMatchObject({ decommissioned: true, deviceId, registrarTold: true });

    const shown = JSON.parse((await reg(["devices", "show", deviceId])).stdout) as { status: string };
    expect(shown.status).toBe("revoked");

    const dispatcher = new Agent({ connect: { ca: await readFile(caCert, "utf8") } });
    const res = await postClientAssertion(tokenEndpoint, deviceId, assertion, dispatcher);
    expect(res.status).toBe(401);
    expect(res.json.error).toBe("invalid_client");
    await dispatcher.close();

    // The key is gone from the TPM and the state is wiped.
    await expect(tpm.tpm("tpm2_readpublic", ["-c", "0x81000002"])).rejects.toThrow();
    await expect(readFile(join(work, "agent-tpm", "enrolment.json"))).rejects.toThrow();

    // Same TPM (same EK), new key: the registrar refuses a revoked device's comeback.
    const back = await agent(agentConfig, ["--json", "enroll"]);
    expect(back.code).not.toBe(0);
    const refused = (JSON.parse(back.stdout) as { error: { code: string } }).error.code;
    expect(["ERR_DEVICE_REVOKED", "ERR_EK_ALREADY_REGISTERED"]).toContain(refused);
    const list = JSON.parse((await reg(["devices", "list"])).stdout) as { status: string }[];
    expect(list.map((d) => d.status)).toEqual(["revoked"]);
  }, 180_000);

  it("PKCS#11 sensor: `enroll` with a one-time bootstrap token, then `run` relays over MQTT mTLS with the token-held key", async () => {
    const bootstrap = await createBootstrapToken(setup, "sensors");

    broker = await startMosquitto({ clientCaFile: caCert });
    defer(() => broker.cleanup());
    const config = join(work, "agent-hsm.toml");
    await writeAgentToml(config, {
      stateDir: join(work, "agent-hsm"),
      runtimeDir: join(work, "run-hsm"),
      keys: { hsm },
      enroll: {
        registrarUrl: registrar.url,
        caFile: caCert,
        bootstrapToken: bootstrap,
        hardwareSerial: "SENSOR-E2E-1",
      },
      sections: [
        ...mqttSinkToml(broker),
        // Sensors already publishing to a local broker (here the same mosquitto, plain listener).
        "[relay.sources.mqtt]",
        `url = "${broker.plainUrl}"`,
        'topics = ["sensors/#"]',
      ],
      api: { socket: join(work, "hsm-api.sock") },
    });
    const enrolled = await enrollAgent(config, env);
    const out = JSON.parse(enrolled.stdout) as {
      status: string;
      deviceId: string;
      method: string;
      role: string;
    };
    expect(out).toMatchObject({ status: "enrolled", method: "pkcs11", role: "sensor" });
    // Idempotent: a second run sends nothing (the one-time token would be refused anyway).
    const again = await agent(config, ["--json", "enroll"]);
    expect(JSON.parse(again.stdout)).toMatchObject({ status: "already-enrolled", deviceId: out.deviceId });

    const direct = await agent(config, ["--json", "token", "--direct"]);
    expect(direct.code, direct.stderr + direct.stdout).toBe(0);
    const claims = jwtClaims((JSON.parse(direct.stdout) as { access_token: string }).access_token);
    expect(claims.sub).toBe(out.deviceId);
    expect(String(claims.scope).split(" ").sort()).toEqual(["est", "telemetry:write"]);

    const sub = await mqtt.connectAsync(broker.plainUrl, { protocolVersion: 5 });
    const seen: { topic: string; payload: string }[] = [];
    sub.on("message", (topic, payload) => seen.push({ topic, payload: payload.toString() }));
    await sub.subscribeAsync("devices/#", { qos: 1 });
    try {
      const d = run(config);
      await d.waitLog((r) => r.msg === "lifecycle transition" && r.to === "running", 60_000);
      const s = await agent(config, ["send", "--topic", "vibration", '{"g":0.3}']);
      expect(s.code, s.stderr).toBe(0);
      const msg = await eventually(async () =>
        seen.find((m) => m.topic === `devices/${out.deviceId}/vibration`),
      );
      expect(JSON.parse(msg.payload)).toEqual({ g: 0.3 });

      // A sensor publishes on the local broker; the agent relays it under its own identity.
      const sensor = await mqtt.connectAsync(broker.plainUrl, { protocolVersion: 5 });
      await sensor.publishAsync("sensors/pressure", '{"hpa":1013}', {
        qos: 1,
        properties: { contentType: "application/json" },
      });
      await sensor.endAsync();
      const relayed = await eventually(async () =>
        seen.find((m) => m.topic === `devices/${out.deviceId}/sensors/pressure`),
      );
      expect(JSON.parse(relayed.payload)).toEqual({ hpa: 1013 });

      // EST renewal over mTLS: the client certificate's key is used inside the token (engine).
      const renewed = await d.waitLog((r) => r.msg === "device certificate renewed", 60_000);
      const cred = await eventually(async () => {
        const c = (await statusOf(config)).stages.credentials as {
          estAuth: string;
          certificate: { serial: string } | null;
        };
        return c.certificate?.serial === renewed.serial ? c : undefined;
      });
      expect(cred.estAuth).toBe("mtls");
      // The broker restarts; the MQTT sink reconnects with the renewed certificate from disk.
      await broker.stop();
      await broker.start();
      const sub2 = await mqtt.connectAsync(broker.plainUrl, { protocolVersion: 5 });
      const seen2: string[] = [];
      sub2.on("message", (topic) => seen2.push(topic));
      await sub2.subscribeAsync("devices/#", { qos: 1 });
      try {
        const s2 = await agent(config, ["send", "--topic", "after-renewal", '{"ok":true}']);
        expect(s2.code, s2.stderr).toBe(0);
        await eventually(
          async () => (seen2.includes(`devices/${out.deviceId}/after-renewal`) ? true : undefined),
          60_000,
          "delivery after broker restart",
        );
      } finally {
        await sub2.endAsync();
      }

      // Revoked by the operator while running: the next token request is refused for good and
      // health says why (the agent keeps serving what it can: degraded, not dead).
      const revoke = await reg(["devices", "revoke", out.deviceId]);
      expect(revoke.code, revoke.stderr).toBe(0);
      const refused = await agent(config, ["--json", "token", "--scope", "est"]);
      expect(refused.code).not.toBe(0);
      expect(refused.stdout).toContain("ERR_OAUTH_CLIENT_REVOKED");
      const st = await statusOf(config);
      expect(st.state).toBe("degraded");
      expect((st as unknown as { reasons: Record<string, string> }).reasons["credentials.token"]).toContain(
        "ERR_OAUTH_CLIENT_REVOKED",
      );
      d.child.kill("SIGTERM");
      expect(await d.exited).toBe(0);
    } finally {
      await sub.endAsync();
    }

    // Already revoked: the registrar refuses to be told again, so decommission stops (key kept)…
    const refusedDec = await agent(config, ["--json", "decommission", "--yes"]);
    expect(refusedDec.code).not.toBe(0);
    expect(refusedDec.stdout).toContain("ERR_DECOMMISSION_REFUSED");
    expect((await agent(config, ["--json", "keys", "show"])).code).toBe(0);
    // … unless the operator says the registrar side is handled: the token's key is destroyed.
    const offline = await agent(config, ["--json", "decommission", "--yes", "--offline"]);
    expect(offline.code, offline.stderr + offline.stdout).toBe(0);
    expect(JSON.parse(offline.stdout)).toMatchObject({ decommissioned: true, registrarTold: false });
    const gone = await agent(config, ["--json", "keys", "show"]);
    expect(gone.code).not.toBe(0);
    expect(gone.stdout).toContain("ERR_KEY_NOT_FOUND");
    await expect(readFile(join(work, "agent-hsm", "enrolment.json"))).rejects.toThrow();
  }, 180_000);
});
