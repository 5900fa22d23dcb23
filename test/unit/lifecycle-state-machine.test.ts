import { describe, expect, it } from "vitest";
import { isM2mError } from "../../src/core/errors.js";
import { createLogger } from "../../src/core/log.js";
import {
  describeState,
  Lifecycle,
  type LifecycleEvent,
  STATE_NAMES,
  type State,
  transition,
} from "../../src/daemon/lifecycle.js";

const S = {
  starting: { name: "starting" },
  unprovisioned: { name: "unprovisioned", reason: "no identity" },
  enrolling: { name: "enrolling" },
  running: { name: "running" },
  degraded: { name: "degraded", reason: "broker down" },
  reloadingRunning: { name: "reloading", resume: { name: "running" } },
  stopping: { name: "stopping", reason: "SIGTERM" },
  stopped: { name: "stopped" },
} as const satisfies Record<string, State>;

const E = {
  unprovisioned: { type: "unprovisioned", reason: "no identity" },
  enroll: { type: "enroll" },
  ready: { type: "ready" },
  degrade: { type: "degrade", reason: "token refresh failing" },
  recover: { type: "recover" },
  reload: { type: "reload" },
  reloaded: { type: "reloaded" },
  stop: { type: "stop", reason: "SIGTERM" },
  stopped: { type: "stopped" },
} as const satisfies Record<string, LifecycleEvent>;

function code(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    return isM2mError(err) ? err.code : "other";
  }
  return undefined;
}

describe("lifecycle transition()", () => {
  it("walks the happy path starting → enrolling → running → degraded → running → stopping → stopped", () => {
    let s: State = S.starting;
    s = transition(s, E.enroll);
    expect(s.name).toBe("enrolling");
    s = transition(s, E.ready);
    expect(s.name).toBe("running");
    s = transition(s, E.degrade);
    expect(s).toEqual({ name: "degraded", reason: "token refresh failing" });
    s = transition(s, E.recover);
    expect(s.name).toBe("running");
    s = transition(s, E.stop);
    expect(s).toEqual({ name: "stopping", reason: "SIGTERM" });
    s = transition(s, E.stopped);
    expect(s.name).toBe("stopped");
  });

  it("reloading returns to the state it came from, including a degraded reason", () => {
    const r = transition(S.degraded, E.reload);
    expect(r).toEqual({ name: "reloading", resume: S.degraded });
    expect(transition(r, E.reloaded)).toEqual(S.degraded);
    expect(transition(transition(S.running, E.reload), E.reloaded)).toEqual(S.running);
    // A fault during the reload is kept for afterwards.
    expect(transition(transition(S.reloadingRunning, E.degrade), E.reloaded)).toEqual({
      name: "degraded",
      reason: "token refresh failing",
    });
  });

  it("stop is legal from every live state, illegal once stopping", () => {
    for (const s of [S.starting, S.unprovisioned, S.enrolling, S.running, S.degraded, S.reloadingRunning]) {
      expect(transition(s, E.stop).name).toBe("stopping");
    }
    expect(code(() => transition(S.stopping, E.stop))).toBe("ERR_LIFECYCLE");
    expect(code(() => transition(S.stopped, E.stop))).toBe("ERR_LIFECYCLE");
  });

  it("illegal transitions throw ERR_LIFECYCLE", () => {
    const illegal: [State, LifecycleEvent][] = [
      [S.starting, E.recover],
      [S.starting, E.reload],
      [S.enrolling, E.reload],
      [S.running, E.enroll],
      [S.running, E.reloaded],
      [S.stopping, E.ready],
      [S.stopped, E.ready],
      [S.reloadingRunning, E.reload],
      [S.unprovisioned, E.degrade],
    ];
    for (const [s, e] of illegal)
      expect(
        code(() => transition(s, e)),
        `${s.name} + ${e.type}`,
      ).toBe("ERR_LIFECYCLE");
  });

  it("every (state, event) pair either yields a known state or throws ERR_LIFECYCLE (total function)", () => {
    const states = Object.values(S) as State[];
    const events = Object.values(E) as LifecycleEvent[];
    for (const s of states)
      for (const e of events) {
        try {
          const next = transition(s, e);
          expect(STATE_NAMES).toContain(next.name);
        } catch (err) {
          expect(isM2mError(err, "ERR_LIFECYCLE")).toBe(true);
        }
      }
  });

  it("describeState carries the reason", () => {
    expect(describeState(S.degraded)).toBe("degraded: broker down");
    expect(describeState(S.running)).toBe("running");
  });
});

describe("Lifecycle holder", () => {
  it("logs and notifies listeners on every change, not on no-op events; illegal leaves state unchanged", () => {
    const lines: string[] = [];
    const lc = new Lifecycle(createLogger({ write: (l) => lines.push(l) }));
    const seen: string[] = [];
    lc.onTransition(({ from, to, event }) => seen.push(`${from.name}-${event.type}->${to.name}`));
    lc.dispatch(E.ready);
    lc.dispatch(E.ready); // running + ready = no change
    lc.dispatch(E.degrade);
    expect(() => lc.dispatch(E.enroll)).not.toThrow(); // degraded → enrolling is legal (re-enrol)
    expect(() => lc.dispatch(E.reloaded)).toThrow(/illegal lifecycle transition/);
    expect(lc.state.name).toBe("enrolling");
    expect(lc.tryDispatch(E.reload)).toBe(false);
    expect(seen).toEqual([
      "starting-ready->running",
      "running-degrade->degraded",
      "degraded-enroll->enrolling",
    ]);
    const logged = lines.map((l) => JSON.parse(l) as { msg: string; from: string; to: string });
    expect(logged.filter((l) => l.msg === "lifecycle transition").map((l) => `${l.from}>${l.to}`)).toEqual([
      "starting>running",
      "running>degraded",
      "degraded>enrolling",
    ]);
  });

  it("a throwing listener does not break the transition", () => {
    const lc = new Lifecycle(createLogger({ write: () => undefined }));
    lc.onTransition(() => {
      throw new Error("boom");
    });
    expect(lc.dispatch(E.ready).name).toBe("running");
  });
});
