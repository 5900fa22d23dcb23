import type { ErrorCode } from "../../core/error-codes.js";
import type { TokenSource } from "../../credentials/oauth/token-source.js";
import type { OutboxMessage } from "../outbox/outbox.js";

/**
 * The sink seam: delivers leased outbox messages upstream. Implementations: `mqtt/` (MQTT 5, QoS 1)
 * and `https/` (batched POSTs). `test/contract/sink.contract.test.ts` runs the same suite on both.
 */
export type DeliveryOutcome =
  /** The upstream took responsibility (PUBACK success / 2xx): the message may leave the outbox. */
  | { readonly id: string; readonly kind: "ok" }
  /** Keep it and try again, not before `delayMs` if given (Retry-After, quota). */
  | { readonly id: string; readonly kind: "retry"; readonly delayMs?: number; readonly code: ErrorCode }
  /**
   * The upstream refuses this message for good (not authorized, invalid): move it aside. `detail` is the
   * protocol's own reason (e.g. `reasonCode=0x87`, `status=404`), kept beside the code in the outbox.
   */
  | { readonly id: string; readonly kind: "dead-letter"; readonly code: ErrorCode; readonly detail?: string };

/** The text stored with a dead-lettered message: the catalogue code, then the protocol detail if any. */
export function deadLetterReason(o: { readonly code: ErrorCode; readonly detail?: string }): string {
  return o.detail === undefined ? o.code : `${o.code} ${o.detail}`;
}

export interface Sink {
  readonly name: string;
  /** Most messages handed to one `deliver` call. */
  readonly maxBatch: number;
  /** Most messages in flight at once across concurrent `deliver` calls (bounded window). */
  readonly maxInFlight: number;
  /** Most payload bytes handed to one `deliver` call (optional). */
  readonly maxBatchBytes?: number;
  /** A partial batch waits at most this long (ms) for more messages before it is sent (optional). */
  readonly lingerMs?: number;
  /**
   * Delivers a batch; resolves with exactly one outcome per message (same order). Never rejects for
   * a per-message problem; connection-level failures come back as `retry` outcomes with a code.
   */
  deliver(batch: readonly OutboxMessage[]): Promise<DeliveryOutcome[]>;
  /**
   * Optional cheap reachability check (e.g. a TCP connect, no TLS, no login) used while the relay
   * backs off: resolves true when the upstream accepts connections again. Never rejects.
   */
  probe?(): Promise<boolean>;
  close(): Promise<void>;
}

/**
 * Credentials come through the credentials feature's seams (implemented by `OAuthClient`); the relay
 * depends on the interfaces only. `invalidate` (optional) drops a cached token after the upstream
 * refused it, so the next `getToken` fetches a fresh one.
 */
export type { AccessToken, DpopSigner } from "../../credentials/oauth/token-source.js";
export type RefreshableTokenSource = TokenSource & { invalidate?(scope?: string): void };
