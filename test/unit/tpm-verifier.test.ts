import "reflect-metadata";
import { sign as cryptoSign, generateKeyPairSync, type KeyObject, randomBytes, webcrypto } from "node:crypto";
import * as x509 from "@peculiar/x509";
import { beforeAll, describe, expect, it } from "vitest";
import { M2mError } from "../../src/core/errors.js";
import {
  type ActivationEvidence,
  akQualifiedNameUnderEk,
  beginActivation,
  checkAkPublic,
  checkDeviceKey,
  checkEkAllowlisted,
  checkEkPublic,
  TPM_VERIFY_ERRORS as E,
  ekFingerprint,
  ekPublicMatchesCert,
  verifyActivationAndCertify,
  verifyEkCertificate,
} from "../../src/registrar/verifier/tpm-verifier.js";
import { decodeTpmsAttest, encodeTpmsAttest, type TpmsAttest } from "../../src/tpm/attest.js";
import { TPMA_OBJECT as A, TPM_ALG, TPM_GENERATED_VALUE, TPM_ST } from "../../src/tpm/constants.js";
import { activateCredentialWithPrivateKey } from "../../src/tpm/make-credential.js";
import {
  computeName,
  computeQualifiedName,
  encodeTpm2bPublic,
  handleBytes,
  publicAreaFromKey,
  type TpmtPublic,
} from "../../src/tpm/public.js";
import { encodeTpmtSignature, type TpmtSignature } from "../../src/tpm/signature.js";

// Synthesized evidence: Node keys wrapped as TPMT_PUBLIC, a software "AK" signing self-built TPMS_ATTEST,
// software EK (its private half is used only to play the TPM's ActivateCredential). Each tamper row changes
// one thing and expects that check's own code. Real swtpm evidence: test/integration/verifier-swtpm.test.ts.

const EK_ATTRS =
  A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.adminWithPolicy | A.restricted | A.decrypt;
const AK_ATTRS =
  A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.userWithAuth | A.noDA | A.restricted | A.sign;
const DEV_ATTRS = A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.userWithAuth | A.noDA | A.sign;
const AES128CFB = { algorithm: TPM_ALG.AES, keyBits: 128, mode: TPM_ALG.CFB };
const ECDSA256 = { scheme: TPM_ALG.ECDSA, hashAlg: TPM_ALG.SHA256 };
const RSASSA256 = { scheme: TPM_ALG.RSASSA, hashAlg: TPM_ALG.SHA256 };

const ec = (curve = "prime256v1") => generateKeyPairSync("ec", { namedCurve: curve });
const rsa = (bits = 2048) => generateKeyPairSync("rsa", { modulusLength: bits });

interface SoftKey {
  readonly priv: KeyObject;
  readonly pub: TpmtPublic;
  readonly key?: KeyObject;
}

let ekRsa: SoftKey;
let ekEcc: SoftKey;
let akEcc: SoftKey;
let akRsa: SoftKey;
let device: SoftKey;
let otherEc: KeyObject;

function softKey(pair: { privateKey: KeyObject; publicKey: KeyObject }, attrs: number, extra = {}): SoftKey {
  return {
    priv: pair.privateKey,
    key: pair.publicKey,
    pub: publicAreaFromKey(pair.publicKey, { objectAttributes: attrs, ...extra }),
  };
}

function tpmSign(
  priv: KeyObject,
  data: Uint8Array,
  alg: number = TPM_ALG.ECDSA,
  hash = "sha256",
): TpmtSignature {
  const hashAlg = hash === "sha256" ? TPM_ALG.SHA256 : hash === "sha384" ? TPM_ALG.SHA384 : TPM_ALG.SHA1;
  if (alg === TPM_ALG.ECDSA) {
    const sig = cryptoSign(hash, data, { key: priv, dsaEncoding: "ieee-p1363" });
    const h = sig.length / 2;
    return { sigAlg: TPM_ALG.ECDSA, hashAlg, r: sig.subarray(0, h), s: sig.subarray(h) };
  }
  return { sigAlg: TPM_ALG.RSASSA, hashAlg, sig: cryptoSign(hash, data, priv) };
}

interface Build {
  ek?: SoftKey;
  ak?: SoftKey;
  dev?: SoftKey;
  mutateAttest?: (a: TpmsAttest) => TpmsAttest;
  signer?: (data: Uint8Array) => TpmtSignature;
  mutateAttestBytes?: (b: Uint8Array) => Uint8Array;
  recovered?: (s: Uint8Array) => Uint8Array;
  nonceAtFinish?: (n: Uint8Array) => Uint8Array;
}

