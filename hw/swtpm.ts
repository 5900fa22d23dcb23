import { existsSync } from "node:fs";
import { chmod, copyFile, mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { execa, type ResultPromise } from "execa";
import { M2mError } from "../src/core/errors.js";

/**
 * swtpm test kit: a software TPM 2.0 with manufacturer-style EK certificates, for tests, the demo and
 * the `m2m-hw` CLI. Everything lives in a private temp dir: no /etc, no /var/lib, works as non-root.
 *
 * What swtpm 0.7.1 provisions (see docs/hardware-notes): RSA-2048 EK persisted at 0x81010001 with its
 * certificate at NV 0x01c00002; ECC P-384 EK (high range) at 0x81010016 with its certificate at NV
 * 0x01c00016; a platform certificate at NV 0x01c08000. All certificates chain to a local CA
 * (root + intermediate) whose PEMs are exposed as `caCertPems`.
 */

export interface SwtpmOptions {
  /**
   * Directory of the swtpm local CA to (re)use. Several swtpms started with the same `caDir` are
   * trusted by one CA (the first `startSwtpm` creates it). Default: a private CA inside the temp dir.
   * A caller-provided dir is never removed by `stop()`.
   */
  readonly caDir?: string;
  /** Timeout for each setup/tool call (ms). Default 30 s. */
  readonly timeoutMs?: number;
  /** Wait at most this long for swtpm to answer after start (ms). Default 10 s. */
  readonly readyTimeoutMs?: number;
  /**
   * Put a resource manager in front of swtpm: `"abrmd"` starts a private D-Bus session bus
   * (`dbus-daemon --session` on a socket in the temp dir) and `tpm2-abrmd --session` on it, and `tcti`
   * becomes the `tabrmd:` TCTI. What a gateway's kernel RM (`/dev/tpmrm0`) does: tpm2-pkcs11 and the
   * OpenSSL engine hold TPM sessions and objects across calls and need one (see hardware notes).
   * Both daemons are stopped by `stop()`. Default: none (tools talk to swtpm directly).
   */
  readonly resourceManager?: "abrmd";
}

export interface SwtpmHandle {
  /**
   * TCTI string for tpm2-tools and `TpmKeyProvider({ tcti })`; reflects the current ports (ctrl = port+1).
   * With `resourceManager: "abrmd"` it is the `tabrmd:` TCTI of the private broker.
   */
  readonly tcti: string;
  /** The swtpm TCTI itself (bypassing any resource manager). */
  readonly directTcti: string;
  /**
   * `{ TPM2TOOLS_TCTI }` for child processes; with a resource manager also `DBUS_SESSION_BUS_ADDRESS`
   * (the tabrmd TCTI finds the broker on that bus; a process that loads tpm2-pkcs11 needs it too).
   */
  readonly env: Readonly<Record<string, string>>;
  /** The private D-Bus session bus address when a resource manager runs, else undefined. */
  readonly dbusAddress: string | undefined;
  readonly port: number;
  readonly ctrlPort: number;
  /** Temp dir holding the TPM state and the private swtpm configs. */
  readonly dir: string;
  /** Local CA directory (root key/cert, intermediate signing key/cert). */
  readonly caDir: string;
  /** [root, intermediate] PEMs: trust anchors a verifier needs to accept this TPM's EK certificates. */
  readonly caCertPems: readonly string[];
  readonly rootCaPemPath: string;
  readonly intermediateCaPemPath: string;
  /** Runs one tpm2-tools command against this TPM (test helper; argv array, no shell). */
  tpm(
    tool: string,
    args: readonly string[],
    input?: Uint8Array | string,
  ): Promise<{ stdout: string; stderr: string }>;
  /** Clears the dictionary-attack lockout counter (`tpm2_dictionarylockout -c`, empty lockout auth). */
  resetDictionaryLockout(): Promise<void>;
  /** Orderly shutdown (`tpm2_shutdown`), kills swtpm, removes the temp dir. Idempotent. */
  stop(): Promise<void>;
  /**
   * Simulates a TPM power cycle: orderly shutdown, stop, start again on the same state (same ports
   * when they are still free, so a TCTI string taken before usually stays valid).
   */
  restart(): Promise<void>;
  /** Kills swtpm WITHOUT tpm2_shutdown (simulates a power cut; bumps the DA counter if DA keys were used). */
  kill(): Promise<void>;
  /** True while the swtpm process runs. */
  readonly running: boolean;
}

const ROOT_PEM = "swtpm-localca-rootca-cert.pem";
const INTERMEDIATE_PEM = "issuercert.pem";

/** Binds `port` on loopback (0 = kernel's choice) and releases it; resolves the port or undefined. */
async function probePort(port: number): Promise<number | undefined> {
  return new Promise<number | undefined>((resolve) => {
    const srv = createServer();
    srv.once("error", () => resolve(undefined));
    srv.listen(port, "127.0.0.1", () => {
      const addr = srv.address();
      const bound = typeof addr === "object" && addr !== null ? addr.port : 0;
      srv.close(() => resolve(bound > 0 ? bound : undefined));
    });
  });
}

/** Picks a free loopback TCP port by binding port 0 (the kernel chooses) and releasing it. */
export async function freeLoopbackPort(): Promise<number> {
  const port = await probePort(0);
  if (port === undefined) throw new Error("could not bind a loopback port");
  return port;
}

/**
 * Picks P such that P and P+1 are both free: the swtpm TCTI has no ctrl-port option, it always uses
 * port+1 for the control channel.
 */
export async function freeLoopbackPortPair(): Promise<number> {
  for (let i = 0; i < 50; i++) {
    const p = await freeLoopbackPort();
    if (p < 65535 && (await probePort(p + 1)) !== undefined) return p;
  }
  throw new Error("could not find two adjacent free loopback ports");
}

async function requireTool(
  tool: string,
  hint = "apt-get install swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0",
): Promise<void> {
  const dirs = (process.env.PATH ?? "/usr/bin:/bin:/usr/sbin:/sbin").split(":");
  if (!dirs.some((d) => existsSync(join(d, tool)))) {
    throw new M2mError("ERR_HW_TOOL_MISSING", "permanent", `${tool} not found in PATH`, { hint });
  }
}

const ABRMD_HINT = "apt-get install tpm2-abrmd libtss2-tcti-tabrmd0 dbus";

/** Finds tpm2-abrmd (Debian installs it in /usr/sbin, often not in a user's PATH). */
function abrmdPath(): string {
  for (const d of [...(process.env.PATH ?? "").split(":"), "/usr/sbin", "/sbin"]) {
    if (d !== "" && existsSync(join(d, "tpm2-abrmd"))) return join(d, "tpm2-abrmd");
  }
  throw new M2mError("ERR_HW_TOOL_MISSING", "permanent", "tpm2-abrmd not found", { hint: ABRMD_HINT });
}

const TABRMD_TCTI_LIBS = [
  "/usr/lib/x86_64-linux-gnu/libtss2-tcti-tabrmd.so.0",
  "/usr/lib/aarch64-linux-gnu/libtss2-tcti-tabrmd.so.0",
  "/usr/lib/libtss2-tcti-tabrmd.so.0",
];

function stderrOf(err: unknown): string {
  return String((err as { stderr?: unknown }).stderr ?? (err as Error).message ?? err).slice(-2000);
}

/**
 * Creates and starts a fresh swtpm (TPM 2.0) with EK certificates on free loopback ports.
 * @throws ERR_HW_TOOL_MISSING when swtpm/swtpm_setup/tpm2-tools are missing; ERR_HW_SWTPM_SETUP when
 * manufacturing fails; ERR_HW_SWTPM_START when swtpm does not answer in time.
 */
export async function startSwtpm(opts: SwtpmOptions = {}): Promise<SwtpmHandle> {
  for (const tool of ["swtpm", "swtpm_setup", "swtpm_localca", "tpm2_getcap", "tpm2_shutdown"]) {
    await requireTool(tool);
  }
  if (opts.resourceManager === "abrmd") {
    await requireTool("dbus-daemon", ABRMD_HINT);
    abrmdPath();
    // Without the TCTI library the broker runs but no client can reach it ("Could not load tcti").
    if (!TABRMD_TCTI_LIBS.some((p) => existsSync(p))) {
      throw new M2mError("ERR_HW_TOOL_MISSING", "permanent", "libtss2-tcti-tabrmd.so.0 not found", {
        hint: ABRMD_HINT,
      });
    }
  }
  const timeout = opts.timeoutMs ?? 30_000;
  const readyTimeout = opts.readyTimeoutMs ?? 10_000;
  const dir = await mkdtemp(join(tmpdir(), "m2m-swtpm-"));
  await chmod(dir, 0o700);
  const caDir = opts.caDir ?? join(dir, "ca");
  const ownCa = opts.caDir === undefined;
  let started: SwtpmInstance | undefined;
  try {
    await mkdir(caDir, { recursive: true, mode: 0o700 });
    const state = join(dir, "state");
    await mkdir(state, { mode: 0o700 });
    await setupState(dir, state, caDir, timeout);
    const rootCaPemPath = join(caDir, ROOT_PEM);
    const intermediateCaPemPath = join(caDir, INTERMEDIATE_PEM);
    const caCertPems = [await readFile(rootCaPemPath, "utf8"), await readFile(intermediateCaPemPath, "utf8")];
    const inst = new SwtpmInstance(
      dir,
      state,
      caDir,
      ownCa,
      caCertPems,
      rootCaPemPath,
      intermediateCaPemPath,
      {
        timeout,
        readyTimeout,
      },
      opts.resourceManager === "abrmd",
    );
    started = inst;
    await inst.start();
    return inst;
  } catch (err) {
    // stop() also ends a D-Bus daemon / tpm2-abrmd a failed start left behind.
    await started?.stop().catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
    throw err;
  }
}

/** Writes private swtpm_setup.conf / swtpm-localca.conf and manufactures the TPM state (EKs, certs). */
async function setupState(dir: string, state: string, caDir: string, timeout: number): Promise<void> {
  const setupConf = join(dir, "swtpm_setup.conf");
  const caConf = join(dir, "swtpm-localca.conf");
  const caOpts = join(dir, "swtpm-localca.options");
  await writeFile(
    caConf,
    [
      `statedir = ${caDir}`,
      `signingkey = ${join(caDir, "signkey.pem")}`,
      `issuercert = ${join(caDir, INTERMEDIATE_PEM)}`,
      `certserial = ${join(caDir, "certserial")}`,
      "",
    ].join("\n"),
    { mode: 0o600 },
  );
  await writeFile(
    caOpts,
    ["--platform-manufacturer m2m-agent", "--platform-version 2.1", "--platform-model swtpm", ""].join("\n"),
    { mode: 0o600 },
  );
  await writeFile(
    setupConf,
    [
      "create_certs_tool = /usr/bin/swtpm_localca",
      `create_certs_tool_config = ${caConf}`,
      `create_certs_tool_options = ${caOpts}`,
      "active_pcr_banks = sha256",
      "",
    ].join("\n"),
    { mode: 0o600 },
  );
  try {
    await execa(
      "swtpm_setup",
      [
        "--tpm2",
        "--tpmstate",
        state,
        "--config",
        setupConf,
        "--create-ek-cert",
        "--create-platform-cert",
        "--pcr-banks",
        "sha256",
        "--write-ek-cert-files",
        state,
        "--overwrite",
      ],
      // swtpm_setup creates scratch dirs under TMPDIR; keep them inside our private dir.
      { env: { TMPDIR: dir }, timeout, killSignal: "SIGKILL", stdin: "ignore" },
    );
  } catch (err) {
    throw new M2mError("ERR_HW_SWTPM_SETUP", "permanent", "swtpm_setup failed", {
      cause: err,
      details: { stderr: stderrOf(err).slice(-800) },
    });
  }
}

class SwtpmInstance implements SwtpmHandle {
  #proc: ResultPromise | undefined;
  #port = 0;
  #ctrlPort = 0;
  #stopped = false;
  #exited = true;
  readonly #limits: { timeout: number; readyTimeout: number };
  readonly #withAbrmd: boolean;
  #dbus: ResultPromise | undefined;
  #dbusAddress: string | undefined;
  #abrmd: ResultPromise | undefined;
  /** Unique per instance: several brokers may share a bus name space on one machine. */
  readonly #busName = `com.m2m.Tabrmd.t${process.pid}x${Math.floor(Math.random() * 1e9)}`;

  constructor(
    readonly dir: string,
    readonly stateDir: string,
    readonly caDir: string,
    readonly ownCa: boolean,
    readonly caCertPems: readonly string[],
    readonly rootCaPemPath: string,
    readonly intermediateCaPemPath: string,
    limits: { timeout: number; readyTimeout: number },
    withAbrmd = false,
  ) {
    this.#limits = limits;
    this.#withAbrmd = withAbrmd;
  }

  get directTcti(): string {
    return `swtpm:host=127.0.0.1,port=${this.#port}`;
  }
  get tcti(): string {
    return this.#withAbrmd ? `tabrmd:bus_name=${this.#busName},bus_type=session` : this.directTcti;
  }
  get dbusAddress(): string | undefined {
    return this.#dbusAddress;
  }
  get env(): Readonly<Record<string, string>> {
    return this.#dbusAddress === undefined
      ? { TPM2TOOLS_TCTI: this.tcti }
      : { TPM2TOOLS_TCTI: this.tcti, DBUS_SESSION_BUS_ADDRESS: this.#dbusAddress };
  }
  get port(): number {
    return this.#port;
  }
  get ctrlPort(): number {
    return this.#ctrlPort;
  }
  get running(): boolean {
    return !this.#exited;
  }

  /** Starts swtpm; reuses the previous ports first, then picks new ones on collision. */
  async start(): Promise<void> {
    let lastErr: unknown;
    for (let attempt = 0; attempt < 5; attempt++) {
      if (attempt > 0 || this.#port === 0) {
        this.#port = await freeLoopbackPortPair();
        this.#ctrlPort = this.#port + 1;
      }
      try {
        await this.#spawnAndWait();
        if (this.#withAbrmd) await this.#startAbrmd();
        return;
      } catch (err) {
        lastErr = err;
        await this.#killProc();
      }
    }
    throw new M2mError("ERR_HW_SWTPM_START", "transient", "swtpm did not start", {
      cause: lastErr,
      details: { stderr: stderrOf(lastErr).slice(-800) },
    });
  }

  async #spawnAndWait(): Promise<void> {
    const proc = execa(
      "swtpm",
      [
        "socket",
        "--tpm2",
        "--tpmstate",
        `dir=${this.stateDir}`,
        "--server",
        `type=tcp,port=${this.#port},bindaddr=127.0.0.1`,
        "--ctrl",
        `type=tcp,port=${this.#ctrlPort},bindaddr=127.0.0.1`,
        "--flags",
        "not-need-init,startup-clear",
      ],
      { stdin: "ignore", stdout: "ignore", reject: false, cleanup: true },
    );
    this.#proc = proc;
    this.#exited = false;
    void proc.then(() => {
      if (this.#proc === proc) this.#exited = true;
    });
    await this.#waitUntilAnswering({ TPM2TOOLS_TCTI: this.directTcti }, async () => {
      if (!this.#exited) return;
      const res = await proc;
      throw new Error(`swtpm exited early: ${String(res.stderr ?? "").slice(-500)}`);
    });
  }

  /**
   * Polls `tpm2_getcap` with `env` (its TCTI) until a tool answers; throws the last error after
   * readyTimeout. `gone` runs before each try and throws when the process behind the TCTI died.
   */
  async #waitUntilAnswering(env: Record<string, string>, gone?: () => Promise<void>): Promise<void> {
    const deadline = Date.now() + this.#limits.readyTimeout;
    for (;;) {
      await gone?.();
      try {
        await execa("tpm2_getcap", ["properties-fixed"], {
          env,
          timeout: 2_000,
          killSignal: "SIGKILL",
          stdin: "ignore",
        });
        return;
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await sleep(25);
      }
    }
  }

  /**
   * Starts (once) a private D-Bus session bus, then tpm2-abrmd on it against this swtpm, and waits
   * until a tool answers through the broker.
   */
  async #startAbrmd(): Promise<void> {
    await this.#stopAbrmd();
    if (this.#dbus === undefined) {
      const socket = join(this.dir, "dbus.sock");
      const dbus = execa(
        "dbus-daemon",
        ["--session", "--nofork", "--nopidfile", "--print-address=1", `--address=unix:path=${socket}`],
        { stdin: "ignore", stderr: "ignore", reject: false, cleanup: true, buffer: false },
      );
      this.#dbus = dbus;
      this.#dbusAddress = await new Promise<string>((resolve, reject) => {
        let text = "";
        const timer = setTimeout(() => reject(new Error("dbus-daemon printed no address")), 10_000);
        dbus.stdout?.on("data", (chunk: Buffer) => {
          text += chunk.toString("utf8");
          const line = text.split("\n")[0];
          if (text.includes("\n") && line?.startsWith("unix:") === true) {
            clearTimeout(timer);
            resolve(line.trim());
          }
        });
        void dbus.then(() => {
          clearTimeout(timer);
          reject(new Error("dbus-daemon exited"));
        });
      });
    }
    const args = ["--session", `--dbus-name=${this.#busName}`, `--tcti=${this.directTcti}`, "--flush-all"];
    // tpm2-abrmd refuses to run as root without saying so explicitly (tests and CI run as root).
    if (process.getuid?.() === 0) args.push("--allow-root");
    this.#abrmd = execa(abrmdPath(), args, {
      stdin: "ignore",
      stdout: "ignore",
      stderr: "ignore",
      reject: false,
      cleanup: true,
      env: { DBUS_SESSION_BUS_ADDRESS: this.#dbusAddress ?? "" },
    });
    await this.#waitUntilAnswering(this.env);
  }

  async #stopAbrmd(): Promise<void> {
    const p = this.#abrmd;
    this.#abrmd = undefined;
    if (p === undefined) return;
    p.kill("SIGTERM");
    const timer = setTimeout(() => p.kill("SIGKILL"), 3_000);
    await p;
    clearTimeout(timer);
  }

  async #stopDbus(): Promise<void> {
    const p = this.#dbus;
    this.#dbus = undefined;
    this.#dbusAddress = undefined;
    if (p === undefined) return;
    p.kill("SIGTERM");
    const timer = setTimeout(() => p.kill("SIGKILL"), 3_000);
    await p;
    clearTimeout(timer);
  }

  async tpm(
    tool: string,
    args: readonly string[],
    input?: Uint8Array | string,
  ): Promise<{ stdout: string; stderr: string }> {
    const res = await execa(tool, [...args], {
      env: this.env,
      timeout: this.#limits.timeout,
      killSignal: "SIGKILL",
      ...(input === undefined ? { stdin: "ignore" as const } : { input }),
    });
    return { stdout: res.stdout, stderr: res.stderr };
  }

  async resetDictionaryLockout(): Promise<void> {
    await this.tpm("tpm2_dictionarylockout", ["-c"]);
  }

  async #orderlyShutdown(): Promise<void> {
    if (this.#exited) return;
    // An orderly TPM2_Shutdown keeps the DA counter from growing on every stop (see hardware notes).
    await execa("tpm2_shutdown", [], {
      env: this.env,
      timeout: 5_000,
      killSignal: "SIGKILL",
      stdin: "ignore",
      reject: false,
    });
  }

  async #killProc(): Promise<void> {
    const proc = this.#proc;
    if (proc === undefined) return;
    if (!this.#exited) {
      proc.kill("SIGTERM");
      const timer = setTimeout(() => proc.kill("SIGKILL"), 3_000);
      await proc;
      clearTimeout(timer);
    }
    this.#exited = true;
    this.#proc = undefined;
  }

  async kill(): Promise<void> {
    const proc = this.#proc;
    if (proc === undefined) return;
    proc.kill("SIGKILL");
    await proc;
    this.#exited = true;
    this.#proc = undefined;
  }

  async restart(): Promise<void> {
    if (this.#stopped) throw new Error("swtpm was stopped");
    await this.#orderlyShutdown();
    // The broker holds a connection to the old swtpm process: it is restarted with it.
    await this.#stopAbrmd();
    await this.#killProc();
    await this.start();
  }

  async stop(): Promise<void> {
    if (this.#stopped) return;
    this.#stopped = true;
    try {
      await this.#orderlyShutdown();
      await this.#stopAbrmd();
      await this.#killProc();
      await this.#stopDbus();
    } finally {
      await rm(this.dir, { recursive: true, force: true });
    }
  }
}

/**
 * Makes `<parent>/ek-trust` holding the swtpm EK CA chain (root.pem, intermediate.pem): the
 * directory a registrar group's `ek_trust_dir` names. Returns its path.
 */
export async function writeEkTrustDir(
  tpm: Pick<SwtpmHandle, "rootCaPemPath" | "intermediateCaPemPath">,
  parent: string,
): Promise<string> {
  const dir = join(parent, "ek-trust");
  await mkdir(dir);
  await copyFile(tpm.rootCaPemPath, join(dir, "root.pem"));
  await copyFile(tpm.intermediateCaPemPath, join(dir, "intermediate.pem"));
  return dir;
}

/** Creates an empty directory to share one swtpm local CA between several `startSwtpm({ caDir })`. */
export async function createSharedSwtpmCaDir(): Promise<{ caDir: string; cleanup: () => Promise<void> }> {
  const caDir = await mkdtemp(join(tmpdir(), "m2m-swtpm-ca-"));
  await chmod(caDir, 0o700);
  return { caDir, cleanup: () => rm(caDir, { recursive: true, force: true }) };
}
