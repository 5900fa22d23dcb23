import { webcrypto } from "node:crypto";
import * as x509 from "@peculiar/x509";

const alg = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" } as const;

/**
 * A PEM certificate with subject CN=dev-1 for the P-256 key `spkiPem`, signed by a fresh throwaway CA
 * (the registrar's role, for tests that only need an enrolment state on disk).
 */
export async function throwawayDeviceCert(
  spkiPem: string,
  o: { serialNumber: string; issuer: string; notBefore: Date; notAfter: Date },
): Promise<string> {
  const ca = await webcrypto.subtle.generateKey(alg, true, ["sign", "verify"]);
  const der = Buffer.from(spkiPem.replace(/-----[^-]+-----|\s/g, ""), "base64");
  const pub = await webcrypto.subtle.importKey("spki", der, alg, true, ["verify"]);
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: o.serialNumber,
    subject: "CN=dev-1",
    issuer: o.issuer,
    notBefore: o.notBefore,
    notAfter: o.notAfter,
    signingAlgorithm: alg,
    publicKey: pub,
    signingKey: ca.privateKey,
  });
  return cert.toString("pem");
}
