import "reflect-metadata";
import { createPublicKey, randomBytes } from "node:crypto";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { X509Certificate } from "@peculiar/x509";
import { Agent, fetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { systemClock } from "../../src/core/clock.js";
import { CertificateRenewer } from "../../src/credentials/est/renewer.js";
import { OAuthClient } from "../../src/credentials/oauth/client.js";
import { runEnroll } from "../../src/enroll/index.js";
import { signCompactJws } from "../../src/keys/jws.js";
import type { KeyProvider } from "../../src/keys/key-provider.js";
import { finalizeModule, Pkcs11KeyProvider } from "../../src/keys/pkcs11/index.js";
import { AlternatingKeyRotation } from "../../src/keys/rotation.js";
import { addEnrolmentGroup, createBootstrapToken } from "../../src/registrar/admin.js";
import { APP_PATHS, type RunningRegistrarApp, startRegistrarApp } from "../../src/registrar/app.js";
import { caPaths, FleetCa, initCa } from "../../src/registrar/ca/index.js";
import { registrarConfigFrom } from "../../src/registrar/config.js";
import { SqliteRegistrarStore } from "../../src/registrar/store/index.js";
import { ROTATE_PATHS } from "../../src/wire/v1/index.js";
import { engineMtlsEstClient } from "../kit/engine-est-client.js";
import { postClientAssertion } from "../kit/token-request.js";

/**
 * PKCS#11 key rotation through the registrar app: EST simplereenroll over mTLS with the CURRENT key
 * in SoftHSM (engine), CSR signed by the NEW key; the registry switches key and certificate together;
 * a group whose policy denies rotation is refused with the registry and the device key untouched.
 */
describe("PKCS#11 key rotation (SoftHSM + registrar app)", () => {
  let hsm: SoftHsmHandle;
  let dir: string;
  let store: SqliteRegistrarStore;
  let app: RunningRegistrarApp;
  let caPem: string;
  let caFile: string;
  let dispatcher: Agent;

  beforeAll(async () => {
    hsm = await initSoftHsm({ label: "m2m-rot-p11" });
    process.env.SOFTHSM2_CONF = hsm.env.SOFTHSM2_CONF;
    dir = await mkdtemp(join(tmpdir(), "m2m-rot-p11-"));
    const paths = await initCa({ dir: join(dir, "ca") });
    caFile = caPaths(paths.dir).caCert;
    caPem = await readFile(caFile, "utf8");
    const config = registrarConfigFrom(
      {
        listen: { host: "127.0.0.1", port: 0 },
        tls: { cert: paths.serverCert, key: paths.serverKey },
        data_dir: join(dir, "data"),
        ca_dir: paths.dir,
        cert_lifetime: "1h",
        rotation: { pkcs11: "allow", groups: { locked: "deny" } },
      },
      dir,
      "registrar.toml",
    );
    store = new SqliteRegistrarStore(join(config.dataDir, "registrar.db"));
    app = await startRegistrarApp(config, { store, ca: await FleetCa.load(paths.dir) });
    dispatcher = new Agent({ connect: { ca: caPem } });
    for (const name of ["sensors", "locked"])
      await addEnrolmentGroup(store, { name, role: "sensor", attributes: {}, methods: ["pkcs11"] });
  }, 60_000);

  afterAll(async () => {
    await dispatcher?.close();
    await app?.close();
    await store?.close();
    if (hsm !== undefined) finalizeModule(hsm.modulePath);
    await hsm?.cleanup();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  const make = (label: string) =>
    new Pkcs11KeyProvider({
      modulePath: hsm.modulePath,
      tokenLabel: hsm.tokenLabel,
      keyLabel: label,
      pin: { file: hsm.pinFile },
    });

  /** Enrols a device whose key is the rotation's current one; returns its renewer over mTLS. */
  async function device(group: string, labels: [string, string]) {
    const rotation = new AlternatingKeyRotation({
      names: labels,
      stateFile: join(dir, `${group}.json`),
      make,
    });
    const keys = await rotation.current();
    const info = await keys.createOrOpen();
    const { token } = await createBootstrapToken(store, group, 600);
    const out = await runEnroll(
      {
        registrarUrl: app.url,
        registrarCaFile: caFile,
        method: "pkcs11",
        bootstrapToken: { env: "T" },
        stateDir: join(dir, `state-${group}`),
      },
      { keyProvider: keys, env: { T: token.reveal() } },
    );
    const certFile = join(dir, `${group}.pem`);
    await (await import("node:fs/promises")).writeFile(certFile, out.state.certificatePem);
    // The CURRENT key (label from the rotation state) authenticates the TLS handshake.
    const est = engineMtlsEstClient({
      baseUrl: app.issuer,
      caPem,
      hsm,
      certFile,
      keyLabel: () => rotation.currentName(),
    });
    const renewer = new CertificateRenewer(
      {
        deviceId: out.state.deviceId,
        certFile,
        caPem,
        rotateKey: true,
        retry: { baseMs: 1, factor: 1, capMs: 1, deadlineMs: 1000, maxAttempts: 1, maxRetryAfterMs: 1 },
      },
      { keys, est, clock: systemClock, rotation },
    );
    return { rotation, keys, info, renewer, certFile, deviceId: out.state.deviceId };
  }

  const tokenWith = async (deviceId: string, keys: KeyProvider) => {
    const now = Math.floor(Date.now() / 1000);
    const assertion = await signCompactJws(
      keys,
      await keys.open(),
      { typ: "JWT" },
      {
        iss: deviceId,
        sub: deviceId,
        aud: `${app.issuer}${APP_PATHS.token}`,
        jti: randomBytes(12).toString("hex"),
        iat: now,
        exp: now + 60,
      },
    );
    return () => postClientAssertion(`${app.issuer}${APP_PATHS.token}`, deviceId, assertion, dispatcher);
  };

  it("rotates: new token key certified, registry key + certificate switched together, old key destroyed", async () => {
    const d = await device("sensors", ["p11-a", "p11-b"]);
    const oldAssertion = await tokenWith(d.deviceId, d.keys);
    await d.renewer.renew();
    expect(await d.rotation.currentName()).toBe("p11-b");
    const next = await d.renewer.keys.open();
    expect(next.thumbprint).not.toBe(d.info.thumbprint);
    await d.renewer.verifyCurrent();
    const cert = new X509Certificate(await readFile(d.certFile, "utf8"));
    expect(Buffer.from(cert.publicKey.rawData)).toEqual(
      createPublicKey(next.spkiPem).export({ format: "der", type: "spki" }),
    );
    const rec = await store.getDevice(d.deviceId);
    expect(rec?.thumbprint).toBe(next.thumbprint);
    expect(rec?.certSerial.toLowerCase()).toBe(cert.serialNumber.toLowerCase());
    await expect(make("p11-a").open()).rejects.toMatchObject({ code: "ERR_KEY_NOT_FOUND" });
    // Tokens follow the key: the new key gets one, an assertion by the old key is refused.
    const oauth = new OAuthClient(
      { clientId: d.deviceId, issuer: app.issuer, caPem, dpop: true },
      { keys: d.renewer.keys, clock: systemClock },
    );
    await expect(oauth.getToken()).resolves.toMatchObject({ tokenType: "DPoP" });
    // PKCS#11 keys have no AK: the TPM rotation endpoint refuses them.
    const t = await oauth.getToken("est");
    const signer = await oauth.dpopSigner();
    const url = `${app.issuer}${ROTATE_PATHS.tpmBegin}`;
    const res = await fetch(url, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        authorization: `DPoP ${t.token.reveal()}`,
        dpop: (await signer?.proof("POST", url, t.token)) ?? "",
      },
      body: JSON.stringify({ v: 1 }),
      dispatcher,
    });
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("ERR_ROTATION_REFUSED");
    await oauth.close();
    const refused = await oldAssertion();
    expect(refused.status).toBe(401);
  }, 60_000);

  it("a group with rotation = deny is refused; registry, certificate and current key unchanged", async () => {
    const d = await device("locked", ["p11-c", "p11-d"]);
    const before = await store.getDevice(d.deviceId);
    const certBefore = await readFile(d.certFile, "utf8");
    await expect(d.renewer.renew()).rejects.toMatchObject({
      details: { serverCode: "ERR_EST_ROTATION_REFUSED" },
    });
    expect(await store.getDevice(d.deviceId)).toEqual(before);
    expect(await readFile(d.certFile, "utf8")).toBe(certBefore);
    expect(await d.rotation.currentName()).toBe("p11-c");
    expect(await d.rotation.hasPending()).toBe(false);
    await expect(make("p11-c").open()).resolves.toMatchObject({ thumbprint: d.info.thumbprint });
    // The refused new key does not linger in the token.
    await expect(make("p11-d").open()).rejects.toMatchObject({ code: "ERR_KEY_NOT_FOUND" });
  }, 60_000);
});
