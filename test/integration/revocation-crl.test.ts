import { chmod, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa } from "execa";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock, systemClock } from "../../src/core/clock.js";
import { createLogger } from "../../src/core/log.js";
import { revokeDevice } from "../../src/registrar/admin.js";
import { crlNumberOf, FleetCa } from "../../src/registrar/ca/index.js";
import { DEFAULT_CERT_LIFETIME_SECONDS, registrarConfigFrom } from "../../src/registrar/config.js";
import { CrlPublisher, type HookEvent, RevocationHook } from "../../src/registrar/revocation/index.js";
import { SqliteRegistrarStore } from "../../src/registrar/store/index.js";
import { useTempDir } from "../kit/temp-dir.js";
import {
  addTestGroup,
  capturingLogger,
  registerDevice,
  revocationConfig,
  type TestDevice,
} from "./revocation-kit.js";

/** The CRL itself (store entries, signing, numbering, refresh), the hook runner and the config. */

/** Whether a process runs (a zombie waiting for its reaper does not: it was killed). */
async function running(pid: number): Promise<boolean> {
  const stat = await readFile(`/proc/${pid}/stat`, "utf8").catch(() => "");
  return stat !== "" && !/\) Z /.test(stat);
}

const norm = (x: string) => x.replace(/^0+/, "").toLowerCase();

/** `openssl crl` parses and verifies the CRL against the fleet CA; returns its text form. */
async function opensslCrl(file: string, caFile: string): Promise<string> {
  const r = await execa("openssl", ["crl", "-in", file, "-CAfile", caFile, "-noout", "-text"], {
    timeout: 10_000,
    all: true,
  });
  // Why: "verify OK" is openssl's own check of the CA's signature over the CRL.
  expect(r.all).toMatch(/verify OK/);
  return r.stdout;
}

