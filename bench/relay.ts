/**
 * `npm run bench:relay`: the relay against a real mosquitto (TLS, mTLS, ACL) and a local HTTPS
 * ingest endpoint, in one bounded run (< 2 min):
 *  1. raw mqtt.js QoS 1 publisher vs the full path (socket ingest → outbox fsync → MQTT sink),
 *     same payload, same in-flight window, both measured until a subscriber has every message;
 *  2. ingest ack latency p50/p99 with 10k msg/s offered (open loop, batches of 100);
 *  3. backlog drain rate after a broker outage;
 *  4. HTTPS sink path (outbox → relay → gzip/DPoP POSTs) vs raw undici POSTs of the same batches;
 *  5. RSS of the relay process idle and under load.
 */
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { Agent as HttpAgent, request as httpRequest } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { promisify } from "node:util";
import { gzip as gzipCb } from "node:zlib";
import { generateKeyPair, jwtVerify, SignJWT } from "jose";
import mqtt from "mqtt";
import { Agent, request } from "undici";
import { startMosquitto } from "../hw/mosquitto.js";
import { systemClock } from "../src/core/clock.js";
import { Secret } from "../src/core/secret.js";
import { HardwareDpopSigner } from "../src/credentials/oauth/dpop.js";
import { FakeKeyProvider } from "../src/keys/fake/fake-provider.js";
import { HttpError } from "../src/registrar/http/router.js";
import { ingestRoutes } from "../src/registrar/ingest/routes.js";
import { newMessageId } from "../src/relay/ids.js";
import { SqliteOutbox } from "../src/relay/outbox/sqlite/sqlite-outbox.js";
import { WorkerOutbox } from "../src/relay/outbox/worker/worker-outbox.js";
import { Relay } from "../src/relay/relay.js";
import { HttpsSink } from "../src/relay/sinks/https/https-sink.js";

const gzip = promisify(gzipCb);
const N = 20_000;
const WINDOW = 64;
const PAYLOAD = JSON.stringify({ v: "x".repeat(180) });
const BATCH = 100;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * Producers keep their connections open (8 sockets, like a sensor hub posting continuously); a new
 * connection per POST is what `m2m-agent send` does, but it is not how a high-rate producer works.
 */
const producerAgent = new HttpAgent({ keepAlive: true, maxSockets: 8 });

/** CPU seconds (user + system, all threads) a process has used so far, from /proc. */
function procCpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(f[11]) + Number(f[12])) / 100;
}

function post(socketPath: string, body: string, agent: HttpAgent | false = producerAgent): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = httpRequest(
      {
        socketPath,
        path: "/v1/messages",
        method: "POST",
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) },
        agent,
      },
      (res) => {
        res.resume();
        res.on("end", () => resolve(res.statusCode ?? 0));
      },
    );
    req.on("error", reject);
    req.end(body);
  });
}

function batchBody(channel: string, start: number): string {
  return JSON.stringify(
    Array.from({ length: BATCH }, (_, i) => ({ channel, payload: { n: start + i, v: PAYLOAD } })),
  );
}

/** Open-loop load: a batch of 100 every 10 ms (10k msg/s offered) for `ms`; per-request ack latency. */
async function offeredLoad(
  socketPath: string,
  channel: string,
  ms: number,
  agent: HttpAgent | false = producerAgent,
): Promise<{ accepted: number; summary: Record<string, number> }> {
  const lat: number[] = [];
  const intervalMs = (BATCH / 10_000) * 1000;
  const start = performance.now();
  const pending: Promise<void>[] = [];
  let k = 0;
  let errors = 0;
  while (performance.now() - start < ms) {
    const wait = start + k * intervalMs - performance.now();
    if (wait > 0) await sleep(wait);
    const sentAt = performance.now();
    pending.push(
      post(socketPath, batchBody(channel, k * BATCH), agent).then(
        (s) => {
          if (s === 200) lat.push(performance.now() - sentAt);
          else errors++;
        },
        () => {
          errors++;
        },
      ),
    );
    k++;
  }
  await Promise.all(pending);
  const achieved = (lat.length * BATCH) / ((performance.now() - start) / 1000);
  lat.sort((a, b) => a - b);
  return {
    accepted: lat.length * BATCH,
    summary: {
      offeredMsgPerS: 10_000,
      achievedMsgPerS: Math.round(achieved),
      batch: BATCH,
      requests: lat.length,
      errors,
      p50Ms: Number(pct(lat, 50).toFixed(2)),
      p99Ms: Number(pct(lat, 99).toFixed(2)),
      maxMs: Number((lat[lat.length - 1] ?? 0).toFixed(2)),
    },
  };
}

