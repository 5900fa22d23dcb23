import { execFile } from "node:child_process";
import { createPublicKey, X509Certificate } from "node:crypto";
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { runEnroll } from "../../src/enroll/index.js";
import { finalizeModule, Pkcs11KeyProvider } from "../../src/keys/pkcs11/index.js";
import { addEnrolmentGroup, createBootstrapToken } from "../../src/registrar/admin.js";
import { startTestRegistrar, type TestRegistrar } from "./registrar-harness.js";

const run = promisify(execFile);

describe("PKCS#11 enrolment end to end (SoftHSM2 + real registrar over HTTPS)", () => {
  let hsm: SoftHsmHandle;
  let reg: TestRegistrar;
  let work: string;
  let provider: Pkcs11KeyProvider;

  beforeAll(async () => {
    hsm = await initSoftHsm({ label: "m2m-enroll" });
    process.env.SOFTHSM2_CONF = hsm.env.SOFTHSM2_CONF;
    provider = new Pkcs11KeyProvider({
      modulePath: hsm.modulePath,
      tokenLabel: hsm.tokenLabel,
      keyLabel: "enroll-device",
      pin: { file: hsm.pinFile },
    });
    await provider.createOrOpen();
    reg = await startTestRegistrar();
    await addEnrolmentGroup(reg.store, {
      name: "sensors",
      role: "sensor",
      attributes: { site: "plant-1" },
      methods: ["pkcs11"],
    });
    work = await mkdtemp(join(tmpdir(), "m2m-enroll-p11-"));
  });

  afterAll(async () => {
    await provider?.close();
    finalizeModule(hsm.modulePath);
    await reg?.close();
    await hsm?.cleanup();
    await rm(work, { recursive: true, force: true });
  });

  const tokenFile = async (name: string, value: string): Promise<string> => {
    const p = join(work, name);
    await writeFile(p, `${value}\n`, { mode: 0o600 });
    return p;
  };

  it("enrols with a bootstrap token; the certificate verifies with openssl and carries the token key", async () => {
    const { token } = await createBootstrapToken(reg.store, "sensors", 3600);
    const stateDir = join(work, "state");
    const steps: string[] = [];
    const out = await runEnroll(
      {
        registrarUrl: reg.url,
        registrarCaFile: reg.caFile,
        method: "pkcs11",
        bootstrapToken: { file: await tokenFile("t1", token.reveal()) },
        hardwareSerial: "SN-0001",
        stateDir,
      },
      { keyProvider: provider, onProgress: (p) => steps.push(`${p.step}:${p.status}`) },
    );
    expect(out.status).toBe("enrolled");
    expect(steps).toContain("submit:done");
    expect(out.state).toMatchObject({ method: "pkcs11", role: "sensor", attributes: { site: "plant-1" } });
    const certFile = join(work, "device.pem");
    await writeFile(certFile, out.state.certificatePem);
    const { stdout } = await run("openssl", ["verify", "-CAfile", reg.caFile, certFile]);
    expect(stdout.trim()).toBe(`${certFile}: OK`);
    const cert = new X509Certificate(out.state.certificatePem);
    const info = await provider.open();
    expect(cert.publicKey.export({ format: "der", type: "spki" })).toEqual(
      createPublicKey(info.spkiPem).export({ format: "der", type: "spki" }),
    );
    expect(cert.subject).toBe(`CN=${out.state.deviceId}`);
    expect(cert.subjectAltName).toBe(`URI:urn:m2m:device:${out.state.deviceId}`);
    // State file: 0600, and the registry holds the device with self-asserted evidence.
    expect((await stat(join(stateDir, "enrolment.json"))).mode & 0o777).toBe(0o600);
    const dev = await reg.store.getDevice(out.state.deviceId);
    expect(dev).toMatchObject({ status: "active", method: "pkcs11", hardwareSerial: "SN-0001" });
    expect(dev?.evidence).toMatchObject({ neverExtractable: true, local: true, selfAsserted: true });
    // Idempotent: a re-run does nothing (and would not even need a valid token).
    const again = await runEnroll(
      {
        registrarUrl: reg.url,
        registrarCaFile: reg.caFile,
        method: "pkcs11",
        bootstrapToken: { env: "M2M_NOT_SET_ANYWHERE" },
        stateDir,
      },
      { keyProvider: provider },
    );
    expect(again.status).toBe("already-enrolled");
    expect(again.state.deviceId).toBe(out.state.deviceId);
    // A crash after the registrar committed, before the device stored the answer: the forced re-run
    // with the same (used) token and the same key gets the same device again, not ERR_TOKEN_USED.
    const retry = await runEnroll(
      {
        registrarUrl: reg.url,
        registrarCaFile: reg.caFile,
        method: "pkcs11",
        bootstrapToken: { file: await tokenFile("t1b", token.reveal()) },
        hardwareSerial: "SN-0001",
        stateDir,
      },
      { keyProvider: provider, force: true },
    );
    expect(retry.status).toBe("enrolled");
    expect(retry.state).toMatchObject({
      deviceId: out.state.deviceId,
      role: "sensor",
      attributes: { site: "plant-1" },
    });
    expect(await reg.store.listDevices()).toHaveLength(1);
    // With a fresh token the same hardware keeps its device id and gets a new certificate.
    const { token: t2 } = await createBootstrapToken(reg.store, "sensors", 3600);
    const re = await runEnroll(
      {
        registrarUrl: reg.url,
        registrarCaFile: reg.caFile,
        method: "pkcs11",
        bootstrapToken: { file: await tokenFile("t2", t2.reveal()) },
        hardwareSerial: "SN-0001",
        stateDir,
      },
      { keyProvider: provider, force: true },
    );
    expect(re.state.deviceId).toBe(out.state.deviceId);
    expect(re.state.certificatePem).not.toBe(out.state.certificatePem);
    expect(await reg.store.listDevices()).toHaveLength(1);
    // The audit log has one line per attempt, with the failure's code.
    const audit = (await readFile(reg.config.auditLog, "utf8"))
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l));
    expect(audit.map((a) => [a.event, a.outcome, a.code])).toEqual([
      ["enroll.pkcs11", "success", undefined],
      ["enroll.pkcs11", "success", undefined],
      ["enroll.pkcs11", "success", undefined],
    ]);
    expect(JSON.stringify(audit)).not.toContain(t2.reveal());
    expect((await stat(reg.config.auditLog)).mode & 0o777).toBe(0o600);
  });

  it("the same hardware serial with another key is refused; nothing is persisted", async () => {
    const { token } = await createBootstrapToken(reg.store, "sensors", 3600);
    const other = new Pkcs11KeyProvider({
      modulePath: hsm.modulePath,
      tokenLabel: hsm.tokenLabel,
      keyLabel: "enroll-other",
      pin: { file: hsm.pinFile },
    });
    try {
      await other.createOrOpen();
      const before = (await reg.store.listDevices()).length;
      // A different key is a different device: it gets its own id (serial is self-asserted, not unique).
      const out = await runEnroll(
        {
          registrarUrl: reg.url,
          registrarCaFile: reg.caFile,
          method: "pkcs11",
          bootstrapToken: { file: await tokenFile("t3", token.reveal()) },
          hardwareSerial: "SN-0002",
          stateDir: join(work, "state-other"),
        },
        { keyProvider: other },
      );
      expect(await reg.store.listDevices()).toHaveLength(before + 1);
      // That token, now used, is refused to any other key (here the first device's, with its own serial).
      await expect(
        runEnroll(
          {
            registrarUrl: reg.url,
            registrarCaFile: reg.caFile,
            method: "pkcs11",
            bootstrapToken: { file: await tokenFile("t3b", token.reveal()) },
            hardwareSerial: "SN-0001",
            stateDir: join(work, "state-t3b"),
          },
          { keyProvider: provider },
        ),
      ).rejects.toMatchObject({ code: "ERR_TOKEN_USED" });
      // The first device's key claiming another serial is refused, and the token stays unused.
      const { token: t4 } = await createBootstrapToken(reg.store, "sensors", 3600);
      await expect(
        runEnroll(
          {
            registrarUrl: reg.url,
            registrarCaFile: reg.caFile,
            method: "pkcs11",
            bootstrapToken: { file: await tokenFile("t4", t4.reveal()) },
            hardwareSerial: "SN-9999",
            stateDir: join(work, "state-x"),
          },
          { keyProvider: other },
        ),
      ).rejects.toMatchObject({ code: "ERR_HARDWARE_MISMATCH" });
      expect(await reg.store.listDevices()).toHaveLength(before + 1);
      const { hashBootstrapToken } = await import("../../src/registrar/enrolment/pkcs11-route.js");
      expect((await reg.store.getBootstrapToken(hashBootstrapToken(t4.reveal())))?.usedAt).toBeUndefined();
      expect(out.state.deviceId).not.toBe(undefined);
    } finally {
      await other.close();
    }
  });
});
