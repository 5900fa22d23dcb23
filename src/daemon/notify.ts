import { createRequire } from "node:module";
import type { Logger } from "../core/log.js";

/**
 * sd_notify(3) for Node. Node has no Unix datagram sockets, so messages go through the `unix-dgram`
 * native addon (see docs/operations.md). Everything here is best-effort: a failed notification is
 * logged once and never breaks the agent, and without NOTIFY_SOCKET every call is a no-op (the agent
 * runs fine without systemd).
 */

interface DgramSocket {
  on(event: "error", listener: (err: Error) => void): void;
  send(buf: Buffer, offset: number, length: number, path: string, cb: (err?: Error) => void): void;
  close(): void;
}
interface UnixDgramModule {
  createSocket(type: "unix_dgram"): DgramSocket;
}

const require = createRequire(import.meta.url);
let unixDgram: UnixDgramModule | undefined;
/** Loaded on first use: a CLI command that never notifies does not pay for the addon. */
export function loadUnixDgram(): UnixDgramModule {
  unixDgram ??= require("unix-dgram") as UnixDgramModule;
  return unixDgram;
}

/** Sends one datagram to a filesystem Unix socket (a fresh socket per message keeps no loop handle). */
export function sendDatagram(path: string, message: string): Promise<void> {
  return new Promise((resolve, reject) => {
    let sock: DgramSocket;
    try {
      sock = loadUnixDgram().createSocket("unix_dgram");
    } catch (err) {
      reject(err);
      return;
    }
    const buf = Buffer.from(message, "utf8");
    sock.on("error", (err) => {
      try {
        sock.close();
      } catch {}
      reject(err);
    });
    sock.send(buf, 0, buf.length, path, (err) => {
      try {
        sock.close();
      } catch {}
      if (err) reject(err);
      else resolve();
    });
  });
}

/** CLOCK_MONOTONIC in µs (libuv's hrtime is CLOCK_MONOTONIC on Linux, which systemd compares against). */
export function monotonicUsec(): bigint {
  return process.hrtime.bigint() / 1000n;
}

export interface NotifierOptions {
  readonly env?: NodeJS.ProcessEnv;
  readonly log: Logger;
  /** Test seam; default sends a real datagram. */
  readonly send?: (path: string, message: string) => Promise<void>;
  readonly pid?: number;
}

/** Talks to the service manager through $NOTIFY_SOCKET. */
export class SystemdNotifier {
  readonly #socket: string | undefined;
  readonly #log: Logger;
  readonly #send: (path: string, message: string) => Promise<void>;
  readonly #watchdogUsec: number | undefined;
  #warned = false;
  #queue: Promise<void> = Promise.resolve();

