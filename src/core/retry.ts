import type { Clock } from "./clock.js";
import { asM2mError, M2mError } from "./errors.js";

/**
 * The one retry policy of the project (HTTP, MQTT reconnect, TPM transient codes, HSM session
 * re-open). Exponential backoff with full jitter, a cap, an overall deadline, and a capped
 * server-provided Retry-After.
 */
export interface RetryPolicy {
  readonly baseMs: number;
  readonly factor: number;
  readonly capMs: number;
  /** Give up after this much monotonic time (ms) since the first attempt. */
  readonly deadlineMs: number;
  /** Give up after this many attempts (including the first). */
  readonly maxAttempts: number;
  /** A Retry-After longer than this is clamped (a hostile server cannot park us for a day). */
  readonly maxRetryAfterMs: number;
  /**
   * Spread added on top of a server's Retry-After, as a fraction of it: 0.5 waits a uniform
   * [RA, 1.5·RA). A shedding server tells a whole fleet "2 s"; without the spread every device
   * would come back in the same millisecond and be shed again. Default 0.5.
   */
  readonly retryAfterJitter?: number;
  /** Which failures are worth another attempt. Default: M2mError with retry === "transient". */
  readonly retryOn?: (err: unknown) => boolean;
}

export const defaultRetryPolicy: RetryPolicy = {
  baseMs: 200,
  factor: 2,
  capMs: 30_000,
  deadlineMs: 120_000,
  maxAttempts: 8,
  maxRetryAfterMs: 300_000,
};

export function isTransient(err: unknown): boolean {
  return err instanceof M2mError && err.retry === "transient";
}

/** Delay before attempt `attempt` (1-based count of failures so far), full jitter in [0, min(cap, base·factor^n)). */
export function backoffDelay(
  policy: RetryPolicy,
  failures: number,
  random: () => number = Math.random,
): number {
  const ceiling = Math.min(policy.capMs, policy.baseMs * policy.factor ** Math.max(0, failures - 1));
  return Math.floor(random() * ceiling);
}

/**
 * Parses an HTTP Retry-After value (delta-seconds or an HTTP-date, RFC 9110 §10.2.3) into ms from
 * `nowMs`; undefined when absent or unparsable. Every HTTP client of the agent reads it through
 * this one function and passes it on as `details.retryAfterMs`, which {@link withRetry} honours.
 */
export function parseRetryAfter(value: string | null | undefined, nowMs: number): number | undefined {
  if (value === null || value === undefined) return undefined;
  const v = value.trim();
  if (/^\d{1,9}$/.test(v)) return Number(v) * 1000;
  // HTTP-dates start with a day name; anything else ("-5", "2") is not one, whatever Date.parse says.
  if (!/^[A-Za-z]{3}/.test(v)) return undefined;
  const at = Date.parse(v);
  return Number.isNaN(at) ? undefined : Math.max(0, at - nowMs);
}

/**
 * The wait before the next attempt: a server's Retry-After (capped at `maxRetryAfterMs`) plus a
 * jitter of up to `retryAfterJitter` of it, else exponential backoff with full jitter.
 */
export function retryDelay(
  policy: RetryPolicy,
  failures: number,
  retryAfterMs: number | undefined,
  random: () => number = Math.random,
): number {
  if (retryAfterMs === undefined || retryAfterMs <= 0) return backoffDelay(policy, failures, random);
  const capped = Math.min(retryAfterMs, policy.maxRetryAfterMs);
  return capped + Math.floor(random() * capped * (policy.retryAfterJitter ?? 0.5));
}

/** Reads a `retryAfterMs` detail from an M2mError (set by HTTP/MQTT layers from Retry-After). */
function retryAfterOf(err: unknown): number | undefined {
  if (err instanceof M2mError) {
    const v = err.details.retryAfterMs;
    if (typeof v === "number" && Number.isFinite(v) && v >= 0) return v;
  }
  return undefined;
}

export interface RetryOptions {
  readonly clock: Clock;
  readonly signal?: AbortSignal;
  readonly random?: () => number;
  readonly onRetry?: (info: { attempt: number; delayMs: number; error: M2mError }) => void;
}

/**
 * Runs `fn` until it succeeds, fails with a non-retryable error, or the policy is exhausted.
 * @throws the last error (as M2mError) when giving up; ERR_ABORTED when the signal fires.
 */
export async function withRetry<T>(
  policy: RetryPolicy,
  fn: (attempt: number) => Promise<T>,
  options: RetryOptions,
): Promise<T> {
  const retryOn = policy.retryOn ?? isTransient;
  const started = options.clock.monotonicMs();
  for (let attempt = 1; ; attempt++) {
    if (options.signal?.aborted) throw new M2mError("ERR_ABORTED", "permanent", "operation aborted");
    try {
      return await fn(attempt);
    } catch (err) {
      const error = asM2mError(err);
      if (!retryOn(err) || attempt >= policy.maxAttempts) throw error;
      const delayMs = retryDelay(policy, attempt, retryAfterOf(err), options.random);
      if (options.clock.monotonicMs() - started + delayMs > policy.deadlineMs) throw error;
      options.onRetry?.({ attempt, delayMs, error });
      await options.clock.sleep(delayMs, options.signal);
    }
  }
}
