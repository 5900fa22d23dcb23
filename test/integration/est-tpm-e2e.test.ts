import "reflect-metadata";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { X509Certificate } from "@peculiar/x509";
import { decodeJwt } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freeLoopbackPort, type SwtpmHandle, startSwtpm, writeEkTrustDir } from "../../hw/swtpm.js";
import { ManualClock } from "../../src/core/clock.js";
import { EstClient } from "../../src/credentials/est/est-client.js";
import { CertificateRenewer } from "../../src/credentials/est/renewer.js";
import { OAuthClient } from "../../src/credentials/oauth/client.js";
import { type EnrollConfig, runEnroll, tpmEnrollOps } from "../../src/enroll/index.js";
import { TpmKeyProvider } from "../../src/keys/tpm/tpm-provider.js";
import { addEnrolmentGroup } from "../../src/registrar/admin.js";
import { caPaths, FleetCa, initCa } from "../../src/registrar/ca/index.js";
import { registrarConfigFrom } from "../../src/registrar/config.js";
import { estRoutes } from "../../src/registrar/est/est-service.js";
import { loadOrCreateSigningKey } from "../../src/registrar/oauth/signing-key.js";
import { oauthRoutes, TokenService } from "../../src/registrar/oauth/token-service.js";
import { type RunningRegistrar, startRegistrar } from "../../src/registrar/server.js";
import { SqliteRegistrarStore } from "../../src/registrar/store/index.js";

/**
 * End to end on real parts: swtpm, the real registrar (SQLite registry, fleet CA, router) with the
 * token service and EST mounted as extraRoutes, the real TPM enrolment. The TPM device gets
 * least-privilege DPoP tokens signed in the TPM, renews its certificate over EST with them at 2/3 of
 * its lifetime, recovers by re-attestation after being offline past expiry, and is cut off on revocation.
 */
describe("TPM device lifecycle: enrol → tokens → EST renewal → expiry offline → re-attest → revoke", () => {
  let tpm: SwtpmHandle;
  let dir: string;
  let clock: ManualClock;
  let store: SqliteRegistrarStore;
  let running: RunningRegistrar;
  let keys: TpmKeyProvider;
  let caPem: string;
  let enrollCfg: EnrollConfig;

  beforeAll(async () => {
    tpm = await startSwtpm();
    // After swtpm_setup: the EK certificate must already be valid on the manual clock.
    clock = new ManualClock(new Date(Date.now() + 1000));
    dir = await mkdtemp(join(tmpdir(), "m2m-est-tpm-"));
    const trustDir = await writeEkTrustDir(tpm, dir);
    const paths = await initCa({ dir: join(dir, "ca"), clock });
    caPem = await readFile(caPaths(paths.dir).caCert, "utf8");
    const port = await freeLoopbackPort();
    const url = `https://127.0.0.1:${port}`;
    const config = registrarConfigFrom(
      {
        listen: { host: "127.0.0.1", port },
        tls: { cert: paths.serverCert, key: paths.serverKey },
        data_dir: join(dir, "data"),
        ca_dir: paths.dir,
        cert_lifetime: "1h",
      },
      dir,
    );
    store = new SqliteRegistrarStore(join(config.dataDir, "registrar.db"));
    const ca = await FleetCa.load(paths.dir, clock);
    const tokenService = new TokenService(
      {
        issuer: url,
        audiences: [url],
        scopes: {
          roles: { gateway: ["est", "telemetry:write"] },
          rules: [{ scope: "site:{site}:write", roles: ["gateway"] }],
        },
      },
      { directory: store, signingKey: await loadOrCreateSigningKey(config.dataDir), clock },
    );
    running = await startRegistrar(config, {
      store,
      ca,
      clock,
      extraRoutes: [
        ...oauthRoutes({ tokenService }),
        ...estRoutes({
          directory: store,
          ca,
          clock,
          certLifetimeSeconds: 3600,
          publicUrl: url,
          accessTokens: tokenService,
          tokenAudience: url,
        }),
      ],
    });
    addEnrolmentGroup(
      store,
      {
        name: "gateways",
        role: "gateway",
        attributes: { site: "plant-7" },
        methods: ["tpm"],
        ekTrustDir: trustDir,
      },
      clock,
    );
    keys = new TpmKeyProvider({ tcti: tpm.tcti, timeoutMs: 20_000 });
    await keys.createOrOpen();
    enrollCfg = {
      registrarUrl: url,
      registrarCaFile: caPaths(paths.dir).caCert,
      method: "tpm",
      group: "gateways",
      hardwareSerial: "GW-E2E",
      stateDir: join(dir, "agent-state"),
    };
  });
  afterAll(async () => {
    await keys?.close();
    await running?.close();
    await store?.close();
    await tpm?.stop();
    await rm(dir, { recursive: true, force: true });
  });

  it("runs the whole lifecycle", async () => {
    const enrolled = await runEnroll(enrollCfg, { keyProvider: keys, tpm: tpmEnrollOps(keys), clock });
    const deviceId = enrolled.state.deviceId;
    const certFile = join(dir, "device.pem");
    await writeFile(certFile, enrolled.state.certificatePem);
    const info = await keys.open();

    // Least-privilege, DPoP-bound tokens, assertion and proof signed inside the TPM.
    const oauth = new OAuthClient(
      { clientId: deviceId, issuer: running.url, caPem, dpop: true },
      { keys, clock },
    );
    const t = await oauth.getToken("telemetry:write site:plant-7:write site:plant-9:write");
    expect(t.scope).toBe("site:plant-7:write telemetry:write");
    expect(decodeJwt(t.token.reveal())).toMatchObject({ sub: deviceId, cnf: { jkt: info.thumbprint } });

    // EST renewal at 2/3 of the 1 h lifetime, authenticated by a DPoP-bound `est` token.
    const signer = await oauth.dpopSigner();
    const est = new EstClient(
      { baseUrl: running.url, caPem },
      { kind: "token", tokens: oauth, ...(signer === undefined ? {} : { dpop: signer }) },
      clock,
    );
    let reattests = 0;
    const renewer = new CertificateRenewer(
      { deviceId, certFile, caPem, jitterFraction: 0 },
      {
        keys,
        est,
        clock,
        reattest: async () => {
          reattests++;
          const again = await runEnroll(enrollCfg, {
            keyProvider: keys,
            tpm: tpmEnrollOps(keys),
            clock,
            force: true,
          });
          expect(again.state.deviceId).toBe(deviceId);
          await writeFile(certFile, again.state.certificatePem);
        },
      },
    );
    expect(await renewer.renewIfDue()).toBe("not-due");
    await clock.advance(41 * 60_000);
    expect(await renewer.renewIfDue()).toBe("renewed");
    const renewed = new X509Certificate(await readFile(certFile, "utf8"));
    expect(renewed.notAfter.getTime()).toBeGreaterThan(clock.now().getTime() + 50 * 60_000);

    // Offline for 3 hours: the certificate expired; re-attestation (EK/AK) brings the device back.
    await clock.advance(3 * 3600_000);
    expect(await renewer.renewIfDue()).toBe("reattested");
    expect(reattests).toBe(1);
    await renewer.verifyCurrent();

    // Revocation stops new tokens immediately, and with them EST.
    await store.revokeDevice(deviceId, clock.now());
    oauth.invalidate();
    await expect(oauth.getToken()).rejects.toMatchObject({ code: "ERR_OAUTH_CLIENT_REVOKED" });
    expect(oauth.health()).toMatchObject({ ok: false, code: "ERR_OAUTH_CLIENT_REVOKED" });
    await oauth.close();
  });
});
