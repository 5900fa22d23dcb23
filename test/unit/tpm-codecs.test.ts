import { createHash, generateKeyPairSync, randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { describe, expect, it } from "vitest";
import { M2mError } from "../../src/core/errors.js";
import { decodeTpmsAttest, encodeTpmsAttest } from "../../src/tpm/attest.js";
import { ERR_TPM_STRUCT_MALFORMED, TpmReader } from "../../src/tpm/bytes.js";
import {
  TPMA_OBJECT as A,
  attributeNames,
  TPM_ALG,
  TPM_ECC_CURVE,
  TPM_RH_ENDORSEMENT,
} from "../../src/tpm/constants.js";
import { decodeCredentialBlob, encodeCredentialBlob } from "../../src/tpm/credential-blob.js";
import { kdfa, kdfe } from "../../src/tpm/kdf.js";
import { activateCredentialWithPrivateKey, makeCredential } from "../../src/tpm/make-credential.js";
import {
  computeName,
  computeQualifiedName,
  decodeTpm2bPublic,
  decodeTpmtPublic,
  encodeTpm2bPublic,
  encodeTpmtPublic,
  handleBytes,
  objectAttributeNames,
  publicAreaFromKey,
  publicKeyObject,
  toSpki,
} from "../../src/tpm/public.js";
import { decodeTpmtSignature, encodeTpmtSignature, verifyTpmSignature } from "../../src/tpm/signature.js";
import { hx, SWTPM_KNOWN_ANSWERS } from "../kit/tpm-known-answers.js";

const FX = SWTPM_KNOWN_ANSWERS;
const toHex = (b: Uint8Array): string => Buffer.from(b).toString("hex");

function codeOf(fn: () => unknown): string {
  try {
    fn();
    return "OK";
  } catch (err) {
    return err instanceof M2mError ? `${err.code}:${err.message}` : `NOT-M2M:${String(err)}`;
  }
}

describe("TPMT_PUBLIC / TPM2B_PUBLIC on real swtpm bytes", () => {
  it("RSA-2048 EK: fields, Name and qualified name match the TPM, encode round-trips", () => {
    const bytes = hx(FX.rsaEkTpmt);
    const ek = decodeTpmtPublic(bytes);
    expect(ek.type).toBe(TPM_ALG.RSA);
    expect(ek.nameAlg).toBe(TPM_ALG.SHA256);
    expect(ek.objectAttributes).toBe(0x000300b2);
    expect(objectAttributeNames(ek)).toEqual([
      "fixedTPM",
      "fixedParent",
      "sensitiveDataOrigin",
      "adminWithPolicy",
      "restricted",
      "decrypt",
    ]);
    expect(toHex(ek.authPolicy)).toBe("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa");
    expect(ek.parameters.symmetric).toEqual({ algorithm: TPM_ALG.AES, keyBits: 128, mode: TPM_ALG.CFB });
    if (ek.type !== TPM_ALG.RSA) throw new Error("type");
    expect(ek.parameters.keyBits).toBe(2048);
    expect(ek.parameters.exponent).toBe(0);
    expect(toHex(computeName(ek))).toBe(FX.rsaEkName);
    expect(toHex(computeQualifiedName(handleBytes(TPM_RH_ENDORSEMENT), ek))).toBe(FX.rsaEkQn);
    expect(toHex(encodeTpmtPublic(ek))).toBe(FX.rsaEkTpmt);
    expect(decodeTpm2bPublic(encodeTpm2bPublic(ek))).toEqual(ek);
    expect(publicKeyObject(ek).asymmetricKeyDetails?.modulusLength).toBe(2048);
  });

  it("ECC P-384 EK (sha384 Name, AES-256): Name and QN match the TPM", () => {
    const ek = decodeTpmtPublic(hx(FX.eccEkTpmt));
    if (ek.type !== TPM_ALG.ECC) throw new Error("type");
    expect(ek.parameters.curveId).toBe(TPM_ECC_CURVE.NIST_P384);
    expect(ek.parameters.symmetric.keyBits).toBe(256);
    expect(ek.parameters.kdf.scheme).toBe(TPM_ALG.NULL);
    expect(toHex(computeName(ek))).toBe(FX.eccEkName);
    expect(toHex(computeQualifiedName(handleBytes(TPM_RH_ENDORSEMENT), ek))).toBe(FX.eccEkQn);
    expect(toHex(encodeTpmtPublic(ek))).toBe(FX.eccEkTpmt);
    expect(publicKeyObject(ek).asymmetricKeyDetails?.namedCurve).toBe("secp384r1");
    expect(toSpki(ek)[0]).toBe(0x30);
  });

  it("AK and device key: Names, QN(AK) = H(QN(EK) ‖ Name(AK))", () => {
    const ek = decodeTpmtPublic(hx(FX.eccEkTpmt));
    const ak = decodeTpm2bPublic(hx(FX.akTpm2b));
    const dev = decodeTpm2bPublic(hx(FX.devTpm2b));
    expect(toHex(computeName(ak))).toBe(FX.akName);
    expect(toHex(computeName(dev))).toBe(FX.devName);
    const qnEk = computeQualifiedName(handleBytes(TPM_RH_ENDORSEMENT), ek);
    expect(toHex(computeQualifiedName(qnEk, ak))).toBe(FX.akQn);
    expect(ak.parameters.scheme).toEqual({ scheme: TPM_ALG.ECDSA, hashAlg: TPM_ALG.SHA256 });
    expect(toHex(encodeTpm2bPublic(ak))).toBe(FX.akTpm2b);
  });

  it("publicAreaFromKey → toSpki gives back the same key (RSA, P-256, P-384)", () => {
    for (const pair of [
      generateKeyPairSync("rsa", { modulusLength: 2048 }),
      generateKeyPairSync("ec", { namedCurve: "prime256v1" }),
      generateKeyPairSync("ec", { namedCurve: "secp384r1" }),
    ]) {
      const pub = publicAreaFromKey(pair.publicKey, { objectAttributes: A.sign });
      const want = pair.publicKey.export({ type: "spki", format: "der" });
      expect(Buffer.from(toSpki(pub))).toEqual(want);
      expect(decodeTpmtPublic(encodeTpmtPublic(pub))).toEqual(pub);
    }
  });

  it("malformed input names the field and never throws a non-M2mError", () => {
    const bytes = hx(FX.rsaEkTpmt);
    expect(codeOf(() => decodeTpmtPublic(bytes.subarray(0, bytes.length - 1)))).toMatch(
      /^ERR_TPM_STRUCT_MALFORMED:malformed TPMT_PUBLIC: unique.rsa needs/,
    );
    expect(codeOf(() => decodeTpmtPublic(bytes.subarray(0, 3)))).toMatch(/nameAlg needs 2 bytes/);
    const bigPolicy = Uint8Array.from(bytes);
    bigPolicy[9] = 65; // authPolicy.size
    expect(codeOf(() => decodeTpmtPublic(bigPolicy))).toMatch(/authPolicy size 65 exceeds maximum 64/);
    const badType = Uint8Array.from(bytes);
    badType[1] = 0x08; // KEYEDHASH
    expect(codeOf(() => decodeTpmtPublic(badType))).toMatch(/type 0x8 is not RSA or ECC/);
    expect(codeOf(() => decodeTpmtPublic(Buffer.concat([bytes, Uint8Array.of(0)])))).toMatch(
      /1 trailing bytes/,
    );
    expect(codeOf(() => decodeTpm2bPublic(hx(FX.akTpm2b).subarray(0, 50)))).toMatch(
      /^ERR_TPM_STRUCT_MALFORMED/,
    );
    expect(codeOf(() => decodeTpm2bPublic(Uint8Array.of(0, 0)))).toMatch(/size is zero/);
    expect(codeOf(() => decodeTpmtPublic("00" as unknown as Uint8Array))).toMatch(/not a byte array/);
    expect(codeOf(() => decodeTpmtPublic(new Uint8Array(100_000)))).toMatch(/over the 8192 limit/);
  });

  it("publicKeyObject refuses inconsistent parameters", () => {
    const ek = decodeTpmtPublic(hx(FX.rsaEkTpmt));
    if (ek.type !== TPM_ALG.RSA) throw new Error("type");
    const short = { ...ek, unique: { n: ek.unique.n.subarray(1) } };
    expect(codeOf(() => publicKeyObject(short))).toMatch(/size does not match parameters.keyBits/);
    const evenExp = { ...ek, parameters: { ...ek.parameters, exponent: 4 } };
    expect(codeOf(() => publicKeyObject(evenExp))).toMatch(/exponent/);
    const ecc = decodeTpmtPublic(hx(FX.eccEkTpmt));
    if (ecc.type !== TPM_ALG.ECC) throw new Error("type");
    const offCurve = { ...ecc, unique: { x: ecc.unique.x, y: randomBytes(48) } };
    expect(codeOf(() => publicKeyObject(offCurve))).toMatch(/^ERR_TPM_STRUCT_MALFORMED/);
    const curve = { ...ecc, parameters: { ...ecc.parameters, curveId: 0x0010 } };
    expect(codeOf(() => publicKeyObject(curve))).toMatch(/curveID/);
  });

  it("attribute names include unknown bits", () => {
    expect(attributeNames(A.sign | 0x80000000)).toEqual(["sign", "bit31"]);
  });
});

describe("TPMS_ATTEST and TPMT_SIGNATURE on real swtpm bytes", () => {
  it("certify attest: fields as the TPM wrote them; the AK signature verifies", () => {
    const attest = decodeTpmsAttest(hx(FX.attest));
    expect(attest.magic).toBe(0xff544347);
    expect(attest.type).toBe(0x8017);
    expect(toHex(attest.qualifiedSigner)).toBe(FX.akQn);
    expect(toHex(attest.extraData)).toBe("00ff55aa");
    expect(attest.attested.kind).toBe("certify");
    if (attest.attested.kind !== "certify") throw new Error("kind");
    expect(toHex(attest.attested.name)).toBe(FX.devName);
    expect(toHex(encodeTpmsAttest(attest))).toBe(FX.attest);
    const sig = decodeTpmtSignature(hx(FX.sig));
    expect(sig.sigAlg).toBe(TPM_ALG.ECDSA);
    expect(toHex(encodeTpmtSignature(sig))).toBe(FX.sig);
    const ak = decodeTpm2bPublic(hx(FX.akTpm2b));
    expect(verifyTpmSignature(ak, hx(FX.attest), sig)).toEqual({ ok: true });
    const tampered = hx(FX.attest);
    tampered[tampered.length - 1] = (tampered[tampered.length - 1] ?? 0) ^ 1;
    expect(verifyTpmSignature(ak, tampered, sig)).toEqual({ ok: false, reason: "bad-signature" });
    const dev = decodeTpm2bPublic(hx(FX.devTpm2b));
    expect(verifyTpmSignature(dev, hx(FX.attest), sig)).toEqual({ ok: false, reason: "bad-signature" });
  });

  it("quote attest and unknown types decode; malformed ones name the field", () => {
    const base = decodeTpmsAttest(hx(FX.attest));
    const quote = {
      ...base,
      type: 0x8018,
      attested: {
        kind: "quote" as const,
        pcrSelect: [{ hash: TPM_ALG.SHA256, pcrSelect: Uint8Array.of(0xff, 0, 0) }],
        pcrDigest: new Uint8Array(randomBytes(32)),
      },
    };
    expect(decodeTpmsAttest(encodeTpmsAttest(quote))).toEqual(quote);
    const time = {
      ...base,
      type: 0x8019,
      attested: { kind: "other" as const, raw: new Uint8Array(randomBytes(20)) },
    };
    expect(decodeTpmsAttest(encodeTpmsAttest(time))).toEqual(time);
    const many = Buffer.from(encodeTpmsAttest(quote));
    const countAt = many.length - (4 + 2 + 1 + 3 + 2 + 32);
    many.writeUInt32BE(0xffffffff, countAt);
    expect(codeOf(() => decodeTpmsAttest(many))).toMatch(/pcrSelect.count 4294967295 exceeds 16/);
    expect(codeOf(() => decodeTpmsAttest(hx(FX.attest).subarray(0, 20)))).toMatch(
      /qualifiedSigner needs 34 bytes, 12 left/,
    );
  });

  it("signature decoder refuses schemes it cannot verify, and empty r/s", () => {
    expect(codeOf(() => decodeTpmtSignature(Uint8Array.of(0, 0x10)))).toMatch(/sigAlg 0x10/);
    expect(codeOf(() => decodeTpmtSignature(Uint8Array.of(0, 0x18, 0, 0x0b, 0, 0, 0, 0)))).toMatch(
      /signatureR size 0/,
    );
  });
});

describe("credential blob", () => {
  it("round-trips the tpm2-tools format and refuses bad magic, version, sizes", () => {
    const c = { idObject: randomBytes(68), encryptedSecret: randomBytes(256) };
    const blob = encodeCredentialBlob(c);
    expect(toHex(blob.subarray(0, 8))).toBe("badcc0de00000001");
    expect(decodeCredentialBlob(blob)).toEqual({
      idObject: new Uint8Array(c.idObject),
      encryptedSecret: new Uint8Array(c.encryptedSecret),
    });
    const badMagic = Uint8Array.from(blob);
    badMagic[0] = 0;
    expect(codeOf(() => decodeCredentialBlob(badMagic))).toMatch(/magic/);
    const badVersion = Uint8Array.from(blob);
    badVersion[7] = 2;
    expect(codeOf(() => decodeCredentialBlob(badVersion))).toMatch(/version/);
    expect(codeOf(() => decodeCredentialBlob(blob.subarray(0, blob.length - 1)))).toMatch(/secret needs/);
    expect(
      codeOf(() => decodeCredentialBlob(encodeCredentialBlob({ ...c, idObject: randomBytes(200) }))),
    ).toMatch(/credentialBlob size 200 exceeds/);
  });
});

describe("KDF and MakeCredential cross-checks", () => {
  it("KDFa/KDFe: deterministic, length in bits, excess high bits cleared", () => {
    const k = kdfa(TPM_ALG.SHA256, hx("00"), "STORAGE", hx("01"), new Uint8Array(0), 128);
    expect(k).toHaveLength(16);
    expect(kdfa(TPM_ALG.SHA256, hx("00"), "STORAGE", hx("01"), new Uint8Array(0), 128)).toEqual(k);
    expect(kdfa(TPM_ALG.SHA256, hx("00"), "INTEGRITY", hx("01"), new Uint8Array(0), 128)).not.toEqual(k);
    const twelve = kdfa(TPM_ALG.SHA256, randomBytes(32), "X", new Uint8Array(0), new Uint8Array(0), 12);
    expect(twelve).toHaveLength(2);
    expect((twelve[0] ?? 0) & 0xf0).toBe(0);
    expect(kdfa(TPM_ALG.SHA384, hx("00"), "L", hx(""), hx(""), 600)).toHaveLength(75);
    // KDFe with one block is H(00000001 ‖ Z ‖ label ‖ 00 ‖ U ‖ V).
    const z = randomBytes(32);
    const want = createHash("sha256")
      .update(Buffer.concat([hx("00000001"), z, Buffer.from("IDENTITY\0"), hx("aa"), hx("bb")]))
      .digest();
    expect(Buffer.from(kdfe(TPM_ALG.SHA256, z, "IDENTITY", hx("aa"), hx("bb"), 256))).toEqual(want);
  });

  it("our software activation opens tpm2_makecredential -T none blobs (RSA and ECC P-256 EK)", async () => {
    const dir = await mkdtemp(join(tmpdir(), "m2m-mc-"));
    try {
      const attrs =
        A.fixedTPM | A.fixedParent | A.sensitiveDataOrigin | A.adminWithPolicy | A.restricted | A.decrypt;
      const sym = { algorithm: TPM_ALG.AES, keyBits: 128, mode: TPM_ALG.CFB };
      const ak = decodeTpm2bPublic(hx(FX.akTpm2b));
      const name = computeName(ak);
      for (const pair of [
        generateKeyPairSync("rsa", { modulusLength: 2048 }),
        generateKeyPairSync("ec", { namedCurve: "prime256v1" }),
      ]) {
        const ek = publicAreaFromKey(pair.publicKey, { objectAttributes: attrs, symmetric: sym });
        await writeFile(join(dir, "ek.pub"), encodeTpm2bPublic(ek));
        const secret = randomBytes(32);
        await writeFile(join(dir, "secret"), secret);
        await execa(
          "tpm2_makecredential",
          ["-T", "none", "-u", "ek.pub", "-s", "secret", "-n", toHex(name), "-o", "blob"],
          { cwd: dir, timeout: 20_000 },
        );
        const blob = decodeCredentialBlob(await readFile(join(dir, "blob")));
        expect(Buffer.from(activateCredentialWithPrivateKey(ek, pair.privateKey, name, blob))).toEqual(
          secret,
        );
        // And ours round-trips through the same software activation.
        const mine = makeCredential(ek, name, secret);
        expect(Buffer.from(activateCredentialWithPrivateKey(ek, pair.privateKey, name, mine))).toEqual(
          secret,
        );
        const wrongName = Uint8Array.from(name);
        wrongName[3] = (wrongName[3] ?? 0) ^ 1;
        expect(codeOf(() => activateCredentialWithPrivateKey(ek, pair.privateKey, wrongName, mine))).toMatch(
          /^ERR_TPM_CREDENTIAL_UNSUPPORTED:credential integrity/,
        );
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("refuses credentials that are empty or longer than the EK nameAlg digest", () => {
    const ek = decodeTpmtPublic(hx(FX.rsaEkTpmt));
    const name = hx(FX.akName);
    expect(codeOf(() => makeCredential(ek, name, randomBytes(33)))).toMatch(
      /^ERR_TPM_CREDENTIAL_UNSUPPORTED/,
    );
    expect(codeOf(() => makeCredential(ek, name, new Uint8Array(0)))).toMatch(
      /^ERR_TPM_CREDENTIAL_UNSUPPORTED/,
    );
    expect(makeCredential(ek, name, randomBytes(32)).encryptedSecret).toHaveLength(256);
    const p384 = decodeTpmtPublic(hx(FX.eccEkTpmt));
    // ECC: the encrypted secret is the ephemeral TPMS_ECC_POINT (2 × (2 + 48) bytes on P-384).
    expect(makeCredential(p384, name, randomBytes(48)).encryptedSecret).toHaveLength(100);
  });
});

it("the reader never reads past a sub-range", () => {
  const r = new TpmReader(Uint8Array.of(0, 2, 1, 2, 3), "X");
  const sub = r.sub(r.u16("n"), "body");
  expect(sub.u16("v")).toBe(0x0102);
  expect(codeOf(() => sub.u8("w"))).toMatch(/^ERR_TPM_STRUCT_MALFORMED:malformed X: w needs 1 bytes, 0 left/);
  expect(r.u8("tail")).toBe(3);
  expect(ERR_TPM_STRUCT_MALFORMED).toBe("ERR_TPM_STRUCT_MALFORMED");
});
