import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { silentLogger } from "../../src/core/log.js";
import { BUILD_TIME_FLOOR, CLOCK_FLOOR_FILE, ClockSanity } from "../../src/daemon/clock-sanity.js";

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "m2m-clock-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});
let n = 0;
const fresh = (): string => join(dir, `s${n++}`);

describe("clock sanity", () => {
  it("a clock before the build floor is untrusted and blocks credential decisions", () => {
    const clock = new ManualClock(new Date("1970-01-01T00:00:10Z"));
    const cs = new ClockSanity({ clock, stateDir: fresh(), log: silentLogger });
    const v = cs.check();
    expect(v.trusted).toBe(false);
    expect(v.floorSource).toBe("build");
    expect(v.floor).toBe(BUILD_TIME_FLOOR.toISOString());
    expect(v.reason).toMatch(/^untrusted clock: 1970-01-01T00:00:10.000Z is before the build time floor/);
    expect(() => cs.assertTrusted()).toThrow(
      expect.objectContaining({ code: "ERR_CLOCK_UNTRUSTED", retry: "transient" }),
    );
  });

  it("the persisted floor survives a restart; a clock rolled back below it is untrusted", async () => {
    const stateDir = fresh();
    const clock = new ManualClock(new Date("2027-03-01T12:00:00Z"));
    const a = new ClockSanity({ clock, stateDir, log: silentLogger });
    await a.load();
    expect(a.check().trusted).toBe(true);
    expect(await a.persist()).toBe(true);
    const saved = JSON.parse(await readFile(join(stateDir, CLOCK_FLOOR_FILE), "utf8")) as {
      lastSeen: string;
    };
    expect(saved.lastSeen).toBe("2027-03-01T12:00:00.000Z");

    // Reboot with a clock that went back a day (RTC battery, bad NTP).
    clock.setWall(new Date("2027-02-28T12:00:00Z"));
    const b = new ClockSanity({ clock, stateDir, log: silentLogger });
    await b.load();
    const v = b.check();
    expect(v).toMatchObject({ trusted: false, floorSource: "persisted", floor: "2027-03-01T12:00:00.000Z" });
    expect(await b.persist()).toBe(false); // never lowers the floor from an untrusted clock
    // NTP fixes the clock: trusted again without a restart.
    clock.setWall(new Date("2027-03-01T12:05:00Z"));
    expect(b.check().trusted).toBe(true);
  });

  it("a certificate notBefore raises the floor", () => {
    const clock = new ManualClock(new Date("2027-01-01T00:00:00Z"));
    const cs = new ClockSanity({ clock, stateDir: fresh(), log: silentLogger });
    cs.setCertificateNotBefore(new Date("2027-06-01T00:00:00Z"));
    expect(cs.check()).toMatchObject({ trusted: false, floorSource: "certificate" });
    cs.setCertificateNotBefore(new Date("2026-12-01T00:00:00Z"));
    expect(cs.check().trusted).toBe(true);
  });

  it("a corrupt floor file is ignored, not fatal", async () => {
    const stateDir = fresh();
    const clock = new ManualClock(new Date("2027-01-01T00:00:00Z"));
    const w = new ClockSanity({ clock, stateDir, log: silentLogger });
    await w.persist();
    await writeFile(join(stateDir, CLOCK_FLOOR_FILE), "{not json");
    const cs = new ClockSanity({ clock, stateDir, log: silentLogger });
    await cs.load();
    expect(cs.check()).toMatchObject({ trusted: true, floorSource: "build" });
  });

  it("custom build time is honoured", () => {
    const clock = new ManualClock(new Date("2030-01-01T00:00:00Z"));
    const cs = new ClockSanity({
      clock,
      stateDir: fresh(),
      log: silentLogger,
      buildTime: new Date("2031-01-01T00:00:00Z"),
    });
    expect(cs.check().trusted).toBe(false);
  });
});
