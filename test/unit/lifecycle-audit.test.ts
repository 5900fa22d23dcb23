import { chmod, readFile, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { silentLogger } from "../../src/core/log.js";
import { Secret } from "../../src/core/secret.js";
import { AnomalyDetector, type AnomalyFlag, AuditLog } from "../../src/daemon/audit.js";
import { useTempDir } from "../kit/temp-dir.js";

const dir = useTempDir("m2m-audit-");

describe("audit log", () => {
  it("appends JSON lines with the injected clock, file 0600, secrets redacted", async () => {
    const clock = new ManualClock(new Date("2026-11-26T10:00:00Z"));
    const path = join(dir(), "state", "audit.log");
    const log = await AuditLog.open(path, { clock, log: silentLogger });
    await log.record("enrolled", { deviceId: "dev-1", token: new Secret("bt-secret") });
    await clock.advance(1000);
    await log.record("auth_failure", { channel: "broker" });
    await log.close();
    expect((await stat(path)).mode & 0o777).toBe(0o600);
    const lines = (await readFile(path, "utf8"))
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as Record<string, unknown>);
    expect(lines).toEqual([
      { ts: "2026-11-26T10:00:00.000Z", event: "enrolled", deviceId: "dev-1", token: "<redacted>" },
      { ts: "2026-11-26T10:00:01.000Z", event: "auth_failure", channel: "broker" },
    ]);
    // Re-opening appends, never truncates.
    const again = await AuditLog.open(path, { clock, log: silentLogger });
    await again.record("renewed");
    await again.close();
    expect((await readFile(path, "utf8")).trim().split("\n")).toHaveLength(3);
  });

  it("tightens a pre-existing group-readable file to 0600", async () => {
    const path = join(dir(), "loose.log");
    await writeFile(path, "");
    await chmod(path, 0o644);
    const log = await AuditLog.open(path, { clock: new ManualClock(), log: silentLogger });
    await log.close();
    expect((await stat(path)).mode & 0o777).toBe(0o600);
  });

  it("concurrent records are all written, in call order", async () => {
    const path = join(dir(), "concurrent.log");
    const log = await AuditLog.open(path, { clock: new ManualClock(), log: silentLogger });
    await Promise.all(Array.from({ length: 20 }, (_, i) => log.record("renewed", { i })));
    await log.close();
    const is = (await readFile(path, "utf8"))
      .trim()
      .split("\n")
      .map((l) => (JSON.parse(l) as { i: number }).i);
    expect(is).toEqual(Array.from({ length: 20 }, (_, i) => i));
    await expect(log.record("renewed")).rejects.toMatchObject({ code: "ERR_AUDIT_WRITE" });
  });
});

describe("anomaly flags (ManualClock)", () => {
  it("a burst of auth failures within the window raises one flag per episode", async () => {
    const clock = new ManualClock();
    const raised: AnomalyFlag[] = [];
    const d = new AnomalyDetector({
      clock,
      authBurst: { threshold: 3, windowMs: 10_000 },
      flagTtlMs: 60_000,
      onFlag: (f) => raised.push(f),
    });
    d.authFailure("registrar");
    await clock.advance(6_000);
    d.authFailure("registrar");
    await clock.advance(6_000); // the first failure has left the window
    d.authFailure("registrar");
    expect(d.flags()).toEqual([]);
    d.authFailure("registrar"); // 3 within 10 s
    expect(raised).toHaveLength(1);
    expect(raised[0]).toMatchObject({ kind: "auth_failure_burst", channel: "registrar" });
    d.authFailure("registrar"); // same episode: no second record
    expect(raised).toHaveLength(1);
    expect(d.flags()).toHaveLength(1);
    await clock.advance(61_000);
    expect(d.flags()).toEqual([]); // expired
  });

  it("failures on different channels do not add up", () => {
    const d = new AnomalyDetector({
      clock: new ManualClock(),
      authBurst: { threshold: 3, windowMs: 10_000 },
    });
    d.authFailure("a");
    d.authFailure("b");
    d.authFailure("c");
    expect(d.flags()).toEqual([]);
  });

  it("a sudden rate jump (and a channel going silent) on one channel is flagged after warm-up", async () => {
    const clock = new ManualClock();
    const raised: AnomalyFlag[] = [];
    const d = new AnomalyDetector({
      clock,
      rate: { windowMs: 1000, factor: 5, minCount: 20, warmupWindows: 3 },
      onFlag: (f) => raised.push(f),
    });
    const window = async (temp: number, hum: number): Promise<void> => {
      d.observe("temp", temp);
      d.observe("hum", hum);
      await clock.advance(1000);
    };
    for (let i = 0; i < 4; i++) await window(30, 30);
    expect(d.flags()).toEqual([]);
    await window(400, 30); // temp jumps ~13x, hum steady
    d.observe("hum", 30);
    expect(d.flags().map((f) => `${f.kind}:${f.channel}`)).toEqual(["rate_change:temp"]);
    expect(raised[0]?.detail).toMatch(/^400 messages in the last window vs a baseline of 30\.0$/);

    const quiet = new AnomalyDetector({
      clock,
      rate: { windowMs: 1000, factor: 5, minCount: 20, warmupWindows: 3 },
    });
    for (let i = 0; i < 4; i++) {
      quiet.observe("door", 50);
      await clock.advance(1000);
    }
    await clock.advance(2000); // nothing arrives
    expect(quiet.flags().map((f) => f.channel)).toEqual(["door"]);
  });

  it("low-volume noise below minCount is not flagged", async () => {
    const clock = new ManualClock();
    const d = new AnomalyDetector({
      clock,
      rate: { windowMs: 1000, factor: 5, minCount: 20, warmupWindows: 3 },
    });
    for (let i = 0; i < 5; i++) {
      d.observe("rare", 1);
      await clock.advance(1000);
    }
    d.observe("rare", 10);
    await clock.advance(1000);
    expect(d.flags()).toEqual([]);
  });
});
