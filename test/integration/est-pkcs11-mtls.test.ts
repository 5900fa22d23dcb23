import "reflect-metadata";
import { createPublicKey } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { X509Certificate } from "@peculiar/x509";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { systemClock } from "../../src/core/clock.js";
import type { EstClient } from "../../src/credentials/est/est-client.js";
import { CertificateRenewer } from "../../src/credentials/est/renewer.js";
import { createCsr } from "../../src/keys/csr.js";
import type { KeyInfo, KeyProvider } from "../../src/keys/key-provider.js";
import { Pkcs11KeyProvider } from "../../src/keys/pkcs11/index.js";
import { AlternatingKeyRotation } from "../../src/keys/rotation.js";
import { caPaths, FleetCa, initCa, verifyCsr } from "../../src/registrar/ca/fleet-ca.js";
import { type EstDeps, estRoutes } from "../../src/registrar/est/est-service.js";
import { InMemoryDeviceDirectory } from "../../src/registrar/oauth/directory.js";
import { engineMtlsEstClient } from "../kit/engine-est-client.js";
import { mountRoutes, startHttps } from "./oauth-fixtures.js";

/**
 * EST re-enrolment authenticated by TLS client auth whose private key never leaves the token:
 * SoftHSM key → OpenSSL pkcs11 engine → Node TLS; the CSR is signed by the same key via pkcs11js.
 */
// One SoftHSM for the file: the module reads SOFTHSM2_CONF once per process (first C_Initialize).
let hsm: SoftHsmHandle;
beforeAll(async () => {
  hsm = await initSoftHsm({ label: "m2m-est" });
  process.env.SOFTHSM2_CONF = hsm.env.SOFTHSM2_CONF;
});
afterAll(async () => {
  await hsm?.cleanup();
});

/** The SoftHSM key labelled `keyLabel`. */
function tokenKey(keyLabel: string): Pkcs11KeyProvider {
  return new Pkcs11KeyProvider({
    modulePath: hsm.modulePath,
    tokenLabel: hsm.tokenLabel,
    keyLabel,
    pin: { file: hsm.pinFile },
  });
}

