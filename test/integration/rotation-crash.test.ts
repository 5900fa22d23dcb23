import "reflect-metadata";
import { spawn } from "node:child_process";
import { createPublicKey } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { X509Certificate } from "@peculiar/x509";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { freeLoopbackPort, type SwtpmHandle, startSwtpm, writeEkTrustDir } from "../../hw/swtpm.js";
import { ManualClock } from "../../src/core/clock.js";
import { EstClient } from "../../src/credentials/est/est-client.js";
import { CertificateRenewer } from "../../src/credentials/est/renewer.js";
import { TpmRotationClient } from "../../src/credentials/est/tpm-rotation.js";
import { OAuthClient } from "../../src/credentials/oauth/client.js";
import { runEnroll, tpmEnrollOps } from "../../src/enroll/index.js";
import type { KeyProvider } from "../../src/keys/key-provider.js";
import { type AlternatingKeyRotation, KEY_ROTATION_STATE_FILE } from "../../src/keys/rotation.js";
import { tpmKeyRotation } from "../../src/keys/tpm/rotation.js";
import { TpmKeyProvider } from "../../src/keys/tpm/tpm-provider.js";
import { addEnrolmentGroup } from "../../src/registrar/admin.js";
import { type RunningRegistrarApp, startRegistrarApp } from "../../src/registrar/app.js";
import { caPaths, FleetCa, initCa } from "../../src/registrar/ca/index.js";
import { registrarConfigFrom } from "../../src/registrar/config.js";
import { SqliteRegistrarStore } from "../../src/registrar/store/index.js";
import { bundleForChild } from "./oauth-fixtures.js";

/**
 * A TPM key rotation SIGKILLed at each step (a child process stops dead right before the registrar
 * call / the certificate write / the commit and is killed there; the next "process" is a fresh
 * renewer on the same TPM and files) always leaves a working identity: old key + old certificate,
 * or new key + new certificate, matching what the registry holds.
 */
