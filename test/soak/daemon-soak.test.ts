import { readFileSync } from "node:fs";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { Agent as HttpAgent, request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import mqtt, { type MqttClient } from "mqtt";
import { WebSocket } from "undici";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type Mosquitto, startMosquitto } from "../../hw/mosquitto.js";
import { initSoftHsm, type SoftHsmHandle } from "../../hw/softhsm.js";
import { fetchStatus } from "../../src/cli/agent/status.js";
import { type Daemon, startDaemon } from "../integration/daemon-cli-kit.js";
import {
  cliEnv,
  createBootstrapToken,
  enrollAgent,
  ensureBuilt,
  eventually,
  hsmSensorAgent,
  mqttSinkToml,
  type RegistrarProcess,
  SENSORS_GROUP,
  setupRegistrar,
  startRegistrarProcess,
  writeAgentToml,
} from "../integration/e2e-kit.js";
import { leakGate, leastSquares, type MemoryPoint } from "./leak-gate.js";

/**
 * Memory soak of the BUILT daemon under steady load: `m2m-agent run` (SoftHSM key, enrolled at the
 * reference registrar with a bootstrap token) relays over MQTT 5 with mTLS (the key stays in the
 * token, OpenSSL pkcs11 engine) to a real mosquitto. The test offers ~1.5k msg/s through the local
 * API (`POST /v1/messages`, batches of 75 every 50 ms, at most 8 requests in flight) for
 * M2M_SOAK_SECONDS (default 90). It samples VmRSS from /proc every second and, every 2.5 s, forces
 * two full GCs 300 ms apart through the daemon's inspector (loopback, ephemeral port) and records
 * the lower V8 heapUsed and then VmRSS: without that, V8's old-space sawtooth (measured ±60 MiB
 * over ~40 s at this load) hides any trend in a run of minutes. After a 20 s warm-up it asserts:
 *  - the leak gate (`leak-gate.ts`: Theil–Sen trend above the bound, sustained to the end of the run,
 *    and for the heap still held after the load stopped and the outbox drained) passes for post-GC
 *    heapUsed with HEAP_SLOPE_BOUND (JS retention) and post-GC VmRSS with RSS_SLOPE_BOUND (native
 *    retention: SQLite, OpenSSL…). The gate once failed on a busy machine with no leak behind it
 *    (worker placement, wall-time slopes heap 1.21 / RSS 4.34 MiB/min): a backlog that the drain
 *    releases, or warm-up growth that flattens, is no longer read as a leak;
 *  - with a test-only leak of INJECTED_LEAK_MIB_PER_MIN injected into the daemon (the size of the
 *    one this soak found), the same gate reports a leak: the gate still catches what it must;
 *  - VmRSS (1 s samples) never exceeds RSS_CEILING_MIB;
 *  - every id the API acknowledged reached the broker (and nothing else did); the outbox drains.
 *
 * Bounds from measurement on the shared 2-core machine (after the relay fix of commit 0a22c70):
 *  - post-GC heapUsed stays at 30–32 MiB: slope 0.10 MiB/min over 300 s, |slope| < 0.3 over 90 s.
 *    The leak this test found (one PromiseReaction per relay wait) measured +1.7 to +2.7 MiB/min.
 *    0.5 MiB/min = ~6 bytes retained per message at 1.5k msg/s.
 *    One post-GC reading every 5 s with a least-squares fit spread ±0.4 MiB/min between runs (points
 *    30.0–31.8 MiB: whatever was in flight at the GC) and failed once at 0.68 with no leak (two heap
 *    snapshots 60 s apart: +0.3 MiB in all, mostly JIT code). The lower of two GCs every 2.5 s
 *    with a median slope keeps the points within ~0.5 MiB; a synthetic 1.7 MiB/min leak (evaluated
 *    in the daemon over the inspector) measured 1.90 (least squares 1.76): fails.
 *  - post-GC VmRSS rises ~3.5 MiB over the first ~2 minutes (glibc arenas warming up, heap flat)
 *    then stays flat (113 -> 117 MiB over 300 s: 0.52 MiB/min overall); a 90 s window measures
 *    2.0–2.3 MiB/min, hence 4 MiB/min (= ~47 bytes per message).
 *  - VmRSS (with the forced GCs) peaks at 142–177 MiB, ~120–130 MiB most of the time: 224 MiB.
 * On a busy machine (measured at load average ≈ 40 with 12 CPU burners) the relay forwards only
 * 150-450 msg/s: the producer then holds back while the outbox is above BACKLOG_CAP (an unbounded
 * backlog's native memory read as an RSS "leak" of 4.5-15 MiB/min), the GC readings come every
 * 5-6 s instead of 2.5 s, so the load runs on until MIN_READINGS readings after the warm-up (at most
 * 2 × SOAK_S), and the injected leak is sized by wall time, not by timer ticks. Measured there: no
 * leak → heap 0.00 / RSS 0.83-0.95 MiB/min, ok; injected 1.7 → heap 1.66, LEAK.
 * Not a timing test: throughput is not asserted (open loop; a tick is skipped when saturated).
 * To find what is retained when a bound fails, diff two `HeapProfiler.takeHeapSnapshot`s by
 * constructor (that is how the relay leak was found).
 */
