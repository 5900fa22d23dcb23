import { z } from "zod";
import type { ErrorCode } from "../../core/error-codes.js";

/**
 * Version 1 of the enrolment wire protocol shared by the agent (`src/enroll/`) and the registrar
 * (`src/registrar/`). JSON over HTTPS; binary fields are unpadded base64url. Every object is strict
 * (unknown keys refused) and every string has a maximum length, so a hostile body cannot make either
 * side allocate without bound. Internals map these types at the edge; nothing else imports zod shapes.
 */

export const WIRE_VERSION = 1 as const;

/** Paths of the v1 enrolment endpoints (other helpers add oauth/est/ingest routes beside them). */
export const ENROLL_PATHS = {
  tpmBegin: "/v1/enroll/tpm/begin",
  tpmFinish: "/v1/enroll/tpm/finish",
  pkcs11: "/v1/enroll/pkcs11",
} as const;

/** Base64url without padding, bounded in *encoded* characters. */
export function b64url(maxChars: number) {
  return z
    .string()
    .min(1)
    .max(maxChars)
    .regex(/^[A-Za-z0-9_-]+$/, "must be base64url without padding");
}

const version = z.literal(WIRE_VERSION);
/**
 * A v1 message: it carries `v` and is strict (unknown keys refused, so a typo or a field from a newer
 * protocol is an error, never silently dropped).
 */
export function v1Message<S extends z.ZodRawShape>(shape: S) {
  return z.object({ v: version, ...shape }).strict();
}
/** A printable identifier (group names, serials, attribute keys). */
const ident = (max: number) =>
  z
    .string()
    .min(1)
    .max(max)
    .regex(/^[A-Za-z0-9._:@/+-]+$/, "must be printable ASCII without spaces");

/** Attributes a device asks for / is given. Bounded count and sizes. */
export const attributesSchema = z
  .record(ident(64), z.string().max(256))
  .refine((r) => Object.keys(r).length <= 32, "at most 32 attributes");
export type Attributes = z.infer<typeof attributesSchema>;

// Sizes: a TPM2B_PUBLIC for RSA-2048 is ~ 280 bytes, an EK cert ~ 1.5 KiB, a CSR < 2 KiB.
const TPM2B_PUBLIC_B64 = 2048;
const CERT_B64 = 8192;
const CSR_B64 = 8192;

/** A TPM2_Certify of a device key by the AK, qualified with the registrar's nonce (enrolment, rotation). */
export const tpmCertificationShape = {
  /** TPMS_ATTEST produced by TPM2_Certify(device key, AK, nonce). */
  attest: b64url(2048),
  /** TPMT_SIGNATURE over `attest` by the AK. */
  signature: b64url(1024),
};

export const tpmBeginRequestSchema = v1Message({
  /** EK certificate (DER) read from the TPM's NV index, when the TPM has one. */
  ekCertDer: b64url(CERT_B64).optional(),
  /** Intermediate CA certificates (DER) that came with the EK certificate, if any. */
  ekChainDer: z.array(b64url(CERT_B64)).max(4).optional(),
  /** EK public area as TPM2B_PUBLIC: the key MakeCredential encrypts to. Always required. */
  ekPublic: b64url(TPM2B_PUBLIC_B64),
  /** AK public area (TPM2B_PUBLIC): restricted signing key under the EK. */
  akPublic: b64url(TPM2B_PUBLIC_B64),
  /** Device key public area (TPM2B_PUBLIC): the key that gets the certificate. */
  devicePublic: b64url(TPM2B_PUBLIC_B64),
  hardwareSerial: ident(128),
  requestedAttributes: attributesSchema.default({}),
  group: ident(64).optional(),
});
export type TpmBeginRequest = z.infer<typeof tpmBeginRequestSchema>;

export const tpmBeginResponseSchema = v1Message({
  sessionId: ident(64),
  /** tpm2-tools credential blob: `BADCC0DE 00000001 TPM2B_ID_OBJECT TPM2B_ENCRYPTED_SECRET`. */
  credentialBlob: b64url(4096),
  /** Fresh nonce to pass as qualifying data to TPM2_Certify. */
  nonce: b64url(128),
  expiresAt: z.iso.datetime(),
});
export type TpmBeginResponse = z.infer<typeof tpmBeginResponseSchema>;

