import { z } from "zod";
import { b64url, WIRE_VERSION } from "./enrolment.js";

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

const version = z.literal(WIRE_VERSION);

export const tpmRotateBeginRequestSchema = z.object({ v: version }).strict();
export type TpmRotateBeginRequest = z.infer<typeof tpmRotateBeginRequestSchema>;

export const tpmRotateBeginResponseSchema = z
  .object({
    v: version,
    sessionId: z.string().regex(/^[0-9a-f]{32}$/),
    /** Qualifying data for TPM2_Certify (base64url, 32 bytes). */
    nonce: b64url(64),
    expiresAt: z.iso.datetime(),
  })
  .strict();
export type TpmRotateBeginResponse = z.infer<typeof tpmRotateBeginResponseSchema>;

export const tpmRotateFinishRequestSchema = z
  .object({
    v: version,
    sessionId: z.string().regex(/^[0-9a-f]{32}$/),
    /** TPMS_ATTEST of TPM2_Certify(new key, registered AK, nonce). */
    attest: b64url(2048),
    /** TPMT_SIGNATURE over `attest` by the AK. */
    signature: b64url(1024),
    /** TPM2B_PUBLIC of the new device key. */
    devicePublic: b64url(2048),
    /** PKCS#10 (DER) signed by the new key. */
    csr: b64url(8192),
  })
  .strict();
export type TpmRotateFinishRequest = z.infer<typeof tpmRotateFinishRequestSchema>;

export const tpmRotateFinishResponseSchema = z
  .object({
    v: version,
    deviceId: z.string().min(1).max(64),
    certificatePem: z.string().min(1).max(16_384),
    caChainPem: z.array(z.string().min(1).max(16_384)).min(1).max(8),
  })
  .strict();
export type TpmRotateFinishResponse = z.infer<typeof tpmRotateFinishResponseSchema>;
