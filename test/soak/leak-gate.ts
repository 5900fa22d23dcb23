/**
 * The soak's memory leak gate, as a pure function of recorded series so that it can be tested on
 * synthetic and recorded data (test/unit/leak-gate.test.ts) as well as used on a live run.
 *
 * A series is post-GC readings (heapUsed or VmRSS, MiB) at times `t` (s) with the number of messages
 * the daemon had acknowledged by then. The gate calls it a leak only when all of these hold:
 *  1. trend: the Theil–Sen slope (median of all pairwise slopes; a GC that caught more in flight, or a
 *     scheduler stall on a loaded machine, moves a few pairs but not the median) exceeds the bound;
 *  2. sustained: late in the window memory still rises faster than half the bound (the floor from the
 *     middle third to the last, or the Theil–Sen slope of the later half: with a reading only every
 *     5-6 s on a busy machine one of them alone missed 1-5 % of seeded leaks); warm-up growth such as
 *     glibc arenas or JIT code flattens out, a leak does not;
 *  3. retained (when a reading after the load stopped and the outbox drained is given): what is still
 *     held then, above the window's starting level, exceeds the bound times the window's duration.
 *     A backlog that built up because a busy machine could not keep up is released by the drain;
 *     a leak is not.
 * Each condition alone has failed falsely on a busy machine (wall-time least squares: heap 1.21 vs
 * 0.5, RSS 4.34 vs 4 MiB/min, no leak behind it); a real leak meets all three. The slope per million
 * messages is reported too (a per-message leak keeps that figure whatever the machine's load).
 */
export interface MemoryPoint {
  /** Seconds since the load started. */
  readonly t: number;
  /** Messages acknowledged by then. */
  readonly messages: number;
  readonly mib: number;
}

export interface LeakGateOptions {
  /** Growth (MiB/min) above which the trend counts as a leak. */
  readonly boundMiBPerMin: number;
  /** Points before this (s) are warm-up and ignored. */
  readonly warmupS: number;
}

export interface LeakVerdict {
  readonly leak: boolean;
  /** Theil–Sen slope over the window (MiB/min). */
  readonly slopeMiBPerMin: number;
  /** Growth of the floor from the middle to the last third of the window (MiB/min). */
  readonly lateSlopeMiBPerMin: number;
  /** Theil–Sen slope against messages (MiB per million messages). */
  readonly slopeMiBPerMillionMessages: number;
  /** Held after the drain above the window's start (MiB), when a drained reading was given. */
  readonly retainedMiB: number | undefined;
  readonly retainedBoundMiB: number;
  readonly points: number;
  /** Which conditions held, for the log. */
  readonly why: string;
}

/** Least-squares slope of y over x (the old gate; still printed for comparison). */
export function leastSquares(points: readonly { readonly x: number; readonly y: number }[]): number {
  const n = points.length;
  const mx = points.reduce((s, p) => s + p.x, 0) / n;
  const my = points.reduce((s, p) => s + p.y, 0) / n;
  let num = 0;
  let den = 0;
  for (const p of points) {
    num += (p.x - mx) * (p.y - my);
    den += (p.x - mx) ** 2;
  }
  return num / den;
}

/** Theil–Sen slope: the median of the slopes of all pairs of points (pairs with equal x are skipped). */
export function theilSen(points: readonly { readonly x: number; readonly y: number }[]): number {
  const slopes: number[] = [];
  for (let i = 0; i < points.length; i++) {
    for (let j = i + 1; j < points.length; j++) {
      const a = points[i] as { x: number; y: number };
      const b = points[j] as { x: number; y: number };
      if (b.x !== a.x) slopes.push((b.y - a.y) / (b.x - a.x));
    }
  }
  if (slopes.length === 0) return 0;
  slopes.sort((u, v) => u - v);
  const m = slopes.length >> 1;
  return slopes.length % 2 === 1
    ? (slopes[m] as number)
    : ((slopes[m - 1] as number) + (slopes[m] as number)) / 2;
}

