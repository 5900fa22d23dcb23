import { spawn } from "node:child_process";
import { mkdir, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initSoftHsm, type SoftHsmHandle, softHsmKeysToml } from "../../hw/softhsm.js";
import { SqliteOutbox } from "../../src/relay/outbox/sqlite/sqlite-outbox.js";
import { useTempDir } from "../kit/temp-dir.js";
import { assertBuilt, CLI, type Daemon, runCli, startDaemon } from "./daemon-cli-kit.js";

/**
 * Field events on the state directory, against the BUILT CLI and SoftHSM2: one agent per state
 * directory (a second `run` / `enroll` / `keys destroy` / `decommission` refuses naming the PID; a
 * lock left by kill -9 is no obstacle), the API socket never world-accessible (umask 000 and a
 * poller stat-ing the path during start), and outbox files 0600 whatever the umask.
 */
const dir = useTempDir("m2m-field-state-");
let hsm: SoftHsmHandle;
let configPath: string;
let env: NodeJS.ProcessEnv;
const daemons: Daemon[] = [];

beforeAll(async () => {
  assertBuilt();
  await mkdir(join(dir(), "state"), { mode: 0o700 });
  await mkdir(join(dir(), "run"), { mode: 0o755 });
  hsm = await initSoftHsm({ label: "m2m-field", pin: "pin-field-1234" });
  configPath = join(dir(), "agent.toml");
  await writeFile(
    configPath,
    [
      "[agent]",
      `state_dir = "${join(dir(), "state")}"`,
      `runtime_dir = "${join(dir(), "run")}"`,
      'log_level = "info"',
      ...softHsmKeysToml(hsm),
      "[api]",
      `socket = "${join(dir(), "run", "api.sock")}"`,
      "",
    ].join("\n"),
  );
  env = { PATH: process.env.PATH, HOME: dir(), ...hsm.env };
  const init = await runCli(["--config", configPath, "keys", "init"], env);
  expect(init.code, init.stderr).toBe(0);
});

afterAll(async () => {
  for (const d of daemons) d.kill();
  await hsm?.cleanup();
});

const up = (d: Daemon) => d.waitLog((r) => r.msg === "lifecycle transition" && r.to === "running", 30_000);

describe("one agent per state directory", () => {
  it("a second run, enroll, keys destroy and decommission refuse with ERR_STATE_LOCKED naming the PID; kill -9 leaves no obstacle", async () => {
    const first = startDaemon(["--config", configPath, "run"], env);
    daemons.push(first);
    await up(first);
    const pid = String(first.child.pid);

    const second = await runCli(["--config", configPath, "run"], env, 20_000);
    expect(second.code).toBe(1);
    expect(second.stderr).toContain(`PID ${pid}`);
    expect(second.stderr).toContain("ERR_STATE_LOCKED");
    for (const args of [["enroll"], ["keys", "destroy", "--yes"], ["decommission", "--yes", "--offline"]]) {
      const r = await runCli(["--config", configPath, ...args], env, 20_000);
      expect(r.code, `${args.join(" ")}: ${r.stderr}`).toBe(1);
      expect(r.stderr).toContain("ERR_STATE_LOCKED");
      expect(r.stderr).toContain(`PID ${pid}`);
    }
    // The key survived the refused destroy.
    const show = await runCli(["--config", configPath, "--json", "keys", "show"], env);
    expect(show.code, show.stderr).toBe(0);

    first.child.kill("SIGKILL");
    await first.exited;
    const again = startDaemon(["--config", configPath, "run"], env);
    daemons.push(again);
    await up(again);
    again.child.kill("SIGTERM");
    expect(await again.exited).toBe(0);
  }, 90_000);
});

describe("file modes", () => {
  it("under umask 000 the API socket is never seen with group/other write or other access", async () => {
    const sock = join(dir(), "run", "api.sock");
    const modes = new Set<number>();
    let polling = true;
    const poll = (async () => {
      while (polling) {
        const st = await stat(sock).catch(() => undefined);
        if (st !== undefined) modes.add(st.mode & 0o777);
        await new Promise((r) => setImmediate(r));
      }
    })();
    // `umask 000` as a shell would set it, then the built CLI.
    const child = spawn(
      "/bin/sh",
      ["-c", `umask 000; exec "${process.execPath}" "${CLI}" --config "${configPath}" run`],
      {
        env,
        stdio: ["ignore", "ignore", "pipe"],
      },
    );
    let stderr = "";
    child.stderr?.on("data", (c: Buffer) => {
      stderr += c.toString();
    });
    const deadline = Date.now() + 30_000;
    while (!stderr.includes('"to":"running"') && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 50));
    expect(stderr).toContain('"to":"running"');
    polling = false;
    await poll;
    child.kill("SIGTERM");
    await new Promise((r) => child.on("exit", r));
    expect(modes.size).toBeGreaterThan(0);
    // Why: other users must never be able to connect (the default mode is 0660).
    for (const m of modes) expect(m & 0o007, `socket seen with mode ${m.toString(8)}`).toBe(0);
    expect([...modes]).toEqual([0o660]);
  }, 60_000);

  it("outbox database, WAL and SHM are 0600 under umask 000, and 0644 files left by an older version are tightened", async () => {
    const path = join(dir(), "outbox.db");
    const old = process.umask(0);
    try {
      const ob = SqliteOutbox.open({ path, sinks: ["a"] });
      await ob.append([
        {
          id: "m1",
          channel: "c",
          payload: Buffer.from("x"),
          contentType: "text/plain",
          ts: new Date().toISOString(),
        },
      ] as never);
      for (const suffix of ["", "-wal", "-shm"])
        expect((await stat(path + suffix)).mode & 0o777, suffix).toBe(0o600);
      await ob.close();
    } finally {
      process.umask(old);
    }
    const legacy = join(dir(), "legacy.db");
    for (const suffix of ["", "-wal", "-shm"]) await writeFile(legacy + suffix, "", { mode: 0o644 });
    const ob2 = SqliteOutbox.open({ path: legacy, sinks: ["a"] });
    for (const suffix of ["", "-wal", "-shm"])
      expect((await stat(legacy + suffix)).mode & 0o777, suffix).toBe(0o600);
    await ob2.close();
  });
});
