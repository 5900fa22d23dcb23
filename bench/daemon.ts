import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { mkdir, mkdtemp, rm, writeFile } from "node:fs/promises";
import { Agent as HttpAgent, request as httpRequest } from "node:http";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { startMosquitto } from "../hw/mosquitto.js";
import { initSoftHsm } from "../hw/softhsm.js";
import { startSwtpm } from "../hw/swtpm.js";
import { fetchStatus } from "../src/cli/agent/status.js";

/**
 * Daemon benchmark: start → READY=1 (goal ≤ 1.0 s) and idle RSS against a bare
 * `node -e "setInterval(()=>{},1000)"` measured in the same run (goal ≤ 1.6×), for the TPM (swtpm)
 * and PKCS#11 (SoftHSM) providers; then RSS at 10k msg/s: an enrolled SoftHSM daemon relaying over
 * MQTT mTLS (key in the token) to mosquitto, 100-message batches offered every 10 ms through the
 * local API for LOAD_S seconds (open loop, at most 32 requests in flight: saturated ticks are
 * skipped and counted): achieved rate, RSS p50/max under load vs idle vs bare node, ack latency.
 * Run after `npm run build`: `node dist/bench/daemon.js`. BENCH_PHASES=idle,load (default both).
 */

const CLI = resolve(import.meta.dirname, "..", "src", "cli", "m2m-agent.js");
const REGISTRAR_CLI = resolve(import.meta.dirname, "..", "src", "cli", "m2m-registrar.js");
const PHASES = new Set((process.env.BENCH_PHASES ?? "idle,load").split(","));
const LOAD_S = Number(process.env.BENCH_LOAD_S ?? 20);
const LOAD_BATCH = 100;
const LOAD_TICK_MS = 10;
const LOAD_IN_FLIGHT = 32;
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

async function idlePhase(dir: string, notifyPath: string, messages: string[]): Promise<void> {
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
    await tpm.stop();
    await hsm.cleanup();
  }
}

/** Runs a built CLI to completion; stdout is returned, a non-zero exit throws with stderr. */
function runCli(cli: string, args: readonly string[], env: NodeJS.ProcessEnv): Promise<string> {
  return new Promise((res, rej) => {
    const child = spawn(process.execPath, [cli, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    let err = "";
    child.stdout.on("data", (c: Buffer) => {
      out += c.toString();
    });
    child.stderr.on("data", (c: Buffer) => {
      err += c.toString();
    });
    const t = setTimeout(() => child.kill("SIGKILL"), 60_000);
    child.on("error", rej);
    child.on("close", (code) => {
      clearTimeout(t);
      if (code === 0) res(out);
      else rej(new Error(`${args.join(" ")} exited ${String(code)}:\n${err}${out}`));
    });
  });
}

/** `m2m-registrar --json serve`: resolves with its URL once it printed it. */
function startRegistrar(
  config: string,
  env: NodeJS.ProcessEnv,
): Promise<{ url: string; stop(): Promise<void> }> {
  const child = spawn(process.execPath, [REGISTRAR_CLI, "--json", "serve", "--config", config], {
    env,
    stdio: ["ignore", "pipe", "ignore"],
  });
  const exited = new Promise((r) => child.on("exit", r));
  return new Promise((res, rej) => {
    let out = "";
    const t = setTimeout(() => {
      child.kill("SIGKILL");
      rej(new Error("registrar did not start"));
    }, 30_000);
    child.stdout.on("data", (c: Buffer) => {
      out += c.toString();
      const line = out.split("\n").find((l) => l.startsWith("{"));
      if (line === undefined) return;
      clearTimeout(t);
      res({
        url: (JSON.parse(line) as { url: string }).url,
        stop: async () => {
          child.kill("SIGTERM");
          await exited;
        },
      });
    });
  });
}

function post(agent: HttpAgent, socketPath: string, body: string): Promise<number> {
  return new Promise((res, rej) => {
    const req = httpRequest(
      {
        socketPath,
        agent,
        path: "/v1/messages",
        method: "POST",
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) },
      },
      (r) => {
        r.resume();
        r.on("end", () => res(r.statusCode ?? 0));
      },
    );
    req.on("error", rej);
    req.end(body);
  });
}

