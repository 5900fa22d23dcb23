import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { join } from "node:path";
import { REPO } from "./daemon-cli-kit.js";

/**
 * Helpers for the end-to-end tests that drive both BUILT programs (`m2m-registrar`, `m2m-agent`)
 * as child processes, the way an operator would.
 */
export const REGISTRAR_CLI = join(REPO, "dist", "src", "cli", "m2m-registrar.js");
export const AGENT_CLI = join(REPO, "dist", "src", "cli", "m2m-agent.js");

/** Sources whose build output the e2e tests depend on. */
const WATCHED = [
  "src/cli/m2m-agent.ts",
  "src/cli/m2m-registrar.ts",
  "src/cli/agent/decommission.ts",
  "src/daemon/compose.ts",
  "src/daemon/stages/credentials.ts",
  "src/daemon/stages/relay.ts",
  "src/relay/outbox/worker/worker-outbox.ts",
  "src/relay/outbox/worker/outbox-worker.ts",
  "src/daemon/stages/enrol.ts",
  "src/registrar/app.ts",
  "src/registrar/server.ts",
  "src/registrar/config.ts",
  "src/registrar/store/sqlite-store.ts",
  "src/credentials/est/est-client.ts",
  "src/relay/sinks/mqtt/mqtt-sink.ts",
  "src/cli/agent/token.ts",
];

/**
 * Builds once (`tsc -p .`) when dist is missing or older than the sources the tests exercise.
 * tsc emits even when another module has a type error; the freshness check after the build is
 * what decides (a stale dist would test old code).
 */
export function ensureBuilt(): void {
  const stale = (): string | undefined =>
    WATCHED.find((rel) => {
      const out = join(REPO, "dist", rel.replace(/\.ts$/, ".js"));
      return !existsSync(out) || statSync(out).mtimeMs < statSync(join(REPO, rel)).mtimeMs;
    });
  if (stale() === undefined) return;
  try {
    execFileSync(process.execPath, [join(REPO, "node_modules", "typescript", "bin", "tsc"), "-p", REPO], {
      cwd: REPO,
      stdio: "ignore",
      timeout: 240_000,
    });
  } catch {
    // Type errors elsewhere still emit JavaScript; freshness is checked below.
  }
  const still = stale();
  if (still !== undefined) throw new Error(`build did not refresh the output of ${still}`);
}

export interface Run {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a built CLI to completion (no TTY; stdin from `input` when given). */
export function runNode(
  cli: string,
  args: readonly string[],
  env: NodeJS.ProcessEnv,
  input?: string,
  timeoutMs = 90_000,
): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [cli, ...args], { env, stdio: ["pipe", "pipe", "pipe"] });
    let stdout = "";
    let stderr = "";
    child.stdout.on("data", (c: Buffer) => {
      stdout += c.toString();
    });
    child.stderr.on("data", (c: Buffer) => {
      stderr += c.toString();
    });
    const t = setTimeout(() => child.kill("SIGKILL"), timeoutMs);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(t);
      resolve({ code, stdout, stderr });
    });
    child.stdin.end(input ?? "");
  });
}

/** A running `m2m-registrar serve` child. */
export interface RegistrarProcess {
  readonly child: ChildProcess;
  readonly url: string;
  readonly issuer: string;
  stop(): Promise<number | null>;
}

/** Starts `m2m-registrar --json serve --config FILE` and resolves once it printed its URL. */
export function startRegistrarProcess(configPath: string, env: NodeJS.ProcessEnv): Promise<RegistrarProcess> {
  const child = spawn(process.execPath, [REGISTRAR_CLI, "--json", "serve", "--config", configPath], {
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  child.stderr?.on("data", (c: Buffer) => {
    stderr += c.toString();
  });
  const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
  return new Promise((resolve, reject) => {
    let out = "";
    const t = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`registrar did not start:\n${stderr}`));
    }, 30_000);
    child.stdout?.on("data", (c: Buffer) => {
      out += c.toString();
      const line = out.split("\n").find((l) => l.startsWith("{"));
      if (line === undefined) return;
      clearTimeout(t);
      const { url, issuer } = JSON.parse(line) as { url: string; issuer: string };
      resolve({
        child,
        url,
        issuer,
        stop: async () => {
          if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
          return exited;
        },
      });
    });
    child.on("exit", () => {
      clearTimeout(t);
      reject(new Error(`registrar exited:\n${stderr}`));
    });
  });
}

/** Polls `fn` until it returns a value other than undefined (or throws after `timeoutMs`). */
export async function eventually<T>(
  fn: () => Promise<T | undefined>,
  timeoutMs = 30_000,
  what = "condition",
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const v = await fn();
      if (v !== undefined) return v;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`${what} not reached in ${timeoutMs} ms: ${String(last)}`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** The payload of a compact JWS/JWT (no verification: for assertions about claims). */
export function jwtClaims(jwt: string): Record<string, unknown> {
  const part = jwt.split(".")[1] ?? "";
  return JSON.parse(Buffer.from(part, "base64url").toString("utf8")) as Record<string, unknown>;
}