/** Runs begin → (software) activate → certify → evidence, with one optional change. */
function evidence(b: Build = {}): ActivationEvidence {
  const ek = b.ek ?? ekRsa;
  const ak = b.ak ?? akEcc;
  const dev = b.dev ?? device;
  const akName = computeName(ak.pub);
  const ch = beginActivation(ek.pub, akName);
  const recovered = activateCredentialWithPrivateKey(ek.pub, ek.priv, akName, ch);
  let attest: TpmsAttest = {
    magic: TPM_GENERATED_VALUE,
    type: TPM_ST.ATTEST_CERTIFY,
    qualifiedSigner: akQualifiedNameUnderEk(ek.pub, ak.pub),
    extraData: ch.nonce,
    clockInfo: { clock: 123456n, resetCount: 1, restartCount: 0, safe: 1 },
    firmwareVersion: 0x2019_0000_0000_0001n,
    attested: { kind: "certify", name: computeName(dev.pub), qualifiedName: computeName(dev.pub) },
  };
  if (b.mutateAttest) attest = b.mutateAttest(attest);
  const attestBytes = encodeTpmsAttest(attest);
  const sig = b.signer
    ? b.signer(attestBytes)
    : tpmSign(ak.priv, attestBytes, ak.pub.type === TPM_ALG.RSA ? TPM_ALG.RSASSA : TPM_ALG.ECDSA);
  return {
    expectedSecret: ch.secret,
    recoveredSecret: b.recovered ? b.recovered(recovered) : recovered,
    ekPublic: ek.pub,
    akPublic: encodeTpm2bPublic(ak.pub),
    nonce: b.nonceAtFinish ? b.nonceAtFinish(ch.nonce) : ch.nonce,
    attestBytes: b.mutateAttestBytes ? b.mutateAttestBytes(attestBytes) : attestBytes,
    signatureBytes: encodeTpmtSignature(sig),
    devicePublic: encodeTpm2bPublic(dev.pub),
  };
}

function codeOf(fn: () => unknown): string {
  try {
    fn();
  } catch (err) {
    if (err instanceof M2mError) return err.code;
    return `NOT-M2M:${String(err)}`;
  }
  return "OK";
}

async function codeOfAsync(fn: () => Promise<unknown>): Promise<string> {
  try {
    await fn();
  } catch (err) {
    if (err instanceof M2mError) return err.code;
    return `NOT-M2M:${String(err)}`;
  }
  return "OK";
}

const flip = (b: Uint8Array, i = 0): Uint8Array => {
  const c = Uint8Array.from(b);
  c[i] = (c[i] ?? 0) ^ 0x01;
  return c;
};

beforeAll(() => {
  ekRsa = softKey(rsa(), EK_ATTRS, { symmetric: AES128CFB });
  ekEcc = softKey(ec(), EK_ATTRS, { symmetric: AES128CFB });
  akEcc = softKey(ec(), AK_ATTRS, { scheme: ECDSA256 });
  akRsa = softKey(rsa(), AK_ATTRS, { scheme: RSASSA256 });
  device = softKey(ec(), DEV_ATTRS, { scheme: ECDSA256 });
  otherEc = ec().privateKey;
});

describe("valid evidence", () => {
  it("verifies with an RSA EK and an ECC AK, and returns the device key", () => {
    const ev = evidence();
    const out = verifyActivationAndCertify(ev);
    expect(Buffer.from(out.deviceName)).toEqual(Buffer.from(computeName(device.pub)));
    expect(out.deviceKey.asymmetricKeyType).toBe("ec");
  });

  it("verifies with an ECC EK (ECDH + KDFe) and an RSA-2048 RSASSA AK", () => {
    expect(codeOf(() => verifyActivationAndCertify(evidence({ ek: ekEcc, ak: akRsa })))).toBe("OK");
  });

  it("accepts an RSA-2048 device key and an RSAPSS AK", () => {
    const dev = softKey(rsa(), DEV_ATTRS);
    const akPss = softKey(rsa(), AK_ATTRS, { scheme: { scheme: TPM_ALG.RSAPSS, hashAlg: TPM_ALG.SHA256 } });
    const signer = (d: Uint8Array): TpmtSignature => ({
      sigAlg: TPM_ALG.RSAPSS,
      hashAlg: TPM_ALG.SHA256,
      sig: cryptoSign("sha256", d, { key: akPss.priv, padding: 6, saltLength: 32 }),
    });
    expect(codeOf(() => verifyActivationAndCertify(evidence({ dev, ak: akPss, signer })))).toBe("OK");
  });

  it("qualifiedSigner is QN(AK) = 000b‖H(QN(EK)‖Name(AK)), QN(EK) = 000b‖H(4000000b‖Name(EK))", () => {
    const qnEk = computeQualifiedName(handleBytes(0x4000000b), ekRsa.pub);
    const qnAk = computeQualifiedName(qnEk, akEcc.pub);
    expect(Buffer.from(akQualifiedNameUnderEk(ekRsa.pub, akEcc.pub))).toEqual(Buffer.from(qnAk));
    expect(Buffer.from(qnAk.subarray(0, 2)).toString("hex")).toBe("000b");
  });
});

