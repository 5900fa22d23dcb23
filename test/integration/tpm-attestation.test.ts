import { createPublicKey, verify as nodeVerify, randomBytes, X509Certificate } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { inspect } from "node:util";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { isM2mError } from "../../src/core/errors.js";
import {
  AK_ATTRIBUTES,
  type AkPublic,
  type EkPublic,
  qualifiedName,
  TpmAttestationOps,
} from "../../src/keys/tpm/endorsement.js";
import { TpmKeyProvider } from "../../src/keys/tpm/tpm-provider.js";
import { ecdsaTpmtToRaw } from "../../src/keys/tpm/tpmt.js";
import { makeCredential } from "../../src/tpm/make-credential.js";
import { decodeTpmtPublic } from "../../src/tpm/public.js";

/** Minimal TPMS_ATTEST (certify) reader for the assertions; the registrar uses src/tpm/ codecs. */
function readAttest(b: Uint8Array) {
  let o = 0;
  const u16 = () => {
    const v = ((b[o] ?? 0) << 8) | (b[o + 1] ?? 0);
    o += 2;
    return v;
  };
  const u32 = () => ((u16() << 16) | u16()) >>> 0;
  const tpm2b = () => {
    const n = u16();
    const v = b.slice(o, o + n);
    o += n;
    return v;
  };
  const magic = u32();
  const type = u16();
  const qualifiedSigner = tpm2b();
  const extraData = tpm2b();
  o += 8 + 4 + 4 + 1 + 8; // clockInfo + firmwareVersion
  const name = tpm2b();
  const qn = tpm2b();
  return { magic, type, qualifiedSigner, extraData, name, qn, rest: b.length - o };
}

