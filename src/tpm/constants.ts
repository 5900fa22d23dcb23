/** TPM 2.0 Part 2 constants used by the codecs (only what this codebase reads or writes). */

export const TPM_ALG = {
  RSA: 0x0001,
  SHA1: 0x0004,
  HMAC: 0x0005,
  MGF1: 0x0007,
  AES: 0x0006,
  KEYEDHASH: 0x0008,
  XOR: 0x000a,
  SHA256: 0x000b,
  SHA384: 0x000c,
  SHA512: 0x000d,
  NULL: 0x0010,
  SM3_256: 0x0012,
  SM4: 0x0013,
  RSASSA: 0x0014,
  RSAES: 0x0015,
  RSAPSS: 0x0016,
  OAEP: 0x0017,
  ECDSA: 0x0018,
  ECDH: 0x0019,
  ECDAA: 0x001a,
  SM2: 0x001b,
  ECSCHNORR: 0x001c,
  ECMQV: 0x001d,
  KDF1_SP800_56A: 0x0020,
  KDF2: 0x0021,
  KDF1_SP800_108: 0x0022,
  ECC: 0x0023,
  SYMCIPHER: 0x0025,
  CAMELLIA: 0x0026,
  CTR: 0x0040,
  OFB: 0x0041,
  CBC: 0x0042,
  CFB: 0x0043,
  ECB: 0x0044,
} as const;

export const TPM_ECC_CURVE = {
  NIST_P192: 0x0001,
  NIST_P224: 0x0002,
  NIST_P256: 0x0003,
  NIST_P384: 0x0004,
  NIST_P521: 0x0005,
} as const;

/** TPM_ST values of TPMS_ATTEST.type. */
export const TPM_ST = {
  ATTEST_NV: 0x8014,
  ATTEST_COMMAND_AUDIT: 0x8015,
  ATTEST_SESSION_AUDIT: 0x8016,
  ATTEST_CERTIFY: 0x8017,
  ATTEST_QUOTE: 0x8018,
  ATTEST_TIME: 0x8019,
  ATTEST_CREATION: 0x801a,
  ATTEST_NV_DIGEST: 0x801c,
} as const;

/** TPM_GENERATED_VALUE: every TPMS_ATTEST the TPM builds starts with it. */
export const TPM_GENERATED_VALUE = 0xff544347;

/** Permanent handle of the endorsement hierarchy (its "name" in qualified names). */
export const TPM_RH_ENDORSEMENT = 0x4000000b;
export const TPM_RH_OWNER = 0x40000001;
export const TPM_RH_PLATFORM = 0x4000000c;

/** TPMA_OBJECT bits. */
export const TPMA_OBJECT = {
  fixedTPM: 0x00000002,
  stClear: 0x00000004,
  fixedParent: 0x00000010,
  sensitiveDataOrigin: 0x00000020,
  userWithAuth: 0x00000040,
  adminWithPolicy: 0x00000080,
  noDA: 0x00000400,
  encryptedDuplication: 0x00000800,
  restricted: 0x00010000,
  decrypt: 0x00020000,
  sign: 0x00040000,
  x509sign: 0x00080000,
} as const;

export type TpmaObjectName = keyof typeof TPMA_OBJECT;

/** Attribute names set in `attrs` (unknown bits are reported as `bit<N>`). */
export function attributeNames(attrs: number): string[] {
  const out: string[] = [];
  let known = 0;
  for (const [name, bit] of Object.entries(TPMA_OBJECT)) {
    known |= bit;
    if ((attrs & bit) !== 0) out.push(name);
  }
  for (let i = 0; i < 32; i++) {
    const bit = (1 << i) >>> 0;
    if (((attrs >>> 0) & bit) !== 0 && (known & bit) === 0) out.push(`bit${i}`);
  }
  return out;
}

export type TpmHashName = "sha1" | "sha256" | "sha384" | "sha512";

const HASHES: ReadonlyMap<number, { name: TpmHashName; size: number }> = new Map([
  [TPM_ALG.SHA1, { name: "sha1", size: 20 }],
  [TPM_ALG.SHA256, { name: "sha256", size: 32 }],
  [TPM_ALG.SHA384, { name: "sha384", size: 48 }],
  [TPM_ALG.SHA512, { name: "sha512", size: 64 }],
]);

/** Node hash name and digest size of a TPM hash algorithm, or undefined when not a supported hash. */
export function hashInfo(alg: number): { name: TpmHashName; size: number } | undefined {
  return HASHES.get(alg);
}

/** Largest digest (TPMU_HA) and name (TPMU_NAME) sizes. */
export const MAX_DIGEST_BYTES = 64;
export const MAX_NAME_BYTES = 2 + MAX_DIGEST_BYTES;
/** Largest RSA modulus accepted (4096 bits) and largest ECC coordinate (P-521 → 66). */
export const MAX_RSA_KEY_BYTES = 512;
export const MAX_ECC_KEY_BYTES = 128;

export interface CurveInfo {
  readonly jwkCrv: "P-256" | "P-384" | "P-521";
  readonly nodeCurve: "prime256v1" | "secp384r1" | "secp521r1";
  readonly coordBytes: number;
}

const CURVES: ReadonlyMap<number, CurveInfo> = new Map<number, CurveInfo>([
  [TPM_ECC_CURVE.NIST_P256, { jwkCrv: "P-256", nodeCurve: "prime256v1", coordBytes: 32 }],
  [TPM_ECC_CURVE.NIST_P384, { jwkCrv: "P-384", nodeCurve: "secp384r1", coordBytes: 48 }],
  [TPM_ECC_CURVE.NIST_P521, { jwkCrv: "P-521", nodeCurve: "secp521r1", coordBytes: 66 }],
]);

export function curveInfo(curveId: number): CurveInfo | undefined {
  return CURVES.get(curveId);
}
