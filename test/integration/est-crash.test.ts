import "reflect-metadata";
import { createPublicKey } from "node:crypto";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as x509 from "@peculiar/x509";
import { execa } from "execa";
import type { JWK } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { systemClock } from "../../src/core/clock.js";
import type { EstClient } from "../../src/credentials/est/est-client.js";
import { CertificateRenewer } from "../../src/credentials/est/renewer.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";
import { caPaths, FleetCa, initCa, verifyCsr } from "../../src/registrar/ca/fleet-ca.js";
import { estRoutes } from "../../src/registrar/est/est-service.js";
import { InMemoryDeviceDirectory } from "../../src/registrar/oauth/directory.js";
import { bundleForChild, mountRoutes, startHttps } from "./oauth-fixtures.js";

/**
 * kill -9 during renewal: a child renews the certificate in a loop against a real EST server and
 * is SIGKILLed at arbitrary instants; each time the certificate file must be a complete, valid
 * certificate for the device key (the old or a new one), never torn.
 */
describe("EST renewal survives SIGKILL at any instant", () => {
  let dir: string;
  let close: () => Promise<void>;
  let origin: string;
  let ca: FleetCa;
  let childJs: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-est-crash-"));
    await initCa({ dir: join(dir, "ca") });
    ca = await FleetCa.load(join(dir, "ca"));
    const paths = caPaths(join(dir, "ca"));
    const directory = new InMemoryDeviceDirectory();
    await execa("openssl", ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "dev.key"], {
      cwd: dir,
      timeout: 20_000,
    });
    await execa(
      "openssl",
      ["req", "-new", "-key", "dev.key", "-subj", "/CN=crash-1", "-outform", "DER", "-out", "dev.csr"],
      { cwd: dir, timeout: 20_000 },
    );
    const verified = await verifyCsr(await readFile(join(dir, "dev.csr")));
    const jwk = createPublicKey({ key: verified.spkiDer, format: "der", type: "spki" }).export({
      format: "jwk",
    }) as JWK;
    directory.put({
      deviceId: "crash-1",
      status: "active",
      role: "gw",
      attributes: {},
      publicJwk: jwk,
      group: "g",
    });
    const cert = await ca.issueDeviceCertificate(verified, {
      deviceId: "crash-1",
      expectedSpkiDer: verified.spkiDer,
      lifetimeSeconds: 3600,
    });
    await writeFile(join(dir, "dev.pem"), cert.pem);
    await writeFile(join(dir, "ca.pem"), ca.certificatePem);
    const routes = estRoutes({
      directory,
      ca,
      clock: systemClock,
      certLifetimeSeconds: 3600,
      publicUrl: "https://unused",
    });
    const srv = await startHttps(
      {
        serverCertPem: await readFile(paths.serverCert, "utf8"),
        serverKeyPem: await readFile(paths.serverKey, "utf8"),
        caPem: ca.certificatePem,
      },
      mountRoutes(routes),
      { requestCert: true, ca: ca.chainPem() },
    );
    origin = srv.origin;
    close = srv.close;
    childJs = await bundleForChild(
      new URL("./est-crash-child.ts", import.meta.url).pathname,
      "est-crash-child",
    );
  });
  afterAll(async () => {
    await close?.();
    await rm(dir, { recursive: true, force: true });
  });

  it("after each of 6 kills the certificate file is whole, chains to the CA and carries the device key", async () => {
    const keySpki = createPublicKey(await readFile(join(dir, "dev.key"), "utf8")).export({
      format: "der",
      type: "spki",
    });
    const caCert = new x509.X509Certificate(ca.certificatePem);
    const serials = new Set<string>();
    let renewals = 0;
    for (let round = 0; round < 6; round++) {
      const child = execa(
        process.execPath,
        [childJs, join(dir, "dev.pem"), join(dir, "dev.key"), join(dir, "ca.pem"), origin, "crash-1"],
        {
          reject: false,
          stdin: "ignore",
          timeout: 60_000,
        },
      );
      // Let it renew at least once, then kill it at an arbitrary point of a later renewal.
      await new Promise<void>((resolve) => {
        child.stdout?.on("data", (b: Buffer) => {
          if (b.toString().includes("renewed")) resolve();
        });
        void child.then(() => resolve());
      });
      await new Promise((r) => setTimeout(r, 5 + Math.floor(Math.random() * 60)));
      child.kill("SIGKILL");
      const result = await child;
      expect(result.signal ?? result.stderr).toBe("SIGKILL");
      renewals += (String(result.stdout).match(/renewed/g) ?? []).length;
      const pem = await readFile(join(dir, "dev.pem"), "utf8");
      const cert = new x509.X509Certificate(pem);
      expect(await cert.verify({ publicKey: caCert, signatureOnly: true })).toBe(true);
      expect(
        createPublicKey(cert.publicKey.toString("pem"))
          .export({ format: "der", type: "spki" })
          .equals(keySpki),
      ).toBe(true);
      expect(cert.subjectName.getField("CN")[0]).toBe("crash-1");
      serials.add(cert.serialNumber);
    }
    expect(renewals).toBeGreaterThanOrEqual(6);
    expect(serials.size).toBeGreaterThan(1);
    // A torn temp file from a kill between write and rename is swept by the next renewer start.
    await writeFile(join(dir, ".dev.pem.deadbeef0000.tmp"), "-----BEGIN CERT");
    const renewer = new CertificateRenewer(
      { deviceId: "crash-1", certFile: join(dir, "dev.pem"), caPem: ca.certificatePem },
      { keys: new FakeKeyProvider(), est: {} as EstClient, clock: systemClock },
    );
    expect(await renewer.renewIfDue()).toBe("not-due");
    expect((await readdir(dir)).filter((n) => n.endsWith(".tmp"))).toEqual([]);
  });
});
