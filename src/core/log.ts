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

/**
 * One JSON object per line (journald keeps it as MESSAGE, at the level's priority; `jq` reads it). Secrets never reach the
 * output because `Secret` redacts itself and `sanitize` catches it by type.
 */
export function createLogger(
  options: { level?: LogLevel; write?: (line: string, level: LogLevel) => void; base?: LogFields } = {},
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
    const record = { ts: new Date().toISOString(), level, msg, ...base, ...(fields ?? {}) };
    write(JSON.stringify(sanitize(record)), level);
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