export const tpmFinishRequestSchema = v1Message({
  sessionId: ident(64),
  /** The secret recovered by TPM2_ActivateCredential. */
  secret: b64url(128),
  ...tpmCertificationShape,
  /** PKCS#10 CSR (DER) signed by the device key. */
  csr: b64url(CSR_B64),
});
export type TpmFinishRequest = z.infer<typeof tpmFinishRequestSchema>;

/** PKCS#11 key attributes as the token reports them: self-asserted, recorded, never trusted. */
export const pkcs11EvidenceSchema = z
  .object({
    local: z.boolean(),
    neverExtractable: z.boolean(),
    alwaysSensitive: z.boolean(),
    extractable: z.boolean().optional(),
    sensitive: z.boolean().optional(),
    tokenLabel: z.string().max(64).optional(),
    tokenModel: z.string().max(64).optional(),
    tokenSerial: z.string().max(64).optional(),
  })
  .strict();
export type Pkcs11Evidence = z.infer<typeof pkcs11EvidenceSchema>;

export const pkcs11EnrollRequestSchema = v1Message({
  /** One-time bootstrap token issued by the operator. */
  bootstrapToken: z
    .string()
    .min(16)
    .max(256)
    .regex(/^[A-Za-z0-9._~-]+$/),
  csr: b64url(CSR_B64),
  evidence: pkcs11EvidenceSchema,
  hardwareSerial: ident(128),
  requestedAttributes: attributesSchema.default({}),
});
export type Pkcs11EnrollRequest = z.infer<typeof pkcs11EnrollRequestSchema>;

export const enrolmentMethodSchema = z.enum(["tpm", "pkcs11"]);
export type EnrolmentMethod = z.infer<typeof enrolmentMethodSchema>;

const url = z.url().max(2048);

export const endpointsSchema = z
  .object({
    registrar: url,
    token: url,
    est: url,
    mqtt: url.optional(),
    ingest: url.optional(),
  })
  .strict();
export type Endpoints = z.infer<typeof endpointsSchema>;

const pem = z.string().min(1).max(16_384);

export const enrolmentResultSchema = v1Message({
  deviceId: ident(64),
  role: ident(64),
  attributes: attributesSchema,
  certificatePem: pem,
  caChainPem: z.array(pem).min(1).max(4),
  endpoints: endpointsSchema,
  method: enrolmentMethodSchema,
});
export type EnrolmentResult = z.infer<typeof enrolmentResultSchema>;

/**
 * Stable error codes of the v1 enrolment API. Agents branch on these; the message is generic and
 * never carries an expected value.
 */
export const ENROLL_ERROR_CODES = [
  "ERR_BAD_JSON",
  "ERR_SCHEMA",
  "ERR_BODY_TOO_LARGE",
  "ERR_CONTENT_TYPE",
  "ERR_NOT_FOUND",
  "ERR_METHOD_NOT_ALLOWED",
  "ERR_TIMEOUT",
  "ERR_BUSY",
  "ERR_INTERNAL",
  "ERR_GROUP_UNKNOWN",
  "ERR_METHOD_NOT_PERMITTED",
  "ERR_TOKEN_INVALID",
  "ERR_TOKEN_USED",
  "ERR_TOKEN_EXPIRED",
  "ERR_SESSION_UNKNOWN",
  "ERR_SESSION_EXPIRED",
  "ERR_SESSION_CONSUMED",
  "ERR_CSR_INVALID",
  "ERR_CSR_SIGNATURE",
  "ERR_CSR_KEY_MISMATCH",
  "ERR_KEY_UNSUPPORTED",
  "ERR_EK_UNTRUSTED",
  "ERR_EK_MISMATCH",
  "ERR_EK_ALREADY_REGISTERED",
  "ERR_KEY_ALREADY_REGISTERED",
  "ERR_HARDWARE_MISMATCH",
  "ERR_DEVICE_REVOKED",
  "ERR_ATTESTATION",
] as const satisfies readonly ErrorCode[];

export const errorBodySchema = v1Message({
  error: z
    .object({
      code: z
        .string()
        .max(64)
        .regex(/^ERR_[A-Z0-9_]+$/),
      message: z.string().max(512),
      /** For ERR_SCHEMA only: the path of the first offending field (never its value). */
      field: z.string().max(256).optional(),
    })
    .strict(),
});
export type ErrorBody = z.infer<typeof errorBodySchema>;