const SOAK_S = Number(process.env.M2M_SOAK_SECONDS ?? 90);
const WARMUP_S = 20;
const HEAP_SLOPE_BOUND = 0.5;
const RSS_SLOPE_BOUND = 4;
const RSS_CEILING_MIB = 224;
const BATCH = 75;
const TICK_MS = 50;
const MAX_IN_FLIGHT = 8;
const GC_EVERY_MS = 2_500;
/** The relay leak this soak once found grew +1.7 to +2.7 MiB/min: the injected leak is the low end. */
const INJECTED_LEAK_MIB_PER_MIN = 1.7;
const PAYLOAD = "x".repeat(120);
/**
 * Outbox depth above which the producer holds back. On a busy machine the relay cannot forward
 * 1.5k msg/s: the backlog then grew without bound (25,000 after 90 s at load average 38) and with
 * it the native memory of the outbox's SQLite connections and the allocator's high-water mark
 * (RSS − V8 heap +13 MiB, heapUsed flat, nothing released after the drain), which the RSS gate read
 * as a leak. A soak measures retention at steady state, so the load adapts to what the machine
 * forwards. Quiet runs stay far below it (depth ≤ 110).
 */
const BACKLOG_CAP = 2_000;
/**
 * Post-GC readings after the warm-up that the gate needs to separate a 1.7 MiB/min heap leak from
 * in-flight noise (test/unit/leak-gate.test.ts: 24 sparse readings miss none of 1,000 seeded leaks).
 * A quiet machine gets 28 in 90 s; at load average 40 the GC loop managed 14-18.
 */
const MIN_READINGS = 24;

function rssKiB(pid: number): number {
  const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  if (m === null) throw new Error(`no VmRSS for pid ${pid}`);
  return Number(m[1]);
}

/** A minimal Chrome DevTools Protocol client over the inspector WebSocket. */
async function connectInspector(url: string): Promise<{
  call(method: string, params?: Record<string, unknown>): Promise<unknown>;
  /** Protocol events (no id), e.g. NodeWorker.attachedToWorker. */
  on(method: string, handler: (params: Record<string, unknown>) => void): void;
  close(): void;
}> {
  const ws = new WebSocket(url);
  await new Promise<void>((resolve, reject) => {
    ws.addEventListener("open", () => resolve(), { once: true });
    ws.addEventListener("error", () => reject(new Error(`inspector ${url} unreachable`)), { once: true });
  });
  let seq = 0;
  const waiting = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  const handlers = new Map<string, (params: Record<string, unknown>) => void>();
  ws.addEventListener("message", (ev) => {
    const msg = JSON.parse(String(ev.data)) as {
      id?: number;
      method?: string;
      params?: Record<string, unknown>;
      result?: unknown;
      error?: { message: string };
    };
    if (msg.id === undefined && msg.method !== undefined) handlers.get(msg.method)?.(msg.params ?? {});
    const w = msg.id === undefined ? undefined : waiting.get(msg.id);
    if (w === undefined || msg.id === undefined) return;
    waiting.delete(msg.id);
    if (msg.error !== undefined) w.reject(new Error(msg.error.message));
    else w.resolve(msg.result);
  });
  return {
    call(method, params = {}) {
      const id = ++seq;
      return new Promise((resolve, reject) => {
        const t = setTimeout(() => {
          waiting.delete(id);
          reject(new Error(`inspector ${method} timed out`));
        }, 30_000);
        waiting.set(id, {
          resolve: (v) => {
            clearTimeout(t);
            resolve(v);
          },
          reject: (e) => {
            clearTimeout(t);
            reject(e);
          },
        });
        ws.send(JSON.stringify({ id, method, params }));
      });
    },
    on(method, handler) {
      handlers.set(method, handler);
    },
    close() {
      ws.close();
    },
  };
}

