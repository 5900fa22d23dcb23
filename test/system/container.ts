import { type ChildProcess, spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { createWriteStream, existsSync, readdirSync, readFileSync, rmdirSync, writeFileSync } from "node:fs";
import { mkdir, mkdtemp, readdir, rename, rm } from "node:fs/promises";
import { join } from "node:path";
import { execa } from "execa";

/**
 * A clean Debian 12 root of the test's own, booted with systemd as PID 1 by systemd-nspawn, the way
 * the hardware notes ("Real systemd on these machines") found safe: never the host's root, unified
 * cgroup hierarchy from a throwaway child cgroup, BPF device filter, read-only console, no machine
 * registration. Driven with nsenter; powered off with SIGRTMIN+4.
 */

export const SUITE = "bookworm";
export const MIRROR = process.env.M2M_SYSTEM_MIRROR ?? "http://deb.debian.org/debian";
const BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus"];
/** Cache of the prepared base root between runs on one machine (CI starts clean). */
export const CACHE = process.env.M2M_SYSTEM_CACHE ?? "/var/cache/m2m-agent-system-test";

const sh = (cmd: string, args: readonly string[], timeout = 600_000) =>
  execa(cmd, args, {
    timeout,
    reject: false,
    all: true,
    env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" },
  });

async function must(cmd: string, args: readonly string[], timeout?: number): Promise<string> {
  const r = await sh(cmd, args, timeout);
  if (r.exitCode !== 0)
    throw new Error(`${cmd} ${args.join(" ")} failed (${r.exitCode}):\n${String(r.all).slice(-3000)}`);
  return String(r.stdout);
}

export async function requireTools(tools: readonly string[]): Promise<void> {
  const missing: string[] = [];
  for (const t of tools) if ((await sh("sh", ["-c", `command -v ${t}`])).exitCode !== 0) missing.push(t);
  // Why: a system test that cannot run must fail, never pass by skipping.
  if (missing.length > 0)
    throw new Error(
      `missing tools: ${missing.join(", ")} (apt-get install debootstrap systemd-container dpkg-repack swtpm util-linux)`,
    );
  if (process.getuid?.() !== 0) throw new Error("the system test needs root (debootstrap, nspawn)");
}

/** Base root: debootstrap minbase + systemd, cached by recipe and validated before reuse. */
export async function prepareRoot(root: string, log: (s: string) => void): Promise<void> {
  const recipe = JSON.stringify({ SUITE, MIRROR, BASE_PACKAGES, v: 1 });
  const key = createHash("sha256").update(recipe).digest("hex").slice(0, 16);
  const cached = join(CACHE, `base-${key}`);
  const valid =
    existsSync(join(cached, ".m2m-complete")) &&
    readFileSync(join(cached, ".m2m-complete"), "utf8") === recipe &&
    (await sh("chroot", [cached, "dpkg-query", "-W", "-f=${Status}", "systemd"])).stdout ===
      "install ok installed";
  if (valid) {
    log(`base root from cache ${cached}`);
    await must("cp", ["-a", "--reflink=auto", `${cached}/.`, root]);
    await rm(join(root, ".m2m-complete"));
    return;
  }
  log(`debootstrap ${SUITE} (${MIRROR}) into ${root}`);
  await must("debootstrap", ["--variant=minbase", SUITE, root, MIRROR], 900_000);
  writeFileSync(
    join(root, "etc/apt/sources.list"),
    [
      `deb ${MIRROR} ${SUITE} main`,
      `deb ${MIRROR} ${SUITE}-updates main`,
      `deb http://deb.debian.org/debian-security ${SUITE}-security main`,
      "",
    ].join("\n"),
  );
  // chroot (not nspawn): nothing is booted or mounted while the base packages install.
  await must("chroot", [root, "apt-get", "update", "-q"]);
  await must("chroot", [root, "apt-get", "install", "-y", "-q", "--no-install-recommends", ...BASE_PACKAGES]);
  await must("chroot", [root, "apt-get", "clean"]);
  await rm(cached, { recursive: true, force: true });
  await mkdir(CACHE, { recursive: true });
  await must("cp", ["-a", "--reflink=auto", root, `${cached}.tmp`]);
  writeFileSync(join(`${cached}.tmp`, ".m2m-complete"), recipe);
  await must("mv", [`${cached}.tmp`, cached]);
}

/** Node for the root, as the README tells gateways: the NodeSource nodejs .deb (repacked from the host). */
export async function nodejsDeb(): Promise<string> {
  const version = (await must("dpkg-query", ["-W", "-f=${Version}", "nodejs"])).trim();
  const cacheDir = join(CACHE, "nodejs");
  await mkdir(cacheDir, { recursive: true });
  const hit = readdirSync(cacheDir).find(
    (f) => f.startsWith(`nodejs_${version.replace(/^\d+:/, "")}`) && f.endsWith(".deb"),
  );
  if (hit !== undefined) return join(cacheDir, hit);
  // dpkg-repack writes into the current directory: a scratch one, moved into the cache only when
  // complete (an interrupted run must not leave a truncated .deb that the next run would reuse).
  const scratch = await mkdtemp(join(cacheDir, "repack-"));
  try {
    const r = await execa("dpkg-repack", ["--deb-option=-Zgzip", "--deb-option=-z1", "nodejs"], {
      cwd: scratch,
      reject: false,
      all: true,
    });
    if (r.exitCode !== 0) throw new Error(`dpkg-repack nodejs: ${String(r.all).slice(-2000)}`);
    const made = readdirSync(scratch).find((f) => f.startsWith("nodejs_") && f.endsWith(".deb"));
    if (made === undefined) throw new Error("dpkg-repack produced no nodejs .deb");
    await rename(join(scratch, made), join(cacheDir, made));
    return join(cacheDir, made);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
}

export interface Container {
  readonly root: string;
  readonly pid: number;
  /** Runs a command inside (all namespaces of the container's PID 1). */
  run(
    args: readonly string[],
    o?: { input?: string; timeout?: number },
  ): Promise<{ code: number; out: string; err: string }>;
  /** Like run, but throws with the output when the exit code is not 0. */
  must(args: readonly string[], o?: { input?: string; timeout?: number }): Promise<string>;
  powerOff(): Promise<void>;
}

function childrenOf(pid: number): number[] {
  const out: number[] = [];
  try {
    for (const t of readdirSync(`/proc/${pid}/task`)) {
      const c = readFileSync(`/proc/${pid}/task/${t}/children`, "utf8").trim();
      if (c) out.push(...c.split(/\s+/).map(Number));
    }
  } catch {
    // gone
  }
  return out;
}

/** The container's PID 1 (systemd) as the host sees it: a descendant of nspawn named systemd. */
function findInit(nspawn: number): number | undefined {
  const queue = [nspawn];
  while (queue.length > 0) {
    const p = queue.shift() as number;
    for (const c of childrenOf(p)) {
      try {
        if (readFileSync(`/proc/${c}/comm`, "utf8").trim() === "systemd") return c;
      } catch {
        continue;
      }
      queue.push(c);
    }
  }
  return undefined;
}

const CGROUP_HIERARCHIES = ["systemd", "unified"];

/** Removes a throwaway cgroup and everything nspawn/systemd created below it (deepest first). */
async function removeCgroup(path: string): Promise<void> {
  if (!existsSync(path)) return;
  for (const e of await readdir(path, { withFileTypes: true }))
    if (e.isDirectory()) await removeCgroup(join(path, e.name));
  for (let i = 0; i < 50; i++) {
    try {
      rmdirSync(path);
      return;
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

export async function boot(root: string, name: string, logFile: string): Promise<Container> {
  for (const h of CGROUP_HIERARCHIES) await mkdir(`/sys/fs/cgroup/${h}/${name}`, { recursive: true });
  const moveIn = CGROUP_HIERARCHIES.map((h) => `echo $$ > /sys/fs/cgroup/${h}/${name}/cgroup.procs`).join(
    "; ",
  );
  const log = createWriteStream(logFile);
  // The shell moves itself into the throwaway cgroup, then becomes nspawn (setsid: own session, no
  // host terminal). --console=read-only: the container gets its own pty, never a host /dev node.
  const child: ChildProcess = spawn(
    "bash",
    [
      "-c",
      `${moveIn}; exec setsid systemd-nspawn -q -b --register=no --keep-unit --console=read-only --system-call-filter=bpf --machine=${name} -D "$0"`,
      root,
    ],
    { env: { ...process.env, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY: "1" }, stdio: ["ignore", "pipe", "pipe"] },
  );
  child.stdout?.pipe(log);
  child.stderr?.pipe(log);
  const exited = new Promise<void>((res) => child.on("exit", () => res()));
  const nspawnPid = child.pid as number;
  let pid: number | undefined;
  for (let i = 0; i < 300 && pid === undefined; i++) {
    await new Promise((r) => setTimeout(r, 100));
    pid = findInit(nspawnPid);
  }
  const cleanup = async (): Promise<void> => {
    for (const h of CGROUP_HIERARCHIES) await removeCgroup(`/sys/fs/cgroup/${h}/${name}`);
  };
  if (pid === undefined) {
    child.kill("SIGKILL");
    await exited;
    await cleanup();
    throw new Error(`systemd did not start in the container (see ${logFile})`);
  }
  const init = pid;
  const run: Container["run"] = async (args, o = {}) => {
    const r = await execa(
      "nsenter",
      [
        "-t",
        String(init),
        "-a",
        "env",
        "-i",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG=C.UTF-8",
        "DEBIAN_FRONTEND=noninteractive",
        "SYSTEMD_PAGER=",
        "SYSTEMD_COLORS=0",
        ...args,
      ],
      {
        reject: false,
        timeout: o.timeout ?? 120_000,
        ...(o.input === undefined ? { stdin: "ignore" as const } : { input: o.input }),
      },
    );
    return { code: r.exitCode ?? -1, out: String(r.stdout), err: String(r.stderr) };
  };
  const container: Container = {
    root,
    pid: init,
    run,
    async must(args, o) {
      const r = await run(args, o);
      if (r.code !== 0)
        throw new Error(
          `in container: ${args.join(" ")} → ${r.code}\n${r.out.slice(-2000)}\n${r.err.slice(-2000)}`,
        );
      return r.out;
    },
    async powerOff() {
      if (child.exitCode === null && child.signalCode === null) {
        // SIGRTMIN+4: systemd's "poweroff" signal (Node has no name for real-time signals).
        await execa("kill", ["-s", "RTMIN+4", String(init)], { reject: false });
        const timer = setTimeout(() => child.kill("SIGKILL"), 30_000);
        await exited;
        clearTimeout(timer);
      }
      await cleanup();
      log.end();
    },
  };
  // Wait for the boot to settle (running or degraded: a minbase root may lack optional units).
  for (let i = 0; i < 120; i++) {
    const s = await run(["systemctl", "is-system-running"]);
    if (/^(running|degraded)/.test(s.out.trim())) return container;
    await new Promise((r) => setTimeout(r, 500));
  }
  await container.powerOff();
  throw new Error(`the container's systemd never reached running (see ${logFile})`);
}
