/** Public surface of the TPM 2.0 backend (tpm2-tools). */
export {
  AK_ATTRIBUTES,
  type AkPublic,
  type CertifyResult,
  EK_CERT_NV_INDICES,
  EK_POLICY_A_SHA256,
  type EkCertificate,
  type EkKind,
  type EkPublic,
  qualifiedName,
  RSA_EK_HANDLE,
  SWTPM_ECC_P384_EK_HANDLE,
  TpmAttestationOps,
  type TpmObjectPublic,
} from "./endorsement.js";
export { classifyToolFailure, parseTpmRc, TPM_RC } from "./errors.js";
export {
  type LockoutInfo,
  type RawResponse,
  type RunOptions,
  type RunResult,
  readLockoutInfo,
  type TpmLatencySample,
  TpmRunner,
  type TpmRunnerOptions,
  type TpmTx,
} from "./runner.js";
export {
  DEVICE_KEY_ATTRIBUTES,
  ownerPersistentHandle,
  parseTpmKeyRef,
  TpmKeyProvider,
  type TpmKeyProviderConfig,
} from "./tpm-provider.js";
export { ecdsaTpmtToRaw, objectName, parseTpmtPublic, toTpm2bPublic } from "./tpmt.js";
