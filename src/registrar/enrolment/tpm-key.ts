import { M2mError } from "../../core/errors.js";
import { publicKeyObject, type TpmtPublic } from "../../tpm/public.js";
import { TPM_VERIFY_ERRORS } from "../verifier/tpm-verifier.js";

/** SPKI DER of a TPM public area. @throws ERR_TPM_STRUCT_MALFORMED */
export function deviceKeyObject(p: TpmtPublic): Buffer {
  try {
    return publicKeyObject(p).export({ format: "der", type: "spki" });
  } catch (err) {
    throw new M2mError(TPM_VERIFY_ERRORS.TPM_STRUCT_MALFORMED, "permanent", "device public is malformed", {
      cause: err,
    });
  }
}
