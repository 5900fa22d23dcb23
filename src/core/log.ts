import { fstatSync } from "node:fs";
import { M2mError } from "./errors.js";
import { Secret } from "./secret.js";

export type LogLevel = "debug" | "info" | "warn" | "error";
const LEVELS: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

export type LogFields = Record<string, unknown>;

export interface Logger {
  debug(msg: string, fields?: LogFields): void;
  info(msg: string, fields?: LogFields): void;
  warn(msg: string, fields?: LogFields): void;
  error(msg: string, fields?: LogFields): void;
  child(fields: LogFields): Logger;
}

/** Replaces secrets (by type) and errors with safe shapes; bounded depth. */
export function sanitize(value: unknown, depth = 0): unknown {
  if (value instanceof Secret) return "<redacted>";
  if (depth > 6) return "[depth]";
  if (value instanceof M2mError) return value.toJSON();
  if (value instanceof Error) return { name: value.name, message: value.message };
  if (value instanceof Uint8Array) return `<${value.length} bytes>`;
  if (typeof value === "bigint") return value.toString();
  if (Array.isArray(value)) return value.slice(0, 50).map((v) => sanitize(v, depth + 1));
  if (value !== null && typeof value === "object") {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) out[k] = sanitize(v, depth + 1);
    return out;
  }
  return value;
}

/** syslog(3) priorities journald reads from a `<N>` line prefix (sd-daemon(3)). */
const PRIORITY: Record<LogLevel, number> = { debug: 7, info: 6, warn: 4, error: 3 };

/**
 * True when stderr is the journal stream systemd connected (JOURNAL_STREAM names its device:inode;
 * systemd.exec(5)). Only then are `<N>` prefixes written: a terminal or a pipe gets plain JSON lines.
 */
export function stderrIsJournal(env: NodeJS.ProcessEnv = process.env): boolean {
  const stream = env.JOURNAL_STREAM;
  if (stream === undefined) return false;
  try {
    const st = fstatSync(2);
    return stream === `${st.dev}:${st.ino}`;
  } catch {
    return false;
  }
}

/** The `<N>` prefix for a level when stderr goes to journald, else "". */
export function journalPrefix(level: LogLevel, journal = stderrIsJournal()): string {
  return journal ? `<${PRIORITY[level]}>` : "";
}

/** `json`: one JSON object per line (the daemon); `human`: `level: msg (k=v …)` (CLI commands). */
export type LogFormat = "json" | "human";

/** The record's own keys: a field with one of these names is kept as `field_<name>`, never replaces them. */
const RESERVED = new Set(["ts", "level", "msg"]);

/**
 * Builds the record: `ts`, `level`, `msg` first and authoritative. A field named like one of them
 * (the relay's backoff `level: 3`) is renamed `field_<name>`, so a log line's level is always its
 * level (log shippers and `jq 'select(.level=="error")'` rely on it).
 */
export function logRecord(level: LogLevel, msg: string, ts: string, ...sources: (LogFields | undefined)[]) {
  const record: Record<string, unknown> = { ts, level, msg };
  for (const fields of sources) {
    if (fields === undefined) continue;
    for (const [k, v] of Object.entries(fields)) record[RESERVED.has(k) ? `field_${k}` : k] = v;
  }
  return record;
}

function humanValue(v: unknown): string {
  if (typeof v === "string") return /[\s"=]/.test(v) || v === "" ? JSON.stringify(v) : v;
  return JSON.stringify(v) ?? String(v);
}

/** `warn: msg (key=value key=value)`: what a person at a terminal reads (CLI stderr). */
export function humanLine(record: Record<string, unknown>): string {
  const { ts: _ts, level, msg, ...rest } = record;
  const fields = Object.entries(rest).map(([k, v]) => `${k}=${humanValue(v)}`);
  return `${String(level)}: ${String(msg)}${fields.length === 0 ? "" : ` (${fields.join(" ")})`}`;
}

/**
 * One JSON object per line (journald keeps it as MESSAGE, at the level's priority; `jq` reads it), or
 * human lines with `format: "human"`. Secrets never reach the output because `Secret` redacts itself
 * and `sanitize` catches it by type.
 */
export function createLogger(
  options: {
    level?: LogLevel;
    write?: (line: string, level: LogLevel) => void;
    base?: LogFields;
    format?: LogFormat;
  } = {},
): Logger {
  const min = LEVELS[options.level ?? "info"];
  // Under systemd each line carries its syslog priority, so `journalctl -p warning` filters by level.
  const journal = options.write === undefined && stderrIsJournal();
  const write =
    options.write ??
    ((line: string, level: LogLevel) => process.stderr.write(`${journalPrefix(level, journal)}${line}\n`));
  const base = options.base ?? {};
  const emit = (level: LogLevel, msg: string, fields?: LogFields): void => {
    if (LEVELS[level] < min) return;
    const record = sanitize(logRecord(level, msg, new Date().toISOString(), base, fields)) as Record<
      string,
      unknown
    >;
    write(options.format === "human" ? humanLine(record) : JSON.stringify(record), level);
  };
  return {
    debug: (m, f) => emit("debug", m, f),
    info: (m, f) => emit("info", m, f),
    warn: (m, f) => emit("warn", m, f),
    error: (m, f) => emit("error", m, f),
    child: (fields) => createLogger({ ...options, base: { ...base, ...fields } }),
  };
}

/** A logger that drops everything (tests of modules whose logs are not under test). */
export const silentLogger: Logger = createLogger({ write: () => undefined });
