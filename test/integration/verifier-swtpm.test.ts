import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { M2mError } from "../../src/core/errors.js";
import { TpmAttestationOps, TpmRunner } from "../../src/keys/tpm/index.js";
import {
  beginActivation,
  checkAkPublic,
  checkEkPublic,
  TPM_VERIFY_ERRORS as E,
  verifyActivationAndCertify,
  verifyEkCertificate,
} from "../../src/registrar/verifier/tpm-verifier.js";
import { TpmReader, TpmWriter } from "../../src/tpm/bytes.js";

// End-to-end registrar verification on real swtpm evidence: EK certificate (swtpm local CA), AK created on
// the TPM under the EK, credential activation of OUR MakeCredential blob, and a raw TPM2_Certify of the
// device key by the AK with the session nonce as qualifying data (tpm2_certify 5.4 cannot take one).

const RSA_EK = 0x81010001;
const ECC_EK = 0x81010016;
const SRK = 0x81000001;
const DEVICE = 0x81000002;
const AK_UNDER_RSA_EK = 0x81000010;
const AK_UNDER_ECC_EK = 0x81000011;
const h = (n: number) => `0x${n.toString(16)}`;

let tpm: SwtpmHandle;
let dir: string;
let rootPem: string;
let interPem: string;

async function t2(tool: string, args: readonly string[]): Promise<string> {
  const r = await execa(tool, [...args], { env: tpm.env, cwd: dir, timeout: 20_000, stdin: "ignore" });
  return r.stdout;
}

async function ekAuth(ek: number, fn: (auth: string[]) => Promise<unknown>): Promise<void> {
  // The RSA EK (template L-1) has userWithAuth clear: PolicySecret(endorsement) session. The P-384 high
  // range EK (H-3) has userWithAuth set, so an empty password works for USER-role uses.
  if (ek !== RSA_EK) {
    await fn([]);
    return;
  }
  const s = join(dir, `s-${Math.random().toString(16).slice(2)}.ctx`);
  await t2("tpm2_startauthsession", ["--policy-session", "-S", s]);
  try {
    await t2("tpm2_policysecret", ["-S", s, "-c", "e"]);
    await fn(["-P", `session:${s}`]);
  } finally {
    await t2("tpm2_flushcontext", [s]);
  }
}

/** Raw TPM2_Certify(objectHandle, signHandle, qualifyingData, inScheme = NULL) with two empty password sessions. */
async function rawCertify(object: number, signer: number, nonce: Uint8Array) {
  const pw = new TpmWriter().u32(0x40000009).u16(0).u8(0).u16(0).finish();
  const params = new TpmWriter().tpm2b(nonce).u16(0x0010).finish();
  const body = new TpmWriter()
    .u32(object)
    .u32(signer)
    .u32(pw.length * 2)
    .raw(pw)
    .raw(pw)
    .raw(params)
    .finish();
  const cmd = new TpmWriter()
    .u16(0x8002)
    .u32(10 + body.length)
    .u32(0x148)
    .raw(body)
    .finish();
  for (let attempt = 0; ; attempt++) {
    const r = await execa("tpm2_send", [], {
      env: tpm.env,
      input: Buffer.from(cmd),
      encoding: "buffer",
      timeout: 20_000,
    });
    const rd = new TpmReader(r.stdout, "certify response");
    rd.u16("tag");
    rd.u32("size");
    const rc = rd.u32("rc");
    // TPM_RC_RETRY / TPM_RC_YIELDED / TPM_RC_TESTING: no automatic retry for raw commands.
    if ((rc === 0x922 || rc === 0x908 || rc === 0x90a) && attempt < 5) continue;
    if (rc !== 0) throw new Error(`TPM2_Certify rc=0x${rc.toString(16)}`);
    rd.u32("parameterSize");
    const attestBytes = rd.tpm2b("certifyInfo", 4096);
    const sigStart = rd.offset;
    const sigLen = rd.remaining - 10; // two password-session responses: 5 bytes each
    const signatureBytes = Buffer.from(r.stdout).subarray(sigStart, sigStart + sigLen);
    return { attestBytes, signatureBytes: new Uint8Array(signatureBytes) };
  }
}

async function readPublic(handle: number, tag: string): Promise<Uint8Array> {
  await t2("tpm2_readpublic", ["-c", h(handle), "-o", `${tag}.tpm2b`]);
  return readFile(join(dir, `${tag}.tpm2b`));
}

