import { type Clock, systemClock } from "../../../core/clock.js";
import { M2mError } from "../../../core/errors.js";
import { newMessageId } from "../../ids.js";
import {
  type DeadLetter,
  type DropReason,
  defaultOutboxLimits,
  type LeaseOptions,
  type NewMessage,
  type Outbox,
  type OutboxLimits,
  type OutboxMessage,
  type OutboxStats,
} from "../outbox.js";
import { newWakeState, type WakeState, waitForWake, wake } from "../wake.js";

interface Row {
  readonly seq: number;
  readonly id: string;
  readonly channel: string;
  readonly payload: Uint8Array;
  readonly contentType: string;
  readonly ts: number;
  readonly ingestedAt: number;
  /** Sinks that still need it. */
  readonly pending: Set<string>;
}

interface SinkState extends WakeState {
  readonly leased: Set<string>;
  readonly deferred: Map<string, number>;
  readonly attempts: Map<string, number>;
}

/**
 * A non-durable outbox in process memory: the same contract as the SQLite one minus persistence
 * (runs the contract suite's non-durable part). For tests of components above the outbox and for
 * gateways that explicitly accept losing buffered data on restart. Appends are synchronous here, so
 * "durable" means "in this process".
 */
export class MemoryOutbox implements Outbox {
  readonly sinks: readonly string[];
  readonly #clock: Clock;
  readonly #limits: OutboxLimits;
  readonly #rows = new Map<string, Row>();
  readonly #state = new Map<string, SinkState>();
  readonly #dead: DeadLetter[] = [];
  readonly #drops: Record<DropReason, number> = { max_bytes: 0, max_count: 0, ttl: 0, refused: 0 };
  #seq = 0;
  #bytes = 0;
  #appended = 0;
  #closed = false;

