import { describe, expect, it } from "vitest";
import { leakGate, leastSquares, type MemoryPoint, theilSen } from "../soak/leak-gate.js";

/** Deterministic PRNG (mulberry32): the same seeds every run. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

const GATE = { boundMiBPerMin: 0.5, warmupS: 20 };
const RATE = 1500; // msg/s offered by the soak

/**
 * A post-GC heap series like the soak records: a reading every 2.5 s for 90 s, a 30 MiB floor, plus
 * whatever the GC caught in flight (0 to `spikeMiB`, occasionally all of it), plus `level(t)`.
 */
function series(seed: number, level: (t: number) => number, spikeMiB = 1.5, rate = RATE): MemoryPoint[] {
  const r = rng(seed);
  const out: MemoryPoint[] = [];
  for (let t = 2.5; t <= 90; t += 2.5) {
    const inFlight = r() < 0.15 ? spikeMiB : r() * spikeMiB * 0.3;
    out.push({ t, messages: Math.round(t * rate), mib: 30 + level(t) + inFlight });
  }
  return out;
}

/** The old gate: least squares over wall time (MiB/min). */
function leastSquaresPerMin(pts: readonly MemoryPoint[]): number {
  return leastSquares(pts.filter((p) => p.t >= GATE.warmupS).map((p) => ({ x: p.t, y: p.mib }))) * 60;
}

const SEEDS = Array.from({ length: 200 }, (_, i) => i + 1);