describe("tamper table: activation and TPMS_ATTEST", () => {
  const otherQn = () => computeName(akEcc.pub);
  const rows: [string, () => Build, string][] = [
    [
      "recovered secret off by one bit",
      () => ({ recovered: (s) => flip(s, 7) }),
      E.CREDENTIAL_SECRET_MISMATCH,
    ],
    [
      "recovered secret truncated",
      () => ({ recovered: (s) => s.subarray(0, 31) }),
      E.CREDENTIAL_SECRET_MISMATCH,
    ],
    ["recovered secret empty", () => ({ recovered: () => new Uint8Array(0) }), E.CREDENTIAL_SECRET_MISMATCH],
    [
      "recovered secret too long",
      () => ({ recovered: (s) => Buffer.concat([s, Uint8Array.of(0)]) }),
      E.CREDENTIAL_SECRET_MISMATCH,
    ],
    [
      "magic changed (re-signed)",
      () => ({ mutateAttest: (a) => ({ ...a, magic: 0xff544348 }) }),
      E.ATTEST_MAGIC,
    ],
    ["magic zero (re-signed)", () => ({ mutateAttest: (a) => ({ ...a, magic: 0 }) }), E.ATTEST_MAGIC],
    [
      "type quote (re-signed)",
      () => ({
        mutateAttest: (a) => ({
          ...a,
          type: TPM_ST.ATTEST_QUOTE,
          attested: {
            kind: "quote",
            pcrSelect: [{ hash: TPM_ALG.SHA256, pcrSelect: Uint8Array.of(1, 0, 0) }],
            pcrDigest: randomBytes(32),
          },
        }),
      }),
      E.ATTEST_TYPE,
    ],
    [
      "type time (re-signed)",
      () => ({
        mutateAttest: (a) => ({
          ...a,
          type: TPM_ST.ATTEST_TIME,
          attested: { kind: "other", raw: randomBytes(30) },
        }),
      }),
      E.ATTEST_TYPE,
    ],
    [
      "type says quote but union is certify (re-signed)",
      () => ({ mutateAttest: (a) => ({ ...a, type: TPM_ST.ATTEST_CREATION }) }),
      E.ATTEST_TYPE,
    ],
    [
      "extraData another nonce",
      () => ({ mutateAttest: (a) => ({ ...a, extraData: randomBytes(32) }) }),
      E.ATTEST_NONCE,
    ],
    [
      "extraData empty",
      () => ({ mutateAttest: (a) => ({ ...a, extraData: new Uint8Array(0) }) }),
      E.ATTEST_NONCE,
    ],
    [
      "extraData tpm2_certify's fixed 00ff55aa",
      () => ({ mutateAttest: (a) => ({ ...a, extraData: Uint8Array.of(0, 0xff, 0x55, 0xaa) }) }),
      E.ATTEST_NONCE,
    ],
    [
      "extraData nonce prefix",
      () => ({ mutateAttest: (a) => ({ ...a, extraData: a.extraData.subarray(0, 16) }) }),
      E.ATTEST_NONCE,
    ],
    ["session nonce at finish differs", () => ({ nonceAtFinish: (n) => flip(n, 31) }), E.ATTEST_NONCE],
    [
      "qualifiedSigner = bare Name(AK)",
      () => ({ mutateAttest: (a) => ({ ...a, qualifiedSigner: otherQn() }) }),
      E.ATTEST_SIGNER,
    ],
    [
      "qualifiedSigner one bit off",
      () => ({ mutateAttest: (a) => ({ ...a, qualifiedSigner: flip(a.qualifiedSigner, 10) }) }),
      E.ATTEST_SIGNER,
    ],
    [
      "qualifiedSigner empty",
      () => ({ mutateAttest: (a) => ({ ...a, qualifiedSigner: new Uint8Array(0) }) }),
      E.ATTEST_SIGNER,
    ],
    [
      "qualifiedSigner = QN(AK) under another EK",
      () => ({
        mutateAttest: (a) => ({ ...a, qualifiedSigner: akQualifiedNameUnderEk(ekEcc.pub, akEcc.pub) }),
      }),
      E.ATTEST_SIGNER,
    ],
    [
      "certified name is another key's",
      () => ({
        mutateAttest: (a) => ({
          ...a,
          attested: { kind: "certify", name: computeName(akEcc.pub), qualifiedName: new Uint8Array(0) },
        }),
      }),
      E.ATTEST_NAME_MISMATCH,
    ],
    [
      "certified name one bit off",
      () => ({
        mutateAttest: (a) =>
          a.attested.kind === "certify"
            ? { ...a, attested: { ...a.attested, name: flip(a.attested.name, 20) } }
            : a,
      }),
      E.ATTEST_NAME_MISMATCH,
    ],
    ["device public swapped for another key", () => ({ dev: undefined, mutateAttest: (a) => a }), "SWAP"],
    [
      "attest byte flipped after signing",
      () => ({ mutateAttestBytes: (b) => flip(b, 40) }),
      E.ATTEST_SIGNATURE,
    ],
    ["magic flipped after signing", () => ({ mutateAttestBytes: (b) => flip(b, 3) }), E.ATTEST_SIGNATURE],
    [
      "clock changed after signing",
      () => ({ mutateAttestBytes: (b) => flip(b, 2 + 4 + 2 + 34 + 2 + 32 + 7) }),
      E.ATTEST_SIGNATURE,
    ],
    ["signature by another key", () => ({ signer: (d) => tpmSign(otherEc, d) }), E.ATTEST_SIGNATURE],
    [
      "signature with sha384 (not the AK scheme)",
      () => ({ signer: (d) => tpmSign(akEcc.priv, d, TPM_ALG.ECDSA, "sha384") }),
      E.ATTEST_SIGNATURE,
    ],
    [
      "signature with sha1",
      () => ({ signer: (d) => tpmSign(akEcc.priv, d, TPM_ALG.ECDSA, "sha1") }),
      E.ATTEST_SIGNATURE,
    ],
    [
      "signature r all zero",
      () => ({
        signer: (d) => ({
          ...(tpmSign(akEcc.priv, d) as { r: Uint8Array; s: Uint8Array; sigAlg: 0x18; hashAlg: number }),
          r: new Uint8Array(32),
        }),
      }),
      E.ATTEST_SIGNATURE,
    ],
    [
      "RSASSA signature for an ECC AK",
      () => ({ signer: (d) => tpmSign(rsa(1024).privateKey, d, TPM_ALG.RSASSA) }),
      E.ATTEST_SIGNATURE,
    ],
    [
      "attest truncated by one byte",
      () => ({ mutateAttestBytes: (b) => b.subarray(0, b.length - 1) }),
      E.TPM_STRUCT_MALFORMED,
    ],
    [
      "attest truncated to the magic",
      () => ({ mutateAttestBytes: (b) => b.subarray(0, 4) }),
      E.TPM_STRUCT_MALFORMED,
    ],
    [
      "attest with a trailing byte",
      () => ({ mutateAttestBytes: (b) => Buffer.concat([b, Uint8Array.of(0)]) }),
      E.TPM_STRUCT_MALFORMED,
    ],
    [
      "attest oversized (64 KiB)",
      () => ({ mutateAttestBytes: (b) => Buffer.concat([b, new Uint8Array(65536)]) }),
      E.TPM_STRUCT_MALFORMED,
    ],
    [
      "clockInfo.safe = 2 (re-signed)",
      () => ({ mutateAttest: (a) => ({ ...a, clockInfo: { ...a.clockInfo, safe: 2 } }) }),
      E.TPM_STRUCT_MALFORMED,
    ],
    // Fields that carry no meaning for enrolment are accepted when the TPM signed them.
    [
      "clock/reset/restart/firmware changed (re-signed): accepted",
      () => ({
        mutateAttest: (a) => ({
          ...a,
          clockInfo: { clock: 1n, resetCount: 9, restartCount: 9, safe: 0 },
          firmwareVersion: 7n,
        }),
      }),
      "OK",
    ],
    [
      "certify.qualifiedName changed (re-signed): not checked, the device key's parent chain is not known",
      () => ({
        mutateAttest: (a) =>
          a.attested.kind === "certify"
            ? { ...a, attested: { ...a.attested, qualifiedName: randomBytes(34) } }
            : a,
      }),
      "OK",
    ],
  ];
  it.each(rows.map(([l, m, w]) => [l, w, m] as const))("%s → %s", (_label, want, make) => {
    if (want === "SWAP") {
      const ev = evidence();
      const other = softKey(ec(), DEV_ATTRS, { scheme: ECDSA256 });
      expect(
        codeOf(() => verifyActivationAndCertify({ ...ev, devicePublic: encodeTpm2bPublic(other.pub) })),
      ).toBe(E.ATTEST_NAME_MISMATCH);
      return;
    }
    expect(codeOf(() => verifyActivationAndCertify(evidence(make())))).toBe(want);
  });

  it("malformed AK / device public / signature bytes → ERR_TPM_STRUCT_MALFORMED", () => {
    const ev = evidence();
    const cases: Partial<ActivationEvidence>[] = [
      { akPublic: ev.akPublic.subarray(0, 20) },
      { akPublic: Buffer.concat([ev.akPublic, Uint8Array.of(1)]) },
      { devicePublic: ev.devicePublic.subarray(0, ev.devicePublic.length - 1) },
      { devicePublic: new Uint8Array(0) },
      { signatureBytes: ev.signatureBytes.subarray(0, 10) },
      { signatureBytes: Uint8Array.of(0x00, 0x14, 0x00, 0x0b, 0x00, 0x00) },
      { signatureBytes: Uint8Array.of(0x00, 0x05, 0x00, 0x0b) }, // HMAC signature: not verifiable here
    ];
    for (const c of cases)
      expect(codeOf(() => verifyActivationAndCertify({ ...ev, ...c }))).toBe(E.TPM_STRUCT_MALFORMED);
  });

  it("error messages carry no expected values; details stay in cause", () => {
    const ev = evidence({ mutateAttest: (a) => ({ ...a, qualifiedSigner: flip(a.qualifiedSigner, 10) }) });
    try {
      verifyActivationAndCertify(ev);
      expect.unreachable();
    } catch (err) {
      const e = err as M2mError;
      const expected = Buffer.from(akQualifiedNameUnderEk(ekRsa.pub, akEcc.pub)).toString("hex");
      expect(JSON.stringify(e.toJSON())).not.toContain(expected);
      expect(e.message).not.toMatch(/[0-9a-f]{16}/);
      expect(e.cause).toBeDefined();
    }
    const bad = evidence({ recovered: (s) => flip(s) });
    try {
      verifyActivationAndCertify(bad);
    } catch (err) {
      const secretHex = Buffer.from((bad.expectedSecret as { reveal(): Uint8Array }).reveal()).toString(
        "hex",
      );
      expect(JSON.stringify((err as M2mError).toJSON())).not.toContain(secretHex);
      expect(String((err as M2mError).cause ?? "")).not.toContain(secretHex);
    }
  });
});

