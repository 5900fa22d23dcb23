import { randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { TPM_ALG, TPM_ECC_CURVE } from "../../src/tpm/constants.js";
import { makeCredential } from "../../src/tpm/make-credential.js";
import { computeName, decodeTpm2bPublic, decodeTpmtPublic } from "../../src/tpm/public.js";

// Proves the TypeScript MakeCredential against the real TPM2_ActivateCredential of swtpm, for the RSA-2048
// EK (0x81010001, PolicyA) and swtpm's ECC P-384 high-range EK (0x81010016, PolicyB).

const RSA_EK = "0x81010001";
const ECC_EK = "0x81010016";
/** A low-range ECC P-256 EK (template L-2, PolicyA) we create ourselves: swtpm does not provision one. */
const ECC_P256_EK = "0x81010002";
const AK_HANDLE = "0x81000010";

let tpm: SwtpmHandle;
let dir: string;

async function t2(tool: string, args: readonly string[], input?: Uint8Array): Promise<string> {
  const r = await execa(tool, args, {
    env: tpm.env,
    cwd: dir,
    timeout: 20_000,
    ...(input === undefined ? {} : { input: Buffer.from(input) }),
  });
  return r.stdout;
}

async function withEkPolicySession<T>(fn: (auth: string) => Promise<T>): Promise<T> {
  const s = join(dir, `sess-${randomBytes(4).toString("hex")}.ctx`);
  await t2("tpm2_startauthsession", ["--policy-session", "-S", s]);
  try {
    await t2("tpm2_policysecret", ["-S", s, "-c", "e"]);
    return await fn(`session:${s}`);
  } finally {
    await t2("tpm2_flushcontext", [s]);
  }
}

async function activate(ek: string, blob: Uint8Array, tag: string): Promise<Uint8Array> {
  const blobPath = join(dir, `blob-${tag}`);
  const outPath = join(dir, `out-${tag}`);
  await writeFile(blobPath, blob);
  const run = (ekAuth: string[]) =>
    t2("tpm2_activatecredential", ["-c", AK_HANDLE, "-C", ek, "-i", blobPath, "-o", outPath, ...ekAuth]);
  if (ek === RSA_EK || ek === ECC_P256_EK) await withEkPolicySession((auth) => run(["-P", auth]));
  else await run([]);
  return readFile(outPath);
}

beforeAll(async () => {
  tpm = await startSwtpm();
  dir = await mkdtemp(join(tmpdir(), "m2m-makecred-"));
  // A noDA restricted ECDSA AK under the RSA EK (policy session for the EK's PolicyA), persisted so no
  // transient is left behind on the resource-manager-less swtpm.
  await withEkPolicySession((auth) =>
    t2("tpm2_create", [
      ...["-C", RSA_EK, "-P", auth, "-G", "ecc256:ecdsa-sha256:null", "-g", "sha256"],
      ...["-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign|noda"],
      ...["-u", "ak.pub", "-r", "ak.priv"],
    ]),
  );
  await withEkPolicySession((auth) =>
    t2("tpm2_load", ["-C", RSA_EK, "-P", auth, "-u", "ak.pub", "-r", "ak.priv", "-c", "ak.ctx"]),
  );
  await t2("tpm2_evictcontrol", ["-C", "o", "-c", "ak.ctx", AK_HANDLE]);
  await t2("tpm2_flushcontext", ["-t"]);
  await t2("tpm2_createek", ["-c", ECC_P256_EK, "-G", "ecc", "-u", "ek-p256.pub"]);
}, 120_000);

afterAll(async () => {
  await tpm?.stop();
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
});

async function readTpmt(handle: string, tag: string) {
  await t2("tpm2_readpublic", ["-c", handle, "-f", "tpmt", "-o", `${tag}.tpmt`]);
  await t2("tpm2_readpublic", ["-c", handle, "-o", `${tag}.tpm2b`]);
  const tpmt = decodeTpmtPublic(await readFile(join(dir, `${tag}.tpmt`)));
  // Both encodings of the same public decode to the same structure.
  expect(decodeTpm2bPublic(await readFile(join(dir, `${tag}.tpm2b`)))).toEqual(tpmt);
  return tpmt;
}

async function akName(): Promise<Uint8Array> {
  const ak = await readTpmt(AK_HANDLE, "ak");
  const name = computeName(ak);
  // Our Name equals the TPM's own answer.
  const out = await t2("tpm2_readpublic", ["-c", AK_HANDLE]);
  expect(out).toContain(`name: ${Buffer.from(name).toString("hex")}`);
  return name;
}

describe("makeCredential → tpm2_activatecredential on swtpm", () => {
  it("RSA-2048 EK: the TPM recovers the secret", async () => {
    const ek = await readTpmt(RSA_EK, "ek-rsa");
    expect(ek.type).toBe(TPM_ALG.RSA);
    const name = await akName();
    const secret = randomBytes(32);
    const { blob } = makeCredential(ek, name, secret);
    expect(Buffer.from(await activate(RSA_EK, blob, "rsa"))).toEqual(secret);
  });

  it("ECC P-384 EK (high range, AES-256, sha384): the TPM recovers the secret", async () => {
    const ek = await readTpmt(ECC_EK, "ek-ecc");
    expect(ek.type).toBe(TPM_ALG.ECC);
    if (ek.type !== TPM_ALG.ECC) throw new Error("not ECC");
    expect(ek.parameters.curveId).toBe(TPM_ECC_CURVE.NIST_P384);
    expect(ek.parameters.symmetric.keyBits).toBe(256);
    const name = await akName();
    const secret = randomBytes(32);
    const { blob } = makeCredential(ek, name, secret);
    expect(Buffer.from(await activate(ECC_EK, blob, "ecc"))).toEqual(secret);
  });

  it("ECC P-256 EK (low range L-2, AES-128, sha256, PolicyA): the TPM recovers the secret", async () => {
    const ek = await readTpmt(ECC_P256_EK, "ek-p256");
    if (ek.type !== TPM_ALG.ECC) throw new Error("not ECC");
    expect(ek.parameters.curveId).toBe(TPM_ECC_CURVE.NIST_P256);
    expect(Buffer.from(ek.authPolicy).toString("hex")).toBe(
      "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa",
    );
    const secret = randomBytes(32);
    const { blob } = makeCredential(ek, await akName(), secret);
    expect(Buffer.from(await activate(ECC_P256_EK, blob, "p256"))).toEqual(secret);
  });

  it("a blob made for another AK name fails activation with an integrity error", async () => {
    const ek = await readTpmt(RSA_EK, "ek-rsa2");
    const name = Buffer.from(await akName());
    name[5] = (name[5] ?? 0) ^ 0x01;
    const { blob } = makeCredential(ek, name, randomBytes(32));
    const err = await activate(RSA_EK, blob, "wrong").then(
      () => undefined,
      (e: unknown) => e as { stderr?: string },
    );
    expect(err).toBeDefined();
    // TPM_RC_INTEGRITY (0x09f) on parameter 2 → 0x9a2 family; tpm2-tools prints the RC.
    expect(err?.stderr ?? "").toMatch(/integrity/i);
  });
});
