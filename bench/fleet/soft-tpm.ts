import { createPublicKey, sign as cryptoSign, type KeyObject } from "node:crypto";
import { Secret } from "../../src/core/secret.js";
import type { EnrollTpmOps } from "../../src/enroll/index.js";
import { FakeKeyProvider, FakeKeyStore } from "../../src/keys/fake/fake-provider.js";
import { generateP256KeyPair } from "../../src/keys/fake/p256.js";
import { akQualifiedNameUnderEk } from "../../src/registrar/verifier/tpm-verifier.js";
import {
  TPMA_OBJECT as A,
  activateCredentialWithPrivateKey,
  computeName,
  decodeCredentialBlob,
  encodeTpm2bPublic,
  encodeTpmsAttest,
  encodeTpmtSignature,
  publicAreaFromKey,
  TPM_ALG,
  TPM_GENERATED_VALUE,
  TPM_ST,
  type TpmtPublic,
} from "../../src/tpm/index.js";
import type { TestEkCa } from "./ek-ca.js";

/**
 * A SIMULATED TPM for the fleet simulator: EK, AK and device key are ordinary node:crypto keys held
 * in process memory, dressed as the structures a TPM 2.0 produces. It exists to load the registrar
 * with thousands of distinct devices; it is not hardware and proves nothing about any.
 *
 * What is faithful (so the registrar's verifier takes the path real evidence takes):
 * - EK: the TCG default ECC template (NIST P-256, restricted decrypt, AES-128-CFB, PolicyA), with an
 *   EK certificate from a test vendor CA ({@link TestEkCa}) the registrar trusts like a vendor's.
 * - AK: restricted ECDSA-SHA256 signing key under the EK; its qualified name is QN(AK under EK).
 * - ActivateCredential: done in software with the EK private key (`activateCredentialWithPrivateKey`:
 *   ECDH seed recovery, KDFa, integrity HMAC over the AK Name, AES-CFB), exactly what the TPM computes.
 * - TPM2_Certify: a TPMS_ATTEST (magic, type certify, QN(AK), the registrar's nonce, the device key's
 *   Name) signed by the AK as a TPMT_SIGNATURE.
 * What is not: nothing stops this "TPM" from signing anything (a real restricted AK refuses to sign
 * data starting with TPM_GENERATED_VALUE that the TPM did not build); clock/firmware fields are made up.
 */

const EK_ATTRS =
  A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.adminWithPolicy | A.restricted | A.decrypt;
const AK_ATTRS =
  A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.userWithAuth | A.noDA | A.restricted | A.sign;
const DEVICE_ATTRS = A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.userWithAuth | A.noDA | A.sign;
/** TCG EK Credential Profile: PolicyA (PolicySecret(TPM_RH_ENDORSEMENT)), SHA-256. */
const EK_POLICY_A = Buffer.from("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa", "hex");

export interface SoftTpmDevice {
  /** The device key, held by a software KeyProvider (what the agent signs JWS, CSRs and DPoP with). */
  readonly provider: FakeKeyProvider;
  readonly ops: EnrollTpmOps;
  readonly ekPublic: TpmtPublic;
}

let clockCounter = 0n;

/** Creates one simulated TPM (keys generated now) with its EK certificate from `ekCa`. */
export async function createSoftTpmDevice(ekCa: TestEkCa, label: string): Promise<SoftTpmDevice> {
  // Not generateKeyPairSync: see generateP256KeyPair (a Node 20 GC deadlock at fleet scale).
  const ek = generateP256KeyPair();
  const ak = generateP256KeyPair();
  const provider = new FakeKeyProvider({ store: new FakeKeyStore(), label });
  const info = await provider.createOrOpen();
  const ekPub = publicAreaFromKey(ek.publicKey, {
    objectAttributes: EK_ATTRS,
    authPolicy: EK_POLICY_A,
    symmetric: { algorithm: TPM_ALG.AES, keyBits: 128, mode: TPM_ALG.CFB },
  });
  const akPub = publicAreaFromKey(ak.publicKey, {
    objectAttributes: AK_ATTRS,
    scheme: { scheme: TPM_ALG.ECDSA, hashAlg: TPM_ALG.SHA256 },
  });
  const devPub = publicAreaFromKey(createPublicKey(info.spkiPem), { objectAttributes: DEVICE_ATTRS });
  const ekCertDer = await ekCa.issue(ek.publicKey, label);
  const akName = computeName(akPub);
  const qualifiedSigner = akQualifiedNameUnderEk(ekPub, akPub);
  const devName = computeName(devPub);
  const ekBytes = encodeTpm2bPublic(ekPub);
  const akBytes = encodeTpm2bPublic(akPub);
  const devBytes = encodeTpm2bPublic(devPub);
  const ekPriv: KeyObject = ek.privateKey;
  const akPriv: KeyObject = ak.privateKey;
  return {
    provider,
    ekPublic: ekPub,
    ops: {
      readEndorsement: async () => ({ ekPublic: ekBytes, ekCertDer }),
      ensureAk: async () => ({ akPublic: akBytes }),
      devicePublic: async () => devBytes,
      activateCredential: async (blob) =>
        new Secret(activateCredentialWithPrivateKey(ekPub, ekPriv, akName, decodeCredentialBlob(blob))),
      certify: async (nonce) => {
        clockCounter += 1000n;
        const attest = encodeTpmsAttest({
          magic: TPM_GENERATED_VALUE,
          type: TPM_ST.ATTEST_CERTIFY,
          qualifiedSigner,
          extraData: nonce,
          clockInfo: { clock: clockCounter, resetCount: 0, restartCount: 0, safe: 1 },
          firmwareVersion: 0x2000_0000_0000_0000n,
          attested: { kind: "certify", name: devName, qualifiedName: devName },
        });
        const sig = cryptoSign("sha256", attest, { key: akPriv, dsaEncoding: "ieee-p1363" });
        const signature = encodeTpmtSignature({
          sigAlg: TPM_ALG.ECDSA,
          hashAlg: TPM_ALG.SHA256,
          r: sig.subarray(0, 32),
          s: sig.subarray(32),
        });
        return { attest, signature };
      },
    },
  };
}
