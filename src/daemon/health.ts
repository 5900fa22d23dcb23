import type { Clock } from "../core/clock.js";
import type { ErrorCode } from "../core/error-codes.js";
import { asM2mError } from "../core/errors.js";
import type { JwsAlgorithm, KeyEvidence, KeyHealth, KeyInfo, KeyProvider } from "../keys/key-provider.js";
import type { Lifecycle } from "./lifecycle.js";
import type { AgentMetrics } from "./metrics.js";

/**
 * A degraded reason: a catalogue code first, then what happened in words
 * (`ERR_OUTBOX_CORRUPT: corrupt outbox quarantined to …`). The type makes the code impossible to forget.
 */
export type HealthReason = `${ErrorCode}: ${string}`;

/** The code of a reason (the text before the first `: `). */
export function reasonCode(reason: HealthReason): ErrorCode {
  return reason.slice(0, reason.indexOf(": ")) as ErrorCode; // Why the cast: HealthReason starts with one.
}

/** A reason from any failure: its code (or `fallback` for a foreign error), then `prefix` and its message. */
export function healthReasonOf(
  err: unknown,
  prefix = "",
  fallback: ErrorCode = "ERR_INTERNAL",
): HealthReason {
  const e = asM2mError(err, fallback);
  return `${e.code}: ${prefix}${e.message}`;
}

/**
 * Health reasons by component ("clock", "key", "relay.mqtt", …). Any reason present puts the agent in
 * degraded(reasons); when the last one clears it recovers. Components never touch the lifecycle
 * directly, so two faults cannot race each other's recovery.
 */
export class HealthBoard {
  readonly #reasons = new Map<string, HealthReason>();
  readonly #lifecycle: Lifecycle;

  constructor(lifecycle: Lifecycle) {
    this.#lifecycle = lifecycle;
  }

  set(component: string, reason: HealthReason | undefined): void {
    const before = this.#reasons.get(component);
    if (reason === undefined) this.#reasons.delete(component);
    else this.#reasons.set(component, reason);
    if (before !== reason) this.apply();
  }

  get reasons(): Readonly<Record<string, HealthReason>> {
    return Object.fromEntries(this.#reasons);
  }

  /** The codes of the current reasons, by component (for status and metrics). */
  get codes(): Readonly<Record<string, ErrorCode>> {
    return Object.fromEntries([...this.#reasons].map(([c, r]) => [c, reasonCode(r)]));
  }

  get summary(): string | undefined {
    if (this.#reasons.size === 0) return undefined;
    return [...this.#reasons.entries()].map(([c, r]) => `${c}: ${r}`).join("; ");
  }

  /** Pushes the board into the lifecycle (called on changes and after ready/reload). */
  apply(): void {
    const state = this.#lifecycle.state.name;
    if (state !== "running" && state !== "degraded" && state !== "reloading") return;
    const summary = this.summary;
    if (summary !== undefined) {
      const cur = this.#lifecycle.state;
      if (!(cur.name === "degraded" && cur.reason === summary))
        this.#lifecycle.dispatch({ type: "degrade", reason: summary });
    } else if (state === "degraded" || state === "reloading") {
      this.#lifecycle.dispatch({ type: "recover" });
    }
  }
}

/**
 * Tracks in-flight operations that can hang (TPM calls, HSM calls). `hung()` is true when one has
 * been pending longer than `hangAfterMs`: the watchdog then stops pinging so systemd restarts us.
 */
export class OperationWatch {
  readonly #clock: Clock;
  readonly #hangAfterMs: number;
  readonly #pending = new Map<number, { op: string; started: number }>();
  #next = 0;

  constructor(clock: Clock, hangAfterMs: number) {
    this.#clock = clock;
    this.#hangAfterMs = hangAfterMs;
  }

  start(op: string): () => void {
    const id = this.#next++;
    this.#pending.set(id, { op, started: this.#clock.monotonicMs() });
    return () => {
      this.#pending.delete(id);
    };
  }

  /** The oldest operation stuck past the deadline, if any. */
  hung(): { op: string; pendingMs: number } | undefined {
    const now = this.#clock.monotonicMs();
    let worst: { op: string; pendingMs: number } | undefined;
    for (const p of this.#pending.values()) {
      const pendingMs = now - p.started;
      if (pendingMs > this.#hangAfterMs && (worst === undefined || pendingMs > worst.pendingMs))
        worst = { op: p.op, pendingMs };
    }
    return worst;
  }
}

/**
 * Wraps a KeyProvider so every operation is timed into metrics, failures are counted by stable code,
 * and in-flight calls are visible to the hang watch. Behaviour is otherwise unchanged.
 */
export function instrumentKeyProvider(
  inner: KeyProvider,
  metrics: AgentMetrics,
  watch: OperationWatch,
  clock: Clock,
): KeyProvider {
  const backend = inner.kind;
  async function timed<T>(op: string, fn: () => Promise<T>): Promise<T> {
    const done = watch.start(`${backend}.${op}`);
    const t0 = clock.monotonicMs();
    try {
      return await fn();
    } catch (err) {
      metrics.keyOpErrors.inc({ backend, op, code: asM2mError(err).code });
      throw err;
    } finally {
      done();
      metrics.keyOpDuration.observe({ backend, op }, (clock.monotonicMs() - t0) / 1000);
    }
  }
  return {
    kind: inner.kind,
    createOrOpen: (): Promise<KeyInfo> => timed("create_or_open", () => inner.createOrOpen()),
    open: (): Promise<KeyInfo> => timed("open", () => inner.open()),
    sign: (data: Uint8Array, alg?: JwsAlgorithm): Promise<Uint8Array> =>
      timed("sign", () => inner.sign(data, alg)),
    evidence: (): Promise<KeyEvidence> => timed("evidence", () => inner.evidence()),
    destroy: (): Promise<void> => timed("destroy", () => inner.destroy()),
    health: async (): Promise<KeyHealth> => {
      const h = await timed("health", () => inner.health());
      if (!h.ok) metrics.keyOpErrors.inc({ backend, op: "health", code: h.code ?? "ERR_KEY_HEALTH" });
      return h;
    },
    close: (): Promise<void> => inner.close(),
    // Capabilities pass through unchanged: callers probe them on the instrumented key too.
    ...(inner.attestation === undefined ? {} : { attestation: inner.attestation }),
    ...(inner.tlsClient === undefined ? {} : { tlsClient: inner.tlsClient }),
  };
}
