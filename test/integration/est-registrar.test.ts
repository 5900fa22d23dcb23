import "reflect-metadata";
import { createPublicKey } from "node:crypto";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as x509 from "@peculiar/x509";
import { execa } from "execa";
import type { JWK } from "jose";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { EstClient } from "../../src/credentials/est/est-client.js";
import { CertificateRenewer, type KeyRotation } from "../../src/credentials/est/renewer.js";
import { OAuthClient } from "../../src/credentials/oauth/client.js";
import { createCsr } from "../../src/keys/csr.js";
import { FakeKeyProvider, FakeKeyStore } from "../../src/keys/fake/fake-provider.js";
import type { KeyProvider } from "../../src/keys/key-provider.js";
import { caPaths, FleetCa, initCa, verifyCsr } from "../../src/registrar/ca/fleet-ca.js";
import { estRoutes } from "../../src/registrar/est/est-service.js";
import { InMemoryDeviceDirectory } from "../../src/registrar/oauth/directory.js";
import { loadOrCreateSigningKey } from "../../src/registrar/oauth/signing-key.js";
import { oauthRoutes, TokenService } from "../../src/registrar/oauth/token-service.js";
import { makeTestPki, mountRoutes, startHttps } from "./oauth-fixtures.js";

const openssl = (args: string[], opts: { cwd: string; input?: string | Buffer }) =>
  execa("openssl", args, {
    cwd: opts.cwd,
    timeout: 20_000,
    ...(opts.input === undefined ? { stdin: "ignore" } : { input: opts.input }),
  });
const curl = (args: string[], cwd: string) =>
  execa("curl", ["-sS", "--max-time", "20", ...args], {
    cwd,
    timeout: 30_000,
    stdin: "ignore",
    reject: false,
  });

