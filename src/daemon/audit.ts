import { constants } from "node:fs";
import { mkdir, open } from "node:fs/promises";
import { dirname } from "node:path";
import type { Clock } from "../core/clock.js";
import { M2mError } from "../core/errors.js";
import { type Logger, sanitize } from "../core/log.js";

/** Identity events worth a durable record (who/what changed the device's identity, and when). */
export type AuditEventType =
  | "key_created"
  | "key_destroyed"
  | "enrolled"
  | "enroll_failed"
  | "renewed"
  | "renewal_failed"
  | "rotated"
  | "revoked"
  | "auth_failure"
  | "decommissioned"
  | "reprovision_required"
  | "anomaly";

export interface AuditSink {
  record(event: AuditEventType, fields?: Record<string, unknown>): Promise<void>;
}

/**
 * Append-only JSON-lines audit log: created 0600 from the first byte, every record fsync'ed before
 * `record()` resolves (an identity event that was reported done survives a power cut). Writes are
 * serialized; a failed write is reported to the caller (and logged) and does not poison later writes.
 */
export class AuditLog implements AuditSink {
  readonly path: string;
  readonly #fh: Awaited<ReturnType<typeof open>>;
  readonly #clock: Clock;
  readonly #log: Logger;
  #chain: Promise<void> = Promise.resolve();
  #closed = false;

  private constructor(path: string, fh: Awaited<ReturnType<typeof open>>, clock: Clock, log: Logger) {
    this.path = path;
    this.#fh = fh;
    this.#clock = clock;
    this.#log = log;
  }

  /** @throws ERR_AUDIT_OPEN when the file cannot be opened for appending. */
  static async open(path: string, options: { clock: Clock; log: Logger }): Promise<AuditLog> {
    try {
      await mkdir(dirname(path), { recursive: true, mode: 0o700 });
      const fh = await open(path, constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT, 0o600);
      const st = await fh.stat();
      // The audit trail names devices, registrars and failure causes: keep it private to the agent.
      if ((st.mode & 0o077) !== 0) {
        await fh.chmod(0o600);
        options.log.warn("audit log was accessible by group/others; tightened to 0600", { file: path });
      }
      return new AuditLog(path, fh, options.clock, options.log);
    } catch (err) {
      throw new M2mError("ERR_AUDIT_OPEN", "transient", `cannot open audit log ${path}`, {
        cause: err,
        hint: "check that the state directory exists and is writable by the agent",
        details: { file: path },
      });
    }
  }

  /** @throws ERR_AUDIT_WRITE when the record could not be made durable. */
  record(event: AuditEventType, fields: Record<string, unknown> = {}): Promise<void> {
    if (this.#closed)
      return Promise.reject(new M2mError("ERR_AUDIT_WRITE", "permanent", "audit log is closed"));
    const line = `${JSON.stringify(sanitize({ ts: this.#clock.now().toISOString(), event, ...fields }))}\n`;
    const write = this.#chain.then(async () => {
      try {
        await this.#fh.write(line);
        await this.#fh.sync();
      } catch (err) {
        this.#log.error("audit write failed", { event, error: err });
        throw new M2mError("ERR_AUDIT_WRITE", "transient", "could not append to the audit log", {
          cause: err,
        });
      }
    });
    this.#chain = write.catch(() => undefined);
    return write;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#chain;
    await this.#fh.close();
  }
}

export type AnomalyKind = "auth_failure_burst" | "rate_change";

export interface AnomalyFlag {
  readonly kind: AnomalyKind;
  readonly channel: string;
  /** Wall-clock time the flag was (last) raised, ISO 8601. */
  readonly since: string;
  readonly detail: string;
}

export interface AnomalyOptions {
  readonly clock: Clock;
  /** Auth failures: `threshold` within `windowMs` raises a burst flag. */
  readonly authBurst?: { readonly threshold: number; readonly windowMs: number };
  /**
   * Rate change per channel: counts per fixed window compared with an EWMA baseline; a window above
   * `factor`× or below 1/`factor`× the baseline raises a flag, once the baseline has `warmupWindows`
   * windows and either side reaches `minCount` (tiny rates are noise).
   */
  readonly rate?: {
    readonly windowMs: number;
    readonly factor: number;
    readonly minCount: number;
    readonly warmupWindows: number;
  };
  /** How long a flag stays visible in status after it was last raised. */
  readonly flagTtlMs?: number;
  readonly onFlag?: (flag: AnomalyFlag) => void;
}

