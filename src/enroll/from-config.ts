import type { AgentConfig } from "../config/index.js";
import type { Clock } from "../core/clock.js";
import { M2mError } from "../core/errors.js";
import type { KeyProvider } from "../keys/key-provider.js";
import { type EnrollOutcome, runEnroll } from "./index.js";
import type { ProgressFn } from "./progress.js";
import { readEnrolmentState } from "./state.js";

export interface EnrollFromConfigOptions {
  readonly force?: boolean;
  readonly onProgress?: ProgressFn;
  readonly clock?: Clock;
  readonly signal?: AbortSignal;
  readonly env?: NodeJS.ProcessEnv;
}

/**
 * Maps the agent's `[enroll]` config onto `runEnroll` and binds the TPM attestation operations when
 * the key lives in a TPM. Shared by `m2m-agent enroll` and the daemon, so both enrol the same way.
 * @throws ERR_ENROLL_CONFIG when `[enroll]` lacks what the method needs; else as `runEnroll`.
 */
export async function enrollFromConfig(
  config: AgentConfig,
  provider: KeyProvider,
  options: EnrollFromConfigOptions = {},
): Promise<EnrollOutcome> {
  const e = config.enroll;
  if (e.registrar_url === undefined) {
    throw new M2mError("ERR_ENROLL_CONFIG", "permanent", "enroll.registrar_url is not set", {
      hint: 'set [enroll] registrar_url = "https://registrar.example.com" in the agent config',
    });
  }
  const method = e.method ?? config.keys.provider;
  if (method === "tpm" && provider.kind !== "tpm") {
    throw new M2mError("ERR_ENROLL_CONFIG", "permanent", 'TPM enrolment needs keys.provider = "tpm"', {
      hint: 'use enroll.method = "pkcs11" with a bootstrap token for PKCS#11 keys',
    });
  }
  let tpm: Awaited<ReturnType<typeof tpmOps>> | undefined;
  if (method === "tpm") tpm = await tpmOps(provider);
  // The key must exist before it can be attested or put in a CSR; createOrOpen never replaces one.
  // Without --force an existing enrolment is only checked: a missing key is NOT silently re-created
  // (that is re-provisioning, an operator decision: ERR_REPROVISION_REQUIRED from runEnroll).
  if (options.force === true || (await readEnrolmentState(config.agent.state_dir)) === undefined)
    await provider.createOrOpen();
  return runEnroll(
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
      ...(options.force === undefined ? {} : { force: options.force }),
      ...(options.onProgress === undefined ? {} : { onProgress: options.onProgress }),
      ...(options.clock === undefined ? {} : { clock: options.clock }),
      ...(options.signal === undefined ? {} : { signal: options.signal }),
      ...(options.env === undefined ? {} : { env: options.env }),
    },
  );
}

async function tpmOps(provider: KeyProvider) {
  // Dynamic import: PKCS#11-only gateways never load the TPM enrolment flow.
  const { tpmEnrollOps } = await import("./tpm-adapter.js");
  if (provider.attestation === undefined) {
    throw new M2mError("ERR_ENROLL_CONFIG", "permanent", "TPM enrolment needs a key with TPM attestation");
  }
  return tpmEnrollOps(provider);
}
