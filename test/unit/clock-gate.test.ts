import { mkdtemp, readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { createTestCa } from "../../hw/mosquitto.js";
import { ManualClock } from "../../src/core/clock.js";
import { silentLogger } from "../../src/core/log.js";
import { EstClient } from "../../src/credentials/est/est-client.js";
import { assertClockTrustedForCli, CLOCK_FLOOR_FILE, ClockSanity } from "../../src/daemon/clock-sanity.js";
import type { OutboxMessage } from "../../src/relay/outbox/outbox.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { Relay } from "../../src/relay/relay.js";
import type { DeliveryOutcome, Sink } from "../../src/relay/sinks/sink.js";
import { useTempDir } from "../kit/temp-dir.js";
import { until } from "../kit/until.js";

/**
 * The clock gate (issue 12, "clock gating everywhere"): one `ClockSanity.untrusted()` guard in front
 * of the relay's sinks (no lease, delivery or probe), EST and rotation; a corrected clock resumes
 * at once; a forward step of the wall clock is noticed and never becomes the persisted floor.
 */
const tempDir = useTempDir("m2m-clock-gate-");

/** Counts deliveries and probes (each would be a connection upstream). */
class CountingSink implements Sink {
  readonly name = "s";
  readonly maxBatch = 10;
  readonly maxInFlight = 10;
  readonly delivered: string[] = [];
  calls = 0;
  probes = 0;
  async deliver(batch: readonly OutboxMessage[]): Promise<DeliveryOutcome[]> {
    this.calls++;
    return batch.map((m) => {
      this.delivered.push(Buffer.from(m.payload).toString());
      return { id: m.id, kind: "ok" };
    });
  }
  async probe(): Promise<boolean> {
    this.probes++;
    return false;
  }
  async close(): Promise<void> {}
}

describe("relay hold gate", () => {
  it("while the clock is untrusted nothing is delivered or probed, the sink is reported held at once; a corrected clock delivers everything", async () => {
    const clock = new ManualClock(new Date("2001-01-01T00:00:00Z"));
    const sanity = new ClockSanity({ clock, stateDir: join(tempDir(), "relay"), log: silentLogger });
    const outbox = SqliteOutbox.open({
      path: join(tempDir(), "hold.db"),
      sinks: ["s"],
      ttlCheckMs: 0,
      clock,
    });
    const sink = new CountingSink();
    const relay = new Relay({
      outbox,
      sinks: [sink],
      clock,
      hold: () => sanity.untrusted(),
      holdPollMs: 1000,
    });
    const enc = new TextEncoder();
    await outbox.append(["a", "b", "c"].map((p) => ({ channel: "c", payload: enc.encode(p) })));
    relay.start();
    for (let i = 0; i < 20; i++) {
      await clock.advance(1000);
      await new Promise((r) => setTimeout(r, 1));
    }
    expect(sink.calls).toBe(0);
    expect(sink.probes).toBe(0);
    expect(outbox.stats().depth).toBe(3);
    // Reported immediately (not after unhealthyAfterMs) and with the clock's code, not "unreachable".
    expect(relay.unhealthy()).toEqual([
      expect.objectContaining({ sink: "s", code: "ERR_CLOCK_UNTRUSTED", held: true }),
    ]);

    clock.setWall(new Date("2027-01-01T00:00:00Z"));
    for (let i = 0; i < 100 && sink.delivered.length < 3; i++) {
      await clock.advance(100);
      await new Promise((r) => setTimeout(r, 1));
    }
    await until(() => sink.delivered.length === 3, "delivered after the correction");
    expect(sink.delivered).toEqual(["a", "b", "c"]);
    expect(relay.unhealthy()).toEqual([]);
    expect(relay.counters.s?.backoffLevel).toBe(0);
    await relay.stop();
    await outbox.close();
  });
});

describe("EST gate", () => {
  it("refuses with ERR_CLOCK_UNTRUSTED before any connection or token request", async () => {
    const clock = new ManualClock(new Date("2001-01-01T00:00:00Z"));
    const sanity = new ClockSanity({ clock, stateDir: join(tempDir(), "est"), log: silentLogger });
    let tokenRequests = 0;
    const est = new EstClient(
      // Port 9 (discard) on a TEST-NET address: a connection attempt would hang or fail differently.
      { baseUrl: "https://192.0.2.1:9", caPem: "", gate: () => sanity.untrusted() },
      {
        kind: "token",
        tokens: {
          getToken: async () => {
            tokenRequests++;
            throw new Error("must not be asked");
          },
        },
      },
      clock,
    );
    await expect(est.simplereenroll(new Uint8Array([0x30, 0]))).rejects.toMatchObject({
      code: "ERR_CLOCK_UNTRUSTED",
      retry: "transient",
    });
    await expect(est.cacerts()).rejects.toMatchObject({ code: "ERR_CLOCK_UNTRUSTED" });
    expect(tokenRequests).toBe(0);
  });
});

describe("forward steps", () => {
  it("a two-year forward step is noticed and never persisted as the floor; corrected back, the clock is trusted", async () => {
    const stateDir = join(tempDir(), "step");
    const clock = new ManualClock(new Date("2027-03-01T12:00:00Z"));
    const cs = new ClockSanity({ clock, stateDir, log: silentLogger });
    await cs.load();
    expect(cs.noteStep()).toBeUndefined();
    expect(cs.check().trusted).toBe(true);
    await clock.advance(60_000);
    expect(await cs.persist()).toBe(true);
    expect(cs.noteStep()).toBeUndefined(); // ordinary passage of time is no step

    const real = clock.now().getTime();
    clock.setWall(new Date(real + 730 * 86_400_000));
    const step = cs.noteStep();
    expect(step).toBeGreaterThan(729 * 86_400_000);
    expect(cs.check().trusted).toBe(true); // a forward step cannot be told from the truth
    await clock.advance(60_000);
    await cs.persist();
    const saved = JSON.parse(await readFile(join(stateDir, CLOCK_FLOOR_FILE), "utf8")) as {
      lastSeen: string;
    };
    // The floor moved with monotonic time (+1 min), not with the step.
    expect(new Date(saved.lastSeen).getTime()).toBe(real + 60_000);

    // NTP steps back to the truth: still above the floor, so trusted (no two-year lockout) —
    // also after a restart that reads the persisted floor.
    clock.setWall(new Date(real + 90_000));
    expect(cs.noteStep()).toBeLessThan(-729 * 86_400_000);
    expect(cs.check().trusted).toBe(true);
    const again = new ClockSanity({ clock, stateDir, log: silentLogger });
    await again.load();
    expect(again.check()).toMatchObject({ trusted: true, floorSource: "persisted" });
  });

  it("a clock untrusted at boot and corrected later anchors the floor at the corrected time", async () => {
    const stateDir = join(tempDir(), "boot");
    const clock = new ManualClock(new Date("2001-01-01T00:00:00Z"));
    const cs = new ClockSanity({ clock, stateDir, log: silentLogger });
    expect(await cs.persist()).toBe(false);
    await clock.advance(5_000);
    clock.setWall(new Date("2027-05-01T00:00:00Z"));
    await clock.advance(1_000);
    expect(await cs.persist()).toBe(true);
    const saved = JSON.parse(await readFile(join(stateDir, CLOCK_FLOOR_FILE), "utf8")) as {
      lastSeen: string;
    };
    expect(saved.lastSeen).toBe("2027-05-01T00:00:01.000Z");
  });
});

describe("CLI gate (enroll, token --direct, decommission)", () => {
  it("refuses below the build floor and below the enrolled certificate's notBefore", async () => {
    const stateDir = join(tempDir(), "cli");
    await expect(
      assertClockTrustedForCli({
        stateDir,
        log: silentLogger,
        clock: new ManualClock(new Date("2001-01-01T00:00:00Z")),
      }),
    ).rejects.toMatchObject({ code: "ERR_CLOCK_UNTRUSTED" });
    // A certificate issued now (notBefore = now): the enrolled certificate's time floor.
    const certificatePem = (await createTestCa(await mkdtemp(join(tempDir(), "cli-ca-")))).caPem;
    // A day before the certificate was issued (yet above the build floor): untrusted because of it.
    const dayBefore = new ManualClock(new Date(Date.now() - 86_400_000));
    await expect(
      assertClockTrustedForCli({ stateDir, log: silentLogger, clock: dayBefore, certificatePem }),
    ).rejects.toMatchObject({
      code: "ERR_CLOCK_UNTRUSTED",
      message: expect.stringContaining("certificate time floor"),
    });
    await expect(
      assertClockTrustedForCli({
        stateDir,
        log: silentLogger,
        clock: new ManualClock(new Date()),
        certificatePem,
      }),
    ).resolves.toBeUndefined();
  });
});
