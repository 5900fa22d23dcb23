import { M2mError } from "../core/errors.js";
import { RSA_EK_HANDLE, TpmAttestationOps } from "../keys/tpm/endorsement.js";
import type { TpmKeyProvider } from "../keys/tpm/tpm-provider.js";
import type { EnrollTpmOps } from "./tpm.js";

/**
 * Binds the enrolment flow to a real TPM: the device key of `provider` and the attestation operations
 * of src/keys/tpm/endorsement.ts (sharing the provider's serial TPM queue). The AK is created
 * directly under the RSA EK (PolicyA), which is what the registrar's qualified-signer check expects.
 */
export function tpmEnrollOps(provider: TpmKeyProvider, attestation?: TpmAttestationOps): EnrollTpmOps {
  const ops = attestation ?? new TpmAttestationOps(provider.runner, { akHandle: provider.akHandle });
  let ekHandle = RSA_EK_HANDLE;
  return {
    async readEndorsement() {
      const eks = await ops.readEkPublics();
      const ek =
        eks.find((e) => e.kind === "rsa-2048" && e.activationSupported) ??
        eks.find((e) => e.activationSupported);
      if (ek === undefined) {
        throw new M2mError("ERR_TPM_EK", "permanent", "no endorsement key usable for credential activation", {
          hint: "the TPM needs a TCG low-range EK (RSA-2048 or ECC P-256 with PolicyA)",
        });
      }
      ekHandle = ek.handle;
      const certs = await ops.readEkCertificates();
      const cert = certs.find((c) => c.kind === ek.kind);
      return { ekPublic: ek.tpm2bPublic, ...(cert === undefined ? {} : { ekCertDer: cert.der }) };
    },
    async ensureAk() {
      const ak = await ops.createAk({ ekHandle });
      return { akPublic: ak.tpm2bPublic };
    },
    async devicePublic() {
      const ev = await provider.evidence();
      if (ev.kind !== "tpm") throw new M2mError("ERR_KEY_EVIDENCE", "permanent", "not a TPM key");
      const tpmt = Buffer.from(ev.tpmtPublicHex, "hex");
      const out = Buffer.alloc(2 + tpmt.length);
      out.writeUInt16BE(tpmt.length, 0);
      tpmt.copy(out, 2);
      return new Uint8Array(out);
    },
    activateCredential: (blob) => ops.activateCredential(blob, ekHandle),
    certify: (nonce) => ops.certify(provider.keyHandle, provider.akHandle, nonce),
  };
}
