import "reflect-metadata";
import { createPublicKey, randomBytes } from "node:crypto";
import { copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { X509Certificate } from "@peculiar/x509";
import { decodeJwt } from "jose";
import { Agent, fetch } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freeLoopbackPort, type SwtpmHandle, startSwtpm } from "../../hw/swtpm.js";
import { ManualClock } from "../../src/core/clock.js";
import { EstClient } from "../../src/credentials/est/est-client.js";
import { CertificateRenewer } from "../../src/credentials/est/renewer.js";
import { TpmRotationClient } from "../../src/credentials/est/tpm-rotation.js";
import { OAuthClient } from "../../src/credentials/oauth/client.js";
import type { DpopSigner } from "../../src/credentials/oauth/token-source.js";
import { type EnrollConfig, runEnroll, tpmEnrollOps } from "../../src/enroll/index.js";
import { createCsr } from "../../src/keys/csr.js";
import { signCompactJws } from "../../src/keys/jws.js";
import { KEY_ROTATION_STATE_FILE } from "../../src/keys/rotation.js";
import { TpmAttestationOps } from "../../src/keys/tpm/endorsement.js";
import { tpmKeyRotation } from "../../src/keys/tpm/rotation.js";
import { TpmKeyProvider } from "../../src/keys/tpm/tpm-provider.js";
import { addEnrolmentGroup } from "../../src/registrar/admin.js";
import { APP_PATHS, type RunningRegistrarApp, startRegistrarApp } from "../../src/registrar/app.js";
import { caPaths, FleetCa, initCa } from "../../src/registrar/ca/index.js";
import { registrarConfigFrom } from "../../src/registrar/config.js";
import { SqliteRegistrarStore } from "../../src/registrar/store/index.js";
import { ROTATE_PATHS } from "../../src/wire/v1/index.js";
import { postClientAssertion } from "../kit/token-request.js";

/**
 * TPM key rotation through the registrar app on swtpm: the new key is certified by the registered AK
 * over a fresh registrar nonce, the registry switches to it atomically with the new certificate, the
 * old handle is evicted, and only the new key gets tokens. Each forgery has its own code and leaves
 * the registry untouched.
 */
