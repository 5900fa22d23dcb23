import { type ChildProcess, spawn } from "node:child_process";
import { createWriteStream, existsSync, readdirSync, readFileSync, type WriteStream } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

/**
 * Small pieces of the one-command demo (hw/demo.ts): coloured step lines, child processes whose
 * output goes to log files (only key events reach the screen), the notify socket an agent talks to,
 * and a /proc walk that lists every process the demo started (the test checks they are all gone).
 */

// ───────────────────────────── output ─────────────────────────────

export interface Ui {
  section(title: string): void;
  ok(text: string): void;
  info(text: string): void;
  event(who: string, text: string): void;
  warn(text: string): void;
  fail(text: string): void;
  table(rows: readonly (readonly [string, string])[]): void;
  /** Colour helpers (identity when colours are off). */
  readonly c: {
    bold(s: string): string;
    dim(s: string): string;
    green(s: string): string;
    cyan(s: string): string;
  };
}

export function createUi(out: NodeJS.WriteStream, colour: boolean): Ui {
  const wrap =
    (open: number, close: number) =>
    (s: string): string =>
      colour ? `\x1b[${open}m${s}\x1b[${close}m` : s;
  const bold = wrap(1, 22);
  const dim = wrap(2, 22);
  const green = wrap(32, 39);
  const red = wrap(31, 39);
  const yellow = wrap(33, 39);
  const cyan = wrap(36, 39);
  const magenta = wrap(35, 39);
  const t0 = Date.now();
  const stamp = (): string => dim(`${((Date.now() - t0) / 1000).toFixed(1).padStart(5)}s`);
  const line = (s: string): void => {
    out.write(`${s}\n`);
  };
  return {
    c: { bold, dim, green, cyan },
    section: (title) => line(`\n${stamp()} ${bold(cyan(colour ? `▸ ${title}` : `== ${title}`))}`),
    ok: (text) => line(`${stamp()}   ${green(colour ? "✓" : "ok")} ${text}`),
    info: (text) => line(`${stamp()}   ${dim(colour ? "·" : "--")} ${text}`),
    event: (who, text) => line(`${stamp()}   ${magenta(who.padEnd(10))} ${text}`),
    warn: (text) => line(`${stamp()}   ${yellow(colour ? "!" : "!!")} ${text}`),
    fail: (text) => line(`${stamp()}   ${red(colour ? "✗" : "FAIL")} ${text}`),
    table(rows) {
      const w = Math.max(...rows.map(([k]) => k.length));
      for (const [k, v] of rows) line(`   ${bold(k.padEnd(w))}  ${v}`);
    },
  };
}

// ───────────────────────────── child processes ─────────────────────────────

export interface ManagedChild {
  readonly name: string;
  readonly child: ChildProcess;
  readonly pid: number;
  readonly logFile: string;
  /** Resolves with the exit code (or the signal name) once the process is gone. */
  readonly exited: Promise<number | string>;
  readonly running: boolean;
  /** SIGTERM, then SIGKILL after `graceMs`; resolves when the process is gone. */
  stop(graceMs?: number): Promise<number | string>;
}

/**
 * Spawns `node` or a tool with an argv array (never a shell); stdout and stderr go to `logFile`,
 * each complete line is also handed to `onLine` (key events are picked from there).
 */
export function spawnLogged(o: {
  name: string;
  file: string;
  args: readonly string[];
  env: NodeJS.ProcessEnv;
  logFile: string;
  onLine?: (line: string, stream: "stdout" | "stderr") => void;
}): ManagedChild {
  const log: WriteStream = createWriteStream(o.logFile, { flags: "a", mode: 0o600 });
  const child = spawn(o.file, [...o.args], { env: o.env, stdio: ["ignore", "pipe", "pipe"] });
  if (child.pid === undefined) throw new Error(`${o.name}: could not start ${o.file}`);
  const pid = child.pid;
  let running = true;
  const feed = (stream: "stdout" | "stderr") => {
    let buf = "";
    return (chunk: Buffer): void => {
      log.write(chunk);
      buf += chunk.toString("utf8");
      let i = buf.indexOf("\n");
      while (i >= 0) {
        const l = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (l.length > 0) o.onLine?.(l, stream);
        i = buf.indexOf("\n");
      }
      if (buf.length > 1_000_000) buf = "";
    };
  };
  child.stdout?.on("data", feed("stdout"));
  child.stderr?.on("data", feed("stderr"));
  const exited = new Promise<number | string>((resolve) => {
    child.once("error", () => {
      running = false;
      resolve("spawn-error");
    });
    child.once("exit", (code, signal) => {
      running = false;
      resolve(code ?? signal ?? "unknown");
    });
  }).then(async (r) => {
    await new Promise<void>((res) => log.end(res));
    return r;
  });
  return {
    name: o.name,
    child,
    pid,
    logFile: o.logFile,
    exited,
    get running() {
      return running;
    },
    async stop(graceMs = 10_000) {
      if (running) {
        child.kill("SIGTERM");
        const t = setTimeout(() => {
          if (running) child.kill("SIGKILL");
        }, graceMs);
        const r = await exited;
        clearTimeout(t);
        return r;
      }
      return exited;
    },
  };
}

