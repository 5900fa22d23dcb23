import { mkdir, mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { initSoftHsm, type SoftHsmHandle, softHsmKeysToml } from "../../hw/softhsm.js";
import { fetchStatus } from "../../src/cli/agent/status.js";
import { assertBuilt, type Daemon, runCli, startDaemon } from "./daemon-cli-kit.js";
import { bindNotifyListener, type NotifyListener } from "./notify-listener.js";

/**
 * The daemon as a user runs it: built CLI, a config file, SoftHSM as the token, systemd's notify
 * socket played by a real datagram socket bound here, signals for reload and stop.
 */

const PIN = "pin-7c1f-55aa";
let dir: string;
let hsm: SoftHsmHandle;
let listener: NotifyListener;
let configPath: string;
let env: NodeJS.ProcessEnv;
const daemons: Daemon[] = [];

function configText(extra = ""): string {
  return `# daemon-lifecycle test config
[agent]
state_dir = "${join(dir, "state")}"
runtime_dir = "${dir}"
log_level = "info"
drain_timeout_ms = 5000

${softHsmKeysToml(hsm).join("\n")}

[api]
socket = "${join(dir, "api.sock")}"
mode = 0o600

[metrics]
enabled = true
listen = "127.0.0.1:0"
${extra}`;
}

function httpGet(url: string): Promise<string> {
  return new Promise((res, rej) => {
    request(url, (r) => {
      let b = "";
      r.on("data", (c: Buffer) => {
        b += c.toString();
      });
      r.on("end", () => res(b));
    })
      .on("error", rej)
      .end();
  });
}

beforeAll(async () => {
  assertBuilt();
  dir = await mkdtemp(join(tmpdir(), "m2m-daemon-"));
  await mkdir(join(dir, "state"), { mode: 0o700 });
  hsm = await initSoftHsm({ label: "m2m-daemon", pin: PIN });
  listener = await bindNotifyListener(join(dir, "notify.sock"));
  configPath = join(dir, "agent.toml");
  await writeFile(configPath, configText());
  env = { PATH: process.env.PATH, HOME: dir, ...hsm.env, NOTIFY_SOCKET: listener.path };
});

afterAll(async () => {
  for (const d of daemons) d.kill();
  listener?.close();
  await hsm?.cleanup();
  if (dir !== undefined) await rm(dir, { recursive: true, force: true });
});

describe("m2m-agent run (built CLI, SoftHSM, real notify socket)", () => {
  let thumbprint: string;

  it("keys init creates the identity the daemon will use", async () => {
    const r = await runCli(["--config", configPath, "--json", "keys", "init"], env);
    expect(r.stderr).toBe("");
    expect(r.code).toBe(0);
    const out = JSON.parse(r.stdout) as { thumbprint: string; created: boolean };
    expect(out.created).toBe(true);
    thumbprint = out.thumbprint;
  });

  it("start → READY=1; status via the local API; SIGHUP → RELOADING=1 then READY=1; SIGTERM → STOPPING=1, exit 0", async () => {
    const from = listener.messages.length;
    // WatchdogSec=2: the agent must ping every second while healthy.
    const d = startDaemon(["--config", configPath, "run"], { ...env, WATCHDOG_USEC: "2000000" });
    daemons.push(d);
    const ready = await listener.waitFor((m) => m.startsWith("READY=1"), from);
    expect(ready).toBe("READY=1\nSTATUS=running");
    await listener.waitFor((m) => m === "WATCHDOG=1", from);
    expect((await d.waitLog((r) => r.msg === "systemd watchdog enabled")).intervalMs).toBe(1000);

    // Status from the running daemon over the Unix socket, as `m2m-agent status` does.
    const status = await fetchStatus(join(dir, "api.sock"));
    expect(status).toMatchObject({ state: "running", pid: d.child.pid, enrolment: { enrolled: false } });
    expect(status.key?.thumbprint).toBe(thumbprint);
    expect(status.key?.provider).toBe("pkcs11");
    const cli = await runCli(["--config", configPath, "--json", "status"], env);
    expect(cli.code).toBe(0);
    expect((JSON.parse(cli.stdout) as { state: string }).state).toBe("running");

    // Metrics: state and the PKCS#11 key operation timings, from a real scrape.
    expect(status.metrics).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
    const scrape = await httpGet(status.metrics ?? "");
    expect(scrape).toContain('m2m_agent_state{state="running"} 1');
    expect(scrape).toContain('m2m_agent_key_operation_duration_seconds_count{backend="pkcs11",op="open"} 1');

    // Reload: log level applies live; an outbox limit needs a restart and says so.
    await writeFile(
      configPath,
      configText("\n[relay.outbox]\nmax_count = 5000\n").replace('log_level = "info"', 'log_level = "debug"'),
    );
    const beforeHup = listener.messages.length;
    d.child.kill("SIGHUP");
    const reloading = await listener.waitFor((m) => m.startsWith("RELOADING=1"), beforeHup);
    expect(reloading).toMatch(/^RELOADING=1\nMONOTONIC_USEC=\d+\nSTATUS=reloading configuration$/);
    const afterReload = await listener.waitFor((m) => m.startsWith("READY=1"), beforeHup);
    expect(afterReload).toBe("READY=1\nSTATUS=running");
    const reloaded = await d.waitLog((r) => r.msg === "configuration reloaded");
    expect(reloaded.applied).toEqual(["agent.log_level"]);
    const restart = await d.waitLog((r) => r.msg === "restart required for changed keys");
    expect(restart.restartRequired).toEqual(["relay.outbox.max_count"]);
    // Config is logged by key path, never by value; the PIN never appears.
    const started = await d.waitLog((r) => r.msg === "m2m-agent starting");
    expect(started.configKeys).toContain("keys.pkcs11.pin");
    expect(JSON.stringify(started.configKeys)).not.toContain(hsm.pinFile);
    expect(d.stderr()).not.toContain(PIN);

    // A broken edit keeps the running configuration.
    await writeFile(configPath, `${configText()}\n[keys.tpm]\nkey_handle = 0x1\n`);
    const beforeBad = listener.messages.length;
    d.child.kill("SIGHUP");
    await listener.waitFor((m) => m.startsWith("READY=1"), beforeBad);
    const bad = await d.waitLog((r) => r.msg === "reload failed; keeping the running configuration");
    expect(JSON.stringify(bad.error)).toContain(`${configPath}: keys.tpm.key_handle`);
    expect((await fetchStatus(join(dir, "api.sock"))).state).toBe("running");
    await writeFile(configPath, configText());

    const beforeTerm = listener.messages.length;
    d.child.kill("SIGTERM");
    expect(await listener.waitFor((m) => m.startsWith("STOPPING=1"), beforeTerm)).toBe(
      "STOPPING=1\nSTATUS=stopping: SIGTERM",
    );
    expect(await d.exited).toBe(0);
    const stopped = await d.waitLog((r) => r.msg === "stopped");
    expect(stopped.drained).toBe(true);
  });

  it("a restart finds the same key identity", async () => {
    const from = listener.messages.length;
    const d = startDaemon(["--config", configPath, "run"], env);
    daemons.push(d);
    await listener.waitFor((m) => m.startsWith("READY=1"), from);
    const status = await fetchStatus(join(dir, "api.sock"));
    expect(status.key?.thumbprint).toBe(thumbprint);
    d.child.kill("SIGTERM");
    expect(await d.exited).toBe(0);
  });

  it("without a key the daemon is READY but unprovisioned, and says what to do", async () => {
    const other = join(dir, "nokey.toml");
    await writeFile(
      other,
      configText().replace(
        `token_label = "${hsm.tokenLabel}"`,
        `token_label = "${hsm.tokenLabel}"\nkey_label = "absent"`,
      ),
    );
    const from = listener.messages.length;
    const d = startDaemon(["--config", other, "run"], env);
    daemons.push(d);
    const ready = await listener.waitFor((m) => m.startsWith("READY=1"), from);
    expect(ready).toMatch(/^READY=1\nSTATUS=unprovisioned: no device key: run `m2m-agent keys init`/);
    const cli = await runCli(["--config", other, "status"], env);
    expect(cli.stderr).toBe("");
    expect(cli.code).toBe(3);
    expect(cli.stdout).toContain("state:      unprovisioned");
    d.child.kill("SIGTERM");
    expect(await d.exited).toBe(0);
  });

  it("a bad config exits 2 naming the file and the key", async () => {
    const bad = join(dir, "bad.toml");
    await writeFile(bad, configText().replace("[metrics]", "[metrics]\nport = 9464"));
    const r = await runCli(["--config", bad, "run"], env);
    expect(r.code).toBe(2);
    expect(r.stderr).toContain(`m2m-agent: ${bad}: metrics.port: unknown key`);
  });

  it("the daemon's state files are private (audit log 0600, clock floor persisted)", async () => {
    expect((await stat(join(dir, "state", "audit.log"))).mode & 0o777).toBe(0o600);
    const floor = JSON.parse(await readFile(join(dir, "state", "clock-floor.json"), "utf8")) as {
      lastSeen: string;
    };
    expect(Number.isNaN(new Date(floor.lastSeen).getTime())).toBe(false);
    expect((await stat(join(dir, "state", "clock-floor.json"))).mode & 0o777).toBe(0o600);
  });
});
