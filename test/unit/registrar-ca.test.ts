import { execFile } from "node:child_process";
import { createPublicKey } from "node:crypto";
import { stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { promisify } from "node:util";
import { describe, expect, it } from "vitest";
import { createCsr } from "../../src/keys/csr.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";
import { FleetCa, initCa, verifyCsr } from "../../src/registrar/ca/index.js";
import { useTempDir } from "../kit/temp-dir.js";

const run = promisify(execFile);

describe("fleet CA and provider-signed CSRs", () => {
  const dir = useTempDir("m2m-ca-");

  it("ca init writes 0600 keys and refuses to overwrite", async () => {
    const paths = await initCa({ dir: dir(), sans: ["registrar.example", "10.0.0.1"] });
    expect((await stat(paths.caKey)).mode & 0o777).toBe(0o600);
    expect((await stat(paths.serverKey)).mode & 0o777).toBe(0o600);
    await expect(initCa({ dir: dir() })).rejects.toMatchObject({ code: "ERR_CA_EXISTS" });
    const { stdout } = await run("openssl", ["verify", "-CAfile", paths.caCert, paths.serverCert]);
    expect(stdout).toContain("OK");
    const { stdout: text } = await run("openssl", [
      "x509",
      "-in",
      paths.serverCert,
      "-noout",
      "-ext",
      "subjectAltName",
    ]);
    expect(text).toContain("DNS:localhost");
    expect(text).toContain("IP Address:127.0.0.1");
    expect(text).toContain("DNS:registrar.example");
  });

  for (const algorithm of ["ec-p256", "rsa-2048"] as const) {
    it(`issues a device certificate from a ${algorithm} KeyProvider CSR that openssl verifies`, async () => {
      const provider = new FakeKeyProvider({ algorithm });
      const info = await provider.createOrOpen();
      const der = await createCsr(provider, info, { commonName: "ignored" });
      const verified = await verifyCsr(der);
      const ca = await FleetCa.load(dir());
      const issued = await ca.issueDeviceCertificate(verified, {
        deviceId: "dev-1",
        expectedSpkiDer: createPublicKey(info.spkiPem).export({ format: "der", type: "spki" }),
        lifetimeSeconds: 3600,
      });
      const certFile = join(dir(), `dev-${algorithm}.pem`);
      await writeFile(certFile, issued.pem);
      const { stdout } = await run("openssl", ["verify", "-CAfile", join(dir(), "ca.pem"), certFile]);
      expect(stdout).toContain("OK");
      const { stdout: text } = await run("openssl", ["x509", "-in", certFile, "-noout", "-text"]);
      expect(text).toContain("URI:urn:m2m:device:dev-1");
      expect(text).toContain("TLS Web Client Authentication");
      expect(text).toContain("CN = dev-1");
    });
  }

  it("refuses a CSR for another key and a CSR with a broken signature", async () => {
    const a = new FakeKeyProvider({ label: "a" });
    const b = new FakeKeyProvider({ label: "b" });
    const ia = await a.createOrOpen();
    const ib = await b.createOrOpen();
    const der = await createCsr(a, ia, { commonName: "x" });
    const ca = await FleetCa.load(dir());
    await expect(
      ca.issueDeviceCertificate(await verifyCsr(der), {
        deviceId: "dev-2",
        expectedSpkiDer: createPublicKey(ib.spkiPem).export({ format: "der", type: "spki" }),
        lifetimeSeconds: 60,
      }),
    ).rejects.toMatchObject({ code: "ERR_CSR_KEY_MISMATCH" });
    const tampered = new Uint8Array(der);
    tampered[tampered.length - 5] = (tampered[tampered.length - 5] ?? 0) ^ 0x01;
    await expect(verifyCsr(tampered)).rejects.toMatchObject({
      code: expect.stringMatching(/ERR_CSR_(SIGNATURE|INVALID)/),
    });
    await expect(verifyCsr(new Uint8Array([1, 2, 3]))).rejects.toMatchObject({ code: "ERR_CSR_INVALID" });
  });
});