// ───────────────────────────── systemd notify socket ─────────────────────────────

interface DgramSocket {
  on(ev: "message", l: (buf: Buffer) => void): void;
  on(ev: "error", l: (err: Error) => void): void;
  on(ev: "listening", l: () => void): void;
  bind(path: string): void;
  close(): void;
}

export interface NotifySocket {
  readonly path: string;
  readonly messages: string[];
  close(): void;
}

/** Binds a Unix datagram socket standing in for systemd's NOTIFY_SOCKET (unix-dgram addon). */
export function bindNotifySocket(path: string, onMessage: (msg: string) => void): Promise<NotifySocket> {
  const mod = createRequire(import.meta.url)("unix-dgram") as {
    createSocket(t: "unix_dgram"): DgramSocket;
  };
  const sock = mod.createSocket("unix_dgram");
  const messages: string[] = [];
  sock.on("message", (buf) => {
    const msg = buf.toString("utf8");
    messages.push(msg);
    onMessage(msg);
  });
  return new Promise((resolve, reject) => {
    sock.on("error", reject);
    sock.on("listening", () =>
      resolve({
        path,
        messages,
        close() {
          try {
            sock.close();
          } catch {
            // already closed
          }
        },
      }),
    );
    sock.bind(path);
  });
}

// ───────────────────────────── process accounting ─────────────────────────────

export interface ProcInfo {
  readonly pid: number;
  readonly cmd: string;
}

function readProc(pid: number): { ppid: number; cmd: string } | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const ppid = Number(rest[1]);
    const cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0").filter(Boolean).join(" ");
    return { ppid, cmd };
  } catch {
    return undefined;
  }
}

/** Every live descendant of `root` (by walking /proc ppid links). */
export function descendants(root = process.pid): ProcInfo[] {
  const all = new Map<number, { ppid: number; cmd: string }>();
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name)) continue;
    const p = readProc(Number(name));
    if (p !== undefined) all.set(Number(name), p);
  }
  const out: ProcInfo[] = [];
  const queue = [root];
  while (queue.length > 0) {
    const parent = queue.shift() as number; // non-empty: checked by the loop condition
    for (const [pid, p] of all) {
      if (p.ppid === parent) {
        out.push({ pid, cmd: p.cmd });
        queue.push(pid);
      }
    }
  }
  return out;
}

/** True when `p.pid` is still alive AND still runs the same command (a reused pid is not a leak). */
export function stillRunning(p: ProcInfo): boolean {
  const now = readProc(p.pid);
  if (now === undefined) return false;
  const stat = readFileSync(`/proc/${p.pid}/stat`, "utf8");
  const state = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[0];
  if (state === "Z") return false;
  return now.cmd === p.cmd;
}

// ───────────────────────────── tools ─────────────────────────────

/** [tool or file, Debian package] the demo needs. */
export const REQUIRED_TOOLS: readonly (readonly [string, string])[] = [
  ["swtpm", "swtpm"],
  ["swtpm_setup", "swtpm-tools"],
  ["swtpm_localca", "swtpm-tools"],
  ["tpm2_getcap", "tpm2-tools"],
  ["tpm2_shutdown", "tpm2-tools"],
  ["softhsm2-util", "softhsm2"],
  ["mosquitto", "mosquitto"],
  ["openssl", "openssl"],
];

export const REQUIRED_FILES: readonly (readonly [readonly string[], string])[] = [
  [
    [
      "/usr/lib/x86_64-linux-gnu/libtss2-tcti-swtpm.so.0",
      "/usr/lib/aarch64-linux-gnu/libtss2-tcti-swtpm.so.0",
      "/usr/lib/libtss2-tcti-swtpm.so.0",
    ],
    "libtss2-tcti-swtpm0",
  ],
  [
    [
      "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so",
      "/usr/lib/aarch64-linux-gnu/engines-3/pkcs11.so",
      "/usr/lib/engines-3/pkcs11.so",
    ],
    "libengine-pkcs11-openssl",
  ],
];

/** Finds a tool on PATH (plus /usr/sbin and /sbin, where Debian puts mosquitto). */
export function findTool(tool: string, path = process.env.PATH ?? ""): string | undefined {
  for (const d of [...path.split(":").filter(Boolean), "/usr/sbin", "/sbin"]) {
    const p = join(d, tool);
    if (existsSync(p)) return p;
  }
  return undefined;
}
