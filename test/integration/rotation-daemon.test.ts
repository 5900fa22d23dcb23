import { X509Certificate } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import { useCleanup } from "../kit/cleanup.js";
import { startDaemon } from "./daemon-cli-kit.js";
import { AGENT_CLI, eventually, jwtClaims, runNode, startTpmGateway } from "./e2e-kit.js";

/**
 * The built daemon with `credentials.est.rotate_key = true` on swtpm against the built registrar:
 * at renewal it creates a key at the alternate handle, proves it with the AK over a registrar nonce,
 * takes the new certificate, switches its token client to the new key, and after a restart keeps
 * using the key the rotation state names.
 */
describe("daemon TPM key rotation (built CLIs, swtpm)", () => {
  const defer = useCleanup();
  let work: string;
  let env: NodeJS.ProcessEnv;
  let agentConfig: string;
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
    const gw = await startTpmGateway(defer, {
      prefix: "m2m-rot-daemon-",
      // Certificates start 60 s back (clock skew); at half of 160 s ± 5 %: renewal, and with it
      // rotation, 12–28 s after each issue (so a restart right after a rotation is not due yet).
      registrar: { topLevel: ['cert_lifetime = "100s"'], extraConfig: ["[rotation]", 'tpm = "tpm-certify"'] },
      agent: {
        stateDir: "agent",
        hardwareSerial: "GW-ROT-D",
        sections: ["[credentials.est]", "rotate_key = true", "renew_fraction = 0.5"],
      },
    });
    ({ work, env, config: agentConfig } = gw);
  }, 300_000);

  it("rotates at renewal, tokens follow the new key, a restart keeps it", async () => {
    const d = startDaemon(["--config", agentConfig, "run"], env);
    defer(d.close);
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
    defer(d2.close);
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
