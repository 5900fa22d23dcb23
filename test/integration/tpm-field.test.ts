import { randomBytes } from "node:crypto";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { resolveSecret } from "../../src/config/secrets.js";
import { TpmAttestationOps } from "../../src/keys/tpm/endorsement.js";
import { TpmRunner } from "../../src/keys/tpm/runner.js";
import { TpmKeyProvider } from "../../src/keys/tpm/tpm-provider.js";
import { ekPolicyB } from "../../src/tpm/ek-policy.js";
import { makeCredential } from "../../src/tpm/make-credential.js";
import { decodeTpmtPublic } from "../../src/tpm/public.js";

/**
 * Real-TPM shapes on swtpm: EKs made from the TCG high-range templates (authPolicy = PolicyB, so the
 * agent must run PolicySecret + PolicyOR), and an owner hierarchy with a password.
 */
const HIGH_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|adminwithpolicy|restricted|decrypt";
const POLICY_ONLY_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|adminwithpolicy|restricted|decrypt";

describe("TPM field shapes (swtpm)", () => {
  let tpm: SwtpmHandle;
  let work: string;

  /** Creates an EK from a high-range template in the endorsement hierarchy and persists it. */
  async function highRangeEk(handle: string, alg: string, attrs: string, policyFile: string): Promise<void> {
    const ctx = join(work, `ek-${handle}.ctx`);
    await tpm.tpm("tpm2_createprimary", [
      "-C",
      "e",
      "-g",
      "sha256",
      "-G",
      alg,
      "-a",
      attrs,
      "-L",
      policyFile,
      "-c",
      ctx,
    ]);
    await tpm.tpm("tpm2_evictcontrol", ["-C", "o", "-c", ctx, handle]);
    await tpm.tpm("tpm2_flushcontext", ["-t"]);
  }

  beforeAll(async () => {
    tpm = await startSwtpm();
    work = await mkdtemp(join(tmpdir(), "m2m-tpm-field-"));
    const policyB = join(work, "policy-b.bin");
    await writeFile(policyB, ekPolicyB("sha256"));
    // H-1 RSA-2048 and H-2 ECC P-256 (TCG EK Credential Profile 2.3+, B.4), plus a P-256 EK with PolicyB
    // but userWithAuth clear: only the policy session can authorize that one.
    await highRangeEk("0x81010012", "rsa2048:aes128cfb", HIGH_ATTRS, policyB);
    await highRangeEk("0x81010014", "ecc256:aes128cfb", HIGH_ATTRS, policyB);
    await highRangeEk("0x81010020", "ecc256:aes128cfb", POLICY_ONLY_ATTRS, policyB);
  }, 120_000);

  afterAll(async () => {
    await tpm?.stop();
    if (work !== undefined) await rm(work, { recursive: true, force: true });
  });

  it.each([
    ["H-1 RSA-2048 (PolicyB, userWithAuth)", 0x81010012],
    ["H-2 ECC P-256 (PolicyB, userWithAuth)", 0x81010014],
    ["ECC P-256 with PolicyB only (userWithAuth clear)", 0x81010020],
    ["swtpm's H-3 ECC P-384 (PolicyB sha384)", 0x81010016],
  ])(
    "%s: AK under the EK and credential activation through PolicySecret + PolicyOR",
    async (_, handle) => {
      const provider = new TpmKeyProvider({ tcti: tpm.tcti });
      try {
        await provider.createOrOpen();
        const ops = new TpmAttestationOps(provider.runner, { akHandle: provider.akHandle });
        const ek = (await ops.readEkPublics({ createIfAbsent: false })).find((e) => e.handle === handle);
        expect(ek?.activationSupported).toBe(true);
        const ak = await ops.createAk({ ekHandle: handle, replace: true });
        const secret = randomBytes(32);
        const { blob } = makeCredential(
          decodeTpmtPublic(ek?.tpmtPublic ?? new Uint8Array()),
          ak.name,
          secret,
        );
        const got = await ops.activateCredential(blob, handle);
        expect(Buffer.from(got.reveal()).equals(secret)).toBe(true);
        // No session or object left behind on a TPM without a resource manager.
        expect((await tpm.tpm("tpm2_getcap", ["handles-loaded-session"])).stdout.trim()).toBe("");
        expect((await tpm.tpm("tpm2_getcap", ["handles-transient"])).stdout.trim()).toBe("");
      } finally {
        await provider.close();
      }
    },
    60_000,
  );

  it("the policy-only EK refuses an empty password: the policy session is what authorizes it", async () => {
    const childWithPassword = (parent: string) =>
      tpm
        .tpm("tpm2_create", [
          "-C",
          parent,
          "-G",
          "ecc256",
          "-u",
          join(work, "c.pub"),
          "-r",
          join(work, "c.priv"),
        ])
        .then(
          () => "accepted",
          (err: unknown) => `refused: ${String(err).slice(0, 2000)}`,
        );
    // Control: the userWithAuth EK accepts the empty password, so the command itself is fine.
    expect(await childWithPassword("0x81010014")).toBe("accepted");
    const r = await childWithPassword("0x81010020");
    expect(r).toMatch(/^refused/);
    expect(r).toMatch(/0x0*12f|auth/i);
  }, 60_000);

  it("owner hierarchy with a password: keys, AK and eviction use keys.tpm.owner_auth from a 0600 file", async () => {
    const authFile = join(work, "owner-auth");
    await writeFile(authFile, "owner-Secret-1\n", { mode: 0o600 });
    // The secret goes to tpm2_changeauth through a file too.
    const raw = join(work, "owner-auth-raw");
    await writeFile(raw, "owner-Secret-1", { mode: 0o600 });
    await tpm.tpm("tpm2_evictcontrol", ["-C", "o", "-c", "0x81000003"]).catch(() => undefined);
    await tpm.tpm("tpm2_evictcontrol", ["-C", "o", "-c", "0x81000002"]).catch(() => undefined);
    await tpm.tpm("tpm2_evictcontrol", ["-C", "o", "-c", "0x81000001"]).catch(() => undefined);
    await tpm.tpm("tpm2_changeauth", ["-c", "o", `file:${raw}`]);
    try {
      // Without the auth value: a typed, fatal authorization error (never retried).
      const bare = new TpmKeyProvider({ tcti: tpm.tcti });
      await expect(bare.createOrOpen()).rejects.toMatchObject({ code: "ERR_TPM_AUTH", retry: "fatal" });
      await bare.close();

      const runner = new TpmRunner({
        tcti: tpm.tcti,
        ownerAuth: () => resolveSecret({ file: authFile }),
      });
      const provider = new TpmKeyProvider({ runner });
      const info = await provider.createOrOpen();
      expect(info.created).toBe(true);
      const ops = new TpmAttestationOps(runner, { akHandle: provider.akHandle });
      const ak = await ops.createAk({ replace: true });
      expect(ak.created).toBe(true);
      await provider.destroy();
      expect((await tpm.tpm("tpm2_getcap", ["handles-persistent"])).stdout).not.toContain("0x81000002");
      await runner.close();
    } finally {
      await tpm.tpm("tpm2_changeauth", ["-c", "o", "-p", `file:${raw}`]);
    }
  }, 120_000);
});
