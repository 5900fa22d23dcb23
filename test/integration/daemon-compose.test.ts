import { mkdir, mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { fetchStatus } from "../../src/cli/agent/status.js";
import { type AgentConfig, agentConfigSchema } from "../../src/config/index.js";
import { createLogger } from "../../src/core/log.js";
import { type AgentStage, changedKeys, startAgent } from "../../src/daemon/compose.js";
import { FakeKeyProvider, FakeKeyStore } from "../../src/keys/fake/fake-provider.js";

/**
 * The composition root in-process: a fake key backend, a stage standing in for the relay, and the
 * real local API socket, audit log and clock floor in a temp state dir.
 */
let dir: string;
let n = 0;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "m2m-compose-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function config(patch: Record<string, unknown> = {}): Promise<AgentConfig> {
  const d = join(dir, `a${n++}`);
  await mkdir(join(d, "state"), { recursive: true, mode: 0o700 });
  return agentConfigSchema.parse({
    agent: { state_dir: join(d, "state"), runtime_dir: d, drain_timeout_ms: 300 },
    api: { socket: join(d, "api.sock"), mode: 0o600 },
    ...patch,
  });
}

const quiet = createLogger({ write: () => undefined });

/** A stage that records what happens to it; its stop takes `stopMs` (or until the drain deadline). */
function recordingStage(events: string[], stopMs: number): AgentStage {
  return {
    name: "relay",
    sections: ["relay"],
    enabled: () => true,
    start: async (ctx) => {
      events.push(`start key=${ctx.key.info.thumbprint.slice(0, 4)} api=${ctx.api !== undefined}`);
      ctx.api?.route("GET", "/v1/test-stage", async () => ({ status: 200, json: { ok: true } }));
      return {
        status: () => ({ queued: 3 }),
        reload: async (next) => {
          events.push(`reload max_count=${next.relay.outbox.max_count}`);
          return { applied: ["relay.outbox.max_count"], restartRequired: [] };
        },
        stop: (signal) =>
          new Promise<void>((resolve) => {
            const t = setTimeout(() => {
              events.push("drained");
              resolve();
            }, stopMs);
            signal.addEventListener("abort", () => {
              clearTimeout(t);
              events.push("aborted at deadline");
              resolve();
            });
          }),
      };
    },
  };
}

describe("startAgent (composition root)", () => {
  it("opens the key, starts stages with shared services, serves /v1/status, drains on stop", async () => {
    const store = new FakeKeyStore();
    const key = new FakeKeyProvider({ store });
    const info = await key.createOrOpen();
    const events: string[] = [];
    const cfg = await config();
    const agent = await startAgent(cfg, {
      log: quiet,
      keyProvider: key,
      stages: [recordingStage(events, 10)],
      env: {},
    });
    expect(agent.lifecycle.state.name).toBe("running");
    expect(events).toEqual([`start key=${info.thumbprint.slice(0, 4)} api=true`]);

    const status = await fetchStatus(cfg.api.socket);
    expect(status).toMatchObject({
      state: "running",
      key: { provider: "fake", thumbprint: info.thumbprint },
      enrolment: { enrolled: false },
      clock: { trusted: true },
      stages: { relay: { queued: 3 } },
    });
    expect((await stat(cfg.api.socket)).mode & 0o777).toBe(0o600);

    const res = await agent.stop("test");
    expect(res.drained).toBe(true);
    expect(events.at(-1)).toBe("drained");
    expect(agent.lifecycle.state.name).toBe("stopped");
    await expect(fetchStatus(cfg.api.socket)).rejects.toMatchObject({ code: "ERR_AGENT_NOT_RUNNING" });
  });

  it("a stage that does not drain in time is cut at the deadline", async () => {
    const key = new FakeKeyProvider();
    await key.createOrOpen();
    const events: string[] = [];
    const agent = await startAgent(await config(), {
      log: quiet,
      keyProvider: key,
      stages: [recordingStage(events, 60_000)],
      env: {},
    });
    const res = await agent.stop("SIGTERM", 100);
    expect(res.drained).toBe(false);
    expect(events).toContain("aborted at deadline");
    expect(agent.lifecycle.state.name).toBe("stopped");
  });

  it("reload: log level live, stage keys through the stage, the rest restart-required", async () => {
    const key = new FakeKeyProvider();
    await key.createOrOpen();
    const events: string[] = [];
    const levels: string[] = [];
    const cfg = await config();
    const agent = await startAgent(cfg, {
      log: quiet,
      keyProvider: key,
      stages: [recordingStage(events, 1)],
      env: {},
      setLogLevel: (l) => levels.push(l),
    });
    const next = agentConfigSchema.parse({
      ...cfg,
      agent: { ...cfg.agent, log_level: "debug" },
      keys: { ...cfg.keys, tpm: { ...cfg.keys.tpm, key_handle: 0x81000009 } },
      relay: { ...cfg.relay, outbox: { ...cfg.relay.outbox, max_count: 7 } },
    });
    expect(changedKeys(cfg, next)).toEqual([
      "agent.log_level",
      "keys.tpm.key_handle",
      "relay.outbox.max_count",
    ]);
    const report = await agent.reload(next);
    expect(report).toEqual({
      applied: ["agent.log_level", "relay.outbox.max_count"],
      restartRequired: ["keys.tpm.key_handle"],
    });
    expect(levels).toEqual(["debug"]);
    expect(events).toContain("reload max_count=7");
    await agent.stop("test");
  });

  it("no key and enrolment off: unprovisioned, API still answers with the reason", async () => {
    const cfg = await config();
    const agent = await startAgent(cfg, {
      log: quiet,
      keyProvider: new FakeKeyProvider(),
      stages: [],
      env: {},
    });
    expect(agent.lifecycle.state).toEqual({
      name: "unprovisioned",
      reason: "no device key: run `m2m-agent keys init` or enable [enroll]",
    });
    expect((await fetchStatus(cfg.api.socket)).state).toBe("unprovisioned");
    await agent.stop("test");
  });

  it("an API socket already served by another agent degrades this one with the reason", async () => {
    const key = new FakeKeyProvider();
    await key.createOrOpen();
    const cfg = await config();
    const first = await startAgent(cfg, { log: quiet, keyProvider: key, stages: [], env: {} });
    const second = await startAgent(cfg, { log: quiet, keyProvider: key, stages: [], env: {} });
    expect(second.lifecycle.state.name).toBe("degraded");
    expect(second.health.reasons.api).toMatch(/another process is serving/);
    await second.stop("test");
    // The first agent's socket survived the second agent's stop.
    expect((await fetchStatus(cfg.api.socket)).pid).toBe(process.pid);
    await first.stop("test");
  });

  it("metrics enabled: served on loopback and listed in status", async () => {
    const key = new FakeKeyProvider();
    await key.createOrOpen();
    const cfg = await config({ metrics: { enabled: true, listen: "127.0.0.1:0" } });
    const agent = await startAgent(cfg, { log: quiet, keyProvider: key, stages: [], env: {} });
    const status = await fetchStatus(cfg.api.socket);
    expect(status.metrics).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
    const body = await (await fetch(status.metrics ?? "")).text();
    expect(body).toContain('m2m_agent_state{state="running"} 1');
    expect(body).toContain('m2m_agent_state_transitions_total{from="starting",to="running"} 1');
    await agent.stop("test");
  });
});
