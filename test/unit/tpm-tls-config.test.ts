import { writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { isM2mError } from "../../src/core/errors.js";
import { requireResourceManagerTcti, TpmTlsKeys, tpmTlsKeyLabel } from "../../src/keys/tpm/tls.js";
import { useTempDir } from "../kit/temp-dir.js";

/** Input checks of keys/tpm/tls.ts that refuse before any TPM or tpm2_ptool is touched. */
describe("TPM TLS keys: configuration checks", () => {
  const dir = useTempDir("m2m-tpm-tls-unit-");

  const codeOf = async (fn: () => unknown): Promise<string> => {
    try {
      await fn();
      return "OK";
    } catch (err) {
      return isM2mError(err) ? err.code : `NOT-M2M:${String(err)}`;
    }
  };

  it("accepts only resource-manager TCTIs", async () => {
    expect(await codeOf(() => requireResourceManagerTcti("device:/dev/tpmrm0"))).toBe("OK");
    expect(await codeOf(() => requireResourceManagerTcti("tabrmd:bus_name=x,bus_type=session"))).toBe("OK");
    expect(await codeOf(() => requireResourceManagerTcti("tabrmd"))).toBe("OK");
    for (const t of ["device:/dev/tpm0", "swtpm:host=127.0.0.1,port=1", "mssim", "device:/dev/tpmrm0x", ""]) {
      expect(await codeOf(() => requireResourceManagerTcti(t))).toBe("ERR_KEY_CONFIG");
    }
    expect(
      await codeOf(() => new TpmTlsKeys({ storeDir: dir(), tcti: "device:/dev/tpm0", userPinFile: "/x" })),
    ).toBe("ERR_KEY_CONFIG");
  });

  it("labels objects by key handle", () => {
    expect(tpmTlsKeyLabel(0x81000002)).toBe("device-0x81000002");
    expect(tpmTlsKeyLabel(0x81000004)).toBe("device-0x81000004");
  });

  it("refuses missing key blobs, a missing PIN file, a PIN file others can read, an empty PIN", async () => {
    const pub = join(dir(), "k.pub");
    const priv = join(dir(), "k.priv");
    const keys = (pin: string) =>
      new TpmTlsKeys({ storeDir: join(dir(), "store"), tcti: "tabrmd", userPinFile: pin });
    expect(await codeOf(() => keys(join(dir(), "pin")).link(0x81000002, { pub, priv }))).toBe(
      "ERR_KEY_CONFIG",
    );
    await writeFile(pub, "x");
    await writeFile(priv, "x");
    expect(await codeOf(() => keys(join(dir(), "absent.pin")).link(0x81000002, { pub, priv }))).toBe(
      "ERR_KEY_CONFIG",
    );
    const open = join(dir(), "open.pin");
    await writeFile(open, "1234", { mode: 0o644 });
    expect(await codeOf(() => keys(open).link(0x81000002, { pub, priv }))).toBe("ERR_KEY_CONFIG");
    const empty = join(dir(), "empty.pin");
    await writeFile(empty, "\n", { mode: 0o600 });
    expect(await codeOf(() => keys(empty).link(0x81000002, { pub, priv }))).toBe("ERR_KEY_CONFIG");
  });
});