interface RateState {
  window: number;
  count: number;
  baseline: number;
  windows: number;
}

/**
 * Simple anomaly flags surfaced in status (not an IDS): bursts of authentication failures and sudden
 * rate changes per relay channel. Time comes from the injected Clock (monotonic for windows).
 */
export class AnomalyDetector {
  readonly #clock: Clock;
  readonly #burst: { threshold: number; windowMs: number };
  readonly #rate: { windowMs: number; factor: number; minCount: number; warmupWindows: number };
  readonly #ttl: number;
  readonly #onFlag: ((flag: AnomalyFlag) => void) | undefined;
  readonly #authFailures = new Map<string, number[]>();
  readonly #rates = new Map<string, RateState>();
  readonly #flags = new Map<string, { flag: AnomalyFlag; until: number }>();

  constructor(options: AnomalyOptions) {
    this.#clock = options.clock;
    this.#burst = options.authBurst ?? { threshold: 5, windowMs: 60_000 };
    this.#rate = options.rate ?? { windowMs: 60_000, factor: 5, minCount: 20, warmupWindows: 3 };
    this.#ttl = options.flagTtlMs ?? 15 * 60_000;
    this.#onFlag = options.onFlag;
  }

  #raise(kind: AnomalyKind, channel: string, detail: string): void {
    const key = `${kind}\u0000${channel}`;
    const now = this.#clock.monotonicMs();
    const existing = this.#flags.get(key);
    // Re-raising an active flag only extends it: one audit record per episode, not per event.
    if (existing !== undefined && existing.until > now) {
      existing.until = now + this.#ttl;
      return;
    }
    const flag: AnomalyFlag = { kind, channel, since: this.#clock.now().toISOString(), detail };
    this.#flags.set(key, { flag, until: now + this.#ttl });
    this.#onFlag?.(flag);
  }

  /** Records one authentication failure on a channel (registrar, token endpoint, broker, local API…). */
  authFailure(channel: string): void {
    const now = this.#clock.monotonicMs();
    const list = (this.#authFailures.get(channel) ?? []).filter((t) => now - t < this.#burst.windowMs);
    list.push(now);
    this.#authFailures.set(channel, list);
    if (list.length >= this.#burst.threshold) {
      this.#raise(
        "auth_failure_burst",
        channel,
        `${list.length} authentication failures within ${Math.round(this.#burst.windowMs / 1000)} s`,
      );
    }
  }

  /** Counts messages on a channel (called by the relay per accepted message or batch). */
  observe(channel: string, count = 1): void {
    const st = this.#roll(channel);
    st.count += count;
  }

  #roll(channel: string): RateState {
    const w = Math.floor(this.#clock.monotonicMs() / this.#rate.windowMs);
    let st = this.#rates.get(channel);
    if (st === undefined) {
      st = { window: w, count: 0, baseline: 0, windows: 0 };
      this.#rates.set(channel, st);
      return st;
    }
    // Close every finished window (silent windows count as 0: a channel going quiet is a change too).
    for (let guard = 0; st.window < w && guard < 1000; guard++) {
      this.#closeWindow(channel, st);
      st.window += 1;
      st.count = 0;
    }
    st.window = w;
    return st;
  }

  #closeWindow(channel: string, st: RateState): void {
    const c = st.count;
    if (st.windows >= this.#rate.warmupWindows && Math.max(c, st.baseline) >= this.#rate.minCount) {
      const f = this.#rate.factor;
      if (c > st.baseline * f || c < st.baseline / f) {
        this.#raise(
          "rate_change",
          channel,
          `${c} messages in the last window vs a baseline of ${st.baseline.toFixed(1)}`,
        );
      }
    }
    st.baseline = st.windows === 0 ? c : 0.3 * c + 0.7 * st.baseline;
    st.windows += 1;
  }

  /** Active flags (expired ones are dropped). */
  flags(): AnomalyFlag[] {
    for (const ch of this.#rates.keys()) this.#roll(ch);
    const now = this.#clock.monotonicMs();
    const out: AnomalyFlag[] = [];
    for (const [k, v] of this.#flags) {
      if (v.until <= now) this.#flags.delete(k);
      else out.push(v.flag);
    }
    return out;
  }
}