describe("tamper table: AK public", () => {
  const required: [string, number][] = [
    ["fixedTPM", A.fixedTPM],
    ["fixedParent", A.fixedParent],
    ["sensitiveDataOrigin", A.sensitiveDataOrigin],
    ["restricted", A.restricted],
    ["sign", A.sign],
  ];
  it.each(required)("AK with %s cleared → ERR_AK_ATTRIBUTES (checkAkPublic and full flow)", (_n, bit) => {
    const ak = { ...akEcc, pub: { ...akEcc.pub, objectAttributes: AK_ATTRS & ~bit } } as SoftKey;
    expect(codeOf(() => checkAkPublic(encodeTpm2bPublic(ak.pub)))).toBe(E.AK_ATTRIBUTES);
    // Consistent evidence made with that AK (name, QN, signature all match) is still refused.
    expect(codeOf(() => verifyActivationAndCertify(evidence({ ak })))).toBe(E.AK_ATTRIBUTES);
  });

  it("every single attribute bit flipped: required/forbidden bits refused, the rest accepted", () => {
    const mustMatter = A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.restricted | A.sign | A.decrypt;
    for (let i = 0; i < 32; i++) {
      const bit = (1 << i) >>> 0;
      const pub = { ...akEcc.pub, objectAttributes: (AK_ATTRS ^ bit) >>> 0 } as TpmtPublic;
      const want = (mustMatter & bit) !== 0 ? E.AK_ATTRIBUTES : "OK";
      expect([i, codeOf(() => checkAkPublic(encodeTpm2bPublic(pub)))]).toEqual([i, want]);
    }
  });

  it("AK algorithm and nameAlg", () => {
    const cases: [string, () => TpmtPublic, string][] = [
      ["nameAlg sha1", () => ({ ...akEcc.pub, nameAlg: TPM_ALG.SHA1 }), E.AK_NAMEALG],
      ["nameAlg sha384", () => ({ ...akEcc.pub, nameAlg: TPM_ALG.SHA384 }), E.AK_NAMEALG],
      [
        "P-384 AK",
        () =>
          publicAreaFromKey(ec("secp384r1").publicKey, {
            objectAttributes: AK_ATTRS,
            scheme: { scheme: TPM_ALG.ECDSA, hashAlg: TPM_ALG.SHA384 },
          }),
        E.AK_ALGORITHM,
      ],
      [
        "ECDSA-SHA384 scheme",
        () =>
          ({
            ...akEcc.pub,
            parameters: {
              ...akEcc.pub.parameters,
              scheme: { scheme: TPM_ALG.ECDSA, hashAlg: TPM_ALG.SHA384 },
            },
          }) as TpmtPublic,
        E.AK_ALGORITHM,
      ],
      [
        "NULL scheme",
        () =>
          ({
            ...akEcc.pub,
            parameters: { ...akEcc.pub.parameters, scheme: { scheme: TPM_ALG.NULL, hashAlg: TPM_ALG.NULL } },
          }) as TpmtPublic,
        E.AK_ALGORITHM,
      ],
      [
        "ECDAA scheme",
        () =>
          ({
            ...akEcc.pub,
            parameters: {
              ...akEcc.pub.parameters,
              scheme: { scheme: TPM_ALG.ECDAA, hashAlg: TPM_ALG.SHA256, count: 0 },
            },
          }) as TpmtPublic,
        E.AK_ALGORITHM,
      ],
      [
        "AES symmetric on a signing key",
        () => ({ ...akEcc.pub, parameters: { ...akEcc.pub.parameters, symmetric: AES128CFB } }) as TpmtPublic,
        E.AK_ALGORITHM,
      ],
      [
        "RSA-1024 AK",
        () => publicAreaFromKey(rsa(1024).publicKey, { objectAttributes: AK_ATTRS, scheme: RSASSA256 }),
        E.AK_ALGORITHM,
      ],
      [
        "RSA-3072 AK",
        () => publicAreaFromKey(rsa(3072).publicKey, { objectAttributes: AK_ATTRS, scheme: RSASSA256 }),
        E.AK_ALGORITHM,
      ],
      [
        "RSA OAEP scheme",
        () =>
          ({
            ...akRsa.pub,
            parameters: {
              ...akRsa.pub.parameters,
              scheme: { scheme: TPM_ALG.OAEP, hashAlg: TPM_ALG.SHA256 },
            },
          }) as TpmtPublic,
        E.AK_ALGORITHM,
      ],
      [
        "point not on the curve",
        () =>
          akEcc.pub.type === TPM_ALG.ECC
            ? { ...akEcc.pub, unique: { x: akEcc.pub.unique.x, y: flip(akEcc.pub.unique.y, 31) } }
            : akEcc.pub,
        E.TPM_STRUCT_MALFORMED,
      ],
      ["valid RSA-2048 RSASSA AK", () => akRsa.pub, "OK"],
    ];
    for (const [label, make, want] of cases)
      expect([label, codeOf(() => checkAkPublic(encodeTpm2bPublic(make())))]).toEqual([label, want]);
  });
});

