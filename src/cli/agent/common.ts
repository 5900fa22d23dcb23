import type { Command } from "commander";
import { type LoadedConfig, loadConfig } from "../../config/index.js";
import { asM2mError, M2mError } from "../../core/errors.js";
import { createLogger, journalPrefix, type LogFormat, type Logger, type LogLevel } from "../../core/log.js";
import { createProgress, type Progress } from "../progress.js";

/**
 * Shared plumbing for `m2m-agent` subcommands. Every subcommand module exports
 * `register(program: Command): void` and uses these helpers for config, output and exit codes.
 */

/** Exit codes: 0 ok, 1 failure, 2 usage / configuration error, 3 "not healthy" (status, doctor). */
export const EXIT = { ok: 0, failure: 1, usage: 2, unhealthy: 3 } as const;

export interface GlobalOptions {
  readonly config?: string;
  readonly json?: boolean;
  readonly logFormat?: LogFormat;
}

/**
 * The log output of a CLI command on stderr: human lines (`warn: msg (k=v)`) unless
 * `--log-format json` asks for JSON lines; `run` (the daemon) defaults to JSON for the journal.
 */
export function cliLogger(opts: GlobalOptions, level: LogLevel = "warn"): Logger {
  return createLogger({ level, format: opts.logFormat ?? "human" });
}

export function globalOptions(cmd: Command): GlobalOptions {
  return cmd.optsWithGlobals<GlobalOptions>();
}

/** Loads config the same way the daemon does (--config FILE, else /etc/m2m-agent/agent.toml). */
export function loadCliConfig(opts: GlobalOptions): Promise<LoadedConfig> {
  return loadConfig({
    ...(opts.config === undefined ? {} : { path: opts.config }),
    explicit: opts.config !== undefined,
  });
}

export function progressFor(opts: GlobalOptions): Progress {
  return createProgress({ quiet: opts.json === true });
}

/** Prints a result: JSON on stdout with --json, else the human rendering. */
export function output(opts: GlobalOptions, value: unknown, human: () => string): void {
  if (opts.json === true) process.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
  else process.stdout.write(human().replace(/\n?$/, "\n"));
}

/** Prints an error (JSON with --json) and returns the exit code for it. */
export function reportError(opts: GlobalOptions, err: unknown): number {
  const e = asM2mError(err);
  if (opts.json === true) {
    process.stdout.write(`${JSON.stringify({ error: e.toJSON() }, null, 2)}\n`);
  } else {
    // Under systemd (ExecStartPre=m2m-agent config check) these lines land in the journal as errors.
    const p = journalPrefix("error");
    process.stderr.write(`${p}m2m-agent: ${e.message}\n`);
    if (e.hint !== undefined) process.stderr.write(`${p}  hint: ${e.hint}\n`);
    process.stderr.write(`${p}  code: ${e.code}\n`);
  }
  return e.code === "ERR_CONFIG" || e.code === "ERR_USAGE" ? EXIT.usage : EXIT.failure;
}

/**
 * Wraps an action: sets process.exitCode from the returned code or the thrown error (never calls
 * process.exit, so pending output is flushed and handles close normally).
 */
export function action<A extends unknown[]>(
  fn: (cmd: Command, ...args: A) => Promise<number | undefined>,
): (...args: unknown[]) => Promise<void> {
  return async (...args: unknown[]) => {
    const cmd = args[args.length - 1] as Command;
    try {
      const code = await fn(cmd, ...(args.slice(0, -1) as A));
      process.exitCode = code ?? EXIT.ok;
    } catch (err) {
      process.exitCode = reportError(globalOptions(cmd), err);
    }
  };
}

export function usageError(message: string, hint?: string): M2mError {
  return new M2mError("ERR_USAGE", "permanent", message, hint === undefined ? {} : { hint });
}

/**
 * Runs `fn` holding the state directory's lock (one agent per state directory: a running daemon, or
 * another `enroll` / `keys destroy` / `decommission`, makes this refuse with ERR_STATE_LOCKED and
 * the holder's PID). Released when `fn` settles, and by the kernel if the process dies.
 */
export async function withStateLock<T>(stateDir: string, purpose: string, fn: () => Promise<T>): Promise<T> {
  const { lockStateDir } = await import("../../core/state-lock.js");
  const lock = await lockStateDir(stateDir, purpose);
  try {
    return await fn();
  } finally {
    lock.release();
  }
}
