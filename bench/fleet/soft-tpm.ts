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

/** objectAttributes of the software EK, AK and device key: those of the real templates. */
export const SOFT_TPM_ATTRS = {
  ek: A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.adminWithPolicy | A.restricted | A.decrypt,
  ak: A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.userWithAuth | A.noDA | A.restricted | A.sign,
  device: A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.userWithAuth | A.noDA | A.sign,
} as const;
/** TCG EK Credential Profile: PolicyA (PolicySecret(TPM_RH_ENDORSEMENT)), SHA-256. */
const EK_POLICY_A = Buffer.from("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa", "hex");

/** The keys a software TPM plays with (any EK type the verifier accepts; the AK is P-256). */
export interface SoftTpmKeys {
  readonly ek: { readonly publicKey: KeyObject; readonly privateKey: KeyObject };
  readonly ak: { readonly publicKey: KeyObject; readonly privateKey: KeyObject };
  /** Holds the device key (what the agent signs JWS, CSRs and DPoP with). */
  readonly device: FakeKeyProvider;
  /** EK authPolicy (PolicyA for a TCG-profile EK; empty when absent). */
  readonly ekAuthPolicy?: Buffer;
  /** EK certificate (DER), returned by readEndorsement when present. */
  readonly ekCertDer?: Uint8Array;
  /** TPMS_ATTEST firmwareVersion (default 1). */
  readonly firmwareVersion?: bigint;
}

let clockCounter = 0n;

/**
 * The TPM attestation operations of enrolment (`EnrollTpmOps`) played in software with `keys`:
 * ActivateCredential with the EK private key, TPM2_Certify of the device key signed by the AK.
 */
export async function softTpmOps(keys: SoftTpmKeys): Promise<{ ops: EnrollTpmOps; ekPublic: TpmtPublic }> {
  const ekPub = publicAreaFromKey(keys.ek.publicKey, {
    objectAttributes: SOFT_TPM_ATTRS.ek,
    ...(keys.ekAuthPolicy === undefined ? {} : { authPolicy: keys.ekAuthPolicy }),
    symmetric: { algorithm: TPM_ALG.AES, keyBits: 128, mode: TPM_ALG.CFB },
  });
  const akPub = publicAreaFromKey(keys.ak.publicKey, {
    objectAttributes: SOFT_TPM_ATTRS.ak,
    scheme: { scheme: TPM_ALG.ECDSA, hashAlg: TPM_ALG.SHA256 },
  });
  const info = await keys.device.createOrOpen();
  const devPub = publicAreaFromKey(createPublicKey(info.spkiPem), {
    objectAttributes: SOFT_TPM_ATTRS.device,
  });
  const akName = computeName(akPub);
  const qualifiedSigner = akQualifiedNameUnderEk(ekPub, akPub);
  const devName = computeName(devPub);
  const ekBytes = encodeTpm2bPublic(ekPub);
  const akBytes = encodeTpm2bPublic(akPub);
  const devBytes = encodeTpm2bPublic(devPub);
  const { ekCertDer } = keys;
  return {
    ekPublic: ekPub,
    ops: {
      readEndorsement: async () => ({ ekPublic: ekBytes, ...(ekCertDer === undefined ? {} : { ekCertDer }) }),
      ensureAk: async () => ({ akPublic: akBytes }),
      devicePublic: async () => devBytes,
      activateCredential: async (blob) =>
        new Secret(
          activateCredentialWithPrivateKey(ekPub, keys.ek.privateKey, akName, decodeCredentialBlob(blob)),
        ),
      certify: async (nonce) => {
        clockCounter += 1000n;
        const attest = encodeTpmsAttest({
          magic: TPM_GENERATED_VALUE,
          type: TPM_ST.ATTEST_CERTIFY,
          qualifiedSigner,
          extraData: nonce,
          clockInfo: { clock: clockCounter, resetCount: 0, restartCount: 0, safe: 1 },
          firmwareVersion: keys.firmwareVersion ?? 1n,
          attested: { kind: "certify", name: devName, qualifiedName: devName },
        });
        const sig = cryptoSign("sha256", attest, { key: keys.ak.privateKey, dsaEncoding: "ieee-p1363" });
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

export interface SoftTpmDevice {
  /** The device key, held by a software KeyProvider (what the agent signs JWS, CSRs and DPoP with). */
  readonly provider: FakeKeyProvider;
  readonly ops: EnrollTpmOps;
  readonly ekPublic: TpmtPublic;
}

/** Creates one simulated TPM (keys generated now) with its EK certificate from `ekCa`. */
export async function createSoftTpmDevice(ekCa: TestEkCa, label: string): Promise<SoftTpmDevice> {
  // Not generateKeyPairSync: see generateP256KeyPair (a Node 20 GC deadlock at fleet scale).
  const ek = generateP256KeyPair();
  const ak = generateP256KeyPair();
  const provider = new FakeKeyProvider({ store: new FakeKeyStore(), label });
  const ekCertDer = await ekCa.issue(ek.publicKey, label);
  const soft = await softTpmOps({
    ek,
    ak,
    device: provider,
    ekAuthPolicy: EK_POLICY_A,
    ekCertDer,
    firmwareVersion: 0x2000_0000_0000_0000n,
  });
  return { provider, ...soft };
}