describe("tamper table: device key", () => {
  const rows: [string, number, string][] = [
    ["fixedTPM cleared", DEV_ATTRS & ~A.fixedTPM, E.DEVICE_KEY_ATTRIBUTES],
    ["fixedParent cleared", DEV_ATTRS & ~A.fixedParent, E.DEVICE_KEY_ATTRIBUTES],
    ["sensitiveDataOrigin cleared", DEV_ATTRS & ~A.sensitiveDataOrigin, E.DEVICE_KEY_ATTRIBUTES],
    ["sign cleared", DEV_ATTRS & ~A.sign, E.DEVICE_KEY_ATTRIBUTES],
    ["userWithAuth cleared", DEV_ATTRS & ~A.userWithAuth, E.DEVICE_KEY_ATTRIBUTES],
    ["restricted set", DEV_ATTRS | A.restricted, E.DEVICE_KEY_ATTRIBUTES],
    ["decrypt set", DEV_ATTRS | A.decrypt, E.DEVICE_KEY_ATTRIBUTES],
    ["noDA cleared (accepted)", DEV_ATTRS & ~A.noDA, "OK"],
    ["adminWithPolicy set (accepted)", DEV_ATTRS | A.adminWithPolicy, "OK"],
  ];
  it.each(rows.map(([l, a, w]) => [l, w, a] as const))(
    "device key %s → %s (consistent evidence)",
    (_l, want, attrs) => {
      const dev = { ...device, pub: { ...device.pub, objectAttributes: attrs >>> 0 } } as SoftKey;
      expect(codeOf(() => verifyActivationAndCertify(evidence({ dev })))).toBe(want);
    },
  );

  it("device key algorithms", () => {
    const cases: [string, () => TpmtPublic, string][] = [
      [
        "P-384",
        () => publicAreaFromKey(ec("secp384r1").publicKey, { objectAttributes: DEV_ATTRS }),
        E.DEVICE_KEY_ALGORITHM,
      ],
      [
        "RSA-1024",
        () => publicAreaFromKey(rsa(1024).publicKey, { objectAttributes: DEV_ATTRS }),
        E.DEVICE_KEY_ALGORITHM,
      ],
      ["nameAlg sha384", () => ({ ...device.pub, nameAlg: TPM_ALG.SHA384 }), E.DEVICE_KEY_ALGORITHM],
      ["nameAlg sha1", () => ({ ...device.pub, nameAlg: TPM_ALG.SHA1 }), E.DEVICE_KEY_ALGORITHM],
      [
        "ECDSA-SHA1 scheme",
        () =>
          ({
            ...device.pub,
            parameters: {
              ...device.pub.parameters,
              scheme: { scheme: TPM_ALG.ECDSA, hashAlg: TPM_ALG.SHA1 },
            },
          }) as TpmtPublic,
        E.DEVICE_KEY_ALGORITHM,
      ],
      [
        "RSA-2048 NULL scheme (accepted)",
        () => publicAreaFromKey(rsa().publicKey, { objectAttributes: DEV_ATTRS }),
        "OK",
      ],
    ];
    for (const [label, make, want] of cases) {
      const dev = { priv: device.priv, pub: make() };
      expect([label, codeOf(() => verifyActivationAndCertify(evidence({ dev })))]).toEqual([label, want]);
    }
    expect(codeOf(() => checkDeviceKey(device.pub))).toBe("OK");
  });
});

