import { type ChildProcess, spawn } from "node:child_process";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import type { Secret } from "../../src/core/secret.js";
import { addEnrolmentGroup, createBootstrapToken } from "../../src/registrar/admin.js";
import { initCa } from "../../src/registrar/ca/index.js";
import { loadRegistrarConfig } from "../../src/registrar/config.js";
import { openRegistrarStore } from "../../src/registrar/store/open.js";
import { createTestEkCa, type TestEkCa } from "./ek-ca.js";

/**
 * Fleet kit: prepares a registrar for the fleet simulator the way an operator would (fleet CA, a TPM
 * group trusting the simulated vendor's EK CA, a PKCS#11 group with one bootstrap token per device)
 * and runs the BUILT `m2m-registrar serve` (dist/) as child processes, so the registrar has its own
 * process and CPU accounting, as in production.
 */

/** Repository root (this file lives in bench/fleet/ or dist/bench/fleet/). */
export const REPO = (() => {
  const here = fileURLToPath(new URL(".", import.meta.url));
  return here.includes(`${join("dist", "bench")}`)
    ? resolve(here, "..", "..", "..")
    : resolve(here, "..", "..");
})();
export const REGISTRAR_CLI = join(REPO, "dist", "src", "cli", "m2m-registrar.js");

export const FLEET_TPM_GROUP = "sim-tpm";
export const FLEET_PKCS11_GROUP = "sim-hsm";

export interface FleetRegistrarSetup {
  readonly work: string;
  readonly configPath: string;
  readonly caFile: string;
  readonly caPem: string;
  readonly ekCa: TestEkCa;
  readonly tokens: readonly Secret[];
  readonly dataDir: string;
  readonly caDir: string;
  readonly serverCert: string;
  readonly serverKey: string;
  /** PostgreSQL URL when the registry is on PostgreSQL (`[store] url`), else SQLite in dataDir. */
  readonly storeUrl: string | undefined;
}

export interface PrepareOptions {
  readonly work: string;
  /** Bootstrap tokens to create for PKCS#11-style devices. */
  readonly pkcs11Devices: number;
  /** `[limits] max_in_flight`; default: the registrar's own default. */
  readonly maxInFlight?: number;
  /** Fixed listen port (replicas behind a load balancer); default 0 (any). */
  readonly port?: number;
  /** `public_url` (the load balancer's URL when replicas sit behind one). */
  readonly publicUrl?: string;
  /** Extra TOML lines appended at the end. */
  readonly extraToml?: readonly string[];
  /** `[store] url`: a PostgreSQL URL (e.g. from hw/postgres.ts); default SQLite in data_dir. */
  readonly storeUrl?: string;
}

/** Creates CA, EK vendor CA, config, groups and bootstrap tokens in `work`. */
export async function prepareFleetRegistrar(o: PrepareOptions): Promise<FleetRegistrarSetup> {
  const caDir = join(o.work, "ca");
  const dataDir = join(o.work, "registrar-data");
  const trustDir = join(o.work, "ek-trust");
  await mkdir(dataDir, { recursive: true });
  await mkdir(trustDir, { recursive: true });
  const paths = await initCa({ dir: caDir });
  const ekCa = await createTestEkCa();
  await ekCa.writeTrustDir(trustDir);
  const configPath = join(o.work, "registrar.toml");
  await writeFile(
    configPath,
    registrarToml(o, { dataDir, caDir, cert: paths.serverCert, key: paths.serverKey }),
  );
  // Through the registrar's own config and store selection (migrates a fresh PostgreSQL database).
  const store = await openRegistrarStore(await loadRegistrarConfig(configPath), { migrate: true });
  const tokens: Secret[] = [];
  try {
    await addEnrolmentGroup(store, {
      name: FLEET_TPM_GROUP,
      role: "sensor-gateway",
      attributes: { fleet: "simulated" },
      methods: ["tpm"],
      ekTrustDir: trustDir,
    });
    await addEnrolmentGroup(store, {
      name: FLEET_PKCS11_GROUP,
      role: "sensor-gateway",
      attributes: { fleet: "simulated" },
      methods: ["pkcs11"],
    });
    for (let i = 0; i < o.pkcs11Devices; i++) {
      tokens.push((await createBootstrapToken(store, FLEET_PKCS11_GROUP, 24 * 3600)).token);
    }
  } finally {
    await store.close();
  }
  return {
    work: o.work,
    configPath,
    caFile: paths.caCert,
    caPem: await readFile(paths.caCert, "utf8"),
    ekCa,
    tokens,
    dataDir,
    caDir,
    serverCert: paths.serverCert,
    serverKey: paths.serverKey,
    storeUrl: o.storeUrl,
  };
}

/**
 * Writes `registrar-NAME.toml` for one replica: same data, CA and store as the setup, its own
 * listen port, and `public_url` = the load balancer (the issuer and every endpoint handed to devices).
 */
