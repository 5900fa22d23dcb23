import { describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { M2mError } from "../../src/core/errors.js";
import { silentLogger } from "../../src/core/log.js";
import { HealthBoard, instrumentKeyProvider, OperationWatch } from "../../src/daemon/health.js";
import { Lifecycle } from "../../src/daemon/lifecycle.js";
import { AgentMetrics } from "../../src/daemon/metrics.js";
import { FakeKeyProvider } from "../../src/keys/fake/fake-provider.js";
import type { KeyProvider } from "../../src/keys/key-provider.js";

describe("HealthBoard drives degraded/recover", () => {
  it("any reason degrades with all reasons in the status; the last one clearing recovers", () => {
    const lc = new Lifecycle(silentLogger);
    const board = new HealthBoard(lc);
    board.set("clock", "ERR_CLOCK_UNTRUSTED: untrusted clock"); // before running: remembered, not applied
    expect(lc.state.name).toBe("starting");
    lc.dispatch({ type: "ready" });
    board.apply();
    expect(lc.state).toEqual({ name: "degraded", reason: "clock: ERR_CLOCK_UNTRUSTED: untrusted clock" });
    board.set("relay.mqtt", "ERR_MQTT_CONNECT: broker unreachable");
    expect(lc.state).toEqual({
      name: "degraded",
      reason: "clock: ERR_CLOCK_UNTRUSTED: untrusted clock; relay.mqtt: ERR_MQTT_CONNECT: broker unreachable",
    });
    expect(board.codes).toEqual({ clock: "ERR_CLOCK_UNTRUSTED", "relay.mqtt": "ERR_MQTT_CONNECT" });
    board.set("clock", undefined);
    expect(lc.state).toEqual({
      name: "degraded",
      reason: "relay.mqtt: ERR_MQTT_CONNECT: broker unreachable",
    });
    board.set("relay.mqtt", undefined);
    expect(lc.state.name).toBe("running");
    expect(board.reasons).toEqual({});
  });

  it("does not touch unprovisioned or stopping states", () => {
    const lc = new Lifecycle(silentLogger);
    const board = new HealthBoard(lc);
    lc.dispatch({ type: "unprovisioned", reason: "no key" });
    board.set("api", "ERR_API_SOCKET_IN_USE: socket in use");
    expect(lc.state.name).toBe("unprovisioned");
  });
});

describe("OperationWatch (hang detection for the watchdog)", () => {
  it("reports an operation pending past the deadline, and forgets it once done", async () => {
    const clock = new ManualClock();
    const watch = new OperationWatch(clock, 30_000);
    const done = watch.start("tpm.sign");
    await clock.advance(29_000);
    expect(watch.hung()).toBeUndefined();
    await clock.advance(2_000);
    expect(watch.hung()).toEqual({ op: "tpm.sign", pendingMs: 31_000 });
    done();
    expect(watch.hung()).toBeUndefined();
  });
});

describe("instrumentKeyProvider", () => {
  it("times operations into the histogram and counts failures by code, behaviour unchanged", async () => {
    const clock = new ManualClock();
    const metrics = new AgentMetrics("t");
    const watch = new OperationWatch(clock, 1000);
    const inner = new FakeKeyProvider();
    const p = instrumentKeyProvider(inner, metrics, watch, clock);
    await expect(p.open()).rejects.toMatchObject({ code: "ERR_KEY_NOT_FOUND" });
    const info = await p.createOrOpen();
    expect((await p.sign(new Uint8Array([1, 2, 3]))).length).toBe(64);
    expect(info.created).toBe(true);
    const text = metrics.registry.render();
    expect(text).toContain(
      'm2m_agent_key_operation_errors_total{backend="fake",op="open",code="ERR_KEY_NOT_FOUND"} 1',
    );
    expect(text).toContain('m2m_agent_key_operation_duration_seconds_count{backend="fake",op="sign"} 1');
    expect(text).toContain(
      'm2m_agent_key_operation_duration_seconds_count{backend="fake",op="create_or_open"} 1',
    );
  });

  it("a stuck backend call shows up as a hang while pending", async () => {
    const clock = new ManualClock();
    const watch = new OperationWatch(clock, 1000);
    let release: () => void = () => undefined;
    const fake = new FakeKeyProvider();
    const stuck: KeyProvider = {
      kind: "tpm",
      createOrOpen: () => fake.createOrOpen(),
      open: () => fake.open(),
      evidence: () => fake.evidence(),
      destroy: () => fake.destroy(),
      health: () => fake.health(),
      sign: () =>
        new Promise((_, reject) => {
          release = () => reject(new M2mError("ERR_TPM_TIMEOUT", "transient", "timeout"));
        }),
      close: async () => undefined,
    };
    const p = instrumentKeyProvider(stuck, new AgentMetrics("t"), watch, clock);
    const pending = p.sign(new Uint8Array([1]));
    await clock.advance(1500);
    expect(watch.hung()?.op).toBe("tpm.sign");
    release();
    await expect(pending).rejects.toMatchObject({ code: "ERR_TPM_TIMEOUT" });
    expect(watch.hung()).toBeUndefined();
  });
});
