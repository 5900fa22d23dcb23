import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";

describe("SqliteOutbox TTL and an untrusted wall clock", () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "m2m-ttl-"));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it("a wall clock that jumps years ahead does not expire the backlog while it is untrusted", async () => {
    const clock = new ManualClock(new Date("2026-03-01T00:00:00Z"));
    let trusted = true;
    const ob = SqliteOutbox.open({
      path: join(dir, "ttl.db"),
      sinks: ["s"],
      ttlCheckMs: 0,
      clock,
      limits: { ttlMs: 24 * 3600 * 1000 },
      clockTrusted: () => trusted,
    });
    await ob.append([{ channel: "a", payload: new Uint8Array([1]) }]);
    // RTC glitch: the wall clock reads 2031 before NTP has confirmed anything.
    clock.setWall(new Date("2031-01-01T00:00:00Z"));
    trusted = false;
    expect(await ob.expire()).toBe(0);
    expect(ob.stats().depth).toBe(1);
    // Once the clock is trusted, age applies again.
    trusted = true;
    expect(await ob.expire()).toBe(1);
    expect(ob.stats().drops.ttl).toBe(1);
    await ob.close();
  });
});
