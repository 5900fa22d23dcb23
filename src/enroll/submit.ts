import { createCsr } from "../keys/csr.js";
import type { KeyInfo, KeyProvider } from "../keys/key-provider.js";
import type { EnrolmentResult } from "../wire/v1/index.js";
import { type ProgressFn, step } from "./progress.js";

/**
 * The tail every enrolment method shares: a PKCS#10 CSR for the device key (CN = its thumbprint),
 * signed by that key, then `submit` with it (base64url DER): the method's request that returns the
 * certificate. Progress: `build-csr`, then `submit` (detail: the device id).
 */
export async function submitWithCsr(
  provider: KeyProvider,
  key: KeyInfo,
  onProgress: ProgressFn | undefined,
  submit: (csr: string) => Promise<EnrolmentResult>,
): Promise<EnrolmentResult> {
  const csr = await step(onProgress, "build-csr", () =>
    createCsr(provider, key, { commonName: key.thumbprint }),
  );
  return step(
    onProgress,
    "submit",
    () => submit(Buffer.from(csr).toString("base64url")),
    (r) => r.deviceId,
  );
}