function pct(sorted: readonly number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? 0;
}

async function main(): Promise<void> {
  const t0 = Date.now();
  const results: Record<string, unknown> = {};
  // Unbounded queues for the observing subscriber: the default (1000) drops under a 20k burst.
  const broker = await startMosquitto({
    persistence: true,
    extraConfig: ["max_queued_messages 0", "max_inflight_messages 0"],
  });
  const dir = await mkdtemp(join(tmpdir(), "m2m-bench-relay-"));
  const { certPem, keyPem } = await broker.ca.issueClient("dev-bench");
  const sub = await mqtt.connectAsync(broker.plainUrl, {
    protocolVersion: 5,
    clean: false,
    clientId: "bench-observer",
    properties: { sessionExpiryInterval: 600 },
    reconnectPeriod: 100,
  });
  const counts = new Map<string, number>();
  sub.on("message", (topic) => counts.set(topic, (counts.get(topic) ?? 0) + 1));
  await sub.subscribeAsync("devices/dev-bench/#", { qos: 1 });
  const waitCount = async (topic: string, n: number, timeoutMs: number): Promise<void> => {
    const deadline = Date.now() + timeoutMs;
    while ((counts.get(topic) ?? 0) < n) {
      if (Date.now() > deadline) throw new Error(`timeout: ${topic} ${counts.get(topic) ?? 0}/${n}`);
      await sleep(2);
    }
  };

  try {
    // RELAY_BENCH_ONLY=https runs only phase 4 (for profiling it: node --cpu-prof …).
    if (process.env.RELAY_BENCH_ONLY === "https") {
      results.https = await benchHttps(broker.ca, dir);
      console.log(JSON.stringify(results, null, 2));
      return;
    }
    // ---- 1a. raw mqtt.js publisher --------------------------------------------------------------
    const raw = await mqtt.connectAsync(broker.mtlsUrl, {
      protocolVersion: 5,
      reconnectPeriod: 0,
      ca: broker.ca.caPem,
      cert: certPem,
      key: keyPem,
      rejectUnauthorized: true,
    });
    const rawStart = performance.now();
    const rawCpu0 = process.cpuUsage();
    const brokerPid = broker.pid ?? 0;
    const rawBroker0 = procCpuSeconds(brokerPid);
    await new Promise<void>((resolve, reject) => {
      let sent = 0;
      let inflight = 0;
      let acked = 0;
      const pump = (): void => {
        while (inflight < WINDOW && sent < N) {
          inflight++;
          const n = sent++;
          raw.publish(
            "devices/dev-bench/raw",
            JSON.stringify({ n, v: PAYLOAD }),
            {
              qos: 1,
              properties: { userProperties: { "m2m-id": newMessageId() }, contentType: "application/json" },
            },
            (err) => {
              if (err) return reject(err);
              inflight--;
              if (++acked === N) resolve();
              else pump();
            },
          );
        }
      };
      pump();
    });
    await waitCount("devices/dev-bench/raw", N, 60_000);
    const rawRate = N / ((performance.now() - rawStart) / 1000);
    const rawCpu = process.cpuUsage(rawCpu0);
    const rawBrokerUs = ((procCpuSeconds(brokerPid) - rawBroker0) * 1e6) / N;
    await raw.endAsync();

    // ---- 1b. full path through a relay child process --------------------------------------------
    const socketPath = join(dir, "api.sock");
    // RELAY_BENCH_CHILD=/path/to/relay-child.js runs another build's relay (old vs new, same harness).
    const childJs = process.env.RELAY_BENCH_CHILD ?? new URL("./relay-child.js", import.meta.url).pathname;
    const child = spawn(
      process.execPath,
      [
        // RELAY_BENCH_NODE_ARGS="--max-semi-space-size=32 …" passes V8/Node flags to the relay process.
        ...(process.env.RELAY_BENCH_NODE_ARGS ?? "").split(" ").filter((x) => x !== ""),
        // RELAY_BENCH_PROF=DIR writes a CPU profile of the relay process (for looking at hot spots).
        ...(process.env.RELAY_BENCH_PROF === undefined
          ? []
          : ["--cpu-prof", `--cpu-prof-dir=${process.env.RELAY_BENCH_PROF}`]),
        childJs,
        JSON.stringify({
          dbPath: join(dir, "outbox.db"),
          socketPath,
          brokerUrl: broker.mtlsUrl,
          caPem: broker.ca.caPem,
          certPem,
          keyPem,
          deviceId: "dev-bench",
          maxInFlight: WINDOW,
        }),
      ],
      { stdio: ["ignore", "pipe", "inherit"] },
    );
    const rss: number[] = [];
    /** Per second: the relay's event-loop delay p99 (ms). */
    const loopDelay: number[] = [];
    let depth = -1;
    let ready: () => void = () => undefined;
    const isReady = new Promise<void>((r) => {
      ready = r;
    });
    let buf = "";
    child.stdout.on("data", (d: Buffer) => {
      buf += d.toString();
      for (;;) {
        const i = buf.indexOf("\n");
        if (i < 0) break;
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (line === "ready") ready();
        else {
          try {
            const s = JSON.parse(line) as { rss: number; stats: { depth: number }; loopDelayP99Ms?: number };
            rss.push(s.rss);
            loopDelay.push(s.loopDelayP99Ms ?? 0);
            depth = s.stats.depth;
          } catch {
            // not a stats line
          }
        }
      }
    });
    await isReady;
    await sleep(1200);
    const rssIdle = rss[rss.length - 1] ?? 0;
    const rssBeforeLoad = rss.length;

    const fullStart = performance.now();
    const pid = child.pid ?? 0;
    const relayCpu0 = procCpuSeconds(pid);
    const benchCpu0 = process.cpuUsage();
    const fullBroker0 = procCpuSeconds(brokerPid);
    let nextN = 0;
    await Promise.all(
      Array.from({ length: 8 }, async () => {
        while (nextN < N) {
          const start = nextN;
          nextN += BATCH;
          const status = await post(socketPath, batchBody("full", start));
          if (status !== 200) throw new Error(`ingest answered ${status}`);
        }
      }),
    );
    const ingestDone = performance.now();
    await waitCount("devices/dev-bench/full", N, 60_000);
    const fullRate = N / ((performance.now() - fullStart) / 1000);
    const relayCpuUs = ((procCpuSeconds(pid) - relayCpu0) * 1e6) / N;
    const benchCpu = process.cpuUsage(benchCpu0);
    const fullBrokerUs = ((procCpuSeconds(brokerPid) - fullBroker0) * 1e6) / N;
    const ingestRate = N / ((ingestDone - fullStart) / 1000);
    results.mqtt = {
      messages: N,
      window: WINDOW,
      payloadBytes: Buffer.byteLength(JSON.stringify({ n: 0, v: PAYLOAD })),
      rawMsgPerS: Math.round(rawRate),
      fullPathMsgPerS: Math.round(fullRate),
      ratio: Number((fullRate / rawRate).toFixed(2)),
      ingestOnlyMsgPerS: Math.round(ingestRate),
      // CPU per message (user + system, every thread): where the difference between the paths goes.
      cpuUsPerMsg: {
        rawPublisherAndSubscriber: Math.round((rawCpu.user + rawCpu.system) / N),
        rawBroker: Math.round(rawBrokerUs),
        fullPathRelayProcess: Math.round(relayCpuUs),
        fullPathProducerAndSubscriber: Math.round((benchCpu.user + benchCpu.system) / N),
        fullPathBroker: Math.round(fullBrokerUs),
      },
    };

    // ---- 2. ack latency at 10k msg/s offered (the relay delivering at the same time) ---------------
    const lagFrom = loopDelay.length;
    // The producer shares this process with the subscriber (10k msg/s arriving): its own event-loop
    // delay is part of every measured latency, so it is reported next to the relay's.
    const benchLag = monitorEventLoopDelay({ resolution: 1 });
    benchLag.enable();
    const lat = await offeredLoad(socketPath, "lat", 5000);
    benchLag.disable();
    const lagDuring = loopDelay.slice(lagFrom);
    await waitCount("devices/dev-bench/lat", lat.accepted, 60_000);
    const rssLoad = Math.max(...rss.slice(rssBeforeLoad));
    results.ingestLatency = {
      ...lat.summary,
      // Worst per-second p99 of the relay's event-loop delay while under this load.
      relayLoopDelayP99MaxMs: Number(Math.max(0, ...lagDuring).toFixed(1)),
      benchProcessLoopDelayP99Ms: Number((benchLag.percentile(99) / 1e6).toFixed(1)),
    };
    // The same load from a producer that opens a new connection per POST (like `m2m-agent send`).
    const latFresh = await offeredLoad(socketPath, "lat-fresh", 3000, false);
    await waitCount("devices/dev-bench/lat-fresh", latFresh.accepted, 60_000);
    results.ingestLatencyNewConnectionPerPost = latFresh.summary;

    // ---- 3. backlog drain after an outage --------------------------------------------------------
    // The backlog is produced at 10k msg/s offered while the broker is down: that also measures the
    // ack latency of ingest alone (the relay is parked in backoff), to compare with phase 2.
    await broker.stop();
    const outage = await offeredLoad(socketPath, "drain", 2000);
    results.ingestLatencyBrokerDown = outage.summary;
    const BACKLOG = outage.accepted;
    await broker.start();
    const drainStart = performance.now();
    await waitCount("devices/dev-bench/drain", BACKLOG, 90_000);
    const drainRate = BACKLOG / ((performance.now() - drainStart) / 1000);
    results.backlogDrain = {
      messages: BACKLOG,
      msgPerSAfterBrokerStart: Math.round(drainRate),
      note: "includes broker restart and the relay's reconnect backoff",
    };
    results.rss = {
      relayIdleMiB: Math.round(rssIdle / 1048576),
      relayUnderLoadMaxMiB: Math.round(rssLoad / 1048576),
    };
    child.kill("SIGTERM");
    await new Promise((r) => child.once("exit", r));
    void depth;

    // ---- 4. HTTPS: sink path vs raw undici POSTs -------------------------------------------------
    results.https = await benchHttps(broker.ca, dir);
  } finally {
    producerAgent.destroy();
    await sub.endAsync(true).catch(() => undefined);
    await broker.cleanup();
    await rm(dir, { recursive: true, force: true });
  }
  results.totalSeconds = Math.round((Date.now() - t0) / 1000);
  console.log(JSON.stringify(results, null, 2));
}