  constructor(options: { sinks: readonly string[]; limits?: Partial<OutboxLimits>; clock?: Clock }) {
    this.sinks = [...options.sinks];
    this.#clock = options.clock ?? systemClock;
    this.#limits = { ...defaultOutboxLimits, ...(options.limits ?? {}) };
    for (const s of this.sinks) {
      this.#state.set(s, {
        leased: new Set(),
        deferred: new Map(),
        attempts: new Map(),
        ...newWakeState(),
      });
    }
  }

  #check(): void {
    if (this.#closed) throw new M2mError("ERR_OUTBOX_CLOSED", "permanent", "the outbox is closed");
  }

  #sink(name: string): SinkState {
    const s = this.#state.get(name);
    if (s === undefined) throw new M2mError("ERR_OUTBOX_SINK_UNKNOWN", "permanent", `unknown sink ${name}`);
    return s;
  }

  #remove(row: Row): void {
    this.#rows.delete(row.id);
    this.#bytes -= row.payload.byteLength;
    for (const s of this.#state.values()) {
      s.leased.delete(row.id);
      s.deferred.delete(row.id);
      s.attempts.delete(row.id);
    }
  }

  append(batch: readonly NewMessage[]): Promise<string[]> {
    this.#check();
    const L = this.#limits;
    const bytes = batch.reduce((a, m) => a + m.payload.byteLength, 0);
    if (batch.some((m) => m.payload.byteLength > L.maxBytes)) {
      return Promise.reject(
        new M2mError(
          "ERR_OUTBOX_MESSAGE_TOO_LARGE",
          "permanent",
          `message larger than the whole outbox (relay.outbox.max_bytes = ${L.maxBytes} bytes)`,
        ),
      );
    }
    if (batch.length > L.maxCount || bytes > L.maxBytes) {
      return Promise.reject(
        new M2mError(
          "ERR_OUTBOX_BATCH_TOO_LARGE",
          "permanent",
          `batch larger than the whole outbox (relay.outbox.max_count = ${L.maxCount}, relay.outbox.max_bytes = ${L.maxBytes} bytes)`,
        ),
      );
    }
    const over = (): boolean =>
      this.#rows.size + batch.length > L.maxCount || this.#bytes + bytes > L.maxBytes;
    if (over()) {
      if (L.dropPolicy === "refuse-new") {
        this.#drops.refused += batch.length;
        return Promise.reject(
          new M2mError("ERR_OUTBOX_FULL", "transient", "the outbox is full", {
            details: { retryAfterMs: 1000 },
          }),
        );
      }
      for (const row of this.#rows.values()) {
        if (!over()) break;
        if (this.#rows.size + batch.length > L.maxCount) this.#drops.max_count++;
        else this.#drops.max_bytes++;
        this.#remove(row);
      }
    }
    const now = this.#clock.now().getTime();
    const ids: string[] = [];
    for (const m of batch) {
      const id = newMessageId(now);
      this.#rows.set(id, {
        seq: ++this.#seq,
        id,
        channel: m.channel,
        payload: new Uint8Array(m.payload),
        contentType: m.contentType ?? "application/json",
        ts: m.ts ?? now,
        ingestedAt: now,
        pending: new Set(this.sinks),
      });
      ids.push(id);
    }
    this.#bytes += bytes;
    this.#appended += batch.length;
    this.#wake();
    return Promise.resolve(ids);
  }

  async lease(sink: string, max: number, options: LeaseOptions = {}): Promise<OutboxMessage[]> {
    this.#check();
    const s = this.#sink(sink);
    s.pendingWake = false;
    const now = this.#clock.monotonicMs();
    const out: OutboxMessage[] = [];
    const blocked = new Set<string>();
    let bytes = 0;
    for (const row of this.#rows.values()) {
      if (out.length >= max) break;
      if (!row.pending.has(sink) || s.leased.has(row.id) || blocked.has(row.channel)) continue;
      const due = s.deferred.get(row.id);
      if (due !== undefined && due > now) {
        blocked.add(row.channel);
        continue;
      }
      if (out.length > 0 && bytes + row.payload.byteLength > (options.maxBytes ?? Number.POSITIVE_INFINITY))
        break;
      s.deferred.delete(row.id);
      const attempt = (s.attempts.get(row.id) ?? 0) + 1;
      s.attempts.set(row.id, attempt);
      s.leased.add(row.id);
      bytes += row.payload.byteLength;
      out.push({ ...row, attempt });
    }
    return out;
  }

  async ack(sink: string, ids: readonly string[]): Promise<void> {
    this.#check();
    const s = this.#sink(sink);
    for (const id of ids) {
      s.leased.delete(id);
      s.attempts.delete(id);
      const row = this.#rows.get(id);
      if (row === undefined) continue;
      row.pending.delete(sink);
      if (row.pending.size === 0) this.#remove(row);
    }
  }

  async nack(sink: string, ids: readonly string[], delayMs = 0): Promise<void> {
    this.#check();
    const s = this.#sink(sink);
    for (const id of ids) {
      if (!s.leased.delete(id)) continue;
      s.deferred.set(id, this.#clock.monotonicMs() + Math.max(0, delayMs));
    }
    this.#wake(sink);
  }

  retryNow(sink: string): void {
    this.#check();
    const s = this.#sink(sink);
    const now = this.#clock.monotonicMs();
    for (const [id, due] of s.deferred) if (due > now) s.deferred.set(id, now);
    this.#wake(sink);
  }

  async deadLetter(sink: string, id: string, reason: string): Promise<void> {
    this.#check();
    const s = this.#sink(sink);
    s.leased.delete(id);
    s.deferred.delete(id);
    s.attempts.delete(id);
    const row = this.#rows.get(id);
    if (row === undefined || !row.pending.has(sink)) return;
    this.#dead.push({
      id,
      sink,
      channel: row.channel,
      payload: row.payload,
      contentType: row.contentType,
      ts: row.ts,
      reason: reason.slice(0, 200),
      at: this.#clock.now().getTime(),
    });
    row.pending.delete(sink);
    if (row.pending.size === 0) this.#remove(row);
  }

  async deadLetters(limit = 100): Promise<DeadLetter[]> {
    return [...this.#dead].reverse().slice(0, limit);
  }

  async expire(): Promise<number> {
    this.#check();
    if (this.#limits.ttlMs <= 0) return 0;
    const cutoff = this.#clock.now().getTime() - this.#limits.ttlMs;
    let n = 0;
    for (const row of this.#rows.values()) {
      if (row.ingestedAt >= cutoff) break;
      this.#remove(row);
      n++;
    }
    this.#drops.ttl += n;
    return n;
  }

  #wake(sink?: string): void {
    for (const [name, s] of this.#state) if (sink === undefined || name === sink) wake(s);
  }

  waitForWork(sink: string, signal?: AbortSignal): Promise<void> {
    const s = this.#sink(sink);
    if (this.#closed) return Promise.resolve();
    return waitForWake(s, this.#clock, Math.min(...s.deferred.values()), signal);
  }

  stats(): OutboxStats {
    const first = this.#rows.values().next().value;
    const leased: Record<string, number> = {};
    for (const [name, s] of this.#state) leased[name] = s.leased.size;
    return {
      depth: this.#rows.size,
      bytes: this.#bytes,
      oldestAgeMs: first === undefined ? 0 : Math.max(0, this.#clock.now().getTime() - first.ingestedAt),
      drops: { ...this.#drops },
      deadLetters: this.#dead.length,
      appended: this.#appended,
      quarantined: 0,
      leased,
    };
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#wake();
  }
}
