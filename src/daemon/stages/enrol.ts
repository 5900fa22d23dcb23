import type { AgentConfig } from "../../config/index.js";
import type { Clock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import type { Logger } from "../../core/log.js";
import type { EnrolmentState } from "../../enroll/state.js";
import type { KeyProvider } from "../../keys/key-provider.js";

export interface EnrolDeps {
  readonly log: Logger;
  readonly clock: Clock;
  readonly env: NodeJS.ProcessEnv;
  /** Re-enrol although state exists (TPM re-attestation after an expired certificate). */
  readonly force?: boolean;
  readonly signal?: AbortSignal;
}

/**
 * Runs the enrolment flow of `[enroll]` with the daemon's (un-instrumented) key provider: TPM
 * attestation through the provider's own serial TPM queue, or PKCS#11 with the bootstrap token.
 * Idempotent unless `force`. Returns the stored enrolment state.
 * @throws ERR_ENROLL_CONFIG, ERR_SECRET_UNAVAILABLE, the registrar's codes, ERR_KEY_* / ERR_TPM_*.
 */
export async function enrolFromConfig(
  config: AgentConfig,
  provider: KeyProvider,
  deps: EnrolDeps,
): Promise<{ status: "enrolled" | "already-enrolled"; state: EnrolmentState }> {
  const e = config.enroll;
  if (e.registrar_url === undefined)
    throw new M2mError("ERR_ENROLL_CONFIG", "permanent", "enroll.registrar_url is not set");
  const method = e.method ?? config.keys.provider;
  const { runEnroll, tpmEnrollOps } = await import("../../enroll/index.js");
  let tpm: Parameters<typeof runEnroll>[1]["tpm"];
  if (method === "tpm") {
    const { TpmKeyProvider } = await import("../../keys/tpm/tpm-provider.js");
    if (!(provider instanceof TpmKeyProvider)) {
      throw new M2mError(
        "ERR_ENROLL_CONFIG",
        "permanent",
        'enroll.method = "tpm" needs keys.provider = "tpm"',
      );
    }
    tpm = tpmEnrollOps(provider);
  }
  const log = deps.log.child({ component: "enrol" });
  const outcome = await runEnroll(
    {
      registrarUrl: e.registrar_url,
      registrarCaFile: e.registrar_ca_file,
      method,
      bootstrapToken: e.bootstrap_token,
      hardwareSerial: e.hardware_serial,
      group: e.group,
      requestedAttributes: e.requested_attributes,
      stateDir: config.agent.state_dir,
    },
    {
      keyProvider: provider,
      tpm,
      force: deps.force === true,
      clock: deps.clock,
      env: deps.env,
      ...(deps.signal === undefined ? {} : { signal: deps.signal }),
      onProgress: (p) => log.info("enrolment step", { step: p.step, status: p.status, detail: p.detail }),
    },
  );
  if (outcome.status === "enrolled")
    log.info("device enrolled", {
      deviceId: outcome.state.deviceId,
      method: outcome.state.method,
      role: outcome.state.role,
    });
  return outcome;
}