export async function writeReplicaConfig(
  setup: FleetRegistrarSetup,
  name: string,
  o: Pick<PrepareOptions, "maxInFlight" | "port" | "publicUrl" | "extraToml">,
): Promise<string> {
  const file = join(setup.work, `registrar-${name}.toml`);
  await writeFile(
    file,
    registrarToml(
      { ...o, ...(setup.storeUrl === undefined ? {} : { storeUrl: setup.storeUrl }) },
      {
        dataDir: setup.dataDir,
        caDir: setup.caDir,
        cert: setup.serverCert,
        key: setup.serverKey,
      },
    ),
  );
  return file;
}

export function registrarToml(
  o: Pick<PrepareOptions, "maxInFlight" | "port" | "publicUrl" | "extraToml" | "storeUrl">,
  p: { dataDir: string; caDir: string; cert: string; key: string },
): string {
  return [
    `data_dir = "${p.dataDir}"`,
    `ca_dir = "${p.caDir}"`,
    ...(o.publicUrl === undefined ? [] : [`public_url = "${o.publicUrl}"`]),
    "[listen]",
    'host = "127.0.0.1"',
    `port = ${o.port ?? 0}`,
    "[tls]",
    `cert = "${p.cert}"`,
    `key = "${p.key}"`,
    ...(o.maxInFlight === undefined ? [] : ["[limits]", `max_in_flight = ${o.maxInFlight}`]),
    ...(o.storeUrl === undefined ? [] : ["[store]", `url = "${o.storeUrl}"`]),
    ...(o.extraToml ?? []),
    "",
  ].join("\n");
}

/** A running `m2m-registrar serve` child process. */
export interface RegistrarProcess {
  readonly child: ChildProcess;
  readonly pid: number;
  readonly url: string;
  /** Lines the registrar logged at level "error" so far (5xx are logged there). */
  errorLines(): string[];
  /** CPU seconds (user + system) the process has used so far, from /proc/PID/stat. */
  cpuSeconds(): Promise<number>;
  /** SIGTERM and wait. */
  stop(): Promise<void>;
  /** SIGKILL (a crash) and wait. */
  kill(): Promise<void>;
}

/** Starts `node dist/src/cli/m2m-registrar.js --json serve --config FILE`; resolves on its URL line. */
export function startRegistrarProcess(
  configPath: string,
  env: NodeJS.ProcessEnv = process.env,
): Promise<RegistrarProcess> {
  // FLEET_REGISTRAR_NODE_ARGS: extra node flags for the registrar (e.g. "--cpu-prof --cpu-prof-dir=D"
  // to profile it under load; node refuses --cpu-prof in NODE_OPTIONS).
  const nodeArgs = (env.FLEET_REGISTRAR_NODE_ARGS ?? "").split(" ").filter((a) => a !== "");
  const child = spawn(
    process.execPath,
    [...nodeArgs, REGISTRAR_CLI, "--json", "serve", "--config", configPath],
    {
      env,
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  let stderr = "";
  const errors: string[] = [];
  let tail = "";
  child.stderr?.on("data", (c: Buffer) => {
    const text = tail + c.toString();
    const lines = text.split("\n");
    tail = lines.pop() ?? "";
    for (const line of lines) {
      if (stderr.length < 20_000) stderr += `${line}\n`;
      if (/"level":\s*"error"/.test(line)) errors.push(line);
    }
  });
  const exited = new Promise<void>((r) => child.once("exit", () => r()));
  return new Promise((resolvePromise, reject) => {
    let out = "";
    const t = setTimeout(() => {
      child.kill("SIGKILL");
      reject(new Error(`registrar did not start:\n${stderr}`));
    }, 60_000);
    const onExit = () => {
      clearTimeout(t);
      reject(new Error(`registrar exited before listening:\n${stderr}`));
    };
    child.once("exit", onExit);
    child.stdout?.on("data", (c: Buffer) => {
      out += c.toString();
      const line = out.split("\n").find((l) => l.startsWith("{"));
      if (line === undefined) return;
      clearTimeout(t);
      child.off("exit", onExit);
      const { url } = JSON.parse(line) as { url: string };
      const pid = child.pid ?? 0;
      const alive = () => child.exitCode === null && child.signalCode === null;
      resolvePromise({
        child,
        pid,
        url,
        errorLines: () => [...errors],
        cpuSeconds: () => processCpuSeconds(pid),
        stop: async () => {
          if (alive()) child.kill("SIGTERM");
          await exited;
        },
        kill: async () => {
          if (alive()) child.kill("SIGKILL");
          await exited;
        },
      });
    });
  });
}

/** Clock ticks per second of /proc/PID/stat (USER_HZ: 100 on Linux x86-64 and arm64). */
const USER_HZ = 100;

/** utime + stime of a process, in seconds (0 once it is gone). */
export async function processCpuSeconds(pid: number): Promise<number> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, "utf8");
    // Fields after the command (which may contain spaces) start after the last ')'.
    const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    const utime = Number(rest[11]);
    const stime = Number(rest[12]);
    return (utime + stime) / USER_HZ;
  } catch {
    return 0;
  }
}
