import { describe, expect, it } from "vitest";
import { ManualClock } from "../../src/core/clock.js";
import { M2mError } from "../../src/core/errors.js";
import { defaultRetryPolicy, parseRetryAfter, retryDelay, withRetry } from "../../src/core/retry.js";
import { Admission } from "../../src/registrar/http/admission.js";

describe("parseRetryAfter", () => {
  it("reads delta-seconds and HTTP-dates, ignores garbage", () => {
    const now = Date.parse("2026-01-01T00:00:00Z");
    expect(parseRetryAfter("3", now)).toBe(3000);
    expect(parseRetryAfter(" 0 ", now)).toBe(0);
    expect(parseRetryAfter("Thu, 01 Jan 2026 00:00:10 GMT", now)).toBe(10_000);
    expect(parseRetryAfter("Wed, 31 Dec 2025 23:59:00 GMT", now)).toBe(0);
    expect(parseRetryAfter("soon", now)).toBeUndefined();
    expect(parseRetryAfter("-5", now)).toBeUndefined();
    expect(parseRetryAfter(null, now)).toBeUndefined();
  });
});

describe("retryDelay", () => {
  it("never comes back before Retry-After and spreads up to the jitter fraction above it", () => {
    const p = { ...defaultRetryPolicy, retryAfterJitter: 0.5 };
    expect(retryDelay(p, 1, 2000, () => 0)).toBe(2000);
    expect(retryDelay(p, 1, 2000, () => 0.999999)).toBe(2999);
    const seen = new Set<number>();
    for (let i = 0; i < 200; i++) {
      const d = retryDelay(p, 1, 2000);
      expect(d).toBeGreaterThanOrEqual(2000);
      expect(d).toBeLessThan(3000);
      seen.add(Math.floor(d / 100));
    }
    // A fleet told "2 s" must not come back in the same instant.
    expect(seen.size).toBeGreaterThan(5);
  });

  it("caps a hostile Retry-After, jitter included", () => {
    const p = { ...defaultRetryPolicy, maxRetryAfterMs: 10_000, retryAfterJitter: 0.2 };
    expect(retryDelay(p, 1, 86_400_000, () => 0.999999)).toBeLessThan(12_000);
  });

  it("falls back to full-jitter backoff without a Retry-After (or with 0)", () => {
    expect(retryDelay(defaultRetryPolicy, 3, undefined, () => 0.5)).toBe(400);
    expect(retryDelay(defaultRetryPolicy, 3, 0, () => 0.5)).toBe(400);
  });

  it("withRetry sleeps Retry-After plus jitter", async () => {
    const clock = new ManualClock();
    const delays: number[] = [];
    let calls = 0;
    const p = withRetry(
      { ...defaultRetryPolicy, retryAfterJitter: 0.5 },
      async () => {
        calls++;
        if (calls === 1)
          throw new M2mError("ERR_BUSY", "transient", "busy", { details: { retryAfterMs: 1000 } });
        return calls;
      },
      { clock, random: () => 0.5, onRetry: (i) => delays.push(i.delayMs) },
    );
    while (clock.pendingSleepers === 0) await new Promise((r) => setImmediate(r));
    await clock.advance(1249);
    expect(calls).toBe(1);
    await clock.advance(1);
    await expect(p).resolves.toBe(2);
    expect(delays).toEqual([1250]);
  });
});

describe("Admission", () => {
  it("admits up to the limit, sheds the rest, and admits again after a release", () => {
    let now = 0;
    const a = new Admission({ maxInFlight: 2, maxRetryAfterSeconds: 30, nowMs: () => now });
    const t1 = a.tryAdmit();
    const t2 = a.tryAdmit();
    const t3 = a.tryAdmit();
    expect("release" in t1 && "release" in t2).toBe(true);
    expect(t3).toEqual({ retryAfterSeconds: 1 });
    if (!("release" in t1)) throw new Error("unreachable");
    t1.release();
    t1.release(); // idempotent: a response can both finish and close
    expect(a.stats()).toMatchObject({ inFlight: 1, admitted: 2, shed: 1, peakInFlight: 2 });
    expect("release" in a.tryAdmit()).toBe(true);
    now = 5;
  });

  it("Retry-After grows with the ratio of shed to completed requests, within the cap", () => {
    let now = 0;
    const a = new Admission({ maxInFlight: 1, maxRetryAfterSeconds: 7, nowMs: () => now });
    // One request completes per window while 20 are shed: about 20 s of work waits outside.
    const held = a.tryAdmit();
    for (let i = 0; i < 20; i++) a.tryAdmit();
    if ("release" in held) held.release();
    now = 1000;
    const next = a.tryAdmit();
    if ("release" in next) next.release();
    expect(a.retryAfterSeconds()).toBe(7);
    // After two idle windows the estimate resets.
    now = 4000;
    const idle = a.tryAdmit();
    if ("release" in idle) idle.release();
    expect(a.retryAfterSeconds()).toBe(1);
  });
});
