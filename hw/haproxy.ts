import { existsSync } from "node:fs";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { createConnection } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { execa, type ResultPromise } from "execa";
import { M2mError } from "../src/core/errors.js";
import { freeLoopbackPort } from "./swtpm.js";

/**
 * haproxy test kit: Debian's haproxy on a free loopback port in front of several registrar replicas
 * (`m2m-registrar serve` processes), as an operator would run it (docs/fleet-load.md has the same
 * configuration for production).
 *
 * TCP mode (TLS passthrough): the replicas terminate TLS themselves, because EST re-enrolment and
 * the mTLS routes need the device's client certificate at the registrar. haproxy balances
 * connections (leastconn), health-checks every replica every 500 ms, takes a dead one out after one
 * failed check, and redispatches a connection whose server refuses it to another replica
 * (`option redispatch`, `retries`). A connection cut mid-request (a replica crashed) reaches the
 * client as a reset; the agent's retry policy then comes back through haproxy to a live replica.
 */
export interface HaproxyOptions {
  /** `host:port` of each replica. */
  readonly backends: readonly string[];
  /** Listening port; default a free one. */
  readonly port?: number;
  /** Health-check interval, ms (default 500). */
  readonly checkIntervalMs?: number;
}

export interface HaproxyHandle {
  /** `https://127.0.0.1:PORT` (TLS is the replicas'). */
  readonly url: string;
  readonly port: number;
  readonly configPath: string;
  readonly pid: number;
  stop(): Promise<void>;
}

/** The haproxy configuration for registrar replicas (also printed in docs/fleet-load.md). */
export function haproxyConfig(o: {
  port: number;
  backends: readonly string[];
  checkIntervalMs?: number;
}): string {
  const inter = o.checkIntervalMs ?? 500;
  return [
    "global",
    "    # 2 descriptors per proxied connection: stays under a 20000 open-files limit.\n    maxconn 8000",
    "defaults",
    "    mode tcp",
    "    timeout connect 2s",
    "    timeout client 60s",
    "    timeout server 60s",
    "    # A connection the chosen replica refuses goes to another one.",
    "    retries 2",
    "    option redispatch",
    "frontend registrar",
    `    bind 127.0.0.1:${o.port}`,
    "    default_backend replicas",
    "backend replicas",
    "    balance leastconn",
    ...o.backends.map((b, i) => `    server r${i + 1} ${b} check inter ${inter}ms fall 1 rise 2`),
    "",
  ].join("\n");
}

/**
 * Starts haproxy (foreground, `-db`) with {@link haproxyConfig}; resolves once its port accepts.
 * @throws ERR_HW_TOOL_MISSING when haproxy is not installed (the test then fails, never skips).
 */
export async function startHaproxy(o: HaproxyOptions): Promise<HaproxyHandle> {
  if (!existsSync("/usr/sbin/haproxy")) {
    throw new M2mError("ERR_HW_TOOL_MISSING", "permanent", "haproxy not found", {
      hint: "apt-get install haproxy",
    });
  }
  const dir = await mkdtemp(join(tmpdir(), "m2m-haproxy-"));
  const port = o.port ?? (await freeLoopbackPort());
  const configPath = join(dir, "haproxy.cfg");
  await writeFile(
    configPath,
    haproxyConfig({
      port,
      backends: o.backends,
      ...(o.checkIntervalMs === undefined ? {} : { checkIntervalMs: o.checkIntervalMs }),
    }),
  );
  const check = await execa("/usr/sbin/haproxy", ["-c", "-q", "-f", configPath], {
    reject: false,
    timeout: 10_000,
  });
  if (check.exitCode !== 0) {
    await rm(dir, { recursive: true, force: true });
    throw new Error(`haproxy config refused: ${check.stderr}`);
  }
  const proc: ResultPromise = execa("/usr/sbin/haproxy", ["-db", "-f", configPath], {
    reject: false,
    stdio: ["ignore", "ignore", "pipe"],
    forceKillAfterDelay: 2000,
  });
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (proc.exitCode !== null && proc.exitCode !== undefined) {
      const r = await proc;
      await rm(dir, { recursive: true, force: true });
      throw new Error(`haproxy exited: ${String(r.stderr)}`);
    }
    if (await accepts(port)) break;
    if (Date.now() > deadline) {
      proc.kill("SIGKILL");
      await proc;
      await rm(dir, { recursive: true, force: true });
      throw new Error("haproxy did not start listening");
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    url: `https://127.0.0.1:${port}`,
    port,
    configPath,
    pid: proc.pid ?? 0,
    stop: async () => {
      proc.kill("SIGTERM");
      await proc;
      await rm(dir, { recursive: true, force: true });
    },
  };
}

function accepts(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = createConnection({ host: "127.0.0.1", port }, () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}
