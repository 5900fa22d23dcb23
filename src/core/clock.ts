import { setTimeout as sleepTimer } from "node:timers/promises";

/**
 * Injected time. `now()` is wall-clock (for certificate/JWT validity), `monotonicMs()` is for
 * durations and timers (immune to clock steps), `sleep()` is abortable.
 */
export interface Clock {
  now(): Date;
  nowSeconds(): number;
  monotonicMs(): number;
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

export const systemClock: Clock = {
  now: () => new Date(),
  nowSeconds: () => Math.floor(Date.now() / 1000),
  monotonicMs: () => performance.now(),
  sleep: async (ms, signal) => {
    await sleepTimer(Math.max(0, ms), undefined, signal === undefined ? undefined : { signal });
  },
};

interface Sleeper {
  wakeAt: number;
  resolve: () => void;
  reject: (err: unknown) => void;
}

/** A clock for tests: time moves only when `advance()` is called; sleepers wake in order. */
export class ManualClock implements Clock {
  #wallMs: number;
  #monoMs = 0;
  #sleepers: Sleeper[] = [];

  constructor(start: Date = new Date("2026-01-01T00:00:00Z")) {
    this.#wallMs = start.getTime();
  }

  now(): Date {
    return new Date(this.#wallMs);
  }

  nowSeconds(): number {
    return Math.floor(this.#wallMs / 1000);
  }

  monotonicMs(): number {
    return this.#monoMs;
  }

  /** Steps the wall clock only (simulates NTP corrections or a wrong RTC at boot). */
  setWall(date: Date): void {
    this.#wallMs = date.getTime();
  }

  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(signal.reason);
    return new Promise<void>((resolve, reject) => {
      const onAbort = (): void => {
        this.#sleepers = this.#sleepers.filter((s) => s !== sleeper);
        reject(signal?.reason);
      };
      const sleeper: Sleeper = {
        wakeAt: this.#monoMs + Math.max(0, ms),
        // A woken sleeper lets go of the signal (a long-lived signal must not collect listeners).
        resolve: () => {
          signal?.removeEventListener("abort", onAbort);
          resolve();
        },
        reject,
      };
      this.#sleepers.push(sleeper);
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** Number of pending sleepers (lets tests wait until code under test is parked in a sleep). */
  get pendingSleepers(): number {
    return this.#sleepers.length;
  }

  /** Moves both clocks forward and wakes every sleeper that is due, yielding between wake-ups. */
  async advance(ms: number): Promise<void> {
    const target = this.#monoMs + ms;
    for (;;) {
      const due = this.#sleepers.filter((s) => s.wakeAt <= target).sort((a, b) => a.wakeAt - b.wakeAt)[0];
      if (due === undefined) break;
      this.#wallMs += due.wakeAt - this.#monoMs;
      this.#monoMs = due.wakeAt;
      this.#sleepers = this.#sleepers.filter((s) => s !== due);
      due.resolve();
      // Let the woken task run (and possibly schedule a new sleep) before the next one.
      for (let i = 0; i < 10; i++) await Promise.resolve();
    }
    this.#wallMs += target - this.#monoMs;
    this.#monoMs = target;
  }
}
