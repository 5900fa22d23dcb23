import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { addEnrolmentGroup, createBootstrapToken } from "../../src/registrar/admin.js";
import { RotationSessions, rotationPolicyFrom } from "../../src/registrar/rotation/index.js";
import { type ReplaceDeviceKey, SqliteRegistrarStore } from "../../src/registrar/store/index.js";

const clock = new ManualClock(new Date("2026-06-01T00:00:00Z"));

describe("RegistrarStore.replaceDeviceKey", () => {
  let dir: string;
  let store: SqliteRegistrarStore;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-rot-store-"));
    store = new SqliteRegistrarStore(join(dir, "registrar.db"));
    await addEnrolmentGroup(store, { name: "g", role: "r", methods: ["pkcs11"] }, clock);
    for (const [id, thumb, serial] of [
      ["dev-1", "t1", "SN-1"],
      ["dev-2", "t2", "SN-2"],
    ] as const) {
      const { record } = await createBootstrapToken(store, "g", 60, clock);
      await store.commitEnrolment({
        method: "pkcs11",
        thumbprint: thumb,
        ekHash: undefined,
        hardwareSerial: serial,
        proposedDeviceId: id,
        deviceId: id,
        proof: { kind: "token", hash: record.hash },
        now: clock.now(),
        group: "g",
        role: "r",
        attributes: {},
        publicJwk: { kty: "EC", x: thumb },
        evidence: { akPublic: "AK" },
        certSerial: "01",
        certNotAfter: new Date(clock.now().getTime() + 1000),
      });
    }
  });
  afterAll(async () => {
    await store.close();
    await rm(dir, { recursive: true, force: true });
  });

  const input = (over: Partial<ReplaceDeviceKey>): ReplaceDeviceKey => ({
    deviceId: "dev-1",
    previousThumbprint: "t1",
    publicJwk: { kty: "EC", x: "new" },
    thumbprint: "t1-new",
    evidence: { akPublic: "AK", devicePublic: "NEW" },
    certSerial: "02",
    certNotAfter: new Date(clock.now().getTime() + 5000),
    at: clock.now(),
    ...over,
  });

  it("refuses without writing: stale key, a key registered elsewhere, unknown device", async () => {
    const before = await store.getDevice("dev-1");
    await expect(store.replaceDeviceKey(input({ previousThumbprint: "old" }))).rejects.toThrow(
      expect.objectContaining({ code: "ERR_ROTATION_CONFLICT" }),
    );
    await expect(store.replaceDeviceKey(input({ thumbprint: "t2" }))).rejects.toThrow(
      expect.objectContaining({ code: "ERR_KEY_ALREADY_REGISTERED" }),
    );
    await expect(store.replaceDeviceKey(input({ thumbprint: "t1" }))).rejects.toThrow(
      expect.objectContaining({ code: "ERR_KEY_ALREADY_REGISTERED" }),
    );
    await expect(store.replaceDeviceKey(input({ deviceId: "nope" }))).rejects.toThrow(
      expect.objectContaining({ code: "ERR_DEVICE_UNKNOWN" }),
    );
    expect(await store.getDevice("dev-1")).toEqual(before);
  });

  it("switches key, evidence and certificate together; the lookup by the new thumbprint finds it", async () => {
    const d = await store.replaceDeviceKey(input({}));
    expect(d).toMatchObject({
      thumbprint: "t1-new",
      publicJwk: { x: "new" },
      certSerial: "02",
      evidence: { devicePublic: "NEW" },
    });
    expect(await store.findDeviceByThumbprint("t1")).toBeUndefined();
    expect((await store.findDeviceByThumbprint("t1-new"))?.deviceId).toBe("dev-1");
    // The rotation that authenticated with the old key now loses.
    await expect(store.replaceDeviceKey(input({ thumbprint: "t1-other" }))).rejects.toThrow(
      expect.objectContaining({ code: "ERR_ROTATION_CONFLICT" }),
    );
  });

  it("a revoked device gets no new key", async () => {
    await store.revokeDevice("dev-2", clock.now());
    await expect(
      store.replaceDeviceKey(input({ deviceId: "dev-2", previousThumbprint: "t2", thumbprint: "t2-new" })),
    ).rejects.toThrow(expect.objectContaining({ code: "ERR_DEVICE_REVOKED" }));
  });
});

describe("RotationSessions", () => {
  it("single use, short-lived, bound to the device, one live session per device", async () => {
    const c = new ManualClock(new Date("2026-06-01T00:00:00Z"));
    // Sessions live in the registrar store (shared by replicas); an in-memory SQLite one here.
    const store = new SqliteRegistrarStore(":memory:");
    const s = new RotationSessions(store, c, 60);
    const a = await s.begin("dev-1", "t1");
    expect(a.nonce).toHaveLength(32);
    await expect(s.take(a.id, "dev-2")).rejects.toThrow(
      expect.objectContaining({ code: "ERR_ROTATION_SESSION_DEVICE" }),
    );
    expect((await s.take(a.id, "dev-1")).nonce.equals(a.nonce)).toBe(true);
    await expect(s.take(a.id, "dev-1")).rejects.toThrow(
      expect.objectContaining({ code: "ERR_SESSION_CONSUMED" }),
    );
    const b = await s.begin("dev-1", "t1");
    const b2 = await s.begin("dev-1", "t1");
    await expect(s.take(b.id, "dev-1")).rejects.toThrow(
      expect.objectContaining({ code: "ERR_SESSION_UNKNOWN" }),
    );
    await c.advance(60_000);
    await expect(s.take(b2.id, "dev-1")).rejects.toThrow(
      expect.objectContaining({ code: "ERR_SESSION_EXPIRED" }),
    );
    await expect(s.take("0".repeat(32), "dev-1")).rejects.toThrow(
      expect.objectContaining({ code: "ERR_SESSION_UNKNOWN" }),
    );
    await store.close();
  });
});

describe("rotationPolicyFrom", () => {
  it("defaults: PKCS#11 allow, TPM only with certify; group overrides; TPM never plain allow", async () => {
    const p = rotationPolicyFrom({ groups: { locked: "deny", loose: "allow" } });
    expect(p.sessionTtlSeconds).toBe(120);
    expect(p.modeFor({ method: "pkcs11", group: "g" })).toBe("allow");
    expect(p.modeFor({ method: "tpm", group: "g" })).toBe("tpm-certify");
    expect(p.modeFor({ method: "pkcs11", group: "locked" })).toBe("deny");
    expect(p.modeFor({ method: "tpm", group: "locked" })).toBe("deny");
    expect(p.modeFor({ method: "tpm", group: "loose" })).toBe("tpm-certify");
    expect(rotationPolicyFrom({ pkcs11: "deny" }).modeFor({ method: "pkcs11", group: "g" })).toBe("deny");
  });
  it("names the bad key, never the value", async () => {
    expect(() => rotationPolicyFrom({ tpm: "allow" }, "r.toml")).toThrow(
      expect.objectContaining({
        code: "ERR_CONFIG_INVALID",
        message: "r.toml: invalid value for 'rotation.tpm'",
      }),
    );
    expect(() => rotationPolicyFrom({ session_ttl: 5 })).toThrow(
      expect.objectContaining({ code: "ERR_CONFIG_INVALID" }),
    );
  });
});
