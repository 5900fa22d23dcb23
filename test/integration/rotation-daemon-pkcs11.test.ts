import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { KEY_ROTATION_STATE_FILE } from "../../src/keys/rotation.js";
import { useCleanup } from "../kit/cleanup.js";
import { startDaemon } from "./daemon-cli-kit.js";
import {
  AGENT_CLI,
  agentStatus,
  cliEnv,
  createBootstrapToken,
  enrollAgent,
  ensureBuilt,
  jwtClaims,
  mqttSinkToml,
  type RegistrarProcess,
  type RegistrarSetup,
  runNode,
  setupRegistrar,
  startRegistrarProcess,
  writeAgentToml,
} from "./e2e-kit.js";
import { arrivals, startNumberedProducer, startSubscriber } from "./relay-helpers.js";

/**
 * The built daemon with `credentials.est.rotate_key = true` on a PKCS#11 key (SoftHSM) against the
 * built registrar: at renewal it makes `key_label-alt`, gets its certificate over EST
 * simplereenroll authenticated by the CURRENT key (mTLS through the engine), and its token client
 * follows the new key. Meanwhile it relays ≈ 500 msg/s over MQTT mTLS (engine key) to a mosquitto
 * that requires a fleet certificate and allows each device only its own topics: the sink moves to
 * the new key make-before-break and every message the daemon accepted arrives (issue 11).
 */
describe("daemon PKCS#11 key rotation (built CLIs, SoftHSM)", () => {
  const defer = useCleanup();
  let work: string;
  let hsm: SoftHsmHandle;
  let registrar: RegistrarProcess;
  let env: NodeJS.ProcessEnv;
  let setup: RegistrarSetup;
  let broker: Mosquitto;

  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-rot-daemon-p11-"));
    defer(() => rm(work, { recursive: true, force: true }));
    hsm = await initSoftHsm({ label: "rot-daemon" });
    defer(() => hsm.cleanup());
    env = cliEnv({ SOFTHSM2_CONF: hsm.env.SOFTHSM2_CONF });
    setup = await setupRegistrar({
      work,
      env,
      // Certificates start 60 s back; renewal (and rotation) at half of 160 s ± 5 %: 12–28 s.
      topLevel: ['cert_lifetime = "100s"'],
      extraConfig: ["[rotation]", 'pkcs11 = "allow"'],
      groups: [{ name: "sensors", role: "sensor", methods: "pkcs11" }],
    });
    registrar = await startRegistrarProcess(setup.regConfig, env);
    defer(() => registrar.stop());
    broker = await startMosquitto({ clientCaFile: setup.caCert });
    defer(() => broker.cleanup());
  }, 300_000);

  it("rotates over EST mTLS (engine, current label), key_label ↔ key_label-alt, tokens follow", async () => {
    const bootstrap = await createBootstrapToken(setup, "sensors");
    const hsmState = join(work, "agent-hsm");
    const config = join(work, "agent-hsm.toml");
    await writeAgentToml(config, {
      stateDir: hsmState,
      runtimeDir: join(work, "run-hsm"),
      keys: { hsm },
      enroll: {
        registrarUrl: registrar.url,
        caFile: setup.caCert,
        bootstrapToken: bootstrap,
        hardwareSerial: "SENSOR-ROT-1",
      },
      sections: [
        "[credentials.est]",
        "rotate_key = true",
        "renew_fraction = 0.5",
        ...mqttSinkToml(broker, 200),
      ],
      api: { socket: join(work, "hsm-api.sock") },
    });
    await enrollAgent(config, env);
    const state = async () =>
      JSON.parse(await readFile(join(hsmState, "enrolment.json"), "utf8")) as {
        keyRef: string;
        keyThumbprint: string;
      };
    const before = await state();
    expect(before.keyRef).toContain("object=m2m-device;");
    const sub = await startSubscriber(broker.plainUrl, "devices/#");
    const d = startDaemon(["--config", config, "run"], env);
    defer(d.close);
    // ≈ 500 msg/s through the local API until the rotation is done (and 2 s beyond).
    const producer = startNumberedProducer(join(work, "hsm-api.sock"), "rot");
    let rotated = false;
    await d.waitLog((r) => r.msg === "device key rotated", 60_000);
    rotated = true;
    // Read at once: with 100 s certificates the daemon rotates again 12–28 s later (back to key_label).
    const rotatedTo = await state();
    expect(rotatedTo.keyRef).toContain("object=m2m-device-alt");
    expect(rotatedTo.keyThumbprint).not.toBe(before.keyThumbprint);
    await producer.stop(2_000);
    // Fast enough that the daemon does not meanwhile rotate again, back to key_label.
    const missing = arrivals(sub, "rot");
    await sub.waitFor(() => missing(producer.accepted).length === 0, 60_000).catch(() => undefined);
    expect(rotated).toBe(true);
    expect(producer.accepted.size).toBeGreaterThan(1_000);
    expect(missing(producer.accepted)).toEqual([]);
    // The sink moved its live connection to the new key (make-before-break), and was never refused.
    const st = await agentStatus<{
      stages: { relay: { sinks: { mqtt: { deadLettered: number; delivered: number } } } };
    }>(config, env);
    expect(st.stages.relay.sinks.mqtt.deadLettered).toBe(0);
    await sub.close();
    // Stopped, the daemon rotates no more: state, rotation file and token agree on the key it ended on
    // (key_label-alt, or key_label again if a further rotation came first: either way a new key).
    d.child.kill("SIGTERM");
    expect(await d.exited).toBe(0);
    const after = await state();
    expect(after.keyThumbprint).not.toBe(before.keyThumbprint);
    const label = /object=([^;]+)/.exec(after.keyRef)?.[1];
    expect(["m2m-device", "m2m-device-alt"]).toContain(label);
    expect(JSON.parse(await readFile(join(hsmState, KEY_ROTATION_STATE_FILE), "utf8"))).toEqual({
      v: 1,
      current: label,
    });
    const tok = await runNode(AGENT_CLI, ["--config", config, "--json", "token"], env);
    expect(tok.code, tok.stderr).toBe(0);
    const claims = jwtClaims((JSON.parse(tok.stdout) as { access_token: string }).access_token);
    expect((claims.cnf as { jkt: string }).jkt).toBe(after.keyThumbprint);
  }, 180_000);
});
