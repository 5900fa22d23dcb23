/**
 * Worker-thread entry of `WorkerOutbox`: runs the unchanged `SqliteOutbox` and answers the main
 * thread's requests (protocol in `protocol.ts`). Started by `WorkerOutbox.open`; never imported.
 */
import { parentPort, workerData } from "node:worker_threads";
import { M2mError } from "../../../core/errors.js";
import type { LogFields, Logger, LogLevel } from "../../../core/log.js";
import type { LeaseOptions, NewMessage, OutboxMessage, OutboxStats } from "../outbox.js";
import { SqliteOutbox } from "../sqlite/sqlite-outbox.js";
import type {
  FromWorker,
  RequestOp,
  ToWorker,
  WireError,
  WireStats,
  WorkerBatch,
  WorkerInit,
} from "./protocol.js";

/** Aborts a wait the main side gave up on (a shared reason: no DOMException per idle pump turn). */
const CANCELLED = Object.freeze({ reason: "wait cancelled" });

function toWire(err: unknown): WireError {
  if (err instanceof M2mError) {
    return {
      code: err.code,
      retry: err.retry,
      message: err.message,
      ...(Object.keys(err.details).length === 0 ? {} : { details: err.details }),
      ...(err.hint === undefined ? {} : { hint: err.hint }),
    };
  }
  // A raw driver error (e.g. SQLITE_IOERR from a lease query): a storage failure to the caller.
  const code = (err as { code?: unknown } | null)?.code;
  return {
    code: "ERR_OUTBOX_IO",
    retry: "transient",
    message: `the outbox store failed${typeof code === "string" ? ` (${code})` : ""}`,
  };
}

/** Errors do not survive structured clone usefully (and may carry a cause chain): keep the safe part. */
function plainFields(fields: LogFields | undefined): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  if (fields === undefined) return out;
  for (const [k, v] of Object.entries(fields)) {
    if (v instanceof M2mError) out[k] = v.toJSON();
    else if (v instanceof Error) {
      const code = (v as { code?: unknown }).code;
      out[k] = { name: v.name, ...(typeof code === "string" ? { code } : {}), message: v.message };
    } else out[k] = v;
  }
  return out;
}

function portLogger(post: (m: FromWorker) => void, base: LogFields): Logger {
  const emit =
    (level: LogLevel) =>
    (msg: string, fields?: LogFields): void =>
      post({ k: "l", level, msg, fields: plainFields({ ...base, ...fields }) });
  return {
    debug: emit("debug"),
    info: emit("info"),
    warn: emit("warn"),
    error: emit("error"),
    child: (fields) => portLogger(post, { ...base, ...fields }),
  };
}

function wireStats(s: OutboxStats, sinks: readonly string[]): WireStats {
  // The worker's clock is the system clock, like the main side's: the main side recomputes the age
  // from this timestamp so that `oldestAgeMs` keeps growing between snapshots.
  const out: WireStats = [
    s.depth,
    s.bytes,
    s.depth === 0 ? 0 : Date.now() - s.oldestAgeMs,
    s.drops.max_bytes,
    s.drops.max_count,
    s.drops.ttl,
    s.drops.refused,
    s.deadLetters,
    s.appended,
    s.quarantined,
  ];
  for (const name of sinks) out.push(s.leased[name] ?? 0);
  return out;
}

function sameStats(a: WireStats, b: WireStats): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/**
 * A payload viewing part of a bigger buffer would be cloned with that whole buffer (structured clone
 * copies the backing ArrayBuffer): copy just the bytes then. better-sqlite3 BLOBs normally own theirs.
 */
function ownBytes(p: Uint8Array): Uint8Array {
  return p.byteOffset === 0 && p.byteLength === p.buffer.byteLength ? p : p.slice();
}