describe("soak leak gate (pure analysis of recorded series)", () => {
  it("Theil–Sen ignores a minority of outliers that swing least squares", () => {
    const pts = Array.from({ length: 20 }, (_, i) => ({ x: i, y: i === 18 || i === 19 ? 50 : 2 * i }));
    expect(theilSen(pts)).toBeCloseTo(2, 5);
  });

  it("no leak (flat floor, in-flight spikes): never flagged over 200 seeded runs", () => {
    for (const seed of SEEDS) {
      const v = leakGate(
        series(seed, () => 0),
        GATE,
        30.3,
      );
      expect(v.leak, `seed ${seed}: ${v.why}`).toBe(false);
    }
  });

  it("a 1.7 MiB/min leak (the one the soak found) is flagged in every one of 200 seeded runs", () => {
    for (const seed of SEEDS) {
      const leak = (t: number): number => (1.7 * t) / 60;
      const pts = series(seed, leak);
      const v = leakGate(pts, GATE, 30 + leak(95) + 0.2);
      expect(v.leak, `seed ${seed}: ${v.why}`).toBe(true);
      // Per message: 1.7 MiB/min at 1.5k msg/s is ~18.9 MiB per million messages.
      expect(v.slopeMiBPerMillionMessages).toBeGreaterThan(12);
    }
  });

  it("the same leak on a loaded machine (half the throughput, bigger spikes) is still flagged", () => {
    for (const seed of SEEDS) {
      const leak = (t: number): number => (1.7 * t) / 60;
      const v = leakGate(series(seed, leak, 3, RATE / 2), GATE, 30 + leak(95));
      expect(v.leak, `seed ${seed}: ${v.why}`).toBe(true);
    }
  });

  it("a busy machine's backlog (heap rising 1.21 MiB/min during the load, released by the drain) is not a leak", () => {
    for (const seed of SEEDS) {
      const backlog = (t: number): number => (1.21 * t) / 60;
      const v = leakGate(series(seed, backlog, 3, RATE / 2), GATE, 30.4); // drained: floor + JIT code
      expect(v.leak, `seed ${seed}: ${v.why}`).toBe(false);
    }
    // Without spikes, both the old gate (least squares) and the trend condition see the rise.
    const clean = series(1, (t) => (1.21 * t) / 60, 0);
    expect(leastSquaresPerMin(clean)).toBeGreaterThan(GATE.boundMiBPerMin);
    expect(leakGate(clean, GATE, 30.4).slopeMiBPerMin).toBeGreaterThan(GATE.boundMiBPerMin);
  });

  it("warm-up growth that flattens (glibc arenas on a busy machine) is not a leak, though its least squares exceed the bound", () => {
    const rss = { boundMiBPerMin: 4, warmupS: 20 };
    for (const seed of SEEDS) {
      // 113 MiB rising by 24 MiB with a 15 s time constant: over 4 MiB/min least squares over 20-90 s.
      const pts = series(seed, (t) => 83 + 24 * (1 - Math.exp(-t / 15)), 0.6);
      const v = leakGate(pts, rss);
      expect(v.leak, `seed ${seed}: ${v.why}`).toBe(false);
    }
    const clean = series(1, (t) => 83 + 24 * (1 - Math.exp(-t / 15)), 0);
    expect(leastSquaresPerMin(clean)).toBeGreaterThan(rss.boundMiBPerMin); // the old gate failed here
  });

  it("a leak that keeps growing in RSS (5 MiB/min, sustained) is flagged without a drained reading", () => {
    const v = leakGate(
      series(7, (t) => 83 + (5 * t) / 60, 1),
      { boundMiBPerMin: 4, warmupS: 20 },
    );
    expect(v.leak, v.why).toBe(true);
  });

  it("sparse readings on a very busy machine (one per ~5.5 s, as at load average 40) still separate leak from no leak", () => {
    // The soak's GC loop falls behind when the test process gets little CPU (14-18 readings in 90 s),
    // so the soak runs on until it has 24 readings after the warm-up (MIN_READINGS).
    const sparse = (seed: number, level: (t: number) => number): MemoryPoint[] => {
      const r = rng(seed);
      const out: MemoryPoint[] = [];
      for (let t = 4 + r() * 2; out.filter((p) => p.t >= GATE.warmupS).length < 24; t += 4.5 + r() * 2) {
        const inFlight = r() < 0.2 ? 2.5 : r() * 0.8;
        out.push({ t, messages: Math.round(t * 200), mib: 34 + level(t) + inFlight });
      }
      return out;
    };
    for (const seed of SEEDS) {
      const quiet = leakGate(
        sparse(seed, () => 0),
        GATE,
        34.4,
      );
      expect(quiet.leak, `seed ${seed} (no leak): ${quiet.why}`).toBe(false);
      const leak = (t: number): number => (1.7 * t) / 60;
      const pts = sparse(seed, leak);
      const leaking = leakGate(pts, GATE, 34 + leak((pts.at(-1)?.t ?? 0) + 10));
      expect(leaking.leak, `seed ${seed} (1.7 MiB/min): ${leaking.why}`).toBe(true);
    }
  });

  it("the RSS series recorded on a loaded machine with the backlog held (load average 38) is not a leak", () => {
    // daemon-soak.test.ts, 2026-12-06 23:23, BACKLOG_CAP 2,000: post-GC VmRSS every ~5.5 s.
    const mib = [
      111.9, 110.9, 111.3, 110.6, 110.9, 111.9, 112.9, 112.8, 112.3, 111.3, 112.0, 112.6, 112.1, 113.0, 112.5,
      112.7, 112.7,
    ];
    const pts = mib.map((m, i) => ({ t: 5 + i * 5.5, messages: (5 + i * 5.5) * 198, mib: m }));
    const v = leakGate(pts, { boundMiBPerMin: 4, warmupS: 20 });
    expect(v.leak, v.why).toBe(false);
    // The same run without the cap (backlog to 25,000): a real rise, which the gate rightly reports;
    // the soak holds the producer back so that the gate judges a steady state (see BACKLOG_CAP).
    const unbounded = [
      110.0, 114.0, 116.6, 117.3, 118.9, 119.1, 119.1, 117.8, 121.1, 122.8, 122.6, 122.8, 124.1, 124.5, 124.6,
      124.3,
    ].map((m, i) => ({ t: 5 + i * 5.6, messages: (5 + i * 5.6) * 300, mib: m }));
    expect(leakGate(unbounded, { boundMiBPerMin: 4, warmupS: 20 }).slopeMiBPerMin).toBeGreaterThan(4);
  });

  it("too few points never pass as a verdict of leak", () => {
    expect(leakGate(series(1, (t) => t).slice(0, 9), GATE).leak).toBe(false);
  });
});
