import {
  chmodSync,
  closeSync,
  constants,
  existsSync,
  fdatasync,
  fstatSync,
  fsyncSync,
  openSync,
  renameSync,
  statSync,
} from "node:fs";
import { createRequire } from "node:module";
import { dirname } from "node:path";
import { Worker } from "node:worker_threads";
import Database from "better-sqlite3";
import { type Clock, systemClock } from "../../../core/clock.js";
import { M2mError } from "../../../core/errors.js";
import { type Logger, silentLogger } from "../../../core/log.js";
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

export interface SqliteOutboxOptions {
  /** Database file path (e.g. `/var/lib/m2m-agent/outbox.db`). */
  readonly path: string;
  /** Sinks every message must reach (at most 30). Removing a sink later releases its messages. */
  readonly sinks: readonly string[];
  readonly limits?: Partial<OutboxLimits>;
  /**
   * `FULL` (default) fsyncs the WAL on every commit: acknowledged data survives a power cut.
   * `NORMAL` only survives a process crash (measured in docs/outbox.md; kept for the benchmark).
   */
  readonly synchronous?: "FULL" | "NORMAL";
  /**
   * How FULL is achieved. `async-wal` (default): commit with SQLite's NORMAL (no fsync on the event
   * loop), then fdatasync the WAL file in libuv's thread pool and answer the appenders of every commit
   * it covered; `inline`: SQLite's own synchronous=FULL (fsync inside the commit, blocking the loop).
   */
  readonly fsyncMode?: "async-wal" | "inline";
  readonly clock?: Clock;
  readonly logger?: Logger;
  /** How often the TTL is applied (ms); 0 disables the timer (call `expire()` yourself). */
  readonly ttlCheckMs?: number;
  /** Suggested client back-off when refusing new messages. */
  readonly refuseRetryAfterMs?: number;
  /** Called when a corrupt file was renamed aside at open. */
  readonly onQuarantine?: (movedTo: string) => void;
  /**
   * TTL drops are skipped while this says the wall clock cannot be trusted (e.g. an RTC reset at
   * boot, before NTP): a clock jumping years ahead must not expire the whole backlog. Default: trusted.
   */
  readonly clockTrusted?: () => boolean;
}

interface MessageRow {
  seq: number;
  id: string;
  channel: string;
  payload: Buffer;
  content_type: string;
  ts: number;
  ingested_at: number;
  size: number;
  pending: number;
}

interface SinkState extends WakeState {
  readonly bit: number;
  /** id → seq of messages handed out and not yet acked/nacked. */
  readonly leased: Map<string, number>;
  /** id → when it may be leased again (monotonic ms) and its seq/channel (FIFO blocking). */
  readonly deferred: Map<string, { seq: number; channel: string; dueAt: number }>;
  readonly attempts: Map<string, number>;
  /** Frontier: every row with seq <= highWater is leased, acked, deferred or gone for this sink. */
  highWater: number;
}

type Op =
  | {
      kind: "append";
      batch: readonly NewMessage[];
      resolve: (ids: string[]) => void;
      reject: (e: unknown) => void;
    }
  | {
      kind: "ack";
      sink: SinkState;
      /** Leased messages, by seq (primary key: one statement per chunk). */
      seqs: readonly number[];
      /** Ids this process never leased (e.g. acked across a reopen): looked up by id. */
      ids: readonly string[];
      resolve: () => void;
      reject: (e: unknown) => void;
    }
  | {
      kind: "dead";
      sinkName: string;
      sink: SinkState;
      id: string;
      reason: string;
      resolve: () => void;
      reject: (e: unknown) => void;
    }
  | { kind: "expire"; resolve: (n: number) => void; reject: (e: unknown) => void };

/** Rows per multi-row INSERT (8 parameters each; far below SQLite's variable limit). */
const INSERT_CHUNK = 50;
/** Seqs per batched ack statement. */
const ACK_CHUNK = 500;
/** Longest an ack waits to share a commit with other acks (an append flushes them at once). */
const ACK_COALESCE_MS = 4;
/** Bounds of the in-memory tail (see `#tail`): beyond them leases read SQLite, as after a restart. */
const TAIL_MAX_ROWS = 4096;
const TAIL_MAX_BYTES = 2 * 1024 * 1024;

/**
 * A committed row kept in memory for leasing. `pending` mirrors the row's sink bits for the cases a
 * lease can meet (drops and acks of never-leased ids clear them); 0 = gone.
 */
interface TailRow {
  readonly seq: number;
  readonly id: string;
  readonly channel: string;
  readonly payload: Buffer;
  readonly contentType: string;
  readonly ts: number;
  readonly ingestedAt: number;
  pending: number;
}

const META_KEYS = [
  "count",
  "bytes",
  "appended",
  "dead_letters",
  "quarantined",
  "drop_max_bytes",
  "drop_max_count",
  "drop_ttl",
  "drop_refused",
] as const;
type MetaKey = (typeof META_KEYS)[number];

const SCHEMA = `
CREATE TABLE IF NOT EXISTS messages(
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  id TEXT NOT NULL,
  channel TEXT NOT NULL,
  payload BLOB NOT NULL,
  content_type TEXT NOT NULL,
  ts INTEGER NOT NULL,
  ingested_at INTEGER NOT NULL,
  size INTEGER NOT NULL,
  pending INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_id ON messages(id);
CREATE TABLE IF NOT EXISTS dead_letters(
  id TEXT NOT NULL,
  sink TEXT NOT NULL,
  channel TEXT NOT NULL,
  payload BLOB NOT NULL,
  content_type TEXT NOT NULL,
  ts INTEGER NOT NULL,
  reason TEXT NOT NULL,
  at INTEGER NOT NULL,
  PRIMARY KEY(id, sink)
);
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sinks(name TEXT PRIMARY KEY, bit INTEGER NOT NULL);
`;

