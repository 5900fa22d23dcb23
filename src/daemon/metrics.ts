import { chmod, unlink } from "node:fs/promises";
import { createServer, type Server } from "node:http";
import { M2mError } from "../core/errors.js";
import type { Logger } from "../core/log.js";

/**
 * A small Prometheus text-format (0.0.4) registry: counters, gauges and histograms with labels.
 * Written here rather than adding prom-client 15 (which brings @opentelemetry/api and tdigest, plus
 * default process collectors we do not need): three metric types and an escaper are ~300 lines, and
 * every module loaded at start costs startup time and RSS on a gateway.
 */

export type Labels = Readonly<Record<string, string | number>>;

/** Label values: backslash, double quote and newline are escaped (exposition format spec). */
export function escapeLabelValue(v: string): string {
  return v.replace(/\\/g, "\\\\").replace(/"/g, '\\"').replace(/\n/g, "\\n");
}

function escapeHelp(v: string): string {
  return v.replace(/\\/g, "\\\\").replace(/\n/g, "\\n");
}

const NAME_RE = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_RE = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

function formatValue(v: number): string {
  if (Number.isNaN(v)) return "NaN";
  if (v === Number.POSITIVE_INFINITY) return "+Inf";
  if (v === Number.NEGATIVE_INFINITY) return "-Inf";
  return String(v);
}

abstract class Metric {
  readonly name: string;
  readonly help: string;
  readonly labelNames: readonly string[];
  abstract readonly type: "counter" | "gauge" | "histogram";

  constructor(name: string, help: string, labelNames: readonly string[]) {
    if (!NAME_RE.test(name)) throw new M2mError("ERR_METRICS", "permanent", `invalid metric name ${name}`);
    for (const l of labelNames)
      if (!LABEL_RE.test(l) || l === "le")
        throw new M2mError("ERR_METRICS", "permanent", `invalid label name ${l} on ${name}`);
    this.name = name;
    this.help = help;
    this.labelNames = labelNames;
  }

  /** Canonical key of a label set (also validates that exactly the declared labels are given). */
  protected key(labels: Labels): string {
    const given = Object.keys(labels);
    if (given.length !== this.labelNames.length || given.some((g) => !this.labelNames.includes(g))) {
      throw new M2mError(
        "ERR_METRICS",
        "permanent",
        `${this.name}: expected labels [${this.labelNames.join(",")}], got [${given.join(",")}]`,
      );
    }
    return this.labelNames.map((l) => String(labels[l])).join("\u0000");
  }

  protected labelString(key: string, extra?: string): string {
    const values = key === "" && this.labelNames.length === 0 ? [] : key.split("\u0000");
    const parts = this.labelNames.map((l, i) => `${l}="${escapeLabelValue(values[i] ?? "")}"`);
    if (extra !== undefined) parts.push(extra);
    return parts.length === 0 ? "" : `{${parts.join(",")}}`;
  }

  header(): string {
    return `# HELP ${this.name} ${escapeHelp(this.help)}\n# TYPE ${this.name} ${this.type}\n`;
  }

  abstract render(): string;
}

export class Counter extends Metric {
  readonly type = "counter" as const;
  readonly #values = new Map<string, number>();

  inc(labels: Labels = {}, by = 1): void {
    if (!(by >= 0)) throw new M2mError("ERR_METRICS", "permanent", `${this.name}: counters only go up`);
    const k = this.key(labels);
    this.#values.set(k, (this.#values.get(k) ?? 0) + by);
  }

  get(labels: Labels = {}): number {
    return this.#values.get(this.key(labels)) ?? 0;
  }

  render(): string {
    let out = this.header();
    if (this.labelNames.length === 0 && this.#values.size === 0) out += `${this.name} 0\n`;
    for (const [k, v] of this.#values) out += `${this.name}${this.labelString(k)} ${formatValue(v)}\n`;
    return out;
  }
}

export class Gauge extends Metric {
  readonly type = "gauge" as const;
  readonly #values = new Map<string, number>();

  set(labels: Labels, value: number): void;
  set(value: number): void;
  set(a: Labels | number, b?: number): void {
    if (typeof a === "number") this.#values.set(this.key({}), a);
    else this.#values.set(this.key(a), b ?? 0);
  }

  inc(labels: Labels = {}, by = 1): void {
    const k = this.key(labels);
    this.#values.set(k, (this.#values.get(k) ?? 0) + by);
  }

  /** Forgets a label set (e.g. a sink that was removed by a reload). */
  remove(labels: Labels): void {
    this.#values.delete(this.key(labels));
  }

  get(labels: Labels = {}): number | undefined {
    return this.#values.get(this.key(labels));
  }

  render(): string {
    let out = this.header();
    for (const [k, v] of this.#values) out += `${this.name}${this.labelString(k)} ${formatValue(v)}\n`;
    return out;
  }
}

export class Histogram extends Metric {
  readonly type = "histogram" as const;
  readonly buckets: readonly number[];
  readonly #series = new Map<string, { counts: number[]; sum: number; count: number }>();

  constructor(name: string, help: string, labelNames: readonly string[], buckets: readonly number[]) {
    super(name, help, labelNames);
    this.buckets = [...buckets].sort((a, b) => a - b);
  }

  observe(labels: Labels, value: number): void {
    const k = this.key(labels);
    let s = this.#series.get(k);
    if (s === undefined) {
      s = { counts: this.buckets.map(() => 0), sum: 0, count: 0 };
      this.#series.set(k, s);
    }
    for (let i = 0; i < this.buckets.length; i++)
      if (value <= (this.buckets[i] ?? 0)) s.counts[i] = (s.counts[i] ?? 0) + 1;
    s.sum += value;
    s.count += 1;
  }

  render(): string {
    let out = this.header();
    for (const [k, s] of this.#series) {
      this.buckets.forEach((b, i) => {
        out += `${this.name}_bucket${this.labelString(k, `le="${formatValue(b)}"`)} ${s.counts[i] ?? 0}\n`;
      });
      out += `${this.name}_bucket${this.labelString(k, 'le="+Inf"')} ${s.count}\n`;
      out += `${this.name}_sum${this.labelString(k)} ${formatValue(s.sum)}\n`;
      out += `${this.name}_count${this.labelString(k)} ${s.count}\n`;
    }
    return out;
  }
}

export class MetricsRegistry {
  readonly #metrics = new Map<string, Metric>();

  #add<M extends Metric>(m: M): M {
    if (this.#metrics.has(m.name))
      throw new M2mError("ERR_METRICS", "permanent", `duplicate metric ${m.name}`);
    this.#metrics.set(m.name, m);
    return m;
  }

  counter(name: string, help: string, labelNames: readonly string[] = []): Counter {
    return this.#add(new Counter(name, help, labelNames));
  }

  gauge(name: string, help: string, labelNames: readonly string[] = []): Gauge {
    return this.#add(new Gauge(name, help, labelNames));
  }

  histogram(
    name: string,
    help: string,
    labelNames: readonly string[],
    buckets: readonly number[],
  ): Histogram {
    return this.#add(new Histogram(name, help, labelNames, buckets));
  }

  /** The exposition text (Content-Type: text/plain; version=0.0.4). */
  render(): string {
    let out = "";
    for (const m of this.#metrics.values()) out += m.render();
    return out;
  }
}

/** Latency buckets for hardware key operations (swtpm sign ≈ 15 ms, SoftHSM ≈ 0.1 ms, DA/timeouts seconds). */
const KEY_OP_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

/**
 * Every metric the agent exports, in one place so names stay consistent (docs/operations.md lists
 * them). Other modules receive this object through the composition root and update their part.
 */
export class AgentMetrics {
  readonly registry = new MetricsRegistry();
  readonly info = this.registry.gauge("m2m_agent_build_info", "Agent version (value is always 1).", [
    "version",
  ]);
  readonly state = this.registry.gauge("m2m_agent_state", "Lifecycle state (1 for the current state).", [
    "state",
  ]);
  readonly transitions = this.registry.counter(
    "m2m_agent_state_transitions_total",
    "Lifecycle transitions.",
    ["from", "to"],
  );
  readonly degraded = this.registry.gauge("m2m_agent_degraded", "1 while degraded (reason in status).");
  readonly reprovisionRequired = this.registry.gauge(
    "m2m_agent_reprovision_required",
    "1 while the enrolled key or TPM is gone or different and an operator must re-provision (docs/operations.md).",
  );
  readonly clockTrusted = this.registry.gauge(
    "m2m_agent_clock_trusted",
    "1 when the wall clock is above the time floor; 0 blocks credential decisions.",
  );
  readonly certExpiry = this.registry.gauge(
    "m2m_agent_certificate_expiry_timestamp_seconds",
    "notAfter of the device certificate (Unix seconds).",
  );
  readonly tokenExpiry = this.registry.gauge(
    "m2m_agent_token_expiry_timestamp_seconds",
    "Expiry of the current access token (Unix seconds).",
  );
  readonly renewalsFailed = this.registry.counter(
    "m2m_agent_renewals_failed_total",
    "Failed credential renewals.",
    ["kind"],
  );
  readonly keyOpDuration = this.registry.histogram(
    "m2m_agent_key_operation_duration_seconds",
    "Latency of TPM / PKCS#11 operations.",
    ["backend", "op"],
    KEY_OP_BUCKETS,
  );
  readonly keyOpErrors = this.registry.counter(
    "m2m_agent_key_operation_errors_total",
    "Failed TPM / PKCS#11 operations by stable error code.",
    ["backend", "op", "code"],
  );
  readonly outboxDepth = this.registry.gauge("m2m_agent_outbox_messages", "Messages waiting in the outbox.");
  readonly outboxBytes = this.registry.gauge("m2m_agent_outbox_bytes", "Bytes waiting in the outbox.");
  readonly outboxOldestAge = this.registry.gauge(
    "m2m_agent_outbox_oldest_age_seconds",
    "Age of the oldest message in the outbox.",
  );
  readonly outboxDrops = this.registry.counter(
    "m2m_agent_outbox_dropped_total",
    "Messages dropped by the outbox policy.",
    ["reason"],
  );
  readonly relayed = this.registry.counter("m2m_agent_relayed_total", "Messages acknowledged by a sink.", [
    "sink",
  ]);
  readonly reconnects = this.registry.counter("m2m_agent_reconnects_total", "Sink reconnect attempts.", [
    "sink",
  ]);
  readonly authFailures = this.registry.counter(
    "m2m_agent_auth_failures_total",
    "Authentication failures seen by the agent.",
    ["channel"],
  );
  readonly anomalies = this.registry.counter("m2m_agent_anomalies_total", "Anomaly flags raised.", ["kind"]);

  constructor(version: string) {
    this.info.set({ version }, 1);
    this.degraded.set(0);
    this.reprovisionRequired.set(0);
  }

  /** Marks `name` as the current state. */
  setState(name: string, allStates: readonly string[]): void {
    for (const s of allStates) this.state.set({ state: s }, s === name ? 1 : 0);
    this.degraded.set(name === "degraded" ? 1 : 0);
    this.reprovisionRequired.set(name === "reprovision-required" ? 1 : 0);
  }
}

export interface MetricsServer {
  /** "http://127.0.0.1:PORT/metrics" or "unix:/path". */
  readonly address: string;
  close(): Promise<void>;
}

/**
 * Serves GET /metrics on a loopback port ("127.0.0.1:9464", "[::1]:9464", port 0 = any) or a Unix
 * socket path. Anything else gets 404/405; request bodies are not read.
 * @throws ERR_METRICS_LISTEN when the address is taken.
 */
export async function startMetricsServer(
  registry: MetricsRegistry,
  listen: string,
  log: Logger,
): Promise<MetricsServer> {
  const server: Server = createServer((req, res) => {
    if (req.url !== "/metrics" && !req.url?.startsWith("/metrics?")) {
      res.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
      return;
    }
    if (req.method !== "GET" && req.method !== "HEAD") {
      res.writeHead(405, { allow: "GET, HEAD" }).end();
      return;
    }
    const body = registry.render();
    res.writeHead(200, {
      "content-type": "text/plain; version=0.0.4; charset=utf-8",
      "content-length": Buffer.byteLength(body),
    });
    res.end(req.method === "HEAD" ? undefined : body);
  });
  server.headersTimeout = 5_000;
  server.requestTimeout = 10_000;
  server.maxHeadersCount = 50;
  const isUnix = listen.startsWith("/");
  if (isUnix) await unlink(listen).catch(() => undefined);
  await new Promise<void>((resolve, reject) => {
    server.once("error", (err) =>
      reject(
        new M2mError("ERR_METRICS_LISTEN", "transient", `cannot listen on ${listen} for metrics`, {
          cause: err,
          hint: "pick a free port in [metrics] listen or disable metrics",
        }),
      ),
    );
    if (isUnix) server.listen(listen, resolve);
    else {
      const m = /^(?:\[(.+)\]|([^:]+)):(\d+)$/.exec(listen);
      const host = m?.[1] ?? m?.[2] ?? "127.0.0.1";
      server.listen(Number(m?.[3] ?? 9464), host === "localhost" ? "127.0.0.1" : host, resolve);
    }
  });
  if (isUnix) await chmod(listen, 0o660);
  const addr = server.address();
  const address =
    typeof addr === "string" || addr === null
      ? `unix:${listen}`
      : `http://${addr.family === "IPv6" ? `[${addr.address}]` : addr.address}:${addr.port}/metrics`;
  log.info("metrics endpoint listening", { address });
  return {
    address,
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      }),
  };
}
