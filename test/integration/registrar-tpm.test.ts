import { execFile } from "node:child_process";
import { createPublicKey, X509Certificate } from "node:crypto";
import { copyFile, mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type SwtpmHandle, startSwtpm, writeEkTrustDir } from "../../hw/swtpm.js";
import { ManualClock } from "../../src/core/clock.js";
import { type EnrollTpmOps, RegistrarClient, runEnroll, tpmEnrollOps } from "../../src/enroll/index.js";
import { createCsr } from "../../src/keys/csr.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";
import type { KeyProvider } from "../../src/keys/key-provider.js";
import { TpmKeyProvider } from "../../src/keys/tpm/tpm-provider.js";
import { addEnrolmentGroup } from "../../src/registrar/admin.js";
import {
  ENROLL_PATHS,
  enrolmentResultSchema,
  tpmBeginResponseSchema,
  WIRE_VERSION,
} from "../../src/wire/v1/index.js";
import { expectRefusals, startTestRegistrar, type TestRegistrar } from "./registrar-harness.js";

const run = promisify(execFile);
const b64 = (b: Uint8Array): string => Buffer.from(b).toString("base64url");

/** Runs begin + activation + certify by hand and returns a valid finish body (to tamper with). */
async function prepare(client: RegistrarClient, ops: EnrollTpmOps, signer: KeyProvider, group = "gateways") {
  const e = await ops.readEndorsement();
  const { akPublic } = await ops.ensureAk();
  const devicePublic = await ops.devicePublic();
  const begin = await client.postJson(
    ENROLL_PATHS.tpmBegin,
    {
      v: WIRE_VERSION,
      ...(e.ekCertDer === undefined ? {} : { ekCertDer: b64(e.ekCertDer) }),
      ekPublic: b64(e.ekPublic),
      akPublic: b64(akPublic),
      devicePublic: b64(devicePublic),
      hardwareSerial: "GW-1",
      requestedAttributes: {},
      group,
    },
    tpmBeginResponseSchema,
  );
  const secret = await ops.activateCredential(Buffer.from(begin.credentialBlob, "base64url"));
  const nonce = Buffer.from(begin.nonce, "base64url");
  const { attest, signature } = await ops.certify(nonce);
  const info = await signer.open();
  const csr = await createCsr(signer, info, { commonName: "x" });
  return {
    begin,
    body: {
      v: WIRE_VERSION,
      sessionId: begin.sessionId,
      secret: b64(secret.reveal()),
      attest: b64(attest),
      signature: b64(signature),
      csr: b64(csr),
    },
  };
}