describe("EST (RFC 7030) on the registrar, with curl/openssl and the agent's CertificateRenewer", () => {
  let dir: string;
  let clock: ManualClock;
  let ca: FleetCa;
  let caPem: string;
  let directory: InMemoryDeviceDirectory;
  let origin: string;
  let close: () => Promise<void>;
  let tokenService: TokenService;
  const rotated: string[] = [];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-est-"));
    clock = new ManualClock(new Date());
    await initCa({ dir: join(dir, "ca"), clock });
    ca = await FleetCa.load(join(dir, "ca"), clock);
    caPem = ca.certificatePem;
    const paths = caPaths(join(dir, "ca"));
    directory = new InMemoryDeviceDirectory();
    let base = "";
    tokenService = undefined as unknown as TokenService;
    const handler: { h?: ReturnType<typeof mountRoutes> } = {};
    const srv = await startHttps(
      {
        serverCertPem: await readFile(paths.serverCert, "utf8"),
        serverKeyPem: await readFile(paths.serverKey, "utf8"),
        caPem,
      },
      (req, res) => handler.h?.(req, res),
      { requestCert: true, ca: ca.chainPem() },
    );
    origin = srv.origin;
    base = origin;
    close = srv.close;
    tokenService = new TokenService(
      {
        issuer: origin,
        audiences: [origin],
        scopes: { roles: { gw: ["est", "telemetry:write"], nocert: ["telemetry:write"] } },
      },
      { directory, signingKey: await loadOrCreateSigningKey(join(dir, "data")), clock },
    );
    handler.h = mountRoutes([
      ...oauthRoutes({ tokenService }),
      ...estRoutes({
        directory,
        ca,
        clock,
        certLifetimeSeconds: 3600,
        publicUrl: () => base,
        accessTokens: tokenService,
        tokenAudience: origin,
        allowKeyRotation: (d) => d.attributes.rotation === "yes",
        onKeyRotated: async (deviceId, publicJwk) => {
          const d = directory.getDevice(deviceId);
          if (d !== undefined) directory.put({ ...d, publicJwk });
          rotated.push(deviceId);
        },
      }),
    ]);
  });
  afterAll(async () => {
    await close?.();
    await rm(dir, { recursive: true, force: true });
  });

  async function softwareDevice(id: string): Promise<string> {
    const d = join(dir, id);
    await execa("mkdir", ["-p", d]);
    await openssl(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "dev.key"], { cwd: d });
    await openssl(
      ["req", "-new", "-key", "dev.key", "-subj", `/CN=${id}`, "-outform", "DER", "-out", "dev.csr"],
      { cwd: d },
    );
    const csrDer = await readFile(join(d, "dev.csr"));
    const verified = await verifyCsr(csrDer);
    const jwk = createPublicKey({ key: verified.spkiDer, format: "der", type: "spki" }).export({
      format: "jwk",
    }) as JWK;
    directory.put({ deviceId: id, status: "active", role: "gw", attributes: {}, publicJwk: jwk, group: "g" });
    const cert = await ca.issueDeviceCertificate(verified, {
      deviceId: id,
      expectedSpkiDer: verified.spkiDer,
      lifetimeSeconds: 3600,
    });
    await writeFile(join(d, "dev.pem"), cert.pem);
    await writeFile(join(d, "ca.pem"), caPem);
    await writeFile(join(d, "csr.b64"), csrDer.toString("base64"));
    return d;
  }

  it("cacerts: curl fetches a base64 certs-only PKCS#7 that openssl pkcs7 -print_certs reads", async () => {
    const d = await softwareDevice("sw-cacerts");
    const r = await curl(
      ["--cacert", "ca.pem", "-D", "headers.txt", "-o", "cacerts.b64", `${origin}/.well-known/est/cacerts`],
      d,
    );
    expect(r.exitCode).toBe(0);
    expect((await readFile(join(d, "headers.txt"), "utf8")).toLowerCase()).toContain(
      "content-type: application/pkcs7-mime",
    );
    await openssl(["base64", "-d", "-in", "cacerts.b64", "-out", "cacerts.p7"], { cwd: d });
    const { stdout } = await openssl(["pkcs7", "-inform", "DER", "-in", "cacerts.p7", "-print_certs"], {
      cwd: d,
    });
    expect(stdout).toContain("BEGIN CERTIFICATE");
    expect(new x509.X509Certificate(stdout.slice(stdout.indexOf("-----BEGIN"))).subject).toBe(
      new x509.X509Certificate(caPem).subject,
    );
  });

  it("simplereenroll with curl --cert/--key (mTLS) and an openssl CSR; openssl verifies the new cert", async () => {
    const d = await softwareDevice("sw-1");
    const r = await curl(
      [
        "--cacert",
        "ca.pem",
        "--cert",
        "dev.pem",
        "--key",
        "dev.key",
        "-H",
        "Content-Type: application/pkcs10",
        "--data-binary",
        "@csr.b64",
        "-o",
        "new.b64",
        "-w",
        "%{http_code}",
        `${origin}/.well-known/est/simplereenroll`,
      ],
      d,
    );
    expect(r.stdout).toBe("200");
    await openssl(["base64", "-d", "-in", "new.b64", "-out", "new.p7"], { cwd: d });
    const { stdout } = await openssl(
      ["pkcs7", "-inform", "DER", "-in", "new.p7", "-print_certs", "-out", "new.pem"],
      { cwd: d },
    );
    expect(stdout).toBe("");
    const v = await openssl(["verify", "-CAfile", "ca.pem", "new.pem"], { cwd: d });
    expect(v.stdout).toContain("new.pem: OK");
    const subj = await openssl(["x509", "-in", "new.pem", "-noout", "-subject"], { cwd: d });
    expect(subj.stdout).toContain("CN = sw-1");
    // Same key as the current certificate.
    const a = await openssl(["x509", "-in", "new.pem", "-noout", "-pubkey"], { cwd: d });
    const b = await openssl(["pkey", "-in", "dev.key", "-pubout"], { cwd: d });
    expect(a.stdout.trim()).toBe(b.stdout.trim());
  });

  it("refuses: no client auth (401), CSR for another name (400), another key (403), revoked (403), foreign CA cert (401)", async () => {
    const d = await softwareDevice("sw-2");
    const post = (extra: string[], file = "csr.b64") =>
      curl(
        [
          "--cacert",
          "ca.pem",
          ...extra,
          "-H",
          "Content-Type: application/pkcs10",
          "--data-binary",
          `@${file}`,
          "-o",
          "/dev/null",
          "-D",
          "-",
          `${origin}/.well-known/est/simplereenroll`,
        ],
        d,
      );
    const codeOf = (out: string) => /x-m2m-error: (\S+)/i.exec(out)?.[1];
    const mtls = ["--cert", "dev.pem", "--key", "dev.key"];

    const none = await post([]);
    expect(none.stdout).toMatch(/^HTTP\/1\.1 401/);
    expect(codeOf(none.stdout)).toBe("ERR_EST_AUTH_REQUIRED");

    await openssl(
      ["req", "-new", "-key", "dev.key", "-subj", "/CN=someone-else", "-outform", "DER", "-out", "other.csr"],
      { cwd: d },
    );
    await writeFile(join(d, "other.b64"), (await readFile(join(d, "other.csr"))).toString("base64"));
    expect(codeOf((await post(mtls, "other.b64")).stdout)).toBe("ERR_EST_CSR_SUBJECT");

    await openssl(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "k2.key"], { cwd: d });
    await openssl(
      ["req", "-new", "-key", "k2.key", "-subj", "/CN=sw-2", "-outform", "DER", "-out", "k2.csr"],
      { cwd: d },
    );
    await writeFile(join(d, "k2.b64"), (await readFile(join(d, "k2.csr"))).toString("base64"));
    const k2 = await post(mtls, "k2.b64");
    expect(k2.stdout).toMatch(/^HTTP\/1\.1 403/);
    expect(codeOf(k2.stdout)).toBe("ERR_EST_ROTATION_REFUSED");

    await writeFile(join(d, "junk.b64"), "not base64 at all!!");
    expect(codeOf((await post(mtls, "junk.b64")).stdout)).toBe("ERR_EST_BODY");

    // A client certificate from another CA (with the same subject) is not a device certificate.
    const foreign = await makeTestPki();
    try {
      await openssl(
        [
          "x509",
          "-req",
          "-in",
          "dev.csr",
          "-inform",
          "DER",
          "-CA",
          foreign.caCertFile,
          "-CAkey",
          foreign.caKeyFile,
          "-CAcreateserial",
          "-out",
          "foreign.pem",
          "-days",
          "1",
        ],
        { cwd: d },
      );
      expect(codeOf((await post(["--cert", "foreign.pem", "--key", "dev.key"])).stdout)).toBe(
        "ERR_EST_CLIENT_CERT",
      );
    } finally {
      await foreign.cleanup();
    }

    directory.revoke("sw-2");
    const rev = await post(mtls);
    expect(rev.stdout).toMatch(/^HTTP\/1\.1 403/);
    expect(codeOf(rev.stdout)).toBe("ERR_DEVICE_REVOKED");
  });

  async function hardwareDevice(id: string, attributes: Record<string, string> = {}, role = "gw") {
    const store = new FakeKeyStore();
    const keys = new FakeKeyProvider({ store, label: "gen-0" });
    const info = await keys.createOrOpen();
    directory.put({
      deviceId: id,
      status: "active",
      role,
      attributes,
      publicJwk: info.publicJwk,
      group: "g",
    });
    const verified = await verifyCsr(await createCsr(keys, info, { commonName: id }));
    const cert = await ca.issueDeviceCertificate(verified, {
      deviceId: id,
      expectedSpkiDer: verified.spkiDer,
      lifetimeSeconds: 3600,
    });
    const certFile = join(dir, `${id}.pem`);
    await writeFile(certFile, cert.pem);
    const oauth = new OAuthClient(
      { clientId: id, issuer: origin, caPem, dpop: true },
      { keys, clock, random: () => 0.5 },
    );
    const signer = await oauth.dpopSigner();
    const est = new EstClient(
      { baseUrl: origin, caPem },
      { kind: "token", tokens: oauth, ...(signer === undefined ? {} : { dpop: signer }) },
      clock,
    );
    return { store, keys, certFile, oauth, est, cert };
  }

  it("renews at 2/3 of the lifetime (manual clock) with a DPoP-bound `est` token, then not again until due", async () => {
    const dev = await hardwareDevice("hw-1");
    const renewer = new CertificateRenewer(
      { deviceId: "hw-1", certFile: dev.certFile, caPem, jitterFraction: 0 },
      { keys: dev.keys, est: dev.est, clock, random: () => 0.5 },
    );
    const st = await renewer.status();
    expect(st.renewAt.getTime() - st.notBefore.getTime()).toBe(
      Math.round((st.notAfter.getTime() - st.notBefore.getTime()) * (2 / 3)),
    );
    expect(await renewer.renewIfDue()).toBe("not-due");
    await clock.advance(st.renewAt.getTime() - clock.now().getTime() - 1000);
    expect(await renewer.renewIfDue()).toBe("not-due");
    await clock.advance(2000);
    expect(await renewer.renewIfDue()).toBe("renewed");
    const after = await renewer.status();
    expect(after.serial).not.toBe(st.serial);
    expect(after.notAfter.getTime()).toBeGreaterThan(st.notAfter.getTime());
    await renewer.verifyCurrent();
    expect(await renewer.renewIfDue()).toBe("not-due");
    expect(renewer.health()).toMatchObject({ ok: true });
    await dev.oauth.close();
  });

  it("keeps the old certificate when the process dies between temp write and rename, or the answer is unusable", async () => {
    const dev = await hardwareDevice("hw-2");
    const before = await readFile(dev.certFile, "utf8");
    const crash = new CertificateRenewer(
      {
        deviceId: "hw-2",
        certFile: dev.certFile,
        caPem,
        retry: { baseMs: 1, factor: 1, capMs: 1, deadlineMs: 1, maxAttempts: 1, maxRetryAfterMs: 1 },
      },
      {
        keys: dev.keys,
        est: dev.est,
        clock,
        writeFile: async (path) => {
          await writeFile(`${path}.tmp-crash`, "-----BEGIN CERTIFICATE-----\nMIIB"); // torn temp file
          throw new Error("simulated crash before rename");
        },
      },
    );
    await expect(crash.renew()).rejects.toBeTruthy();
    expect(await readFile(dev.certFile, "utf8")).toBe(before);
    expect(crash.health()).toMatchObject({ ok: false });
    // A CSR for another key (not the registered one) is refused by the server; nothing is written.
    const stranger = new FakeKeyProvider({ label: "stranger" });
    await stranger.createOrOpen();
    const wrongKey = new CertificateRenewer(
      {
        deviceId: "hw-2",
        certFile: dev.certFile,
        caPem,
        retry: { baseMs: 1, factor: 1, capMs: 1, deadlineMs: 1, maxAttempts: 1, maxRetryAfterMs: 1 },
      },
      { keys: stranger, est: dev.est, clock },
    );
    await expect(wrongKey.renew()).rejects.toMatchObject({ code: "ERR_EST_REFUSED" });
    expect(await readFile(dev.certFile, "utf8")).toBe(before);
    await dev.oauth.close();
  });

  it("rotates the key when policy allows: new key certified, registry updated, old key destroyed only after", async () => {
    const dev = await hardwareDevice("hw-3", { rotation: "yes" });
    const events: string[] = [];
    let gen = 0;
    const rotation: KeyRotation = {
      prepare: async () => {
        const next = new FakeKeyProvider({ store: dev.store, label: `gen-${gen + 1}` });
        await next.createOrOpen();
        events.push("prepare");
        return next;
      },
      commit: async () => {
        events.push(`commit:cert-on-disk=${(await readFile(dev.certFile, "utf8")) !== dev.cert.pem}`);
        await new FakeKeyProvider({ store: dev.store, label: `gen-${gen}` }).destroy();
        gen++;
      },
      abort: async (next: KeyProvider) => {
        events.push("abort");
        await next.destroy();
      },
    };
    const renewer = new CertificateRenewer(
      { deviceId: "hw-3", certFile: dev.certFile, caPem, rotateKey: true },
      { keys: dev.keys, est: dev.est, clock, rotation },
    );
    await renewer.renew();
    expect(events).toEqual(["prepare", "commit:cert-on-disk=true"]);
    expect(dev.store.keys.has("gen-0")).toBe(false);
    const newInfo = await renewer.keys.open();
    expect(directory.getDevice("hw-3")?.publicJwk).toMatchObject({ x: newInfo.publicJwk.x });
    expect(rotated).toContain("hw-3");
    await renewer.verifyCurrent();
    await dev.oauth.close();
  });

  it("refuses rotation when policy does not allow it (old key kept, next key aborted)", async () => {
    const dev = await hardwareDevice("hw-4");
    const events: string[] = [];
    const rotation: KeyRotation = {
      prepare: async () => {
        const next = new FakeKeyProvider({ store: dev.store, label: "next" });
        await next.createOrOpen();
        return next;
      },
      commit: async () => {
        events.push("commit");
      },
      abort: async (next) => {
        events.push("abort");
        await next.destroy();
      },
    };
    const renewer = new CertificateRenewer(
      {
        deviceId: "hw-4",
        certFile: dev.certFile,
        caPem,
        rotateKey: true,
        retry: { baseMs: 1, factor: 1, capMs: 1, deadlineMs: 1, maxAttempts: 1, maxRetryAfterMs: 1 },
      },
      { keys: dev.keys, est: dev.est, clock, rotation },
    );
    await expect(renewer.renew()).rejects.toMatchObject({
      code: "ERR_EST_REFUSED",
      details: { serverCode: "ERR_EST_ROTATION_REFUSED" },
    });
    expect(events).toEqual(["abort"]);
    expect(dev.store.keys.has("gen-0")).toBe(true);
    await dev.oauth.close();
  });

  it("a token without the `est` scope is refused", async () => {
    const dev = await hardwareDevice("hw-5", {}, "nocert");
    const renewer = new CertificateRenewer(
      {
        deviceId: "hw-5",
        certFile: dev.certFile,
        caPem,
        retry: { baseMs: 1, factor: 1, capMs: 1, deadlineMs: 1, maxAttempts: 1, maxRetryAfterMs: 1 },
      },
      { keys: dev.keys, est: dev.est, clock },
    );
    await expect(renewer.renew()).rejects.toMatchObject({ code: "ERR_OAUTH_SCOPE" });
    await dev.oauth.close();
  });

  it("an expired certificate (device offline) triggers re-attestation instead of staying dead", async () => {
    const dev = await hardwareDevice("hw-6");
    let calls = 0;
    const renewer = new CertificateRenewer(
      { deviceId: "hw-6", certFile: dev.certFile, caPem },
      {
        keys: dev.keys,
        est: dev.est,
        clock,
        reattest: async () => {
          calls++;
          // Stands in for the enrolment flow: a fresh attested certificate for the same key.
          const info = await dev.keys.open();
          const verified = await verifyCsr(await createCsr(dev.keys, info, { commonName: "hw-6" }));
          const cert = await ca.issueDeviceCertificate(verified, {
            deviceId: "hw-6",
            expectedSpkiDer: verified.spkiDer,
            lifetimeSeconds: 3600,
          });
          await writeFile(dev.certFile, cert.pem);
        },
      },
    );
    await clock.advance(2 * 3600_000);
    expect(await renewer.renewIfDue()).toBe("reattested");
    expect(calls).toBe(1);
    expect(await renewer.renewIfDue()).toBe("not-due");
    await dev.oauth.close();
  });
});