/** A fleet CA in a fresh temp dir and its EST routes on HTTPS, asking for client certificates. */
async function startEstServer(
  prefix: string,
  directory: InMemoryDeviceDirectory,
  extra: Partial<Pick<EstDeps, "allowKeyRotation" | "onKeyRotated">> = {},
): Promise<{ dir: string; ca: FleetCa; origin: string; close(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  await initCa({ dir: join(dir, "ca") });
  const ca = await FleetCa.load(join(dir, "ca"));
  const paths = caPaths(join(dir, "ca"));
  const srv = await startHttps(
    {
      serverCertPem: await readFile(paths.serverCert, "utf8"),
      serverKeyPem: await readFile(paths.serverKey, "utf8"),
      caPem: ca.certificatePem,
    },
    mountRoutes(
      estRoutes({
        directory,
        ca,
        clock: systemClock,
        certLifetimeSeconds: 3600,
        publicUrl: "https://unused",
        ...extra,
      }),
    ),
    { requestCert: true, ca: ca.chainPem() },
  );
  return { dir, ca, origin: srv.origin, close: srv.close };
}

/** Registers the device with the token key and writes a first certificate for it to `certFile`. */
async function enrolDevice(
  o: { directory: InMemoryDeviceDirectory; ca: FleetCa; certFile: string },
  deviceId: string,
  keys: KeyProvider,
  info: KeyInfo,
): Promise<string> {
  o.directory.put({
    deviceId,
    status: "active",
    role: "gw",
    attributes: {},
    publicJwk: info.publicJwk,
    group: "g",
  });
  const v = await verifyCsr(await createCsr(keys, info, { commonName: deviceId }));
  const { pem } = await o.ca.issueDeviceCertificate(v, {
    deviceId,
    expectedSpkiDer: v.spkiDer,
    lifetimeSeconds: 3600,
  });
  await writeFile(o.certFile, pem);
  return pem;
}

/** An EST client authenticated over mTLS by the certificate in `certFile` and the token key `keyLabel()`. */
function mtlsEstClient(
  origin: string,
  ca: FleetCa,
  certFile: string,
  keyLabel: () => string | Promise<string>,
): EstClient {
  return engineMtlsEstClient({ baseUrl: origin, caPem: ca.certificatePem, hsm, certFile, keyLabel });
}

describe("EST simplereenroll over mTLS with a PKCS#11 (SoftHSM) key", () => {
  let dir: string;
  let close: () => Promise<void>;
  let origin: string;
  let ca: FleetCa;
  let keys: Pkcs11KeyProvider;
  const directory = new InMemoryDeviceDirectory();

  beforeAll(async () => {
    ({ dir, ca, origin, close } = await startEstServer("m2m-est-p11-", directory));
    keys = tokenKey("m2m-device");
  });
  afterAll(async () => {
    await keys?.close();
    await close?.();
    await rm(dir, { recursive: true, force: true });
  });

  it("renews the certificate; the new one carries the token key and chains to the fleet CA", async () => {
    const info = await keys.createOrOpen();
    const certFile = join(dir, "device.pem");
    const firstPem = await enrolDevice({ directory, ca, certFile }, "p11-1", keys, info);
    // No rotation here: the one token key authenticates every renewal.
    const est = mtlsEstClient(origin, ca, certFile, () => "m2m-device");
    const renewer = new CertificateRenewer(
      { deviceId: "p11-1", certFile, caPem: ca.certificatePem },
      { keys, est, clock: systemClock },
    );
    await renewer.renew();
    await renewer.renew(); // the renewed certificate authenticates the next renewal
    const now = new X509Certificate(await readFile(certFile, "utf8"));
    expect(now.serialNumber).not.toBe(new X509Certificate(firstPem).serialNumber);
    expect(createPublicKey(now.publicKey.toString("pem")).export({ format: "der", type: "spki" })).toEqual(
      createPublicKey(info.spkiPem).export({ format: "der", type: "spki" }),
    );
    await renewer.verifyCurrent();
  });
});

describe("EST key rotation for a PKCS#11 device, re-authenticated by its CURRENT certificate (mTLS)", () => {
  let dir: string;
  let close: () => Promise<void>;
  let origin: string;
  let ca: FleetCa;
  const directory = new InMemoryDeviceDirectory();
  const rotatedTo: string[] = [];

  beforeAll(async () => {
    ({ dir, ca, origin, close } = await startEstServer("m2m-est-rot-", directory, {
      allowKeyRotation: () => true,
      onKeyRotated: async (deviceId, publicJwk) => {
        const d = directory.getDevice(deviceId);
        if (d !== undefined) directory.put({ ...d, publicJwk });
        rotatedTo.push(String(publicJwk.x));
      },
    }));
  });
  afterAll(async () => {
    await close?.();
    await rm(dir, { recursive: true, force: true });
  });

  it("rotates twice: new token key certified, registry updated, old key destroyed after the cert is in place", async () => {
    const make = tokenKey;
    const rotation = new AlternatingKeyRotation({
      names: ["m2m-rot-a", "m2m-rot-b"],
      stateFile: join(dir, "rotation.json"),
      make,
    });
    const keys = await rotation.current();
    const info = await keys.createOrOpen();
    const certFile = join(dir, "device.pem");
    await enrolDevice({ directory, ca, certFile }, "rot-1", keys, info);
    // The CURRENT key authenticates: its label comes from the rotation state.
    const est = mtlsEstClient(origin, ca, certFile, () => rotation.currentName());
    const renewer = new CertificateRenewer(
      { deviceId: "rot-1", certFile, caPem: ca.certificatePem, rotateKey: true },
      { keys, est, clock: systemClock, rotation },
    );
    await renewer.renew();
    expect(await rotation.currentName()).toBe("m2m-rot-b");
    const b = await renewer.keys.open();
    expect(b.thumbprint).not.toBe(info.thumbprint);
    await expect(make("m2m-rot-a").open()).rejects.toMatchObject({ code: "ERR_KEY_NOT_FOUND" });
    await renewer.verifyCurrent();
    expect(directory.getDevice("rot-1")?.publicJwk.x).toBe(b.publicJwk.x);

    // Second rotation: authenticated by the rotated certificate and key (label b), back to a fresh "a".
    await renewer.renew();
    expect(await rotation.currentName()).toBe("m2m-rot-a");
    const a2 = await renewer.keys.open();
    expect(a2.thumbprint).not.toBe(info.thumbprint);
    await expect(make("m2m-rot-b").open()).rejects.toMatchObject({ code: "ERR_KEY_NOT_FOUND" });
    await renewer.verifyCurrent();
    expect(rotatedTo).toHaveLength(2);
  });
});
