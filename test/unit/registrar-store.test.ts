import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { addEnrolmentGroup, createBootstrapToken } from "../../src/registrar/admin.js";
import { hashBootstrapToken } from "../../src/registrar/enrolment/pkcs11-route.js";
import { type CommitEnrolment, SqliteRegistrarStore } from "../../src/registrar/store/index.js";
import { enrolmentCommit } from "../kit/enrolment-commit.js";

describe("SqliteRegistrarStore", () => {
  let dir: string;
  let store: SqliteRegistrarStore;
  const clock = new ManualClock(new Date("2026-06-01T00:00:00Z"));

  const commit = (over: Partial<CommitEnrolment>): CommitEnrolment =>
    enrolmentCommit(clock.now(), new Date(clock.now().getTime() + 1000), over);

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-store-"));
    store = new SqliteRegistrarStore(join(dir, "db", "registrar.db"));
    addEnrolmentGroup(
      store,
      { name: "g", role: "r", methods: ["pkcs11", "tpm"], ekAllow: ["aa".repeat(32)] },
      clock,
    );
    await addEnrolmentGroup(store, { name: "h", role: "r2", methods: ["pkcs11"] }, clock);
  });
  afterAll(async () => {
    await store.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("creates the database file 0600 in a 0700 directory", async () => {
    expect((await stat(join(dir, "db", "registrar.db"))).mode & 0o777).toBe(0o600);
    expect((await stat(join(dir, "db"))).mode & 0o777).toBe(0o700);
  });

  it("tokens: only the hash is stored; single use; group-bound; a refused commit leaves the token unused", async () => {
    const { token, record } = await createBootstrapToken(store, "g", 60, clock);
    expect(record.hash).toBe(hashBootstrapToken(token.reveal()));
    expect(String(token)).toBe("<redacted>");
    // Bound to its group.
    await expect(
      store.commitEnrolment(commit({ proof: { kind: "token", hash: record.hash }, group: "h" })),
    ).rejects.toThrow(expect.objectContaining({ code: "ERR_TOKEN_INVALID" }));
    const ok = await store.commitEnrolment(commit({ proof: { kind: "token", hash: record.hash } }));
    expect(ok.reenrolled).toBe(false);
    // Used: another key is refused (the same key would be the retry of the device it enrolled).
    await expect(
      store.commitEnrolment(
        commit({
          proof: { kind: "token", hash: record.hash },
          thumbprint: "thumb-9",
          hardwareSerial: "SN-9",
          proposedDeviceId: "dev-9",
          deviceId: "dev-9",
        }),
      ),
    ).rejects.toThrow(expect.objectContaining({ code: "ERR_TOKEN_USED" }));
    // Same key, other serial: conflict, and the new token is not consumed (transaction rolled back).
    const t2 = await createBootstrapToken(store, "g", 60, clock);
    await expect(
      store.commitEnrolment(
        commit({ proof: { kind: "token", hash: t2.record.hash }, hardwareSerial: "SN-2" }),
      ),
    ).rejects.toThrow(expect.objectContaining({ code: "ERR_HARDWARE_MISMATCH" }));
    expect((await store.getBootstrapToken(t2.record.hash))?.usedAt).toBeUndefined();
    // Same hardware: re-issue keeps the id and updates the certificate serial.
    const re = await store.commitEnrolment(
      commit({ proof: { kind: "token", hash: t2.record.hash }, proposedDeviceId: "dev-x", certSerial: "02" }),
    );
    expect(re).toMatchObject({ reenrolled: true, device: { deviceId: "dev-1", certSerial: "02" } });
  });

  it("tokens expire", async () => {
    const { record } = await createBootstrapToken(store, "g", 10, clock);
    await clock.advance(10_000);
    await expect(
      store.commitEnrolment(
        commit({
          proof: { kind: "token", hash: record.hash },
          thumbprint: "t9",
          deviceId: "dev-9",
          now: clock.now(),
        }),
      ),
    ).rejects.toThrow(expect.objectContaining({ code: "ERR_TOKEN_EXPIRED" }));
  });

  it("sessions are single-use and expire; EK and key bindings cannot be rebound", async () => {
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
    await store.createSession({ id: "s1", data, createdAt: now, expiresAt: new Date(now.getTime() + 1000) });
    await store.createSession({ id: "s2", data, createdAt: now, expiresAt: new Date(now.getTime() + 1000) });
    await store.createSession({ id: "s3", data, createdAt: now, expiresAt: new Date(now.getTime() - 1) });
    const tpm = (over: Partial<CommitEnrolment>) =>
      commit({
        method: "tpm",
        ekHash: "ek-1",
        thumbprint: "tk-1",
        hardwareSerial: "GW",
        deviceId: "dev-t",
        ...over,
      });
    await expect(store.commitEnrolment(tpm({ proof: { kind: "session", id: "s3" } }))).rejects.toThrow(
      expect.objectContaining({ code: "ERR_SESSION_EXPIRED" }),
    );
    await expect(store.commitEnrolment(tpm({ proof: { kind: "session", id: "nope" } }))).rejects.toThrow(
      expect.objectContaining({ code: "ERR_SESSION_UNKNOWN" }),
    );
    await store.commitEnrolment(tpm({ proof: { kind: "session", id: "s1" } }));
    await expect(store.commitEnrolment(tpm({ proof: { kind: "session", id: "s1" } }))).rejects.toThrow(
      expect.objectContaining({ code: "ERR_SESSION_CONSUMED" }),
    );
    // Same EK, another device key: refused and s2 stays unconsumed.
    await expect(
      store.commitEnrolment(tpm({ proof: { kind: "session", id: "s2" }, thumbprint: "tk-2" })),
    ).rejects.toThrow(expect.objectContaining({ code: "ERR_EK_ALREADY_REGISTERED" }));
    // The TPM device key presented under another EK: refused.
    await expect(
      store.commitEnrolment(tpm({ proof: { kind: "session", id: "s2" }, ekHash: "ek-2", deviceId: "dev-u" })),
    ).rejects.toThrow(expect.objectContaining({ code: "ERR_KEY_ALREADY_REGISTERED" }));
    expect((await store.getSession("s2"))?.consumedAt).toBeUndefined();
    expect(await store.purgeExpiredSessions(clock.now())).toBe(1);
  });

  it("revocation is sticky and idempotent; unknown devices are reported", async () => {
    const d = await store.revokeDevice("dev-1", clock.now());
    expect(d.status).toBe("revoked");
    expect((await store.revokeDevice("dev-1", clock.now())).status).toBe("revoked");
    await expect(store.revokeDevice("dev-none", clock.now())).rejects.toThrow(
      expect.objectContaining({ code: "ERR_DEVICE_UNKNOWN" }),
    );
    const t = await createBootstrapToken(store, "g", 60, clock);
    await expect(
      store.commitEnrolment(commit({ proof: { kind: "token", hash: t.record.hash }, now: clock.now() })),
    ).rejects.toThrow(expect.objectContaining({ code: "ERR_DEVICE_REVOKED" }));
  });
});
