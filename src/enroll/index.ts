import { resolveSecret, type SecretRef } from "../config/index.js";
import type { Clock } from "../core/clock.js";
import { systemClock } from "../core/clock.js";
import { isM2mError, M2mError } from "../core/errors.js";
import { defaultRetryPolicy, type RetryPolicy, withRetry } from "../core/retry.js";
import type { Secret } from "../core/secret.js";
import type { KeyProvider } from "../keys/key-provider.js";
import type { EnrolmentMethod, EnrolmentResult } from "../wire/v1/index.js";
import { RegistrarClient } from "./http.js";
import { enrollPkcs11 } from "./pkcs11.js";
import { type ProgressFn, step } from "./progress.js";
import { currentEkSha256, reprovisionError, reprovisionReason } from "./reprovision.js";
import { type EnrolmentState, readEnrolmentState, writeEnrolmentState } from "./state.js";
import { type EnrollTpmOps, enrollTpm } from "./tpm.js";

export { RegistrarClient, type RegistrarClientOptions } from "./http.js";
export { type EnrollPkcs11Input, enrollPkcs11 } from "./pkcs11.js";
export type { EnrollProgress, EnrollStep, ProgressFn } from "./progress.js";
export {
  ENROLMENT_STATE_FILE,
  type EnrolmentState,
  enrolmentStatePath,
  enrolmentStateSchema,
  readEnrolmentState,
  writeEnrolmentState,
} from "./state.js";
export { type EnrollTpmInput, type EnrollTpmOps, enrollTpm } from "./tpm.js";

/** What `m2m-agent enroll` needs from the agent config (the daemon maps its `[enroll]` section). */
export interface EnrollConfig {
  readonly registrarUrl: string;
  /** PEM of the registrar's TLS trust anchor (the fleet CA). */
  readonly registrarCaFile?: string | undefined;
  readonly method: EnrolmentMethod;
  /** Required for pkcs11: file / env / systemd credential reference. */
  readonly bootstrapToken?: SecretRef | undefined;
  readonly hardwareSerial?: string | undefined;
  readonly group?: string | undefined;
  readonly requestedAttributes?: Record<string, string> | undefined;
  /** The agent's state directory (enrolment.json lives here, 0600). */
  readonly stateDir: string;
}

export interface RunEnrollOptions {
  readonly keyProvider: KeyProvider;
  /** Required for method "tpm". */
  readonly tpm?: EnrollTpmOps | undefined;
  /** Re-enrol even when enrolment state exists. */
  readonly force?: boolean;
  readonly onProgress?: ProgressFn;
  readonly clock?: Clock;
  readonly signal?: AbortSignal;
  /** Per-request deadline (ms). Default 15 s. */
  readonly timeoutMs?: number;
  /** Transient failures (registrar unreachable, 5xx) are retried with this policy. Default: 3 attempts. */
  readonly retry?: RetryPolicy;
  readonly env?: NodeJS.ProcessEnv;
}

export interface EnrollOutcome {
  /** "already-enrolled": state existed and `force` was not set; nothing was sent. */
  readonly status: "enrolled" | "already-enrolled";
  readonly state: EnrolmentState;
}

/**
 * `m2m-agent enroll`: enrols the device key with the registrar (TPM attestation or PKCS#11 +
 * bootstrap token) and stores the enrolment state atomically. Idempotent: an enrolled device does
 * nothing unless `force` (after checking that the stored state is for the key held now).
 * @throws ERR_REPROVISION_REQUIRED (state for another key or TPM: re-provision, then force), ERR_ENROLL_CONFIG, ERR_SECRET_UNAVAILABLE, the registrar's codes, ERR_KEY_* / ERR_TPM_*.
 */
