import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { execa } from "execa";
import { afterAll, beforeAll, describe, expect, test } from "vitest";
import { createSharedSwtpmCaDir, type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { useTempDir } from "../kit/temp-dir.js";

describe("swtpm test kit", () => {
  let tpm: SwtpmHandle;
  const work = useTempDir("m2m-tpm-kit-test-");

  beforeAll(async () => {
    tpm = await startSwtpm();
  });
  afterAll(async () => {
    await tpm?.stop();
  });

  test("EK certificate in NV 0x01c00002 chains to the local CA", async () => {
    const der = join(work(), "ek.der");
    await tpm.tpm("tpm2_nvread", ["0x01c00002", "-o", der]);
    const pem = join(work(), "ek.pem");
    await execa("openssl", ["x509", "-inform", "der", "-in", der, "-out", pem]);
    await writeFile(join(work(), "root.pem"), tpm.caCertPems[0] ?? "");
    await writeFile(join(work(), "int.pem"), tpm.caCertPems[1] ?? "");
    const res = await execa("openssl", [
      "verify",
      "-CAfile",
      join(work(), "root.pem"),
      "-untrusted",
      join(work(), "int.pem"),
      pem,
    ]);
    expect(res.stdout).toContain(": OK");
    expect(tpm.caCertPems).toHaveLength(2);
    expect(tpm.env.TPM2TOOLS_TCTI).toBe(tpm.tcti);
  });

  test("persistent objects survive restart", async () => {
    await tpm.restart();
    const { stdout } = await tpm.tpm("tpm2_getcap", ["handles-persistent"]);
    expect(stdout).toContain("0x81010001");
    expect(stdout).toContain("0x81010016");
    await tpm.resetDictionaryLockout();
  });

  test("two swtpms share one CA; stop removes the temp dir", async () => {
    const shared = await createSharedSwtpmCaDir();
    const a = await startSwtpm({ caDir: shared.caDir });
    const b = await startSwtpm({ caDir: shared.caDir });
    try {
      expect(a.caCertPems).toEqual(b.caCertPems);
      expect(a.port).not.toBe(b.port);
      for (const t of [a, b]) {
        const der = join(work(), `ek-${t.port}.der`);
        await t.tpm("tpm2_nvread", ["0x01c00002", "-o", der]);
        const pem = `${der}.pem`;
        await execa("openssl", ["x509", "-inform", "der", "-in", der, "-out", pem]);
        const res = await execa("openssl", [
          "verify",
          "-CAfile",
          a.rootCaPemPath,
          "-untrusted",
          a.intermediateCaPemPath,
          pem,
        ]);
        expect(res.stdout).toContain(": OK");
      }
    } finally {
      await a.stop();
      await b.stop();
      await shared.cleanup();
    }
    await expect(readFile(join(a.dir, "swtpm_setup.conf"))).rejects.toThrow();
    expect(a.running).toBe(false);
  });
});
