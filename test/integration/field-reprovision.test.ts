import { execFileSync } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import type { SwtpmHandle } from "../../hw/swtpm.js";
import { useCleanup } from "../kit/cleanup.js";
import { startDaemon } from "./daemon-cli-kit.js";
import { AGENT_CLI, type RegistrarSetup, runNode, startTpmGateway } from "./e2e-kit.js";

/**
 * TPM cleared after enrolment (swtpm, built CLIs): the agent enters "re-provisioning required"
 * (no key created, no retry loop, no talk of revocation); `enroll --force` is refused until the
 * operator runs `m2m-registrar devices allow-reenrol`; then it re-attests as a new device and the
 * old identity is revoked with its certificate on the CRL.
 */
describe("re-provisioning after tpm2_clear", () => {
  const defer = useCleanup();
  let work: string;
  let tpm: SwtpmHandle;
  let setup: RegistrarSetup;
  let env: NodeJS.ProcessEnv;
  let config: string;

  beforeAll(async () => {
    ({ work, tpm, setup, env, config } = await startTpmGateway(defer, {
      prefix: "m2m-reprov-",
      agent: { stateDir: "state", hardwareSerial: "GW-R1", apiMode0600: true },
    }));
  }, 300_000);

  const agent = (args: readonly string[]) => runNode(AGENT_CLI, ["--config", config, ...args], env);

  it("cleared TPM → reprovision-required; refused until allow-reenrol; enroll --force re-attests; old identity revoked", async () => {
    const first = await agent(["--json", "enroll"]);
    expect(first.code, first.stderr).toBe(0);
    const old = JSON.parse(first.stdout) as {
      deviceId: string;
      keyThumbprint: string;
      certificate: { serial: string };
    };

    // The owner clears the TPM (firmware update, owner clear): the device key is gone.
    await tpm.tpm("tpm2_clear", ["-c", "p"]);

    const d = startDaemon(["--config", config, "run"], env);
    defer(d.close);
    const t = await d.waitLog(
      (r) => r.msg === "lifecycle transition" && r.to === "reprovision-required",
      60_000,
    );
    expect(String(t.status)).toContain("re-provisioning required");
    expect(String(t.status)).toContain("missing");
    const st = await agent(["--json", "status"]);
    const status = JSON.parse(st.stdout) as { state: string; reasons: Record<string, string> };
    expect(status.state).toBe("reprovision-required");
    expect(status.reasons.enrolment).toMatch(/^ERR_REPROVISION_REQUIRED: .*missing/);
    // No key was created behind the operator's back, nothing talks about revocation, no retry loop.
    await expect(tpm.tpm("tpm2_readpublic", ["-c", "0x81000002"])).rejects.toThrow();
    await new Promise((r) => setTimeout(r, 3000));
    const log = d.stderr();
    expect(log).not.toMatch(/revoked/i);
    expect(log).not.toContain("retrying");
    // While the daemon runs, enroll refuses (one agent per state directory).
    const locked = await agent(["enroll", "--force"]);
    expect(locked.code).toBe(1);
    expect(locked.stderr).toContain("ERR_STATE_LOCKED");
    d.child.kill("SIGTERM");
    expect(await d.exited).toBe(0);

    // Without the operator's allowance the registrar refuses the new key under the same EK.
    const refused = await agent(["enroll", "--force"]);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain("ERR_EK_ALREADY_REGISTERED");
    expect(refused.stderr).toContain("allow-reenrol");

    const allowed = await setup.reg(["devices", "allow-reenrol", old.deviceId]);
    expect(allowed.code, allowed.stderr).toBe(0);
    expect(JSON.parse(allowed.stdout)).toMatchObject({
      deviceId: old.deviceId,
      status: "revoked",
      reenrolAllowed: true,
    });

    const again = await agent(["--json", "enroll", "--force"]);
    expect(again.code, again.stderr).toBe(0);
    const fresh = JSON.parse(again.stdout) as { deviceId: string; keyThumbprint: string };
    expect(fresh.deviceId).not.toBe(old.deviceId);
    expect(fresh.keyThumbprint).not.toBe(old.keyThumbprint);

    // The daemon starts normally on the new identity.
    const d2 = startDaemon(["--config", config, "run"], env);
    defer(d2.close);
    await d2.waitLog(
      (r) => r.msg === "lifecycle transition" && (r.to === "running" || r.to === "degraded"),
      60_000,
    );
    expect(d2.stderr()).not.toContain("reprovision-required");
    d2.child.kill("SIGTERM");
    await d2.exited;

    // The old identity is dead: revoked in the registry, its certificate on the CRL; audited.
    const shown = JSON.parse((await setup.reg(["devices", "show", old.deviceId])).stdout) as {
      status: string;
    };
    expect(shown.status).toBe("revoked");
    const crlFile = join(work, "crl.pem");
    const crl = await runNode(
      join(AGENT_CLI, "..", "m2m-registrar.js"),
      ["--json", "crl", "--config", setup.regConfig, "--out", crlFile],
      env,
    );
    expect(crl.code, crl.stderr).toBe(0);
    const text = execFileSync("openssl", ["crl", "-in", crlFile, "-noout", "-text"], { encoding: "utf8" });
    expect(text.toUpperCase().replace(/:/g, "")).toContain(
      old.certificate.serial.toUpperCase().replace(/^0+/, ""),
    );
    expect(await readFile(join(work, "state", "enrolment.json"), "utf8")).toContain(fresh.deviceId);
  }, 240_000);
});