beforeAll(async () => {
  tpm = await startSwtpm();
  dir = await mkdtemp(join(tmpdir(), "m2m-verifier-"));
  // caCertPems = [root, intermediate]: the root is the operator's trust anchor, the intermediate travels along.
  [rootPem = "", interPem = ""] = tpm.caCertPems;
  // SRK and a noDA device signing key (notes' recipe), persisted.
  await t2("tpm2_createprimary", [
    ...["-C", "o", "-g", "sha256", "-G", "ecc256:aes128cfb", "-c", "srk.ctx"],
    ...["-a", "restricted|decrypt|fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda"],
  ]);
  await t2("tpm2_evictcontrol", ["-C", "o", "-c", "srk.ctx", h(SRK)]);
  await t2("tpm2_flushcontext", ["-t"]);
  await t2("tpm2_create", [
    ...["-C", h(SRK), "-g", "sha256", "-G", "ecc256:ecdsa-sha256", "-u", "dev.pub", "-r", "dev.priv"],
    ...["-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign|noda"],
  ]);
  await t2("tpm2_load", ["-C", h(SRK), "-u", "dev.pub", "-r", "dev.priv", "-c", "dev.ctx"]);
  await t2("tpm2_evictcontrol", ["-C", "o", "-c", "dev.ctx", h(DEVICE)]);
  await t2("tpm2_flushcontext", ["-t"]);
  // noDA restricted AKs directly under each EK: ECC P-256 under the RSA EK, RSA-2048 under the ECC EK.
  for (const [ek, ak, alg] of [
    [RSA_EK, AK_UNDER_RSA_EK, "ecc256:ecdsa-sha256:null"],
    [ECC_EK, AK_UNDER_ECC_EK, "rsa2048:rsassa-sha256:null"],
  ] as const) {
    const tag = h(ak);
    await ekAuth(ek, (auth) =>
      t2("tpm2_create", [
        ...["-C", h(ek), ...auth, "-G", alg, "-g", "sha256", "-u", `${tag}.pub`, "-r", `${tag}.priv`],
        ...["-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda"],
      ]),
    );
    await ekAuth(ek, (auth) =>
      t2("tpm2_load", ["-C", h(ek), ...auth, "-u", `${tag}.pub`, "-r", `${tag}.priv`, "-c", `${tag}.ctx`]),
    );
    await t2("tpm2_evictcontrol", ["-C", "o", "-c", `${tag}.ctx`, h(ak)]);
    await t2("tpm2_flushcontext", ["-t"]);
  }
}, 120_000);

afterAll(async () => {
  await tpm?.stop();
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
});

async function enrol(ek: number, ekCertNv: number, ak: number) {
  // ── agent side, step 1: evidence
  await t2("tpm2_nvread", [h(ekCertNv), "-o", `ekcert-${h(ek)}.der`]);
  const ekCertDer = await readFile(join(dir, `ekcert-${h(ek)}.der`));
  const ekPub = await readPublic(ek, `ek-${h(ek)}`);
  const akPub = await readPublic(ak, `ak-${h(ak)}`);
  const devPub = await readPublic(DEVICE, "device");

  // ── registrar, begin
  const cert = await verifyEkCertificate(ekCertDer, [rootPem], [interPem], new Date());
  const ekPublic = checkEkPublic(ekPub, cert.publicKey);
  const akChecked = checkAkPublic(akPub);
  const ch = beginActivation(ekPublic, akChecked.name);

  // ── agent side, step 3: activate + certify with the nonce
  await writeFile(join(dir, "blob"), ch.blob);
  await ekAuth(ek, (auth) =>
    t2("tpm2_activatecredential", ["-c", h(ak), "-C", h(ek), "-i", "blob", "-o", "recovered", ...auth]),
  );
  const recoveredSecret = await readFile(join(dir, "recovered"));
  const { attestBytes, signatureBytes } = await rawCertify(DEVICE, ak, ch.nonce);
  return {
    ev: {
      expectedSecret: ch.secret,
      recoveredSecret,
      ekPublic,
      akPublic: akPub,
      nonce: ch.nonce,
      attestBytes,
      signatureBytes,
      devicePublic: devPub,
    },
    cert,
  };
}

function codeOf(fn: () => unknown): string {
  try {
    fn();
    return "OK";
  } catch (err) {
    return err instanceof M2mError ? err.code : `NOT-M2M:${String(err)}`;
  }
}