describe("TPM attested enrolment end to end (swtpm + real registrar over HTTPS)", () => {
  let tpm: SwtpmHandle;
  let provider: TpmKeyProvider;
  let ops: EnrollTpmOps;
  let work: string;
  let trustDir: string;
  const registrars: TestRegistrar[] = [];

  const newRegistrar = async (
    clock?: ManualClock,
  ): Promise<{ reg: TestRegistrar; client: RegistrarClient }> => {
    const reg = await startTestRegistrar(clock === undefined ? {} : { clock });
    registrars.push(reg);
    await addEnrolmentGroup(reg.store, {
      name: "gateways",
      role: "gateway",
      attributes: { fleet: "eu" },
      methods: ["tpm"],
      ekTrustDir: trustDir,
    });
    const client = await RegistrarClient.create({ baseUrl: reg.url, caFile: reg.caFile });
    return { reg, client };
  };

  beforeAll(async () => {
    tpm = await startSwtpm();
    work = await mkdtemp(join(tmpdir(), "m2m-enroll-tpm-"));
    trustDir = await writeEkTrustDir(tpm, work);
    provider = new TpmKeyProvider({ tcti: tpm.tcti });
    await provider.createOrOpen();
    ops = tpmEnrollOps(provider);
  });

  afterAll(async () => {
    for (const r of registrars) await r.close();
    await provider?.close();
    await tpm?.stop();
    if (work !== undefined) await rm(work, { recursive: true, force: true });
  });

  it("tamper table at the HTTP level: each change fails with its own code and nothing is persisted", async () => {
    const { reg, client } = await newRegistrar();
    const { body } = await prepare(client, ops, provider);
    const flip = (s: string, at = 10): string => {
      const b = Buffer.from(s, "base64url");
      b[at % b.length] = (b[at % b.length] ?? 0) ^ 0x01;
      return b64(b);
    };
    const other = new FakeKeyProvider();
    await other.createOrOpen();
    const otherCsr = b64(await createCsr(other, await other.open(), { commonName: "x" }));
    const cases: [string, Record<string, unknown>, string][] = [
      ["wrong secret", { ...body, secret: flip(body.secret) }, "ERR_CREDENTIAL_SECRET_MISMATCH"],
      ["short secret", { ...body, secret: b64(Buffer.from("abc")) }, "ERR_CREDENTIAL_SECRET_MISMATCH"],
      ["attest byte flipped (signature)", { ...body, attest: flip(body.attest, 40) }, "ERR_ATTEST_SIGNATURE"],
      ["signature flipped", { ...body, signature: flip(body.signature, 20) }, "ERR_ATTEST_SIGNATURE"],
      ["CSR for another key", { ...body, csr: otherCsr }, "ERR_CSR_KEY_MISMATCH"],
      ["CSR garbage", { ...body, csr: b64(Buffer.from("not a csr")) }, "ERR_CSR_INVALID"],
      ["unknown session", { ...body, sessionId: "0".repeat(32) }, "ERR_SESSION_UNKNOWN"],
      ["extra field", { ...body, admin: true }, "ERR_SCHEMA"],
    ];
    await expectRefusals(reg, ENROLL_PATHS.tpmFinish, cases, async (res) => {
      // Error bodies carry no values from the request or the session.
      expect(JSON.stringify(res.json)).not.toContain(body.secret);
      expect(await reg.store.listDevices()).toEqual([]);
    });
    // Wrong nonce: a certification made with another nonce (real TPM) is refused with its own code.
    const { body: body2, begin: begin2 } = await prepare(client, ops, provider);
    const stale = await ops.certify(Buffer.alloc(32, 7));
    const res = await reg.post(
      ENROLL_PATHS.tpmFinish,
      JSON.stringify({ ...body2, attest: b64(stale.attest), signature: b64(stale.signature) }),
    );
    expect(res.json).toMatchObject({ error: { code: "ERR_ATTEST_NONCE" } });
    // A certification from the first session replayed into the second is refused too.
    const replay = await reg.post(
      ENROLL_PATHS.tpmFinish,
      JSON.stringify({ ...body2, attest: body.attest, signature: body.signature }),
    );
    expect(replay.json).toMatchObject({ error: { code: "ERR_ATTEST_NONCE" } });
    expect(await reg.store.listDevices()).toEqual([]);
    // Nothing was persisted by the refusals: the untampered evidence still enrols on its session.
    const ok = await client.postJson(ENROLL_PATHS.tpmFinish, body, enrolmentResultSchema);
    expect(ok.method).toBe("tpm");
    expect(await reg.store.listDevices()).toHaveLength(1);
    // Replaying the successful finish is refused: sessions are single-use.
    const again = await reg.post(ENROLL_PATHS.tpmFinish, JSON.stringify(body));
    expect(again).toMatchObject({ status: 409, json: { error: { code: "ERR_SESSION_CONSUMED" } } });
    expect(begin2.sessionId).not.toBe(body.sessionId);
    const audit = await reg.store.listAudit(100);
    expect(audit.filter((a) => a.event === "enroll.tpm.finish" && a.outcome === "failure").length).toBe(
      cases.length + 3,
    );
  });

  it("failed activations: the device's 3rd wrong secret discards the session; attempts without the AK's signature are not counted", async () => {
    const { reg, client } = await newRegistrar();
    const { body } = await prepare(client, ops, provider);
    const flip = (s: string, at: number): string => {
      const b = Buffer.from(s, "base64url");
      b[at % b.length] = (b[at % b.length] ?? 0) ^ 0x01;
      return b64(b);
    };
    const wrongSecret = flip(body.secret, 3);
    // Someone who knows the session id but is not the device: no valid AK signature over the nonce.
    for (let i = 0; i < 5; i++) {
      const res = await reg.post(
        ENROLL_PATHS.tpmFinish,
        JSON.stringify({ ...body, secret: wrongSecret, signature: flip(body.signature, 20 + i) }),
      );
      expect(res.json).toMatchObject({ error: { code: "ERR_CREDENTIAL_SECRET_MISMATCH" } });
    }
    expect((await reg.store.getSession(body.sessionId))?.failedAttempts).toBe(0);
    // The device itself (its AK signed the certification) with a wrong secret: counted.
    for (let i = 1; i <= 2; i++) {
      const res = await reg.post(ENROLL_PATHS.tpmFinish, JSON.stringify({ ...body, secret: wrongSecret }));
      expect(res.json).toMatchObject({ error: { code: "ERR_CREDENTIAL_SECRET_MISMATCH" } });
      expect((await reg.store.getSession(body.sessionId))?.failedAttempts).toBe(i);
    }
    const third = await reg.post(ENROLL_PATHS.tpmFinish, JSON.stringify({ ...body, secret: wrongSecret }));
    expect(third).toMatchObject({ status: 410, json: { error: { code: "ERR_SESSION_DISCARDED" } } });
    // Discarded: even the right evidence no longer enrols on it; a new begin does.
    const late = await reg.post(ENROLL_PATHS.tpmFinish, JSON.stringify(body));
    expect(late.json).toMatchObject({ error: { code: "ERR_SESSION_CONSUMED" } });
    expect(await reg.store.listDevices()).toEqual([]);
    const fresh = await prepare(client, ops, provider);
    const ok = await client.postJson(ENROLL_PATHS.tpmFinish, fresh.body, enrolmentResultSchema);
    expect(ok.method).toBe("tpm");
  });

  it("begin tamper table: each unfit EK / AK / device key / group fails with its own code; nothing stored", async () => {
    const { reg } = await newRegistrar();
    await addEnrolmentGroup(reg.store, { name: "p11", role: "x", methods: ["pkcs11"] });
    const otherTrust = join(work, "other-trust");
    await mkdir(otherTrust, { recursive: true });
    const { initCa } = await import("../../src/registrar/ca/index.js");
    const otherCa = await initCa({ dir: join(work, "other-ca") });
    await copyFile(otherCa.caCert, join(otherTrust, "ca.pem"));
    await addEnrolmentGroup(reg.store, {
      name: "wrong-trust",
      role: "x",
      methods: ["tpm"],
      ekTrustDir: otherTrust,
    });
    await addEnrolmentGroup(reg.store, {
      name: "allow-other",
      role: "x",
      methods: ["tpm"],
      ekAllow: ["cd".repeat(32)],
    });
    const e = await ops.readEndorsement();
    const { akPublic } = await ops.ensureAk();
    const devicePublic = await ops.devicePublic();
    const { TpmAttestationOps } = await import("../../src/keys/tpm/endorsement.js");
    const p384 = (await new TpmAttestationOps(provider.runner).readEkPublics()).find(
      (k) => k.kind === "ecc-p384",
    );
    const good = {
      v: WIRE_VERSION,
      ekCertDer: b64(e.ekCertDer ?? new Uint8Array()),
      ekPublic: b64(e.ekPublic),
      akPublic: b64(akPublic),
      devicePublic: b64(devicePublic),
      hardwareSerial: "GW-1",
      group: "gateways",
    };
    const cases: [string, Record<string, unknown>, string][] = [
      ["unknown group", { ...good, group: "nope" }, "ERR_GROUP_UNKNOWN"],
      ["group without tpm", { ...good, group: "p11" }, "ERR_METHOD_NOT_PERMITTED"],
      ["EK cert garbage", { ...good, ekCertDer: b64(Buffer.from("garbage")) }, "ERR_EK_CERT_MALFORMED"],
      ["EK cert from an untrusted CA", { ...good, group: "wrong-trust" }, "ERR_EK_CERT_UNTRUSTED"],
      ["EK not on the allowlist", { ...good, group: "allow-other" }, "ERR_EK_NOT_ALLOWED"],
      ["no EK cert", { ...good, ekCertDer: undefined }, "ERR_EK_CERT_UNTRUSTED"],
      [
        "EK public of another EK",
        { ...good, ekPublic: b64(p384?.tpm2bPublic ?? new Uint8Array()) },
        "ERR_EK_PUBLIC_MISMATCH",
      ],
      [
        "AK is the device key (not restricted)",
        { ...good, akPublic: b64(devicePublic) },
        "ERR_AK_ATTRIBUTES",
      ],
      [
        "device key is the AK (restricted)",
        { ...good, devicePublic: b64(akPublic) },
        "ERR_DEVICE_KEY_ATTRIBUTES",
      ],
      ["AK truncated", { ...good, akPublic: b64(akPublic.subarray(0, 20)) }, "ERR_TPM_STRUCT_MALFORMED"],
    ];
    await expectRefusals(reg, ENROLL_PATHS.tpmBegin, cases);
    // Sanity: the untampered request is accepted by the same registrar.
    expect((await reg.post(ENROLL_PATHS.tpmBegin, JSON.stringify(good))).status).toBe(200);
    expect(await reg.store.listDevices()).toEqual([]);
    const begins = (await reg.store.listAudit(100)).filter((a) => a.event === "enroll.tpm.begin");
    expect(begins.map((a) => a.code)).toEqual([...cases.map((c) => c[2]), undefined]);
  });

  it("concurrent finishes of one session: exactly one wins", async () => {
    const { reg, client } = await newRegistrar();
    const { body } = await prepare(client, ops, provider);
    const results = await Promise.all(
      [1, 2, 3].map(() => reg.post(ENROLL_PATHS.tpmFinish, JSON.stringify(body))),
    );
    const statuses = results.map((r) => r.status).sort();
    expect(statuses).toEqual([200, 409, 409]);
    for (const r of results.filter((x) => x.status === 409)) {
      expect(r.json).toMatchObject({ error: { code: "ERR_SESSION_CONSUMED" } });
    }
    expect(await reg.store.listDevices()).toHaveLength(1);
  });

  it("an expired session is refused and nothing is registered", async () => {
    const clock = new ManualClock(new Date());
    const { reg, client } = await newRegistrar(clock);
    const { body } = await prepare(client, ops, provider);
    await clock.advance(61_000);
    const res = await reg.post(ENROLL_PATHS.tpmFinish, JSON.stringify(body));
    expect(res).toMatchObject({ status: 410, json: { error: { code: "ERR_SESSION_EXPIRED" } } });
    expect(await reg.store.listDevices()).toEqual([]);
  });

  it("runEnroll succeeds: openssl verifies the certificate and it carries the TPM key; same EK with another key is refused", async () => {
    const { reg } = await newRegistrar();
    const stateDir = join(work, "state");
    const steps: string[] = [];
    const out = await runEnroll(
      {
        registrarUrl: reg.url,
        registrarCaFile: reg.caFile,
        method: "tpm",
        group: "gateways",
        hardwareSerial: "GW-1",
        stateDir,
      },
      { keyProvider: provider, tpm: ops, onProgress: (p) => p.status === "done" && steps.push(p.step) },
    );
    expect(out.status).toBe("enrolled");
    expect(steps).toEqual([
      "check-state",
      "open-key",
      "read-endorsement",
      "prepare-ak",
      "begin",
      "activate-credential",
      "certify",
      "build-csr",
      "submit",
      "store-state",
    ]);
    expect(out.state).toMatchObject({ method: "tpm", role: "gateway", attributes: { fleet: "eu" } });
    const certFile = join(work, "tpm-device.pem");
    await writeFile(certFile, out.state.certificatePem);
    const { stdout } = await run("openssl", ["verify", "-CAfile", reg.caFile, certFile]);
    expect(stdout.trim()).toBe(`${certFile}: OK`);
    const info = await provider.open();
    expect(
      new X509Certificate(out.state.certificatePem).publicKey.export({ format: "der", type: "spki" }),
    ).toEqual(createPublicKey(info.spkiPem).export({ format: "der", type: "spki" }));
    const device = await reg.store.getDevice(out.state.deviceId);
    expect(device?.ekHash).toMatch(/^[0-9a-f]{64}$/);

    // Re-enrolment of the same hardware (same EK, same key) keeps the device id.
    const again = await runEnroll(
      {
        registrarUrl: reg.url,
        registrarCaFile: reg.caFile,
        method: "tpm",
        group: "gateways",
        hardwareSerial: "GW-1",
        stateDir,
      },
      { keyProvider: provider, tpm: ops, force: true },
    );
    expect(again.state.deviceId).toBe(out.state.deviceId);

    // A second key in the same TPM (same EK) cannot take over or add an identity for that EK.
    const second = new TpmKeyProvider({ runner: provider.runner, keyHandle: 0x81000004 });
    await second.createOrOpen();
    try {
      await expect(
        runEnroll(
          {
            registrarUrl: reg.url,
            registrarCaFile: reg.caFile,
            method: "tpm",
            group: "gateways",
            hardwareSerial: "GW-1",
            stateDir: join(work, "state2"),
          },
          { keyProvider: second, tpm: tpmEnrollOps(second) },
        ),
      ).rejects.toMatchObject({ code: "ERR_EK_ALREADY_REGISTERED" });
    } finally {
      await second.destroy();
    }
    expect(await reg.store.listDevices()).toHaveLength(1);
    expect((await reg.store.getDevice(out.state.deviceId))?.thumbprint).toBe(info.thumbprint);
  });

  it("an RSA-2048 device key in the TPM enrols too (RS256 CSR signed inside the TPM)", async () => {
    const { reg } = await newRegistrar();
    const rsaKey = new TpmKeyProvider({
      runner: provider.runner,
      keyHandle: 0x81000005,
      algorithm: "rsa-2048",
    });
    await rsaKey.createOrOpen();
    try {
      const out = await runEnroll(
        {
          registrarUrl: reg.url,
          registrarCaFile: reg.caFile,
          method: "tpm",
          group: "gateways",
          stateDir: join(work, "state-rsa"),
        },
        { keyProvider: rsaKey, tpm: tpmEnrollOps(rsaKey) },
      );
      const certFile = join(work, "tpm-rsa.pem");
      await writeFile(certFile, out.state.certificatePem);
      const { stdout } = await run("openssl", ["verify", "-CAfile", reg.caFile, certFile]);
      expect(stdout.trim()).toBe(`${certFile}: OK`);
      const info = await rsaKey.open();
      expect(info.algorithm).toBe("rsa-2048");
      expect(new X509Certificate(out.state.certificatePem).publicKey.export({ format: "jwk" })).toMatchObject(
        {
          kty: "RSA",
          n: info.publicJwk.n,
        },
      );
    } finally {
      await rsaKey.destroy();
    }
  });
});
