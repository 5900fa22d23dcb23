import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import pg from "pg";
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { type PostgresHandle, startPostgres } from "../../hw/postgres.js";
import { CachedDeviceDirectory } from "../../src/registrar/oauth/directory.js";
import {
  type CommitEnrolment,
  PgRegistrarStore,
  type RegistrarStore,
  SCHEMA_VERSION,
  type SessionData,
  SqliteRegistrarStore,
} from "../../src/registrar/store/index.js";
import { enrolmentCommit } from "../kit/enrolment-commit.js";

/**
 * One contract for RegistrarStore, run against SQLite and a real PostgreSQL (hw/postgres.ts). Every
 * test opens TWO store instances on one database: two replicas (two pools for PostgreSQL, two
 * connections to one file for SQLite), so the races that matter across replicas are decided by the
 * database, not by one process's event loop.
 */

interface Replicas {
  readonly a: RegistrarStore;
  readonly b: RegistrarStore;
  readonly kind: "sqlite" | "postgres";
}

interface Backend {
  readonly name: "sqlite" | "postgres";
  setup(): Promise<void>;
  open(): Promise<Replicas>;
  teardown(): Promise<void>;
}

let dbCounter = 0;

function sqliteBackend(): Backend {
  let dir = "";
  return {
    name: "sqlite",
    async setup() {
      dir = await mkdtemp(join(tmpdir(), "m2m-store-contract-"));
    },
    async open() {
      const path = join(dir, `r${++dbCounter}.db`);
      return { a: new SqliteRegistrarStore(path), b: new SqliteRegistrarStore(path), kind: "sqlite" };
    },
    async teardown() {
      if (dir !== "") await rm(dir, { recursive: true, force: true });
    },
  };
}

function postgresBackend(): Backend {
  let pgh: PostgresHandle | undefined;
  return {
    name: "postgres",
    async setup() {
      // A missing PostgreSQL fails the suite here (ERR_HW_TOOL_MISSING): never a skip.
      pgh = await startPostgres({ durable: false });
    },
    async open() {
      if (pgh === undefined) throw new Error("postgres not started");
      const url = await pgh.createDatabase(`contract_${++dbCounter}`);
      // Both replicas migrate at once: the advisory lock makes it happen exactly once.
      const [a, b] = await Promise.all([
        PgRegistrarStore.open(url, { migrate: true, poolMax: 4 }),
        PgRegistrarStore.open(url, { migrate: true, poolMax: 4 }),
      ]);
      return { a, b, kind: "postgres" };
    },
    async teardown() {
      await pgh?.stop();
    },
  };
}

const T0 = new Date("2026-06-01T00:00:00Z");
const at = (ms: number): Date => new Date(T0.getTime() + ms);

const commit = (over: Partial<CommitEnrolment>): CommitEnrolment => enrolmentCommit(T0, at(86_400_000), over);

const sessionData = (ekHash: string): SessionData => ({
  group: "g",
  secretHash: "00",
  nonce: "bm9uY2U",
  ekHash,
  akPublic: "AA",
  ekPublic: "AA",
  devicePublic: "AA",
  hardwareSerial: "GW-1",
  requestedAttributes: {},
});

const code = (r: PromiseSettledResult<unknown>): string | undefined =>
  r.status === "rejected" ? (r.reason as { code?: string }).code : undefined;

