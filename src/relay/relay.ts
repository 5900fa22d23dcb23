import { type Clock, systemClock } from "../core/clock.js";
import type { ErrorCode } from "../core/error-codes.js";
import { asM2mError, type M2mError } from "../core/errors.js";
import { type Logger, silentLogger } from "../core/log.js";
import { backoffDelay, defaultRetryPolicy, type RetryPolicy } from "../core/retry.js";
import type { Outbox, OutboxMessage } from "./outbox/outbox.js";
import { type DeliveryOutcome, deadLetterReason, type Sink } from "./sinks/sink.js";

/** Resolves when `signal` aborts; the listener is removed (and the promise freed) once `until` aborts. */
function abortedOr(signal: AbortSignal, until: AbortSignal): Promise<void> {
  return new Promise<void>((resolve) => {
    if (signal.aborted) resolve();
    else signal.addEventListener("abort", () => resolve(), { once: true, signal: until });
  });
}

export interface RelayOptions {
  readonly outbox: Outbox;
  readonly sinks: readonly Sink[];
  /** Backoff for sink failures (base/factor/cap/jitter; maxAttempts and deadline are ignored: we never give up). */
  readonly retry?: RetryPolicy;
  /**
   * The failure count (and so the backoff) only resets after the sink has delivered without a failure
   * for this long: a flapping broker does not get hammered at the base delay. Default 30 s.
   */
  readonly stableAfterMs?: number;
  readonly clock?: Clock;
  readonly logger?: Logger;
  readonly random?: () => number;
  /**
   * While a sink with a `probe` is paused in backoff, it is probed this often (default 1000 ms). A
   * probe that sees the upstream come back (down, then up, within one pause) ends the pause at once,
   * so a backlog starts draining within about this interval of the broker returning. The backoff
   * level is untouched: a flapping upstream still gets the full jittered delays.
   */
  readonly probeIntervalMs?: number;
  /**
   * A sink that has delivered nothing successfully for this long while it had work (every attempt
   * failed or it sat in backoff) is reported by `unhealthy()`. Default 10 000 ms.
   */
  readonly unhealthyAfterMs?: number;
  /**
   * A gate in front of every sink: while it returns an error (e.g. `ERR_CLOCK_UNTRUSTED`), nothing
   * is leased, delivered or probed — no connection is opened — and the messages stay in the outbox.
   * Polled every `holdPollMs` (default 1000 ms; it must be cheap, e.g. a comparison). When it opens,
   * delivery resumes at once with the backoff reset.
   */
  readonly hold?: () => M2mError | undefined;
  readonly holdPollMs?: number;
}

/** A sink that cannot deliver (see `Relay.unhealthy`). */
export interface SinkTrouble {
  readonly sink: string;
  /** Code of the most recent failure (e.g. `ERR_MQTT_CONNECT`). */
  readonly code: ErrorCode;
  /** How long (ms) since the first failure without a success after it. */
  readonly forMs: number;
  /** True when the relay's `hold` gate keeps the sink idle (reported at once, not after the threshold). */
  readonly held?: boolean;
}

export interface SinkCounters {
  delivered: number;
  retried: number;
  deadLettered: number;
  failures: number;
  inFlight: number;
  /** Consecutive-failure level driving the backoff. */
  backoffLevel: number;
  lastError: ErrorCode | undefined;
  /** Monotonic ms of the first failure not followed by a success (undefined: delivering fine). */
  failingSince: number | undefined;
  /** Pauses ended early because a probe saw the upstream return. */
  probeWakeups: number;
  /** The `hold` gate's code while it keeps this sink idle (undefined: not held). */
  heldBy: ErrorCode | undefined;
}

/** Reason for aborting internal waits: a shared value, so no DOMException is built per wait (hot loop). */
const WAIT_DONE = Object.freeze({ reason: "wait done" });

const relayPolicy: RetryPolicy = { ...defaultRetryPolicy, baseMs: 100, capMs: 30_000 };

/**
 * The delivery loop: one pump per sink. Starts immediately (no backlog scan), keeps the sink's window
 * full, acks on success, dead-letters refusals, and on retry outcomes nacks them and pauses the sink
 * with full-jitter backoff (or the upstream's capped Retry-After).
 */