  constructor(options: NotifierOptions) {
    const env = options.env ?? process.env;
    this.#log = options.log;
    this.#send = options.send ?? sendDatagram;
    const raw = env.NOTIFY_SOCKET;
    if (raw === undefined || raw === "") {
      this.#socket = undefined;
    } else if (raw.startsWith("@")) {
      // The unix-dgram addon copies sun_path with strncpy and a fixed address length, so a name in
      // the abstract namespace (leading NUL) cannot be addressed. systemd itself always hands
      // services a filesystem path (/run/systemd/notify); abstract names come from other supervisors.
      this.#socket = undefined;
      this.#log.warn(
        "NOTIFY_SOCKET is an abstract socket name, which this build cannot address; notifications disabled",
        {
          code: "ERR_NOTIFY_ABSTRACT_UNSUPPORTED",
          hint: "give the supervisor a filesystem socket path",
        },
      );
    } else if (raw.startsWith("/")) {
      this.#socket = raw;
    } else {
      this.#socket = undefined;
      this.#log.warn("NOTIFY_SOCKET is neither an absolute path nor an abstract name; ignored", {
        code: "ERR_NOTIFY_SOCKET",
      });
    }
    const usec = Number(env.WATCHDOG_USEC);
    const wdPid = env.WATCHDOG_PID;
    // WATCHDOG_PID names the process the watchdog is meant for; a child that inherited it must not ping.
    const forUs = wdPid === undefined || wdPid === "" || Number(wdPid) === (options.pid ?? process.pid);
    this.#watchdogUsec =
      this.#socket !== undefined && forUs && Number.isFinite(usec) && usec > 0 ? usec : undefined;
  }

  /** True when a service manager is listening. */
  get enabled(): boolean {
    return this.#socket !== undefined;
  }

  /** The ping interval systemd expects (half of WatchdogSec), or undefined when no watchdog is set. */
  get watchdogIntervalMs(): number | undefined {
    return this.#watchdogUsec === undefined ? undefined : Math.max(1, Math.floor(this.#watchdogUsec / 2000));
  }

  /** Sends raw `KEY=value` lines. Resolves when sent (or dropped); never rejects. */
  notify(lines: readonly string[]): Promise<void> {
    const socket = this.#socket;
    if (socket === undefined) return Promise.resolve();
    // Newlines inside a value would inject extra assignments: strip them.
    const message = lines.map((l) => l.replace(/[\r\n]+/g, " ")).join("\n");
    // Serialized so READY/STATUS/STOPPING arrive in the order they were issued.
    this.#queue = this.#queue.then(() =>
      this.#send(socket, message).catch((err: unknown) => {
        if (!this.#warned) {
          this.#warned = true;
          this.#log.warn("sd_notify failed", { error: err, code: "ERR_NOTIFY_SEND" });
        }
      }),
    );
    return this.#queue;
  }

  ready(status?: string): Promise<void> {
    return this.notify(status === undefined ? ["READY=1"] : ["READY=1", `STATUS=${status}`]);
  }

  status(text: string): Promise<void> {
    return this.notify([`STATUS=${text}`]);
  }

  /** Type=notify-reload semantics (systemd ≥ 253 checks MONOTONIC_USEC; older ones ignore it). */
  reloading(status?: string): Promise<void> {
    const lines = ["RELOADING=1", `MONOTONIC_USEC=${monotonicUsec()}`];
    if (status !== undefined) lines.push(`STATUS=${status}`);
    return this.notify(lines);
  }

  stopping(status?: string): Promise<void> {
    return this.notify(status === undefined ? ["STOPPING=1"] : ["STOPPING=1", `STATUS=${status}`]);
  }

  watchdog(): Promise<void> {
    return this.notify(["WATCHDOG=1"]);
  }

  /** Asks for more time during a long start/stop (EXTEND_TIMEOUT_USEC). */
  extendTimeout(ms: number): Promise<void> {
    return this.notify([`EXTEND_TIMEOUT_USEC=${Math.ceil(ms * 1000)}`]);
  }
}

/**
 * Pings WATCHDOG=1 every WATCHDOG_USEC/2 while the agent is healthy. The timer itself runs on the
 * event loop, so a blocked loop stops the pings; `isHealthy()` additionally withholds them while a
 * component reports a hang (e.g. a TPM call stuck past its deadline), so systemd restarts us.
 */
export class WatchdogHeartbeat {
  readonly #notifier: SystemdNotifier;
  readonly #isHealthy: () => boolean;
  readonly #log: Logger;
  #timer: NodeJS.Timeout | undefined;
  #withholding = false;

  constructor(notifier: SystemdNotifier, isHealthy: () => boolean, log: Logger) {
    this.#notifier = notifier;
    this.#isHealthy = isHealthy;
    this.#log = log;
  }

  /** Starts pinging if systemd asked for a watchdog; returns the interval used (ms) or undefined. */
  start(): number | undefined {
    const interval = this.#notifier.watchdogIntervalMs;
    if (interval === undefined || this.#timer !== undefined) return interval;
    this.tick();
    this.#timer = setInterval(() => this.tick(), interval);
    return interval;
  }

  /** One heartbeat decision (exposed so tests and the main loop can drive it). */
  tick(): void {
    if (this.#isHealthy()) {
      if (this.#withholding) this.#log.info("watchdog pings resumed");
      this.#withholding = false;
      void this.#notifier.watchdog();
    } else if (!this.#withholding) {
      this.#withholding = true;
      this.#log.error("main loop unhealthy: withholding watchdog pings (systemd will restart the agent)");
    }
  }

  stop(): void {
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
  }
}
