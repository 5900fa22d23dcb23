import type { AgentConfig } from "../../config/index.js";
import type { Clock } from "../../core/clock.js";
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
  const { enrollFromConfig } = await import("../../enroll/from-config.js");
  const log = deps.log.child({ component: "enrol" });
  const outcome = await enrollFromConfig(config, provider, {
    force: deps.force === true,
    clock: deps.clock,
    env: deps.env,
    ...(deps.signal === undefined ? {} : { signal: deps.signal }),
    onProgress: (p) => log.info("enrolment step", { step: p.step, status: p.status, detail: p.detail }),
  });
  if (outcome.status === "enrolled")
    log.info("device enrolled", {
      deviceId: outcome.state.deviceId,
      method: outcome.state.method,
      role: outcome.state.role,
    });
  return outcome;
}