/**
 * Growth late in the window (MiB/min): the larger of the floor's rise from the middle third to the
 * last third and the Theil–Sen slope of the later half. Readings only ever add what a GC caught in
 * flight, so the lowest reading of a third is its level: a leak lifts it to the end, warm-up growth
 * has flattened by then.
 */
function lateFloorSlope(win: readonly MemoryPoint[]): number {
  if (win.length < 6) return 0;
  const t0 = (win[0] as MemoryPoint).t;
  const span = (win[win.length - 1] as MemoryPoint).t - t0;
  const third = (k: number): MemoryPoint[] =>
    win.filter((p) => Math.min(2, Math.floor(((p.t - t0) / span) * 3)) === k);
  const floor = (pts: readonly MemoryPoint[]): number => Math.min(...pts.map((p) => p.mib));
  const centre = (pts: readonly MemoryPoint[]): number => pts.reduce((sum, p) => sum + p.t, 0) / pts.length;
  const mid = third(1);
  const last = third(2);
  const floors = ((floor(last) - floor(mid)) / (centre(last) - centre(mid))) * 60;
  // With few readings per third (a busy machine), one low reading moves a floor: the Theil–Sen slope
  // of the later half is the second witness, and either one showing the growth is enough (the trend
  // and, for the heap, the drain still have to agree).
  const lateHalf = theilSen(win.filter((p) => p.t - t0 >= span / 2).map((p) => ({ x: p.t, y: p.mib }))) * 60;
  return Math.max(floors, lateHalf);
}

/**
 * Judges one series. `drainedMiB` is a post-GC reading taken after the load stopped and the outbox
 * drained (omit it for RSS, which the allocator does not hand back).
 */
export function leakGate(
  series: readonly MemoryPoint[],
  options: LeakGateOptions,
  drainedMiB?: number,
): LeakVerdict {
  const win = series.filter((p) => p.t >= options.warmupS);
  const bound = options.boundMiBPerMin;
  const perMin = (pts: readonly MemoryPoint[]): number =>
    theilSen(pts.map((p) => ({ x: p.t, y: p.mib }))) * 60;
  const slope = perMin(win);
  const late = lateFloorSlope(win);
  const perMsg = theilSen(win.map((p) => ({ x: p.messages, y: p.mib }))) * 1e6;
  const minutes =
    win.length < 2 ? 0 : ((win[win.length - 1] as MemoryPoint).t - (win[0] as MemoryPoint).t) / 60;
  // The floor at the start: readings only ever add what a GC caught in flight, so the lowest is the level.
  const start = Math.min(...win.slice(0, 4).map((p) => p.mib));
  const retained = drainedMiB === undefined ? undefined : drainedMiB - start;
  const retainedBound = bound * minutes;
  const trend = slope > bound;
  // Half the bound: the floor of ~9 readings is itself noisy; warm-up growth has fallen well below it.
  const sustained = late > bound / 2;
  const kept = retained === undefined || retained > retainedBound;
  const why =
    `trend ${slope.toFixed(2)} ${trend ? ">" : "<="} ${bound} MiB/min; ` +
    `late floor ${late.toFixed(2)} ${sustained ? ">" : "<="} ${bound / 2}; ` +
    (retained === undefined
      ? "no drained reading"
      : `retained after drain ${retained.toFixed(2)} ${kept ? ">" : "<="} ${retainedBound.toFixed(2)} MiB`) +
    `; ${perMsg.toFixed(2)} MiB per million messages`;
  return {
    leak: win.length >= 4 && trend && sustained && kept,
    slopeMiBPerMin: slope,
    lateSlopeMiBPerMin: late,
    slopeMiBPerMillionMessages: perMsg,
    retainedMiB: retained,
    retainedBoundMiB: retainedBound,
    points: win.length,
    why,
  };
}
