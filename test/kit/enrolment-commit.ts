import type { CommitEnrolment } from "../../src/registrar/store/index.js";

/**
 * A PKCS#11 enrolment for registrar store tests: device dev-1 (serial SN-1, key thumb-1, group g,
 * role r, token proof "none") committed at `now` with certificate 01 valid until `certNotAfter`;
 * `over` changes single fields.
 */
export function enrolmentCommit(
  now: Date,
  certNotAfter: Date,
  over: Partial<CommitEnrolment> = {},
): CommitEnrolment {
  return {
    method: "pkcs11",
    thumbprint: "thumb-1",
    ekHash: undefined,
    hardwareSerial: "SN-1",
    proposedDeviceId: "dev-1",
    deviceId: "dev-1",
    proof: { kind: "token", hash: "none" },
    now,
    group: "g",
    role: "r",
    attributes: {},
    publicJwk: { kty: "EC" },
    evidence: undefined,
    certSerial: "01",
    certNotAfter,
    ...over,
  };
}
