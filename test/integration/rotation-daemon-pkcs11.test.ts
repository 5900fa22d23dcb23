import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { type Daemon, startDaemon } from "./daemon-cli-kit.js";
import {
  AGENT_CLI,
  ensureBuilt,
  jwtClaims,
  REGISTRAR_CLI,
  type RegistrarProcess,
  runNode,
  startRegistrarProcess,
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
  let regConfig: string;
  let caCert: string;
  const daemons: Daemon[] = [];

  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-rot-daemon-p11-"));
    hsm = await initSoftHsm({ label: "rot-daemon" });
    env = { ...process.env, SOFTHSM2_CONF: hsm.env.SOFTHSM2_CONF };
    delete env.NOTIFY_SOCKET;
    const caDir = join(work, "ca");
    const init = await runNode(REGISTRAR_CLI, ["--json", "ca", "init", "--dir", caDir], env);
    expect(init.code, init.stderr).toBe(0);
    const paths = JSON.parse(init.stdout) as { caCert: string; serverCert: string; serverKey: string };
    caCert = paths.caCert;
    regConfig = join(work, "registrar.toml");
    await writeFile(
      regConfig,
      [
        `data_dir = "${join(work, "registrar-data")}"`,
        `ca_dir = "${caDir}"`,
        // Certificates start 60 s back; renewal (and rotation) at half of 160 s ± 5 %: 12–28 s.
        'cert_lifetime = "100s"',
        "[listen]",
        'host = "127.0.0.1"',
        "port = 0",
        "[tls]",
        `cert = "${paths.serverCert}"`,
        `key = "${paths.serverKey}"`,
        "[rotation]",
        'pkcs11 = "allow"',
        "",
      ].join("\n"),
    );
    const g = await runNode(
      REGISTRAR_CLI,
      [
        "--json",
        "enrollment",
        "group",
        "add",
        "sensors",
        "--role",
        "sensor",
        "--methods",
        "pkcs11",
        "--config",
        regConfig,
      ],
      env,
    );
    expect(g.code, g.stderr + g.stdout).toBe(0);
    registrar = await startRegistrarProcess(regConfig, env);
  }, 300_000);

  afterAll(async () => {
    for (const d of daemons) d.kill();
    await Promise.all(daemons.map((d) => d.exited));
    await registrar?.stop();
    await hsm?.cleanup();
    if (work !== undefined) await rm(work, { recursive: true, force: true });
  });

  it("rotates over EST mTLS (engine, current label), key_label ↔ key_label-alt, tokens follow", async () => {
    const tokenOut = await runNode(
      REGISTRAR_CLI,
      [
        "--json",
        "enrollment",
        "token",
        "create",
        "--group",
        "sensors",
        "--ttl",
        "10m",
        "--config",
        regConfig,
      ],
      env,
    );
    expect(tokenOut.code, tokenOut.stderr).toBe(0);
    const bootstrap = join(work, "bootstrap-token");
    await writeFile(bootstrap, (JSON.parse(tokenOut.stdout) as { token: string }).token, { mode: 0o600 });
    const hsmState = join(work, "agent-hsm");
    const config = join(work, "agent-hsm.toml");
    await writeFile(
      config,
      [
        "[agent]",
        `state_dir = "${hsmState}"`,
        `runtime_dir = "${join(work, "run-hsm")}"`,
        "[keys]",
        'provider = "pkcs11"',
        "[keys.pkcs11]",
        `module = "${hsm.modulePath}"`,
        `token_label = "${hsm.tokenLabel}"`,
        `pin = { file = "${hsm.pinFile}" }`,
        "[enroll]",
        "enabled = true",
        `registrar_url = "${registrar.url}"`,
        `registrar_ca_file = "${caCert}"`,
        'method = "pkcs11"',
        `bootstrap_token = { file = "${bootstrap}" }`,
        'hardware_serial = "SENSOR-ROT-1"',
        "[credentials.est]",
        "rotate_key = true",
        "renew_fraction = 0.5",
        "[api]",
        `socket = "${join(work, "hsm-api.sock")}"`,
        "",
      ].join("\n"),
      { mode: 0o600 },
    );
    const enrolled = await runNode(AGENT_CLI, ["--config", config, "--json", "enroll"], env);
    expect(enrolled.code, enrolled.stderr + enrolled.stdout).toBe(0);
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