describe("EK: certificate, public match, allowlist, suitability", () => {
  const alg = { name: "ECDSA", namedCurve: "P-256", hash: "SHA-256" } as const;
  const day = 86_400_000;
  const now = new Date("2026-06-01T00:00:00Z");
  let rootPem: string;
  let interPem: string;
  let goodEkPem: string;
  let otherCaEkPem: string;
  let expiredEkPem: string;
  let notYetEkPem: string;
  let leafSignedPem: string;
  let leafAsCaPem: string;
  let forgedInterEkPem: string;
  let expiredInterPem: string;
  let viaExpiredInterPem: string;

  type Keys = webcrypto.CryptoKeyPair;
  const gen = async (): Promise<Keys> =>
    (await webcrypto.subtle.generateKey(alg, true, ["sign", "verify"])) as Keys;
  const caExt = () => [
    new x509.BasicConstraintsExtension(true, 2, true),
    new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign, true),
  ];
  async function ekCert(
    issuerName: string,
    signingKey: webcrypto.CryptoKey,
    spki: Uint8Array,
    notBefore: Date,
    notAfter: Date,
    serial: string,
  ): Promise<string> {
    const cert = await x509.X509CertificateGenerator.create({
      serialNumber: serial,
      subject: "",
      issuer: issuerName,
      notBefore,
      notAfter,
      signingKey,
      publicKey: spki,
      signingAlgorithm: alg,
      extensions: [
        // swtpm-like: critical SAN with a dirName carrying TPM manufacturer/model/version attributes.
        new x509.SubjectAlternativeNameExtension(
          [{ type: "dn", value: "2.23.133.2.1=id:00001014, 2.23.133.2.2=swtpm, 2.23.133.2.3=id:20191023" }],
          true,
        ),
        new x509.BasicConstraintsExtension(false, undefined, true),
        new x509.KeyUsagesExtension(x509.KeyUsageFlags.keyEncipherment, true),
      ],
    });
    return cert.toString("pem");
  }

  beforeAll(async () => {
    const spki = new Uint8Array((ekRsa.key as KeyObject).export({ type: "spki", format: "der" }));
    const rootK = await gen();
    const interK = await gen();
    const otherK = await gen();
    const leafK = await gen();
    const y = (n: number) => new Date(now.getTime() + n * 365 * day);
    const root = await x509.X509CertificateGenerator.createSelfSigned({
      serialNumber: "01",
      name: "CN=Test TPM Root CA",
      notBefore: y(-5),
      notAfter: y(20),
      keys: rootK,
      signingAlgorithm: alg,
      extensions: caExt(),
    });
    const inter = await x509.X509CertificateGenerator.create({
      serialNumber: "02",
      subject: "CN=Test TPM Intermediate CA",
      issuer: root.subject,
      notBefore: y(-5),
      notAfter: y(10),
      signingKey: rootK.privateKey,
      publicKey: interK.publicKey,
      signingAlgorithm: alg,
      extensions: caExt(),
    });
    rootPem = root.toString("pem");
    interPem = inter.toString("pem");
    goodEkPem = await ekCert(inter.subject, interK.privateKey, spki, y(-1), y(10), "10");
    otherCaEkPem = await ekCert(inter.subject, otherK.privateKey, spki, y(-1), y(10), "11");
    expiredEkPem = await ekCert(
      inter.subject,
      interK.privateKey,
      spki,
      y(-3),
      new Date(now.getTime() - day),
      "12",
    );
    notYetEkPem = await ekCert(
      inter.subject,
      interK.privateKey,
      spki,
      new Date(now.getTime() + day),
      y(3),
      "13",
    );
    // A leaf (no CA) with the intermediate's name and a cert "issued" by it.
    const leafAsCa = await x509.X509CertificateGenerator.create({
      serialNumber: "14",
      subject: "CN=Test TPM Intermediate CA",
      issuer: root.subject,
      notBefore: y(-1),
      notAfter: y(5),
      signingKey: rootK.privateKey,
      publicKey: leafK.publicKey,
      signingAlgorithm: alg,
      extensions: [new x509.BasicConstraintsExtension(false, undefined, true)],
    });
    leafSignedPem = await ekCert(inter.subject, leafK.privateKey, spki, y(-1), y(5), "15");
    leafAsCaPem = leafAsCa.toString("pem");
    forgedInterEkPem = otherCaEkPem;
    const expInter = await x509.X509CertificateGenerator.create({
      serialNumber: "16",
      subject: "CN=Old TPM Intermediate CA",
      issuer: root.subject,
      notBefore: y(-10),
      notAfter: y(-1),
      signingKey: rootK.privateKey,
      publicKey: otherK.publicKey,
      signingAlgorithm: alg,
      extensions: caExt(),
    });
    expiredInterPem = expInter.toString("pem");
    viaExpiredInterPem = await ekCert(expInter.subject, otherK.privateKey, spki, y(-1), y(5), "17");
  });

  it("valid chain (root anchor + intermediate) returns the EK key, which matches the EK public", async () => {
    const v = await verifyEkCertificate(goodEkPem, [rootPem], [interPem], now);
    expect(v.chainDer).toHaveLength(3);
    expect(ekPublicMatchesCert(ekRsa.pub, v.publicKey)).toBe(true);
    expect(checkEkPublic(encodeTpm2bPublic(ekRsa.pub), v.publicKey).type).toBe(TPM_ALG.RSA);
    // The intermediate configured as the anchor also works; DER input too.
    const der = new x509.X509Certificate(goodEkPem).rawData;
    expect((await verifyEkCertificate(new Uint8Array(der), [interPem], [], now)).chainDer).toHaveLength(2);
    // NV indices larger than the certificate: trailing padding after the DER SEQUENCE is ignored.
    const padded = Buffer.concat([new Uint8Array(der), new Uint8Array(64).fill(0xff)]);
    expect((await verifyEkCertificate(padded, [rootPem], [interPem], now)).chainDer).toHaveLength(3);
  });

  const certRows: [string, () => Promise<unknown>, string][] = [
    [
      "EK cert signed by another CA (same issuer name)",
      () => verifyEkCertificate(otherCaEkPem, [rootPem], [interPem], now),
      E.EK_CERT_UNTRUSTED,
    ],
    [
      "EK cert with only an unrelated anchor",
      () => verifyEkCertificate(goodEkPem, [expiredInterPem], [], now),
      E.EK_CERT_UNTRUSTED,
    ],
    ["intermediate missing", () => verifyEkCertificate(goodEkPem, [rootPem], [], now), E.EK_CERT_UNTRUSTED],
    ["no trust anchors", () => verifyEkCertificate(goodEkPem, [], [interPem], now), E.EK_CERT_UNTRUSTED],
    [
      "EK cert itself given as anchor",
      () => verifyEkCertificate(goodEkPem, [goodEkPem], [], now),
      E.EK_CERT_UNTRUSTED,
    ],
    [
      "issued by a non-CA certificate",
      () => verifyEkCertificate(leafSignedPem, [rootPem], [leafAsCaPem], now),
      E.EK_CERT_UNTRUSTED,
    ],
    [
      "forged intermediate",
      () => verifyEkCertificate(forgedInterEkPem, [rootPem], [interPem], now),
      E.EK_CERT_UNTRUSTED,
    ],
    [
      "expired EK cert",
      () => verifyEkCertificate(expiredEkPem, [rootPem], [interPem], now),
      E.EK_CERT_EXPIRED,
    ],
    [
      "not yet valid EK cert",
      () => verifyEkCertificate(notYetEkPem, [rootPem], [interPem], now),
      E.EK_CERT_EXPIRED,
    ],
    [
      "valid EK cert under an expired intermediate",
      () => verifyEkCertificate(viaExpiredInterPem, [rootPem], [expiredInterPem], now),
      E.EK_CERT_EXPIRED,
    ],
    [
      "same cert checked 30 years later",
      () => verifyEkCertificate(goodEkPem, [rootPem], [interPem], new Date(now.getTime() + 30 * 365 * day)),
      E.EK_CERT_EXPIRED,
    ],
    [
      "oversized certificate input",
      () => verifyEkCertificate(new Uint8Array(20_000), [rootPem], [interPem], now),
      E.EK_CERT_MALFORMED,
    ],
    [
      "too many intermediates",
      () => verifyEkCertificate(goodEkPem, [rootPem], Array(257).fill(interPem), now),
      E.EK_CERT_MALFORMED,
    ],
    [
      "garbage instead of a certificate",
      () => verifyEkCertificate(randomBytes(300), [rootPem], [interPem], now),
      E.EK_CERT_MALFORMED,
    ],
    [
      "truncated DER",
      () =>
        verifyEkCertificate(
          new Uint8Array(new x509.X509Certificate(goodEkPem).rawData).subarray(0, 200),
          [rootPem],
          [interPem],
          now,
        ),
      E.EK_CERT_MALFORMED,
    ],
  ];
  it.each(certRows.map(([l, r, w]) => [l, w, r] as const))("%s → %s", async (_l, want, run) => {
    expect(await codeOfAsync(run)).toBe(want);
  });

  it("a non-CA issuer is refused by the CA check itself (its signature is valid)", async () => {
    const err = await verifyEkCertificate(leafSignedPem, [rootPem], [leafAsCaPem], now).catch(
      (e: unknown) => e,
    );
    expect((err as M2mError).code).toBe(E.EK_CERT_UNTRUSTED);
    expect(String(((err as M2mError).cause as Error).message)).toMatch(/not a CA/);
  });

  it("EK public not matching the certificate → ERR_EK_PUBLIC_MISMATCH", async () => {
    const v = await verifyEkCertificate(goodEkPem, [rootPem], [interPem], now);
    const otherRsa = publicAreaFromKey(rsa().publicKey, { objectAttributes: EK_ATTRS, symmetric: AES128CFB });
    expect(codeOf(() => checkEkPublic(encodeTpm2bPublic(otherRsa), v.publicKey))).toBe(E.EK_PUBLIC_MISMATCH);
    expect(codeOf(() => checkEkPublic(encodeTpm2bPublic(ekEcc.pub), v.publicKey))).toBe(E.EK_PUBLIC_MISMATCH);
    const n = ekRsa.pub.type === TPM_ALG.RSA ? ekRsa.pub.unique.n : new Uint8Array(0);
    const oneBit = { ...ekRsa.pub, unique: { n: flip(n, 100) } } as TpmtPublic;
    expect(codeOf(() => checkEkPublic(encodeTpm2bPublic(oneBit), v.publicKey))).toBe(E.EK_PUBLIC_MISMATCH);
    expect(codeOf(() => checkEkPublic(encodeTpm2bPublic(ekRsa.pub).subarray(0, 50), v.publicKey))).toBe(
      E.TPM_STRUCT_MALFORMED,
    );
  });

  it("allowlist by SHA-256 of the EK SPKI", () => {
    const fp = ekFingerprint(ekRsa.pub);
    expect(fp).toMatch(/^[0-9a-f]{64}$/);
    expect(checkEkAllowlisted(ekRsa.pub, [fp.toUpperCase()])).toBe(fp);
    expect(codeOf(() => checkEkAllowlisted(ekEcc.pub, [fp]))).toBe(E.EK_NOT_ALLOWED);
    expect(codeOf(() => checkEkAllowlisted(ekRsa.pub, []))).toBe(E.EK_NOT_ALLOWED);
  });

  it("an EK that is not a restricted AES-CFB decryption key → ERR_EK_UNSUITABLE", () => {
    const name = computeName(akEcc.pub);
    const notRestricted = { ...ekRsa.pub, objectAttributes: EK_ATTRS & ~A.restricted };
    const signing = { ...ekRsa.pub, objectAttributes: (EK_ATTRS & ~A.decrypt) | A.sign };
    const noSym = {
      ...ekRsa.pub,
      parameters: { ...ekRsa.pub.parameters, symmetric: { algorithm: TPM_ALG.NULL, keyBits: 0, mode: 0 } },
    } as TpmtPublic;
    for (const ek of [notRestricted, signing, noSym] as TpmtPublic[]) {
      expect(codeOf(() => beginActivation(ek, name))).toBe(E.EK_UNSUITABLE);
    }
  });
});

// Keep the attest decoder exercised on the exact bytes the verifier signs.
it("evidence attest bytes decode back to the same structure", () => {
  const ev = evidence();
  const a = decodeTpmsAttest(ev.attestBytes);
  expect(Buffer.from(encodeTpmsAttest(a))).toEqual(Buffer.from(ev.attestBytes));
});