/**
 * One POST. A keep-alive socket the server closed just as we reused it fails with ECONNRESET before
 * the request reached the server (Node's documented `req.reusedSocket` race): nothing was acked, so
 * sending again on a fresh socket is what any at-least-once client does. Any other error fails.
 */
async function postBatch(
  agent: HttpAgent,
  socketPath: string,
  body: string,
): Promise<{ status: number; text: string }> {
  try {
    return await postOnce(agent, socketPath, body);
  } catch (err) {
    const e = err as NodeJS.ErrnoException & { reusedSocket?: boolean };
    if (e.code === "ECONNRESET" && e.reusedSocket === true) return postOnce(agent, socketPath, body);
    throw err;
  }
}

function postOnce(
  agent: HttpAgent,
  socketPath: string,
  body: string,
): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath,
        agent,
        path: "/v1/messages",
        method: "POST",
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) },
        timeout: 30_000,
      },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (c: string) => {
          text += c;
        });
        res.on("end", () => resolve({ status: res.statusCode ?? 0, text }));
      },
    );
    req.on("timeout", () => req.destroy(new Error("request timeout")));
    req.on("error", (err: Error) => reject(Object.assign(err, { reusedSocket: req.reusedSocket })));
    req.end(body);
  });
}

describe("daemon memory soak (built CLI, SoftHSM, registrar, mosquitto mTLS)", () => {
  let work: string;
  let hsm: SoftHsmHandle;
  let broker: Mosquitto;
  let registrar: RegistrarProcess;
  let env: NodeJS.ProcessEnv;
  let agentConfig: string;
  let socketPath: string;
  let deviceId: string;
  let sub: MqttClient | undefined;
  let daemon: Daemon | undefined;

  beforeAll(async () => {
    ensureBuilt();
    work = await mkdtemp(join(tmpdir(), "m2m-soak-"));
    hsm = await initSoftHsm({ label: "soak-sensor" });
    env = cliEnv({ SOFTHSM2_CONF: hsm.env.SOFTHSM2_CONF });

    const setup = await setupRegistrar({
      work,
      env,
      extraConfig: ["[oauth.roles]", 'sensor = ["telemetry:write", "est"]'],
      groups: [SENSORS_GROUP],
    });
    const bootstrap = await createBootstrapToken(setup, "sensors");
    registrar = await startRegistrarProcess(setup.regConfig, env);

    // Unbounded queues for the observing subscriber: mosquitto's default (1000) would drop under load.
    broker = await startMosquitto({
      clientCaFile: setup.caCert,
      extraConfig: ["max_queued_messages 0", "max_inflight_messages 0"],
    });
    socketPath = join(work, "api.sock");
    agentConfig = join(work, "agent.toml");
    await writeAgentToml(
      agentConfig,
      hsmSensorAgent({
        work,
        hsm,
        registrar: { url: registrar.url, caFile: setup.caCert },
        bootstrapToken: bootstrap,
        hardwareSerial: "SOAK-1",
        agent: ["drain_timeout_ms = 5000"],
        sections: mqttSinkToml(broker, 64),
        apiMode0600: true,
      }),
    );
    const enrolled = await enrollAgent(agentConfig, env);
    deviceId = (JSON.parse(enrolled.stdout) as { deviceId: string }).deviceId;
  }, 180_000);

  afterAll(async () => {
    await sub?.endAsync(true);
    daemon?.kill();
    await daemon?.exited;
    await registrar?.stop();
    await broker?.cleanup();
    await hsm?.cleanup();
    if (work !== undefined) await rm(work, { recursive: true, force: true });
  });

  // Both outbox placements: in the event loop (default) and in a worker thread (whose heap the test
  // collects too, through the inspector's NodeWorker domain: otherwise its sawtooth reads as growth).
  it.each([
    { thread: "main", leak: 0 },
    { thread: "worker", leak: 0 },
    { thread: "main", leak: INJECTED_LEAK_MIB_PER_MIN },
  ] as const)(
    `outbox thread $thread, injected leak $leak MiB/min: ~1.5k msg/s for ${SOAK_S} s: after ${WARMUP_S} s the leak gate (heap ${HEAP_SLOPE_BOUND}, RSS ${RSS_SLOPE_BOUND} MiB/min) reports a leak exactly when one was injected, RSS < ${RSS_CEILING_MIB} MiB; every acked id delivered, outbox drained`,
    async ({ thread, leak }) => {
      // A case that failed left its daemon running (it holds the state dir lock): stop it first.
      daemon?.kill();
      await daemon?.exited;
      daemon = undefined;
      await sub?.endAsync(true);
      sub = undefined;
      const delivered = new Set<string>();
      const client = await mqtt.connectAsync(broker.plainUrl, { protocolVersion: 5, reconnectPeriod: 200 });
      sub = client;
      client.on("message", (_topic, _payload, packet) => {
        const id = packet.properties?.userProperties?.["m2m-id"];
        if (typeof id === "string") delivered.add(id);
      });
      await client.subscribeAsync(`devices/${deviceId}/#`, { qos: 1 });

      // The inspector (loopback, ephemeral port) lets the test force full GCs: the RSS right after a
      // full GC is the retained memory, free of V8's sawtooth (measured: ±60 MiB over ~40 s here).
      const config = join(work, `agent-${thread}.toml`);
      await writeFile(
        config,
        `${await readFile(agentConfig, "utf8")}\n[relay.outbox]\nthread = "${thread}"\n`,
        {
          mode: 0o600,
        },
      );
      const d = startDaemon(["--config", config, "run"], {
        ...env,
        NODE_OPTIONS: "--inspect=127.0.0.1:0",
      });
      daemon = d;
      await d.waitLog((r) => r.msg === "lifecycle transition" && r.to === "running", 60_000);
      const pid = d.child.pid;
      if (pid === undefined) throw new Error("daemon has no pid");
      const wsUrl = /Debugger listening on (ws:\/\/\S+)/.exec(d.stderr())?.[1];
      if (wsUrl === undefined) throw new Error(`no inspector URL on stderr:\n${d.stderr()}`);
      const inspector = await connectInspector(wsUrl);
      // Worker threads (the outbox worker, SQLite's checkpointer): attach to collect their heaps too.
      const workers = new Set<string>();
      let workerSeq = 0;
      const workerWaiting = new Map<number, (result: unknown) => void>();
      inspector.on("NodeWorker.attachedToWorker", (p) => workers.add(String(p.sessionId)));
      inspector.on("NodeWorker.detachedFromWorker", (p) => workers.delete(String(p.sessionId)));
      inspector.on("NodeWorker.receivedMessageFromWorker", (p) => {
        const m = JSON.parse(String(p.message)) as { id?: number; result?: unknown };
        if (m.id !== undefined) workerWaiting.get(m.id)?.(m.result);
      });
      await inspector.call("NodeWorker.enable", { waitForDebuggerOnStart: false });
      const inWorker = (sessionId: string, method: string, params: Record<string, unknown> = {}) =>
        new Promise<unknown>((resolve, reject) => {
          const id = ++workerSeq;
          const t = setTimeout(() => {
            workerWaiting.delete(id);
            reject(new Error(`worker ${method} timed out`));
          }, 30_000);
          workerWaiting.set(id, (r) => {
            clearTimeout(t);
            workerWaiting.delete(id);
            resolve(r);
          });
          void inspector
            .call("NodeWorker.sendMessageToWorker", {
              sessionId,
              message: JSON.stringify({ id, method, params }),
            })
            .catch(reject);
        });
      const heapUsedOf = (r: unknown): number => Number((r as { result: { value: number } }).result.value);
      if (leak > 0) {
        // Test-only leak in the daemon's main thread: arrays of doubles kept every 250 ms, sized by the
        // time since the last one, so the leak is `leak` MiB per minute of wall time even when a busy
        // machine makes the timer fire late (a fixed size per tick leaked 4× less at load average 40).
        const doublesPerMs = (leak * 2 ** 20) / 60_000 / 8;
        await inspector.call("Runtime.evaluate", {
          expression: `globalThis.__soakLeak = []; let last = performance.now(); setInterval(() => { const now = performance.now(); globalThis.__soakLeak.push(Array.from({ length: Math.round((now - last) * ${doublesPerMs}) }, (_, i) => i + 0.5)); last = now; }, 250).unref(); 1`,
        });
      }

      const samples: { t: number; kib: number }[] = [];
      const postGc: {
        t: number;
        messages: number;
        kib: number;
        anon: number;
        file: number;
        heapUsed: number;
        heapTotal: number;
        external: number;
        depth: number;
      }[] = [];
      const t0 = performance.now();
      const sampler = setInterval(() => {
        samples.push({ t: (performance.now() - t0) / 1000, kib: rssKiB(pid) });
      }, 1000);
      const heapAfterGc = async (): Promise<number> => {
        // Every thread's heap: a worker's garbage is as much RSS as the main thread's.
        let workersHeap = 0;
        for (const w of [...workers]) {
          await inWorker(w, "HeapProfiler.collectGarbage");
          workersHeap += heapUsedOf(
            await inWorker(w, "Runtime.evaluate", {
              expression: "process.memoryUsage().heapUsed",
              returnByValue: true,
            }),
          );
        }
        await inspector.call("HeapProfiler.collectGarbage");
        return (
          workersHeap +
          Number(
            (
              (await inspector.call("Runtime.evaluate", {
                expression: "process.memoryUsage().heapUsed",
                returnByValue: true,
              })) as { result: { value: number } }
            ).result.value,
          )
        );
      };
      /** V8's committed heap and off-heap buffers of the main thread plus the workers' committed heaps. */
      const v8Committed = async (): Promise<{ heapTotal: number; external: number }> => {
        const usage = (r: unknown): { heapTotal: number; external: number } =>
          JSON.parse(String((r as { result: { value: string } }).result.value)) as {
            heapTotal: number;
            external: number;
          };
        const expr = {
          expression: "JSON.stringify(process.memoryUsage())",
          returnByValue: true,
        };
        const main = usage(await inspector.call("Runtime.evaluate", expr));
        let heapTotal = main.heapTotal;
        for (const w of [...workers])
          heapTotal += usage(await inWorker(w, "Runtime.evaluate", expr)).heapTotal;
        return { heapTotal, external: main.external };
      };
      /** Two full GCs 300 ms apart: the lower heapUsed is the retained floor; a leak raises both. */
      const heapFloor = async (): Promise<number> => {
        const h1 = await heapAfterGc();
        await new Promise((r) => setTimeout(r, 300));
        return Math.min(h1, await heapAfterGc());
      };
      const acked = new Set<string>();
      /** The outbox depth last reported on /v1/status (polled below). */
      let depthNow = 0;
      let gcBusy = false;
      const gcFailures: string[] = [];
      const gcTimer = setInterval(() => {
        if (gcBusy) return;
        gcBusy = true;
        void (async () => {
          // The other reading carries more of what was in flight at that instant.
          const heapUsed = await heapFloor();
          // V8 returns freed pages to the OS from a background task: give it a moment.
          await new Promise((r) => setTimeout(r, 300));
          const committed = await v8Committed();
          const st = readFileSync(`/proc/${pid}/status`, "utf8");
          const field = (k: string): number =>
            Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(st)?.[1] ?? Number.NaN);
          postGc.push({
            t: (performance.now() - t0) / 1000,
            messages: acked.size,
            kib: field("VmRSS"),
            anon: field("RssAnon"),
            file: field("RssFile") + field("RssShmem"),
            heapUsed,
            heapTotal: committed.heapTotal,
            external: committed.external,
            depth: depthNow,
          });
        })()
          .catch((err: unknown) => gcFailures.push(String(err)))
          .finally(() => {
            gcBusy = false;
          });
      }, GC_EVERY_MS);

      const failures: string[] = [];
      let offered = 0;
      let skipped = 0;
      // Steady state: the producer holds back while the outbox backlog is above BACKLOG_CAP (the
      // daemon reports its depth on /v1/status, polled every 250 ms).
      let held = 0;
      let statusMisses = 0;
      let loadS = SOAK_S;
      let maxDepth = 0;
      const depthTimer = setInterval(() => {
        void fetchStatus(socketPath)
          .then((s) => {
            depthNow =
              (s.stages.relay as { outbox: { depth: number } | null } | undefined)?.outbox?.depth ?? 0;
            maxDepth = Math.max(maxDepth, depthNow);
          })
          // A status request that times out on a saturated machine is not a failure: the last depth stands.
          .catch(() => {
            statusMisses++;
          });
      }, 250);
      let inFlight = 0;
      const pending = new Set<Promise<void>>();
      const agent = new HttpAgent({ keepAlive: true, maxSockets: MAX_IN_FLIGHT });
      try {
        // At least SOAK_S, and on a busy machine (where the GC readings come slower) until the gate has
        // MIN_READINGS readings after the warm-up, up to 2 × SOAK_S.
        const soakEnd = t0 + SOAK_S * 1000;
        const hardEnd = t0 + 2 * SOAK_S * 1000;
        const enough = (): boolean =>
          performance.now() >= soakEnd &&
          (postGc.filter((p) => p.t >= WARMUP_S).length >= MIN_READINGS || performance.now() >= hardEnd);
        let next = performance.now();
        let n = 0;
        while (!enough()) {
          // Open loop: a tick whose slot is still busy is skipped (counted), never queued up.
          if (inFlight >= MAX_IN_FLIGHT) skipped++;
          else if (depthNow > BACKLOG_CAP) held++;
          else {
            const body = JSON.stringify(
              Array.from({ length: BATCH }, () => ({ channel: "soak", payload: { n: n++, v: PAYLOAD } })),
            );
            offered += BATCH;
            inFlight++;
            const p = postBatch(agent, socketPath, body)
              .then(({ status, text }) => {
                if (status !== 200) failures.push(`${status} ${text.slice(0, 200)}`);
                else for (const id of (JSON.parse(text) as { ids: string[] }).ids) acked.add(id);
              })
              .catch((err: unknown) => {
                failures.push(String(err));
              })
              .finally(() => {
                inFlight--;
                pending.delete(p);
              });
            pending.add(p);
          }
          next += TICK_MS;
          const wait = next - performance.now();
          if (wait > 0) await new Promise((r) => setTimeout(r, wait));
          else next = performance.now();
        }
        await Promise.all([...pending]);
        loadS = (performance.now() - t0) / 1000;
      } finally {
        clearInterval(sampler);
        clearInterval(gcTimer);
        clearInterval(depthTimer);
        agent.destroy();
      }

      // Delivery: every acknowledged id reached the broker (at least once), nothing unknown did.
      await eventually(
        async () => ([...acked].every((id) => delivered.has(id)) ? true : undefined),
        90_000,
        "delivery of every acknowledged id",
      );
      const outbox = await eventually(async () => {
        const s = await fetchStatus(socketPath);
        const o = (s.stages.relay as { outbox: { depth: number } | null } | undefined)?.outbox;
        return o?.depth === 0 ? o : undefined;
      }, 60_000);

      // Load stopped, outbox drained: what the heap still holds now is retained, not in flight.
      const drainedHeapMiB = (await heapFloor()) / 2 ** 20;
      const rssNow = (): string => {
        const st = readFileSync(`/proc/${pid}/status`, "utf8");
        const f = (k: string): string =>
          (Number(new RegExp(`${k}:\\s+(\\d+) kB`).exec(st)?.[1] ?? Number.NaN) / 1024).toFixed(1);
        return `RSS ${f("VmRSS")} anon ${f("RssAnon")}`;
      };
      const c1 = await v8Committed();
      const drained1 = `${rssNow()} heapTotal ${(c1.heapTotal / 2 ** 20).toFixed(1)}`;
      await new Promise((r) => setTimeout(r, 10_000));
      await heapFloor();
      await new Promise((r) => setTimeout(r, 300));
      const c2 = await v8Committed();
      const drainedNote = `${drained1}; 10 s idle: ${rssNow()} heapTotal ${(c2.heapTotal / 2 ** 20).toFixed(1)}`;
      inspector.close();

      const mib = (kib: number): number => kib / 1024;
      const perMin = (pts: readonly { t: number; y: number }[]): number =>
        leastSquares(pts.map((p) => ({ x: p.t, y: p.y }))) * 60;
      const after = samples.filter((s) => s.t >= WARMUP_S);
      const gcAfter = postGc.filter((s) => s.t >= WARMUP_S);
      const rawSlope = perMin(after.map((s) => ({ t: s.t, y: mib(s.kib) })));
      const gcSlope = perMin(gcAfter.map((s) => ({ t: s.t, y: mib(s.kib) })));
      const heapSeries: MemoryPoint[] = postGc.map((s) => ({
        t: s.t,
        messages: s.messages,
        mib: s.heapUsed / 2 ** 20,
      }));
      const rssSeries: MemoryPoint[] = postGc.map((s) => ({ t: s.t, messages: s.messages, mib: mib(s.kib) }));
      const heapGate = leakGate(
        heapSeries,
        { boundMiBPerMin: HEAP_SLOPE_BOUND, warmupS: WARMUP_S },
        drainedHeapMiB,
      );
      const rssGate = leakGate(rssSeries, { boundMiBPerMin: RSS_SLOPE_BOUND, warmupS: WARMUP_S });
      const maxMiB = mib(Math.max(...samples.map((s) => s.kib)));
      // The figures a reader needs when the bound is revisited.
      console.log(
        `soak (outbox thread ${thread}, ${workers.size} worker threads collected): ${loadS.toFixed(0)} s, offered ${offered}, acked ${acked.size} (${(acked.size / loadS).toFixed(0)} msg/s), ` +
          `skipped ticks ${skipped}, held for backlog ${held}, max outbox depth ${maxDepth} (${statusMisses} status timeouts), delivered ${delivered.size}; max RSS ${maxMiB.toFixed(1)} MiB; ` +
          `after ${WARMUP_S} s: post-GC RSS least squares ${gcSlope.toFixed(2)} MiB/min (${gcAfter.length} pts), 1 s RSS ${rawSlope.toFixed(2)} (${after.length} pts)\n` +
          `heap gate: ${heapGate.leak ? "LEAK" : "ok"} (${heapGate.why}); drained heap ${drainedHeapMiB.toFixed(1)} MiB\n` +
          `RSS gate: ${rssGate.leak ? "LEAK" : "ok"} (${rssGate.why})\n` +
          `post-GC RSS MiB: ${postGc.map((s) => mib(s.kib).toFixed(1)).join(" ")}\n` +
          `post-GC RssAnon MiB: ${postGc.map((s) => mib(s.anon).toFixed(1)).join(" ")}\n` +
          `post-GC RssFile+Shmem MiB: ${postGc.map((s) => mib(s.file).toFixed(1)).join(" ")}\n` +
          `post-GC heapUsed MiB: ${postGc.map((s) => (s.heapUsed / 2 ** 20).toFixed(1)).join(" ")}\n` +
          `post-GC heapTotal MiB: ${postGc.map((s) => (s.heapTotal / 2 ** 20).toFixed(1)).join(" ")}\n` +
          `post-GC external MiB: ${postGc.map((s) => (s.external / 2 ** 20).toFixed(1)).join(" ")}\n` +
          `post-GC RSS - heapTotal MiB: ${postGc.map((s) => (mib(s.kib) - s.heapTotal / 2 ** 20).toFixed(1)).join(" ")}\n` +
          `outbox depth: ${postGc.map((s) => s.depth).join(" ")}\n` +
          `after drain: ${drainedNote}\n` +
          `1 s RSS MiB (every 5th): ${samples
            .filter((_, i) => i % 5 === 0)
            .map((s) => mib(s.kib).toFixed(0))
            .join(" ")}`,
      );

      expect(failures).toEqual([]);
      expect(gcFailures).toEqual([]);
      expect(acked.size).toBeGreaterThan(0);
      expect(outbox.depth).toBe(0);
      // At least once: duplicates may occur, but nothing the API did not acknowledge.
      expect([...delivered].filter((id) => !acked.has(id))).toEqual([]);
      expect(gcAfter.length).toBeGreaterThanOrEqual(
        Math.floor(((SOAK_S - WARMUP_S) * 1000) / GC_EVERY_MS / 2),
      );
      // The gate flags the heap exactly when a leak was injected; RSS never (the injected leak is 1.7).
      expect(heapGate.leak, heapGate.why).toBe(leak > 0);
      expect(rssGate.leak, rssGate.why).toBe(false);
      expect(maxMiB).toBeLessThan(RSS_CEILING_MIB);
      expect(d.child.exitCode).toBeNull();
      d.kill();
      await d.exited;
      daemon = undefined;
      await sub?.endAsync(true);
      sub = undefined;
    },
    (2 * SOAK_S + 240) * 1000,
  );
});
