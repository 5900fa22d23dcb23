import type { Secret } from "../../core/secret.js";
import type { OutboxMessage } from "../outbox/outbox.js";

/**
 * The sink seam: delivers leased outbox messages upstream. Implementations: `mqtt/` (MQTT 5, QoS 1)
 * and `https/` (batched POSTs). `test/contract/sink.contract.test.ts` runs the same suite on both.
 */
export type DeliveryOutcome =
  /** The upstream took responsibility (PUBACK success / 2xx): the message may leave the outbox. */
  | { readonly id: string; readonly kind: "ok" }
  /** Keep it and try again, not before `delayMs` if given (Retry-After, quota). */
  | { readonly id: string; readonly kind: "retry"; readonly delayMs?: number; readonly code: string }
  /** The upstream refuses this message for good (not authorized, invalid): move it aside. */
  | { readonly id: string; readonly kind: "dead-letter"; readonly reason: string };

export interface Sink {
  readonly name: string;
  /** Most messages handed to one `deliver` call. */
  readonly maxBatch: number;
  /** Most messages in flight at once across concurrent `deliver` calls (bounded window). */
  readonly maxInFlight: number;
  /**
   * Delivers a batch; resolves with exactly one outcome per message (same order). Never rejects for
   * a per-message problem; connection-level failures come back as `retry` outcomes with a code.
   */
  deliver(batch: readonly OutboxMessage[]): Promise<DeliveryOutcome[]>;
  close(): Promise<void>;
}

/** An access token and its expiry; the credentials feature implements this. */
export interface AccessToken {
  readonly token: Secret;
  readonly expiresAt: Date;
}

export interface TokenSource {
  /** A valid token; `forceRefresh` after the upstream refused the current one (401 / CONNACK 0x86). */
  getToken(options?: { forceRefresh?: boolean }): Promise<AccessToken>;
}

/** Produces a fresh DPoP proof JWT (RFC 9449) per request; the credentials feature implements this. */
export interface DpopSigner {
  proof(method: string, url: string, accessToken?: Secret): Promise<string>;
}
