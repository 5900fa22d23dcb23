import { Worker } from "node:worker_threads";
import { M2mError } from "../../../core/errors.js";
import { type Logger, silentLogger } from "../../../core/log.js";
import type {
  DeadLetter,
  DropReason,
  LeaseOptions,
  NewMessage,
  Outbox,
  OutboxMessage,
  OutboxStats,
} from "../outbox.js";
import type { SqliteOutboxOptions } from "../sqlite/sqlite-outbox.js";
import {
  type FromWorker,
  type RequestOp,
  STATS_FIXED,
  type ToWorker,
  type WireError,
  type WireStats,
  type WorkerBatch,
  type WorkerDebug,
  type WorkerInit,
} from "./protocol.js";

/**
 * Options of {@link WorkerOutbox.open}: the serializable subset of `SqliteOutboxOptions` plus the
 * callbacks that stay on the main thread.
 *
 * There is deliberately no `clock`: the worker's SqliteOutbox uses the system clock (a clock object
 * cannot cross threads). TTL and nack-delay behaviour under a manual clock is covered by
 * SqliteOutbox's own contract runs, since the worker runs that exact class; callers that inject a
 * test clock use SqliteOutbox in-thread.
 */
export interface WorkerOutboxOptions
  extends Pick<
    SqliteOutboxOptions,
    | "path"
    | "sinks"
    | "limits"
    | "synchronous"
    | "fsyncMode"
    | "ttlCheckMs"
    | "refuseRetryAfterMs"
    | "logger"
    | "clockTrusted"
    | "onQuarantine"
  > {
  /**
   * The worker entry. Default: `outbox-worker.js` next to this module (the compiled build). Tests
   * under vitest pass a bundled `.mjs` (Node 20 cannot run TypeScript in a worker).
   */
  readonly workerUrl?: URL;
  /** Called once if the worker dies (uncaught error or exit): every call fails from then on. */
  readonly onCrash?: (err: M2mError) => void;
  /** How often (ms) the worker pushes changed stats without a request (TTL timer drops). Default 500. */
  readonly statsPushMs?: number;
}

/** Main side of one request in flight. */
interface Pending {
  readonly op: RequestOp;
  readonly resolve: (v: never) => void;
  readonly reject: (e: unknown) => void;
  /** waitForWork only: removes the abort listener. */
  cleanup?: () => void;
}

const CLOCK_PUSH_MS = 1000;
/** Longest a lazy message (ack, cancel, clock) waits for an eager one to travel with. */
const LAZY_FLUSH_MS = 4;

function fromWire(e: WireError): M2mError {
  return new M2mError(e.code, e.retry, e.message, {
    ...(e.details === undefined ? {} : { details: e.details }),
    ...(e.hint === undefined ? {} : { hint: e.hint }),
  });
}

const closedError = (): M2mError => new M2mError("ERR_OUTBOX_CLOSED", "permanent", "the outbox is closed");

/**
 * A payload that views part of a bigger buffer (a pooled `Buffer`, a slice of a socket chunk) would be
 * cloned together with that whole buffer: copy just its bytes. Whole-buffer payloads go as they are.
 */
function compactBatch(batch: readonly NewMessage[]): readonly NewMessage[] {
  let out: NewMessage[] | undefined;
  for (let i = 0; i < batch.length; i++) {
    const m = batch[i] as NewMessage;
    const p = m.payload;
    if (p.byteOffset === 0 && p.byteLength === p.buffer.byteLength) continue;
    out ??= [...batch];
    out[i] = { ...m, payload: p.slice() };
  }
  return out ?? batch;
}

function asBuffer(p: Uint8Array): Buffer {
  // A view on the received bytes, no copy: sinks may call Buffer methods on payloads.
  return Buffer.from(p.buffer, p.byteOffset, p.byteLength);
}

/**
 * The SQLite outbox running in a worker thread, so that the main event loop only serves sockets
 * (ingest, MQTT/HTTPS delivery) while commits, fdatasync bookkeeping and lease queries run on the
 * other core. Same contract and same errors as `SqliteOutbox` (it runs that class, unchanged, in the
 * worker): each call is one request and one reply, batched per event-loop turn on both sides (acks
 * and wait cancellations wait up to 4 ms for company); errors come back as `M2mError` with the same
 * code, retry class, details and hint.
 *
 * `stats()` is synchronous and served from a snapshot attached to every batch of replies (exact right
 * after an awaited call) and pushed by the worker every `statsPushMs` when it changed (TTL timer
 * drops); `oldestAgeMs` is computed here from the oldest ingest time, so it grows between snapshots.
 *
 * If the worker dies, every pending and later call rejects `ERR_OUTBOX_IO` (transient), except
 * `waitForWork`, which resolves so that the caller's next `lease()` sees the error (a rejected wait
 * would end the relay's pump instead of backing off); `onCrash` is called once.
 */