async function benchHttps(
  ca: Awaited<ReturnType<typeof startMosquitto>>["ca"],
  dir: string,
): Promise<unknown> {
  const HN = 20_000;
  const { privateKey, publicKey } = await generateKeyPair("ES256");
  const provider = new FakeKeyProvider();
  const info = await provider.createOrOpen();
  const signer = new HardwareDpopSigner(provider, info, systemClock);
  let url = "";
  const ingest = ingestRoutes({
    verifyAccessToken: async (t) =>
      (await jwtVerify(t, publicKey, { issuer: "https://bench", typ: "at+jwt", algorithms: ["ES256"] }))
        .payload,
    audience: "https://ingest.bench",
    publicUrl: () => url,
  });
  const route = ingest.routes[0];
  if (route === undefined) throw new Error("no ingest route");
  const { certPath, keyPath } = await ca.issueServer();
  const server = createHttpsServer(
    { cert: await readFile(certPath), key: await readFile(keyPath) },
    (req, res) => {
      const chunks: Buffer[] = [];
      req.on("data", (c: Buffer) => chunks.push(c));
      req.on("end", () => {
        const rawBody = Buffer.concat(chunks);
        route
          .handle({
            req,
            url: new URL(req.url ?? "/", "https://x"),
            rawBody,
            contentType: "application/json",
            remote: "",
            json: () => JSON.parse(rawBody.toString()),
            peerCertificateDer: () => undefined,
            auditFields: () => undefined,
          })
          .then(
            (r) => {
              res.writeHead(r.status, { "content-type": "application/json", ...(r.headers ?? {}) });
              res.end("json" in r ? JSON.stringify(r.json) : r.body);
            },
            (err: unknown) => {
              res.writeHead(err instanceof HttpError ? err.status : 500).end();
            },
          );
      });
    },
  );
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  url = `https://127.0.0.1:${(server.address() as AddressInfo).port}/v1/ingest`;
  const token = await new SignJWT({
    scope: "telemetry:write",
    client_id: "dev-bench",
    cnf: { jkt: info.thumbprint },
  })
    .setProtectedHeader({ alg: "ES256", typ: "at+jwt" })
    .setIssuer("https://bench")
    .setSubject("dev-bench")
    .setAudience("https://ingest.bench")
    .setIssuedAt()
    .setExpirationTime("1h")
    .setJti(randomBytes(8).toString("hex"))
    .sign(privateKey);
  const tokens = {
    getToken: async () => ({
      token: new Secret(token),
      expiresAt: new Date(Date.now() + 3600_000),
      tokenType: "DPoP" as const,
      scope: "telemetry:write",
    }),
  };

  try {
    // Raw: the same batch bodies (same JSON shape, gzip'd), one at a time, with token + fresh proof.
    const agent = new Agent({ connect: { ca: ca.caPem }, connections: 1 });
    const rawStart = performance.now();
    const rawCpu0 = process.cpuUsage();
    for (let b = 0; b < HN / BATCH; b++) {
      const items = Array.from({ length: BATCH }, (_, i) => {
        const id = newMessageId();
        return `{"id":"${id}","topic":"devices/dev-bench/h","channel":"h","ts":${Date.now()},"content_type":"application/json","payload":${JSON.stringify({ n: b * BATCH + i, v: PAYLOAD })}}`;
      });
      // Same encoding work as the sink (gzip level 1, its default).
      const body = await gzip(Buffer.from(`{"messages":[${items.join(",")}]}`), { level: 1 });
      const res = await request(url, {
        method: "POST",
        dispatcher: agent,
        headers: {
          "content-type": "application/json",
          "content-encoding": "gzip",
          authorization: `DPoP ${token}`,
          dpop: await signer.proof("POST", url, token),
        },
        body,
      });
      await res.body.dump();
      if (res.statusCode !== 200) throw new Error(`raw POST ${res.statusCode}`);
    }
    const rawRate = HN / ((performance.now() - rawStart) / 1000);
    const rawCpu = process.cpuUsage(rawCpu0);
    await agent.close();

    // Sink path: producer appends into a fsync'ing outbox while the relay drains it through HttpsSink.
    const before = ingest.store.messages.size;
    // The daemon's default (relay.outbox.thread = main) unless RELAY_BENCH_OUTBOX=worker.
    const outboxOptions = { path: join(dir, "https.db"), sinks: ["https"], ttlCheckMs: 0 };
    const outbox =
      process.env.RELAY_BENCH_OUTBOX === "worker"
        ? await WorkerOutbox.open(outboxOptions)
        : SqliteOutbox.open(outboxOptions);
    const sink = new HttpsSink({
      url,
      caPem: ca.caPem,
      tokens,
      dpop: signer,
      deviceId: "dev-bench",
      maxBatch: BATCH,
    });
    const relay = new Relay({ outbox, sinks: [sink] });
    relay.start();
    const enc = new TextEncoder();
    const start = performance.now();
    const sinkCpu0 = process.cpuUsage();
    // Four producers appending batches of 100 (as several local programs would): a single serial
    // producer waits one fdatasync per batch and would measure the disk, not the sink path.
    let nextB = 0;
    await Promise.all(
      Array.from({ length: 4 }, async () => {
        while (nextB < HN / BATCH) {
          const b = nextB++;
          await outbox.append(
            Array.from({ length: BATCH }, (_, i) => ({
              channel: "h",
              payload: enc.encode(JSON.stringify({ n: b * BATCH + i, v: PAYLOAD })),
            })),
          );
        }
      }),
    );
    const producedAt = performance.now();
    while (ingest.store.messages.size - before < HN) {
      if (performance.now() - start > 60_000) throw new Error("https drain timeout");
      await sleep(2);
    }
    const sinkRate = HN / ((performance.now() - start) / 1000);
    const sinkCpu = process.cpuUsage(sinkCpu0);
    await relay.stop();
    await sink.close();
    await outbox.close();
    return {
      messages: HN,
      batch: BATCH,
      rawUndiciMsgPerS: Math.round(rawRate),
      sinkPathMsgPerS: Math.round(sinkRate),
      producerOnlyMsgPerS: Math.round(HN / ((producedAt - start) / 1000)),
      ratio: Number((sinkRate / rawRate).toFixed(2)),
      requests: sink.counters.requests,
      // One process holds client, server (and for the sink path producers + outbox): CPU per message.
      cpuUsPerMsg: {
        raw: Math.round((rawCpu.user + rawCpu.system) / HN),
        sinkPath: Math.round((sinkCpu.user + sinkCpu.system) / HN),
      },
    };
  } finally {
    server.closeAllConnections();
    await new Promise<void>((r) => server.close(() => r()));
  }
}

await main();