/**
 * Checkpoints run on their own connection in a worker thread: a checkpoint fsyncs the WAL and the
 * database file, which on the event loop stalls every request for tens of ms (p99 ingest latency).
 * Plain JS evaluated as a CommonJS worker so it runs the same from TypeScript tests and compiled code.
 */
const CHECKPOINTER_JS = `
const { parentPort, workerData } = require("node:worker_threads");
const Database = require(workerData.driver);
const db = new Database(workerData.path);
db.pragma("busy_timeout = 5000");
parentPort.on("message", (m) => {
  if (m === "close") { db.close(); parentPort.close(); return; }
  try { db.pragma("wal_checkpoint(PASSIVE)"); parentPort.postMessage({ ok: true }); }
  catch (e) { parentPort.postMessage({ ok: false, error: String((e && e.code) || e) }); }
});
`;
/**
 * Makes the outbox files owner-only before SQLite opens them: the database is created 0600 from the
 * first byte (SQLite gives the -wal/-shm it creates later the database file's mode, whatever the
 * umask), and files left 0644 by an older version are tightened. Why: the outbox holds the payloads
 * producers handed over, which other local users must not read.
 */
export function privateDbFiles(path: string): void {
  closeSync(openSync(path, constants.O_RDWR | constants.O_CREAT, 0o600));
  for (const suffix of ["", "-wal", "-shm"]) {
    try {
      if ((statSync(path + suffix).mode & 0o077) !== 0) chmodSync(path + suffix, 0o600);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw err;
    }
  }
}

/** Start a background checkpoint when the WAL exceeds this many bytes. */
const CHECKPOINT_BYTES = 8 * 1024 * 1024;

const SCAN_PAGE = 512;
const MAX_SCAN_PAGES = 16;

function isCorruption(err: unknown): boolean {
  const code = (err as { code?: unknown }).code;
  return typeof code === "string" && (code.startsWith("SQLITE_CORRUPT") || code === "SQLITE_NOTADB");
}

/**
 * The SQLite outbox (better-sqlite3, WAL, synchronous=FULL by default): chosen by measurement, see
 * docs/outbox.md. Writes (appends, acks, dead-letters, TTL) queued within one tick are applied in ONE
 * transaction with ONE fsync (group commit). Depth, bytes and counters live in a `meta` row updated
 * in the same transaction, so opening never scans the backlog.
 */
