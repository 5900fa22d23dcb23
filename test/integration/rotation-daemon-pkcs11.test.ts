import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { type Daemon, startDaemon } from "./daemon-cli-kit.js";
import {
  AGENT_CLI,
  cliEnv,
  createBootstrapToken,
  enrollAgent,
  ensureBuilt,
  jwtClaims,
  type RegistrarProcess,
  type RegistrarSetup,
  runNode,
  setupRegistrar,
  startRegistrarProcess,
  writeAgentToml,
} from "./e2e-kit.js";

/**
 * The built daemon with `credentials.est.rotate_key = true` on a PKCS#11 key (SoftHSM) against the
 * built registrar: at renewal it makes `key_label-alt`, gets its certificate over EST
 * simplereenroll authenticated by the CURRENT key (mTLS through the engine), and its token client
 * follows the new key.
 */
describe("daemon PKCS#11 key rotation (built CLIs, SoftHSM)", () => {
  let work: string;
  let hsm: SoftHsmHandle;
  let registrar: RegistrarProcess;
  let env: NodeJS.ProcessEnv;
  let setup: RegistrarSetup;
  const daemons: Daemon[] = [];

  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-rot-daemon-p11-"));
    hsm = await initSoftHsm({ label: "rot-daemon" });
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
  }, 300_000);

  afterAll(async () => {
    for (const d of daemons) d.kill();
    await Promise.all(daemons.map((d) => d.exited));
    await registrar?.stop();
    await hsm?.cleanup();
    if (work !== undefined) await rm(work, { recursive: true, force: true });
  });

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
      sections: ["[credentials.est]", "rotate_key = true", "renew_fraction = 0.5"],
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
    const d = startDaemon(["--config", config, "run"], env);
    daemons.push(d);
    await d.waitLog((r) => r.msg === "device key rotated", 60_000);
    const after = await state();
    expect(after.keyRef).toContain("object=m2m-device-alt");
    expect(after.keyThumbprint).not.toBe(before.keyThumbprint);
    expect(JSON.parse(await readFile(join(hsmState, "key-rotation.json"), "utf8"))).toEqual({
      v: 1,
      current: "m2m-device-alt",
    });
    const tok = await runNode(AGENT_CLI, ["--config", config, "--json", "token"], env);
    expect(tok.code, tok.stderr).toBe(0);
    const claims = jwtClaims((JSON.parse(tok.stdout) as { access_token: string }).access_token);
    expect((claims.cnf as { jkt: string }).jkt).toBe(after.keyThumbprint);
    d.child.kill("SIGTERM");
    expect(await d.exited).toBe(0);
  }, 120_000);
});
