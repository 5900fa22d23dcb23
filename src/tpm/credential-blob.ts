import { guardDecode, malformed, TpmReader, TpmWriter } from "./bytes.js";
import { MAX_DIGEST_BYTES, MAX_RSA_KEY_BYTES } from "./constants.js";

/** tpm2-tools credential file magic and version (`tpm2_makecredential -o`, `tpm2_activatecredential -i`). */
export const CREDENTIAL_BLOB_MAGIC = 0xbadcc0de;
export const CREDENTIAL_BLOB_VERSION = 1;

/** TPMS_ID_OBJECT: TPM2B_DIGEST integrityHMAC ‖ TPM2B_DIGEST encIdentity (encrypted, so opaque). */
export const MAX_ID_OBJECT_BYTES = 2 * (2 + MAX_DIGEST_BYTES);
/** TPMU_ENCRYPTED_SECRET is at most an RSA-4096 ciphertext. */
export const MAX_ENCRYPTED_SECRET_BYTES = MAX_RSA_KEY_BYTES;

/** The two outputs of TPM2_MakeCredential (contents of the TPM2Bs, without their size prefix). */
export interface CredentialBlob {
  /** TPM2B_ID_OBJECT contents: TPM2B_DIGEST(outer HMAC) ‖ encIdentity. */
  readonly idObject: Uint8Array;
  /** TPM2B_ENCRYPTED_SECRET contents: RSA-OAEP ciphertext, or a marshaled TPMS_ECC_POINT. */
  readonly encryptedSecret: Uint8Array;
}

/** tpm2-tools file format: BADCC0DE ‖ 00000001 ‖ TPM2B_ID_OBJECT ‖ TPM2B_ENCRYPTED_SECRET. */
export function encodeCredentialBlob(c: CredentialBlob): Uint8Array {
  return new TpmWriter()
    .u32(CREDENTIAL_BLOB_MAGIC)
    .u32(CREDENTIAL_BLOB_VERSION)
    .tpm2b(c.idObject, "credentialBlob")
    .tpm2b(c.encryptedSecret, "secret")
    .finish();
}

/** @throws ERR_TPM_STRUCT_MALFORMED */
export function decodeCredentialBlob(bytes: Uint8Array): CredentialBlob {
  return guardDecode("CREDENTIAL_BLOB", bytes, (buf) => {
    const r = new TpmReader(buf, "CREDENTIAL_BLOB");
    if (r.u32("magic") !== CREDENTIAL_BLOB_MAGIC)
      throw malformed("CREDENTIAL_BLOB", "magic", "is not BADCC0DE");
    if (r.u32("version") !== CREDENTIAL_BLOB_VERSION)
      throw malformed("CREDENTIAL_BLOB", "version", "is not 1");
    const idObject = r.tpm2b("credentialBlob", MAX_ID_OBJECT_BYTES, 1);
    const encryptedSecret = r.tpm2b("secret", MAX_ENCRYPTED_SECRET_BYTES, 1);
    r.end();
    return { idObject, encryptedSecret };
  });
}

/** Splits TPMS_ID_OBJECT contents into the outer HMAC and the encrypted identity. @throws ERR_TPM_STRUCT_MALFORMED */
export function decodeIdObject(idObject: Uint8Array): { integrityHmac: Uint8Array; encIdentity: Uint8Array } {
  return guardDecode("TPMS_ID_OBJECT", idObject, (buf) => {
    const r = new TpmReader(buf, "TPMS_ID_OBJECT");
    const integrityHmac = r.tpm2b("integrityHMAC", MAX_DIGEST_BYTES, 1);
    if (r.remaining === 0) throw malformed("TPMS_ID_OBJECT", "encIdentity", "is empty");
    const encIdentity = r.bytes(r.remaining, "encIdentity");
    return { integrityHmac, encIdentity };
  });
}