describe("TPM key rotation: a crash between steps recovers", () => {
  let tpm: SwtpmHandle;
  let dir: string;
  let clock: ManualClock;
  let store: SqliteRegistrarStore;
  let app: RunningRegistrarApp;
  let base: TpmKeyProvider;
  let caPem: string;
  let caFile: string;
  let childJs: string;
  let deviceId: string;
  const certFile = (): string => join(dir, "device.pem");
  const stateFile = (): string => join(dir, KEY_ROTATION_STATE_FILE);

  beforeAll(async () => {
    tpm = await startSwtpm();
    clock = new ManualClock(new Date(Date.now() + 1000));
    dir = await mkdtemp(join(tmpdir(), "m2m-rot-crash-"));
    const trustDir = await writeEkTrustDir(tpm, dir);
    const paths = await initCa({ dir: join(dir, "ca"), clock });
    caFile = caPaths(paths.dir).caCert;
    caPem = await readFile(caFile, "utf8");
    childJs = await bundleForChild(
      new URL("./rotation-kill-child.ts", import.meta.url).pathname,
      "rotation-kill-child",
    );
    const config = registrarConfigFrom(
      {
        listen: { host: "127.0.0.1", port: await freeLoopbackPort() },
        tls: { cert: paths.serverCert, key: paths.serverKey },
        data_dir: join(dir, "data"),
        ca_dir: paths.dir,
        cert_lifetime: "1h",
      },
      dir,
    );
    store = new SqliteRegistrarStore(join(config.dataDir, "registrar.db"));
    app = await startRegistrarApp(config, { store, ca: await FleetCa.load(paths.dir, clock), clock });
    addEnrolmentGroup(
      store,
      { name: "gw", role: "gateway", attributes: {}, methods: ["tpm"], ekTrustDir: trustDir },
      clock,
    );
    base = new TpmKeyProvider({ tcti: tpm.tcti, timeoutMs: 20_000 });
    await base.createOrOpen();
    const enrolled = await runEnroll(
      {
        registrarUrl: app.url,
        registrarCaFile: caPaths(paths.dir).caCert,
        method: "tpm",
        group: "gw",
        hardwareSerial: "GW-CRASH",
        stateDir: join(dir, "agent-state"),
      },
      { keyProvider: base, tpm: tpmEnrollOps(base), clock },
    );
    deviceId = enrolled.state.deviceId;
    await writeFile(certFile(), enrolled.state.certificatePem);
  }, 60_000);

  afterAll(async () => {
    await base?.close();
    await app?.close();
    await store?.close();
    await tpm?.stop();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  /** Runs the rotation in a child and SIGKILLs it at `step`. */
  async function killedAt(step: "before-call" | "before-write" | "before-commit"): Promise<void> {
    // The child signs DPoP proofs with the system clock: bring the registrar's clock up to wall time
    // (on a busy machine the suite outlives the proof's iat window otherwise).
    if (clock.now().getTime() < Date.now()) clock.setWall(new Date());
    const child = spawn(
      process.execPath,
      [
        childJs,
        JSON.stringify({
          tcti: tpm.tcti,
          issuer: app.issuer,
          caFile,
          deviceId,
          certFile: certFile(),
          stateFile: stateFile(),
          step,
        }),
      ],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    let out = "";
    let err = "";
    child.stderr?.on("data", (c: Buffer) => {
      err += c.toString();
    });
    const exited = new Promise<void>((r) => child.on("exit", () => r()));
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`child never reached ${step}: ${out} ${err}`)), 30_000);
      child.stdout?.on("data", (c: Buffer) => {
        out += c.toString();
        if (out.includes(`at ${step}`)) {
          clearTimeout(t);
          resolve();
        }
      });
      child.on("exit", () => {
        clearTimeout(t);
        reject(new Error(`child exited before ${step}: ${out} ${err}`));
      });
    });
    child.kill("SIGKILL");
    await exited;
  }

  /** One "process": an OAuth client on the current key, the rotation client, a renewer. */
  async function boot(): Promise<{
    renewer: CertificateRenewer;
    rotation: AlternatingKeyRotation;
    close: () => Promise<void>;
  }> {
    const rotation = tpmKeyRotation(base, stateFile());
    const keys = await rotation.current();
    const clients: OAuthClient[] = [];
    const clientFor = async (k: KeyProvider) => {
      const c = new OAuthClient(
        { clientId: deviceId, issuer: app.issuer, caPem, dpop: true },
        { keys: k, clock },
      );
      clients.push(c);
      const dpop = await c.dpopSigner();
      if (dpop === undefined) throw new Error("no DPoP signer");
      return { c, dpop };
    };
    const cur = await clientFor(keys);
    const rotationClient = new TpmRotationClient(
      { baseUrl: app.issuer, caPem },
      { tokens: cur.c, dpop: cur.dpop },
    );
    const est = new EstClient(
      { baseUrl: app.issuer, caPem },
      { kind: "token", tokens: cur.c, dpop: cur.dpop },
      clock,
    );
    const renewer = new CertificateRenewer(
      {
        deviceId,
        certFile: certFile(),
        caPem,
        rotateKey: true,
        jitterFraction: 0,
        retry: { baseMs: 1, factor: 1, capMs: 1, deadlineMs: 1000, maxAttempts: 1, maxRetryAfterMs: 1 },
      },
      {
        keys,
        est,
        clock,
        rotation,
        issueWithNewKey: (next, csr) => rotationClient.issue(next, csr),
        issueForPendingKey: async (next, csr) => {
          const p = await clientFor(next);
          return new EstClient(
            { baseUrl: app.issuer, caPem },
            { kind: "token", tokens: p.c, dpop: p.dpop },
            clock,
          ).simplereenroll(csr);
        },
      },
    );
    return {
      renewer,
      rotation,
      close: async () => {
        for (const c of clients) await c.close();
      },
    };
  }

  /** The identity on disk works: cert ↔ current key ↔ registry, and the key gets a token. */
  async function expectWorkingIdentity(rotation: AlternatingKeyRotation): Promise<string> {
    const keys = await rotation.current();
    const info = await keys.open();
    const cert = new X509Certificate(await readFile(certFile(), "utf8"));
    expect(Buffer.from(cert.publicKey.rawData)).toEqual(
      createPublicKey(info.spkiPem).export({ format: "der", type: "spki" }),
    );
    expect((await store.getDevice(deviceId))?.thumbprint).toBe(info.thumbprint);
    const c = new OAuthClient({ clientId: deviceId, issuer: app.issuer, caPem, dpop: true }, { keys, clock });
    await expect(c.getToken()).resolves.toMatchObject({ tokenType: "DPoP" });
    await c.close();
    return info.thumbprint;
  }

  it("killed before the registrar call: old identity works; the next run rotates", async () => {
    const before = await expectWorkingIdentity(tpmKeyRotation(base, stateFile()));
    await killedAt("before-call");
    const p1 = { rotation: tpmKeyRotation(base, stateFile()) };
    expect(await p1.rotation.hasPending()).toBe(true);
    expect(await expectWorkingIdentity(p1.rotation)).toBe(before);
    const p2 = await boot();
    await p2.renewer.renew();
    await p2.close();
    expect(await p2.rotation.hasPending()).toBe(false);
    expect(await expectWorkingIdentity(p2.rotation)).not.toBe(before);
  }, 60_000);

  it("killed after the registrar switched keys, before the certificate write: recovered with the pending key", async () => {
    const before = await expectWorkingIdentity(tpmKeyRotation(base, stateFile()));
    await killedAt("before-write");
    const p1 = { rotation: tpmKeyRotation(base, stateFile()) };
    // The registrar holds the new key; the device still has the old certificate and a pending key.
    expect((await store.getDevice(deviceId))?.thumbprint).not.toBe(before);
    expect(await p1.rotation.hasPending()).toBe(true);
    const p2 = await boot();
    expect(await p2.renewer.recoverRotation()).toBe(true);
    await p2.close();
    expect(await p2.rotation.hasPending()).toBe(false);
    expect(await expectWorkingIdentity(p2.rotation)).not.toBe(before);
  }, 60_000);

  it("killed after the certificate write, before the old key is destroyed: the commit is finished", async () => {
    const before = await expectWorkingIdentity(tpmKeyRotation(base, stateFile()));
    const oldHandle = (await tpmKeyRotation(base, stateFile()).current()) as TpmKeyProvider;
    await killedAt("before-commit");
    const p1 = { rotation: tpmKeyRotation(base, stateFile()) };
    expect(await p1.rotation.hasPending()).toBe(true);
    // The old key still exists (not destroyed before the commit).
    await expect(oldHandle.open()).resolves.toMatchObject({ thumbprint: before });
    const p2 = await boot();
    expect(await p2.renewer.recoverRotation()).toBe(true);
    await p2.close();
    expect(await expectWorkingIdentity(p2.rotation)).not.toBe(before);
    await expect(
      new TpmKeyProvider({ runner: base.runner, keyHandle: oldHandle.keyHandle }).open(),
    ).rejects.toMatchObject({ code: "ERR_KEY_NOT_FOUND" });
  }, 60_000);
});
