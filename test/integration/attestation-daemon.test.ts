import { join } from "node:path";
import { beforeAll, describe, expect, it } from "vitest";
import type { SwtpmHandle } from "../../hw/swtpm.js";
import { useCleanup } from "../kit/cleanup.js";
import { startDaemon } from "./daemon-cli-kit.js";
import {
  AGENT_CLI,
  agentStatus,
  eventually,
  jwtClaims,
  REGISTRAR_CLI,
  type RegistrarSetup,
  runNode,
  startTpmGateway,
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
  const defer = useCleanup();
  let tpm: SwtpmHandle;
  let env: NodeJS.ProcessEnv;
  let setup: RegistrarSetup;
  let config: string;

  const status = (): Promise<StatusJson> => agentStatus<StatusJson>(config, env);

  beforeAll(async () => {
    ({ tpm, env, setup, config } = await startTpmGateway(defer, {
      prefix: "m2m-attest-e2e-",
      // Short tokens: the daemon refreshes (and so quotes) every few seconds.
      registrar: { extraConfig: ["[oauth]", 'access_token_ttl = "10s"'] },
      beforeServe: async (s) => {
        const pol = await s.reg(["attestation", "policy", "set", "gateways", "--pcrs", "sha256:0,1,2,3,7"]);
        expect(pol.code, pol.stderr + pol.stdout).toBe(0);
      },
      agent: {
        stateDir: "agent",
        hardwareSerial: "GW-ATT-E2E",
        keys: ["drain_timeout_ms = 2000"],
        sections: async ({ work }) => [
          "[credentials.attestation]",
          `event_log = "${join(work, "no-event-log")}"`,
          "retry_base_s = 1",
          "retry_max_s = 2",
        ],
        apiMode0600: true,
      },
    }));
  }, 300_000);

  it("degraded with the reason while refused, recovers by itself after each operator approval", async () => {
    const daemon = startDaemon(["--config", config, "run"], env);
    defer(daemon.close);
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