export class SqliteOutbox implements Outbox {
  readonly sinks: readonly string[];
  readonly #db: Database.Database;
  readonly #clock: Clock;
  readonly #log: Logger;
  readonly #limits: OutboxLimits;
  readonly #refuseRetryAfterMs: number;
  readonly #clockTrusted: () => boolean;
  readonly #state = new Map<string, SinkState>();
  readonly #allBits: number;
  #meta: Record<MetaKey, number>;
  /** The values last committed to `meta`: a commit rewrites only the counters that changed. */
  #metaWritten: Partial<Record<MetaKey, number>> = {};
  #queue: Op[] = [];
  #flushScheduled = false;
  /** A short timer collecting acks into one commit (no append waiting): see ACK_COALESCE_MS. */
  #ackTimer: NodeJS.Timeout | undefined;
  #closed = false;
  readonly #synchronous: "FULL" | "NORMAL";
  #currentSync: "FULL" | "NORMAL";
  readonly #asyncWal: boolean;
  readonly #walPath: string;
  #walFd: number | undefined;
  /** Appenders whose commit happened but is not yet covered by a WAL fdatasync. */
  #awaitingSync: (() => void)[] = [];
  #syncFailures: ((e: unknown) => void)[] = [];
  #syncing = false;
  #checkpointer: Worker | undefined;
  readonly #insertByRows = new Map<number, Database.Statement>();
  #checkpointing = false;
  #ttlTimer: NodeJS.Timeout | undefined;
  /**
   * The newest committed rows, in seq order (`#tailHead` is the first live index). Every row with
   * seq >= `#tailStart` that this process committed is here, so a sink that has leased everything
   * below (`highWater + 1 >= #tailStart`) and has nothing deferred leases from memory instead of a
   * SELECT: that query was ≈ 13 % of the relay's CPU at full rate. Rows from before a restart, and
   * rows evicted by the bounds, are read from SQLite as before.
   */
  #tail: TailRow[] = [];
  #tailHead = 0;
  #tailStart = Number.POSITIVE_INFINITY;
  #tailBytes = 0;
  /** Rows inserted by the running transaction: join `#tail` only once it committed. */
  #tailPending: TailRow[] = [];
  readonly #stmts: {
    insert: Database.Statement;
    ackDeleteOnly: Database.Statement;
    ackClear: Database.Statement;
    ackDeleteDone: Database.Statement;
    setMeta: Database.Statement;
    oldest: Database.Statement;
    scan: Database.Statement;
    byId: Database.Statement;
    clearBit: Database.Statement;
    deleteIfDone: Database.Statement;
    deleteIfOnly: Database.Statement;
    dropOldest: Database.Statement;
    headAges: Database.Statement;
    deleteUpTo: Database.Statement;
    insertDead: Database.Statement;
    deadList: Database.Statement;
  };

  private constructor(db: Database.Database, options: SqliteOutboxOptions, quarantined: boolean) {
    this.#db = db;
    this.#clock = options.clock ?? systemClock;
    this.#log = options.logger ?? silentLogger;
    this.#limits = { ...defaultOutboxLimits, ...(options.limits ?? {}) };
    this.#refuseRetryAfterMs = options.refuseRetryAfterMs ?? 1000;
    this.#clockTrusted = options.clockTrusted ?? (() => true);
    this.#synchronous = options.synchronous ?? "FULL";
    this.#asyncWal = this.#synchronous === "FULL" && (options.fsyncMode ?? "async-wal") === "async-wal";
    this.#walPath = `${options.path}-wal`;
    this.#walFd = undefined;
    // With async-wal the connection itself never fsyncs on commit; durability comes from #syncWal.
    this.#currentSync = this.#asyncWal ? "NORMAL" : this.#synchronous;
    db.pragma(`synchronous = ${this.#currentSync}`);
    if (this.#asyncWal) {
      // Checkpoints move to the worker (see CHECKPOINTER_JS); the event loop never runs one.
      db.pragma("wal_autocheckpoint = 0");
      this.#checkpointer = new Worker(CHECKPOINTER_JS, {
        eval: true,
        workerData: { driver: createRequire(import.meta.url).resolve("better-sqlite3"), path: options.path },
      });
      this.#checkpointer.unref();
      this.#checkpointer.on("message", (m: { ok: boolean; error?: string }) => {
        this.#checkpointing = false;
        if (!m.ok) this.#log.warn("outbox checkpoint failed", { sqlite: m.error });
      });
      this.#checkpointer.on("error", (err) => {
        this.#checkpointing = false;
        this.#log.error("outbox checkpointer crashed", { err });
      });
    }
    this.sinks = [...options.sinks];
    if (this.sinks.length === 0 || this.sinks.length > 30) {
      throw new M2mError("ERR_OUTBOX_CONFIG", "permanent", "an outbox needs 1 to 30 sinks");
    }
    db.exec(SCHEMA);
    this.#meta = Object.fromEntries(META_KEYS.map((k) => [k, 0])) as Record<MetaKey, number>;
    for (const row of db.prepare("SELECT k, v FROM meta").all() as { k: string; v: number }[]) {
      if ((META_KEYS as readonly string[]).includes(row.k)) this.#meta[row.k as MetaKey] = row.v;
    }
    if (quarantined) this.#meta.quarantined += 1;
    this.#stmts = {
      insert: db.prepare(
        "INSERT INTO messages(id, channel, payload, content_type, ts, ingested_at, size, pending) VALUES (?,?,?,?,?,?,?,?)",
      ),
      ackDeleteOnly: db.prepare(
        "DELETE FROM messages WHERE seq IN (SELECT value FROM json_each(?)) AND pending = ? RETURNING size",
      ),
      ackClear: db.prepare(
        "UPDATE messages SET pending = pending & ? WHERE seq IN (SELECT value FROM json_each(?))",
      ),
      ackDeleteDone: db.prepare(
        "DELETE FROM messages WHERE seq IN (SELECT value FROM json_each(?)) AND pending = 0 RETURNING size",
      ),
      setMeta: db.prepare("INSERT INTO meta(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v"),
      oldest: db.prepare("SELECT ingested_at FROM messages ORDER BY seq LIMIT 1"),
      scan: db.prepare(
        "SELECT seq, id, channel, payload, content_type, ts, ingested_at, size, pending FROM messages WHERE seq >= ? AND (pending & ?) != 0 ORDER BY seq LIMIT ?",
      ),
      byId: db.prepare(
        "SELECT seq, id, channel, payload, content_type, ts, ingested_at, size, pending FROM messages WHERE id = ?",
      ),
      clearBit: db.prepare("UPDATE messages SET pending = pending & ? WHERE id = ?"),
      deleteIfDone: db.prepare("DELETE FROM messages WHERE id = ? AND pending = 0 RETURNING size"),
      deleteIfOnly: db.prepare("DELETE FROM messages WHERE id = ? AND pending = ? RETURNING size"),
      dropOldest: db.prepare(
        "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages ORDER BY seq LIMIT ?) RETURNING id, size",
      ),
      headAges: db.prepare("SELECT seq, ingested_at FROM messages ORDER BY seq LIMIT ?"),
      deleteUpTo: db.prepare("DELETE FROM messages WHERE seq <= ? RETURNING id, size"),
      insertDead: db.prepare(
        "INSERT OR REPLACE INTO dead_letters(id, sink, channel, payload, content_type, ts, reason, at) VALUES (?,?,?,?,?,?,?,?)",
      ),
      deadList: db.prepare(
        "SELECT id, sink, channel, payload, content_type, ts, reason, at FROM dead_letters ORDER BY at DESC, rowid DESC LIMIT ?",
      ),
    };
    this.#allBits = this.#registerSinks();
    this.#writeMeta();
    this.#metaWritten = { ...this.#meta };
    const ttlCheckMs = options.ttlCheckMs ?? 60_000;
    if (ttlCheckMs > 0 && this.#limits.ttlMs > 0) {
      this.#ttlTimer = setInterval(() => {
        this.expire().catch((err: unknown) => this.#log.warn("outbox TTL sweep failed", { err }));
      }, ttlCheckMs);
      this.#ttlTimer.unref();
    }
  }

  /**
   * Opens (or creates) the outbox. A file SQLite reports as corrupt or not a database is renamed to
   * `<path>.corrupt-<ts>` (with its -wal/-shm) and a fresh outbox is started: counted and logged,
   * never deleted.
   * @throws ERR_OUTBOX_OPEN when the file cannot be opened for another reason.
   */
  static open(options: SqliteOutboxOptions): SqliteOutbox {
    const log = options.logger ?? silentLogger;
    try {
      return new SqliteOutbox(SqliteOutbox.#openDb(options), options, false);
    } catch (err) {
      if (!isCorruption(err)) {
        throw new M2mError("ERR_OUTBOX_OPEN", "permanent", "cannot open the outbox database", {
          cause: err,
          hint: "check the state directory permissions and free disk space",
        });
      }
      const stamp = (options.clock ?? systemClock).now().toISOString().replace(/[:.]/g, "-");
      const movedTo = `${options.path}.corrupt-${stamp}`;
      for (const suffix of ["", "-wal", "-shm"]) {
        if (existsSync(options.path + suffix)) renameSync(options.path + suffix, movedTo + suffix);
      }
      log.error("outbox database is corrupt: quarantined and started fresh", {
        code: "ERR_OUTBOX_CORRUPT",
        movedTo,
      });
      options.onQuarantine?.(movedTo);
      return new SqliteOutbox(SqliteOutbox.#openDb(options), options, true);
    }
  }

  static #openDb(options: SqliteOutboxOptions): Database.Database {
    if (options.path !== ":memory:") privateDbFiles(options.path);
    const db = new Database(options.path);
    try {
      // Touch the header and schema: garbage or a truncated file fails here with NOTADB / CORRUPT.
      db.pragma("journal_mode = WAL");
      db.pragma(`synchronous = ${options.synchronous ?? "FULL"}`);
      db.pragma("journal_size_limit = 67108864");
      db.prepare("SELECT count(*) FROM sqlite_master").get();
      return db;
    } catch (err) {
      db.close();
      throw err;
    }
  }

  #registerSinks(): number {
    const rows = this.#db.prepare("SELECT name, bit FROM sinks").all() as { name: string; bit: number }[];
    const known = new Map(rows.map((r) => [r.name, r.bit]));
    const used = new Set(rows.map((r) => r.bit));
    let all = 0;
    const tx = this.#db.transaction(() => {
      for (const name of this.sinks) {
        let bit = known.get(name);
        if (bit === undefined) {
          bit = 0;
          while (used.has(bit)) bit++;
          used.add(bit);
          this.#db.prepare("INSERT INTO sinks(name, bit) VALUES (?, ?)").run(name, bit);
        }
        all |= 1 << bit;
        this.#state.set(name, {
          bit: 1 << bit,
          leased: new Map(),
          deferred: new Map(),
          attempts: new Map(),
          highWater: 0,
          ...newWakeState(),
        });
      }
      // A sink removed from the configuration no longer holds messages back (rare; one scan).
      for (const [name, bit] of known) {
        if (this.sinks.includes(name)) continue;
        this.#db
          .prepare("UPDATE messages SET pending = pending & ? WHERE (pending & ?) != 0")
          .run(~(1 << bit), 1 << bit);
        const freed = this.#db.prepare("DELETE FROM messages WHERE pending = 0 RETURNING size").all() as {
          size: number;
        }[];
        this.#meta.count -= freed.length;
        this.#meta.bytes -= freed.reduce((a, r) => a + r.size, 0);
        this.#db.prepare("DELETE FROM sinks WHERE name = ?").run(name);
      }
    });
    tx();
    return all;
  }

  #writeMeta(): void {
    for (const k of META_KEYS) {
      if (this.#metaWritten[k] !== this.#meta[k]) this.#stmts.setMeta.run(k, this.#meta[k]);
    }
  }

  #sink(name: string): SinkState {
    const s = this.#state.get(name);
    if (s === undefined) throw new M2mError("ERR_OUTBOX_SINK_UNKNOWN", "permanent", `unknown sink ${name}`);
    return s;
  }

  #checkOpen(): void {
    if (this.#closed) throw new M2mError("ERR_OUTBOX_CLOSED", "permanent", "the outbox is closed");
  }

  #enqueue(op: Op): void {
    this.#queue.push(op);
    if (op.kind === "ack" && !this.#flushScheduled) {
      // Acks need no fsync and nobody waits on them: gather a few milliseconds' worth into one commit
      // (fewer transactions and WAL frames while the delivery side runs at full speed).
      this.#ackTimer ??= setTimeout(() => {
        this.#ackTimer = undefined;
        if (!this.#flushScheduled) this.#flush();
      }, ACK_COALESCE_MS);
      return;
    }
    if (!this.#flushScheduled) {
      if (this.#ackTimer !== undefined) clearTimeout(this.#ackTimer);
      this.#ackTimer = undefined;
      this.#flushScheduled = true;
      // setImmediate: every append issued in this tick (e.g. by several HTTP requests parsed in the
      // same I/O phase) joins the same transaction and fsync.
      setImmediate(() => this.#flush());
    }
  }

  append(batch: readonly NewMessage[]): Promise<string[]> {
    this.#checkOpen();
    if (batch.length === 0) return Promise.resolve([]);
    return new Promise((resolve, reject) => this.#enqueue({ kind: "append", batch, resolve, reject }));
  }

  ack(sink: string, ids: readonly string[]): Promise<void> {
    this.#checkOpen();
    const s = this.#sink(sink);
    const seqs: number[] = [];
    const unknown: string[] = [];
    for (const id of ids) {
      const seq = s.leased.get(id) ?? s.deferred.get(id)?.seq;
      if (seq === undefined) unknown.push(id);
      else {
        seqs.push(seq);
        this.#tailClearSeq(seq, s.bit);
      }
      s.leased.delete(id);
      s.attempts.delete(id);
      s.deferred.delete(id);
    }
    return new Promise((resolve, reject) =>
      this.#enqueue({ kind: "ack", sink: s, seqs, ids: unknown, resolve, reject }),
    );
  }

  deadLetter(sink: string, id: string, reason: string): Promise<void> {
    this.#checkOpen();
    const s = this.#sink(sink);
    const seq = s.leased.get(id) ?? s.deferred.get(id)?.seq;
    if (seq !== undefined) this.#tailClearSeq(seq, s.bit);
    s.leased.delete(id);
    s.attempts.delete(id);
    s.deferred.delete(id);
    return new Promise((resolve, reject) =>
      this.#enqueue({
        kind: "dead",
        sinkName: sink,
        sink: s,
        id,
        reason: reason.slice(0, 200),
        resolve,
        reject,
      }),
    );
  }

  expire(): Promise<number> {
    this.#checkOpen();
    return new Promise((resolve, reject) => this.#enqueue({ kind: "expire", resolve, reject }));
  }

  #flush(): void {
    this.#flushScheduled = false;
    const ops = this.#queue;
    this.#queue = [];
    if (ops.length === 0 || this.#closed) {
      for (const op of ops) op.reject(new M2mError("ERR_OUTBOX_CLOSED", "permanent", "the outbox is closed"));
      return;
    }
    const metaBefore = { ...this.#meta };
    // Only appends need fsync-on-commit (they answer producers). Acks, dead-letters and TTL drops
    // committed without an fsync are at worst replayed after a power cut (a duplicate delivery,
    // which at-least-once allows); the next appending commit fsyncs the WAL up to and including them.
    const wanted = ops.some((o) => o.kind === "append") && !this.#asyncWal ? this.#synchronous : "NORMAL";
    if (wanted !== this.#currentSync) {
      this.#db.pragma(`synchronous = ${wanted}`);
      this.#currentSync = wanted;
    }
    const results: (() => void)[] = [];
    const dropped: string[] = [];
    const tx = this.#db.transaction(() => {
      for (const op of ops) {
        switch (op.kind) {
          case "append": {
            const r = this.#applyAppend(op.batch, dropped);
            if (r instanceof M2mError) results.push(() => op.reject(r));
            else if (this.#asyncWal) {
              // Answered only once an fdatasync of the WAL that started after this commit completes.
              results.push(() => {
                this.#awaitingSync.push(() => op.resolve(r));
                this.#syncFailures.push(op.reject);
              });
            } else results.push(() => op.resolve(r));
            break;
          }
          case "ack":
            for (let i = 0; i < op.seqs.length; i += ACK_CHUNK) {
              const chunk = op.seqs.slice(i, i + ACK_CHUNK);
              const json = JSON.stringify(chunk);
              // Single-sink fast path: the last sink to ack deletes the whole chunk in one statement.
              const gone = this.#stmts.ackDeleteOnly.all(json, op.sink.bit) as { size: number }[];
              for (const g of gone) {
                this.#meta.count -= 1;
                this.#meta.bytes -= g.size;
              }
              if (gone.length === chunk.length) continue;
              // Other sinks still need some of them: clear our bit, delete what nobody needs any more.
              this.#stmts.ackClear.run(~op.sink.bit, json);
              for (const g of this.#stmts.ackDeleteDone.all(json) as { size: number }[]) {
                this.#meta.count -= 1;
                this.#meta.bytes -= g.size;
              }
            }
            if (op.ids.length > 0) this.#tailClear(new Set(op.ids), op.sink.bit);
            for (const id of op.ids) {
              // Single-sink fast path: the last sink to ack deletes in one statement.
              const gone = this.#stmts.deleteIfOnly.get(id, op.sink.bit) as { size: number } | undefined;
              if (gone !== undefined) {
                this.#meta.count -= 1;
                this.#meta.bytes -= gone.size;
                continue;
              }
              this.#stmts.clearBit.run(~op.sink.bit, id);
              this.#deleteIfDone(id);
            }
            results.push(() => op.resolve());
            break;
          case "dead": {
            const row = this.#stmts.byId.get(op.id) as MessageRow | undefined;
            if (row !== undefined && (row.pending & op.sink.bit) !== 0) {
              this.#stmts.insertDead.run(
                row.id,
                op.sinkName,
                row.channel,
                row.payload,
                row.content_type,
                row.ts,
                op.reason,
                this.#clock.now().getTime(),
              );
              this.#meta.dead_letters += 1;
              this.#stmts.clearBit.run(~op.sink.bit, op.id);
              this.#deleteIfDone(op.id);
            }
            results.push(() => op.resolve());
            break;
          }
          case "expire": {
            const n = this.#applyTtl(dropped);
            results.push(() => op.resolve(n));
            break;
          }
        }
      }
      this.#writeMeta();
    });
    try {
      tx();
    } catch (err) {
      this.#meta = metaBefore;
      this.#tailPending = [];
      const e = new M2mError("ERR_OUTBOX_IO", "transient", "the outbox could not commit", {
        cause: err,
        hint: "check free disk space and that the state directory is writable",
      });
      this.#log.error("outbox commit failed", { err: e, sqlite: String((err as { code?: unknown }).code) });
      for (const op of ops) op.reject(e);
      return;
    }
    this.#metaWritten = { ...this.#meta };
    this.#joinTail();
    this.#forget(dropped);
    for (const r of results) r();
    if (this.#awaitingSync.length > 0) this.#syncWal();
    if (ops.some((o) => o.kind === "append")) this.#wake();
  }

  /**
   * fdatasync of the WAL off the event loop. Everything committed before the call is durable when it
   * completes (same guarantee as SQLite's synchronous=FULL in WAL mode, which fsyncs the WAL at
   * commit). Commits made meanwhile wait for the next round: natural group commit.
   */
  #syncWal(): void {
    if (this.#syncing) return;
    const covered = this.#awaitingSync;
    const failures = this.#syncFailures;
    this.#awaitingSync = [];
    this.#syncFailures = [];
    this.#syncing = true;
    const done = (err: NodeJS.ErrnoException | null): void => {
      this.#syncing = false;
      if (err !== null) {
        const e = new M2mError("ERR_OUTBOX_IO", "transient", "the outbox could not sync its journal", {
          cause: err,
          hint: "check the disk and the state directory",
        });
        this.#log.error("outbox WAL fdatasync failed", { err: e });
        for (const f of failures) f(e);
      } else {
        for (const c of covered) c();
        this.#maybeCheckpoint();
      }
      if (this.#awaitingSync.length > 0) this.#syncWal();
    };
    try {
      if (this.#walFd === undefined) {
        this.#walFd = openSync(this.#walPath, "r+");
        // The WAL's directory entry must be durable too (first use only).
        const dfd = openSync(dirname(this.#walPath), "r");
        try {
          fsyncSync(dfd);
        } finally {
          closeSync(dfd);
        }
      }
      fdatasync(this.#walFd, done);
    } catch (err) {
      done(err as NodeJS.ErrnoException);
    }
  }

  #maybeCheckpoint(): void {
    if (this.#checkpointing || this.#checkpointer === undefined || this.#walFd === undefined) return;
    if (fstatSync(this.#walFd).size < CHECKPOINT_BYTES) return;
    this.#checkpointing = true;
    this.#checkpointer.postMessage("checkpoint");
  }

  #deleteIfDone(id: string): void {
    const gone = this.#stmts.deleteIfDone.get(id) as { size: number } | undefined;
    if (gone !== undefined) {
      this.#meta.count -= 1;
      this.#meta.bytes -= gone.size;
    }
  }

  #applyAppend(batch: readonly NewMessage[], dropped: string[]): string[] | M2mError {
    const L = this.#limits;
    let bytes = 0;
    for (const m of batch) {
      if (m.payload.byteLength > L.maxBytes) {
        return new M2mError(
          "ERR_OUTBOX_MESSAGE_TOO_LARGE",
          "permanent",
          `message larger than the whole outbox (relay.outbox.max_bytes = ${L.maxBytes} bytes)`,
        );
      }
      bytes += m.payload.byteLength;
    }
    if (batch.length > L.maxCount || bytes > L.maxBytes) {
      return new M2mError(
        "ERR_OUTBOX_BATCH_TOO_LARGE",
        "permanent",
        `batch larger than the whole outbox (relay.outbox.max_count = ${L.maxCount}, relay.outbox.max_bytes = ${L.maxBytes} bytes)`,
      );
    }
    const overCount = this.#meta.count + batch.length - L.maxCount;
    const overBytes = this.#meta.bytes + bytes - L.maxBytes;
    if (overCount > 0 || overBytes > 0) {
      if (L.dropPolicy === "refuse-new") {
        this.#meta.drop_refused += batch.length;
        return new M2mError("ERR_OUTBOX_FULL", "transient", "the outbox is full", {
          details: { retryAfterMs: this.#refuseRetryAfterMs },
          hint: "the upstream is not keeping up; messages are refused until the backlog drains",
        });
      }
      // Oldest first: delete from the head until both limits hold. Counted by the limit that forced it.
      while (this.#meta.count + batch.length > L.maxCount || this.#meta.bytes + bytes > L.maxBytes) {
        const byCount = this.#meta.count + batch.length > L.maxCount;
        const rows = this.#stmts.dropOldest.all(1) as { id: string; size: number }[];
        const row = rows[0];
        if (row === undefined) break;
        this.#meta.count -= 1;
        this.#meta.bytes -= row.size;
        if (byCount) this.#meta.drop_max_count += 1;
        else this.#meta.drop_max_bytes += 1;
        dropped.push(row.id);
      }
    }
    const now = this.#clock.now().getTime();
    const ids: string[] = [];
    // Multi-row INSERTs (one statement per INSERT_CHUNK rows): far fewer VM round trips per batch.
    for (let i = 0; i < batch.length; i += INSERT_CHUNK) {
      const n = Math.min(INSERT_CHUNK, batch.length - i);
      const params: unknown[] = new Array(n * 8);
      for (let j = 0; j < n; j++) {
        const m = batch[i + j] as NewMessage;
        const id = newMessageId(now);
        ids.push(id);
        const k = j * 8;
        params[k] = id;
        params[k + 1] = m.channel;
        params[k + 2] = Buffer.from(m.payload.buffer, m.payload.byteOffset, m.payload.byteLength);
        params[k + 3] = m.contentType ?? "application/json";
        params[k + 4] = m.ts ?? now;
        params[k + 5] = now;
        params[k + 6] = m.payload.byteLength;
        params[k + 7] = this.#allBits;
      }
      const info = this.#insertRows(n).run(params);
      // AUTOINCREMENT: the rows of one statement get consecutive seqs ending at lastInsertRowid.
      const first = Number(info.lastInsertRowid) - n + 1;
      for (let j = 0; j < n; j++) {
        const k = j * 8;
        this.#tailPending.push({
          seq: first + j,
          id: params[k] as string,
          channel: params[k + 1] as string,
          // A private copy: the caller's buffer (often a view of a request body) may be reused.
          payload: Buffer.from(params[k + 2] as Buffer),
          contentType: params[k + 3] as string,
          ts: params[k + 4] as number,
          ingestedAt: now,
          pending: this.#allBits,
        });
      }
    }
    this.#meta.count += batch.length;
    this.#meta.bytes += bytes;
    this.#meta.appended += batch.length;
    return ids;
  }

  /** `INSERT … VALUES (…),(…)` for `n` rows, prepared once per size. */
  #insertRows(n: number): Database.Statement {
    let st = this.#insertByRows.get(n);
    if (st === undefined) {
      const row = "(?,?,?,?,?,?,?,?)";
      st = this.#db.prepare(
        `INSERT INTO messages(id, channel, payload, content_type, ts, ingested_at, size, pending) VALUES ${Array(n).fill(row).join(",")}`,
      );
      this.#insertByRows.set(n, st);
    }
    return st;
  }

  #applyTtl(dropped: string[]): number {
    if (this.#limits.ttlMs <= 0) return 0;
    // Age is wall-clock time: with an untrusted clock, keep everything (bounded by bytes/count anyway).
    if (!this.#clockTrusted()) {
      this.#log.warn("outbox TTL skipped: wall clock not trusted", { code: "ERR_CLOCK_UNTRUSTED" });
      return 0;
    }
    const cutoff = this.#clock.now().getTime() - this.#limits.ttlMs;
    let total = 0;
    for (;;) {
      // The head is (nearly) ordered by ingest time: delete the expired prefix without a table scan.
      const head = this.#stmts.headAges.all(1000) as { seq: number; ingested_at: number }[];
      let last = -1;
      for (const r of head) {
        if (r.ingested_at >= cutoff) break;
        last = r.seq;
      }
      if (last < 0) break;
      const rows = this.#stmts.deleteUpTo.all(last) as { id: string; size: number }[];
      for (const r of rows) {
        this.#meta.bytes -= r.size;
        dropped.push(r.id);
      }
      this.#meta.count -= rows.length;
      this.#meta.drop_ttl += rows.length;
      total += rows.length;
      if (head.length < 1000 || rows.length === 0) break;
    }
    return total;
  }

  /** Dropped messages leave every sink's in-memory lease/defer state. */
  #forget(ids: readonly string[]): void {
    if (ids.length === 0) return;
    this.#tailClear(new Set(ids), 0);
    for (const s of this.#state.values()) {
      for (const id of ids) {
        s.leased.delete(id);
        s.deferred.delete(id);
        s.attempts.delete(id);
      }
    }
  }

  #joinTail(): void {
    const rows = this.#tailPending;
    if (rows.length === 0) return;
    this.#tailPending = [];
    const first = rows[0] as TailRow;
    const lastSeq =
      this.#tail.length > this.#tailHead ? (this.#tail[this.#tail.length - 1] as TailRow).seq : -1;
    if (lastSeq >= 0 && first.seq !== lastSeq + 1) {
      // Not contiguous (never expected with AUTOINCREMENT): start over rather than hide a row.
      this.#tail = [];
      this.#tailHead = 0;
      this.#tailBytes = 0;
      this.#tailStart = first.seq;
    } else if (lastSeq < 0) {
      this.#tail = [];
      this.#tailHead = 0;
      this.#tailBytes = 0;
      this.#tailStart = first.seq;
    }
    for (const r of rows) {
      this.#tail.push(r);
      this.#tailBytes += r.payload.byteLength;
    }
    this.#trimTail();
  }

  /** Drops tail rows every sink has leased, then enforces the bounds (evicted rows stay in SQLite). */
  #trimTail(): void {
    let low = Number.POSITIVE_INFINITY;
    for (const st of this.#state.values()) low = Math.min(low, st.highWater);
    const tail = this.#tail;
    let h = this.#tailHead;
    while (h < tail.length) {
      const r = tail[h] as TailRow;
      if (r.seq > low && tail.length - h <= TAIL_MAX_ROWS && this.#tailBytes <= TAIL_MAX_BYTES) break;
      this.#tailBytes -= r.payload.byteLength;
      h++;
    }
    if (h >= tail.length) {
      this.#tail = [];
      this.#tailHead = 0;
      this.#tailBytes = 0;
      // Empty tail: only rows committed from now on are in memory.
      this.#tailStart = tail.length > 0 ? (tail[tail.length - 1] as TailRow).seq + 1 : this.#tailStart;
      return;
    }
    this.#tailStart = (tail[h] as TailRow).seq;
    if (h > 4096 && h * 2 > tail.length) {
      this.#tail = tail.slice(h);
      h = 0;
    }
    this.#tailHead = h;
  }

  /**
   * The sink is done with this row (ack / dead letter). Needed because a row leased while a channel
   * was blocked can lie above the sink's frontier, where a tail lease would otherwise see it again.
   */
  #tailClearSeq(seq: number, bit: number): void {
    if (seq < this.#tailStart) return;
    const r = this.#tail[this.#tailHead + (seq - this.#tailStart)];
    if (r !== undefined && r.seq === seq) r.pending &= ~bit;
  }

  /** Clears `bits` (0 = every bit: the row is gone) of tail rows whose id is in `ids`. */
  #tailClear(ids: ReadonlySet<string>, bits: number): void {
    const tail = this.#tail;
    for (let i = this.#tailHead; i < tail.length; i++) {
      const r = tail[i] as TailRow;
      if (ids.has(r.id)) r.pending = bits === 0 ? 0 : r.pending & ~bits;
    }
  }

  /**
   * The common case: nothing deferred and everything below the tail already leased, so the next
   * rows in seq order are exactly what the SELECT would return (no channel can be blocked).
   */
  #leaseTail(s: SinkState, max: number, options: LeaseOptions): OutboxMessage[] {
    const out: OutboxMessage[] = [];
    const maxBytes = options.maxBytes ?? Number.POSITIVE_INFINITY;
    const tail = this.#tail;
    let i = this.#tailHead + Math.max(0, s.highWater + 1 - this.#tailStart);
    let bytes = 0;
    for (; i < tail.length && out.length < max; i++) {
      const r = tail[i] as TailRow;
      if ((r.pending & s.bit) === 0 || s.leased.has(r.id)) {
        // Gone for this sink, or leased by an earlier scan above a since-unblocked channel.
        s.highWater = r.seq;
        continue;
      }
      const size = r.payload.byteLength;
      if (out.length > 0 && bytes + size > maxBytes) break;
      bytes += size;
      const attempt = (s.attempts.get(r.id) ?? 0) + 1;
      s.attempts.set(r.id, attempt);
      s.leased.set(r.id, r.seq);
      s.highWater = r.seq;
      out.push({
        id: r.id,
        seq: r.seq,
        channel: r.channel,
        payload: r.payload,
        contentType: r.contentType,
        ts: r.ts,
        ingestedAt: r.ingestedAt,
        attempt,
      });
    }
    if (out.length > 0) this.#trimTail();
    return out;
  }

  async lease(sink: string, max: number, options: LeaseOptions = {}): Promise<OutboxMessage[]> {
    this.#checkOpen();
    const s = this.#sink(sink);
    s.pendingWake = false;
    const now = this.#clock.monotonicMs();
    if (s.deferred.size === 0 && s.highWater + 1 >= this.#tailStart) return this.#leaseTail(s, max, options);
    let from = s.highWater + 1;
    for (const d of s.deferred.values()) from = Math.min(from, d.seq);
    // Leased rows are never rescanned: each ends acked, nacked (→ deferred) or dropped.
    const out: OutboxMessage[] = [];
    const blocked = new Set<string>();
    /** False once a row was skipped for a blocked channel: `highWater` then stops advancing. */
    let contiguous = true;
    let bytes = 0;
    const maxBytes = options.maxBytes ?? Number.POSITIVE_INFINITY;
    // Usually nothing is skipped (leased rows lie below `from`), so the first page is just what is
    // wanted; deferred/blocked channels make later pages bigger.
    let pageSize = Math.min(SCAN_PAGE, max + s.deferred.size);
    for (let page = 0; page < MAX_SCAN_PAGES && out.length < max; page++) {
      const rows = this.#stmts.scan.all(from, s.bit, pageSize) as MessageRow[];
      for (const row of rows) {
        from = row.seq + 1;
        if (s.leased.has(row.id)) continue;
        const d = s.deferred.get(row.id);
        // Per-channel FIFO: nothing of a channel passes its earliest deferred message.
        if (blocked.has(row.channel)) {
          // Skipped, not leased and not deferred: the frontier must stay below it or it is never
          // leased once the deferral ends (a later scan starts at highWater + 1).
          if (d === undefined) contiguous = false;
          continue;
        }
        if (d !== undefined && d.dueAt > now) {
          blocked.add(row.channel);
          continue;
        }
        if (out.length > 0 && bytes + row.size > maxBytes) {
          page = MAX_SCAN_PAGES;
          break;
        }
        s.deferred.delete(row.id);
        const attempt = (s.attempts.get(row.id) ?? 0) + 1;
        s.attempts.set(row.id, attempt);
        s.leased.set(row.id, row.seq);
        if (contiguous) s.highWater = Math.max(s.highWater, row.seq);
        bytes += row.size;
        out.push({
          id: row.id,
          seq: row.seq,
          channel: row.channel,
          payload: row.payload,
          contentType: row.content_type,
          ts: row.ts,
          ingestedAt: row.ingested_at,
          attempt,
        });
        if (out.length >= max) break;
      }
      if (rows.length < pageSize) break;
      pageSize = SCAN_PAGE;
    }
    return out;
  }

  async nack(sink: string, ids: readonly string[], delayMs = 0): Promise<void> {
    this.#checkOpen();
    const s = this.#sink(sink);
    const dueAt = this.#clock.monotonicMs() + Math.max(0, delayMs);
    for (const id of ids) {
      const seq = s.leased.get(id);
      if (seq === undefined) continue;
      s.leased.delete(id);
      const row = this.#stmts.byId.get(id) as MessageRow | undefined;
      if (row === undefined) continue;
      s.deferred.set(id, { seq, channel: row.channel, dueAt });
    }
    this.#wake(sink);
  }

  retryNow(sink: string): void {
    this.#checkOpen();
    const s = this.#sink(sink);
    const now = this.#clock.monotonicMs();
    for (const d of s.deferred.values()) if (d.dueAt > now) d.dueAt = now;
    this.#wake(sink);
  }

  async deadLetters(limit = 100): Promise<DeadLetter[]> {
    this.#checkOpen();
    const rows = this.#stmts.deadList.all(limit) as {
      id: string;
      sink: string;
      channel: string;
      payload: Buffer;
      content_type: string;
      ts: number;
      reason: string;
      at: number;
    }[];
    return rows.map((r) => ({
      id: r.id,
      sink: r.sink,
      channel: r.channel,
      payload: r.payload,
      contentType: r.content_type,
      ts: r.ts,
      reason: r.reason,
      at: r.at,
    }));
  }

  #wake(sink?: string): void {
    for (const [name, s] of this.#state) if (sink === undefined || name === sink) wake(s);
  }

  waitForWork(sink: string, signal?: AbortSignal): Promise<void> {
    const s = this.#sink(sink);
    if (this.#closed) return Promise.resolve();
    let nextDue = Number.POSITIVE_INFINITY;
    for (const d of s.deferred.values()) nextDue = Math.min(nextDue, d.dueAt);
    return waitForWake(s, this.#clock, nextDue, signal);
  }

  stats(): OutboxStats {
    const oldest = this.#closed
      ? undefined
      : (this.#stmts.oldest.get() as { ingested_at: number } | undefined);
    const leased: Record<string, number> = {};
    for (const [name, s] of this.#state) leased[name] = s.leased.size;
    const drops: Record<DropReason, number> = {
      max_bytes: this.#meta.drop_max_bytes,
      max_count: this.#meta.drop_max_count,
      ttl: this.#meta.drop_ttl,
      refused: this.#meta.drop_refused,
    };
    return {
      depth: this.#meta.count,
      bytes: this.#meta.bytes,
      oldestAgeMs: oldest === undefined ? 0 : Math.max(0, this.#clock.now().getTime() - oldest.ingested_at),
      drops,
      deadLetters: this.#meta.dead_letters,
      appended: this.#meta.appended,
      quarantined: this.#meta.quarantined,
      leased,
    };
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    if (this.#ackTimer !== undefined) clearTimeout(this.#ackTimer);
    this.#ackTimer = undefined;
    if (this.#queue.length > 0) this.#flush();
    // Let pending journal syncs finish so every accepted append is answered.
    while (this.#syncing || this.#awaitingSync.length > 0) await new Promise((r) => setImmediate(r));
    if (this.#walFd !== undefined) closeSync(this.#walFd);
    this.#walFd = undefined;
    if (this.#checkpointer !== undefined) {
      const w = this.#checkpointer;
      this.#checkpointer = undefined;
      await new Promise<void>((resolve) => {
        w.once("exit", () => resolve());
        w.postMessage("close");
      });
    }
    this.#closed = true;
    if (this.#ttlTimer !== undefined) clearInterval(this.#ttlTimer);
    this.#wake();
    this.#db.close();
  }
}
