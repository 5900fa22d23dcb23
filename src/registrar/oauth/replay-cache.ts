import { M2mError } from "../../core/errors.js";

/**
 * Where one-time identifiers (assertion / proof `jti`) are remembered. `ReplayCache` keeps them in this
 * process (tests, single-process tools); `StoreReplayGuard` keeps them in the registrar store, so they
 * survive restarts and one jti is accepted once across every replica.
 */
export interface ReplayGuard {
  /** Records `key` as used until `expiresAtSec`; false when it was already used (replay). */
  checkAndRecord(key: string, expiresAtSec: number, nowSec: number): boolean | Promise<boolean>;
  /** Whether `key` is recorded and still live (read-only pre-check). */
  has(key: string, nowSec: number): boolean | Promise<boolean>;
}

/** The store half StoreReplayGuard needs (RegistrarStore satisfies it). */
export interface OnceKeyStore {
  consumeOnce(key: string, expiresAt: Date, now: Date): Promise<boolean>;
  isConsumed(key: string, now: Date): Promise<boolean>;
}

/** jti replay protection in the shared store: atomic in the database, durable across restarts. */
export class StoreReplayGuard implements ReplayGuard {
  readonly #store: OnceKeyStore;
  readonly #prefix: string;

  /** `prefix` separates uses that must not collide (token endpoint vs a resource server). */
  constructor(store: OnceKeyStore, prefix = "") {
    this.#store = store;
    this.#prefix = prefix;
  }

  checkAndRecord(key: string, expiresAtSec: number, nowSec: number): Promise<boolean> {
    return this.#store.consumeOnce(
      `${this.#prefix}${key}`,
      new Date(expiresAtSec * 1000),
      new Date(nowSec * 1000),
    );
  }

  has(key: string, nowSec: number): Promise<boolean> {
    return this.#store.isConsumed(`${this.#prefix}${key}`, new Date(nowSec * 1000));
  }
}

/**
 * Remembers one-time identifiers (assertion / proof `jti`) until they expire. Bounded: when full,
 * expired entries are swept; if it is still full the request is refused (fail closed) rather than
 * forgetting a live jti, which would reopen a replay window.
 */
export class ReplayCache implements ReplayGuard {
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
