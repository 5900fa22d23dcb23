import "reflect-metadata";
import { createPublicKey } from "node:crypto";
import * as x509 from "@peculiar/x509";
import { M2mError } from "../core/errors.js";
import type { JwsAlgorithm, KeyInfo, KeyProvider } from "./key-provider.js";

/**
 * Builds a PKCS#10 CSR whose signature is made by the hardware key behind a KeyProvider.
 *
 * @peculiar/x509 signs through a WebCrypto `subtle.sign(alg, privateKey, data)`. WebCrypto's ECDSA
 * returns r‖s, which is exactly what `KeyProvider.sign(…, "ES256")` returns, so a minimal WebCrypto
 * facade (exportKey + sign) backed by the provider is enough; the private key never leaves it.
 */
export async function createCsr(
  provider: KeyProvider,
  info: KeyInfo,
  options: { readonly commonName: string },
): Promise<Uint8Array> {
  const spki = createPublicKey(info.spkiPem).export({ format: "der", type: "spki" });
  const spkiBuf = spki.buffer.slice(spki.byteOffset, spki.byteOffset + spki.byteLength);
  const { keyAlgorithm, jwsAlg, signingAlgorithm } = algorithmsFor(info);

  const publicKey = { type: "public", algorithm: keyAlgorithm, extractable: true, usages: ["verify"] };
  const privateKey = { type: "private", algorithm: keyAlgorithm, extractable: false, usages: ["sign"] };
  const subtle = {
    exportKey: async (format: string, key: unknown): Promise<ArrayBuffer> => {
      if (format !== "spki" || key !== publicKey) {
        throw new M2mError("ERR_CSR_BUILD", "permanent", `unsupported export ${format}`);
      }
      return spkiBuf;
    },
    sign: async (_alg: unknown, key: unknown, data: ArrayBuffer | ArrayBufferView): Promise<ArrayBuffer> => {
      if (key !== privateKey) throw new M2mError("ERR_CSR_BUILD", "permanent", "unexpected signing key");
      const bytes = ArrayBuffer.isView(data)
        ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength)
        : new Uint8Array(data);
      const sig = await provider.sign(bytes, jwsAlg);
      return sig.buffer.slice(sig.byteOffset, sig.byteOffset + sig.byteLength) as ArrayBuffer;
    },
  };
  type GenParams = Parameters<typeof x509.Pkcs10CertificateRequestGenerator.create>;
  const facade = { subtle } as unknown as NonNullable<GenParams[1]>;
  const keys = { publicKey, privateKey } as unknown as GenParams[0]["keys"];
  try {
    const csr = await x509.Pkcs10CertificateRequestGenerator.create(
      { name: [{ CN: [options.commonName] }], keys, signingAlgorithm },
      facade,
    );
    return new Uint8Array(csr.rawData);
  } catch (err) {
    if (err instanceof M2mError) throw err;
    throw new M2mError("ERR_CSR_BUILD", "permanent", "could not build the CSR", { cause: err });
  }
}

function algorithmsFor(info: KeyInfo): {
  keyAlgorithm: Record<string, unknown>;
  jwsAlg: JwsAlgorithm;
  signingAlgorithm: Record<string, unknown> & { name: string };
} {
  switch (info.algorithm) {
    case "ec-p256":
      return {
        keyAlgorithm: { name: "ECDSA", namedCurve: "P-256" },
        jwsAlg: "ES256",
        signingAlgorithm: { name: "ECDSA", hash: "SHA-256" },
      };
    case "rsa-2048":
      return {
        keyAlgorithm: { name: "RSASSA-PKCS1-v1_5", hash: { name: "SHA-256" }, modulusLength: 2048 },
        jwsAlg: "RS256",
        signingAlgorithm: { name: "RSASSA-PKCS1-v1_5", hash: "SHA-256" },
      };
  }
}
