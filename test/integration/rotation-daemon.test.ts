import { X509Certificate } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type SwtpmHandle, startSwtpm, writeEkTrustDir } from "../../hw/swtpm.js";
import { type Daemon, startDaemon } from "./daemon-cli-kit.js";
import {
  AGENT_CLI,
  cliEnv,
  ensureBuilt,
  eventually,
  jwtClaims,
  type RegistrarProcess,
  runNode,
  setupRegistrar,
  startRegistrarProcess,
  writeAgentToml,
} from "./e2e-kit.js";

/**
 * The built daemon with `credentials.est.rotate_key = true` on swtpm against the built registrar:
 * at renewal it creates a key at the alternate handle, proves it with the AK over a registrar nonce,
 * takes the new certificate, switches its token client to the new key, and after a restart keeps
 * using the key the rotation state names.
 */
describe("daemon TPM key rotation (built CLIs, swtpm)", () => {
  let work: string;
  let tpm: SwtpmHandle;
  let registrar: RegistrarProcess;
  let env: NodeJS.ProcessEnv;
  let agentConfig: string;
  const daemons: Daemon[] = [];
  const stateDir = (): string => join(work, "agent");

  const agent = (args: readonly string[]) => runNode(AGENT_CLI, ["--config", agentConfig, ...args], env);
  const tokenJkt = async (): Promise<string> => {
    const r = await agent(["--json", "token"]);
    if (r.code !== 0) throw new Error(r.stderr);
    const body = JSON.parse(r.stdout) as { access_token: string };
    return String((jwtClaims(body.access_token).cnf as { jkt: string }).jkt);
  };
  const enrolmentState = async () =>
    JSON.parse(await readFile(join(stateDir(), "enrolment.json"), "utf8")) as {
      keyRef: string;
      keyThumbprint: string;
      certificatePem: string;
    };

  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-rot-daemon-"));
    tpm = await startSwtpm();
    env = cliEnv();
    const ekTrust = await writeEkTrustDir(tpm, work);
    const setup = await setupRegistrar({
      work,
      env,
      // Certificates start 60 s back (clock skew); at half of 160 s ± 5 %: renewal, and with it
      // rotation, 12–28 s after each issue (so a restart right after a rotation is not due yet).
      topLevel: ['cert_lifetime = "100s"'],
      extraConfig: ["[rotation]", 'tpm = "tpm-certify"'],
      groups: [{ name: "gateways", role: "gateway", methods: "tpm", ekTrustDir: ekTrust }],
    });
    registrar = await startRegistrarProcess(setup.regConfig, env);
    agentConfig = join(work, "agent.toml");
    await writeAgentToml(agentConfig, {
      stateDir: stateDir(),
      runtimeDir: join(work, "run"),
      agent: ['log_level = "info"'],
      keys: { tcti: tpm.tcti },
      enroll: {
        registrarUrl: registrar.url,
        caFile: setup.caCert,
        group: "gateways",
        hardwareSerial: "GW-ROT-D",
      },
      sections: ["[credentials.est]", "rotate_key = true", "renew_fraction = 0.5"],
      api: { socket: join(work, "api.sock") },
    });
  }, 300_000);

  afterAll(async () => {
    for (const d of daemons) d.kill();
    await Promise.all(daemons.map((d) => d.exited));
    await registrar?.stop();
    await tpm?.stop();
    if (work !== undefined) await rm(work, { recursive: true, force: true });
  });

  it("rotates at renewal, tokens follow the new key, a restart keeps it", async () => {
    const d = startDaemon(["--config", agentConfig, "run"], env);
    daemons.push(d);
    await d.waitLog((r) => r.msg === "device enrolled", 60_000);
    await d.waitLog((r) => r.msg === "access token obtained", 30_000);
    const enrolled = await enrolmentState();
    expect(enrolled.keyRef).toContain("handle=0x81000002");
    expect(await tokenJkt()).toBe(enrolled.keyThumbprint);

    await d.waitLog((r) => r.msg === "device key rotated", 60_000);
    const rotated = await enrolmentState();
    // The running daemon switched its token client: new tokens are bound to the new key.
    expect(await tokenJkt()).toBe(rotated.keyThumbprint);
    d.child.kill("SIGTERM");
    expect(await d.exited).toBe(0);

    expect(rotated.keyRef).toContain("handle=0x81000004");
    expect(rotated.keyThumbprint).not.toBe(enrolled.keyThumbprint);
    expect(JSON.parse(await readFile(join(stateDir(), "key-rotation.json"), "utf8"))).toEqual({
      v: 1,
      current: "0x81000004",
    });
    // The certificate the daemon serves carries the new key (same as in the enrolment state).
    const onDisk = new X509Certificate(await readFile(join(stateDir(), "device-cert.pem"), "utf8"));
    expect(onDisk.publicKey.equals(new X509Certificate(rotated.certificatePem).publicKey)).toBe(true);

    // Restart: the key provider opens the handle the rotation state names; no re-enrolment.
    const d2 = startDaemon(["--config", agentConfig, "run"], env);
    daemons.push(d2);
    await d2.waitLog((r) => r.msg === "access token obtained", 30_000);
    expect(d2.stderr()).not.toContain('"msg":"device enrolled"');
    const jkt = await eventually(
      async () => {
        const j = await tokenJkt();
        return j === rotated.keyThumbprint ? j : undefined;
      },
      10_000,
      "token bound to the rotated key",
    );
    expect(jkt).toBe(rotated.keyThumbprint);
    d2.child.kill("SIGTERM");
    expect(await d2.exited).toBe(0);
  }, 120_000);
});
