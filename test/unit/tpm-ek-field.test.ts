import "reflect-metadata";
import { generateKeyPairSync, X509Certificate as NodeX509, webcrypto } from "node:crypto";
import * as x509 from "@peculiar/x509";
import { describe, expect, it } from "vitest";
import { ekCertificateFor } from "../../src/enroll/tpm-adapter.js";
import type { EkPublic } from "../../src/keys/tpm/endorsement.js";
import { verifyEkCertificate } from "../../src/registrar/verifier/tpm-verifier.js";
import { TPMA_OBJECT as A, TPM_ALG } from "../../src/tpm/constants.js";
import { certificatePublicKey, isRsaesOaepSpki, normalizeRsaesOaepSpki } from "../../src/tpm/ek-cert-key.js";
import { ekAuthorizationOf, ekPolicyA, ekPolicyB, ekPolicyC } from "../../src/tpm/ek-policy.js";
import { computeName, encodeTpm2bPublic, encodeTpmtPublic, publicAreaFromKey } from "../../src/tpm/public.js";
import { oaepLabelledSpki } from "./tpm-ek-kit.js";

const hex = (b: Uint8Array) => Buffer.from(b).toString("hex");

describe("TCG EK policies (EK Credential Profile 2.3+)", () => {
  it("PolicyA, PolicyC and PolicyB = PolicyOR(A, C) equal the published digests", () => {
    expect(hex(ekPolicyA("sha256"))).toBe("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa");
    expect(hex(ekPolicyB("sha256"))).toBe("ca3d0a99a2b93906f7a3342414efcfb3a385d44cd1fd459089d19b5071c0b7a0");
    expect(hex(ekPolicyA("sha384"))).toBe(
      "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e143e8bb1133824ccb431053871c6db53",
    );
    expect(hex(ekPolicyB("sha384"))).toBe(
      "b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4cb1c0ad9bde419cacb47ba09699646150f9fc000f3f80e12",
    );
    expect(hex(ekPolicyB("sha512"))).toBe(
      "b8221ca69e8550a4914de3faa6a18c072cc01208073a928d5d66d59ef79e49a429c41a6b269571d57edb25fbdb1838425608b413cd616a5f6db5b6071af99bea",
    );
    expect(ekPolicyC("sha256")).toHaveLength(32);
  });

  it("picks the session from the EK's public area", () => {
    const low =
      A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.adminWithPolicy | A.restricted | A.decrypt;
    const high = low | A.userWithAuth;
    expect(
      ekAuthorizationOf({ nameAlg: TPM_ALG.SHA256, objectAttributes: low, authPolicy: ekPolicyA("sha256") }),
    ).toEqual({
      kind: "policy-a",
      hash: "sha256",
    });
    const b384 = ekAuthorizationOf({
      nameAlg: TPM_ALG.SHA384,
      objectAttributes: high,
      authPolicy: ekPolicyB("sha384"),
    });
    expect(b384?.kind).toBe("policy-b");
    expect(b384?.kind === "policy-b" && b384.branches.map(hex)).toEqual([
      hex(ekPolicyA("sha384")),
      hex(ekPolicyC("sha384")),
    ]);
    // PolicyB without userWithAuth (policy-only variant) still gets the policy session.
    expect(
      ekAuthorizationOf({ nameAlg: TPM_ALG.SHA256, objectAttributes: low, authPolicy: ekPolicyB("sha256") })
        ?.kind,
    ).toBe("policy-b");
    // A sha256 policy digest on a sha384 EK is not its policy.
    expect(
      ekAuthorizationOf({ nameAlg: TPM_ALG.SHA384, objectAttributes: low, authPolicy: ekPolicyB("sha256") }),
    ).toBeUndefined();
    expect(
      ekAuthorizationOf({ nameAlg: TPM_ALG.SHA256, objectAttributes: high, authPolicy: new Uint8Array(32) }),
    ).toEqual({
      kind: "password",
    });
    expect(
      ekAuthorizationOf({ nameAlg: TPM_ALG.SHA256, objectAttributes: low, authPolicy: new Uint8Array(32) }),
    ).toBeUndefined();
  });
});

