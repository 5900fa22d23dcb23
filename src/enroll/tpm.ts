import { createHash } from "node:crypto";
import { M2mError } from "../core/errors.js";
import type { Secret } from "../core/secret.js";
import type { KeyInfo, KeyProvider } from "../keys/key-provider.js";
import {
  ENROLL_PATHS,
  type EnrolmentResult,
  enrolmentResultSchema,
  tpmBeginResponseSchema,
  WIRE_VERSION,
} from "../wire/v1/index.js";
import type { RegistrarClient } from "./http.js";
import { type ProgressFn, step } from "./progress.js";
import { submitWithCsr } from "./submit.js";

/**
 * The TPM operations enrolment needs beyond signing (implemented over tpm2-tools in
 * src/keys/tpm/endorsement.ts; a test double can implement them with software keys).
 */
export interface EnrollTpmOps {
  /** EK public (TPM2B_PUBLIC) and, when the TPM has one, its certificate (DER) and chain. */
  readEndorsement(): Promise<{
    readonly ekPublic: Uint8Array;
    readonly ekCertDer?: Uint8Array | undefined;
    readonly ekChainDer?: readonly Uint8Array[] | undefined;
  }>;
  /** Creates (or opens) the AK directly under the EK and returns its TPM2B_PUBLIC. */
  ensureAk(): Promise<{ readonly akPublic: Uint8Array }>;
  /** The device key's TPM2B_PUBLIC. */
  devicePublic(): Promise<Uint8Array>;
  /** TPM2_ActivateCredential with the EK policy session; returns the recovered secret. */
  activateCredential(credentialBlob: Uint8Array): Promise<Secret<Uint8Array>>;
  /** TPM2_Certify(device key, AK, qualifyingData = nonce). */
  certify(nonce: Uint8Array): Promise<{ readonly attest: Uint8Array; readonly signature: Uint8Array }>;
}

export interface EnrollTpmInput {
  readonly client: RegistrarClient;
  readonly provider: KeyProvider;
  readonly tpm: EnrollTpmOps;
  readonly group?: string | undefined;
  readonly hardwareSerial?: string | undefined;
  readonly requestedAttributes?: Record<string, string> | undefined;
  readonly onProgress?: ProgressFn | undefined;
  readonly signal?: AbortSignal | undefined;
}

const b64 = (b: Uint8Array): string => Buffer.from(b).toString("base64url");

/**
 * Attested TPM enrolment: begin (EK, AK, device key) → credential activation + certify with the
 * registrar's nonce → finish with a CSR signed by the device key.
 * @throws the registrar's codes (ERR_EK_*, ERR_ATTEST_*, ERR_SESSION_*, …), ERR_TPM_* from the TPM.
 */
export async function enrollTpm(
  input: EnrollTpmInput,
): Promise<{ result: EnrolmentResult; key: KeyInfo; ekSha256: string }> {
  const { provider, tpm, onProgress } = input;
  const key = await step(
    onProgress,
    "open-key",
    () => provider.open(),
    (k) => `${k.algorithm} ${k.ref}`,
  );
  const endorsement = await step(
    onProgress,
    "read-endorsement",
    () => tpm.readEndorsement(),
    (e) => (e.ekCertDer === undefined ? "EK public (no certificate)" : "EK certificate"),
  );
  const { akPublic } = await step(onProgress, "prepare-ak", () => tpm.ensureAk());
  const devicePublic = await tpm.devicePublic();
  const ekFp = createHash("sha256").update(endorsement.ekPublic).digest("hex");
  const begin = await step(onProgress, "begin", () =>
    input.client.postJson(
      ENROLL_PATHS.tpmBegin,
      {
        v: WIRE_VERSION,
        ...(endorsement.ekCertDer === undefined ? {} : { ekCertDer: b64(endorsement.ekCertDer) }),
        ...(endorsement.ekChainDer === undefined || endorsement.ekChainDer.length === 0
          ? {}
          : { ekChainDer: endorsement.ekChainDer.map(b64) }),
        ekPublic: b64(endorsement.ekPublic),
        akPublic: b64(akPublic),
        devicePublic: b64(devicePublic),
        hardwareSerial: input.hardwareSerial ?? `ek-${ekFp.slice(0, 32)}`,
        requestedAttributes: input.requestedAttributes ?? {},
        ...(input.group === undefined ? {} : { group: input.group }),
      },
      tpmBeginResponseSchema,
      input.signal,
    ),
  );
  const secret = await step(onProgress, "activate-credential", () =>
    tpm.activateCredential(Buffer.from(begin.credentialBlob, "base64url")),
  );
  const nonce = Buffer.from(begin.nonce, "base64url");
  if (nonce.length === 0 || nonce.length > 64) {
    throw new M2mError("ERR_REGISTRAR_RESPONSE", "permanent", "registrar nonce has an unusable size");
  }
  const certified = await step(onProgress, "certify", () => tpm.certify(nonce));
  const result = await submitWithCsr(provider, key, onProgress, (csr) =>
    input.client.postJson(
      ENROLL_PATHS.tpmFinish,
      {
        v: WIRE_VERSION,
        sessionId: begin.sessionId,
        // The recovered secret only ever travels inside the TLS-protected request body.
        secret: b64(secret.reveal()),
        attest: b64(certified.attest),
        signature: b64(certified.signature),
        csr,
      },
      enrolmentResultSchema,
      input.signal,
    ),
  );
  return { result, key, ekSha256: ekFp };
}
