import type { Secret } from "../core/secret.js";
import type { KeyInfo, KeyProvider } from "../keys/key-provider.js";
import {
  ENROLL_PATHS,
  type EnrolmentResult,
  enrolmentResultSchema,
  type Pkcs11Evidence,
  WIRE_VERSION,
} from "../wire/v1/index.js";
import type { RegistrarClient } from "./http.js";
import { type ProgressFn, step } from "./progress.js";
import { submitWithCsr } from "./submit.js";

export interface EnrollPkcs11Input {
  readonly client: RegistrarClient;
  readonly provider: KeyProvider;
  readonly bootstrapToken: Secret;
  readonly hardwareSerial?: string | undefined;
  readonly requestedAttributes?: Record<string, string> | undefined;
  readonly onProgress?: ProgressFn | undefined;
  readonly signal?: AbortSignal | undefined;
}

/**
 * PKCS#11 enrolment: a CSR signed by the token-held key (proof of possession), the key's PKCS#11
 * attributes (self-asserted), and the operator's one-time bootstrap token.
 * @throws the registrar's codes (ERR_TOKEN_USED, ERR_TOKEN_EXPIRED, …) and ERR_KEY_* from the provider.
 */
export async function enrollPkcs11(
  input: EnrollPkcs11Input,
): Promise<{ result: EnrolmentResult; key: KeyInfo }> {
  const { provider, onProgress } = input;
  const key = await step(
    onProgress,
    "open-key",
    () => provider.open(),
    (k) => `${k.algorithm} ${k.ref}`,
  );
  const evidence = await provider.evidence();
  const wireEvidence: Pkcs11Evidence =
    evidence.kind === "pkcs11"
      ? {
          local: evidence.local,
          neverExtractable: evidence.neverExtractable,
          alwaysSensitive: evidence.alwaysSensitive,
          extractable: evidence.extractable,
          sensitive: evidence.sensitive,
        }
      : // Any other backend claims nothing.
        { local: false, neverExtractable: false, alwaysSensitive: false };
  const result = await submitWithCsr(provider, key, onProgress, (csr) =>
    input.client.postJson(
      ENROLL_PATHS.pkcs11,
      {
        v: WIRE_VERSION,
        // The one place the bootstrap token is revealed: the TLS-protected request body.
        bootstrapToken: input.bootstrapToken.reveal(),
        csr,
        evidence: wireEvidence,
        hardwareSerial: input.hardwareSerial ?? `key-${key.thumbprint.slice(0, 32)}`,
        requestedAttributes: input.requestedAttributes ?? {},
      },
      enrolmentResultSchema,
      input.signal,
    ),
  );
  return { result, key };
}
