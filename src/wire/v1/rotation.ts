import { z } from "zod";
import { b64url, tpmCertificationShape, v1Message } from "./enrolment.js";

/**
 * TPM key rotation (v1). The device authenticates both calls with an `est`-scoped, DPoP-bound access
 * token whose proof its CURRENT registered key signs; `begin` hands out a fresh nonce for a
 * TPM2_Certify of the new key by the device's registered AK; `finish` carries that certification and a
 * CSR signed by the new key and returns the new certificate. Sessions are single-use and short-lived.
 */
export const ROTATE_PATHS = {
  tpmBegin: "/v1/rotate/tpm/begin",
  tpmFinish: "/v1/rotate/tpm/finish",
} as const;

/** 128 random bits, hex. */
const rotationSessionId = z.string().regex(/^[0-9a-f]{32}$/);

export const tpmRotateBeginRequestSchema = v1Message({});
export type TpmRotateBeginRequest = z.infer<typeof tpmRotateBeginRequestSchema>;

export const tpmRotateBeginResponseSchema = v1Message({
  sessionId: rotationSessionId,
  /** Qualifying data for TPM2_Certify (base64url, 32 bytes). */
  nonce: b64url(64),
  expiresAt: z.iso.datetime(),
});
export type TpmRotateBeginResponse = z.infer<typeof tpmRotateBeginResponseSchema>;

export const tpmRotateFinishRequestSchema = v1Message({
  sessionId: rotationSessionId,
  /** TPM2_Certify(new key, registered AK, nonce). */
  ...tpmCertificationShape,
  /** TPM2B_PUBLIC of the new device key. */
  devicePublic: b64url(2048),
  /** PKCS#10 (DER) signed by the new key. */
  csr: b64url(8192),
});
export type TpmRotateFinishRequest = z.infer<typeof tpmRotateFinishRequestSchema>;

export const tpmRotateFinishResponseSchema = v1Message({
  deviceId: z.string().min(1).max(64),
  certificatePem: z.string().min(1).max(16_384),
  caChainPem: z.array(z.string().min(1).max(16_384)).min(1).max(8),
});
export type TpmRotateFinishResponse = z.infer<typeof tpmRotateFinishResponseSchema>;