describe("registrar verifier on real swtpm evidence", () => {
  it("RSA EK + ECC AK: EK cert chains to swtpm's CA; activation and certify verify", async () => {
    const { ev, cert } = await enrol(RSA_EK, 0x01c00002, AK_UNDER_RSA_EK);
    expect(cert.chainDer).toHaveLength(3);
    const out = verifyActivationAndCertify(ev);
    expect(out.deviceKey.asymmetricKeyType).toBe("ec");
    // Real evidence, one thing changed at a time.
    expect(codeOf(() => verifyActivationAndCertify({ ...ev, nonce: new Uint8Array(32) }))).toBe(
      E.ATTEST_NONCE,
    );
    const flipped = Uint8Array.from(ev.attestBytes);
    flipped[10] = (flipped[10] ?? 0) ^ 1;
    expect(codeOf(() => verifyActivationAndCertify({ ...ev, attestBytes: flipped }))).toBe(
      E.ATTEST_SIGNATURE,
    );
    expect(codeOf(() => verifyActivationAndCertify({ ...ev, recoveredSecret: new Uint8Array(32) }))).toBe(
      E.CREDENTIAL_SECRET_MISMATCH,
    );
    const akRsaPub = await readPublic(AK_UNDER_ECC_EK, "other-ak");
    expect(codeOf(() => verifyActivationAndCertify({ ...ev, akPublic: akRsaPub }))).toBe(E.ATTEST_SIGNATURE);
  });

  it("ECC P-384 EK + RSA-2048 AK: activation and certify verify", async () => {
    const { ev, cert } = await enrol(ECC_EK, 0x01c00016, AK_UNDER_ECC_EK);
    expect(cert.publicKey.asymmetricKeyDetails?.namedCurve).toBe("secp384r1");
    expect(codeOf(() => verifyActivationAndCertify(ev))).toBe("OK");
  });

  it("the other TPM's EK certificate does not match this EK public", async () => {
    await t2("tpm2_nvread", ["0x01c00002", "-o", "ek-rsa.der"]);
    const cert = await verifyEkCertificate(
      await readFile(join(dir, "ek-rsa.der")),
      [rootPem],
      [interPem],
      new Date(),
    );
    const eccEkPub = await readPublic(ECC_EK, "ecc-ek-mismatch");
    expect(codeOf(() => checkEkPublic(eccEkPub, cert.publicKey))).toBe(E.EK_PUBLIC_MISMATCH);
  });

  it("tpm2_certify without a nonce (fixed extraData 00ff55aa) parses but fails the nonce check", async () => {
    const { ev } = await enrol(RSA_EK, 0x01c00002, AK_UNDER_RSA_EK);
    await t2("tpm2_certify", [
      ...["-c", h(DEVICE), "-C", h(AK_UNDER_RSA_EK), "-g", "sha256"],
      ...["-o", "attest.bin", "-s", "sig.bin", "-f", "tss"],
    ]);
    const attestBytes = await readFile(join(dir, "attest.bin"));
    const signatureBytes = await readFile(join(dir, "sig.bin"));
    expect(codeOf(() => verifyActivationAndCertify({ ...ev, attestBytes, signatureBytes }))).toBe(
      E.ATTEST_NONCE,
    );
  });

  it("evidence produced by the agent-side TpmAttestationOps (src/keys/tpm) verifies", async () => {
    const runner = new TpmRunner({ tcti: tpm.tcti, runtimeDir: dir });
    const ops = new TpmAttestationOps(runner, { akHandle: 0x81000020 });
    const ak = await ops.createAk({ replace: true });
    const certs = await ops.readEkCertificates();
    const rsaCert = certs.find((c) => c.nvIndex === 0x01c00002);
    if (rsaCert === undefined) throw new Error("no RSA EK certificate");
    const eks = await ops.readEkPublics();
    const rsaEk = eks.find((e) => e.handle === RSA_EK);
    if (rsaEk === undefined) throw new Error("no RSA EK");

    const cert = await verifyEkCertificate(rsaCert.der, [rootPem], [interPem], new Date());
    const ekPublic = checkEkPublic(rsaEk.tpm2bPublic, cert.publicKey);
    const ch = beginActivation(ekPublic, checkAkPublic(ak.tpm2bPublic).name);
    const recovered = await ops.activateCredential(ch.blob, RSA_EK);
    const { attest, signature } = await ops.certify(DEVICE, ak.handle, ch.nonce);
    const out = verifyActivationAndCertify({
      expectedSecret: ch.secret,
      recoveredSecret: recovered.reveal(),
      ekPublic,
      akPublic: ak.tpm2bPublic,
      nonce: ch.nonce,
      attestBytes: attest,
      signatureBytes: signature,
      devicePublic: await readPublic(DEVICE, "device-ops"),
    });
    expect(out.deviceKey.asymmetricKeyType).toBe("ec");
  });
});
