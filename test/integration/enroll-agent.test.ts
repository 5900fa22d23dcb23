import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { softTpmOps } from "../../bench/enroll.js";
import { defaultRetryPolicy } from "../../src/core/retry.js";
import { type EnrollConfig, RegistrarClient, readEnrolmentState, runEnroll } from "../../src/enroll/index.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";
import { addEnrolmentGroup, createBootstrapToken } from "../../src/registrar/admin.js";
import { startRegistrar } from "../../src/registrar/server.js";
import { ekFingerprint } from "../../src/registrar/verifier/tpm-verifier.js";
import { enrolmentResultSchema } from "../../src/wire/v1/index.js";
import { startTestRegistrar, type TestRegistrar } from "./registrar-harness.js";

describe("agent-side enrolment (runEnroll) against a real registrar", () => {
  let reg: TestRegistrar;
  let work: string;

  beforeAll(async () => {
    reg = await startTestRegistrar();
    await addEnrolmentGroup(reg.store, { name: "sensors", role: "sensor", methods: ["pkcs11"] });
    work = await mkdtemp(join(tmpdir(), "m2m-enroll-agent-"));
  });
  afterAll(async () => {
    await reg?.close();
    await rm(work, { recursive: true, force: true });
  });

  const base = (stateDir: string): EnrollConfig => ({
    registrarUrl: reg.url,
    registrarCaFile: reg.caFile,
    method: "pkcs11",
    stateDir,
  });

  it("reads the bootstrap token from env and from a systemd credential; config errors are coded", async () => {
    const p1 = new FakeKeyProvider({ label: "env" });
    await p1.createOrOpen();
    const { token: t1 } = await createBootstrapToken(reg.store, "sensors", 600);
    const out1 = await runEnroll(
      { ...base(join(work, "s-env")), bootstrapToken: { env: "M2M_BOOTSTRAP" } },
      { keyProvider: p1, env: { M2M_BOOTSTRAP: t1.reveal() } },
    );
    expect(out1.status).toBe("enrolled");

    const p2 = new FakeKeyProvider({ label: "cred" });
    await p2.createOrOpen();
    const { token: t2 } = await createBootstrapToken(reg.store, "sensors", 600);
    const creds = join(work, "creds");
    await mkdir(creds, { mode: 0o700 });
    await writeFile(join(creds, "m2m-bootstrap"), t2.reveal(), { mode: 0o400 });
    const out2 = await runEnroll(
      { ...base(join(work, "s-cred")), bootstrapToken: { credential: "m2m-bootstrap" } },
      { keyProvider: p2, env: { CREDENTIALS_DIRECTORY: creds } },
    );
    expect(out2.state.deviceId).not.toBe(out1.state.deviceId);

    await expect(runEnroll(base(join(work, "s-none")), { keyProvider: p1 })).rejects.toMatchObject({
      code: "ERR_ENROLL_CONFIG",
    });
    await expect(
      runEnroll(
        { ...base(join(work, "s-none")), bootstrapToken: { env: "NOPE" } },
        { keyProvider: p1, env: {} },
      ),
    ).rejects.toMatchObject({ code: "ERR_SECRET_UNAVAILABLE" });
    await expect(
      runEnroll({ ...base(join(work, "s-none")), method: "tpm" }, { keyProvider: p1 }),
    ).rejects.toMatchObject({ code: "ERR_ENROLL_CONFIG" });
  });

  it("TPM flow (software TPM structures): enrols; a re-run does nothing even with the registrar gone", async () => {
    const device = new FakeKeyProvider({ label: "soft-tpm" });
    const soft = await softTpmOps(device);
    await addEnrolmentGroup(reg.store, {
      name: "gw",
      role: "gateway",
      methods: ["tpm"],
      ekAllow: [ekFingerprint(soft.ekPublic)],
    });
    const stateDir = join(work, "s-tpm");
    const cfg: EnrollConfig = { ...base(stateDir), method: "tpm", group: "gw", hardwareSerial: "SOFT-9" };
    const out = await runEnroll(cfg, { keyProvider: device, tpm: soft.ops });
    expect(out.state).toMatchObject({ method: "tpm", role: "gateway", keyRef: "fake:soft-tpm" });
    expect(await readEnrolmentState(stateDir)).toEqual(out.state);
    const unreachable: EnrollConfig = { ...cfg, registrarUrl: "https://127.0.0.1:1" };
    const again = await runEnroll(unreachable, { keyProvider: device, tpm: soft.ops });
    expect(again).toEqual({ status: "already-enrolled", state: out.state });
    // State written for another key (key wiped and regenerated) is reported, not taken as done.
    await expect(
      runEnroll(unreachable, { keyProvider: new FakeKeyProvider({ label: "other" }), tpm: soft.ops }),
    ).rejects.toMatchObject({
      code: "ERR_REPROVISION_REQUIRED",
    });
    // With force, the unreachable registrar is a transient failure (retried, then reported).
    await expect(
      runEnroll(unreachable, {
        keyProvider: device,
        tpm: soft.ops,
        force: true,
        retry: { ...defaultRetryPolicy, baseMs: 1, capMs: 5, maxAttempts: 2 },
      }),
    ).rejects.toMatchObject({ code: "ERR_REGISTRAR_UNREACHABLE", retry: "transient" });
    // A torn/corrupt state file is reported, not silently overwritten.
    await writeFile(join(stateDir, "enrolment.json"), "{");
    await expect(runEnroll(cfg, { keyProvider: device, tpm: soft.ops })).rejects.toMatchObject({
      code: "ERR_STATE_CORRUPT",
    });
    expect(await readFile(join(stateDir, "enrolment.json"), "utf8")).toBe("{");
  });

  it("the client caps response size and maps server errors to coded, classed errors", async () => {
    const hostile = await startRegistrar(reg.config, {
      store: reg.store,
      ca: reg.ca,
      extraRoutes: [
        {
          method: "POST",
          path: "/v1/huge",
          handle: async () => ({
            status: 200,
            body: Buffer.alloc(2 * 1024 * 1024, 0x20),
            contentType: "application/json",
          }),
        },
        {
          method: "POST",
          path: "/v1/boom",
          handle: async () => ({
            status: 503,
            json: { v: 1, error: { code: "ERR_NOT_READY", message: "busy" } },
          }),
        },
        {
          method: "POST",
          path: "/v1/newer",
          // A code from a newer registrar that this agent's catalogue does not know.
          handle: async () => ({
            status: 409,
            json: { v: 1, error: { code: "ERR_FROM_THE_FUTURE", message: "no" } },
          }),
        },
        {
          method: "POST",
          path: "/v1/moved",
          handle: async () => ({ status: 302, json: {}, headers: { location: "https://example.com/" } }),
        },
      ],
    });
    const client = await RegistrarClient.create({
      baseUrl: hostile.url,
      caFile: reg.caFile,
      maxResponseBytes: 64 * 1024,
    });
    try {
      await expect(client.postJson("/v1/huge", {}, enrolmentResultSchema)).rejects.toMatchObject({
        code: "ERR_REGISTRAR_RESPONSE",
      });
      await expect(client.postJson("/v1/boom", {}, enrolmentResultSchema)).rejects.toMatchObject({
        code: "ERR_NOT_READY",
        retry: "transient",
      });
      await expect(client.postJson("/v1/newer", {}, enrolmentResultSchema)).rejects.toMatchObject({
        code: "ERR_REGISTRAR_RESPONSE",
        retry: "permanent",
        details: { status: 409, registrarCode: "ERR_FROM_THE_FUTURE" },
      });
      // Redirects are not followed.
      await expect(client.postJson("/v1/moved", {}, enrolmentResultSchema)).rejects.toMatchObject({
        code: "ERR_REGISTRAR_RESPONSE",
        details: { status: 302 },
      });
    } finally {
      await client.close();
      await hostile.close();
    }
  });
});
