import { randomBytes } from "node:crypto";
import type { Clock } from "../../core/clock.js";
import type { RegistrarStore, RotationSessionRecord } from "../store/index.js";

export type RotationSession = RotationSessionRecord;

/**
 * TPM rotation sessions, kept in the registrar store so a device may `begin` at one replica and
 * `finish` at another (and a registrar restart does not void them): single-use (taken out on the
 * first finish by the owning device, whether it then succeeds or not), short-lived, one live session
 * per device (a new begin replaces the previous one). Expired rows are purged by housekeeping.
 */
export class RotationSessions {
  readonly #store: Pick<RegistrarStore, "createRotationSession" | "takeRotationSession">;
  readonly #clock: Clock;
  readonly #ttlMs: number;

  constructor(
    store: Pick<RegistrarStore, "createRotationSession" | "takeRotationSession">,
    clock: Clock,
    ttlSeconds: number,
  ) {
    this.#store = store;
    this.#clock = clock;
    this.#ttlMs = ttlSeconds * 1000;
  }

  async begin(deviceId: string, currentThumbprint: string): Promise<RotationSession> {
    const s: RotationSession = {
      id: randomBytes(16).toString("hex"),
      deviceId,
      currentThumbprint,
      nonce: randomBytes(32),
      expiresAt: new Date(this.#clock.now().getTime() + this.#ttlMs),
    };
    await this.#store.createRotationSession(s);
    return s;
  }

  /**
   * Takes the session out (single use) and checks it belongs to `deviceId` and has not expired.
   * @throws ERR_SESSION_UNKNOWN, ERR_SESSION_CONSUMED, ERR_SESSION_EXPIRED, ERR_ROTATION_SESSION_DEVICE
   */
  take(id: string, deviceId: string): Promise<RotationSession> {
    return this.#store.takeRotationSession(id, deviceId, this.#clock.now());
  }
}
