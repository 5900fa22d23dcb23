import { copyFile, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { type Daemon, startDaemon } from "./daemon-cli-kit.js";
import {
  AGENT_CLI,
  agentToml,
  cliEnv,
  ensureBuilt,
  eventually,
  jwtClaims,
  REGISTRAR_CLI,
  type RegistrarProcess,
  type RegistrarSetup,
  runNode,
  setupRegistrar,
  startRegistrarProcess,
} from "./e2e-kit.js";

interface StatusJson {
  readonly state: string;
  readonly reasons?: Record<string, string>;
  readonly enrolment: { deviceId?: string } | undefined;
}

/**
 * Continuous attestation with both BUILT programs on swtpm, as an operator sees it: a group policy set
 * with `m2m-registrar attestation policy set`; the agent daemon is refused (TOFU pending) and degraded
 * with the reason; `attestation approve` → it recovers by itself; `tpm2_pcrextend` → degraded with
 * "PCR 7 differs from the policy"; approve again → running.
 */
describe("continuous attestation: built registrar + agent daemon on swtpm", () => {
  let work: string;
  let tpm: SwtpmHandle;
  let env: NodeJS.ProcessEnv;
  let setup: RegistrarSetup;
  let registrar: RegistrarProcess;
  let config: string;
  let daemon: Daemon | undefined;

  const status = async (): Promise<StatusJson> => {
    const r = await runNode(AGENT_CLI, ["--config", config, "--json", "status"], env);
    if (r.code !== 0 && r.code !== 3) throw new Error(`status exit ${r.code}: ${r.stderr}`);
    return JSON.parse(r.stdout) as StatusJson;
  };

  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-attest-e2e-"));
    tpm = await startSwtpm();
    env = cliEnv();
    const ekTrust = join(work, "ek-trust");
    await mkdir(ekTrust);
    await copyFile(tpm.rootCaPemPath, join(ekTrust, "root.pem"));
    await copyFile(tpm.intermediateCaPemPath, join(ekTrust, "intermediate.pem"));
    setup = await setupRegistrar({
      work,
      env,
      // Short tokens: the daemon refreshes (and so quotes) every few seconds.
      extraConfig: ["[oauth]", 'access_token_ttl = "10s"'],
      groups: [{ name: "gateways", role: "gateway", methods: "tpm", ekTrustDir: ekTrust }],
    });
    const pol = await setup.reg(["attestation", "policy", "set", "gateways", "--pcrs", "sha256:0,1,2,3,7"]);
    expect(pol.code, pol.stderr + pol.stdout).toBe(0);
    registrar = await startRegistrarProcess(setup.regConfig, env);
    config = join(work, "agent.toml");
    await writeFile(
      config,
      agentToml({
        stateDir: join(work, "agent"),
        runtimeDir: join(work, "run"),
        agent: ['log_level = "info"', "drain_timeout_ms = 2000"],
        keys: { tcti: tpm.tcti },
        enroll: {
          registrarUrl: registrar.url,
          caFile: setup.caCert,
          group: "gateways",
          hardwareSerial: "GW-ATT-E2E",
        },
        sections: [
          "[credentials.attestation]",
          `event_log = "${join(work, "no-event-log")}"`,
          "retry_base_s = 1",
          "retry_max_s = 2",
        ],
        api: { socket: join(work, "api.sock"), mode0600: true },
      }),
      { mode: 0o600 },
    );
  }, 300_000);

  afterAll(async () => {
    daemon?.kill();
    await daemon?.exited;
    await registrar?.stop();
    await tpm?.stop();
    if (work !== undefined) await rm(work, { recursive: true, force: true });
  });

  it("degraded with the reason while refused, recovers by itself after each operator approval", async () => {
    daemon = startDaemon(["--config", config, "run"], env);
    const enrolled = await daemon.waitLog((r) => r.msg === "device enrolled", 60_000);
    const deviceId = String(enrolled.deviceId);

    const pending = await eventually(async () => {
      const s = await status();
      return s.state === "degraded" && /ERR_ATTESTATION_REFUSED/.test(JSON.stringify(s.reasons ?? {}))
        ? s
        : undefined;
    }, 30_000);
    expect(JSON.stringify(pending.reasons)).toContain("no approved PCR values");
    const shown = await setup.reg(["attestation", "show", deviceId]);
    expect(shown.code, shown.stderr).toBe(0);
    expect(JSON.parse(shown.stdout).last).toMatchObject({ outcome: "refused", code: "ERR_QUOTE_NO_GOLDEN" });

    expect((await setup.reg(["attestation", "approve", deviceId])).code).toBe(0);
    await eventually(async () => ((await status()).state === "running" ? true : undefined), 30_000);
    const tok = await runNode(AGENT_CLI, ["--config", config, "--json", "token"], env);
    expect(tok.code, tok.stderr).toBe(0);
    const claims = jwtClaims((JSON.parse(tok.stdout) as { access_token: string }).access_token);
    expect(claims.attested).toMatchObject({ policy: "gateways#2" });

    // The platform changes under the running agent: its next refresh is refused, and it says why.
    await tpm.tpm("tpm2_pcrextend", [`7:sha256=${"ab".repeat(32)}`]);
    const changed = await eventually(async () => {
      const s = await status();
      return s.state === "degraded" && /PCR 7 differs from the policy/.test(JSON.stringify(s.reasons ?? {}))
        ? s
        : undefined;
    }, 40_000);
    expect(JSON.stringify(changed.reasons)).toContain("ERR_ATTESTATION_REFUSED");
    const report = JSON.parse((await setup.reg(["attestation", "show", deviceId])).stdout) as {
      differing: { pcr: number }[];
      last: { anomaly?: { code: string } };
    };
    expect(report.differing.map((d) => d.pcr)).toEqual([7]);
    expect(report.last.anomaly?.code).toBe("ERR_QUOTE_PCR_MISMATCH");
    // The operator's text view: the last verified quote and which PCRs differ.
    const text = await runNode(
      REGISTRAR_CLI,
      ["attestation", "show", deviceId, "--config", setup.regConfig],
      env,
    );
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toMatch(/^last verified quote: \d{4}-\d\d-\d\dT/m);
    expect(text.stdout).toContain("PCRs differing from the policy: 7");
    // The agent's view of its latest quote: /v1/status (--json) and the human `status`.
    const agentView = (changed as unknown as { stages: { credentials: { attestation: unknown } } }).stages
      .credentials.attestation;
    expect(agentView).toMatchObject({
      result: "refused",
      selection: "sha256:0,1,2,3,7",
      code: "attestation_failed",
      detail: "PCR 7 differs from the policy",
    });
    expect((agentView as { lastVerifiedAt?: string }).lastVerifiedAt).toMatch(/^\d{4}-/);
    const human = await runNode(AGENT_CLI, ["--config", config, "status"], env);
    expect(human.stdout).toMatch(
      /^attestation: last quote \S+ over sha256:0,1,2,3,7: refused \(attestation_failed: PCR 7 differs from the policy\); last verified \d{4}-/m,
    );

    expect((await setup.reg(["attestation", "approve", deviceId])).code).toBe(0);
    await eventually(async () => ((await status()).state === "running" ? true : undefined), 30_000);
  }, 240_000);
});
