import { mkdtemp, rm } from "node:fs/promises";
import { createServer, type Server } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { waitForDrain } from "../../src/cli/agent/status.js";
import type { Progress } from "../../src/cli/progress.js";
import type { AgentStatus } from "../../src/wire/v1/local-api.js";

/** A stand-in daemon on a real Unix socket whose outbox depth follows `depths`, one per request. */
async function fakeDaemon(
  depths: (number | undefined)[],
): Promise<{ socket: string; close(): Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), "m2m-drain-"));
  const socket = join(dir, "api.sock");
  let i = 0;
  const server: Server = createServer((_req, res) => {
    const depth = depths[Math.min(i++, depths.length - 1)];
    const relay = depth === undefined ? {} : { relay: { outbox: { depth } } };
    res.writeHead(200, { "content-type": "application/json" });
    // A whole status body as the wire type has it: the client validates what it reads.
    const status: AgentStatus = {
      state: "running",
      status: "running",
      reasons: {},
      since: new Date(0).toISOString(),
      version: "0.0.0-test",
      pid: process.pid,
      uptimeS: 1,
      enrolment: { enrolled: false },
      clock: {
        trusted: true,
        now: new Date().toISOString(),
        floor: new Date(0).toISOString(),
        floorSource: "build",
      },
      anomalies: [],
      stages: relay,
    };
    res.end(JSON.stringify(status));
  });
  await new Promise<void>((r) => server.listen(socket, r));
  return {
    socket,
    close: async () => {
      await new Promise<void>((r) => server.close(() => r()));
      await rm(dir, { recursive: true, force: true });
    },
  };
}

function recorder(): Progress & { lines: string[] } {
  const lines: string[] = [];
  return {
    lines,
    step: (t) => lines.push(`step ${t}`),
    done: (t) => lines.push(`done ${t ?? ""}`),
    fail: (t) => lines.push(`fail ${t ?? ""}`),
  };
}

describe("m2m-agent status --wait-drain", () => {
  const closers: (() => Promise<void>)[] = [];
  afterEach(async () => {
    for (const c of closers.splice(0)) await c();
  });

  it("shows the backlog shrinking with a drain rate and returns once the outbox is empty", async () => {
    const d = await fakeDaemon([300, 200, 50, 0]);
    closers.push(d.close);
    const progress = recorder();
    await waitForDrain(d.socket, { progress, intervalMs: 10, timeoutMs: 10_000 });
    expect(progress.lines[0]).toBe("step backlog: 300 message(s) queued");
    expect(progress.lines[1]).toMatch(/^step backlog: 200 message\(s\) queued \(draining at \d+ msg\/s\)$/);
    expect(progress.lines.at(-1)).toBe("done backlog drained: outbox empty");
  });

  it("gives up with ERR_DRAIN_TIMEOUT when the backlog does not move", async () => {
    const d = await fakeDaemon([42]);
    closers.push(d.close);
    const progress = recorder();
    await expect(waitForDrain(d.socket, { progress, intervalMs: 10, timeoutMs: 50 })).rejects.toMatchObject({
      code: "ERR_DRAIN_TIMEOUT",
    });
    expect(progress.lines.at(-1)).toBe("fail backlog: 42 message(s) still queued");
  });

  it("says so when the agent has no relay", async () => {
    const d = await fakeDaemon([undefined]);
    closers.push(d.close);
    await expect(
      waitForDrain(d.socket, { progress: recorder(), intervalMs: 10, timeoutMs: 1000 }),
    ).rejects.toMatchObject({ code: "ERR_NO_RELAY" });
  });

  it("reports an unreachable agent with its own code", async () => {
    await expect(
      waitForDrain(join(tmpdir(), "no-such-m2m.sock"), { progress: recorder(), timeoutMs: 1000 }),
    ).rejects.toMatchObject({ code: "ERR_AGENT_NOT_RUNNING" });
  });
});
