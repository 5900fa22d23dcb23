/**
 * Pure-TypeScript TPM 2.0 structures (no TPM needed): TPMT_PUBLIC / TPM2B_PUBLIC, TPMS_ATTEST,
 * TPMT_SIGNATURE, the tpm2-tools credential blob, Names and qualified names, KDFa/KDFe and
 * MakeCredential. Every decoder is bounds-checked and fails only with `ERR_TPM_STRUCT_MALFORMED`.
 */
export {
  decodeTpmsAttest,
  encodeTpmsAttest,
  type TpmsAttest,
  type TpmsCertifyInfo,
  type TpmsClockInfo,
  type TpmsPcrSelection,
  type TpmsQuoteInfo,
} from "./attest.js";
export { ERR_TPM_STRUCT_MALFORMED, MAX_TPM_STRUCT_BYTES, TpmReader, TpmWriter } from "./bytes.js";
export {
  attributeNames,
  TPM_ALG,
  TPM_ECC_CURVE,
  TPM_GENERATED_VALUE,
  TPM_RH_ENDORSEMENT,
  TPM_ST,
  TPMA_OBJECT,
} from "./constants.js";
export {
  type CredentialBlob,
  decodeCredentialBlob,
  decodeIdObject,
  encodeCredentialBlob,
} from "./credential-blob.js";
export {
  certificatePublicKey,
  certificateSpki,
  isRsaesOaepSpki,
  normalizeRsaesOaepSpki,
} from "./ek-cert-key.js";
export {
  type EkAuthorization,
  type EkPolicyHash,
  ekAuthorizationOf,
  ekPolicyA,
  ekPolicyB,
  ekPolicyC,
  policyOr,
} from "./ek-policy.js";
export {
  describeEventData,
  EV_NO_ACTION,
  type EventDifference,
  type EventLog,
  type EventLogEvent,
  type EventToEncode,
  encodeEventLog,
  firstDifferingEvent,
  parseEventLog,
  replayEventLog,
} from "./event-log.js";
export { kdfa, kdfe } from "./kdf.js";
export {
  activateCredentialWithPrivateKey,
  ERR_TPM_CREDENTIAL_UNSUPPORTED,
  type MakeCredentialResult,
  makeCredential,
} from "./make-credential.js";
export {
  computeName,
  computeQualifiedName,
  decodeTpm2bPublic,
  decodeTpmtPublic,
  encodeTpm2bPublic,
  encodeTpmtPublic,
  handleBytes,
  objectAttributeNames,
  publicAreaFromKey,
  publicKeyObject,
  type TpmtPublic,
  type TpmtPublicEcc,
  type TpmtPublicRsa,
  toSpki,
} from "./public.js";
export {
  decodeTpmtSignature,
  encodeTpmtSignature,
  type TpmtSignature,
  verifyTpmSignature,
} from "./signature.js";
