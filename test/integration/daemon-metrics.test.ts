import { stat } from "node:fs/promises";
import { request } from "node:http";
import { join } from "node:path";
import { describe, expect, it } from "vitest";
import { silentLogger } from "../../src/core/log.js";
import { STATE_NAMES } from "../../src/daemon/lifecycle.js";
import {
  AgentMetrics,
  escapeLabelValue,
  MetricsRegistry,
  startMetricsServer,
} from "../../src/daemon/metrics.js";
import { useTempDir } from "../kit/temp-dir.js";

function get(opts: { url?: string; socketPath?: string; path?: string; method?: string }): Promise<{
  status: number;
  type: string | undefined;
  body: string;
}> {
  return new Promise((resolve, reject) => {
    const req = request(
      opts.url ?? {
        socketPath: opts.socketPath,
        path: opts.path ?? "/metrics",
        method: opts.method ?? "GET",
      },
      (res) => {
        let body = "";
        res.setEncoding("utf8");
        res.on("data", (c: string) => {
          body += c;
        });
        res.on("end", () =>
          resolve({ status: res.statusCode ?? 0, type: res.headers["content-type"], body }),
        );
      },
    );
    req.on("error", reject);
    req.end();
  });
}

const dir = useTempDir("m2m-metrics-");

describe("metrics registry", () => {
  it("renders counters, gauges and histograms in exposition format with escaped labels", () => {
    const r = new MetricsRegistry();
    const c = r.counter("t_relayed_total", "Relayed\nmessages.", ["sink"]);
    c.inc({ sink: 'mq"tt\\a\nb' });
    c.inc({ sink: "https" }, 3);
    const g = r.gauge("t_depth", "Depth.");
    g.set(7);
    const h = r.histogram("t_op_seconds", "Op.", ["op"], [0.01, 0.1]);
    h.observe({ op: "sign" }, 0.005);
    h.observe({ op: "sign" }, 0.05);
    h.observe({ op: "sign" }, 3);
    expect(r.render()).toBe(
      [
        "# HELP t_relayed_total Relayed\\nmessages.",
        "# TYPE t_relayed_total counter",
        't_relayed_total{sink="mq\\"tt\\\\a\\nb"} 1',
        't_relayed_total{sink="https"} 3',
        "# HELP t_depth Depth.",
        "# TYPE t_depth gauge",
        "t_depth 7",
        "# HELP t_op_seconds Op.",
        "# TYPE t_op_seconds histogram",
        't_op_seconds_bucket{op="sign",le="0.01"} 1',
        't_op_seconds_bucket{op="sign",le="0.1"} 2',
        't_op_seconds_bucket{op="sign",le="+Inf"} 3',
        't_op_seconds_sum{op="sign"} 3.055',
        't_op_seconds_count{op="sign"} 3',
        "",
      ].join("\n"),
    );
    expect(escapeLabelValue('a"b')).toBe('a\\"b');
  });

  it("refuses wrong label sets, negative counter increments and bad names", () => {
    const r = new MetricsRegistry();
    const c = r.counter("x_total", "x", ["a"]);
    expect(() => c.inc({ b: "1" })).toThrow(/expected labels/);
    expect(() => c.inc({ a: "1" }, -1)).toThrow(/only go up/);
    expect(() => r.gauge("bad-name", "x")).toThrow(/invalid metric name/);
    expect(() => r.counter("x_total", "dup")).toThrow(/duplicate/);
  });
});

describe("metrics HTTP exposition (real scrape)", () => {
  it("serves the agent metrics on a loopback port", async () => {
    const m = new AgentMetrics("0.1.0-test");
    m.setState("running", STATE_NAMES);
    m.relayed.inc({ sink: "mqtt" }, 5);
    m.keyOpDuration.observe({ backend: "tpm", op: "sign" }, 0.015);
    m.keyOpErrors.inc({ backend: "tpm", op: "sign", code: "ERR_TPM_LOCKOUT" });
    m.outboxDepth.set(12);
    const srv = await startMetricsServer(m.registry, "127.0.0.1:0", silentLogger);
    try {
      expect(srv.address).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
      const res = await get({ url: srv.address });
      expect(res.status).toBe(200);
      expect(res.type).toBe("text/plain; version=0.0.4; charset=utf-8");
      expect(res.body).toContain('m2m_agent_build_info{version="0.1.0-test"} 1');
      expect(res.body).toContain('m2m_agent_state{state="running"} 1');
      expect(res.body).toContain('m2m_agent_state{state="degraded"} 0');
      expect(res.body).toContain('m2m_agent_relayed_total{sink="mqtt"} 5');
      expect(res.body).toContain(
        'm2m_agent_key_operation_duration_seconds_bucket{backend="tpm",op="sign",le="0.025"} 1',
      );
      expect(res.body).toContain(
        'm2m_agent_key_operation_errors_total{backend="tpm",op="sign",code="ERR_TPM_LOCKOUT"} 1',
      );
      expect(res.body).toContain("m2m_agent_outbox_messages 12");
      expect((await get({ url: srv.address.replace("/metrics", "/other") })).status).toBe(404);
    } finally {
      await srv.close();
    }
  });

  it("serves on a Unix socket (mode 0660)", async () => {
    const r = new MetricsRegistry();
    r.gauge("u_up", "Up.").set(1);
    const path = join(dir(), "metrics.sock");
    const srv = await startMetricsServer(r, path, silentLogger);
    try {
      expect(srv.address).toBe(`unix:${path}`);
      expect((await stat(path)).mode & 0o777).toBe(0o660);
      const res = await get({ socketPath: path });
      expect(res.body).toContain("u_up 1");
      expect((await get({ socketPath: path, method: "POST" })).status).toBe(405);
    } finally {
      await srv.close();
    }
  });

  it("a taken port is ERR_METRICS_LISTEN", async () => {
    const r = new MetricsRegistry();
    const a = await startMetricsServer(r, "127.0.0.1:0", silentLogger);
    try {
      const port = new URL(a.address).port;
      await expect(startMetricsServer(r, `127.0.0.1:${port}`, silentLogger)).rejects.toMatchObject({
        code: "ERR_METRICS_LISTEN",
      });
    } finally {
      await a.close();
    }
  });
});
