import { randomBytes } from "node:crypto";
import type { Clock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";

export interface RotationSession {
  readonly id: string;
  readonly deviceId: string;
  /** Thumbprint of the key that authenticated `begin` (the current key then). */
  readonly currentThumbprint: string;
  readonly nonce: Buffer;
  readonly expiresAt: Date;
}

/**
 * TPM rotation sessions: in memory (a registrar restart voids them; the device simply begins again),
 * single-use (taken out on the first finish, whether it succeeds or not), short-lived, one live
 * session per device (a new begin replaces the previous one), bounded in number.
 */
export class RotationSessions {
  readonly #clock: Clock;
  readonly #ttlMs: number;
  readonly #max: number;
  readonly #live = new Map<string, RotationSession>();
  /** Consumed ids until their expiry, so a replay gets its own code. */
  readonly #used = new Map<string, number>();

  constructor(clock: Clock, ttlSeconds: number, max = 10_000) {
    this.#clock = clock;
    this.#ttlMs = ttlSeconds * 1000;
    this.#max = max;
  }

  begin(deviceId: string, currentThumbprint: string): RotationSession {
    this.#purge();
    for (const [id, s] of this.#live) if (s.deviceId === deviceId) this.#live.delete(id);
    if (this.#live.size >= this.#max) {
      throw new M2mError("ERR_ROTATION_BUSY", "transient", "too many rotation sessions");
    }
    const s: RotationSession = {
      id: randomBytes(16).toString("hex"),
      deviceId,
      currentThumbprint,
      nonce: randomBytes(32),
      expiresAt: new Date(this.#clock.now().getTime() + this.#ttlMs),
    };
    this.#live.set(s.id, s);
    return s;
  }

  /**
   * Takes the session out (single use) and checks it belongs to `deviceId` and has not expired.
   * @throws ERR_SESSION_UNKNOWN, ERR_SESSION_CONSUMED, ERR_SESSION_EXPIRED, ERR_ROTATION_SESSION_DEVICE
   */
  take(id: string, deviceId: string): RotationSession {
    const now = this.#clock.now().getTime();
    const s = this.#live.get(id);
    if (s === undefined) {
      // Security: a replayed finish must not get a second certificate.
      if (this.#used.has(id)) throw new M2mError("ERR_SESSION_CONSUMED", "permanent", "session used");
      throw new M2mError("ERR_SESSION_UNKNOWN", "permanent", "session not found");
    }
    // Security: the nonce is another device's challenge; it is not consumed by a stranger's attempt.
    if (s.deviceId !== deviceId)
      throw new M2mError("ERR_ROTATION_SESSION_DEVICE", "permanent", "session belongs to another device");
    this.#live.delete(id);
    this.#used.set(id, s.expiresAt.getTime());
    // Security: a short-lived nonce bounds how long a certification can be held back and used.
    if (s.expiresAt.getTime() <= now)
      throw new M2mError("ERR_SESSION_EXPIRED", "permanent", "session expired");
    return s;
  }

  #purge(): void {
    const now = this.#clock.now().getTime();
    for (const [id, s] of this.#live) if (s.expiresAt.getTime() <= now) this.#live.delete(id);
    for (const [id, exp] of this.#used) if (exp <= now) this.#used.delete(id);
  }
}
