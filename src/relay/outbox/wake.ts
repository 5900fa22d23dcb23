import type { Clock } from "../../core/clock.js";

/**
 * Per-sink wake-up state shared by the outbox implementations: the relay's pumps wait here for new
 * work (an append, a nack, `retryNow`) or for the next deferred message to become due.
 */
export interface WakeState {
  readonly waiters: Set<() => void>;
  /**
   * Work may have arrived since this sink's last lease began. A wait that starts after such a
   * wake-up must not sleep through it (with the outbox in a worker thread an append can commit
   * between a lease's answer and the next wait). Cleared by `lease`, set by `wake`.
   */
  pendingWake: boolean;
}

/** A shared abort reason: no DOMException built per wait (this runs on every idle pump turn). */
const WAIT_DONE = Object.freeze({ reason: "wait done" });

export function newWakeState(): WakeState {
  return { waiters: new Set(), pendingWake: true };
}

/** Marks work as arrived and releases every waiter. */
export function wake(s: WakeState): void {
  s.pendingWake = true;
  const ws = [...s.waiters];
  s.waiters.clear();
  for (const w of ws) w();
}

/**
 * Resolves on the next `wake`, when `nextDueMs` (monotonic; Infinity = none) passes, or when `signal`
 * aborts; at once if work arrived since the last lease. Leaves no waiter or listener behind.
 */
export function waitForWake(
  s: WakeState,
  clock: Clock,
  nextDueMs: number,
  signal?: AbortSignal,
): Promise<void> {
  if (signal?.aborted || s.pendingWake) return Promise.resolve();
  return new Promise<void>((resolve) => {
    let timerAbort: AbortController | undefined;
    const done = (): void => {
      s.waiters.delete(done);
      timerAbort?.abort(WAIT_DONE);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    s.waiters.add(done);
    signal?.addEventListener("abort", done, { once: true });
    if (Number.isFinite(nextDueMs)) {
      timerAbort = new AbortController();
      clock.sleep(nextDueMs - clock.monotonicMs(), timerAbort.signal).then(done, () => undefined);
    }
  });
}