export class Relay {
  readonly #o: RelayOptions;
  readonly #clock: Clock;
  readonly #log: Logger;
  readonly #policy: RetryPolicy;
  readonly #abort = new AbortController();
  readonly #pumps: Promise<void>[] = [];
  readonly counters: Record<string, SinkCounters> = {};

  constructor(options: RelayOptions) {
    this.#o = options;
    this.#clock = options.clock ?? systemClock;
    this.#log = options.logger ?? silentLogger;
    this.#policy = options.retry ?? relayPolicy;
    for (const s of options.sinks) {
      this.counters[s.name] = {
        delivered: 0,
        retried: 0,
        deadLettered: 0,
        failures: 0,
        inFlight: 0,
        backoffLevel: 0,
        lastError: undefined,
        failingSince: undefined,
        probeWakeups: 0,
        heldBy: undefined,
      };
    }
  }

  start(): void {
    for (const sink of this.#o.sinks) {
      this.#pumps.push(
        this.#pump(sink).catch((err: unknown) => {
          if (!this.#abort.signal.aborted) this.#log.error("relay pump stopped", { sink: sink.name, err });
        }),
      );
    }
  }

  /**
   * Sinks that have not delivered for longer than `unhealthyAfterMs` (every attempt failed or backed
   * off), with the last error code: the daemon turns these into a degraded state with a reason.
   */
  unhealthy(): SinkTrouble[] {
    const limit = this.#o.unhealthyAfterMs ?? 10_000;
    const now = this.#clock.monotonicMs();
    const out: SinkTrouble[] = [];
    for (const [sink, c] of Object.entries(this.counters)) {
      if (c.heldBy !== undefined) {
        out.push({ sink, code: c.heldBy, forMs: now - (c.failingSince ?? now), held: true });
        continue;
      }
      if (c.failingSince === undefined || now - c.failingSince < limit) continue;
      out.push({ sink, code: c.lastError ?? "ERR_SINK_DELIVER", forMs: now - c.failingSince });
    }
    return out;
  }

  /**
   * Sleeps until `until()` (monotonic) but probes the sink meanwhile; returns early when a probe saw
   * the upstream down and a later one sees it up. A first probe that already succeeds (the upstream
   * answers TCP but refused us for another reason) never shortens the pause: no hammering.
   */
  async #pauseWithProbe(sink: Sink, until: () => number, c: SinkCounters): Promise<void> {
    const signal = this.#abort.signal;
    const every = this.#o.probeIntervalMs ?? 1000;
    const probe = sink.probe;
    let sawDown = false;
    for (;;) {
      const left = until() - this.#clock.monotonicMs();
      if (left <= 0 || signal.aborted) return;
      // Held (clock untrusted): not even a TCP probe; the pump waits at its gate instead.
      if (this.#o.hold?.() !== undefined) return;
      if (probe === undefined || left <= every) {
        await this.#clock.sleep(left, signal).catch(() => undefined);
        continue;
      }
      const up = await probe.call(sink).catch(() => false);
      if (signal.aborted) return;
      if (!up) sawDown = true;
      else if (sawDown) {
        c.probeWakeups++;
        this.#log.info("upstream reachable again; retrying now", { sink: sink.name });
        return;
      } else {
        // Reachable from the start: the failure was not about reachability; wait the full backoff.
        await this.#clock
          .sleep(Math.max(0, until() - this.#clock.monotonicMs()), signal)
          .catch(() => undefined);
        return;
      }
      await this.#clock
        .sleep(Math.min(every, Math.max(0, until() - this.#clock.monotonicMs())), signal)
        .catch(() => undefined);
    }
  }

  /** Stops leasing, waits for in-flight deliveries to settle (their outcomes are still recorded). */
  async stop(): Promise<void> {
    this.#abort.abort();
    await Promise.all(this.#pumps);
  }

  async #linger(
    sink: Sink,
    first: OutboxMessage[],
    want: number,
    lingerMs: number,
    aborted: (until: AbortSignal) => Promise<void>,
  ): Promise<OutboxMessage[]> {
    const { outbox } = this.#o;
    const batch = [...first];
    const deadline = this.#clock.monotonicMs() + lingerMs;
    let bytes = batch.reduce((a, m) => a + m.payload.byteLength, 0);
    const maxBytes = sink.maxBatchBytes ?? Number.POSITIVE_INFINITY;
    while (batch.length < want && bytes < maxBytes) {
      const left = deadline - this.#clock.monotonicMs();
      if (left <= 0) break;
      const ctl = new AbortController();
      await Promise.race([
        outbox.waitForWork(sink.name, ctl.signal),
        this.#clock.sleep(left, ctl.signal).catch(() => undefined),
        aborted(ctl.signal),
      ]);
      ctl.abort(WAIT_DONE);
      if (this.#abort.signal.aborted) break;
      const more = await outbox.lease(sink.name, want - batch.length, {
        maxBytes: Math.max(1, maxBytes - bytes),
      });
      // lease returns at least one message even above maxBytes: keep the batch within its cap.
      let full = false;
      for (const [i, m] of more.entries()) {
        if (bytes + m.payload.byteLength > maxBytes) {
          // Hand back this one and everything after it (keeps per-channel order).
          await outbox.nack(
            sink.name,
            more.slice(i).map((x) => x.id),
          );
          full = true;
          break;
        }
        bytes += m.payload.byteLength;
        batch.push(m);
      }
      if (full) break;
    }
    return batch;
  }

  async #pump(sink: Sink): Promise<void> {
    const { outbox } = this.#o;
    const c = this.counters[sink.name] as SinkCounters;
    const signal = this.#abort.signal;
    let pausedUntil = 0;
    let lastFailureAt = Number.NEGATIVE_INFINITY;
    const inflight = new Set<Promise<void>>();
    let wake: (() => void) | undefined;
    let settled = false;
    const poke = (): void => {
      settled = true;
      const w = wake;
      wake = undefined;
      w?.();
    };
    // One promise per wait, released with its race: racing a single long-lived promise instead adds
    // a reaction to it at every wait, kept until stop (daemon-soak: +2.7 MiB/min heap at 1.5k msg/s).
    const aborted = (until: AbortSignal): Promise<void> => abortedOr(signal, until);

    const handle = async (batch: readonly OutboxMessage[], outcomes: DeliveryOutcome[]): Promise<void> => {
      const ok: string[] = [];
      const retry: { id: string; delayMs?: number; code: ErrorCode }[] = [];
      for (const o of outcomes) {
        if (o.kind === "ok") ok.push(o.id);
        else if (o.kind === "retry") retry.push(o);
        else {
          c.deadLettered++;
          const reason = deadLetterReason(o);
          this.#log.warn("message dead-lettered", { sink: sink.name, id: o.id, reason });
          await outbox.deadLetter(sink.name, o.id, reason);
        }
      }
      // Anything the sink forgot to report is retried, never dropped.
      const reported = new Set(outcomes.map((o) => o.id));
      for (const m of batch) if (!reported.has(m.id)) retry.push({ id: m.id, code: "ERR_SINK_NO_OUTCOME" });
      if (ok.length > 0) {
        c.delivered += ok.length;
        c.failingSince = undefined;
        // Not awaited: the outbox forgets the leases at once (so the window frees now); the commit
        // follows in the next group. A lost ack only means a redelivery (same id).
        outbox
          .ack(sink.name, ok)
          .catch((err: unknown) => this.#log.warn("ack commit failed", { err: asM2mError(err) }));
        if (this.#clock.monotonicMs() - lastFailureAt >= (this.#o.stableAfterMs ?? 30_000))
          c.backoffLevel = 0;
      }
      if (retry.length > 0) {
        c.retried += retry.length;
        c.failures++;
        c.backoffLevel++;
        lastFailureAt = this.#clock.monotonicMs();
        if (ok.length === 0) c.failingSince ??= lastFailureAt;
        const first = retry[0];
        c.lastError = first?.code;
        const hinted = Math.max(0, ...retry.map((r) => r.delayMs ?? 0));
        const jittered = backoffDelay(this.#policy, c.backoffLevel, this.#o.random);
        const delay = hinted > 0 ? Math.min(hinted, this.#policy.maxRetryAfterMs) : jittered;
        pausedUntil = Math.max(pausedUntil, this.#clock.monotonicMs() + delay);
        this.#log.info("delivery failed; backing off", {
          sink: sink.name,
          code: first?.code,
          messages: retry.length,
          delayMs: delay,
          level: c.backoffLevel,
        });
        await outbox.nack(
          sink.name,
          retry.map((r) => r.id),
          delay,
        );
      }
    };

    while (!signal.aborted) {
      // The gate (clock untrusted): no lease, no delivery, no probe — nothing leaves the host.
      const held = this.#o.hold?.();
      if (held !== undefined) {
        if (c.heldBy === undefined) {
          this.#log.warn("delivery held", { sink: sink.name, code: held.code, reason: held.message });
          c.failingSince ??= this.#clock.monotonicMs();
        }
        c.heldBy = held.code;
        c.lastError = held.code;
        await this.#clock.sleep(this.#o.holdPollMs ?? 1000, signal).catch(() => undefined);
        continue;
      }
      if (c.heldBy !== undefined) {
        // Released: what backed off before the hold is due now; the hold was not the upstream's fault.
        this.#log.info("delivery resumed", { sink: sink.name, after: c.heldBy });
        c.heldBy = undefined;
        c.failingSince = undefined;
        c.backoffLevel = 0;
        pausedUntil = 0;
        try {
          outbox.retryNow(sink.name);
        } catch {
          // Closed while stopping: the loop ends on the abort.
        }
      }
      const now = this.#clock.monotonicMs();
      if (now < pausedUntil) {
        // Let in-flight deliveries finish during the pause; their failures may extend it.
        await this.#pauseWithProbe(sink, () => pausedUntil, c);
        // A probe may have ended the pause early: the deferred messages are due now too.
        if (this.#clock.monotonicMs() < pausedUntil) {
          pausedUntil = 0;
          try {
            outbox.retryNow(sink.name);
          } catch {
            // Closed while stopping: the loop ends on the abort.
          }
        }
        continue;
      }
      const room = sink.maxInFlight - c.inFlight;
      let batch: OutboxMessage[] = [];
      settled = false;
      if (room > 0) {
        try {
          batch = await outbox.lease(
            sink.name,
            Math.min(room, sink.maxBatch),
            sink.maxBatchBytes === undefined ? {} : { maxBytes: sink.maxBatchBytes },
          );
          // Time-bounded batching: a partial batch waits up to `lingerMs` for more messages.
          const want = Math.min(room, sink.maxBatch);
          const linger = sink.lingerMs ?? 0;
          if (batch.length > 0 && batch.length < want && linger > 0) {
            batch = await this.#linger(sink, batch, want, linger, aborted);
          }
        } catch (err) {
          if (signal.aborted) break;
          this.#log.error("outbox lease failed", { err: asM2mError(err) });
          await this.#clock.sleep(1000, signal).catch(() => undefined);
          continue;
        }
      }
      if (batch.length === 0) {
        // A delivery settled while we leased: its outcome may have freed room or nacked work.
        if (settled) continue;
        // Nothing to send (or the window is full): wait for new work or a delivery to settle.
        const ctl = new AbortController();
        await Promise.race([
          room > 0 ? outbox.waitForWork(sink.name, ctl.signal) : new Promise<void>(() => undefined),
          new Promise<void>((r) => {
            wake = r;
          }),
          aborted(ctl.signal),
        ]);
        wake = undefined;
        ctl.abort(WAIT_DONE);
        continue;
      }
      c.inFlight += batch.length;
      const p: Promise<void> = sink
        .deliver(batch)
        .catch((err: unknown): DeliveryOutcome[] => {
          const e = asM2mError(err, "ERR_SINK_DELIVER");
          return batch.map((m) => ({ id: m.id, kind: "retry", code: e.code }));
        })
        .then((outcomes) => handle(batch, outcomes))
        .catch((err: unknown) =>
          this.#log.error("recording delivery outcome failed", { err: asM2mError(err) }),
        )
        .finally(() => {
          c.inFlight -= batch.length;
          inflight.delete(p);
          poke();
        });
      inflight.add(p);
    }
    await Promise.all(inflight);
  }
}