describe("TPM key rotation (swtpm + registrar app)", () => {
  let tpm: SwtpmHandle;
  let dir: string;
  let clock: ManualClock;
  let store: SqliteRegistrarStore;
  let app: RunningRegistrarApp;
  let keys: TpmKeyProvider;
  let ops: TpmAttestationOps;
  let caPem: string;
  let deviceId: string;
  let oauth: OAuthClient;
  let dpop: DpopSigner;
  let dispatcher: Agent;
  let candidate: TpmKeyProvider;

  beforeAll(async () => {
    tpm = await startSwtpm();
    clock = new ManualClock(new Date(Date.now() + 1000));
    dir = await mkdtemp(join(tmpdir(), "m2m-rot-tpm-"));
    const trustDir = join(dir, "ek-trust");
    await mkdir(trustDir);
    await copyFile(tpm.rootCaPemPath, join(trustDir, "root.pem"));
    await copyFile(tpm.intermediateCaPemPath, join(trustDir, "intermediate.pem"));
    const paths = await initCa({ dir: join(dir, "ca"), clock });
    caPem = await readFile(caPaths(paths.dir).caCert, "utf8");
    const port = await freeLoopbackPort();
    const config = registrarConfigFrom(
      {
        listen: { host: "127.0.0.1", port },
        tls: { cert: paths.serverCert, key: paths.serverKey },
        data_dir: join(dir, "data"),
        ca_dir: paths.dir,
        cert_lifetime: "1h",
        rotation: { session_ttl: 60 },
      },
      dir,
      "registrar.toml",
    );
    store = new SqliteRegistrarStore(join(config.dataDir, "registrar.db"));
    app = await startRegistrarApp(config, { store, ca: await FleetCa.load(paths.dir, clock), clock });
    dispatcher = new Agent({ connect: { ca: caPem } });
    addEnrolmentGroup(
      store,
      { name: "gw", role: "gateway", attributes: {}, methods: ["tpm"], ekTrustDir: trustDir },
      clock,
    );
    keys = new TpmKeyProvider({ tcti: tpm.tcti, timeoutMs: 20_000 });
    await keys.createOrOpen();
    ops = new TpmAttestationOps(keys.runner, { akHandle: keys.akHandle });
    const enrollCfg: EnrollConfig = {
      registrarUrl: app.url,
      registrarCaFile: caPaths(paths.dir).caCert,
      method: "tpm",
      group: "gw",
      hardwareSerial: "GW-ROT",
      stateDir: join(dir, "agent-state"),
    };
    const enrolled = await runEnroll(enrollCfg, { keyProvider: keys, tpm: tpmEnrollOps(keys), clock });
    deviceId = enrolled.state.deviceId;
    await writeFile(join(dir, "device.pem"), enrolled.state.certificatePem);
    oauth = new OAuthClient({ clientId: deviceId, issuer: app.issuer, caPem, dpop: true }, { keys, clock });
    const s = await oauth.dpopSigner();
    if (s === undefined) throw new Error("no DPoP signer");
    dpop = s;
    candidate = new TpmKeyProvider({ runner: keys.runner, keyHandle: 0x81000005 });
    await candidate.createOrOpen();
  }, 60_000);

  afterAll(async () => {
    await candidate?.destroy().catch(() => undefined);
    await candidate?.close();
    await oauth?.close();
    await keys?.close();
    await dispatcher?.close();
    await app?.close();
    await store?.close();
    await tpm?.stop();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  const call = async (path: string, body: unknown, opts: { bearer?: boolean } = {}) => {
    const url = `${app.issuer}${path}`;
    const t = await oauth.getToken("est");
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (opts.bearer === true) headers.authorization = `Bearer ${t.token.reveal()}`;
    else {
      headers.authorization = `DPoP ${t.token.reveal()}`;
      headers.dpop = await dpop.proof("POST", url, t.token);
    }
    const res = await fetch(url, { method: "POST", headers, body: JSON.stringify(body), dispatcher });
    const json = (await res.json()) as Record<string, unknown> & { error?: { code: string } };
    return { status: res.status, json, code: json.error?.code };
  };
  const begin = async () => {
    const r = await call(ROTATE_PATHS.tpmBegin, { v: 1 });
    expect(r.status).toBe(200);
    return r.json as { sessionId: string; nonce: string; expiresAt: string };
  };
  const tpm2b = async (k: TpmKeyProvider): Promise<string> => {
    const ev = await k.evidence();
    if (ev.kind !== "tpm") throw new Error("not tpm");
    const t = Buffer.from(ev.tpmtPublicHex, "hex");
    return Buffer.concat([Buffer.from([t.length >> 8, t.length & 0xff]), t]).toString("base64url");
  };
  /** A valid finish body for `candidate` in session `s`, with overrides. */
  const finishBody = async (
    s: { sessionId: string; nonce: string },
    o: { nonce?: Buffer; signer?: number; certified?: number; csrKey?: TpmKeyProvider } = {},
  ) => {
    const c = await ops.certify(
      o.certified ?? candidate.keyHandle,
      o.signer ?? keys.akHandle,
      o.nonce ?? Buffer.from(s.nonce, "base64url"),
    );
    const csrKey = o.csrKey ?? candidate;
    const csr = await createCsr(csrKey, await csrKey.open(), { commonName: deviceId });
    return {
      v: 1,
      sessionId: s.sessionId,
      attest: Buffer.from(c.attest).toString("base64url"),
      signature: Buffer.from(c.signature).toString("base64url"),
      devicePublic: await tpm2b(candidate),
      csr: Buffer.from(csr).toString("base64url"),
    };
  };

  it("refuses each forgery with its own code and leaves the registry unchanged", async () => {
    const before = await store.getDevice(deviceId);
    expect(before?.evidence?.akPublic).toEqual(expect.any(String));
    const cases: [string, () => Promise<{ code: string | undefined }>, string][] = [
      [
        "bearer token (no proof of the current key)",
        async () => call(ROTATE_PATHS.tpmFinish, await finishBody(await begin()), { bearer: true }),
        "ERR_ROTATION_AUTH_REQUIRED",
      ],
      [
        "new key not certified (the AK certified the current key)",
        async () =>
          call(ROTATE_PATHS.tpmFinish, await finishBody(await begin(), { certified: keys.keyHandle })),
        "ERR_ATTEST_NAME_MISMATCH",
      ],
      [
        "certified by another AK (same TPM, same EK, not the registered one)",
        async () => {
          const otherAk = new TpmAttestationOps(keys.runner, { akHandle: 0x81000006 });
          await otherAk.createAk();
          return call(ROTATE_PATHS.tpmFinish, await finishBody(await begin(), { signer: 0x81000006 }));
        },
        "ERR_ATTEST_SIGNATURE",
      ],
      [
        "wrong nonce",
        async () => call(ROTATE_PATHS.tpmFinish, await finishBody(await begin(), { nonce: randomBytes(32) })),
        "ERR_ATTEST_NONCE",
      ],
      [
        "CSR key is not the certified key",
        async () => call(ROTATE_PATHS.tpmFinish, await finishBody(await begin(), { csrKey: keys })),
        "ERR_ROTATION_CSR_KEY_MISMATCH",
      ],
      [
        "replayed session",
        async () => {
          const s = await begin();
          const spoiled = await finishBody(s, { nonce: randomBytes(32) });
          expect((await call(ROTATE_PATHS.tpmFinish, spoiled)).code).toBe("ERR_ATTEST_NONCE");
          return call(ROTATE_PATHS.tpmFinish, await finishBody(s));
        },
        "ERR_SESSION_CONSUMED",
      ],
      [
        "expired session",
        async () => {
          const s = await begin();
          const body = await finishBody(s);
          await clock.advance(61_000);
          return call(ROTATE_PATHS.tpmFinish, body);
        },
        "ERR_SESSION_EXPIRED",
      ],
      [
        "unknown session",
        async () =>
          call(ROTATE_PATHS.tpmFinish, await finishBody({ sessionId: "0".repeat(32), nonce: "AA" })),
        "ERR_SESSION_UNKNOWN",
      ],
    ];
    const seen = new Set<string>();
    for (const [name, run, code] of cases) {
      const r = await run();
      expect(r.code, name).toBe(code);
      seen.add(code);
      const now = await store.getDevice(deviceId);
      expect(now?.thumbprint, name).toBe(before?.thumbprint);
      expect(now?.certSerial, name).toBe(before?.certSerial);
    }
    expect(seen.size).toBe(cases.length);
  }, 60_000);

  const assertionBy = (k: TpmKeyProvider, info: Awaited<ReturnType<TpmKeyProvider["open"]>>, iat: number) =>
    signCompactJws(
      k,
      info,
      { typ: "JWT" },
      {
        iss: deviceId,
        sub: deviceId,
        aud: `${app.issuer}${APP_PATHS.token}`,
        jti: randomBytes(12).toString("hex"),
        iat,
        exp: iat + 300,
      },
    );
  const postAssertion = (assertion: string) =>
    postClientAssertion(`${app.issuer}${APP_PATHS.token}`, deviceId, assertion, dispatcher);

  it("rotates end to end: new handle, new cert, registry updated, old handle evicted, old key refused", async () => {
    const certFile = join(dir, "device.pem");
    const oldInfo = await keys.open();
    // An assertion signed by the old key before the rotation, replayed afterwards.
    const now = Math.floor(clock.now().getTime() / 1000);
    const oldAssertion = await assertionBy(keys, oldInfo, now);
    // Control: the same kind of assertion is accepted while the old key is the registered one.
    const control = await postAssertion(await assertionBy(keys, oldInfo, now));
    expect(control.status).toBe(200);
    const rotationClient = new TpmRotationClient({ baseUrl: app.issuer, caPem }, { tokens: oauth, dpop });
    const est = new EstClient({ baseUrl: app.issuer, caPem }, { kind: "token", tokens: oauth, dpop }, clock);
    const renewer = new CertificateRenewer(
      { deviceId, certFile, caPem, rotateKey: true, jitterFraction: 0 },
      {
        keys,
        est,
        clock,
        rotation: tpmKeyRotation(keys, join(dir, KEY_ROTATION_STATE_FILE)),
        issueWithNewKey: (next, csr) => rotationClient.issue(next, csr),
      },
    );
    await renewer.renew();
    const next = renewer.keys;
    expect(next).toBeInstanceOf(TpmKeyProvider);
    expect((next as TpmKeyProvider).keyHandle).toBe(0x81000004);
    const newInfo = await next.open();
    expect(newInfo.thumbprint).not.toBe(oldInfo.thumbprint);
    // The certificate on disk carries the new TPM key and chains to the fleet CA.
    await renewer.verifyCurrent();
    const cert = new X509Certificate(await readFile(certFile, "utf8"));
    expect(Buffer.from(cert.publicKey.rawData)).toEqual(
      createPublicKey(newInfo.spkiPem).export({ format: "der", type: "spki" }),
    );
    // Registry: new key and the new certificate, AK/EK kept for the next rotation.
    const d = await store.getDevice(deviceId);
    expect(d?.thumbprint).toBe(newInfo.thumbprint);
    expect(d?.certSerial.toLowerCase()).toBe(cert.serialNumber.toLowerCase());
    expect(d?.evidence?.devicePublic).toBe(await tpm2b(next as TpmKeyProvider));
    expect(d?.evidence?.akPublic).toEqual(expect.any(String));
    expect(JSON.parse(await readFile(join(dir, KEY_ROTATION_STATE_FILE), "utf8"))).toEqual({
      v: 1,
      current: "0x81000004",
    });
    // The old handle is evicted.
    const old = new TpmKeyProvider({ runner: keys.runner, keyHandle: 0x81000002 });
    await expect(old.open()).rejects.toMatchObject({ code: "ERR_KEY_NOT_FOUND" });
    // Tokens with the new key; the old key's assertion is refused.
    const fresh = new OAuthClient(
      { clientId: deviceId, issuer: app.issuer, caPem, dpop: true },
      { keys: next, clock },
    );
    const t = await fresh.getToken();
    expect(decodeJwt(t.token.reveal())).toMatchObject({ sub: deviceId, cnf: { jkt: newInfo.thumbprint } });
    await fresh.close();
    const refused = await postAssertion(oldAssertion);
    expect(refused.status).toBe(401);
    expect(refused.json.error).toBe("invalid_client");
  }, 60_000);
});
