import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createLogger, silentLogger } from "../../src/core/log.js";
import { monotonicUsec, SystemdNotifier, WatchdogHeartbeat } from "../../src/daemon/notify.js";
import { bindNotifyListener, type NotifyListener } from "./notify-listener.js";

let dir: string;
let listener: NotifyListener;

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "m2m-notify-"));
  listener = await bindNotifyListener(join(dir, "notify.sock"));
});
afterAll(async () => {
  listener.close();
  await rm(dir, { recursive: true, force: true });
});

describe("sd_notify against a real datagram socket", () => {
  it("sends READY=1 with STATUS, STATUS, STOPPING=1 as exact datagrams in order", async () => {
    const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: listener.path }, log: silentLogger });
    expect(n.enabled).toBe(true);
    const from = listener.messages.length;
    await n.ready("running");
    await n.status("degraded: broker down");
    await n.stopping();
    await listener.waitFor((m) => m === "STOPPING=1", from);
    expect(listener.messages.slice(from)).toEqual([
      "READY=1\nSTATUS=running",
      "STATUS=degraded: broker down",
      "STOPPING=1",
    ]);
  });

  it("RELOADING=1 carries MONOTONIC_USEC from CLOCK_MONOTONIC", async () => {
    const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: listener.path }, log: silentLogger });
    const from = listener.messages.length;
    const before = monotonicUsec();
    await n.reloading();
    const msg = await listener.waitFor((m) => m.startsWith("RELOADING=1"), from);
    const m = /^RELOADING=1\nMONOTONIC_USEC=(\d+)$/.exec(msg);
    expect(m).not.toBeNull();
    const usec = BigInt(m?.[1] ?? "0");
    expect(usec >= before).toBe(true);
    expect(usec <= monotonicUsec()).toBe(true);
  });

  it("a newline inside a status cannot inject another assignment", async () => {
    const n = new SystemdNotifier({ env: { NOTIFY_SOCKET: listener.path }, log: silentLogger });
    const from = listener.messages.length;
    await n.status("bad\nREADY=1");
    expect(await listener.waitFor(() => true, from)).toBe("STATUS=bad READY=1");
  });

  it("watchdog: interval is WATCHDOG_USEC/2; pings only while healthy", async () => {
    const n = new SystemdNotifier({
      env: { NOTIFY_SOCKET: listener.path, WATCHDOG_USEC: "30000000", WATCHDOG_PID: String(process.pid) },
      log: silentLogger,
    });
    expect(n.watchdogIntervalMs).toBe(15_000);
    let healthy = true;
    const lines: string[] = [];
    const hb = new WatchdogHeartbeat(n, () => healthy, createLogger({ write: (l) => lines.push(l) }));
    const from = listener.messages.length;
    hb.tick();
    healthy = false; // e.g. a TPM call hung past its deadline
    hb.tick();
    hb.tick();
    healthy = true;
    hb.tick();
    await n.status("marker");
    await listener.waitFor((m) => m === "STATUS=marker", from);
    expect(listener.messages.slice(from)).toEqual(["WATCHDOG=1", "WATCHDOG=1", "STATUS=marker"]);
    expect(lines.some((l) => l.includes("withholding watchdog pings"))).toBe(true);
  });

  it("watchdog meant for another PID is ignored", () => {
    const n = new SystemdNotifier({
      env: { NOTIFY_SOCKET: listener.path, WATCHDOG_USEC: "30000000", WATCHDOG_PID: "1" },
      log: silentLogger,
    });
    expect(n.watchdogIntervalMs).toBeUndefined();
  });

  it("without NOTIFY_SOCKET everything is a silent no-op (runs without systemd)", async () => {
    const n = new SystemdNotifier({ env: {}, log: silentLogger });
    expect(n.enabled).toBe(false);
    await n.ready();
    await n.watchdog();
    expect(new WatchdogHeartbeat(n, () => true, silentLogger).start()).toBeUndefined();
  });

  it("an abstract socket name (@…) is recognised and reported as unsupported by the addon, not misrouted", async () => {
    const lines: string[] = [];
    const n = new SystemdNotifier({
      env: { NOTIFY_SOCKET: "@m2m-test" },
      log: createLogger({ write: (l) => lines.push(l) }),
    });
    expect(n.enabled).toBe(false);
    await n.ready();
    expect(lines.join("\n")).toContain("ERR_NOTIFY_ABSTRACT_UNSUPPORTED");
  });

  it("a dead socket path is logged once and never throws", async () => {
    const lines: string[] = [];
    const n = new SystemdNotifier({
      env: { NOTIFY_SOCKET: join(dir, "nobody-listens.sock") },
      log: createLogger({ write: (l) => lines.push(l) }),
    });
    await n.ready();
    await n.status("x");
    expect(lines.filter((l) => l.includes("ERR_NOTIFY_SEND"))).toHaveLength(1);
  });
});