describe("fleet CA CRL", () => {
  let dir: string;
  let caDir: string;
  let caFile: string;
  let store: SqliteRegistrarStore;
  let ca: FleetCa;
  let a: TestDevice;
  let b: TestDevice;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-crl-"));
    const made = await revocationConfig(dir, {});
    caDir = made.caDir;
    caFile = join(caDir, "ca.pem");
    ca = await FleetCa.load(caDir);
    store = new SqliteRegistrarStore(join(made.config.dataDir, "registrar.db"));
    await addTestGroup(store);
    a = await registerDevice(store, ca, 1, 2);
    b = await registerDevice(store, ca, 2, 0);
  }, 30_000);

  afterAll(async () => {
    store?.close();
    if (dir !== undefined) await rm(dir, { recursive: true, force: true });
  });

  it("the store lists every unexpired certificate of revoked devices only, issued before or after the revocation", async () => {
    expect(await store.listRevokedCertificates(new Date())).toEqual([]);
    await revokeDevice(store, a.deviceId);
    const listed = await store.listRevokedCertificates(new Date());
    expect(listed.map((e) => e.serial).sort()).toEqual(a.certs.map((c) => c.serial).sort());
    expect(new Set(listed.map((e) => e.deviceId))).toEqual(new Set([a.deviceId]));
    // An EST renewal that raced the revocation: its certificate must reach the CRL too.
    const late = { serial: "7f0000000000000000000000000000aa", notAfter: new Date(Date.now() + 3_600_000) };
    await store.recordCertificate(a.deviceId, late, new Date());
    expect((await store.listRevokedCertificates(new Date())).map((e) => e.serial)).toContain(late.serial);
    expect((await store.getDevice(a.deviceId))?.certSerial).not.toBe(late.serial);
    // Expired certificates leave the CRL (RFC 5280 §3.3: an entry may go once the cert expired).
    expect(await store.listRevokedCertificates(new Date(Date.now() + 2 * 3_600_000))).toEqual([]);
    await expect(revokeDevice(store, "dev-unknown")).rejects.toMatchObject({ code: "ERR_DEVICE_UNKNOWN" });
  });

  it("signs RFC 5280 CRLs: verified by openssl, numbered monotonically across restarts, refreshed before nextUpdate", async () => {
    const file = join(dir, "pub", "crl.pem");
    const clock = new ManualClock(new Date());
    const events: HookEvent[] = [];
    const hook = { run: async (e: HookEvent) => void events.push(e), idle: async () => undefined };
    const make = () =>
      new CrlPublisher({
        store,
        ca,
        clock,
        file,
        validitySeconds: 7 * 86_400,
        refreshSeconds: 86_400,
        checkIntervalMs: 60_000,
        hook: hook as unknown as RevocationHook,
      });
    const p = make();
    const first = await p.start();
    const text = await opensslCrl(file, caFile);
    expect(text).toMatch(/X509v3 CRL Number:\s+\n?\s*[0-9]+/);
    expect(text).toMatch(/X509v3 Authority Key Identifier/);
    expect(first.nextUpdate.getTime() - first.thisUpdate.getTime()).toBe(7 * 86_400_000);
    const onCrl = [...text.matchAll(/Serial Number: ([0-9A-F]+)/g)].map((m) => norm(m[1] ?? ""));
    expect(onCrl.sort()).toEqual(first.serials.map(norm).sort());
    expect(first.serials).toHaveLength(a.certs.length + 1);
    expect(crlNumberOf(await readFile(file, "utf8"))).toBe(first.crlNumber);
    expect((await execa("stat", ["-c", "%a", file])).stdout).toBe("644");
    expect(events).toEqual([{ kind: "crl-updated", crlFile: file, crlNumber: first.crlNumber }]);

    // Nothing changed: the same CRL stays published.
    await p.trigger();
    expect(p.current?.crlNumber).toBe(first.crlNumber);
    // A revocation: a new CRL with B's certificate, and a `revoked` event naming B and its serials.
    await revokeDevice(store, b.deviceId);
    await p.trigger();
    const second = p.current;
    expect(second?.crlNumber).toBeGreaterThan(first.crlNumber);
    expect(second?.serials).toContain(b.certs[0]?.serial);
    expect(events.at(-1)).toMatchObject({
      kind: "revoked",
      deviceId: b.deviceId,
      serials: [b.certs[0]?.serial],
    });
    // Older than crl_refresh: signed again although nothing changed (relying parties never see it expire).
    clock.setWall(new Date(clock.now().getTime() + 86_400_000));
    await p.trigger();
    const third = p.current;
    expect(third?.crlNumber).toBeGreaterThan(second?.crlNumber ?? 0n);
    expect(third?.thisUpdate.getTime()).toBeGreaterThan(second?.thisUpdate.getTime() ?? 0);
    expect(events.at(-1)).toMatchObject({ kind: "crl-updated" });
    await p.close();

    // A restart with the clock stepped back an hour still numbers above the CRL on disk.
    clock.setWall(new Date(clock.now().getTime() - 3_600_000));
    const q = make();
    const fourth = await q.start();
    expect(fourth.crlNumber).toBe((third?.crlNumber ?? 0n) + 1n);
    await q.close();
    await opensslCrl(file, caFile);
  });

  it("writes the CRL distribution point into device certificates when crl_urls is set", async () => {
    const withCdp = await FleetCa.load(caDir, systemClock, { crlUrls: ["http://registrar.example/v1/crl"] });
    const d = await registerDevice(store, withCdp, 3, 0);
    const { stdout } = await execa("openssl", ["x509", "-noout", "-text"], {
      input: d.certs[0]?.pem ?? "",
      timeout: 10_000,
    });
    expect(stdout).toMatch(/X509v3 CRL Distribution Points:[\s\S]*URI:http:\/\/registrar\.example\/v1\/crl/);
    const { stdout: without } = await execa("openssl", ["x509", "-noout", "-text"], {
      input: a.certs[0]?.pem ?? "",
      timeout: 10_000,
    });
    expect(without).not.toMatch(/CRL Distribution Points/);
  });
});

