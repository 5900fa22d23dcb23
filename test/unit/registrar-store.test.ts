import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { addEnrolmentGroup, createBootstrapToken } from "../../src/registrar/admin.js";
import { hashBootstrapToken } from "../../src/registrar/enrolment/pkcs11-route.js";
import { type CommitEnrolment, SqliteRegistrarStore } from "../../src/registrar/store/index.js";

describe("SqliteRegistrarStore", () => {
  let dir: string;
  let store: SqliteRegistrarStore;
  const clock = new ManualClock(new Date("2026-06-01T00:00:00Z"));

  const commit = (over: Partial<CommitEnrolment>): CommitEnrolment => ({
    method: "pkcs11",
    thumbprint: "thumb-1",
    ekHash: undefined,
    hardwareSerial: "SN-1",
    proposedDeviceId: "dev-1",
    deviceId: "dev-1",
    proof: { kind: "token", hash: "none" },
    now: clock.now(),
    group: "g",
    role: "r",
    attributes: {},
    publicJwk: { kty: "EC" },
    evidence: undefined,
    certSerial: "01",
    certNotAfter: new Date(clock.now().getTime() + 1000),
    ...over,
  });

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-store-"));
    store = new SqliteRegistrarStore(join(dir, "db", "registrar.db"));
    addEnrolmentGroup(
      store,
      { name: "g", role: "r", methods: ["pkcs11", "tpm"], ekAllow: ["aa".repeat(32)] },
      clock,
    );
    addEnrolmentGroup(store, { name: "h", role: "r2", methods: ["pkcs11"] }, clock);
  });
  afterAll(async () => {
    store.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("creates the database file 0600 in a 0700 directory", async () => {
    expect((await stat(join(dir, "db", "registrar.db"))).mode & 0o777).toBe(0o600);
    expect((await stat(join(dir, "db"))).mode & 0o777).toBe(0o700);
  });

  it("tokens: only the hash is stored; single use; group-bound; a refused commit leaves the token unused", () => {
    const { token, record } = createBootstrapToken(store, "g", 60, clock);
    expect(record.hash).toBe(hashBootstrapToken(token.reveal()));
    expect(String(token)).toBe("<redacted>");
    // Bound to its group.
    expect(() =>
      store.commitEnrolment(commit({ proof: { kind: "token", hash: record.hash }, group: "h" })),
    ).toThrow(expect.objectContaining({ code: "ERR_TOKEN_INVALID" }));
    const ok = store.commitEnrolment(commit({ proof: { kind: "token", hash: record.hash } }));
    expect(ok.reenrolled).toBe(false);
    expect(() => store.commitEnrolment(commit({ proof: { kind: "token", hash: record.hash } }))).toThrow(
      expect.objectContaining({ code: "ERR_TOKEN_USED" }),
    );
    // Same key, other serial: conflict, and the new token is not consumed (transaction rolled back).
    const t2 = createBootstrapToken(store, "g", 60, clock);
    expect(() =>
      store.commitEnrolment(
        commit({ proof: { kind: "token", hash: t2.record.hash }, hardwareSerial: "SN-2" }),
      ),
    ).toThrow(expect.objectContaining({ code: "ERR_HARDWARE_MISMATCH" }));
    expect(store.getBootstrapToken(t2.record.hash)?.usedAt).toBeUndefined();
    // Same hardware: re-issue keeps the id and updates the certificate serial.
    const re = store.commitEnrolment(
      commit({ proof: { kind: "token", hash: t2.record.hash }, proposedDeviceId: "dev-x", certSerial: "02" }),
    );
    expect(re).toMatchObject({ reenrolled: true, device: { deviceId: "dev-1", certSerial: "02" } });
  });

  it("tokens expire", async () => {
    const { record } = createBootstrapToken(store, "g", 10, clock);
    await clock.advance(10_000);
    expect(() =>
      store.commitEnrolment(
        commit({
          proof: { kind: "token", hash: record.hash },
          thumbprint: "t9",
          deviceId: "dev-9",
          now: clock.now(),
        }),
      ),
    ).toThrow(expect.objectContaining({ code: "ERR_TOKEN_EXPIRED" }));
  });

  it("sessions are single-use and expire; EK and key bindings cannot be rebound", () => {
    const now = clock.now();
    const data = {
      group: "g",
      secretHash: "00",
      nonce: "AA",
      ekHash: "ek-1",
      ekPublic: "AA",
      akPublic: "AA",
      devicePublic: "AA",
      hardwareSerial: "GW",
      requestedAttributes: {},
    };
    store.createSession({ id: "s1", data, createdAt: now, expiresAt: new Date(now.getTime() + 1000) });
    store.createSession({ id: "s2", data, createdAt: now, expiresAt: new Date(now.getTime() + 1000) });
    store.createSession({ id: "s3", data, createdAt: now, expiresAt: new Date(now.getTime() - 1) });
    const tpm = (over: Partial<CommitEnrolment>) =>
      commit({
        method: "tpm",
        ekHash: "ek-1",
        thumbprint: "tk-1",
        hardwareSerial: "GW",
        deviceId: "dev-t",
        ...over,
      });
    expect(() => store.commitEnrolment(tpm({ proof: { kind: "session", id: "s3" } }))).toThrow(
      expect.objectContaining({ code: "ERR_SESSION_EXPIRED" }),
    );
    expect(() => store.commitEnrolment(tpm({ proof: { kind: "session", id: "nope" } }))).toThrow(
      expect.objectContaining({ code: "ERR_SESSION_UNKNOWN" }),
    );
    store.commitEnrolment(tpm({ proof: { kind: "session", id: "s1" } }));
    expect(() => store.commitEnrolment(tpm({ proof: { kind: "session", id: "s1" } }))).toThrow(
      expect.objectContaining({ code: "ERR_SESSION_CONSUMED" }),
    );
    // Same EK, another device key: refused and s2 stays unconsumed.
    expect(() =>
      store.commitEnrolment(tpm({ proof: { kind: "session", id: "s2" }, thumbprint: "tk-2" })),
    ).toThrow(expect.objectContaining({ code: "ERR_EK_ALREADY_REGISTERED" }));
    // The TPM device key presented under another EK: refused.
    expect(() =>
      store.commitEnrolment(tpm({ proof: { kind: "session", id: "s2" }, ekHash: "ek-2", deviceId: "dev-u" })),
    ).toThrow(expect.objectContaining({ code: "ERR_KEY_ALREADY_REGISTERED" }));
    expect(store.getSession("s2")?.consumedAt).toBeUndefined();
    expect(store.purgeExpiredSessions(clock.now())).toBe(1);
  });

  it("revocation is sticky and idempotent; unknown devices are reported", () => {
    const d = store.revokeDevice("dev-1", clock.now());
    expect(d.status).toBe("revoked");
    expect(store.revokeDevice("dev-1", clock.now()).status).toBe("revoked");
    expect(() => store.revokeDevice("dev-none", clock.now())).toThrow(
      expect.objectContaining({ code: "ERR_DEVICE_UNKNOWN" }),
    );
    const t = createBootstrapToken(store, "g", 60, clock);
    expect(() =>
      store.commitEnrolment(commit({ proof: { kind: "token", hash: t.record.hash }, now: clock.now() })),
    ).toThrow(expect.objectContaining({ code: "ERR_DEVICE_REVOKED" }));
  });
});
