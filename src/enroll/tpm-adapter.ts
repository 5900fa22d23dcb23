import { M2mError } from "../core/errors.js";
import { type EkCertificate, type EkPublic, RSA_EK_HANDLE } from "../keys/capabilities.js";
import type { KeyProvider } from "../keys/key-provider.js";
import { certificatePublicKey } from "../tpm/ek-cert-key.js";
import { decodeTpm2bPublic, publicKeyObject } from "../tpm/public.js";
import type { EnrollTpmOps } from "./tpm.js";

/** The EK enrolment activates credentials with (and whose hash the enrolment state records). */
export function enrolmentEk(eks: readonly EkPublic[]): EkPublic | undefined {
  return (
    eks.find((e) => e.kind === "rsa-2048" && e.activationSupported) ?? eks.find((e) => e.activationSupported)
  );
}

/**
 * The EK certificate whose public key is this EK's. A TPM may carry several certificates of one
 * algorithm (low-range L-1 and high-range H-1 both RSA-2048, say); the kind alone would pick the first,
 * whose key the registrar then finds different from the EK it activates against. Certificates that do
 * not parse are passed over (a vendor's odd one must not stop enrolment with another that matches).
 */
export function ekCertificateFor(ek: EkPublic, certs: readonly EkCertificate[]): EkCertificate | undefined {
  const ekKey = publicKeyObject(decodeTpm2bPublic(ek.tpm2bPublic));
  return certs.find((c) => {
    if (c.kind !== ek.kind) return false;
    try {
      return certificatePublicKey(c.der).equals(ekKey);
    } catch {
      return false;
    }
  });
}

/**
 * Binds the enrolment flow to a key's TPM attestation capability (EK, AK, certify through the key's
 * own serial TPM queue). The AK is created directly under the RSA EK (PolicyA), which is what the
 * registrar's qualified-signer check expects.
 * @throws ERR_ENROLL_CONFIG when the key has no TPM attestation.
 */
export function tpmEnrollOps(key: KeyProvider): EnrollTpmOps {
  const ops = key.attestation;
  if (ops === undefined)
    throw new M2mError("ERR_ENROLL_CONFIG", "permanent", "TPM enrolment needs a key with TPM attestation");
  let ekHandle = RSA_EK_HANDLE;
  return {
    async readEndorsement() {
      const ek = enrolmentEk(await ops.readEkPublics());
      if (ek === undefined) {
        throw new M2mError("ERR_TPM_EK", "permanent", "no endorsement key usable for credential activation", {
          hint: "the TPM needs a TCG low-range EK (RSA-2048 or ECC P-256 with PolicyA)",
        });
      }
      ekHandle = ek.handle;
      const certs = await ops.readEkCertificates();
      const cert = ekCertificateFor(ek, certs);
      return { ekPublic: ek.tpm2bPublic, ...(cert === undefined ? {} : { ekCertDer: cert.der }) };
    },
    async ensureAk() {
      const ak = await ops.createAk({ ekHandle });
      return { akPublic: ak.tpm2bPublic };
    },
    devicePublic: () => ops.devicePublic(),
    activateCredential: (blob) => ops.activateCredential(blob, ekHandle),
    certify: (nonce) => ops.certify(nonce),
  };
}
