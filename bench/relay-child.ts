/**
 * A relay process (outbox + local API + MQTT sink) configured by a JSON argument. Used by the crash
 * test (bundled on the fly with rolldown: Node 20 cannot run TypeScript) and by bench/relay.ts
 * (compiled by `npm run build`). Prints one JSON stats line per second on stdout.
 */
import { monitorEventLoopDelay } from "node:perf_hooks";
import { Secret } from "../src/core/secret.js";
import type { Outbox } from "../src/relay/outbox/outbox.js";
import { SqliteOutbox } from "../src/relay/outbox/sqlite/sqlite-outbox.js";
import { WorkerOutbox } from "../src/relay/outbox/worker/worker-outbox.js";
import { MqttSink } from "../src/relay/sinks/mqtt/mqtt-sink.js";
import { startRelayStack } from "../src/relay/stack.js";

interface ChildConfig {
  dbPath: string;
  socketPath: string;
  brokerUrl: string;
  caPem: string;
  certPem: string;
  keyPem: string;
  deviceId: string;
  maxInFlight?: number;
  synchronous?: "FULL" | "NORMAL";
  /** Bundled worker entry (the crash test runs this file bundled from TypeScript); default: the build's. */
  outboxWorkerUrl?: string;
}

const cfg = JSON.parse(process.argv[2] ?? "{}") as ChildConfig;
// RELAY_BENCH_OUTBOX=main (default, as the daemon): SQLite in this event loop; =worker: in a worker thread.
const outboxThread = process.env.RELAY_BENCH_OUTBOX ?? "main";
if (outboxThread !== "worker" && outboxThread !== "main") {
  throw new Error(`RELAY_BENCH_OUTBOX must be worker or main, not ${outboxThread}`);
}
const outboxOptions = {
  path: cfg.dbPath,
  sinks: ["mqtt"],
  ttlCheckMs: 0,
  synchronous: cfg.synchronous ?? "FULL",
} as const;
const outbox: Outbox =
  outboxThread === "worker"
    ? await WorkerOutbox.open({
        ...outboxOptions,
        ...(cfg.outboxWorkerUrl === undefined ? {} : { workerUrl: new URL(cfg.outboxWorkerUrl) }),
      })
    : SqliteOutbox.open(outboxOptions);
const sink = new MqttSink({
  urls: [cfg.brokerUrl],
  caPem: cfg.caPem,
  auth: { kind: "mtls-file", certPem: cfg.certPem, keyPem: new Secret(cfg.keyPem) },
  deviceId: cfg.deviceId,
  maxInFlight: cfg.maxInFlight ?? 64,
});
const stack = await startRelayStack({
  outbox,
  sinks: [sink],
  api: { socketPath: cfg.socketPath, maxConcurrentRequests: 256, maxConnections: 512 },
  retry: { baseMs: 50, factor: 2, capMs: 1000, deadlineMs: 1e12, maxAttempts: 1e12, maxRetryAfterMs: 5000 },
});
process.stdout.write("ready\n");
process.on("SIGTERM", () => {
  stack.stop().then(() => process.exit(0));
});
// Event-loop delay per second: how long ready work (a request, a PUBACK, an fsync completion) waited.
const lag = monitorEventLoopDelay({ resolution: 1 });
lag.enable();
setInterval(() => {
  const loopDelayP99Ms = lag.percentile(99) / 1e6;
  lag.reset();
  process.stdout.write(
    `${JSON.stringify({ stats: outbox.stats(), relay: stack.relay.counters, rss: process.memoryUsage().rss, loopDelayP99Ms })}\n`,
  );
}, 1000).unref();
