import "reflect-metadata";
import { type KeyObject, randomBytes, webcrypto } from "node:crypto";
import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import * as x509 from "@peculiar/x509";

/**
 * A test "TPM manufacturer": a root and an intermediate CA that issue EK certificates for the
 * simulated TPMs of the fleet simulator. SIMULATION ONLY: real EK certificates come from the TPM
 * vendor and sit in the TPM's NV memory; here the simulator makes them, so they prove nothing about
 * hardware. The registrar is configured to trust this CA exactly as an operator trusts a vendor's,
 * and verifies the certificates on the same code path (path building, signatures, validity, key match).
 */
const SIGN_ALG = { name: "ECDSA", hash: "SHA-256" } as const;
const EC_ALG = { name: "ECDSA", namedCurve: "P-256" } as const;
const DAY_MS = 86_400_000;
const crypto = webcrypto;

export interface TestEkCa {
  readonly rootPem: string;
  readonly intermediatePem: string;
  /** Issues an EK certificate (DER) for the EK public key. */
  issue(ekPublic: KeyObject, label: string): Promise<Uint8Array>;
  /** Writes root.pem and intermediate.pem into `dir` (a group's `--ek-trust-dir`). */
  writeTrustDir(dir: string): Promise<void>;
}

function serial(): string {
  const b = randomBytes(16);
  b[0] = (b[0] ?? 0) & 0x7f;
  return b.toString("hex");
}

export async function createTestEkCa(name = "Simulated TPM Vendor"): Promise<TestEkCa> {
  const now = Date.now();
  const notBefore = new Date(now - DAY_MS);
  const notAfter = new Date(now + 3650 * DAY_MS);
  const rootKeys = (await crypto.subtle.generateKey(EC_ALG, true, [
    "sign",
    "verify",
  ])) as webcrypto.CryptoKeyPair;
  const root = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial(),
    name: `CN=${name} EK Root CA`,
    notBefore,
    notAfter,
    signingAlgorithm: SIGN_ALG,
    keys: rootKeys,
    extensions: [
      new x509.BasicConstraintsExtension(true, 1, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(rootKeys.publicKey),
    ],
  });
  const interKeys = (await crypto.subtle.generateKey(EC_ALG, true, [
    "sign",
    "verify",
  ])) as webcrypto.CryptoKeyPair;
  const inter = await x509.X509CertificateGenerator.create({
    serialNumber: serial(),
    subject: `CN=${name} EK Intermediate CA`,
    issuer: root.subject,
    notBefore,
    notAfter,
    signingAlgorithm: SIGN_ALG,
    publicKey: interKeys.publicKey,
    signingKey: rootKeys.privateKey,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
      await x509.SubjectKeyIdentifierExtension.create(interKeys.publicKey),
      await x509.AuthorityKeyIdentifierExtension.create(rootKeys.publicKey),
    ],
  });
  const interAki = await x509.AuthorityKeyIdentifierExtension.create(interKeys.publicKey);
  const rootPem = root.toString("pem");
  const intermediatePem = inter.toString("pem");
  return {
    rootPem,
    intermediatePem,
    async issue(ekPublic, label) {
      const spki = ekPublic.export({ format: "der", type: "spki" });
      const cert = await x509.X509CertificateGenerator.create({
        serialNumber: serial(),
        // TCG EK certificates have an empty subject and a SAN with TPM manufacturer OIDs; a CN keeps
        // the simulated ones recognisable in logs.
        subject: `CN=simulated EK ${label}`,
        issuer: inter.subject,
        notBefore,
        notAfter,
        signingAlgorithm: SIGN_ALG,
        publicKey: new x509.PublicKey(spki),
        signingKey: interKeys.privateKey,
        extensions: [
          new x509.BasicConstraintsExtension(false, undefined, true),
          new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyAgreement, true),
          interAki,
        ],
      });
      return new Uint8Array(cert.rawData);
    },
    async writeTrustDir(dir) {
      await writeFile(join(dir, "sim-vendor-root.pem"), rootPem);
      await writeFile(join(dir, "sim-vendor-intermediate.pem"), intermediatePem);
    },
  };
}
