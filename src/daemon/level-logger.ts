import { createLogger, type LogFields, type Logger, type LogLevel } from "../core/log.js";

const ORDER: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40 };

/** A logger whose level can change at runtime (SIGHUP applies `agent.log_level` live). */
export class LevelLogger implements Logger {
  readonly #inner: Logger;
  readonly #level: { current: LogLevel };

  constructor(level: LogLevel, inner?: Logger, shared?: { current: LogLevel }) {
    this.#inner = inner ?? createLogger({ level: "debug" });
    this.#level = shared ?? { current: level };
  }

  get level(): LogLevel {
    return this.#level.current;
  }

  setLevel(level: LogLevel): void {
    this.#level.current = level;
  }

  #on(l: LogLevel): boolean {
    return ORDER[l] >= ORDER[this.#level.current];
  }

  debug(msg: string, fields?: LogFields): void {
    if (this.#on("debug")) this.#inner.debug(msg, fields);
  }
  info(msg: string, fields?: LogFields): void {
    if (this.#on("info")) this.#inner.info(msg, fields);
  }
  warn(msg: string, fields?: LogFields): void {
    if (this.#on("warn")) this.#inner.warn(msg, fields);
  }
  error(msg: string, fields?: LogFields): void {
    if (this.#on("error")) this.#inner.error(msg, fields);
  }
  child(fields: LogFields): Logger {
    return new LevelLogger(this.#level.current, this.#inner.child(fields), this.#level);
  }
}