describe("RSA EK certificates with the id-RSAES-OAEP key OID", () => {
  const alg = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" } as const;
  const now = new Date();
  const day = 86_400_000;

  async function chain(spki: Uint8Array) {
    const rootK = (await webcrypto.subtle.generateKey(alg, true, [
      "sign",
      "verify",
    ])) as webcrypto.CryptoKeyPair;
    const root = await x509.X509CertificateGenerator.createSelfSigned({
      serialNumber: "01",
      name: "CN=OAEP TPM Root CA",
      notBefore: new Date(now.getTime() - day),
      notAfter: new Date(now.getTime() + 365 * day),
      keys: rootK,
      signingAlgorithm: alg,
      extensions: [new x509.BasicConstraintsExtension(true, 1, true)],
    });
    const leaf = await x509.X509CertificateGenerator.create({
      serialNumber: "02",
      subject: "",
      issuer: root.subject,
      notBefore: new Date(now.getTime() - day),
      notAfter: new Date(now.getTime() + 300 * day),
      signingKey: rootK.privateKey,
      publicKey: spki,
      signingAlgorithm: alg,
      extensions: [
        new x509.SubjectAlternativeNameExtension(
          [{ type: "dn", value: "2.23.133.2.1=id:49465800, 2.23.133.2.2=SLB9670, 2.23.133.2.3=id:0007003D" }],
          true,
        ),
        new x509.BasicConstraintsExtension(false, undefined, true),
      ],
    });
    return { rootPem: root.toString("pem"), leafDer: new Uint8Array(leaf.rawData) };
  }

  it("is accepted by the EK chain verifier and yields the same RSA key", async () => {
    const { publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
    const rsaSpki = new Uint8Array(publicKey.export({ type: "spki", format: "der" }));
    const oaep = oaepLabelledSpki(rsaSpki);
    expect(isRsaesOaepSpki(oaep)).toBe(true);
    expect(isRsaesOaepSpki(rsaSpki)).toBe(false);
    expect(hex(normalizeRsaesOaepSpki(oaep))).toBe(hex(rsaSpki));
    const { rootPem, leafDer } = await chain(oaep);
    // What the verifier had to work around: OpenSSL itself cannot use this key.
    expect(() => new NodeX509(Buffer.from(leafDer)).publicKey).toThrow();
    const v = await verifyEkCertificate(leafDer, [rootPem], [], now);
    expect(v.publicKey.equals(publicKey)).toBe(true);
    expect(certificatePublicKey(leafDer).equals(publicKey)).toBe(true);
  });

  it("a tampered OAEP certificate is still refused (signature over the relabelled SPKI)", async () => {
    const { publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
    const { rootPem, leafDer } = await chain(
      oaepLabelledSpki(new Uint8Array(publicKey.export({ type: "spki", format: "der" }))),
    );
    const bad = Uint8Array.from(leafDer);
    const i = Buffer.from(bad).indexOf(Buffer.from("TCPA"));
    bad[i] = 0x55;
    await expect(verifyEkCertificate(bad, [rootPem], [], now)).rejects.toMatchObject({
      code: "ERR_EK_CERT_UNTRUSTED",
    });
  });
});

describe("enrolment picks the EK certificate whose key is the EK's", () => {
  const alg = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" } as const;

  async function certFor(spki: Uint8Array): Promise<Uint8Array> {
    const k = (await webcrypto.subtle.generateKey(alg, true, ["sign", "verify"])) as webcrypto.CryptoKeyPair;
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: "03",
      subject: "",
      issuer: "CN=EK CA",
      notBefore: new Date(Date.now() - 86_400_000),
      notAfter: new Date(Date.now() + 86_400_000),
      signingKey: k.privateKey,
      publicKey: spki,
      signingAlgorithm: alg,
    });
    return new Uint8Array(cert.rawData);
  }

  function ekOf(key: ReturnType<typeof generateKeyPairSync>["publicKey"]): EkPublic {
    const objectAttributes =
      A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.adminWithPolicy | A.restricted | A.decrypt;
    const area = publicAreaFromKey(key, { objectAttributes, authPolicy: ekPolicyA("sha256") });
    return {
      handle: 0x81010001,
      kind: "rsa-2048",
      created: false,
      activationSupported: true,
      tpmtPublic: encodeTpmtPublic(area),
      tpm2bPublic: encodeTpm2bPublic(area),
      pem: key.export({ type: "spki", format: "pem" }).toString(),
      name: computeName(area),
      objectAttributes,
    };
  }

  it("two RSA-2048 certificates (L-1 of another key, H-1 of this EK, OAEP-labelled): the matching one", async () => {
    const mine = generateKeyPairSync("rsa", { modulusLength: 2048 }).publicKey;
    const other = generateKeyPairSync("rsa", { modulusLength: 2048 }).publicKey;
    const spki = (k: typeof mine) => new Uint8Array(k.export({ type: "spki", format: "der" }));
    const l1 = { nvIndex: 0x01c00002, kind: "rsa-2048" as const, der: await certFor(spki(other)) };
    const h1 = {
      nvIndex: 0x01c00012,
      kind: "rsa-2048" as const,
      der: await certFor(oaepLabelledSpki(spki(mine))),
    };
    const garbage = {
      nvIndex: 0x01c0000a,
      kind: "rsa-2048" as const,
      der: new Uint8Array([0x30, 0x03, 1, 2, 3]),
    };
    expect(ekCertificateFor(ekOf(mine), [garbage, l1, h1])?.nvIndex).toBe(0x01c00012);
    // No certificate of this key: none (sending another key's certificate would only be refused).
    expect(ekCertificateFor(ekOf(mine), [l1])).toBeUndefined();
  });
});
