import "reflect-metadata";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type * as x509 from "@peculiar/x509";
import { X509Certificate } from "@peculiar/x509";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import type { EstClient } from "../../src/credentials/est/est-client.js";
import { CertificateRenewer } from "../../src/credentials/est/renewer.js";
import { createCsr } from "../../src/keys/csr.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";
import { FleetCa, initCa, verifyCsr } from "../../src/registrar/ca/fleet-ca.js";

/**
 * The agent trusts nothing the EST server sends: each defence of CertificateRenewer (chain, key,
 * name, validity) is exercised with a server answer that breaks exactly that one property, and the
 * certificate on disk must stay the old one.
 */
describe("CertificateRenewer refuses unusable certificates", () => {
  let dir: string;
  let clock: ManualClock;
  let ca: FleetCa;
  let rogue: FleetCa;
  const keys = new FakeKeyProvider({ label: "dev" });
  const other = new FakeKeyProvider({ label: "other" });
  let certFile: string;
  let original: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-est-verify-"));
    clock = new ManualClock(new Date());
    await initCa({ dir: join(dir, "ca"), clock });
    await initCa({ dir: join(dir, "rogue"), clock });
    ca = await FleetCa.load(join(dir, "ca"), clock);
    rogue = await FleetCa.load(join(dir, "rogue"), clock);
    await keys.createOrOpen();
    await other.createOrOpen();
    certFile = join(dir, "device.pem");
    original = await issue(ca, keys, "dev-1", 3600);
    await writeFile(certFile, original);
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  async function issue(by: FleetCa, k: FakeKeyProvider, id: string, lifetime: number): Promise<string> {
    const info = await k.open();
    const v = await verifyCsr(await createCsr(k, info, { commonName: id }));
    return (
      await by.issueDeviceCertificate(v, {
        deviceId: id,
        expectedSpkiDer: v.spkiDer,
        lifetimeSeconds: lifetime,
      })
    ).pem;
  }

  const stub = (pem: () => Promise<string>): EstClient =>
    ({
      simplereenroll: async () => [new X509Certificate(await pem())] as x509.X509Certificate[],
    }) as unknown as EstClient;
  const once = { baseMs: 1, factor: 1, capMs: 1, deadlineMs: 1, maxAttempts: 1, maxRetryAfterMs: 1 };

  it.each([
    ["a certificate from another CA", () => issue(rogue, keys, "dev-1", 3600), "ERR_EST_CERT_UNTRUSTED"],
    ["a certificate for another key", () => issue(ca, other, "dev-1", 3600), "ERR_EST_CERT_KEY_MISMATCH"],
    ["a certificate naming another device", () => issue(ca, keys, "dev-2", 3600), "ERR_EST_CERT_SUBJECT"],
    ["an already expired certificate", () => issue(ca, keys, "dev-1", -120), "ERR_EST_CERT_NOT_VALID"],
  ])("%s → %s, old certificate kept", async (_name, make, code) => {
    const renewer = new CertificateRenewer(
      { deviceId: "dev-1", certFile, caPem: ca.certificatePem, retry: once },
      { keys, est: stub(make), clock },
    );
    await expect(renewer.renew()).rejects.toMatchObject({ code });
    expect(await readFile(certFile, "utf8")).toBe(original);
    expect(renewer.health()).toMatchObject({ ok: false, code });
  });

  it("accepts a good one (control)", async () => {
    const renewer = new CertificateRenewer(
      { deviceId: "dev-1", certFile, caPem: ca.certificatePem, retry: once },
      { keys, est: stub(() => issue(ca, keys, "dev-1", 3600)), clock },
    );
    await renewer.renew();
    expect(await readFile(certFile, "utf8")).not.toBe(original);
    await renewer.verifyCurrent();
  });
});
