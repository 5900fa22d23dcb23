/**
 * The outbox seam: a durable, bounded, per-channel FIFO store shared by all sinks. Implementations
 * live in sibling folders (`sqlite/`, `memory/`); `test/contract/outbox.contract.test.ts` runs the
 * same suite against each.
 *
 * Delivery model: a message is appended once and must be delivered to every sink named at open.
 * A sink leases messages (in-memory leases: after a crash everything unacknowledged is leased again,
 * which is what at-least-once needs), then acks (delivered), nacks (try again later) or dead-letters
 * each one. A message leaves the outbox once every sink has acked or dead-lettered it.
 */

export interface NewMessage {
  readonly channel: string;
  readonly payload: Uint8Array;
  /** Default `application/json`. */
  readonly contentType?: string;
  /** Producer timestamp (ms since epoch); default: ingest time. */
  readonly ts?: number;
}

export interface OutboxMessage {
  /** Stable UUIDv7 assigned at ingest, carried upstream (MQTT user property / HTTP header). */
  readonly id: string;
  /** Storage order; strictly increasing. */
  readonly seq: number;
  readonly channel: string;
  readonly payload: Uint8Array;
  readonly contentType: string;
  readonly ts: number;
  /** Wall-clock ms when the outbox accepted the message. */
  readonly ingestedAt: number;
  /** Leases of this message by this sink since the outbox opened (1 on the first delivery). */
  readonly attempt: number;
}

export interface DeadLetter {
  readonly id: string;
  readonly sink: string;
  readonly channel: string;
  readonly payload: Uint8Array;
  readonly contentType: string;
  readonly ts: number;
  readonly reason: string;
  readonly at: number;
}

export type DropPolicy = "drop-oldest" | "refuse-new";
export type DropReason = "max_bytes" | "max_count" | "ttl" | "refused";

export interface OutboxLimits {
  /** Sum of payload sizes. */
  readonly maxBytes: number;
  readonly maxCount: number;
  /** Messages older than this (by ingest time) are dropped; 0 = no TTL. */
  readonly ttlMs: number;
  readonly dropPolicy: DropPolicy;
}

export const defaultOutboxLimits: OutboxLimits = {
  maxBytes: 256 * 1024 * 1024,
  maxCount: 1_000_000,
  ttlMs: 7 * 24 * 3600 * 1000,
  dropPolicy: "drop-oldest",
};

export interface OutboxStats {
  readonly depth: number;
  readonly bytes: number;
  /** Age (ms) of the oldest message, 0 when empty. */
  readonly oldestAgeMs: number;
  readonly drops: Readonly<Record<DropReason, number>>;
  readonly deadLetters: number;
  readonly appended: number;
  /** Times a corrupt store was renamed aside at open. */
  readonly quarantined: number;
  /** Per sink: messages currently leased (in flight). */
  readonly leased: Readonly<Record<string, number>>;
}

export interface LeaseOptions {
  /** Stop adding messages once their payloads exceed this many bytes (at least one is returned). */
  readonly maxBytes?: number;
}

export interface Outbox {
  /** Sinks this outbox delivers to (fixed at open). */
  readonly sinks: readonly string[];

  /**
   * Appends a batch atomically and resolves with the new IDs, in order, only once the batch is
   * durable (fsynced). Concurrent appends within one tick share one transaction and one fsync.
   * @throws ERR_OUTBOX_FULL (transient, `details.retryAfterMs`) under the refuse-new policy;
   *         ERR_OUTBOX_MESSAGE_TOO_LARGE (permanent) for a message bigger than the byte limit;
   *         ERR_OUTBOX_CLOSED; ERR_OUTBOX_IO (transient) when the store cannot write.
   */
  append(batch: readonly NewMessage[]): Promise<string[]>;

  /**
   * Leases up to `max` messages for `sink`, oldest first, keeping per-channel FIFO: a channel whose
   * earliest pending message is deferred (nacked, not yet due) yields nothing behind it. Messages
   * already leased by this sink are not returned again until nacked (or the outbox reopens).
   */
  lease(sink: string, max: number, options?: LeaseOptions): Promise<OutboxMessage[]>;

  /** Marks delivered by `sink`; the message is deleted once no sink needs it. Unknown IDs are ignored. */
  ack(sink: string, ids: readonly string[]): Promise<void>;

  /** Releases leases so the messages are leased again, not before `delayMs` (monotonic) has passed. */
  nack(sink: string, ids: readonly string[], delayMs?: number): Promise<void>;

  /**
   * Makes every message of `sink` deferred by `nack` due now (the upstream came back before the
   * backoff ran out). Order is unchanged: deferral never reorders a channel.
   */
  retryNow(sink: string): void;

  /** Moves one message out of `sink`'s queue into the dead-letter table with a reason. */
  deadLetter(sink: string, id: string, reason: string): Promise<void>;

  /** Dead letters, newest first. */
  deadLetters(limit?: number): Promise<DeadLetter[]>;

  /** Applies the TTL now (also done periodically by implementations). Resolves with messages dropped. */
  expire(): Promise<number>;

  /** Resolves when a message becomes leasable for `sink` (append or nack), or the signal aborts. */
  waitForWork(sink: string, signal?: AbortSignal): Promise<void>;

  stats(): OutboxStats;

  close(): Promise<void>;
}