describe("TPM attestation ops (swtpm)", () => {
  let tpm: SwtpmHandle;
  let provider: TpmKeyProvider;
  let ops: TpmAttestationOps;
  let work: string;
  let eks: EkPublic[];
  let ak: AkPublic;

  beforeAll(async () => {
    tpm = await startSwtpm();
    work = await mkdtemp(join(tmpdir(), "m2m-tpm-attest-"));
    provider = new TpmKeyProvider({ tcti: tpm.tcti });
    await provider.createOrOpen();
    ops = new TpmAttestationOps(provider.runner, { akHandle: provider.akHandle });
    eks = await ops.readEkPublics();
    ak = await ops.createAk();
  });
  afterAll(async () => {
    await provider?.close();
    await tpm?.stop();
    if (work !== undefined) await rm(work, { recursive: true, force: true });
  });

  test("reads EK certificates from NV; absent indices are skipped; they chain to the swtpm CA", async () => {
    const certs = await ops.readEkCertificates();
    expect(certs.map((c) => c.nvIndex)).toEqual([0x01c00002, 0x01c00016]);
    const root = new X509Certificate(tpm.caCertPems[0] ?? "");
    const intermediate = new X509Certificate(tpm.caCertPems[1] ?? "");
    for (const c of certs) {
      const x = new X509Certificate(Buffer.from(c.der));
      expect(x.verify(intermediate.publicKey)).toBe(true);
      expect(intermediate.verify(root.publicKey)).toBe(true);
      // The certificate is for the matching persisted EK.
      const ek = eks.find((e) => e.kind === c.kind);
      expect(ek).toBeDefined();
      expect(x.publicKey.export({ format: "der", type: "spki" })).toEqual(
        createPublicKey(ek?.pem ?? "").export({ format: "der", type: "spki" }),
      );
    }
  });

  test("reads EK publics (RSA 0x81010001 and P-384 0x81010016) as TPM2B_PUBLIC and PEM", () => {
    const rsa = eks.find((e) => e.handle === 0x81010001);
    const p384 = eks.find((e) => e.handle === 0x81010016);
    expect(rsa?.kind).toBe("rsa-2048");
    expect(rsa?.activationSupported).toBe(true);
    expect(rsa?.created).toBe(false);
    expect(p384?.kind).toBe("ecc-p384");
    expect(p384?.activationSupported).toBe(true);
    for (const e of [rsa, p384]) {
      const t = e?.tpm2bPublic ?? new Uint8Array();
      expect(((t[0] ?? 0) << 8) | (t[1] ?? 0)).toBe(t.length - 2);
      expect(e?.pem).toMatch(/BEGIN PUBLIC KEY/);
    }
  });

  test("creates the RSA EK when none is persisted", async () => {
    await tpm.tpm("tpm2_evictcontrol", ["-C", "o", "-c", "0x81010001"]);
    const again = await ops.readEkPublics();
    const rsa = again.find((e) => e.handle === 0x81010001);
    expect(rsa?.created).toBe(true);
    // The TCG template is deterministic from the EPS: the same EK comes back.
    expect(Buffer.from(rsa?.tpmtPublic ?? [])).toEqual(
      Buffer.from(eks.find((e) => e.handle === 0x81010001)?.tpmtPublic ?? []),
    );
  });

  test("AK is a restricted ECDSA signing key with noDA, persisted; createAk is idempotent", async () => {
    expect(ak.objectAttributes).toBe(AK_ATTRIBUTES);
    expect(ak.created).toBe(true);
    const again = await ops.createAk();
    expect(again.created).toBe(false);
    expect(Buffer.from(again.name)).toEqual(Buffer.from(ak.name));
  });

  /** `tpm2_makecredential -T none` (software) for the RSA EK and `name`: the blob a registrar sends. */
  const toolsCredentialBlob = async (
    secret: Uint8Array,
    name: Uint8Array,
    tag: string,
  ): Promise<Uint8Array> => {
    const rsa = eks.find((e) => e.handle === 0x81010001);
    await writeFile(join(work, "ek.pub"), rsa?.tpm2bPublic ?? new Uint8Array());
    await writeFile(join(work, tag), secret);
    await tpm.tpm("tpm2_makecredential", [
      "-T",
      "none",
      "-u",
      join(work, "ek.pub"),
      "-s",
      join(work, tag),
      "-n",
      Buffer.from(name).toString("hex"),
      "-o",
      join(work, `${tag}.blob`),
    ]);
    return new Uint8Array(await readFile(join(work, `${tag}.blob`)));
  };

  test("activateCredential recovers a secret made by tpm2_makecredential for (EK, Name(AK))", async () => {
    const secret = randomBytes(32);
    const blob = await toolsCredentialBlob(secret, ak.name, "secret");
    const got = await ops.activateCredential(blob);
    expect(Buffer.from(got.reveal())).toEqual(secret);
    expect(inspect(got)).not.toContain(secret.toString("hex"));
    expect(JSON.stringify({ got })).toContain("redacted");
  });

  test("activateCredential refuses a credential bound to another AK name (TPM refuses)", async () => {
    const otherName = Buffer.from(ak.name);
    otherName[5] = (otherName[5] ?? 0) ^ 0xff;
    const blob = await toolsCredentialBlob(randomBytes(32), otherName, "secret2");
    await expect(ops.activateCredential(blob)).rejects.toSatisfy((e) => isM2mError(e, "ERR_TPM_COMMAND"));
    await expect(ops.activateCredential(blob.subarray(0, 20))).rejects.toSatisfy((e) =>
      isM2mError(e, "ERR_TPM_CREDENTIAL_BLOB"),
    );
  });

  test("activateCredential with the high-range P-384 EK (PolicyB session: PolicySecret + PolicyOR, sha384); blob from src/tpm makeCredential", async () => {
    const p384 = eks.find((e) => e.handle === 0x81010016);
    const secret = randomBytes(32);
    const { blob } = makeCredential(decodeTpmtPublic(p384?.tpmtPublic ?? new Uint8Array()), ak.name, secret);
    const got = await ops.activateCredential(blob, 0x81010016);
    expect(Buffer.from(got.reveal())).toEqual(secret);
    // The same blob is bound to the P-384 EK: the RSA EK cannot open it.
    await expect(ops.activateCredential(blob, 0x81010001)).rejects.toSatisfy((e) => isM2mError(e));
  });

  test("an EK-like object with an unknown policy and no userWithAuth → ERR_TPM_EK_POLICY_UNSUPPORTED", async () => {
    const policy = join(work, "policy.bin");
    await writeFile(policy, randomBytes(32));
    const ctx = join(work, "odd-ek.ctx");
    const before = (await tpm.tpm("tpm2_getcap", ["handles-transient"])).stdout;
    await tpm.tpm("tpm2_createprimary", [
      "-C",
      "e",
      "-g",
      "sha256",
      "-G",
      "ecc256:aes128cfb",
      "-a",
      "fixedtpm|fixedparent|sensitivedataorigin|adminwithpolicy|restricted|decrypt",
      "-L",
      policy,
      "-c",
      ctx,
    ]);
    await tpm.tpm("tpm2_evictcontrol", ["-C", "o", "-c", ctx, "0x81010005"]);
    for (const h of (await tpm.tpm("tpm2_getcap", ["handles-transient"])).stdout.match(/0x[0-9a-fA-F]+/g) ??
      []) {
      if (!before.includes(h)) await tpm.tpm("tpm2_flushcontext", [h]);
    }
    try {
      const blob = makeCredential(
        decodeTpmtPublic(eks[0]?.tpmtPublic ?? new Uint8Array()),
        ak.name,
        randomBytes(16),
      ).blob;
      await expect(ops.activateCredential(blob, 0x81010005)).rejects.toSatisfy((e) =>
        isM2mError(e, "ERR_TPM_EK_POLICY_UNSUPPORTED"),
      );
      const listed = await ops.readEkPublics();
      expect(listed.find((e) => e.handle === 0x81010005)?.activationSupported).toBe(false);
    } finally {
      await tpm.tpm("tpm2_evictcontrol", ["-C", "o", "-c", "0x81010005"]);
    }
  });

  test("certify with a nonce: TPMS_ATTEST parses, names match, AK signature verifies in Node", async () => {
    const nonce = randomBytes(32);
    const { attest, signature } = await ops.certify(provider.keyHandle, provider.akHandle, nonce);
    const a = readAttest(attest);
    expect(a.magic).toBe(0xff544347);
    expect(a.type).toBe(0x8017);
    expect(Buffer.from(a.extraData)).toEqual(nonce);
    expect(a.rest).toBe(0);
    const ev = await provider.evidence();
    if (ev.kind !== "tpm") throw new Error("expected tpm evidence");
    expect(Buffer.from(a.name).toString("hex")).toBe(ev.nameHex);
    // qualifiedSigner = QN(AK) = H(QN(EK) ‖ Name(AK)), QN(EK) = H(TPM_RH_ENDORSEMENT ‖ Name(EK)).
    const ek = eks.find((e) => e.handle === 0x81010001);
    const qnEk = qualifiedName(Uint8Array.from([0x40, 0, 0, 0x0b]), ek?.name ?? new Uint8Array());
    expect(Buffer.from(a.qualifiedSigner)).toEqual(Buffer.from(qualifiedName(qnEk, ak.name)));
    const rs = ecdsaTpmtToRaw(signature);
    expect(
      nodeVerify("sha256", attest, { key: createPublicKey(ak.pem), dsaEncoding: "ieee-p1363" }, rs),
    ).toBe(true);
    const tampered = Buffer.from(attest);
    tampered[tampered.length - 1] = (tampered[tampered.length - 1] ?? 0) ^ 1;
    expect(
      nodeVerify("sha256", tampered, { key: createPublicKey(ak.pem), dsaEncoding: "ieee-p1363" }, rs),
    ).toBe(false);
  });

  test("certify of a missing object → ERR_TPM_HANDLE_MISSING; oversized nonce refused", async () => {
    await expect(ops.certify(0x81000099, provider.akHandle, randomBytes(16))).rejects.toSatisfy((e) =>
      isM2mError(e, "ERR_TPM_HANDLE_MISSING"),
    );
    await expect(ops.certify(provider.keyHandle, provider.akHandle, randomBytes(65))).rejects.toSatisfy((e) =>
      isM2mError(e, "ERR_TPM_ARGUMENT"),
    );
  });

  test("no transient objects or sessions are left loaded", async () => {
    const t = await tpm.tpm("tpm2_getcap", ["handles-transient"]);
    expect(t.stdout.trim()).toBe("");
    const s = await tpm.tpm("tpm2_getcap", ["handles-loaded-session"]);
    expect(s.stdout.trim()).toBe("");
  });

  test("createAk refuses a foreign object at the AK handle", async () => {
    const foreign = new TpmAttestationOps(provider.runner, { akHandle: provider.keyHandle });
    await expect(foreign.createAk()).rejects.toSatisfy((e) => isM2mError(e, "ERR_KEY_MISMATCH"));
  });
});
