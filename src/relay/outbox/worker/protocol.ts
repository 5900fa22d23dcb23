/**
 * Messages between `WorkerOutbox` (main thread) and `outbox-worker.ts` (the worker running the
 * SqliteOutbox). Internal to this folder: the shapes may change with the code on both sides, which
 * always ship together (one build).
 */

import type { ErrorCode, RetryClass } from "../../../core/errors.js";
import type { LogLevel } from "../../../core/log.js";
import type { SqliteOutboxOptions } from "../sqlite/sqlite-outbox.js";

/** What `workerData` carries: the structured-clone-able part of the SqliteOutbox options. */
export interface WorkerInit {
  readonly options: Pick<
    SqliteOutboxOptions,
    "path" | "sinks" | "limits" | "synchronous" | "fsyncMode" | "ttlCheckMs" | "refuseRetryAfterMs"
  >;
  /** The main side's first `clockTrusted()` answer. */
  readonly clockTrusted: boolean;
  /** How often (ms) the worker pushes a stats snapshot when it changed (TTL drops by its timer). */
  readonly statsPushMs: number;
}

export type RequestOp =
  | "append"
  | "lease"
  | "ack"
  | "nack"
  | "deadLetter"
  | "deadLetters"
  | "expire"
  | "waitForWork"
  | "close"
  | "debug";

/** Main → worker. `retryNow`, `cancel` and `clock` get no reply. */
export type ToWorker =
  | {
      readonly id: number;
      readonly op: RequestOp;
      readonly args: readonly unknown[];
      readonly trusted?: boolean;
    }
  | { readonly id: 0; readonly op: "retryNow"; readonly args: readonly [string] }
  /** Abort the worker's wait for request `id` (the main side already resolved it). */
  | { readonly id: number; readonly op: "cancel"; readonly args: readonly [] }
  | { readonly id: 0; readonly op: "clock"; readonly args: readonly [boolean] };

export interface WireError {
  readonly code: ErrorCode;
  readonly retry: RetryClass;
  readonly message: string;
  readonly details?: Readonly<Record<string, string | number | boolean>>;
  readonly hint?: string;
}

/**
 * Stats as a flat number array (cheap to clone, no nested objects per reply):
 * depth, bytes, oldest ingest time (wall ms, 0 when empty), drops max_bytes, max_count, ttl,
 * refused, deadLetters, appended, quarantined, then `leased` per sink in `sinks` order.
 */
export type WireStats = number[];
export const STATS_FIXED = 10;

/** Worker → main, inside a {@link WorkerBatch}. */
export type FromWorker =
  | { readonly k: "r"; readonly id: number; readonly ok: true; readonly value: unknown }
  | { readonly k: "r"; readonly id: number; readonly ok: false; readonly error: WireError }
  | {
      readonly k: "l";
      readonly level: LogLevel;
      readonly msg: string;
      readonly fields: Record<string, unknown>;
    }
  | { readonly k: "q"; readonly movedTo: string }
  | { readonly k: "o"; readonly ok: true }
  | { readonly k: "o"; readonly ok: false; readonly error: WireError };

/**
 * What each side posts: everything it produced in one event-loop turn, in order. One postMessage per
 * turn instead of one per call: each post wakes the other thread, and on a busy 2-core machine those
 * wake-ups (not the copying) dominated the cost (≈ 30–40 µs per post measured in the relay).
 * Main → worker is a plain `ToWorker[]`.
 */
export interface WorkerBatch {
  readonly m: readonly FromWorker[];
  /** Stats taken when the batch was posted (after every reply in it); absent when nothing changed. */
  readonly s?: WireStats;
}

/** Answer of the `debug` request (tests and diagnostics). */
export interface WorkerDebug {
  /** waitForWork requests the worker is still waiting on. */
  readonly waits: number;
}
