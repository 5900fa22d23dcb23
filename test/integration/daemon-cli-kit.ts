import { type ChildProcess, spawn } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { join, resolve } from "node:path";

/**
 * Helpers for tests that drive the BUILT CLI as a user would (`node dist/src/cli/m2m-agent.js`).
 * The build is `npm run build` (part of `npm run check`); a missing or stale build fails loudly.
 */
export const REPO = resolve(import.meta.dirname, "..", "..");
export const CLI = join(REPO, "dist", "src", "cli", "m2m-agent.js");

export function assertBuilt(): void {
  if (!existsSync(CLI)) throw new Error(`${CLI} is missing: run \`npm run build\` first`);
  // The built daemon must match the sources under test.
  for (const rel of [
    "src/daemon/run.ts",
    "src/daemon/compose.ts",
    "src/cli/agent/keys.ts",
    "src/config/schema.ts",
  ]) {
    const src = join(REPO, rel);
    const out = join(REPO, "dist", rel.replace(/\.ts$/, ".js"));
    if (!existsSync(out) || statSync(out).mtimeMs < statSync(src).mtimeMs)
      throw new Error(`${out} is older than ${rel}: run \`npm run build\` first`);
  }
}

export interface CliResult {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/**
 * Runs `node SCRIPT ARGS` to completion (no TTY). stdin: `input` and then EOF through a pipe, or
 * /dev/null when `input` is undefined. A child still running after `timeoutMs` gets `killSignal`.
 */
export function runScript(
  script: string,
  args: readonly string[],
  env: NodeJS.ProcessEnv,
  o: { readonly input?: string; readonly timeoutMs: number; readonly killSignal?: NodeJS.Signals },
): Promise<CliResult> {
  return new Promise((res, rej) => {
    const child = spawn(process.execPath, [script, ...args], {
      env,
      stdio: [o.input === undefined ? "ignore" : "pipe", "pipe", "pipe"],
    });
    let stdout = "";
    let stderr = "";
    // Typed nullable (stdin is chosen at run time); stdout and stderr are always pipes.
    child.stdout?.on("data", (c: Buffer) => {
      stdout += c.toString();
    });
    child.stderr?.on("data", (c: Buffer) => {
      stderr += c.toString();
    });
    const t = setTimeout(() => child.kill(o.killSignal ?? "SIGKILL"), o.timeoutMs);
    child.on("error", rej);
    child.on("close", (code) => {
      clearTimeout(t);
      res({ code, stdout, stderr });
    });
    child.stdin?.end(o.input);
  });
}

/** Runs the CLI to completion (stdin closed: no TTY). */
export function runCli(
  args: readonly string[],
  env: NodeJS.ProcessEnv,
  timeoutMs = 60_000,
): Promise<CliResult> {
  return runScript(CLI, args, env, { timeoutMs });
}

export interface Daemon {
  readonly child: ChildProcess;
  readonly stderr: () => string;
  readonly exited: Promise<number | null>;
  /** Resolves when a stderr JSON log line matches. */
  waitLog(
    match: (rec: Record<string, unknown>) => boolean,
    timeoutMs?: number,
  ): Promise<Record<string, unknown>>;
  kill(): void;
  /** `kill()` and wait for the exit: a closer for `useCleanup`. */
  close(): Promise<void>;
}

export function startDaemon(args: readonly string[], env: NodeJS.ProcessEnv): Daemon {
  const child = spawn(process.execPath, [CLI, ...args], { env, stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  const waiters = new Set<() => void>();
  child.stderr?.on("data", (c: Buffer) => {
    stderr += c.toString();
    for (const w of waiters) w();
  });
  const exited = new Promise<number | null>((res) => child.on("exit", (code) => res(code)));
  const kill = (): void => {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  };
  const records = (): Record<string, unknown>[] =>
    stderr
      .split("\n")
      .filter((l) => l.startsWith("{"))
      .map((l) => {
        try {
          return JSON.parse(l) as Record<string, unknown>;
        } catch {
          return {};
        }
      });
  return {
    child,
    stderr: () => stderr,
    exited,
    waitLog(match, timeoutMs = 20_000) {
      return new Promise((res, rej) => {
        const check = (): void => {
          const hit = records().find(match);
          if (hit !== undefined) {
            waiters.delete(check);
            clearTimeout(t);
            res(hit);
          }
        };
        const t = setTimeout(() => {
          waiters.delete(check);
          rej(new Error(`log line not seen; stderr:\n${stderr}`));
        }, timeoutMs);
        waiters.add(check);
        check();
      });
    },
    kill,
    async close() {
      kill();
      await exited;
    },
  };
}