const pct = (xs: readonly number[], p: number): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? Number.NaN;
};

/**
 * RSS at 10k msg/s offered: registrar + mosquitto (mTLS, client CA = the fleet CA) + a SoftHSM
 * daemon enrolled with a bootstrap token, relaying over MQTT with the key inside the token.
 */
async function loadPhase(dir: string, notifyPath: string, messages: string[]): Promise<void> {
  const hsm = await initSoftHsm({ label: "m2m-bench-load" });
  const env: NodeJS.ProcessEnv = { PATH: process.env.PATH, HOME: dir, ...hsm.env };
  const d = join(dir, "load");
  await mkdir(d, { recursive: true, mode: 0o700 });
  const stops: (() => Promise<void>)[] = [() => hsm.cleanup()];
  try {
    const ca = JSON.parse(
      await runCli(REGISTRAR_CLI, ["--json", "ca", "init", "--dir", join(d, "ca")], env),
    ) as { caCert: string; serverCert: string; serverKey: string };
    const regConf = join(d, "registrar.toml");
    await writeFile(
      regConf,
      `data_dir = "${join(d, "registrar-data")}"\nca_dir = "${join(d, "ca")}"\n[listen]\nhost = "127.0.0.1"\nport = 0\n` +
        `[tls]\ncert = "${ca.serverCert}"\nkey = "${ca.serverKey}"\n[oauth.roles]\nsensor = ["telemetry:write", "est"]\n`,
    );
    const reg = (args: string[]): Promise<string> =>
      runCli(REGISTRAR_CLI, ["--json", ...args, "--config", regConf], env);
    await reg(["enrollment", "group", "add", "sensors", "--role", "sensor", "--methods", "pkcs11"]);
    const token = (
      JSON.parse(await reg(["enrollment", "token", "create", "--group", "sensors"])) as { token: string }
    ).token;
    const bootstrap = join(d, "bootstrap-token");
    await writeFile(bootstrap, token, { mode: 0o600 });
    const registrar = await startRegistrar(regConf, env);
    stops.unshift(() => registrar.stop());
    const broker = await startMosquitto({ clientCaFile: ca.caCert });
    stops.unshift(() => broker.cleanup());
    const socketPath = join(d, "api.sock");
    const conf = join(d, "agent.toml");
    await writeFile(
      conf,
      `[agent]\nstate_dir = "${join(d, "state")}"\nruntime_dir = "${join(d, "run")}"\n` +
        `[keys]\nprovider = "pkcs11"\n[keys.pkcs11]\nmodule = "${hsm.modulePath}"\ntoken_label = "${hsm.tokenLabel}"\npin = { file = "${hsm.pinFile}" }\n` +
        `[enroll]\nenabled = true\nregistrar_url = "${registrar.url}"\nregistrar_ca_file = "${ca.caCert}"\nmethod = "pkcs11"\n` +
        `bootstrap_token = { file = "${bootstrap}" }\nhardware_serial = "BENCH-LOAD-1"\n` +
        `[relay.mqtt]\nurls = ["${broker.mtlsUrl}"]\nauth = "mtls-pkcs11"\nca_file = "${broker.ca.caCertPath}"\ninflight = 64\n` +
        `[api]\nsocket = "${socketPath}"\nmode = 0o600\n`,
      { mode: 0o600 },
    );
    await runCli(CLI, ["--config", conf, "--json", "enroll"], env);

    const bare = bareNode();
    stops.unshift(() => bare.stop());
    const daemon = await startDaemon(conf, env, notifyPath, messages);
    stops.unshift(() => daemon.stop());
    // Idle: after the same settling time for both processes.
    await sleep(EARLY_MS);
    const idleKiB = rssKiB(daemon.pid);
    const bareKiB = rssKiB(bare.pid);

    const rss: number[] = [];
    const sampler = setInterval(() => rss.push(rssKiB(daemon.pid)), 250);
    const agent = new HttpAgent({ keepAlive: true, maxSockets: LOAD_IN_FLIGHT });
    const lat: number[] = [];
    let offered = 0;
    let acked = 0;
    let skipped = 0;
    let errors = 0;
    let inFlight = 0;
    const pending = new Set<Promise<void>>();
    const body = JSON.stringify(
      Array.from({ length: LOAD_BATCH }, (_, i) => ({
        channel: "bench",
        payload: { i, v: "x".repeat(120) },
      })),
    );
    const t0 = performance.now();
    const end = t0 + LOAD_S * 1000;
    let next = t0;
    while (performance.now() < end) {
      if (inFlight >= LOAD_IN_FLIGHT) skipped++;
      else {
        inFlight++;
        offered += LOAD_BATCH;
        const sent = performance.now();
        const p: Promise<void> = post(agent, socketPath, body)
          .then((status) => {
            if (status === 200) {
              acked += LOAD_BATCH;
              lat.push(performance.now() - sent);
            } else errors++;
          })
          .catch(() => {
            errors++;
          })
          .finally(() => {
            inFlight--;
            pending.delete(p);
          });
        pending.add(p);
      }
      next += LOAD_TICK_MS;
      const wait = next - performance.now();
      if (wait > 0) await sleep(wait);
    }
    await Promise.all([...pending]);
    const loadS = (performance.now() - t0) / 1000;
    clearInterval(sampler);
    agent.destroy();
    const relayed = async (): Promise<{ depth: number; delivered: number }> => {
      const s = (await fetchStatus(socketPath)) as { stages: { relay?: Record<string, unknown> } };
      const r = s.stages.relay as {
        outbox: { depth: number } | null;
        sinks: Record<string, { delivered: number }>;
      };
      return {
        depth: r.outbox?.depth ?? Number.NaN,
        delivered: Object.values(r.sinks).reduce((n, c) => n + c.delivered, 0),
      };
    };
    const atEnd = await relayed();
    const drainStart = performance.now();
    let drained = atEnd;
    while (drained.depth > 0 && performance.now() - drainStart < 30_000) {
      await sleep(250);
      drained = await relayed();
    }
    const drainS = (performance.now() - drainStart) / 1000;

    const mib = (k: number): string => (k / 1024).toFixed(1);
    const ratio = (k: number): string => (k / bareKiB).toFixed(2);
    console.log(
      `RSS at 10k msg/s offered (SoftHSM daemon, MQTT mTLS to mosquitto, batches of ${LOAD_BATCH} every ${LOAD_TICK_MS} ms, ` +
        `<= ${LOAD_IN_FLIGHT} in flight, ${loadS.toFixed(1)} s):`,
    );
    console.log(
      `  offered ${(offered / loadS).toFixed(0)} msg/s (ticks skipped when saturated: ${skipped}), ` +
        `acked ${(acked / loadS).toFixed(0)} msg/s, errors ${errors}; relayed to MQTT during the window ` +
        `${(atEnd.delivered / loadS).toFixed(0)} msg/s, backlog ${atEnd.depth} drained in ${drainS.toFixed(1)} s (depth ${drained.depth})`,
    );
    console.log(
      `  ack latency per 100-message batch: p50 ${pct(lat, 50).toFixed(1)} ms, p99 ${pct(lat, 99).toFixed(1)} ms, max ${Math.max(...lat).toFixed(1)} ms`,
    );
    console.log(
      `  RSS: bare node ${mib(bareKiB)} MiB | idle ${mib(idleKiB)} MiB = ${ratio(idleKiB)}x | under load p50 ` +
        `${mib(median(rss))} MiB = ${ratio(median(rss))}x, max ${mib(Math.max(...rss))} MiB = ${ratio(Math.max(...rss))}x ` +
        `(${(median(rss) / idleKiB).toFixed(2)}x idle)`,
    );
  } finally {
    for (const stop of stops) await stop().catch(() => undefined);
  }
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
  try {
    if (PHASES.has("idle")) await idlePhase(dir, notifyPath, messages);
    if (PHASES.has("load")) await loadPhase(dir, notifyPath, messages);
  } finally {
    sock.close();
    await rm(dir, { recursive: true, force: true });
  }
}

await main();
