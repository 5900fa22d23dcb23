import { M2mError } from "../../core/errors.js";

/**
 * Remembers one-time identifiers (assertion / proof `jti`) until they expire. Bounded: when full,
 * expired entries are swept; if it is still full the request is refused (fail closed) rather than
 * forgetting a live jti, which would reopen a replay window.
 */
export class ReplayCache {
  readonly #seen = new Map<string, number>();
  readonly #max: number;

  constructor(maxEntries = 100_000) {
    this.#max = maxEntries;
  }

  get size(): number {
    return this.#seen.size;
  }

  /**
   * Records `key` as used until `expiresAtSec`. Returns false when it was already used (replay).
   * Synchronous on purpose: check-and-set cannot interleave with another request.
   * @throws ERR_REPLAY_CACHE_FULL (transient) when the cache is full of live entries.
   */
  checkAndRecord(key: string, expiresAtSec: number, nowSec: number): boolean {
    const prev = this.#seen.get(key);
    if (prev !== undefined && prev >= nowSec) return false;
    if (this.#seen.size >= this.#max) this.sweep(nowSec);
    if (this.#seen.size >= this.#max) {
      throw new M2mError("ERR_REPLAY_CACHE_FULL", "transient", "replay cache is full", {
        details: { retryAfterMs: 5000 },
      });
    }
    this.#seen.set(key, expiresAtSec);
    return true;
  }

  /** Whether `key` is recorded and still live (a read-only pre-check; record with checkAndRecord). */
  has(key: string, nowSec: number): boolean {
    const exp = this.#seen.get(key);
    return exp !== undefined && exp >= nowSec;
  }

  sweep(nowSec: number): void {
    for (const [k, exp] of this.#seen) if (exp < nowSec) this.#seen.delete(k);
  }
}
