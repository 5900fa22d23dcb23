import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { base64url } from "jose";
import type { Clock } from "../../core/clock.js";
import { M2mError } from "../../core/errors.js";
import { quoteQualifyingData } from "../../wire/v1/index.js";

/**
 * Quote nonces: issued by the authorization server, bound to one device, usable once, valid for the
 * policy's max quote age.
 *
 * Why a dedicated challenge and not the DPoP nonce: the DPoP server nonce (RFC 9449 §8, `dpop-verify.ts`)
 * is an HMAC of a time window, the same for every client and accepted any number of times within the
 * window — that is all DPoP needs, but a quote qualified with it could be replayed by the same device
 * within the window and is not tied to the device. This nonce is `issuedAt.random.mac` with
 * mac = HMAC(secret, deviceId ‖ issuedAt ‖ random): stateless to issue (nothing stored, so anonymous
 * challenge requests cannot fill the store), bound to the device by the MAC, and single-use through
 * the store's shared one-time keys (`q|deviceId|random`, consumed atomically, so replicas agree).
 * The quote's qualifyingData is SHA-256 of the nonce string.
 */
export const QUOTE_NONCE_ERRORS = {
  INVALID: "ERR_QUOTE_NONCE_INVALID",
  EXPIRED: "ERR_QUOTE_NONCE_EXPIRED",
  REPLAYED: "ERR_QUOTE_NONCE_REPLAYED",
} as const;

export interface CheckedNonce {
  /** One-time key to consume (`q|deviceId|random`). */
  readonly onceKey: string;
  readonly issuedAt: number;
  /** SHA-256 of the nonce string: what the quote's extraData must be. */
  readonly qualifyingData: Uint8Array;
}

export class QuoteNonceIssuer {
  readonly #secret: Buffer;
  readonly #clock: Clock;

  /** `secret`: shared by every replica (from the store) so a nonce from one is accepted by all. */
  constructor(clock: Clock, secret: Buffer) {
    this.#clock = clock;
    this.#secret = secret;
  }

  #mac(deviceId: string, issuedAt: number, random: string): string {
    return base64url.encode(
      createHmac("sha256", this.#secret)
        .update(`q|${deviceId}|${issuedAt}|${random}`)
        .digest()
        .subarray(0, 16),
    );
  }

  /** A fresh nonce for `deviceId`. */
  issue(deviceId: string): string {
    const issuedAt = this.#clock.nowSeconds();
    const random = base64url.encode(randomBytes(16));
    return `${issuedAt}.${random}.${this.#mac(deviceId, issuedAt, random)}`;
  }

  /**
   * Checks MAC, device binding and age (the caller then consumes `onceKey`).
   * @throws ERR_QUOTE_NONCE_INVALID, ERR_QUOTE_NONCE_EXPIRED
   */
  check(nonce: string, deviceId: string, maxAgeSec: number): CheckedNonce {
    const m = /^([0-9]{1,12})\.([A-Za-z0-9_-]{22})\.([A-Za-z0-9_-]{22})$/.exec(nonce);
    const invalid = () =>
      new M2mError(
        QUOTE_NONCE_ERRORS.INVALID,
        "permanent",
        "the attestation nonce was not issued to this device",
      );
    if (m?.[1] === undefined || m[2] === undefined || m[3] === undefined) throw invalid();
    const issuedAt = Number(m[1]);
    const want = Buffer.from(this.#mac(deviceId, issuedAt, m[2]));
    const got = Buffer.from(m[3]);
    // Why: the MAC binds the nonce to the device it was issued to; another device's nonce (or a made-up
    // one) must not qualify this device's quote.
    if (want.length !== got.length || !timingSafeEqual(want, got)) throw invalid();
    const now = this.#clock.nowSeconds();
    // Why: the nonce's age bounds the quote's age (the quote was made after the nonce was issued); an
    // old nonce would let a device hold a quote of a good boot for later. 30 s of skew between replicas.
    if (now - issuedAt > maxAgeSec || issuedAt - now > 30) {
      throw new M2mError(QUOTE_NONCE_ERRORS.EXPIRED, "permanent", "the attestation nonce is too old");
    }
    return {
      onceKey: `q|${deviceId}|${m[2]}`,
      issuedAt,
      qualifyingData: quoteQualifyingData(nonce),
    };
  }
}