export async function runEnroll(config: EnrollConfig, options: RunEnrollOptions): Promise<EnrollOutcome> {
  const clock = options.clock ?? systemClock;
  const existing = await step(
    options.onProgress,
    "check-state",
    () => readEnrolmentState(config.stateDir),
    (s) => (s === undefined ? "not enrolled" : `enrolled as ${s.deviceId}`),
  );
  if (existing !== undefined && options.force !== true) {
    // The state is only "ours" if it describes the key (and TPM) held now: a wiped or replaced key
    // makes the stored certificate useless, and a copied state directory is another device.
    const info = await options.keyProvider.open().catch((err: unknown) => {
      if (isM2mError(err, "ERR_KEY_NOT_FOUND")) return undefined;
      throw err;
    });
    const ek = info === undefined ? undefined : await currentEkSha256(options.keyProvider);
    const reason = reprovisionReason(
      existing,
      info === undefined ? { present: false } : { present: true, info },
      ek,
    );
    if (reason !== undefined) throw reprovisionError(existing, reason);
    return { status: "already-enrolled", state: existing };
  }

  let token: Secret | undefined;
  if (config.method === "pkcs11") {
    if (config.bootstrapToken === undefined) {
      throw new M2mError("ERR_ENROLL_CONFIG", "permanent", "PKCS#11 enrolment needs a bootstrap token", {
        hint: 'set enroll.bootstrap_token = { file = "/path" } (or { credential = "NAME" } / { env = "VAR" })',
      });
    }
    token = await resolveSecret(config.bootstrapToken, { env: options.env ?? process.env, maxBytes: 1024 });
  } else if (options.tpm === undefined) {
    throw new M2mError(
      "ERR_ENROLL_CONFIG",
      "permanent",
      "TPM enrolment needs the TPM attestation operations",
    );
  }

  const client = await RegistrarClient.create({
    baseUrl: config.registrarUrl,
    caFile: config.registrarCaFile,
    timeoutMs: options.timeoutMs ?? 15_000,
  });
  try {
    const policy: RetryPolicy = options.retry ?? {
      ...defaultRetryPolicy,
      maxAttempts: 3,
      deadlineMs: 60_000,
    };
    const attempt = async (): Promise<{
      result: EnrolmentResult;
      keyRef: string;
      thumbprint: string;
      ekSha256: string | undefined;
    }> => {
      const common = {
        client,
        provider: options.keyProvider,
        hardwareSerial: config.hardwareSerial,
        requestedAttributes: config.requestedAttributes,
        onProgress: options.onProgress,
        signal: options.signal,
      };
      if (config.method === "pkcs11") {
        const { result, key } = await enrollPkcs11({ ...common, bootstrapToken: token as Secret });
        return { result, keyRef: key.ref, thumbprint: key.thumbprint, ekSha256: undefined };
      }
      const { result, key, ekSha256 } = await enrollTpm({
        ...common,
        tpm: options.tpm as EnrollTpmOps,
        group: config.group,
      });
      return { result, keyRef: key.ref, thumbprint: key.thumbprint, ekSha256 };
    };
    // A PKCS#11 retry after a lost response would meet ERR_TOKEN_USED: only failures before the
    // registrar acted (unreachable, 5xx) are transient, and each TPM attempt uses a fresh session.
    const { result, keyRef, thumbprint, ekSha256 } = await withRetry(policy, attempt, {
      clock,
      ...(options.signal === undefined ? {} : { signal: options.signal }),
    });
    const state: EnrolmentState = {
      v: 1,
      deviceId: result.deviceId,
      method: result.method,
      role: result.role,
      attributes: result.attributes,
      certificatePem: result.certificatePem,
      caChainPem: result.caChainPem,
      endpoints: result.endpoints,
      keyRef,
      keyThumbprint: thumbprint,
      ...(ekSha256 === undefined ? {} : { ekSha256 }),
      registrarUrl: client.baseUrl,
      enrolledAt: clock.now().toISOString(),
    };
    await step(options.onProgress, "store-state", () => writeEnrolmentState(config.stateDir, state));
    return { status: "enrolled", state };
  } finally {
    await client.close();
  }
}
export { tpmEnrollOps } from "./tpm-adapter.js";