function main(): void {
  const port = parentPort;
  if (port === null) throw new Error("outbox-worker.js runs only as a worker thread");
  const init = workerData as WorkerInit;
  // Everything produced in one turn leaves in one post (see WorkerBatch), stats taken at that point.
  let out: FromWorker[] = [];
  let flushScheduled = false;
  let statsDue = false;
  let snapshot: () => WireStats | undefined = () => undefined;
  const flush = (): void => {
    flushScheduled = false;
    const m = out;
    out = [];
    const s = statsDue ? snapshot() : undefined;
    statsDue = false;
    const batch: WorkerBatch = s === undefined ? { m } : { m, s };
    port.postMessage(batch);
  };
  const post = (m: FromWorker | undefined, withStats = false): void => {
    if (m !== undefined) out.push(m);
    if (withStats) statsDue = true;
    if (!flushScheduled) {
      flushScheduled = true;
      setImmediate(flush);
    }
  };
  let trusted = init.clockTrusted;
  let outbox: SqliteOutbox;
  try {
    outbox = SqliteOutbox.open({
      ...init.options,
      logger: portLogger(post, {}),
      clockTrusted: () => trusted,
      onQuarantine: (movedTo) => post({ k: "q", movedTo }),
    });
  } catch (err) {
    // Nothing else is running: the worker ends by itself once this message is out.
    post({ k: "o", ok: false, error: toWire(err) });
    return;
  }
  const ob = outbox;
  const sinks = ob.sinks;
  let lastStats: WireStats = [];
  snapshot = () => {
    lastStats = wireStats(ob.stats(), sinks);
    return lastStats;
  };
  post({ k: "o", ok: true }, true);

  // Drops by the TTL timer change stats without any request: push them when they changed.
  const statsTimer = setInterval(() => {
    const prev = lastStats;
    if (!sameStats(prev, wireStats(ob.stats(), sinks))) post(undefined, true);
  }, init.statsPushMs);

  /** waitForWork requests in progress, by request id. */
  const waits = new Map<number, AbortController>();

  const reply = (id: number, value: unknown): void => post({ k: "r", id, ok: true, value }, true);
  const fail = (id: number, err: unknown): void => post({ k: "r", id, ok: false, error: toWire(err) }, true);

  const call = (op: RequestOp, a: readonly unknown[]): Promise<unknown> | unknown => {
    switch (op) {
      case "append":
        return ob.append(a[0] as readonly NewMessage[]);
      case "lease":
        return ob.lease(a[0] as string, a[1] as number, a[2] as LeaseOptions | undefined).then((ms) => {
          for (const m of ms) (m as { payload: Uint8Array }).payload = ownBytes((m as OutboxMessage).payload);
          return ms;
        });
      case "ack":
        return ob.ack(a[0] as string, a[1] as readonly string[]);
      case "nack":
        return ob.nack(a[0] as string, a[1] as readonly string[], a[2] as number | undefined);
      case "deadLetter":
        return ob.deadLetter(a[0] as string, a[1] as string, a[2] as string);
      case "deadLetters":
        return ob.deadLetters(a[0] as number | undefined);
      case "expire":
        return ob.expire();
      case "close":
        return ob.close().then(() => {
          clearInterval(statsTimer);
          for (const ac of waits.values()) ac.abort(CANCELLED);
          waits.clear();
        });
      case "debug":
        // `exit` simulates a crash of the worker (tests); anything else reports counters.
        if (a[0] === "exit") process.exit(70);
        return { waits: waits.size };
      case "waitForWork":
        // Handled in the message listener (it needs the request id for cancellation).
        throw new M2mError("ERR_INTERNAL", "permanent", "waitForWork is not a plain call");
      default: {
        const never: never = op;
        throw new M2mError("ERR_INTERNAL", "permanent", `unknown outbox request ${String(never)}`);
      }
    }
  };

  const handle = (m: ToWorker): void => {
    switch (m.op) {
      case "clock":
        trusted = m.args[0];
        return;
      case "retryNow":
        try {
          ob.retryNow(m.args[0]);
        } catch (err) {
          // Fire-and-forget: closed or unknown sink was already checked on the main side.
          post({ k: "l", level: "debug", msg: "outbox retryNow failed", fields: plainFields({ err }) });
        }
        return;
      case "cancel": {
        const ac = waits.get(m.id);
        if (ac !== undefined) {
          waits.delete(m.id);
          ac.abort(CANCELLED);
        }
        return;
      }
      case "waitForWork": {
        const id = m.id;
        const ac = new AbortController();
        waits.set(id, ac);
        let w: Promise<void>;
        try {
          w = ob.waitForWork(m.args[0] as string, ac.signal);
        } catch (err) {
          waits.delete(id);
          fail(id, err);
          return;
        }
        // A cancelled wait is not answered: the main side already settled it.
        w.then(
          () => {
            if (waits.delete(id)) reply(id, undefined);
          },
          (err: unknown) => {
            if (waits.delete(id)) fail(id, err);
          },
        );
        return;
      }
      default: {
        if (m.trusted !== undefined) trusted = m.trusted;
        const id = m.id;
        // Called synchronously: appends arriving in one batch of messages share one group commit.
        let r: unknown;
        try {
          r = call(m.op, m.args);
        } catch (err) {
          fail(id, err);
          return;
        }
        if (r instanceof Promise)
          r.then(
            (v: unknown) => reply(id, v),
            (err: unknown) => fail(id, err),
          );
        else reply(id, r);
      }
    }
  };
  // In order, synchronously: appends arriving in one batch share one group commit.
  port.on("message", (batch: readonly ToWorker[]) => {
    for (const m of batch) handle(m);
  });
}

main();