for (const backend of [sqliteBackend(), postgresBackend()]) {
  describe(`RegistrarStore contract: ${backend.name}`, () => {
    let r: Replicas;
    beforeAll(() => backend.setup());
    afterAll(() => backend.teardown());
    beforeEach(async () => {
      r = await backend.open();
      await r.a.addGroup({
        name: "g",
        role: "r",
        attributes: { site: "s1" },
        methods: ["pkcs11", "tpm"],
        ekAllow: [],
        createdAt: T0,
      });
      return async () => {
        await r.a.close();
        await r.b.close();
      };
    });

    it("is migrated to this release's schema version", async () => {
      expect(await r.a.schemaVersion()).toBe(SCHEMA_VERSION);
      expect(await r.b.schemaVersion()).toBe(SCHEMA_VERSION);
    });

    it("groups and tokens: duplicates and unknown groups are refused with their codes; reads go across replicas", async () => {
      await expect(
        r.b.addGroup({ name: "g", role: "x", attributes: {}, methods: ["tpm"], ekAllow: [], createdAt: T0 }),
      ).rejects.toMatchObject({ code: "ERR_GROUP_EXISTS" });
      expect((await r.b.getGroup("g"))?.attributes).toEqual({ site: "s1" });
      expect((await r.b.listGroups()).map((g) => g.name)).toEqual(["g"]);
      await expect(
        r.a.addBootstrapToken({ hash: "h0", group: "nope", expiresAt: at(1000), createdAt: T0 }),
      ).rejects.toMatchObject({ code: "ERR_GROUP_UNKNOWN" });
      await r.a.addBootstrapToken({ hash: "h1", group: "g", expiresAt: at(60_000), createdAt: T0 });
      expect(await r.b.getBootstrapToken("h1")).toMatchObject({ group: "g", usedAt: undefined });
    });

    it("a bootstrap token: single use, group-bound, expiring; a refused commit leaves it unused; re-enrolment keeps the id", async () => {
      await r.a.addBootstrapToken({ hash: "t1", group: "g", expiresAt: at(60_000), createdAt: T0 });
      await expect(
        r.a.commitEnrolment(commit({ proof: { kind: "token", hash: "t1" }, group: "h" })),
      ).rejects.toMatchObject({
        code: "ERR_TOKEN_INVALID",
      });
      const ok = await r.a.commitEnrolment(commit({ proof: { kind: "token", hash: "t1" } }));
      expect(ok).toMatchObject({ reenrolled: false, device: { deviceId: "dev-1", status: "active" } });
      await expect(
        r.b.commitEnrolment(
          commit({
            proof: { kind: "token", hash: "t1" },
            thumbprint: "thumb-other",
            hardwareSerial: "SN-other",
            proposedDeviceId: "dev-other",
            deviceId: "dev-other",
          }),
        ),
      ).rejects.toMatchObject({
        code: "ERR_TOKEN_USED",
      });
      await r.a.addBootstrapToken({ hash: "t2", group: "g", expiresAt: at(60_000), createdAt: T0 });
      await expect(
        r.b.commitEnrolment(commit({ proof: { kind: "token", hash: "t2" }, hardwareSerial: "SN-2" })),
      ).rejects.toMatchObject({ code: "ERR_HARDWARE_MISMATCH" });
      expect((await r.a.getBootstrapToken("t2"))?.usedAt).toBeUndefined();
      const re = await r.b.commitEnrolment(
        commit({ proof: { kind: "token", hash: "t2" }, proposedDeviceId: "dev-x", certSerial: "02" }),
      );
      expect(re).toMatchObject({ reenrolled: true, device: { deviceId: "dev-1", certSerial: "02" } });
      await r.a.addBootstrapToken({ hash: "t3", group: "g", expiresAt: at(10), createdAt: T0 });
      await expect(
        r.a.commitEnrolment(commit({ proof: { kind: "token", hash: "t3" }, thumbprint: "t9", now: at(10) })),
      ).rejects.toMatchObject({ code: "ERR_TOKEN_EXPIRED" });
    });

    it("a used bootstrap token retried by the device it enrolled (same key: the answer was lost) -> the same device again; any other key, a revoked device or an expired token -> refused", async () => {
      await r.a.addBootstrapToken({ hash: "rt", group: "g", expiresAt: at(60_000), createdAt: T0 });
      const first = await r.a.commitEnrolment(commit({ proof: { kind: "token", hash: "rt" } }));
      expect(first).toMatchObject({ reenrolled: false, device: { deviceId: "dev-1" } });
      // The device crashed before storing the answer; it retries (at another replica) with the same
      // token and key: planEnrolment resolves its key to dev-1, the commit re-issues for dev-1.
      const plan = await r.b.planEnrolment(commit({ proposedDeviceId: "dev-retry" }));
      expect(plan).toEqual({ deviceId: "dev-1", existing: true });
      const retry = await r.b.commitEnrolment(
        commit({
          proof: { kind: "token", hash: "rt" },
          proposedDeviceId: "dev-retry",
          deviceId: plan.deviceId,
          certSerial: "0a",
          now: at(1000),
        }),
      );
      expect(retry).toMatchObject({ reenrolled: true, device: { deviceId: "dev-1", certSerial: "0a" } });
      expect(await r.a.listDevices()).toHaveLength(1);
      expect(await r.a.getBootstrapToken("rt")).toMatchObject({ usedBy: "dev-1" });
      // Another key with the used token is a second use, whichever device id it names.
      for (const deviceId of ["dev-2", "dev-1"]) {
        await expect(
          r.a.commitEnrolment(
            commit({
              proof: { kind: "token", hash: "rt" },
              thumbprint: "thumb-2",
              hardwareSerial: "SN-2",
              deviceId,
            }),
          ),
        ).rejects.toMatchObject({ code: "ERR_TOKEN_USED" });
      }
      // Not after the token's lifetime.
      await expect(
        r.a.commitEnrolment(commit({ proof: { kind: "token", hash: "rt" }, now: at(60_000) })),
      ).rejects.toMatchObject({ code: "ERR_TOKEN_USED" });
      // Not for a revoked device.
      await r.a.revokeDevice("dev-1", at(2000));
      await expect(
        r.b.commitEnrolment(commit({ proof: { kind: "token", hash: "rt" }, now: at(3000) })),
      ).rejects.toMatchObject({ code: "ERR_DEVICE_REVOKED" });
    });

    it("race: one bootstrap token presented at two replicas at once -> exactly one enrolment", async () => {
      for (let i = 0; i < 10; i++) {
        await r.a.addBootstrapToken({ hash: `race-${i}`, group: "g", expiresAt: at(60_000), createdAt: T0 });
        const res = await Promise.allSettled([
          r.a.commitEnrolment(
            commit({
              proof: { kind: "token", hash: `race-${i}` },
              thumbprint: `ka-${i}`,
              hardwareSerial: `A-${i}`,
              deviceId: `dev-a-${i}`,
            }),
          ),
          r.b.commitEnrolment(
            commit({
              proof: { kind: "token", hash: `race-${i}` },
              thumbprint: `kb-${i}`,
              hardwareSerial: `B-${i}`,
              deviceId: `dev-b-${i}`,
            }),
          ),
        ]);
        expect(res.filter((x) => x.status === "fulfilled")).toHaveLength(1);
        expect(res.map(code).filter((c) => c !== undefined)).toEqual(["ERR_TOKEN_USED"]);
      }
      expect(await r.a.listDevices()).toHaveLength(10);
    });

    it("race: two finishes of one enrolment session at two replicas -> exactly one wins", async () => {
      for (let i = 0; i < 10; i++) {
        await r.a.createSession({
          id: `s-${i}`,
          data: sessionData(`ek-${i}`),
          createdAt: T0,
          expiresAt: at(60_000),
        });
        const finish = (s: RegistrarStore, id: string) =>
          s.commitEnrolment(
            commit({
              method: "tpm",
              proof: { kind: "session", id: `s-${i}` },
              ekHash: `ek-${i}`,
              thumbprint: `tk-${i}`,
              hardwareSerial: "GW-1",
              proposedDeviceId: id,
              deviceId: id,
            }),
          );
        const res = await Promise.allSettled([finish(r.a, `dev-s-${i}`), finish(r.b, `dev-s-${i}`)]);
        expect(res.filter((x) => x.status === "fulfilled")).toHaveLength(1);
        expect(res.map(code).filter((c) => c !== undefined)).toEqual(["ERR_SESSION_CONSUMED"]);
        expect((await r.b.getSession(`s-${i}`))?.consumedAt).toBeDefined();
      }
    });

    it("race: one EK enrolling at two replicas at once (two sessions, two proposed ids) -> one device, the loser's session unconsumed", async () => {
      for (let i = 0; i < 10; i++) {
        const ek = `ek-dup-${i}`;
        await r.a.createSession({
          id: `sa-${i}`,
          data: sessionData(ek),
          createdAt: T0,
          expiresAt: at(60_000),
        });
        await r.b.createSession({
          id: `sb-${i}`,
          data: sessionData(ek),
          createdAt: T0,
          expiresAt: at(60_000),
        });
        const enrol = async (s: RegistrarStore, sid: string, proposed: string) => {
          const base = {
            method: "tpm" as const,
            ekHash: ek,
            thumbprint: `tk-dup-${i}`,
            hardwareSerial: "GW-1",
          };
          const plan = await s.planEnrolment({ ...base, proposedDeviceId: proposed });
          return s.commitEnrolment(
            commit({
              ...base,
              proof: { kind: "session", id: sid },
              proposedDeviceId: proposed,
              deviceId: plan.deviceId,
            }),
          );
        };
        const res = await Promise.allSettled([
          enrol(r.a, `sa-${i}`, `dev-A-${i}`),
          enrol(r.b, `sb-${i}`, `dev-B-${i}`),
        ]);
        const won = res.filter((x) => x.status === "fulfilled");
        const devices = (await r.a.listDevices()).filter((d) => d.ekHash === ek);
        expect(devices).toHaveLength(1);
        if (won.length === 1) {
          // Concurrent: the loser is refused with a registration code and its proof stays usable.
          expect(["ERR_KEY_ALREADY_REGISTERED", "ERR_EK_ALREADY_REGISTERED"]).toContain(
            res.map(code).find((c) => c !== undefined),
          );
          const loserSession = res[0]?.status === "rejected" ? `sa-${i}` : `sb-${i}`;
          expect((await r.a.getSession(loserSession))?.consumedAt).toBeUndefined();
        } else {
          // Serialised (the second planned after the first committed): a re-enrolment of the same device.
          expect(won).toHaveLength(2);
          expect(res.map((x) => (x.status === "fulfilled" ? x.value.device.deviceId : ""))).toEqual([
            devices[0]?.deviceId,
            devices[0]?.deviceId,
          ]);
        }
      }
    });

    it("sessions: unknown, expired and consumed are refused with their codes; a different key under a known EK is refused", async () => {
      await r.a.createSession({ id: "x1", data: sessionData("ek-x"), createdAt: T0, expiresAt: at(1000) });
      await r.a.createSession({ id: "x2", data: sessionData("ek-x"), createdAt: T0, expiresAt: at(1000) });
      const tpm = (over: Partial<CommitEnrolment>) =>
        commit({
          method: "tpm",
          ekHash: "ek-x",
          thumbprint: "tk-x",
          hardwareSerial: "GW-1",
          deviceId: "dev-t",
          ...over,
        });
      await expect(
        r.b.commitEnrolment(tpm({ proof: { kind: "session", id: "nope" } })),
      ).rejects.toMatchObject({
        code: "ERR_SESSION_UNKNOWN",
      });
      await expect(
        r.b.commitEnrolment(tpm({ proof: { kind: "session", id: "x1" }, now: at(1000) })),
      ).rejects.toMatchObject({
        code: "ERR_SESSION_EXPIRED",
      });
      await r.b.commitEnrolment(tpm({ proof: { kind: "session", id: "x1" } }));
      await expect(r.a.commitEnrolment(tpm({ proof: { kind: "session", id: "x1" } }))).rejects.toMatchObject({
        code: "ERR_SESSION_CONSUMED",
      });
      await expect(
        r.a.commitEnrolment(tpm({ proof: { kind: "session", id: "x2" }, thumbprint: "tk-other" })),
      ).rejects.toMatchObject({ code: "ERR_EK_ALREADY_REGISTERED" });
      expect((await r.a.getSession("x2"))?.consumedAt).toBeUndefined();
      expect(await r.b.purgeExpiredSessions(at(2000))).toBeGreaterThanOrEqual(2);
      expect(await r.a.getSession("x2")).toBeUndefined();
    });

    it("group remove: removes the group and its tokens, refuses an unknown group; devices enrolled through it stay", async () => {
      await r.a.addBootstrapToken({ hash: "gr1", group: "g", expiresAt: at(60_000), createdAt: T0 });
      await r.a.addBootstrapToken({ hash: "gr2", group: "g", expiresAt: at(60_000), createdAt: T0 });
      const enrolled = await r.a.commitEnrolment(commit({ proof: { kind: "token", hash: "gr1" } }));
      await r.a.putAttestationPolicy({
        group: "g",
        selection: { bank: "sha256", pcrs: [7] },
        golden: undefined,
        goldenEventLog: undefined,
        goldenSource: undefined,
        maxQuoteAgeSec: 300,
        requireForTokens: true,
        requireForRenewal: false,
        nonAttestable: "refuse",
        updatedAt: T0,
      });
      expect(await r.b.removeGroup("g")).toEqual({ tokensRemoved: 2 });
      expect(await r.a.getGroup("g")).toBeUndefined();
      // The group's policy went with it: a group of the same name starts without one.
      expect(await r.a.getAttestationPolicy("g")).toBeUndefined();
      expect(await r.a.getBootstrapToken("gr2")).toBeUndefined();
      expect((await r.a.getDevice(enrolled.device.deviceId))?.status).toBe("active");
      await expect(r.a.removeGroup("g")).rejects.toMatchObject({ code: "ERR_GROUP_UNKNOWN" });
      await expect(
        r.a.addBootstrapToken({ hash: "gr3", group: "g", expiresAt: at(60_000), createdAt: T0 }),
      ).rejects.toMatchObject({ code: "ERR_GROUP_UNKNOWN" });
    });

    it("bootstrap tokens: listed newest first; a revoked token enrols nothing (at either replica); a used one cannot be revoked", async () => {
      await r.a.addBootstrapToken({ hash: "rt1", group: "g", expiresAt: at(60_000), createdAt: T0 });
      await r.a.addBootstrapToken({ hash: "rt2", group: "g", expiresAt: at(60_000), createdAt: at(1) });
      expect((await r.b.listBootstrapTokens()).map((t) => t.hash)).toEqual(["rt2", "rt1"]);
      const revoked = await r.b.revokeBootstrapToken("rt1", at(5));
      expect(revoked.revokedAt?.getTime()).toBe(at(5).getTime());
      // Idempotent: the first revocation time stays.
      expect((await r.a.revokeBootstrapToken("rt1", at(9))).revokedAt?.getTime()).toBe(at(5).getTime());
      await expect(
        r.a.commitEnrolment(commit({ proof: { kind: "token", hash: "rt1" } })),
      ).rejects.toMatchObject({
        code: "ERR_TOKEN_REVOKED",
      });
      expect((await r.a.getBootstrapToken("rt1"))?.usedAt).toBeUndefined();
      await r.a.commitEnrolment(commit({ proof: { kind: "token", hash: "rt2" } }));
      await expect(r.b.revokeBootstrapToken("rt2", at(10))).rejects.toMatchObject({ code: "ERR_TOKEN_USED" });
      await expect(r.b.revokeBootstrapToken("nope", at(10))).rejects.toMatchObject({
        code: "ERR_TOKEN_INVALID",
      });
    });

    it("failed activations: counted across replicas; the Nth discards the session, which then cannot be finished", async () => {
      await r.a.createSession({ id: "fa", data: sessionData("ek-fa"), createdAt: T0, expiresAt: at(60_000) });
      expect(await r.a.recordFailedActivation("fa", 3, at(1))).toEqual({ attempts: 1, discarded: false });
      expect(await r.b.recordFailedActivation("fa", 3, at(2))).toEqual({ attempts: 2, discarded: false });
      expect((await r.a.getSession("fa"))?.failedAttempts).toBe(2);
      expect(await r.a.recordFailedActivation("fa", 3, at(3))).toEqual({ attempts: 3, discarded: true });
      await expect(r.b.recordFailedActivation("fa", 3, at(4))).rejects.toMatchObject({
        code: "ERR_SESSION_CONSUMED",
      });
      await expect(
        r.b.commitEnrolment(
          commit({
            method: "tpm",
            proof: { kind: "session", id: "fa" },
            ekHash: "ek-fa",
            thumbprint: "tk-fa",
          }),
        ),
      ).rejects.toMatchObject({ code: "ERR_SESSION_CONSUMED" });
      await expect(r.a.recordFailedActivation("nope", 3, at(4))).rejects.toMatchObject({
        code: "ERR_SESSION_UNKNOWN",
      });
      // Concurrent failures at both replicas all count; exactly one of them discards.
      await r.a.createSession({ id: "fb", data: sessionData("ek-fb"), createdAt: T0, expiresAt: at(60_000) });
      const res = await Promise.allSettled(
        [r.a, r.b, r.a, r.b].map((s) => s.recordFailedActivation("fb", 4, at(5))),
      );
      const ok = res.flatMap((x) => (x.status === "fulfilled" ? [x.value] : []));
      expect(ok.map((x) => x.attempts).sort()).toEqual([1, 2, 3, 4]);
      expect(ok.filter((x) => x.discarded)).toHaveLength(1);
    });

    it("race: one jti presented to two replicas at once -> accepted once; accepted again only after it expired", async () => {
      for (let i = 0; i < 50; i++) {
        const key = `a|dev|jti-${i}`;
        const res = await Promise.all([
          r.a.consumeOnce(key, at(60_000), T0),
          r.b.consumeOnce(key, at(60_000), T0),
          r.b.consumeOnce(key, at(60_000), T0),
        ]);
        expect(res.filter(Boolean)).toHaveLength(1);
      }
      expect(await r.a.isConsumed("a|dev|jti-0", at(60_000))).toBe(true);
      expect(await r.b.isConsumed("a|dev|jti-0", at(60_001))).toBe(false);
      expect(await r.b.consumeOnce("a|dev|jti-0", at(60_000), at(59_999))).toBe(false);
      // Past its expiry the record is dead: the same key may be recorded again (the verifier refuses
      // the expired assertion itself long before this).
      expect(await r.b.consumeOnce("a|dev|jti-0", at(120_000), at(60_001))).toBe(true);
      expect(await r.a.purgeExpiredSessions(at(200_000))).toBeGreaterThanOrEqual(50);
      expect(await r.a.isConsumed("a|dev|jti-1", T0)).toBe(false);
    });

    it("rotation sessions: begun at one replica, finished at the other; single use; strangers do not consume; one live per device", async () => {
      const s = {
        id: "rot-1",
        deviceId: "dev-1",
        currentThumbprint: "t1",
        nonce: Buffer.alloc(32, 7),
        expiresAt: at(60_000),
      };
      await r.a.createRotationSession(s);
      await expect(r.b.takeRotationSession("rot-1", "dev-2", T0)).rejects.toMatchObject({
        code: "ERR_ROTATION_SESSION_DEVICE",
      });
      const res = await Promise.allSettled([
        r.b.takeRotationSession("rot-1", "dev-1", T0),
        r.a.takeRotationSession("rot-1", "dev-1", T0),
      ]);
      expect(res.filter((x) => x.status === "fulfilled")).toHaveLength(1);
      expect(res.map(code).filter((c) => c !== undefined)).toEqual(["ERR_SESSION_CONSUMED"]);
      const won = res.find((x) => x.status === "fulfilled");
      expect(won?.status === "fulfilled" && won.value.nonce.equals(s.nonce)).toBe(true);
      await r.a.createRotationSession({ ...s, id: "rot-2" });
      await r.b.createRotationSession({ ...s, id: "rot-3" });
      await expect(r.a.takeRotationSession("rot-2", "dev-1", T0)).rejects.toMatchObject({
        code: "ERR_SESSION_UNKNOWN",
      });
      await expect(r.a.takeRotationSession("rot-3", "dev-1", at(60_000))).rejects.toMatchObject({
        code: "ERR_SESSION_EXPIRED",
      });
    });

    it("race: two rotations of one device key at two replicas -> exactly one wins", async () => {
      await r.a.addBootstrapToken({ hash: "rk", group: "g", expiresAt: at(60_000), createdAt: T0 });
      await r.a.commitEnrolment(commit({ proof: { kind: "token", hash: "rk" } }));
      const rotate = (s: RegistrarStore, thumb: string) =>
        s.replaceDeviceKey({
          deviceId: "dev-1",
          previousThumbprint: "thumb-1",
          publicJwk: { kty: "EC", x: thumb },
          thumbprint: thumb,
          evidence: undefined,
          certSerial: thumb,
          certNotAfter: at(86_400_000),
          at: at(1),
        });
      const res = await Promise.allSettled([rotate(r.a, "new-a"), rotate(r.b, "new-b")]);
      expect(res.filter((x) => x.status === "fulfilled")).toHaveLength(1);
      expect(res.map(code).filter((c) => c !== undefined)).toEqual(["ERR_ROTATION_CONFLICT"]);
      const d = await r.b.getDevice("dev-1");
      expect(["new-a", "new-b"]).toContain(d?.thumbprint);
      expect(d?.certSerial).toBe(d?.thumbprint);
    });

    it("race: a revocation against token requests at another replica: once revokeDevice resolved, every lookup started afterwards sees it; a cached directory honours it within 1 s", async () => {
      await r.a.addBootstrapToken({ hash: "rv", group: "g", expiresAt: at(60_000), createdAt: T0 });
      await r.a.commitEnrolment(commit({ proof: { kind: "token", hash: "rv" } }));
      let now = 0;
      const cached = new CachedDeviceDirectory(r.b, {
        ttlMs: 1000,
        monotonicMs: () => performance.now() + now,
      });
      try {
        expect((await cached.getDevice("dev-1"))?.status).toBe("active");
        // Token requests keep looking the device up at replica B while replica A revokes it.
        let revokedAt = 0;
        let stop = false;
        const violations: string[] = [];
        const lookups = (async () => {
          while (!stop) {
            const started = performance.now();
            const d = await r.b.getDevice("dev-1");
            // The guarantee: a lookup that starts after the revocation committed never sees "active".
            if (revokedAt !== 0 && started > revokedAt && d?.status === "active") violations.push("store");
            await new Promise((res) => setImmediate(res));
          }
        })();
        await new Promise((res) => setTimeout(res, 30));
        await r.a.revokeDevice("dev-1", at(5));
        revokedAt = performance.now();
        // The cached directory (token endpoint): revoked within its 1 s bound, via notification
        // (PostgreSQL) or TTL expiry (SQLite: another instance's change is not announced).
        let seen: number | undefined;
        while (performance.now() - revokedAt < 1500) {
          if ((await cached.getDevice("dev-1"))?.status === "revoked") {
            seen = performance.now() - revokedAt;
            break;
          }
          await new Promise((res) => setTimeout(res, 10));
        }
        stop = true;
        await lookups;
        expect(violations).toEqual([]);
        expect(seen).toBeDefined();
        expect(seen ?? Number.POSITIVE_INFINITY).toBeLessThanOrEqual(1000 + 50);
        if (r.kind === "postgres") {
          // LISTEN/NOTIFY: far inside the TTL (the fallback only matters when notifications are lost).
          expect(seen ?? Number.POSITIVE_INFINITY).toBeLessThan(500);
        }
        now = 0;
      } finally {
        cached.close();
      }
      // Sticky and idempotent; unknown devices are reported.
      expect((await r.b.revokeDevice("dev-1", at(6))).status).toBe("revoked");
      await expect(r.b.revokeDevice("dev-none", at(6))).rejects.toMatchObject({ code: "ERR_DEVICE_UNKNOWN" });
      await r.a.addBootstrapToken({ hash: "rv2", group: "g", expiresAt: at(60_000), createdAt: T0 });
      await expect(
        r.b.commitEnrolment(commit({ proof: { kind: "token", hash: "rv2" } })),
      ).rejects.toMatchObject({
        code: "ERR_DEVICE_REVOKED",
      });
    });

    it("a shared secret created concurrently at two replicas is one value", async () => {
      const [x, y] = await Promise.all([
        r.a.sharedSecret("k", () => Buffer.alloc(32, 1)),
        r.b.sharedSecret("k", () => Buffer.alloc(32, 2)),
      ]);
      expect(x.equals(y)).toBe(true);
      expect((await r.b.sharedSecret("k", () => Buffer.alloc(32, 3))).equals(x)).toBe(true);
    });

    it("attestation policy: unknown group refused; versions go up by one, also when two replicas write at once; read across replicas", async () => {
      const policy = {
        group: "g",
        selection: { bank: "sha256" as const, pcrs: [0, 7] },
        golden: undefined,
        goldenEventLog: undefined,
        goldenSource: undefined,
        maxQuoteAgeSec: 300,
        requireForTokens: true,
        requireForRenewal: false,
        nonAttestable: "refuse" as const,
        updatedAt: T0,
      };
      await expect(r.a.putAttestationPolicy({ ...policy, group: "nope" })).rejects.toMatchObject({
        code: "ERR_GROUP_UNKNOWN",
      });
      expect(await r.a.getAttestationPolicy("g")).toBeUndefined();
      expect((await r.a.putAttestationPolicy(policy)).version).toBe(1);
      const both = await Promise.all([
        r.a.putAttestationPolicy({ ...policy, golden: { "0": "aa" } }),
        r.b.putAttestationPolicy({ ...policy, golden: { "0": "bb" }, goldenSource: "operator" }),
      ]);
      expect(both.map((p) => p.version).sort()).toEqual([2, 3]);
      const read = await r.b.getAttestationPolicy("g");
      expect(read?.version).toBe(3);
      expect(read).toMatchObject({ selection: { bank: "sha256", pcrs: [0, 7] }, maxQuoteAgeSec: 300 });
      expect(read?.golden?.["0"]).toBe(both.find((p) => p.version === 3)?.golden?.["0"]);
    });

    it("device attestation: upsert, read across replicas, dates and optional fields survive", async () => {
      expect(await r.a.getDeviceAttestation("dev-1")).toBeUndefined();
      const rec = {
        deviceId: "dev-1",
        at: at(1000),
        outcome: "refused" as const,
        code: "ERR_QUOTE_PCR_MISMATCH",
        reason: "PCR 7 differs from the policy",
        policyVersion: 2,
        bank: "sha256",
        pcrs: { "0": "00", "7": "ff" },
        differing: [7],
        clock: { clock: "18446744073709551615", resetCount: 3, restartCount: 0, safe: true },
        eventLog: undefined,
        lastVerifiedAt: undefined,
        anomaly: { code: "ERR_QUOTE_PCR_MISMATCH", reason: "PCR 7 differs from the policy", at: at(1000) },
        reboots: 1,
      };
      await r.a.putDeviceAttestation(rec);
      expect(await r.b.getDeviceAttestation("dev-1")).toEqual(rec);
      const ok = {
        ...rec,
        at: at(2000),
        outcome: "verified" as const,
        code: undefined,
        reason: undefined,
        differing: [],
        anomaly: undefined,
        lastVerifiedAt: at(2000),
        eventLog: "AAAA",
      };
      await r.b.putDeviceAttestation(ok);
      expect(await r.a.getDeviceAttestation("dev-1")).toEqual(ok);
    });

    it("audit rows written at both replicas are listed in order", async () => {
      await r.a.appendAudit({ ts: "1", event: "e1", outcome: "success" });
      await r.a.appendAudit({ ts: "2", event: "e2", outcome: "failure", code: "ERR_X" });
      expect((await r.a.listAudit(10)).map((e) => e.event)).toEqual(["e1", "e2"]);
      await r.b.appendAudit({ ts: "3", event: "e3", outcome: "success" });
      expect((await r.b.listAudit(2)).map((e) => e.event)).toEqual(["e2", "e3"]);
    });
  });
}

