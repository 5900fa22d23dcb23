/**
 * Admission control for one registrar process: at most `maxInFlight` requests are handled at once;
 * the rest are shed at once with 429 + Retry-After, before their body is read, so a storm of
 * devices powering on together costs the registrar a few microseconds per refused request instead
 * of a queue whose latency grows without bound (every device would then time out and retry, making
 * the storm worse).
 *
 * The Retry-After is adaptive: over the last completed one-second window it is
 * ceil(shed / completed), i.e. roughly how many seconds of work are queued up outside, clamped to
 * [1, maxRetryAfterSeconds]. Clients add their own jitter on top (core/retry.ts).
 */
export interface AdmissionOptions {
  readonly maxInFlight: number;
  readonly maxRetryAfterSeconds: number;
  /** Monotonic milliseconds (injected clock). */
  readonly nowMs: () => number;
}

export interface AdmissionStats {
  readonly inFlight: number;
  readonly maxInFlight: number;
  /** Requests admitted since start. */
  readonly admitted: number;
  /** Requests shed (429) since start. */
  readonly shed: number;
  /** Highest number of requests in flight seen. */
  readonly peakInFlight: number;
}

const WINDOW_MS = 1000;

export class Admission {
  readonly #o: AdmissionOptions;
  #inFlight = 0;
  #admitted = 0;
  #shed = 0;
  #peak = 0;
  #windowStart: number;
  #windowShed = 0;
  #windowDone = 0;
  #lastShed = 0;
  #lastDone = 0;

  constructor(options: AdmissionOptions) {
    this.#o = options;
    this.#windowStart = options.nowMs();
  }

  /**
   * Admits a request (returns its release function, idempotent) or sheds it (returns the
   * Retry-After in whole seconds).
   */
  tryAdmit(): { readonly release: () => void } | { readonly retryAfterSeconds: number } {
    this.#roll();
    if (this.#inFlight >= this.#o.maxInFlight) {
      this.#shed++;
      this.#windowShed++;
      return { retryAfterSeconds: this.retryAfterSeconds() };
    }
    this.#inFlight++;
    this.#admitted++;
    if (this.#inFlight > this.#peak) this.#peak = this.#inFlight;
    let released = false;
    return {
      release: () => {
        if (released) return;
        released = true;
        this.#inFlight--;
        this.#roll();
        this.#windowDone++;
      },
    };
  }

  /** The Retry-After a request shed now would get. */
  retryAfterSeconds(): number {
    // Use the busier of the last full window and the current one (a storm's first second).
    const shed = Math.max(this.#lastShed, this.#windowShed);
    const done = Math.max(1, this.#lastDone, this.#windowDone);
    return Math.min(this.#o.maxRetryAfterSeconds, Math.max(1, Math.ceil(shed / done)));
  }

  stats(): AdmissionStats {
    return {
      inFlight: this.#inFlight,
      maxInFlight: this.#o.maxInFlight,
      admitted: this.#admitted,
      shed: this.#shed,
      peakInFlight: this.#peak,
    };
  }

  #roll(): void {
    const now = this.#o.nowMs();
    if (now - this.#windowStart < WINDOW_MS) return;
    // A window with no traffic at all after it resets the estimate.
    const idle = now - this.#windowStart >= 2 * WINDOW_MS;
    this.#lastShed = idle ? 0 : this.#windowShed;
    this.#lastDone = idle ? 0 : this.#windowDone;
    this.#windowShed = 0;
    this.#windowDone = 0;
    this.#windowStart = now;
  }
}