describe("revocation hook runner", () => {
  const dir = useTempDir("m2m-hook-");

  const script = async (name: string, body: string): Promise<string> => {
    const p = join(dir(), name);
    await writeFile(p, `#!/bin/sh\n${body}\n`);
    await chmod(p, 0o755);
    return p;
  };
  const event: HookEvent = {
    kind: "revoked",
    deviceId: "dev-0a1b",
    serials: ["01aa", "02bb"],
    revokedAt: new Date("2026-12-06T06:00:00Z"),
    crlFile: "/var/lib/m2m-registrar/crl.pem",
    crlNumber: 42n,
  };

  it("passes the event in M2M_* variables and nothing of the registrar's environment", async () => {
    const out = join(dir(), "env.txt");
    const file = await script("env", `env > ${out}`);
    process.env.M2M_TEST_SECRET_DB_URL = "postgres://user:pw@db/x";
    try {
      const hook = new RevocationHook(
        { command: [file], timeoutMs: 5000 },
        { clock: systemClock, log: createLogger({ write: () => undefined }) },
      );
      const r = await hook.run(event);
      expect(r).toMatchObject({ ok: true, exitCode: 0, timedOut: false });
    } finally {
      delete process.env.M2M_TEST_SECRET_DB_URL;
    }
    const env = await readFile(out, "utf8");
    expect(env).toMatch(/^M2M_EVENT=revoked$/m);
    expect(env).toMatch(/^M2M_DEVICE_ID=dev-0a1b$/m);
    expect(env).toMatch(/^M2M_CERT_SERIALS=01aa,02bb$/m);
    expect(env).toMatch(/^M2M_CRL_FILE=\/var\/lib\/m2m-registrar\/crl.pem$/m);
    expect(env).toMatch(/^M2M_CRL_NUMBER=42$/m);
    expect(env).toMatch(/^M2M_REVOKED_AT=2026-12-06T06:00:00.000Z$/m);
    expect(env).not.toMatch(/SECRET_DB_URL/);
  });

  it("kills a hook that overruns its timeout (with its children) and reports a failure", async () => {
    const pidFile = join(dir(), "child.pid");
    const file = await script("slow", `sleep 30 & echo $! > ${pidFile}; wait`);
    const { logger, lines } = capturingLogger();
    const hook = new RevocationHook({ command: [file], timeoutMs: 500 }, { clock: systemClock, log: logger });
    const t0 = Date.now();
    const r = await hook.run(event);
    expect(r).toMatchObject({ ok: false, timedOut: true });
    expect(Date.now() - t0).toBeLessThan(3000);
    const child = Number((await readFile(pidFile, "utf8")).trim());
    await new Promise((res) => setTimeout(res, 200));
    // Why: a hook's grandchildren must not outlive the timeout (process group killed).
    expect(await running(child)).toBe(false);
    expect(lines.find((l) => l.msg === "revocation hook failed")).toMatchObject({
      timedOut: true,
      deviceId: "dev-0a1b",
    });
  });

  it("reports a non-zero exit with the hook's stderr, and runs events one at a time in order", async () => {
    const log = join(dir(), "order.txt");
    const file = await script(
      "fail",
      `echo "$M2M_EVENT" >> ${log}; sleep 0.1; echo broker refused >&2; exit 3`,
    );
    const { logger, lines } = capturingLogger();
    const hook = new RevocationHook(
      { command: [file], timeoutMs: 5000 },
      { clock: systemClock, log: logger },
    );
    const results = await Promise.all([
      hook.run(event),
      hook.run({ kind: "crl-updated", crlFile: "/x", crlNumber: 43n }),
    ]);
    expect(results.map((r) => r.exitCode)).toEqual([3, 3]);
    expect((await readFile(log, "utf8")).trim().split("\n")).toEqual(["revoked", "crl-updated"]);
    expect(lines.find((l) => l.msg === "revocation hook failed")).toMatchObject({
      stderr: "broker refused",
    });
  });
});

describe("[revocation] config", () => {
  const base = { tls: { insecure_http: true }, data_dir: "/var/lib/m2m-registrar" };
  it("defaults: CRL in data_dir, 7 d validity, daily refresh, 1 s check, 24 h device certificates", () => {
    const c = registrarConfigFrom(base, "/etc/m2m-registrar", "r.toml");
    expect(c.revocation).toEqual({
      crlFile: "/var/lib/m2m-registrar/crl.pem",
      crlValiditySeconds: 7 * 86_400,
      crlRefreshSeconds: 86_400,
      checkIntervalMs: 1000,
      crlUrls: [],
      hook: undefined,
      hookTimeoutSeconds: 10,
    });
    expect(c.certLifetimeSeconds).toBe(DEFAULT_CERT_LIFETIME_SECONDS);
    expect(DEFAULT_CERT_LIFETIME_SECONDS).toBe(86_400);
  });
  it("refuses a refresh that is not shorter than the validity, and a hook without an absolute path", () => {
    const bad = (revocation: Record<string, unknown>) => () =>
      registrarConfigFrom({ ...base, revocation }, "/etc", "r.toml");
    expect(bad({ crl_validity: "1d", crl_refresh: "1d" })).toThrow(
      expect.objectContaining({
        code: "ERR_CONFIG_INVALID",
        details: { file: "r.toml", key: "revocation.crl_refresh" },
      }),
    );
    expect(bad({ hook: ["mosquitto-revoke"] })).toThrow(
      expect.objectContaining({
        code: "ERR_CONFIG_INVALID",
        details: { file: "r.toml", key: "revocation.hook" },
      }),
    );
    expect(bad({ hook: "/bin/sh -c x" })).toThrow(expect.objectContaining({ code: "ERR_CONFIG_INVALID" }));
    expect(bad({ check_interval_ms: 10 })).toThrow(expect.objectContaining({ code: "ERR_CONFIG_INVALID" }));
  });
});