describe("PostgreSQL migrations", () => {
  let pgh: PostgresHandle | undefined;
  beforeAll(async () => {
    pgh = await startPostgres({ durable: false });
  });
  afterAll(async () => {
    await pgh?.stop();
  });

  it("three replicas starting at once migrate exactly once; an unmigrated database is refused with ERR_STORE_SCHEMA_OLD", async () => {
    if (pgh === undefined) throw new Error("postgres not started");
    const url = await pgh.createDatabase("mig");
    await expect(PgRegistrarStore.open(url, { migrate: false })).rejects.toMatchObject({
      code: "ERR_STORE_SCHEMA_OLD",
    });
    const stores = await Promise.all(
      [1, 2, 3].map(() => PgRegistrarStore.open(url, { migrate: true, poolMax: 2 })),
    );
    const c = new pg.Client({ connectionString: url });
    await c.connect();
    try {
      const rows = (
        await c.query<{ version: number }>("SELECT version FROM schema_migrations ORDER BY version")
      ).rows;
      expect(rows.map((x) => x.version)).toEqual(Array.from({ length: SCHEMA_VERSION }, (_, i) => i + 1));
      // A database from a newer release is refused, not silently used.
      await c.query("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, 'future', 0)", [
        SCHEMA_VERSION + 1,
      ]);
      await expect(PgRegistrarStore.open(url, { migrate: true })).rejects.toMatchObject({
        code: "ERR_STORE_SCHEMA_NEWER",
      });
    } finally {
      await c.end();
      for (const s of stores) await s.close();
    }
  });

  it("an unreachable database is ERR_STORE_UNAVAILABLE and the message carries no password", async () => {
    const err = await PgRegistrarStore.open("postgresql://m2m:hunter2@127.0.0.1:1/none", {
      migrate: true,
    }).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "ERR_STORE_UNAVAILABLE", retry: "transient" });
    expect(String((err as Error).message)).not.toContain("hunter2");
  });
});
