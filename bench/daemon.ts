import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { initSoftHsm } from "../hw/softhsm.js";
import { startSwtpm } from "../hw/swtpm.js";

/**
 * Daemon benchmark: start → READY=1 (goal ≤ 1.0 s) and idle RSS against a bare
 * `node -e "setInterval(()=>{},1000)"` measured in the same run (goal ≤ 1.6×), for the TPM (swtpm)
 * and PKCS#11 (SoftHSM) providers. Run after `npm run build`: `node dist/bench/daemon.js`.
 */

const CLI = resolve(import.meta.dirname, "..", "src", "cli", "m2m-agent.js");
const RUNS = Number(process.env.BENCH_RUNS ?? 3);
/** RSS is sampled twice after READY=1: early, and once V8's memory reducer has run (~20 s idle). */
const EARLY_MS = Number(process.env.BENCH_EARLY_MS ?? 3000);
const STEADY_MS = Number(process.env.BENCH_STEADY_MS ?? 30000);

interface Sock {
  on(ev: "message", l: (buf: Buffer) => void): void;
  on(ev: "listening", l: () => void): void;
  on(ev: "error", l: (e: Error) => void): void;
  bind(path: string): void;
  close(): void;
}

function rssKiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  return Number(m?.[1] ?? Number.NaN);
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? Number.NaN;
};

interface Running {
  readonly pid: number;
  readonly readyMs: number;
  readonly readyAt: number;
  stop(): Promise<void>;
}

function bareNode(): Running {
  const child = spawn(process.execPath, ["-e", "setInterval(()=>{},1000)"], { stdio: "ignore" });
  return {
    pid: child.pid ?? 0,
    readyMs: 0,
    readyAt: performance.now(),
    stop: async () => {
      child.kill("SIGKILL");
    },
  };
}

async function startDaemon(
  config: string,
  env: NodeJS.ProcessEnv,
  notifyPath: string,
  messages: string[],
): Promise<Running> {
  const from = messages.length;
  const t0 = performance.now();
  const child = spawn(process.execPath, [CLI, "--config", config, "run"], {
    env: { ...env, NOTIFY_SOCKET: notifyPath },
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr?.on("data", (c: Buffer) => {
    stderr += c.toString();
  });
  let ready: string | undefined;
  // Only this daemon notifies while it starts (runs start one at a time), so the first READY=1 is its own.
  for (let i = 0; i < 5000 && ready === undefined; i++) {
    ready = messages.slice(from).find((m) => m.startsWith("READY=1"));
    if (ready === undefined) await sleep(1);
  }
  const readyAt = performance.now();
  if (ready === undefined || !ready.includes("STATUS=running")) {
    child.kill("SIGKILL");
    throw new Error(`daemon did not reach running (${ready ?? "no READY=1"}):\n${stderr}`);
  }
  const exited = new Promise((r) => child.on("exit", r));
  return {
    pid: child.pid ?? 0,
    readyMs: readyAt - t0,
    readyAt,
    stop: async () => {
      child.kill("SIGTERM");
      await exited;
    },
  };
}

async function sampleAt(r: Running, msAfterReady: number): Promise<number> {
  const wait = r.readyAt + msAfterReady - performance.now();
  if (wait > 0) await sleep(wait);
  return rssKiB(r.pid);
}

async function keysInit(config: string, env: NodeJS.ProcessEnv): Promise<void> {
  const child = spawn(process.execPath, [CLI, "--config", config, "keys", "init"], { env, stdio: "ignore" });
  const code = await new Promise((r) => child.on("exit", r));
  if (code !== 0) throw new Error(`keys init failed (${String(code)})`);
}

async function main(): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), "m2m-bench-daemon-"));
  const require = createRequire(import.meta.url);
  const sock = (require("unix-dgram") as { createSocket(t: "unix_dgram"): Sock }).createSocket("unix_dgram");
  const messages: string[] = [];
  const notifyPath = join(dir, "notify.sock");
  sock.on("message", (b) => messages.push(b.toString()));
  await new Promise<void>((res, rej) => {
    sock.on("listening", res);
    sock.on("error", rej);
    sock.bind(notifyPath);
  });
  const tpm = await startSwtpm();
  const hsm = await initSoftHsm({ label: "m2m-bench" });
  try {
    const base = { PATH: process.env.PATH, HOME: dir };
    const common = (name: string): string =>
      `[agent]\nstate_dir = "${join(dir, name, "state")}"\n[api]\nsocket = "${join(dir, name, "api.sock")}"\n`;
    await mkdir(join(dir, "tpm", "state"), { recursive: true, mode: 0o700 });
    await mkdir(join(dir, "p11", "state"), { recursive: true, mode: 0o700 });
    const tpmConf = join(dir, "tpm.toml");
    await writeFile(tpmConf, `${common("tpm")}[keys.tpm]\ntcti = "${tpm.tcti}"\n`);
    const p11Conf = join(dir, "p11.toml");
    await writeFile(
      p11Conf,
      `${common("p11")}[keys]\nprovider = "pkcs11"\n[keys.pkcs11]\nmodule = "${hsm.modulePath}"\ntoken_label = "${hsm.tokenLabel}"\npin = { file = "${hsm.pinFile}" }\n`,
    );
    const p11Env = { ...base, ...hsm.env };
    await keysInit(tpmConf, base);
    await keysInit(p11Conf, p11Env);

    type Row = { ready: number[]; early: number[]; steady: number[] };
    const rows: Record<string, Row> = {};
    const row = (name: string): Row => {
      rows[name] ??= { ready: [], early: [], steady: [] };
      return rows[name];
    };
    for (let i = 0; i < RUNS; i++) {
      const procs: [string, Running][] = [["bare node", bareNode()]];
      procs.push(["tpm (swtpm)", await startDaemon(tpmConf, base, notifyPath, messages)]);
      procs.push(["pkcs11 (SoftHSM)", await startDaemon(p11Conf, p11Env, notifyPath, messages)]);
      for (const [name, p] of procs) {
        row(name).ready.push(p.readyMs);
        row(name).early.push(await sampleAt(p, EARLY_MS));
      }
      for (const [name, p] of procs) row(name).steady.push(await sampleAt(p, STEADY_MS));
      for (const [, p] of procs) await p.stop();
    }
    const bare = row("bare node");
    const bareEarly = median(bare.early) / 1024;
    const bareSteady = median(bare.steady) / 1024;
    console.log(`m2m-agent daemon benchmark: ${RUNS} runs, medians; node ${process.version}`);
    console.log(
      `bare node idle RSS: ${bareEarly.toFixed(1)} MiB at ${EARLY_MS / 1000} s, ${bareSteady.toFixed(1)} MiB at ${STEADY_MS / 1000} s`,
    );
    for (const [name, r] of Object.entries(rows)) {
      if (name === "bare node") continue;
      const early = median(r.early) / 1024;
      const steady = median(r.steady) / 1024;
      console.log(
        `${name.padEnd(17)} start->READY=1 ${median(r.ready).toFixed(0).padStart(4)} ms (min ${Math.min(...r.ready).toFixed(0)}, max ${Math.max(...r.ready).toFixed(0)}; goal <= 1000)` +
          ` | idle RSS ${early.toFixed(1)} MiB = ${(early / bareEarly).toFixed(2)}x at ${EARLY_MS / 1000} s, ` +
          `${steady.toFixed(1)} MiB = ${(steady / bareSteady).toFixed(2)}x at ${STEADY_MS / 1000} s (goal <= 1.6x)`,
      );
    }
  } finally {
    sock.close();
    await tpm.stop();
    await hsm.cleanup();
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