export class WorkerOutbox implements Outbox {
  readonly sinks: readonly string[];
  readonly #sinkSet: ReadonlySet<string>;
  readonly #worker: Worker;
  readonly #log: Logger;
  readonly #clockTrusted: (() => boolean) | undefined;
  readonly #onCrash: ((err: M2mError) => void) | undefined;
  readonly #pending = new Map<number, Pending>();
  /** Requests that keep the process alive (all but waits, which never did with SqliteOutbox either). */
  #refs = 0;
  #nextId = 1;
  #out: ToWorker[] = [];
  #flushScheduled = false;
  #lazyTimer: NodeJS.Timeout | undefined;
  #stats: WireStats;
  #closed = false;
  #closing: Promise<void> | undefined;
  #terminating = false;
  #dead: M2mError | undefined;
  #clockTimer: NodeJS.Timeout | undefined;

  private constructor(worker: Worker, options: WorkerOutboxOptions, stats: WireStats) {
    this.#worker = worker;
    this.sinks = [...options.sinks];
    this.#sinkSet = new Set(this.sinks);
    this.#log = options.logger ?? silentLogger;
    this.#clockTrusted = options.clockTrusted;
    this.#onCrash = options.onCrash;
    this.#stats = stats;
    worker.on("message", (b: WorkerBatch) => this.#onBatch(b));
    worker.on("error", (err) => this.#fail(err));
    worker.on("exit", (code) => this.#fail(new Error(`outbox worker exited with code ${code}`)));
    worker.unref();
    const trust = this.#clockTrusted;
    if (trust !== undefined) {
      // The worker's TTL timer asks `clockTrusted()` on its own schedule: keep its copy fresh.
      this.#clockTimer = setInterval(
        () => this.#post({ id: 0, op: "clock", args: [trust()] }, true),
        CLOCK_PUSH_MS,
      );
      this.#clockTimer.unref();
    }
  }

  /**
   * Starts the worker and opens the SqliteOutbox in it. A corrupt file is quarantined as with
   * SqliteOutbox (`onQuarantine` is called here, on the main thread, before this resolves).
   * @throws the worker's open error with its code (ERR_OUTBOX_CONFIG, ERR_OUTBOX_OPEN); ERR_OUTBOX_OPEN
   *         when the worker itself cannot start.
   */
  static async open(options: WorkerOutboxOptions): Promise<WorkerOutbox> {
    const log = options.logger ?? silentLogger;
    const init: WorkerInit = {
      options: {
        path: options.path,
        sinks: [...options.sinks],
        ...(options.limits === undefined ? {} : { limits: { ...options.limits } }),
        ...(options.synchronous === undefined ? {} : { synchronous: options.synchronous }),
        ...(options.fsyncMode === undefined ? {} : { fsyncMode: options.fsyncMode }),
        ...(options.ttlCheckMs === undefined ? {} : { ttlCheckMs: options.ttlCheckMs }),
        ...(options.refuseRetryAfterMs === undefined
          ? {}
          : { refuseRetryAfterMs: options.refuseRetryAfterMs }),
      },
      clockTrusted: options.clockTrusted?.() ?? true,
      statsPushMs: options.statsPushMs ?? 500,
    };
    const worker = new Worker(options.workerUrl ?? new URL("./outbox-worker.js", import.meta.url), {
      workerData: init,
    });
    return new Promise<WorkerOutbox>((resolve, reject) => {
      const done = (): void => {
        worker.off("message", onMessage);
        worker.off("error", onError);
        worker.off("exit", onExit);
      };
      const onMessage = (b: WorkerBatch): void => {
        for (let i = 0; i < b.m.length; i++) {
          const m = b.m[i] as FromWorker;
          if (m.k === "l") log[m.level](m.msg, m.fields);
          else if (m.k === "q") options.onQuarantine?.(m.movedTo);
          else if (m.k === "o") {
            done();
            if (m.ok) {
              const ob = new WorkerOutbox(worker, options, b.s ?? []);
              // Whatever the worker produced in the same turn after opening (its logs).
              ob.#onBatch({ m: b.m.slice(i + 1) });
              resolve(ob);
            } else {
              void worker.terminate();
              reject(fromWire(m.error));
            }
            return;
          }
        }
      };
      const startFailed = (cause: unknown): void => {
        done();
        void worker.terminate();
        reject(
          new M2mError("ERR_OUTBOX_OPEN", "permanent", "the outbox worker could not start", {
            cause,
            hint: "check that the build output (outbox-worker.js) is installed next to worker-outbox.js",
          }),
        );
      };
      const onError = (err: Error): void => startFailed(err);
      const onExit = (code: number): void => startFailed(new Error(`outbox worker exited with code ${code}`));
      worker.on("message", onMessage);
      worker.on("error", onError);
      worker.on("exit", onExit);
    });
  }

  /**
   * Queues a message; everything queued in this event-loop turn leaves in one post (WorkerBatch).
   * Lazy messages (acks, wait cancellations, clock updates: nobody waits on them to make progress)
   * do not trigger a post: they leave with the next eager one or after LAZY_FLUSH_MS. Each post wakes
   * the worker thread, which is the expensive part (≈ 20–40 µs of the posting thread on this VM).
   */
  #post(m: ToWorker, lazy = false): void {
    this.#out.push(m);
    if (this.#flushScheduled) return;
    if (lazy) {
      this.#lazyTimer ??= setTimeout(this.#flush, LAZY_FLUSH_MS);
      return;
    }
    this.#flushScheduled = true;
    setImmediate(this.#flush);
  }

  readonly #flush = (): void => {
    this.#flushScheduled = false;
    if (this.#lazyTimer !== undefined) clearTimeout(this.#lazyTimer);
    this.#lazyTimer = undefined;
    const out = this.#out;
    if (out.length === 0) return;
    this.#out = [];
    if (this.#dead === undefined) this.#worker.postMessage(out);
  };

  #onBatch(b: WorkerBatch): void {
    // Stats first: they were taken after every reply in the batch, so awaiting callers see them.
    if (b.s !== undefined) this.#stats = b.s;
    for (const m of b.m) this.#onMessage(m);
  }

  #onMessage(m: FromWorker): void {
    switch (m.k) {
      case "r": {
        const p = this.#pending.get(m.id);
        // Unknown id: a wait cancelled here before the worker's answer crossed the cancel.
        if (p === undefined) return;
        this.#settle(m.id, p);
        if (!m.ok) p.reject(fromWire(m.error));
        else if (p.op === "lease") {
          const ms = m.value as { payload: Uint8Array }[];
          for (const msg of ms) msg.payload = asBuffer(msg.payload);
          p.resolve(ms as never);
        } else if (p.op === "deadLetters") {
          const ds = m.value as { payload: Uint8Array }[];
          for (const d of ds) d.payload = asBuffer(d.payload);
          p.resolve(ds as never);
        } else p.resolve(m.value as never);
        return;
      }
      case "l":
        this.#log[m.level](m.msg, m.fields);
        return;
      case "q":
      case "o":
        // Only sent while opening (handled in `open`).
        return;
      default: {
        const never: never = m;
        this.#log.warn("unexpected message from the outbox worker", { kind: String(never) });
      }
    }
  }

  #settle(id: number, p: Pending): void {
    this.#pending.delete(id);
    p.cleanup?.();
    if (p.op !== "waitForWork" && --this.#refs === 0) this.#worker.unref();
  }

  #fail(cause: unknown): void {
    if (this.#dead !== undefined) return;
    const err = new M2mError("ERR_OUTBOX_IO", "transient", "the outbox worker stopped", {
      cause,
      hint: "the relay cannot store or deliver until the agent restarts; the log has the worker's error",
    });
    this.#dead = err;
    this.#out = [];
    if (this.#lazyTimer !== undefined) clearTimeout(this.#lazyTimer);
    this.#lazyTimer = undefined;
    if (this.#clockTimer !== undefined) clearInterval(this.#clockTimer);
    this.#clockTimer = undefined;
    // After close() has closed the store, the worker's exit is expected.
    if (this.#terminating) {
      this.#rejectAll(closedError());
      return;
    }
    this.#log.error("outbox worker stopped", { err: cause instanceof Error ? cause : String(cause) });
    this.#rejectAll(err);
    this.#onCrash?.(err);
  }

  #rejectAll(err: M2mError): void {
    for (const [id, p] of [...this.#pending]) {
      this.#settle(id, p);
      if (p.op === "waitForWork") p.resolve(undefined as never);
      else p.reject(err);
    }
  }

  #request<T>(op: RequestOp, args: readonly unknown[], trusted?: boolean): Promise<T> {
    if (this.#dead !== undefined) return Promise.reject(this.#closed ? closedError() : this.#dead);
    const id = this.#nextId++;
    return new Promise<T>((resolve, reject) => {
      this.#pending.set(id, { op, resolve: resolve as (v: never) => void, reject });
      if (this.#refs++ === 0) this.#worker.ref();
      this.#post(trusted === undefined ? { id, op, args } : { id, op, args, trusted }, op === "ack");
    });
  }

  #checkOpen(): void {
    if (this.#closed) throw closedError();
  }

  #checkSink(sink: string): void {
    if (!this.#sinkSet.has(sink))
      throw new M2mError("ERR_OUTBOX_SINK_UNKNOWN", "permanent", `unknown sink ${sink}`);
  }

  /** See `Outbox.append`. Throws ERR_OUTBOX_CLOSED synchronously once closed, as SqliteOutbox does. */
  append(batch: readonly NewMessage[]): Promise<string[]> {
    this.#checkOpen();
    if (batch.length === 0) return Promise.resolve([]);
    return this.#request("append", [compactBatch(batch)], this.#clockTrusted?.());
  }

  async lease(sink: string, max: number, options?: LeaseOptions): Promise<OutboxMessage[]> {
    this.#checkOpen();
    return this.#request("lease", options === undefined ? [sink, max] : [sink, max, options]);
  }

  ack(sink: string, ids: readonly string[]): Promise<void> {
    this.#checkOpen();
    this.#checkSink(sink);
    return this.#request("ack", [sink, ids]);
  }

  async nack(sink: string, ids: readonly string[], delayMs?: number): Promise<void> {
    this.#checkOpen();
    return this.#request("nack", delayMs === undefined ? [sink, ids] : [sink, ids, delayMs]);
  }

  retryNow(sink: string): void {
    this.#checkOpen();
    this.#checkSink(sink);
    if (this.#dead === undefined) this.#post({ id: 0, op: "retryNow", args: [sink] });
  }

  deadLetter(sink: string, id: string, reason: string): Promise<void> {
    this.#checkOpen();
    this.#checkSink(sink);
    return this.#request("deadLetter", [sink, id, reason]);
  }

  async deadLetters(limit?: number): Promise<DeadLetter[]> {
    this.#checkOpen();
    return this.#request("deadLetters", limit === undefined ? [] : [limit]);
  }

  expire(): Promise<number> {
    this.#checkOpen();
    return this.#request("expire", [], this.#clockTrusted?.());
  }

  waitForWork(sink: string, signal?: AbortSignal): Promise<void> {
    this.#checkSink(sink);
    if (this.#closed || this.#dead !== undefined || signal?.aborted) return Promise.resolve();
    const id = this.#nextId++;
    return new Promise<void>((resolve, reject) => {
      const p: Pending = { op: "waitForWork", resolve: resolve as (v: never) => void, reject };
      if (signal !== undefined) {
        const onAbort = (): void => {
          this.#settle(id, p);
          // The worker stops waiting and does not answer (an answer already under way is ignored).
          this.#post({ id, op: "cancel", args: [] }, true);
          resolve();
        };
        signal.addEventListener("abort", onAbort, { once: true });
        p.cleanup = () => signal.removeEventListener("abort", onAbort);
      }
      this.#pending.set(id, p);
      this.#post({ id, op: "waitForWork", args: [sink] });
    });
  }

  stats(): OutboxStats {
    const s = this.#stats;
    const n = (i: number): number => s[i] ?? 0;
    const drops: Record<DropReason, number> = { max_bytes: n(3), max_count: n(4), ttl: n(5), refused: n(6) };
    const leased: Record<string, number> = {};
    for (let i = 0; i < this.sinks.length; i++) leased[this.sinks[i] as string] = n(STATS_FIXED + i);
    return {
      depth: n(0),
      bytes: n(1),
      oldestAgeMs: n(0) === 0 ? 0 : Math.max(0, Date.now() - n(2)),
      drops,
      deadLetters: n(7),
      appended: n(8),
      quarantined: n(9),
      leased,
    };
  }

  /**
   * Closes the SqliteOutbox in the worker (every accepted append is answered first), then ends the
   * worker. Later calls throw or reject ERR_OUTBOX_CLOSED, as with SqliteOutbox.
   */
  close(): Promise<void> {
    this.#closing ??= this.#close();
    return this.#closing;
  }

  async #close(): Promise<void> {
    const wasDead = this.#dead !== undefined;
    // Requests already posted are answered by the worker before it handles the close request.
    const closing = wasDead ? Promise.resolve() : this.#request<void>("close", []);
    this.#closed = true;
    if (this.#clockTimer !== undefined) clearInterval(this.#clockTimer);
    this.#clockTimer = undefined;
    try {
      await closing;
    } finally {
      // Waits the worker's close woke were answered already; anything left ends here.
      this.#rejectAll(closedError());
      this.#terminating = true;
      if (!wasDead) await this.#worker.terminate();
    }
  }

  /**
   * Test/diagnostic hook. `counters`: the worker's count of waits in progress (a leak check).
   * `exit`: the worker exits at once, as a crash would (requests behind it are never answered).
   */
  debug(what: "counters" | "exit" = "counters"): Promise<WorkerDebug> {
    return this.#request("debug", [what]);
  }

  /** Main-side requests awaiting an answer (a leak check for tests). */
  get pendingRequests(): number {
    return this.#pending.size;
  }
}
